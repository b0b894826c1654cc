"""`minasgd experiment NAME`: the flags of a sweep and its handler (the sweep is
`minasgd.experiments.run_sweep`; the bar, the lines and the table are `minasgd.dashboard`'s)."""

import argparse
import shlex
from pathlib import Path

from ..experiments.sweeps import NAMES
from ..ps.run import LR_SCALINGS

# flags that override a field of the experiment's Settings (argparse dest = field name)
OVERRIDES = ("seeds", "workers", "nsync", "dataset", "model", "backend", "gpu", "epochs", "batch_size", "lr", "lr_scaling",
             "target", "eval_every", "pretrain_epochs", "max_steps", "data_root")


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers separated by commas, got {text!r}")
    return values


CLAIM_PASSED = ("dataset", "model", "epochs", "data_root", "nsync")  # given to both commands of `experiment claim`
# (one process ignores --nsync: it names the 2-worker setting compared)


def add_arguments(p):
    p.add_argument("name", choices=(*NAMES, "claim"),
                   help="which experiment: " + ", ".join(NAMES) + "; claim: `minasgd train` against "
                        "`minasgd train --workers 2` as a user runs them, whole commands timed")
    p.add_argument("--out", metavar="DIR", help="experiment directory (default: runs/experiment-NAME)")
    p.add_argument("--quick", action="store_true", help="tiny everything (seconds per run): tests, a first look")
    p.add_argument("--seeds", type=int, help="runs per configuration, seeds 0..N-1 (default: 3; --quick: 1)")
    p.add_argument("--workers", type=_int_list, metavar="N,N,...", help="worker counts (default: per experiment)")
    p.add_argument("--nsync", type=_int_list, metavar="K,K,...", help="nsync values (default: per experiment)")
    p.add_argument("--dataset", help="shapes:TRAIN,TEST, shapes, cifar10, folder:PATH (default: shapes:8000,500)")
    p.add_argument("--model", help="alexnet-mini, tiny or micro (default: tiny)")
    p.add_argument("--backend", choices=["numpy", "cuda", "auto"], help="(default: numpy)")
    p.add_argument("--gpu", type=int, help="GPU index for the cuda backend (default: round-robin over GPUs)")
    p.add_argument("--epochs", type=int, help="epochs of the train split per run, all workers together (default: 8)")
    p.add_argument("--batch-size", type=int, help="(default: 32)")
    p.add_argument("--lr", type=float, help="peak learning rate, as `minasgd train --lr` (default: 0.02)")
    p.add_argument("--lr-scaling", choices=list(LR_SCALINGS),
                   help="as `minasgd train --lr-scaling` (default: none, the sum of the pushes, as the committed "
                        "sweeps ran, async unless the sweep runs sync)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="test accuracy to reach, i.e. target test error 1 - ACC (default: per experiment)")
    p.add_argument("--eval-every", type=float, metavar="EPOCHS", help="epochs between test evaluations (default: 0.25)")
    p.add_argument("--pretrain-epochs", type=float, help="warmstart: single-process epochs before the sweep (default: 3)")
    p.add_argument("--max-steps", type=int, help="cap the mini-batches of every run")
    p.add_argument("--data-root", metavar="DIR", help="where datasets live (default: $MINASGD_DATA or ./data)")
    p.add_argument("--fresh", action="store_true", help="run everything again (default: skip finished runs)")
    p.add_argument("--report", action="store_true",
                   help="no runs: only the tables and report from the finished runs already in --out "
                        "(a sweep's report then names the code that made them)")
    p.add_argument("--worker-args", metavar="'ARGS'", default="",
                   help="claim: arguments for the 2-worker command only, e.g. --worker-args=--sync or "
                        "--worker-args='--lr-scaling workers' (with '=': argparse takes a lone --flag for its own) "
                        "(a 2-worker setting to compare with the same one process)")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="claim: no runs, one row per claim directory (their settings side by side), or per "
                        "`minasgd train` run directory")
    p.add_argument("--docs", metavar="FILE.md",
                   help="also put the report into this markdown file (between <!-- experiment:NAME --> markers) "
                        "and the plots next to it in img/")


def _run_dirs(path):
    """[path] if it is a claim or run directory, else its subdirectories that are (sorted)."""
    if (path / "claim.json").exists() or (path / "summary.json").exists() or not path.is_dir():
        return [path]
    return sorted(d for d in path.iterdir() if (d / "claim.json").exists() or (d / "summary.json").exists())


def cmd_claim(args, console):
    from ..experiments import claim

    if args.compare:
        given = " ".join(Path(d).as_posix() for d in args.compare)
        dirs = [run for d in args.compare for run in _run_dirs(Path(d))]
        kinds = {(Path(d) / "claim.json").exists() for d in dirs}
        if len(kinds) != 1:
            raise SystemExit("experiment claim --compare: give claim directories (with claim.json) or run "
                             "directories (with summary.json), not both")
        table = (claim.compare_table([claim.load_claim(d) for d in dirs]) if kinds == {True}
                 else claim.runs_table(dirs))
        console.print(table)
        if args.docs:
            claim.update_docs(args.docs, given, table, marker="compare " + given,
                              regenerate=f"minasgd experiment claim --compare {given} --docs {args.docs}")
            console.print(f"table put into {args.docs}")
        return 0
    out = Path(args.out or Path("runs") / "experiment-claim")
    if args.report:
        result = claim.load_claim(out)
    else:
        extra = []
        for key in CLAIM_PASSED:
            value = getattr(args, key, None)
            if isinstance(value, list):  # --nsync K,K,...: the claim compares one setting
                if len(value) != 1:
                    raise SystemExit(f"experiment claim: --{key} takes one value, got {value}")
                value = value[0]
            if value is not None:
                extra += [f"--{key.replace('_', '-')}", str(value)]

        def show(event):
            if event["kind"] == "run_start":
                console.print(f"$ {' '.join(event['command'])}")
            else:
                how = "reused" if event["reused"] else f"exit {event['exit']}"
                console.print(f"  {event['name']}: {event['seconds']:.0f} s ({how})")

        try:
            worker_args = shlex.split(args.worker_args)
        except ValueError as e:
            raise SystemExit(f"experiment claim: --worker-args {args.worker_args!r}: {e}")
        result = claim.run_claim(out, seeds=args.seeds or 3, extra_args=extra, worker_args=worker_args, on_event=show)
    table = claim.claim_table(result)
    console.print(table)
    if args.docs:
        claim.update_docs(args.docs, out, table)
        console.print(f"table put into {args.docs}")
    return 0


def cmd_experiment(args, console):
    from ..dashboard import SweepView, experiment_table

    if args.name == "claim":
        return cmd_claim(args, console)
    from ..experiments import report
    from ..experiments.runner import run_sweep, settings_from

    s = settings_from(args.name, quick=args.quick, **{k: getattr(args, k, None) for k in OVERRIDES})
    exp_dir = Path(args.out or Path("runs") / f"experiment-{s.name}")
    result, failed = run_sweep(s, exp_dir, fresh=args.fresh, docs=args.docs, on_event=SweepView(console),
                               report_only=args.report)
    console.print(experiment_table(result, report.SUMMARY_COLUMNS, report.summary_cells))
    if args.docs:
        console.print(f"report and plots put into {args.docs}")
    console.print(f"tables: {exp_dir / 'results.csv'}, {exp_dir / 'summary.csv'}, {exp_dir / 'results.json'}; "
                  f"report: {exp_dir / 'report.md'}")
    if failed:
        console.print(f"[red]{len(failed)} runs failed: {', '.join(failed)} (run the command again to retry them)[/]")
        return 1
    return 0
