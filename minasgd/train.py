"""Single-process training: the loop every other mode builds on.

    summary = train(TrainConfig(dataset="shapes", epochs=8))

Each step: take a mini-batch, normalise it, forward + backward on the model
(`Model.loss_and_grad`), and one SGD update of the flat parameter vector.
After every epoch the test split is evaluated. Progress is shown live with
rich; everything worth keeping goes to the run directory (`minasgd.rundir`).
"""

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import backends, checkpoint, data
from .model import Model
from .optim import SGD, learning_rate
from .progress import TrainProgress
from .rundir import RunDir, default_run_dir
from .threads import blas_threads_for_training


@dataclass
class TrainConfig:
    dataset: str = "shapes"
    model: str = "alexnet-mini"
    backend: str = "auto"
    gpu: int | None = None
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    seed: int = 0
    init: str | None = None
    out: str | None = None
    data_root: str | None = None
    max_steps: int | None = None  # stop early (tests, quick looks)
    train_limit: int | None = None  # use only the first images of each split (tests, quick looks)
    test_limit: int | None = None
    log_every: int = 20
    quiet: bool = False
    extra: dict = field(default_factory=dict)


def load_dataset(cfg):
    ds = data.load(cfg.dataset, root=cfg.data_root or data.default_root(), seed=0, progress=not cfg.quiet)
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


def build_model(cfg, be, console=None):
    model = Model(cfg.model, be, seed=cfg.seed)
    if cfg.init:
        ckpt = checkpoint.load(cfg.init, expect_fingerprint=model.fingerprint())
        model.set_params(ckpt["params"])
        if console:
            console.print(f"warm start from {cfg.init} ({ckpt['meta'].get('steps', '?')} steps trained)")
    return model


def train(cfg: TrainConfig, console=None):
    """Train in this process; returns the summary dict (also written to summary.json)."""
    with blas_threads_for_training() as threads_line:
        be = backends.get(cfg.backend, cfg.gpu)
        progress = TrainProgress(quiet=cfg.quiet, console=console)
        progress.say(f"backend: {be.NAME} on {be.DEVICE}")
        progress.say(threads_line)
        return _train(cfg, be, progress)


def _train(cfg, be, progress):
    ds = load_dataset(cfg)
    model = build_model(cfg, be, progress.console)
    run = RunDir(cfg.out or default_run_dir())
    progress.say(f"model {model.name}: {model.num_params:,} parameters; dataset {ds.name}: "
                 f"{len(ds.train_y):,} train / {len(ds.test_y):,} test; run dir {run.path}")

    opt = SGD(be, model.num_params, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = len(ds.train_y) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set ({len(ds.train_y)} images)")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    rng = np.random.default_rng(cfg.seed)

    step, images, train_seconds = 0, 0, 0.0
    started = time.perf_counter()
    test_acc, test_loss, epoch = float("nan"), float("nan"), 0
    with progress:
        for epoch in range(1, cfg.epochs + 1):
            if step >= total_steps:
                break
            bar = progress.start_epoch(epoch, cfg.epochs, min(steps_per_epoch, total_steps - step))
            order = rng.permutation(len(ds.train_y))
            t0 = time.perf_counter()
            for b in range(steps_per_epoch):
                if step >= total_steps:
                    break
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x, y = prepare_batch(be, model, ds.train_x[idx], ds.train_y[idx])
                lr = learning_rate(step, total_steps, cfg.lr, cfg.warmup_steps)
                loss = model.loss_and_grad(x, y, step)
                opt.step(model.params, model.grads, lr)
                step += 1
                images += len(idx)
                if step % cfg.log_every == 0 or step == total_steps:
                    loss_value = float(be.to_numpy(loss)[0])  # the only device->host copy of a step
                    if not np.isfinite(loss_value):
                        raise FloatingPointError(f"loss became {loss_value} at step {step}; try a smaller --lr")
                    elapsed = train_seconds + time.perf_counter() - t0
                    run.log({"kind": "step", "step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                             "images": images, "images_per_second": images / elapsed, "time": time.perf_counter() - started})
                    progress.update(bar, b + 1, loss=loss_value, ips=images / elapsed)
            be.synchronize()
            train_seconds += time.perf_counter() - t0
            test_acc, test_loss = evaluate(model, ds.test_x, ds.test_y)
            record = {"kind": "epoch", "epoch": epoch, "step": step, "test_accuracy": test_acc, "test_loss": test_loss,
                      "images": images, "images_per_second": images / max(train_seconds, 1e-9),
                      "time": time.perf_counter() - started}
            run.log(record)
            progress.end_epoch(bar, record)
            run.save_model(model.name, model.fingerprint(), model.get_params(), {"steps": step, "epoch": epoch})

    wall = time.perf_counter() - started
    summary = {"test_accuracy": test_acc, "test_loss": test_loss, "epochs": epoch, "steps": step,
               "images": images, "wall_seconds": wall, "train_seconds": train_seconds,
               "images_per_second": images / max(train_seconds, 1e-9), "backend": be.NAME, "device": be.DEVICE,
               "model": model.name, "num_params": model.num_params, "dataset": ds.name, "workers": 0,
               "config": {k: v for k, v in asdict(cfg).items() if k not in ("extra", "quiet")}, **cfg.extra}
    run.write_summary(summary)
    run.close()
    progress.say(f"done: test accuracy {test_acc:.2%}, {wall:.0f} s, {summary['images_per_second']:.0f} images/s "
                 f"-> {run.path}")
    return summary
