"""What a parameter-server run does whatever carries its bytes: shared by the TCP launcher
(`minasgd.ps.launcher`) and the MPI job (`minasgd.ps.mpi_job`).

    ps = create_server(cfg, opts, model, train_size, run)    the ParameterServer for a config
    watch(ps, monitor, worker_exits)                         tick the monitor until training is over
    summary = finish_run(cfg, opts, on_event, monitor, ...)  final evaluation, summary.json, "done"

`opts` is a `minasgd.ps.launcher.PsOptions`. What happens is told to `on_event(event)` (see
`minasgd.ps.launcher.run_server` for the events); nothing here touches a terminal.
"""

import math
import time
from dataclasses import asdict

from .. import backends, checkpoint
from ..rundir import RunDir
from ..train import schedule_start
from ..train import total_steps as count_steps
from .protocol import MAX_NPUSH
from .server import ParameterServer

LR_SCALINGS = ("none", "average", "sqrt", "workers", "staleness")
MOMENTUM_SCALINGS = ("none", "staleness", "workers")


class WorkersGone(ChildProcessError):
    """Every worker process exited before training was over."""


# (flag, attribute, "positive" (> 0) or "non-negative" (>= 0), unit); finite either way
NUMBER_FLAGS = (("--timeout", "timeout", "positive", "seconds"),
                ("--handshake-timeout", "handshake_timeout", "positive", "seconds"),
                ("--round-timeout", "round_timeout", "positive", "seconds"),
                ("--checkpoint-every", "checkpoint_every", "non-negative", "seconds (0: only at the end)"),
                ("--eval-every", "eval_every", "positive", "epochs"),
                ("--reconnect", "reconnect", "non-negative", "seconds"),
                ("--adagrad-lr", "adagrad_lr", "positive", "(a learning rate)"))
# (flag, attribute, lowest, highest)
COUNT_FLAGS = (("--max-connections", "max_connections", 1, 1 << 20), ("--max-handshakes", "max_handshakes", 1, 1 << 16),
               ("--nsync", "nsync", 1, MAX_NPUSH),
               ("--nfetch", "nfetch", 1, MAX_NPUSH), ("--npush", "npush", 1, MAX_NPUSH))


def check_options(opts):
    """Refuse, with one line, a setting with which the server would run but nobody could train:
    a zero, negative or NaN timeout, no connections allowed, an nsync of 0 ... (None: the default)."""
    for flag, name, kind, unit in NUMBER_FLAGS:
        value = getattr(opts, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0 or (value == 0 and kind == "positive")):
            raise ValueError(f"{flag} must be a {kind} number {unit}, got {value}")
    for flag, name, low, high in COUNT_FLAGS:
        value = getattr(opts, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ValueError(f"{flag} must be an integer from {low} to {high}, got {value}")


def create_server(cfg, opts, model, train_size, run):
    """The ParameterServer for this config (no transport yet)."""
    check_options(opts)
    steps_per_epoch, total_steps = count_steps(cfg, train_size)
    if cfg.stop_step:
        raise ValueError("--stop-at is for one process (a mid-schedule snapshot); workers run to the end")
    if opts.lr_scaling not in LR_SCALINGS:
        raise ValueError(f"unknown --lr-scaling {opts.lr_scaling!r}; choose one of {', '.join(LR_SCALINGS)}")
    if opts.momentum_scaling not in MOMENTUM_SCALINGS:
        raise ValueError(f"unknown --momentum-scaling {opts.momentum_scaling!r}; "
                         f"choose one of {', '.join(MOMENTUM_SCALINGS)}")
    if opts.momentum_at not in ("worker", "server"):
        raise ValueError(f"unknown --momentum-at {opts.momentum_at!r}; choose worker or server")
    sgd, on_server = opts.optimizer == "sgd", opts.momentum_at == "server"
    momentum, lr_scale = worker_settings(cfg.momentum, opts)
    ps = ParameterServer(
        model.get_params(), model_name=model.name, fingerprint=model.fingerprint(), total_steps=total_steps,
        lr=cfg.lr if sgd else opts.adagrad_lr, warmup_steps=cfg.warmup_steps, optimizer=opts.optimizer,
        momentum=cfg.momentum if sgd and on_server else 0.0, lr_scale=lr_scale, push_fraction=push_fraction(opts),
        sync=opts.sync, staleness_lr=opts.lr_scaling == "staleness", expected_workers=opts.workers,
        checkpoint_path=run.model_path, checkpoint_every=opts.checkpoint_every,
        eval_every_steps=max(1, round(opts.eval_every * steps_per_epoch)),
        round_timeout=opts.round_timeout if opts.round_timeout is not None else opts.timeout,
        start_step=schedule_start(cfg),
        # The workers run single-process training's SGD (--momentum, --weight-decay) locally and
        # push the steps they took; with Adagrad they push plain gradient sums and take no steps.
        worker_config={"model": model.name, "dataset": cfg.dataset, "batch_size": cfg.batch_size,
                       "nsync": opts.nsync, "npush": opts.npush or opts.nsync, "momentum": momentum,
                       "local_steps": sgd,
                       "weight_decay": cfg.weight_decay, "seed": cfg.seed, "train_limit": cfg.train_limit})
    if opts.resume:
        resume_server(ps, opts.resume)
    return ps


def worker_settings(momentum, opts):
    """(each worker's SGD momentum, the factor on the lr schedule it steps with): what --lr and
    --momentum mean with `opts.workers` workers, in one place for both transports and the reports.

    - --optimizer adagrad: the workers take no steps (0, 1); the server's Adagrad has its own lr.
    - --momentum-at server: the workers step without momentum, the server keeps it (0, 1).
    - --momentum-at worker: `worker_momentum` (--momentum-scaling), with a staleness of
      (N - 1) x nsync mini-batches, none with --sync (a round's workers start from the same parameters).
    Then --lr-scaling workers divides the lr by N; --lr-scaling average and staleness are the
    server's (`push_fraction`: 1 / N of every push; a push of k mini-batches, s stale, is applied
    k / (k + s)) and leave the workers' lr as it is.
    """
    if opts.optimizer != "sgd":
        return 0.0, 1.0
    if opts.momentum_at == "server":
        per_worker, lr_scale = 0.0, 1.0
    else:
        per_worker, lr_scale = worker_momentum(momentum, opts.workers, 0 if opts.sync else opts.nsync,
                                               opts.momentum_scaling)
    if opts.lr_scaling == "workers":
        lr_scale /= opts.workers
    return per_worker, lr_scale


def push_fraction(opts):
    """The fraction of every push the server applies: 1 / N with `--lr-scaling average` (the
    parameters move by the average of the N workers' displacements, each worker stepping as one
    process would); 1 / sqrt(N) with `sqrt` (between the two: sqrt(N) x the average, as the
    square-root rule scales the lr with the batch); else 1 (the sum). Adagrad's pushes are
    gradients, scaled by its own lr."""
    if opts.optimizer != "sgd":
        return 1.0
    return {"average": 1.0 / opts.workers, "sqrt": 1.0 / math.sqrt(opts.workers)}.get(opts.lr_scaling, 1.0)


def worker_momentum(momentum, workers, nsync=1, scaling="staleness"):
    """(each worker's momentum, lr factor) for N = `workers` workers and momentum m.

    One process with momentum m delays a gradient's effect by T = 1 / (1 - m) mini-batches on
    average (10 for m = 0.9). N workers each run their own momentum and step in turn, so a worker's
    velocity decays once every N of the run's mini-batches: momentum m_w in each worker delays by
    about N / (1 - m_w) mini-batches. Staleness adds its own delay ("asynchrony begets momentum",
    Mitliagkas et al. 2016): a push is s = (N - 1) x nsync mini-batches stale. So:
      "workers":   m_w = m**N                          the same delay as one process, staleness aside
      "staleness": m_w = (1 - 1 / (T - s))**N, 0 when s >= T - 1: momentum delay + staleness = T
      "none":      m_w = m
    The lr factor (1 - m_w) / (1 - m) keeps every gradient's total step lr / (1 - m).
    """
    if scaling == "none" or workers == 1 or momentum == 0:
        return momentum, 1.0
    if scaling == "workers":
        per_worker = momentum**workers
    else:
        delay, stale = 1.0 / (1.0 - momentum), (workers - 1) * nsync
        per_worker = (1.0 - 1.0 / (delay - stale)) ** workers if delay - stale > 1.0 else 0.0
    return per_worker, (1.0 - per_worker) / (1.0 - momentum)


def resume_server(ps, run_dir):
    """Load RUN_DIR/model.npz (a full-state checkpoint) into `ps`; one clear line if it cannot.
    Temporary files a crash left behind while writing a checkpoint are removed first."""
    path = RunDir.model_path_in(run_dir)
    for name in checkpoint.remove_stale_temporaries(path):
        ps.log(f"removed {name}, left by a checkpoint that was being written when the server died")
    try:
        ps.resume(checkpoint.load(path, expect_fingerprint=ps.fingerprint))
    except (checkpoint.CheckpointError, ValueError) as e:
        raise ValueError(f"--resume {run_dir}: {e}") from None


def assign_devices(backend, gpu, n):
    """Resolve "auto" and give each of n workers a GPU (round-robin) or None on the CPU."""
    if backend == "auto":
        backend = "cuda" if backends.cuda_available() else "numpy"
    if backend == "numpy":
        return backend, [None] * n
    if gpu is not None:
        return backend, [gpu] * n
    from numba import cuda

    count = max(1, len(cuda.gpus))
    return backend, [i % count for i in range(n)]


def watch(ps, monitor, worker_exits, what="exit codes", stop=None):
    """Tick the monitor (evaluations, checkpoints; a view hears "serving") until the server says training is over
    (or the `stop` event is set: Ctrl-C).

    `worker_exits()`: one entry per worker we are responsible for, None while it runs, else how it
    ended (an exit code, a reason). Raises WorkersGone when they have all ended before the end.
    """
    with monitor:
        while not ps.done and not (stop and stop.is_set()):
            exits = worker_exits()
            if any(e is not None for e in exits):
                ps.begin()  # a worker died before everyone joined: start with the others
            if exits and all(e is not None for e in exits) and not ps.done:
                raise WorkersGone(f"all {len(exits)} workers exited before training was over "
                                  f"({what} {', '.join(str(e) for e in exits)}; their errors are printed above)")
            monitor.tick()
            time.sleep(0.2)


def finish_run(cfg, opts, on_event, monitor, run, eval_model, ds, *, backend, device, workers, address):
    """The final evaluation, summary.json and the "done" event; returns the summary."""
    numbers = monitor.finish()
    for problem in (monitor.ps.checkpoint_error, getattr(monitor.run, "log_error", None)):
        if problem:  # the last checkpoint or metrics line failed: the operator must hear it, quiet or not
            on_event({"kind": "warning", "text": problem})
    momentum, lr_scale = worker_settings(cfg.momentum, opts)
    summary = {**numbers, "backend": backend, "device": device,
               "worker_momentum": momentum, "worker_peak_lr": cfg.lr * lr_scale if opts.optimizer == "sgd" else None,
               "push_fraction": push_fraction(opts),
               "model": eval_model.name, "num_params": eval_model.num_params, "dataset": ds.name,
               "workers": workers or len(numbers["worker_stats"]), "nsync": opts.nsync,
               "nfetch": opts.nfetch or opts.nsync, "npush": opts.npush or opts.nsync, "address": address,
               "config": {k: v for k, v in asdict(cfg).items() if k not in ("extra", "quiet")},
               "ps": asdict(opts) | {"token": bool(opts.token)}, **cfg.extra}
    run.write_summary(summary)
    run.close()
    on_event({"kind": "done", "summary": summary, "run_dir": str(run.path)})
    return summary


def server_start(address, ps, opts, workers, eval_model, ds, run):
    """The "server_start" event: where the server listens, how it trains, on what."""
    return {"kind": "server_start", "address": address, "mode": ps.mode, "optimizer": opts.optimizer,
            "nsync": opts.nsync, "workers": workers, "rule": update_rule_words(ps, opts), "model": eval_model.name, "num_params": eval_model.num_params,
            "dataset": ds.name, "train_images": len(ds.train_y), "test_images": len(ds.test_y),
            "run_dir": str(run.path)}


def update_rule_words(ps, opts):
    """'each worker: SGD momentum 0.9, peak lr 0.02; the server applies every push as it is, in
    rounds of one push from every worker (--lr-scaling none, --sync)': what the workers and the
    server will do, in words."""
    if opts.optimizer != "sgd":
        return f"the server's Adagrad, lr {ps.base_lr:g}; the workers push gradient sums"
    fraction = ps.update.push_fraction
    if fraction == 1.0:
        applies = "every push as it is"
    elif (1 / fraction).is_integer():
        applies = f"1/{round(1 / fraction)} of every push"
    else:
        applies = f"{fraction:.3g} of every push"
    server_momentum = f" with momentum {ps.momentum:g}" if ps.momentum else ""
    when = "in rounds of one push from every worker" if opts.sync else "as each push arrives"
    return (f"each worker: SGD momentum {ps.worker_config.get('momentum', 0.0):.3g}, peak lr "
            f"{ps.base_lr * ps.lr_scale:.3g}; the server applies {applies}{server_momentum}, {when} "
            f"(--lr-scaling {opts.lr_scaling}, {'--sync' if opts.sync else '--async'})")


def ignore(event):
    pass
