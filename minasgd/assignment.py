"""Course assignments cut from the real code (placeholder until the assignment tool lands)."""


def add_arguments(p):
    p.add_argument("action")


def run(args, console):
    raise NotImplementedError
