"""The `minasgd` command line: every argument parser of the project lives in this package.

    minasgd train       train a model (--workers 0: one process; N: a parameter server and N workers)
    minasgd serve       run a parameter server alone (workers on other machines connect to it)
    minasgd work        run one worker against a parameter server
    minasgd eval        test accuracy of a saved model
    minasgd model       the layers of a network, as a table or JSON
    minasgd data        make or download a dataset
    minasgd bench       step | kernels | ps: timings against a baseline measured in the same run
    minasgd experiment  the paper's experiments at laptop scale (tables and plots)
    minasgd assignment  cut student versions of the code for a course

    train.py       train, eval, model                    datasets.py    data
    ps.py          train --workers, serve, work, bench ps flags
    bench.py       bench                                  experiment.py  experiment
    assignment.py  assignment

Each module has `add_*_arguments(parser)` and a `cmd_*(args, console)` handler that imports the
library lazily, so building the parser stays cheap. The library reports through return values
and events; what is drawn on the terminal comes from `minasgd.dashboard`.

Errors a user can fix (a missing file, a wrong shape, a busy port) are printed
as one line and exit with status 2; anything else is a bug and shows a traceback.
"""

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from . import assignment, bench, datasets, experiment, train
from . import ps as ps_cli


def build_parser():
    parser = argparse.ArgumentParser(prog="minasgd", description="GPU asynchronous SGD from scratch (Paine et al., 2013).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on a dataset")
    train.add_train_arguments(p)
    ps_cli.add_train_arguments(p)
    p.set_defaults(func=train.cmd_train)

    p = sub.add_parser("serve", help="run a parameter server alone")
    ps_cli.add_serve_arguments(p)
    p.set_defaults(func=ps_cli.serve)

    p = sub.add_parser("work", help="run one worker against a parameter server")
    ps_cli.add_work_arguments(p)
    p.set_defaults(func=ps_cli.work)

    p = sub.add_parser("eval", help="test accuracy of a saved model")
    train.add_eval_arguments(p)
    p.set_defaults(func=train.cmd_eval)

    p = sub.add_parser("model", help="show a network's layers, shapes, parameters and FLOPs")
    p.add_argument("name", nargs="?", default="alexnet-mini")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=train.cmd_model)

    p = sub.add_parser("data", help="make the shapes dataset or download CIFAR-10")
    datasets.add_arguments(p)
    p.set_defaults(func=datasets.cmd_data)

    p = sub.add_parser("bench", help="benchmarks: a training step, each CUDA kernel, the parameter server")
    bench.add_arguments(p)
    ps_cli.add_bench_arguments(p)
    p.set_defaults(func=bench.cmd_bench)

    p = sub.add_parser("experiment", help="run one of the paper's experiments at laptop scale")
    experiment.add_arguments(p)
    p.set_defaults(func=experiment.cmd_experiment)

    p = sub.add_parser("assignment", help="make a student version of the code, or grade one")
    assignment.add_arguments(p)
    p.set_defaults(func=assignment.cmd_assignment)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    console = Console()
    from ..backends import BackendError
    from ..checkpoint import CheckpointError
    from ..data import DatasetError

    try:
        return args.func(args, console)
    except (DatasetError, CheckpointError, BackendError, ValueError, FloatingPointError, OSError) as e:
        # escape: the message may quote a peer (a server's ERROR), never to be read as markup
        console.print(f"[red]minasgd {args.command}: {escape(str(e))}[/]", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a server's SIGTERM / SIGHUP (`minasgd.ps.launcher.Interrupted`)
        name = getattr(e, "signal_name", None)
        console.print(f"[yellow]interrupted{f' ({name})' if name else ''}[/]")
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
