"""The MPI job: `mpiexec -n N+1 minasgd train --transport mpi`, one rank's part of it.

Rank 0 loads the dataset, builds the `ParameterServer` and serves it with `MpiServer` (the run
helpers are those of the TCP launcher, from `minasgd.ps.run`); ranks 1..N each take a GPU on their
node and run `minasgd.ps.worker` through an `MpiClient`. The messages themselves are
`minasgd.ps.mpi`'s (the byte mover) and `minasgd.ps.session`'s (what they mean).
"""

import socket
import sys

import numpy as np

from ..threads import blas_threads_for_training
from .mpi import MpiServer, ServerDidNotStart, final_barrier, import_mpi, refuse_all
from .mpi_client import MpiClient
from .protocol import ProtocolError
from .session import ServerError


def train_mpi(cfg, opts, on_event=None, dataset=None):
    """One rank's part of `minasgd train --transport mpi`: rank 0 serves (returns the summary), the others work.

    `on_event`: as in `minasgd.ps.launcher.run_server` (rank 0 only)."""
    MPI = import_mpi()
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    if size < 2:
        raise ValueError("--transport mpi runs as an MPI job of 1 server and N workers, e.g. "
                         "`mpiexec -n 3 minasgd train --transport mpi`; this process is alone in its job")
    if opts.workers is not None and opts.workers != size - 1:
        if rank == 0:  # every rank sees the same mismatch; one of them says it
            raise ValueError(f"--workers {opts.workers} does not match the MPI job: mpiexec -n {size} gives rank 0 "
                             f"to the server and {size - 1} ranks to workers (give --workers {size - 1} or leave it out)")
        sys.exit(2)
    opts.workers = size - 1
    comm = world.Dup()  # our own communicator: no other MPI traffic can match our tags
    worker_index_here = _worker_index_on_this_node(MPI, comm)  # collective: every rank calls it
    if rank == 0:
        with blas_threads_for_training():  # as the socket server (`minasgd.ps.launcher.run_server`)
            return _serve_rank0(MPI, comm, cfg, opts, on_event, dataset)
    _work(MPI, comm, cfg, opts, worker_index_here)
    return None


def _worker_index_on_this_node(MPI, comm):
    """This worker's index among the worker ranks on its node (for the GPU it takes); -1 on rank 0."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    first = np.array([comm.Get_rank()], np.int64)
    local.Bcast([first, MPI.INT64_T], root=0)  # the lowest world rank on this node: 0 if the server is here
    index = local.Get_rank() - (1 if first[0] == 0 else 0)
    local.Free()
    return index


def _serve_rank0(MPI, comm, cfg, opts, on_event, dataset):
    from .. import backends
    from ..rundir import RunDir, default_run_dir
    from ..train import build_model, load_dataset, train_sample
    from .run import assign_devices, create_server, finish_run, ignore, server_start, watch
    from .monitor import Monitor

    on_event = on_event or ignore
    n = comm.Get_size() - 1
    ok = False
    try:
        try:
            backend, _ = assign_devices(cfg.backend, cfg.gpu, 0)  # as rank 0 sees it; each worker resolves "auto" itself
            ds = dataset or load_dataset(cfg)
            eval_model = build_model(cfg, backends.get("numpy"), on_event)  # the server's side is NumPy
            run = RunDir(opts.resume or cfg.out or default_run_dir("train"))
            ps = create_server(cfg, opts, eval_model, len(ds.train_y), run)
            shards = [ds.shard(i, n) for i in range(n)]
            server = MpiServer(ps, comm, timeout=opts.timeout)
        except BaseException as e:
            refuse_all(MPI, comm, str(e) or type(e).__name__)
            raise
        server.start([(s.train_x, s.train_y) for s in shards])
        address = f"MPI rank 0 of {n + 1}"
        on_event(server_start(address, ps, opts, f"{n} worker ranks", eval_model, ds, run))
        monitor = Monitor(ps, run, eval_model, ds.test_x, ds.test_y, len(ds.train_y) // cfg.batch_size,
                          cfg.batch_size, address=address, on_event=on_event, eval_every=opts.eval_every,
                          train_sample=train_sample(cfg, ds))
        finished = False
        try:
            watch(ps, monitor, server.exits, "they left:")
            finished = True
        finally:  # also on Ctrl-C and errors: stop everything, keep a checkpoint
            ps.stop(interrupted=not finished)  # from here on every request hears "done" (or "server stopping")
            server.join(grace=15.0 if finished else 2.0)
            ps.checkpoint()
            if not finished:
                run.close()
        summary = finish_run(cfg, opts, on_event, monitor, run, eval_model, ds, backend=backend,
                             device=f"{n} MPI worker ranks", workers=n, address=address)
        ok = True
        return summary
    finally:
        if not final_barrier(MPI, comm, timeout=30.0 if ok else 10.0):
            print("minasgd train: the worker ranks did not finish; aborting the MPI job", file=sys.stderr, flush=True)
            comm.Abort(1)


def _work(MPI, comm, cfg, opts, index_here):
    from .. import backends
    from .worker import connect_and_train

    rank, code = comm.Get_rank(), 0
    try:
        backend, gpu = cfg.backend, cfg.gpu
        if backend == "auto":
            backend = "cuda" if backends.cuda_available() else "numpy"
        if backend == "cuda" and gpu is None:
            from numba import cuda

            gpu = index_here % max(1, len(cuda.gpus))
        client = MpiClient(comm)
        connect_and_train(client, backend=backend, gpu=gpu, shard=client.shard, nsync=opts.nsync,
                          nfetch=opts.nfetch, npush=opts.npush, name=f"rank {rank} on {socket.gethostname()}")
    except KeyboardInterrupt:
        code = 130
    except ServerDidNotStart:
        code = 2  # rank 0 prints the one line; mpiexec's exit status stays 2 (it ORs the ranks')
    except (ServerError, ProtocolError, OSError, ValueError, FloatingPointError) as e:
        print(f"minasgd worker rank {rank}: {e}", file=sys.stderr, flush=True)
        code = 1
    final_barrier(MPI, comm)  # waits for rank 0's final evaluation and summary
    if code:
        sys.exit(code)
