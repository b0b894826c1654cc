"""`minasgd train --workers N`: a parameter server and N worker processes on this machine.

    summary = train_distributed(TrainConfig(dataset="shapes", model="tiny"), PsOptions(workers=2))

What happens:
1. This process loads the dataset once and cuts the train split into N shards.
2. It starts the parameter server (`ParameterServer` behind a `TcpServer`, threads in this
   process) on a loopback port (`--bind` to choose it).
3. It starts N worker processes with multiprocess's "spawn" start method (each imports NumPy
   afresh, so the BLAS thread count set for it takes effect). Each gets its shard and, with the
   cuda backend, a GPU (round-robin when there are several); every worker gets ONE BLAS thread
   (the rule of `minasgd.threads`, unless OPENBLAS_NUM_THREADS or the like says otherwise), so
   the processes share the CPU instead of fighting over it. Oversubscribed BLAS threads spin
   and wait for each other: on a 2-core machine one worker with 2 threads next to the server ran
   5x slower than with 1.
4. It watches the server (`Monitor`): test accuracy every epoch's worth of mini-batches,
   metrics.jsonl, a checkpoint every `checkpoint_every` seconds; what happens goes to `on_event`
   (the command line's `minasgd.dashboard.ServerView` draws the live dashboard from it).
5. When the server has applied `epochs` epochs of mini-batches it answers "done"; the workers
   say BYE and exit, and the run directory gets model.npz and summary.json with the server's
   statistics. A worker that dies is dropped and the others carry on. Ctrl-C, SIGTERM or SIGHUP
   stop everything after a final checkpoint that `--resume` accepts; the workers hear "server
   stopping" (not "training finished"), so `minasgd work` elsewhere keeps reconnecting.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import backends
from ..rundir import RunDir, default_run_dir
from ..threads import blas_threads_for_training
from ..train import build_model, load_dataset, train_sample
from .monitor import Monitor
from .run import assign_devices, check_options, create_server, finish_run, ignore, server_start, watch
from .run import WorkersGone, worker_momentum  # noqa: F401  (what this module's users catch and call)
from .tcp import TcpServer, listen, parse_address


@dataclass
class PsOptions:
    """The parameter-server settings of `minasgd train --workers N` and `minasgd serve`."""

    workers: int = 2
    # nfetch = npush = nsync, as in the paper. 1 by default: with --sync (the default) every round
    # is then one mini-batch of every worker, summed: one process's step on N times the batch at
    # N times the lr (docs/paper.md, "Choosing the defaults").
    nsync: int = 1
    nfetch: int | None = None
    npush: int | None = None
    # Rounds (the default): the server waits for one push of every worker, applies them together,
    # and replies to all; no push is stale. False (--async): each push is applied as it arrives,
    # as in the paper. On a 2-core machine with equal workers async saved little time and cost
    # accuracy at every setting measured (docs/paper.md, "Choosing the defaults").
    sync: bool = True
    optimizer: str = "sgd"  # the server's: sgd or adagrad (Downpour SGD's)
    # Where --momentum lives: "worker" (each worker's local SGD; they push their steps) or "server"
    # (one velocity on the server, decaying per mini-batch; workers push gradients). Either way a
    # gradient moves the parameters lr / (1 - m) in total, as in one process. See docs/paper.md
    # for the sweep that chose the default.
    momentum_at: str = "worker"
    # How each worker's momentum is set from --momentum m (`worker_momentum`): "none" (default)
    # runs m as given, so each worker steps exactly as one process does; "staleness" lowers it so
    # that momentum's delay plus the staleness match one process's, "workers" to m**N, both raising
    # the lr to keep a gradient's total step lr / (1 - m). Chosen by measurement (docs/paper.md,
    # "Choosing the defaults"); in sync rounds there is no staleness to correct for.
    momentum_scaling: str = "none"
    # none (the default: the sum, every mini-batch moves the parameters lr / (1 - m), as in one
    # process) | average (the server applies 1/N of every push, so the parameters move by the mean
    # of the workers' displacements: model averaging) | sqrt (1/sqrt(N)) | workers (the workers'
    # lr / N) | staleness (a push of k mini-batches, s stale, moves k / (k + s) as far).
    lr_scaling: str = "none"
    # The server's Adagrad lr (--lr is SGD's; Adagrad's steps have another scale). Tuned on tiny,
    # 2 workers at nsync 4, 4 epochs: 0.003 -> 14.8%, 0.01 -> 22.6%, 0.03 -> 30.6%, 0.1 diverged
    # (the SGD defaults: 29.6%).
    adagrad_lr: float = 0.03
    transport: str = "tcp"  # tcp: sockets, worker processes started here; mpi: ranks of `mpiexec` (minasgd.ps.mpi)
    bind: str | None = None  # HOST:PORT; default: a free loopback port
    token: str | None = None
    timeout: float = 120.0  # seconds of silence before a worker is dropped
    checkpoint_every: float = 60.0  # seconds
    eval_every: float = 1.0  # epochs' worth of mini-batches between test evaluations
    max_connections: int = 256  # workers connected at once (past the handshake); more are refused with ERROR
    max_handshakes: int = 64  # connections still in their handshake; a new one drops the oldest
    handshake_timeout: float = 10.0  # seconds, in total, a new connection has to finish HELLO
    round_timeout: float | None = None  # sync: seconds a round waits for a worker (default: timeout)
    reconnect: float = 60.0  # seconds a worker keeps trying to reach a server that went away
    resume: str | None = None  # RUN_DIR: continue the run whose full-state model.npz is there



# ------------------------------------------------------------------ the server

def start_server(cfg, opts, model, train_size, run, listener):
    """Create the ParameterServer for this config and serve it on `listener`; returns (ps, tcp)."""
    ps = create_server(cfg, opts, model, train_size, run)
    return ps, TcpServer(ps, listener, token=opts.token, timeout=opts.timeout, max_connections=opts.max_connections,
                         handshake_timeout=opts.handshake_timeout, max_handshakes=opts.max_handshakes).start()


# ------------------------------------------------------------------ the workers

def worker_process(index, address, token, shard_x, shard_y, backend, gpu, nsync, nfetch, npush, reconnect=0.0):
    """The body of one worker process: connect, train, exit 0 (or 1 with a one-line error)."""
    from .tcp import ServerError, TcpClient
    from .worker import connect_and_train

    try:
        client = TcpClient(address, token, reconnect=reconnect,
                           say=lambda text: print(f"minasgd worker {index + 1}: {text}", file=sys.stderr, flush=True))
        connect_and_train(client, backend=backend, gpu=gpu, shard=(shard_x, shard_y), nsync=nsync,
                          nfetch=nfetch, npush=npush, name=f"pid {os.getpid()}")
    except KeyboardInterrupt:
        sys.exit(130)
    except (ServerError, OSError, ValueError, FloatingPointError) as e:
        print(f"minasgd worker {index + 1}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # each ends a server the same way: final checkpoint, resumable


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (after its final checkpoint); `exit_code` is 128 + its number."""

    def __init__(self, signal_name, exit_code):
        super().__init__(signal_name)
        self.signal_name, self.exit_code = signal_name, exit_code


@contextlib.contextmanager
def stop_signals_set(flag):
    """While inside, SIGINT (Ctrl-C), SIGTERM and SIGHUP only set `flag` (a threading.Event) and
    record which one came in `flag.signal` instead of raising or killing the process.

    A KeyboardInterrupt can strike anywhere, even between taking a lock and the `try` that would
    release it, and the shutdown that follows then waits on that lock forever; SIGTERM and SIGHUP
    would end the process with no checkpoint at all. So the watch loop checks the flag and the
    run stops through the normal path: stop, checkpoint, clean exit. A signal this process
    ignores stays ignored (`nohup` ignores SIGHUP: the server then outlives the terminal, as
    before). (Outside the main thread signals cannot be caught; there this does nothing.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        flag.signal = signal.Signals(signum).name
        flag.set()

    previous = {}
    for name in STOP_SIGNALS:
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN:
            previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        yield
    finally:
        for name, handler_before in previous.items():
            signal.signal(getattr(signal, name), handler_before)


ctrl_c_sets = stop_signals_set  # its name before SIGTERM and SIGHUP joined SIGINT


def start_workers(address, token, shards, backend, gpus, opts):
    """Start one spawned process per shard; returns them."""
    import multiprocess

    from ..threads import blas_threads_for_children, chosen_blas_threads

    ctx = multiprocess.get_context("spawn")
    processes = []
    with blas_threads_for_children(chosen_blas_threads()[0]):
        for i, (shard, gpu) in enumerate(zip(shards, gpus)):
            p = ctx.Process(target=worker_process, name=f"minasgd-worker-{i + 1}", daemon=True,
                            args=(i, address, token, shard.train_x, shard.train_y, backend, gpu,
                                  opts.nsync, opts.nfetch, opts.npush, opts.reconnect))
            p.start()
            processes.append(p)
    return processes


def stop_workers(processes, grace=15.0):
    """Wait for the workers to leave on their own (the server says "done"), then terminate them."""
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.exitcode is None:
            p.terminate()
            p.join(timeout=5.0)


# ------------------------------------------------------------------ the whole run

def train_distributed(cfg, opts, on_event=None, dataset=None):
    """Train with a parameter server and N worker processes; returns the summary (also in summary.json).

    `opts`: a `PsOptions` (the command line makes one: `minasgd.cli.ps.ps_options`). `dataset`: use this `Dataset` instead of
    loading `cfg.dataset` (tests build small ones in memory). `on_event(event)` hears what happens
    (see `run_server`); the command line passes `minasgd.dashboard.ServerView`.
    """
    if not isinstance(opts, PsOptions):
        raise TypeError(f"train_distributed takes a PsOptions, not a {type(opts).__name__}")
    if opts.transport == "mpi":  # this process is one rank of `mpiexec -n N+1`
        from .mpi_job import train_mpi

        return train_mpi(cfg, opts, on_event, dataset)
    if opts.transport != "tcp":
        raise ValueError(f"unknown transport {opts.transport!r}; choose tcp or mpi")
    if opts.workers is None:  # not given on the command line
        opts.workers = PsOptions.workers
    if opts.workers < 1:
        raise ValueError(f"--workers must be >= 1 (0 trains in one process), got {opts.workers}")
    return run_server(cfg, opts, on_event, dataset, local_workers=opts.workers)


def run_server(cfg, opts, on_event=None, dataset=None, local_workers=0):
    """Serve until training is over (or Ctrl-C), with `local_workers` worker processes of our own.

    With local_workers=0 (`minasgd serve`) the workers are `minasgd work` processes elsewhere.
    `on_event(event)` hears, in order: "server_start" (where, what), "resumed" (with --resume),
    "serving" / "served" around the watch (from the Monitor: a live view may draw it), "done"
    (the summary); "warm_start" {"init", "steps"}; and "say" (a line of text). When things go wrong:
    "warning" (a last checkpoint or metrics line the disk refused) and "stopped" (a signal or an
    error ended the run early: which signal, the step, the final checkpoint's path or why there is none).

    The server runs on one BLAS thread, like every training process (`minasgd.threads`): its
    updates and evaluations are short, and spinning BLAS threads would take the workers' cores.
    """
    with blas_threads_for_training():
        return _run_server(cfg, opts, on_event, dataset, local_workers)


def _run_server(cfg, opts, on_event, dataset, local_workers):
    on_event = on_event or ignore
    check_options(opts)  # before anything is bound or loaded
    host, port = parse_address(opts.bind) if opts.bind else ("127.0.0.1", 0)
    listener = listen(host, port, opts.token)  # first, so a busy port fails fast
    try:
        backend, gpus = assign_devices(cfg.backend, cfg.gpu, local_workers)
        ds = dataset or load_dataset(cfg)
        eval_model = build_model(cfg, backends.get("numpy"), on_event)  # the server's side is NumPy
        if opts.resume and cfg.out and Path(cfg.out) != Path(opts.resume):
            raise ValueError("--resume continues the run in RUN_DIR: leave out --out")
        if opts.resume and cfg.init:
            raise ValueError("--resume and --init exclude each other (--init: parameters only, a new run)")
        if opts.resume and not RunDir.model_path_in(opts.resume).is_file():
            raise ValueError(f"--resume {opts.resume}: no model.npz there to resume from")
        run = RunDir(opts.resume or cfg.out or default_run_dir("train" if local_workers else "serve"))
        ps, tcp = start_server(cfg, opts, eval_model, len(ds.train_y), run, listener)
    except BaseException:
        listener.close()
        raise
    who = f"{local_workers} {backend} workers" if local_workers else "waiting for `minasgd work` workers"
    on_event(server_start(tcp.address_text, ps, opts, who, eval_model, ds, run))
    if ps.resumed_from:
        on_event({"kind": "resumed", "path": str(run.model_path), "version": ps.version, "steps": ps.steps,
                  "total_steps": ps.total_steps})

    steps_per_epoch = len(ds.train_y) // cfg.batch_size
    monitor = Monitor(ps, run, eval_model, ds.test_x, ds.test_y, steps_per_epoch, cfg.batch_size,
                      address=tcp.address_text, on_event=on_event, eval_every=opts.eval_every,
                      train_sample=train_sample(cfg, ds))
    processes, finished, interrupted = [], False, threading.Event()
    # The handlers stay until the final checkpoint is written: a second signal cannot cut it short.
    with stop_signals_set(interrupted):
        try:
            if local_workers:
                shards = [ds.shard(i, local_workers) for i in range(local_workers)]
                processes = start_workers(tcp.address, opts.token, shards, backend, gpus, opts)
            watch(ps, monitor, lambda: [p.exitcode for p in processes], "exit codes", stop=interrupted)
            finished = not interrupted.is_set()
        finally:  # also on a signal and errors: stop everything, keep a checkpoint
            # From here on every request hears "done" if training is over, else "server stopping"
            # (the workers keep reconnecting to the server that resumes the run).
            ps.stop(interrupted=not finished)
            stop_workers(processes, grace=15.0 if finished else 2.0)
            wait_for_goodbyes(ps, grace=5.0 if finished else 0.5)
            try:
                tcp.close()
            finally:
                saved = ps.checkpoint()  # whatever happened above
            if not finished:
                run.close()
                on_event({"kind": "stopped", "signal": getattr(interrupted, "signal", None), "version": ps.version,
                          "steps": ps.steps, "total_steps": ps.total_steps,
                          "checkpoint": str(saved) if saved else None, "error": ps.checkpoint_error,
                          "run_dir": str(run.path)})
    if not finished and interrupted.is_set():
        name = getattr(interrupted, "signal", "SIGINT")
        raise Interrupted(name, 128 + getattr(signal, name, signal.SIGINT))  # the CLI says so, exits 128 + n

    return finish_run(cfg, opts, on_event, monitor, run, eval_model, ds, backend=backend,
                      device=f"{local_workers} local worker processes",
                      workers=local_workers, address=tcp.address_text)


def wait_for_goodbyes(ps, grace):
    """Give connected workers (ours or `minasgd work` elsewhere) up to `grace` seconds to hear
    "done" and say BYE, so none mistakes the end of the run for a server that went away."""
    deadline = time.monotonic() + grace
    while ps.live_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
