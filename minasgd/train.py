"""Single-process training: the loop every other mode builds on.

    summary = train(TrainConfig(dataset="shapes", epochs=8))

Each step: take a mini-batch, normalise it, forward + backward on the model
(`Model.loss_and_grad`), and one SGD update of the flat parameter vector.
After every epoch the test split is evaluated. Everything worth keeping goes to
the run directory (`minasgd.rundir`); nothing is drawn on a screen here. Pass
`on_event` to hear how it goes: it is called with one dict per event,

    {"kind": "backend", "name", "device"}                  before the data is loaded
    {"kind": "threads", "text"}                            the thread count (BLAS and loops), and why (`minasgd.threads`)
    {"kind": "progress", "what", "done", "total"}          while the dataset is drawn or read
    {"kind": "warm_start", "init", "steps"}                parameters loaded from --init
    {"kind": "start", "model", "num_params", "dataset", "train_images", "test_images", "run_dir"}
    {"kind": "epoch_start", "epoch", "epochs", "steps"}
    {"kind": "step", "batch", ...}                         each logged step (the metrics.jsonl record)
    {"kind": "epoch", ...}                                 each epoch's record, with test accuracy
    {"kind": "done", "summary", "run_dir"}

`minasgd.dashboard.TrainProgress` turns them into the live view of `minasgd train`.
"""

import time
from dataclasses import asdict

import numpy as np

from . import backends, checkpoint, data
from .config import TrainConfig, step_range, total_steps  # noqa: F401  (TrainConfig is imported from here too)
from .model import Model
from .optim import SGD, learning_rate
from .rundir import RunDir, default_run_dir
from .threads import threads_for_one_process


def load_dataset(cfg, progress=None):
    """The configured dataset, cut to train_limit / test_limit; `progress` as in `minasgd.data.load`."""
    ds = data.load(cfg.dataset, root=cfg.data_root or data.default_root(), seed=0, progress=progress)
    if cfg.train_limit:
        ds.train_x, ds.train_y = ds.train_x[: cfg.train_limit], ds.train_y[: cfg.train_limit]
    if cfg.test_limit:
        ds.test_x, ds.test_y = ds.test_x[: cfg.test_limit], ds.test_y[: cfg.test_limit]
    return ds


def prepare_batch(be, model, x_u8, y):
    """uint8 NHWC images -> normalised float32 NCHW on the backend, labels as int32."""
    x = data.normalize(x_u8)
    c, h, w = model.input_shape
    if x.shape[1:] != (c, h, w):  # e.g. the 8x8 `micro` net: take the top-left crop
        x = np.ascontiguousarray(x[:, :c, :h, :w])
    return be.asarray(x), be.asarray(np.ascontiguousarray(y, dtype=np.int32))


def evaluate(model, x_u8, y, batch_size=256):
    """Test accuracy and mean loss of the model (no dropout)."""
    be = model.be
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb, yb = prepare_batch(be, model, x_u8[start : start + batch_size], y[start : start + batch_size])
        logits = model.forward(xb, train=False)
        loss, _ = be.softmax_cross_entropy(logits, yb)
        pred = be.to_numpy(logits).argmax(axis=1)
        correct += int((pred == y[start : start + batch_size]).sum())
        loss_sum += float(be.to_numpy(loss)[0]) * len(pred)
    n = max(1, len(y))
    return correct / n, loss_sum / n


def train_sample(cfg, ds):
    """(images, labels) whose accuracy is the run's training accuracy: the first `cfg.eval_train`
    training images (None when off). Evaluated without dropout, like the test split."""
    if not cfg.eval_train:
        return None
    return ds.train_x[: cfg.eval_train], ds.train_y[: cfg.eval_train]


def evaluate_record(model, test, train=None):
    """{"test_accuracy", "test_loss"} of the model, plus "train_accuracy", "train_loss" on `train`."""
    accuracy, loss = evaluate(model, *test)
    record = {"test_accuracy": accuracy, "test_loss": loss}
    if train is not None:
        record["train_accuracy"], record["train_loss"] = evaluate(model, *train)
    return record


def warm_start(model, path):
    """Load the saved parameters at `path` into the model; returns how many steps they were trained."""
    ckpt = checkpoint.load(path, expect_fingerprint=model.fingerprint())
    model.set_params(ckpt["params"])
    return ckpt["meta"].get("steps", "?")


def schedule_start(cfg):
    """The step of the lr schedule a run begins at: the --init checkpoint's step count with
    `continue_schedule` (the paper's warm start, mid-schedule), else 0."""
    if not cfg.continue_schedule:
        return 0
    if not cfg.init:
        raise ValueError("--continue-schedule needs --init (the checkpoint whose schedule to continue)")
    steps = checkpoint.load(cfg.init)["meta"].get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"--continue-schedule: {cfg.init} does not say how many steps it was trained")
    return steps


def build_model(cfg, be, on_event=None):
    """The configured model, warm-started from cfg.init if set; a warm start is told to
    `on_event` as {"kind": "warm_start", "init", "steps"} (one process and the workers' server alike)."""
    model = Model(cfg.model, be, seed=cfg.seed)
    if cfg.init:
        steps = warm_start(model, cfg.init)
        if on_event is not None:
            on_event({"kind": "warm_start", "init": cfg.init, "steps": steps})
    return model


def _ignore(event):
    pass


def train(cfg: TrainConfig, on_event=None):
    """Train in this process; returns the summary dict (also written to summary.json).

    `on_event(dict)` hears how it goes (see the module docstring); None: nothing is reported.
    """
    emit = on_event or _ignore
    be = backends.get(cfg.backend, cfg.gpu)
    emit({"kind": "backend", "name": be.NAME, "device": be.DEVICE})
    make_step = None if be.NAME == "cuda" else (lambda: timed_step(cfg, be))
    with threads_for_one_process(cfg.threads, make_step=make_step) as threads_line:
        emit({"kind": "threads", "text": threads_line})
        return _train(cfg, be, emit)


def timed_step(cfg, be):
    """One forward and backward of a random batch of the run's model and batch size (the
    start-up measurement of `minasgd.threads`; the run's own model is not touched)."""
    model = Model(cfg.model, be, seed=0)
    x = be.asarray(np.random.default_rng(0).standard_normal((cfg.batch_size, *model.input_shape)).astype(np.float32))
    y = be.asarray(np.zeros(cfg.batch_size, dtype=np.int32))

    def step():
        model.loss_and_grad(x, y)
        be.synchronize()
    return step


def _train(cfg, be, emit):
    ds = load_dataset(cfg, progress=lambda what, done, total: emit(
        {"kind": "progress", "what": what, "done": done, "total": total}))
    model = build_model(cfg, be, emit)
    run = RunDir(cfg.out or default_run_dir())
    emit({"kind": "start", "model": model.name, "num_params": model.num_params, "dataset": ds.name,
          "train_images": len(ds.train_y), "test_images": len(ds.test_y), "run_dir": str(run.path)})

    opt = SGD(be, model.num_params, cfg.momentum, cfg.weight_decay)
    steps_per_epoch, schedule_steps = total_steps(cfg, len(ds.train_y))
    first_step, last_step = step_range(cfg, schedule_steps, schedule_start(cfg))
    rng = np.random.default_rng(cfg.seed)

    eval_steps = max(1, round(cfg.eval_every * steps_per_epoch))
    train_eval = train_sample(cfg, ds)
    step, images, train_seconds = first_step, 0, 0.0
    started = time.perf_counter()
    test_acc, test_loss, epoch = float("nan"), float("nan"), 0

    def evaluate_now(t0):
        """Test accuracy at this exact step; "time" is training time only (evaluations excluded)."""
        nonlocal test_acc, test_loss
        be.synchronize()
        seconds = train_seconds + time.perf_counter() - t0
        accuracies = evaluate_record(model, (ds.test_x, ds.test_y), train_eval)
        test_acc, test_loss = accuracies["test_accuracy"], accuracies["test_loss"]
        epoch_now = step // steps_per_epoch if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 4)
        record = {"kind": "epoch", "epoch": epoch_now, "step": step, **accuracies,
                  "images": images, "images_per_second": images / max(seconds, 1e-9),
                  "time": seconds}
        run.log(record)
        return record

    for epoch in range(first_step // steps_per_epoch + 1, cfg.epochs + 1):
        if step >= last_step:
            break
        epoch_end = min(epoch * steps_per_epoch, last_step)  # (a continued schedule may begin mid-epoch)
        emit({"kind": "epoch_start", "epoch": epoch, "epochs": cfg.epochs, "steps": epoch_end - step})
        t0 = time.perf_counter()
        for b, (x_u8, y_np) in enumerate(data.batches(ds.train_x, ds.train_y, cfg.batch_size, rng, drop_last=True)):
            if step >= epoch_end:
                break
            x, y = prepare_batch(be, model, x_u8, y_np)
            lr = learning_rate(step, schedule_steps, cfg.lr, cfg.warmup_steps)
            loss = model.loss_and_grad(x, y, step)
            opt.step(model.params, model.grads, lr)
            step += 1
            images += len(y_np)
            if step % cfg.log_every == 0 or step == last_step:
                loss_value = float(be.to_numpy(loss)[0])  # the only device->host copy of a step
                if not np.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {step}; try a smaller --lr")
                elapsed = train_seconds + time.perf_counter() - t0
                record = {"kind": "step", "step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                          "images": images, "images_per_second": images / elapsed, "time": time.perf_counter() - started}
                run.log(record)
                emit({**record, "batch": b + 1})
            if step % eval_steps == 0 and step < epoch_end:  # mid-epoch (the epoch's end evaluates below)
                train_seconds += time.perf_counter() - t0  # a mid-epoch evaluation, off the clock
                emit(evaluate_now(time.perf_counter()))
                t0 = time.perf_counter()
        record = evaluate_now(t0)
        train_seconds = record["time"]
        emit(record)
        run.save_model(model.name, model.fingerprint(), model.get_params(), {"steps": step, "epoch": epoch})

    wall = time.perf_counter() - started
    summary = {"test_accuracy": test_acc, "test_loss": test_loss, "epochs": epoch, "steps": step,
               "images": images, "wall_seconds": wall, "train_seconds": train_seconds,
               "images_per_second": images / max(train_seconds, 1e-9), "backend": be.NAME, "device": be.DEVICE,
               "model": model.name, "num_params": model.num_params, "dataset": ds.name, "workers": 0,
               "config": {k: v for k, v in asdict(cfg).items() if k not in ("extra", "quiet")}, **cfg.extra}
    run.write_summary(summary)
    run.close()
    emit({"kind": "done", "summary": summary, "run_dir": str(run.path)})
    return summary
