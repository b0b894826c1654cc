"""`minasgd train | eval | model`: the flags of a training run and their handlers (the parameter
server's flags, `serve` and `work` are in `ps.py`)."""

import json

from ..config import TrainConfig


def add_train_arguments(p):
    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="shapes (built in), cifar10, or folder:PATH (default: %(default)s)")
    p.add_argument("--model", default=d.model, help="alexnet-mini, tiny or micro (default: %(default)s)")
    p.add_argument("--backend", default=d.backend, choices=["numpy", "cuda", "auto"],
                   help="auto = cuda when a GPU is present, else numpy (default: %(default)s)")
    p.add_argument("--gpu", type=int, default=None, help="GPU index for the cuda backend")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of SGD (warm-up + cosine schedule; default: {d.lr})")
    p.add_argument("--momentum", type=float, default=None,
                   help=f"SGD momentum, in one process and in every worker alike (default: {d.momentum})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init", metavar="CKPT", help="start from a saved model.npz (warm start)")
    p.add_argument("--continue-schedule", action="store_true",
                   help="with --init: begin at the checkpoint's step count in this run's lr schedule "
                        "(the paper's warm start, mid-schedule), not at step 0 of a fresh warm-up")
    p.add_argument("--eval-train", type=int, default=0, metavar="N",
                   help="at each evaluation also measure the first N training images (training error, as "
                        "the paper plots it; default: off)")
    p.add_argument("--stop-at", type=int, metavar="STEP", dest="stop_step",
                   help="one process: stop at this step without shortening the lr schedule (a mid-run snapshot)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/train-<time>)")
    p.add_argument("--data-root", metavar="DIR", help="where datasets live (default: $MINASGD_DATA or ./data)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between logged losses")
    p.add_argument("--threads", type=int, metavar="N",
                   help="one process (--workers 0): threads for BLAS and the compiled loops (default: the idle "
                        "cores given, or $MINASGD_THREADS); workers always use one each")
    p.add_argument("--quiet", action="store_true", help="no live display")


def ps_options(args):
    """The parameter-server settings of the parsed command line (`minasgd.ps.launcher.PsOptions`):
    every PsOptions field the command has a flag for; the rest keep their defaults. The argparse
    Namespace stops here: nothing below the command line ever sees it."""
    from dataclasses import fields

    from ..ps.launcher import PsOptions

    return PsOptions(**{f.name: getattr(args, f.name) for f in fields(PsOptions) if hasattr(args, f.name)})


def train_config(args):
    d = TrainConfig()
    if getattr(args, "optimizer", "sgd") == "adagrad":
        for flag, value in (("--lr", args.lr), ("--momentum", args.momentum)):
            if value is not None:
                raise ValueError(f"{flag} is SGD's and does not apply to --optimizer adagrad "
                                 "(its rate is --adagrad-lr, and it has no momentum)")
    lr = d.lr if args.lr is None else args.lr
    momentum = d.momentum if args.momentum is None else args.momentum
    return TrainConfig(dataset=args.dataset, model=args.model, backend=args.backend, gpu=args.gpu,
                       epochs=args.epochs, batch_size=args.batch_size, lr=lr, momentum=momentum,
                       weight_decay=args.weight_decay, seed=args.seed, init=args.init, out=args.out,
                       data_root=args.data_root, max_steps=args.max_steps, train_limit=args.train_limit,
                       continue_schedule=args.continue_schedule, stop_step=args.stop_step, eval_train=args.eval_train,
                       test_limit=args.test_limit, log_every=args.log_every, quiet=args.quiet,
                       threads=getattr(args, "threads", None))


def add_eval_arguments(p):
    p.add_argument("checkpoint", help="a model.npz written by `minasgd train`")
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--data-root", metavar="DIR")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cuda", "auto"])
    p.add_argument("--gpu", type=int, default=None)
    p.add_argument("--json", action="store_true")


def cmd_train(args, console):
    # One process unless workers are asked for (or this is a rank of an MPI job).
    cfg = train_config(args)
    if args.workers == 0 or (args.workers is None and args.transport == "tcp"):
        if getattr(args, "resume", None):
            raise ValueError("--resume continues a parameter-server run: give --workers N too")
        from ..dashboard import TrainProgress
        from ..train import train

        if cfg.quiet:
            train(cfg)
        else:
            with TrainProgress(console=console) as view:
                train(cfg, on_event=view)
        return 0
    from ..dashboard import ServerView
    from ..ps import launcher

    launcher.train_distributed(cfg, ps_options(args), on_event=ServerView(console, quiet=cfg.quiet))
    return 0


def cmd_eval(args, console):
    from .. import backends, checkpoint, data
    from ..dashboard import TaskBars
    from ..model import Model
    from ..train import evaluate

    ckpt = checkpoint.load(args.checkpoint)
    be = backends.get(args.backend, args.gpu)
    model = Model(ckpt["model"], be)
    if ckpt["fingerprint"] != model.fingerprint():
        raise checkpoint.CheckpointError(f"{args.checkpoint}: made by a different version of model {ckpt['model']}")
    model.set_params(ckpt["params"])
    with TaskBars(console, disable=args.json) as bars:
        ds = data.load(args.dataset, root=args.data_root or data.default_root(), progress=bars)
    acc, loss = evaluate(model, ds.test_x, ds.test_y)
    if args.json:
        print(json.dumps({"test_accuracy": acc, "test_loss": loss, "images": len(ds.test_y)}))
    else:
        console.print(f"{args.checkpoint}: test accuracy {acc:.2%}, test loss {loss:.4f} on {len(ds.test_y)} {ds.name} images")
    return 0


def cmd_model(args, console):
    from .. import backends
    from ..model import Model

    model = Model(args.name, backends.get("numpy"))
    if args.json:
        print(json.dumps(model.describe(), indent=2))
        return 0
    from ..dashboard import model_table

    console.print(model_table(model))
    return 0
