"""Command-line arguments of the parameter-server commands (placeholder until the server lands)."""


def add_train_arguments(p):
    p.add_argument("--workers", type=int, default=0, help="0 = one process, no server (default: %(default)s)")


def add_serve_arguments(p):
    pass


def add_work_arguments(p):
    pass


def add_bench_arguments(p):
    pass


def serve(args, console):
    raise NotImplementedError


def work(args, console):
    raise NotImplementedError
