"""The `minasgd` command line.

    minasgd train       train a model (--workers 0: one process; N: a parameter server and N workers)
    minasgd serve       run a parameter server alone (workers on other machines connect to it)
    minasgd work        run one worker against a parameter server
    minasgd eval        test accuracy of a saved model
    minasgd model       the layers of a network, as a table or JSON
    minasgd data        make or download a dataset
    minasgd bench       step | kernels | ps: timings against a baseline measured in the same run
    minasgd experiment  the paper's experiments at laptop scale (tables and plots)
    minasgd assignment  cut student versions of the code for a course

Errors a user can fix (a missing file, a wrong shape, a busy port) are printed
as one line and exit with status 2; anything else is a bug and shows a traceback.
"""

import argparse
import json
import sys

from rich.console import Console

from .checkpoint import CheckpointError


def _add_train_arguments(p):
    from .train import TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="shapes (built in), cifar10, or folder:PATH (default: %(default)s)")
    p.add_argument("--model", default=d.model, help="alexnet-mini, tiny or micro (default: %(default)s)")
    p.add_argument("--backend", default=d.backend, choices=["numpy", "cuda", "auto"],
                   help="auto = cuda when a GPU is present, else numpy (default: %(default)s)")
    p.add_argument("--gpu", type=int, default=None, help="GPU index for the cuda backend")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine schedule, default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init", metavar="CKPT", help="start from a saved model.npz (warm start)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/train-<time>)")
    p.add_argument("--data-root", metavar="DIR", help="where datasets live (default: $MINASGD_DATA or ./data)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between logged losses")
    p.add_argument("--quiet", action="store_true", help="no live display")


def _train_config(args):
    from .train import TrainConfig

    return TrainConfig(dataset=args.dataset, model=args.model, backend=args.backend, gpu=args.gpu,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, seed=args.seed, init=args.init, out=args.out,
                       data_root=args.data_root, max_steps=args.max_steps, train_limit=args.train_limit,
                       test_limit=args.test_limit, log_every=args.log_every, quiet=args.quiet)


def cmd_train(args, console):
    # One process unless workers are asked for (or this is a rank of an MPI job).
    if args.workers == 0 or (args.workers is None and args.transport == "tcp"):
        from .train import train

        train(_train_config(args), console=console)
        return 0
    from .ps import launcher

    launcher.train_distributed(_train_config(args), args, console=console)
    return 0


def cmd_serve(args, console):
    from .ps import cli as ps_cli

    return ps_cli.serve(args, console)


def cmd_work(args, console):
    from .ps import cli as ps_cli

    return ps_cli.work(args, console)


def cmd_experiment(args, console):
    from . import experiments

    return experiments.run(args, console)


def cmd_assignment(args, console):
    from .assignment import cli as assignment_cli

    return assignment_cli.run(args, console)


def _add_assignment_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the tasks, their files and grading tests")
    m = sub.add_parser("make", help="write a student tree with the chosen tasks stubbed out")
    m.add_argument("outdir", help="the folder to create")
    m.add_argument("--tasks", default="all", help="comma-separated task ids (1.1,2.1), a family number (3) or all (default)")
    m.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    g = sub.add_parser("grade", help="run the grading tests of each task of a student tree")
    g.add_argument("tree", help="the student tree")
    g.add_argument("--tasks", help="default: the tasks the tree was made with")
    g.add_argument("--gpu", action="store_true", help="run the kernels on a real GPU instead of the simulator")
    r = sub.add_parser("restore", help="put the reference solutions back into a student tree")
    r.add_argument("tree", help="the student tree")
    r.add_argument("--tasks", help="default: every task the tree was made with")


def cmd_eval(args, console):
    from . import backends, checkpoint, data
    from .model import Model
    from .train import evaluate

    ckpt = checkpoint.load(args.checkpoint)
    be = backends.get(args.backend, args.gpu)
    model = Model(ckpt["model"], be)
    if ckpt["fingerprint"] != model.fingerprint():
        raise CheckpointError(f"{args.checkpoint}: made by a different version of model {ckpt['model']}")
    model.set_params(ckpt["params"])
    ds = data.load(args.dataset, root=args.data_root or data.default_root(), progress=not args.json)
    acc, loss = evaluate(model, ds.test_x, ds.test_y)
    if args.json:
        print(json.dumps({"test_accuracy": acc, "test_loss": loss, "images": len(ds.test_y)}))
    else:
        console.print(f"{args.checkpoint}: test accuracy {acc:.2%}, test loss {loss:.4f} on {len(ds.test_y)} {ds.name} images")
    return 0


def cmd_model(args, console):
    from . import backends
    from .model import Model

    model = Model(args.name, backends.get("numpy"))
    info = model.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{model.name}: {model.num_params:,} parameters, "
                        f"{model.flops_per_image() / 1e6:.1f} MFLOP per image (forward)")
    for col in ("layer", "type", "input", "output", "kernel/stride/pad", "params", "MFLOP"):
        table.add_column(col, justify="right" if col in ("params", "MFLOP") else "left")
    for layer in info["layers"]:
        geometry = ""
        if "kernel" in layer:
            geometry = f"{layer['kernel']}x{layer['kernel']} / {layer['stride']} / {layer.get('pad', 0)}"
        elif "p" in layer:
            geometry = f"p = {layer['p']}"
        table.add_row(layer["name"], layer["type"], "x".join(map(str, layer["in_shape"])),
                      "x".join(map(str, layer["out_shape"])), geometry,
                      f"{layer.get('params', 0):,}", f"{layer.get('flops', 0) / 1e6:.2f}")
    console.print(table)
    return 0


def cmd_data(args, console):
    from .data import cli as data_cli

    return data_cli.run(args)


def cmd_bench(args, console):
    if args.what == "step":
        from . import bench_step

        return bench_step.run(args, console)
    if args.what == "ps":
        from .ps import bench as ps_bench

        return ps_bench.run(args, console)
    if args.what == "kernels":
        from . import bench_kernels

        result = bench_kernels.run(as_json=args.json, backend_device=args.gpu)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0
    raise AssertionError(args.what)


def build_parser():
    parser = argparse.ArgumentParser(prog="minasgd", description="GPU asynchronous SGD from scratch (Paine et al., 2013).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .ps import cli as ps_cli

    p = sub.add_parser("train", help="train a model on a dataset")
    _add_train_arguments(p)
    ps_cli.add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="run a parameter server alone")
    ps_cli.add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("work", help="run one worker against a parameter server")
    ps_cli.add_work_arguments(p)
    p.set_defaults(func=cmd_work)

    p = sub.add_parser("eval", help="test accuracy of a saved model")
    p.add_argument("checkpoint", help="a model.npz written by `minasgd train`")
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--data-root", metavar="DIR")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cuda", "auto"])
    p.add_argument("--gpu", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("model", help="show a network's layers, shapes, parameters and FLOPs")
    p.add_argument("name", nargs="?", default="alexnet-mini")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model)

    from .data import cli as data_cli

    p = sub.add_parser("data", help="make the shapes dataset or download CIFAR-10")
    data_cli.add_arguments(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="benchmarks: a training step, each CUDA kernel, the parameter server")
    p.add_argument("what", choices=["step", "kernels", "ps"])
    p.add_argument("--backend", default="numpy", choices=["numpy", "cuda", "auto"])
    p.add_argument("--model", default="alexnet-mini")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--gpu", type=int, default=None)
    p.add_argument("--json", action="store_true")
    ps_cli.add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    from . import experiments

    p = sub.add_parser("experiment", help="run one of the paper's experiments at laptop scale")
    experiments.add_arguments(p)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("assignment", help="make a student version of the code, or grade one")
    _add_assignment_arguments(p)
    p.set_defaults(func=cmd_assignment)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    console = Console()
    from .backends import BackendError
    from .data import DatasetError

    try:
        return args.func(args, console)
    except (DatasetError, CheckpointError, BackendError, ValueError, FloatingPointError, OSError) as e:
        console.print(f"[red]minasgd {args.command}: {e}[/]", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
