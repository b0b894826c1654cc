"""The parameter server's flags and handlers: `train --workers`, `serve`, `work`, `bench ps`.

    minasgd train --workers 2                      server + 2 worker processes on this machine
    minasgd train                                  (no --workers: one process, no server)
    minasgd serve --bind 0.0.0.0:5555 --token T    a server alone, for workers on other machines
    minasgd work --server HOST:5555 --token T      one worker (--gpu N picks its GPU)
    minasgd serve --resume RUN_DIR ...             restart a server that died, from its last checkpoint;
                                                   its workers reconnect by themselves (--reconnect)
    mpiexec -n 3 minasgd train --transport mpi     the same over MPI: rank 0 serves, ranks 1..2 work

The token may also come from the environment variable MINASGD_TOKEN, which keeps it out of the
process list.
"""

import os

from ..ps.launcher import PsOptions
from ..ps.run import LR_SCALINGS, MOMENTUM_SCALINGS
from .train import add_train_arguments as add_one_process_train_arguments
from .train import ps_options, train_config

D = PsOptions()


def _add_server_arguments(p, bind_default, bind_help):
    p.add_argument("--nsync", type=int, default=D.nsync,
                   help="mini-batches between a worker's syncs: nfetch = npush = nsync (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sync", dest="sync", action="store_true", default=D.sync,
                      help="rounds (the default): the server waits for one push of every worker and applies "
                           "them together, as --lr-scaling says (their sum with none, their mean with average); "
                           "no push is stale (with --momentum-scaling staleness each worker's momentum is set "
                           "for staleness 0)")
    mode.add_argument("--async", dest="sync", action="store_false",
                      help="asynchronous SGD, as in the paper: each push is applied as it arrives, "
                           "(N - 1) x nsync mini-batches stale on average")
    p.add_argument("--optimizer", default=D.optimizer, choices=["sgd", "adagrad"],
                   help="sgd: the workers run --lr/--momentum SGD and the server applies their steps; "
                        "adagrad: the server's Adagrad, as in Downpour SGD (--adagrad-lr; no momentum) "
                        "(default: %(default)s)")
    p.add_argument("--adagrad-lr", type=float, default=D.adagrad_lr,
                   help="the server's Adagrad learning rate (default: %(default)s)")
    p.add_argument("--momentum-at", default=D.momentum_at, choices=["worker", "server"],
                   help="where --momentum lives: each worker's SGD (they push their steps) or one velocity "
                        "on the server (they push gradients); a gradient's total step is the same "
                        "(default: %(default)s)")
    p.add_argument("--lr-scaling", default=D.lr_scaling, choices=list(LR_SCALINGS),
                   help="none: every mini-batch moves the parameters lr / (1 - momentum), as in one process; "
                        "average: each worker steps as one process, the server applies 1/N of every push "
                        "(the parameters move by the average of the workers' steps: model averaging); "
                        "sqrt: the server applies 1/sqrt(N) of every push; "
                        "workers: lr / N; "
                        "staleness: a push of k mini-batches, s stale, moves k / (k + s) as far "
                        "(default: %(default)s)")
    p.add_argument("--momentum-scaling", default=D.momentum_scaling, choices=list(MOMENTUM_SCALINGS),
                   help="each worker's momentum from --momentum m: none: m, each worker steps as one process; "
                        "staleness: lowered so that momentum delay plus staleness equal one process's delay, "
                        "workers: m**N (staleness aside), both with the lr raised to keep a gradient's total "
                        "step (default: %(default)s)")
    p.add_argument("--bind", metavar="HOST:PORT", default=bind_default, help=bind_help)
    p.add_argument("--token", default=os.environ.get("MINASGD_TOKEN"),
                   help="shared secret workers must prove (default: $MINASGD_TOKEN); needed to bind anything "
                        "but loopback. It decides who may join and proves the server to the workers; it does "
                        "NOT encrypt: parameters, gradients and statistics cross the network in the clear, "
                        "where anyone on the path can read them (and, past the handshake, alter them). Use an "
                        "SSH tunnel or a VPN on a network you do not trust")
    p.add_argument("--timeout", type=float, default=D.timeout,
                   help="drop a worker silent for this many seconds (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=float, default=D.checkpoint_every, metavar="SECONDS",
                   help="write model.npz this often, and at the end (default: %(default)s)")
    p.add_argument("--eval-every", type=float, default=D.eval_every, metavar="EPOCHS",
                   help="test accuracy of the server's parameters every this many epochs (default: %(default)s)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its model.npz: parameters, optimizer state, version, "
                        "steps, schedule, statistics (give the run's other options again)")
    p.add_argument("--max-connections", type=int, default=D.max_connections,
                   help="workers connected at once (past the handshake); more are refused (default: %(default)s)")
    p.add_argument("--max-handshakes", type=int, default=D.max_handshakes,
                   help="connections still in their handshake at once; a new one drops the oldest, so "
                        "connections that never prove the token cannot keep a worker out (default: %(default)s)")
    p.add_argument("--handshake-timeout", type=float, default=D.handshake_timeout, metavar="SECONDS",
                   help="a new connection must finish its HELLO within this (default: %(default)s)")
    p.add_argument("--round-timeout", type=float, default=None, metavar="SECONDS",
                   help="--sync: apply a round without the workers that have not pushed after this long "
                        "(default: --timeout)")


def add_train_arguments(p):
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes with a parameter server; 0 = one process, no server "
                        "(default: 0; with --transport mpi: the MPI job's size - 1)")
    p.add_argument("--transport", default=D.transport, choices=["tcp", "mpi"],
                   help="tcp: the server here and worker processes it starts, over sockets; mpi: run "
                        "under `mpiexec -n N+1`, rank 0 the server and ranks 1..N the workers "
                        "(pip install -e '.[mpi]') (default: %(default)s)")
    p.add_argument("--nfetch", type=int, help="mini-batches between fetches (default: --nsync)")
    p.add_argument("--npush", type=int, help="mini-batches between pushes (default: --nsync)")
    _add_server_arguments(p, None, "the server's address (default: a free loopback port, printed at start)")
    p.add_argument("--reconnect", type=float, default=D.reconnect, metavar="SECONDS",
                   help="workers keep trying this long to reach a server that went away (default: %(default)s)")


def add_serve_arguments(p):
    add_one_process_train_arguments(p)
    _add_server_arguments(p, "127.0.0.1:5555", "address to listen on (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="start training once this many workers have joined (default: %(default)s)")


def add_work_arguments(p):
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the parameter server")
    p.add_argument("--token", default=os.environ.get("MINASGD_TOKEN"), help="the server's token (default: $MINASGD_TOKEN)")
    p.add_argument("--backend", default="auto", choices=["numpy", "cuda", "auto"],
                   help="auto = cuda when a GPU is present (default: %(default)s)")
    p.add_argument("--gpu", type=int, default=None, help="GPU index for the cuda backend")
    p.add_argument("--nsync", type=int, help="nfetch = npush = K (default: the server's)")
    p.add_argument("--nfetch", type=int, help="mini-batches between fetches (default: --nsync)")
    p.add_argument("--npush", type=int, help="mini-batches between pushes (default: --nsync); at most the "
                                             "server's npush (its --npush, else --nsync), or it refuses us")
    p.add_argument("--shard", metavar="I/N", default="1/1", help="train on the I-th of N shards (default: %(default)s)")
    p.add_argument("--data-root", metavar="DIR", help="where datasets live (default: $MINASGD_DATA or ./data)")
    p.add_argument("--model", help="the model (default: the server's; a different one is refused)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a reply (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="keep trying to connect for this many seconds (default: %(default)s)")
    p.add_argument("--reconnect", type=float, default=D.reconnect, metavar="SECONDS",
                   help="when the server goes away mid-run, keep trying to reconnect this long, with "
                        "backoff (a server restarted with --resume); 0: exit at once (default: %(default)s)")


def add_bench_arguments(p):
    p.add_argument("--workers-list", default="1,2,4", metavar="N,N,...",
                   help="bench ps: worker counts for the speed-up table (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="bench ps: epochs of training per worker count")
    p.add_argument("--target", type=float, default=0.5, help="bench ps: test accuracy to reach (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="bench ps: use only the first N training images")
    p.add_argument("--nsync", type=int, default=D.nsync, help="bench ps: nfetch = npush for the training runs")
    p.add_argument("--skip-training", action="store_true", help="bench ps: only the goodput measurements")
    p.add_argument("--transport", default="tcp", choices=["tcp", "mpi"],
                   help="bench ps: mpi also measures the MPI transport (it starts `mpiexec -n 2` itself) "
                        "next to the socket one (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=1.5, help="bench ps: seconds per goodput measurement")
    p.add_argument("--hostile", action="store_true",
                   help="bench ps: the workers' push+fetch rate while another process holds --idle connections "
                        "and sends --malformed bad frames, against the undisturbed rate")
    p.add_argument("--hostile-workers", type=int, default=2,
                   help="bench ps --hostile: real workers (default: %(default)s)")
    p.add_argument("--idle", type=int, default=500, help="bench ps --hostile: idle connections (default: %(default)s)")
    p.add_argument("--malformed", type=int, default=200,
                   help="bench ps --hostile: malformed frames sent during each attack phase (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="bench ps --hostile: undisturbed/attack phase pairs, alternating (default: %(default)s)")


def serve(args, console):
    from ..dashboard import ServerView
    from ..ps.launcher import run_server

    cfg = train_config(args)
    run_server(cfg, ps_options(args), ServerView(console, quiet=cfg.quiet))
    return 0


def work(args, console):
    from ..ps.tcp import TcpClient
    from ..ps.worker import connect_and_train

    import math

    for flag, value, positive in (("--timeout", args.timeout, True), ("--connect-timeout", args.connect_timeout, False),
                                  ("--reconnect", args.reconnect, False)):
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"{flag} must be a {'positive' if positive else 'non-negative'} number of seconds, "
                             f"got {value}")
    for flag, value in (("--nsync", args.nsync), ("--nfetch", args.nfetch), ("--npush", args.npush)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    index, sep, count = args.shard.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 1 <= int(index) <= int(count):
        raise ValueError(f"--shard wants I/N with 1 <= I <= N, got {args.shard!r}")
    client = TcpClient(args.server, args.token, timeout=args.timeout, connect_timeout=args.connect_timeout,
                       reconnect=args.reconnect)
    console.print(f"connected to {args.server}: model {client.server_hello.get('model')}", markup=False)
    numbers = connect_and_train(client, backend=args.backend, gpu=args.gpu, model_name=args.model,
                                shard_index=int(index) - 1, shard_count=int(count), data_root=args.data_root,
                                nsync=args.nsync, nfetch=args.nfetch, npush=args.npush)
    console.print(f"training over: {numbers['steps']} steps, {numbers['pushes']} pushes, "
                  f"{numbers['images_per_second']:.0f} images/s, last loss {numbers['loss']:.3f}")
    return 0
