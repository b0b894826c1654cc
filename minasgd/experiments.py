"""The paper's experiments at laptop scale (placeholder until the experiments land)."""


def add_arguments(p):
    p.add_argument("name")


def run(args, console):
    raise NotImplementedError
