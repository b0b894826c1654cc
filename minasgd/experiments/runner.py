"""Run a sweep: one training run after another (never in parallel: the workers of one run
already share the machine), each in its own folder, then the tables, the plots and the report.
"""

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import analysis, report
from .sweeps import NAMES, default_settings, plan


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"want positive integers separated by commas, got {text!r}")
    return values


def add_arguments(p):
    p.add_argument("name", choices=NAMES, help="which experiment: " + ", ".join(NAMES))
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
    p.add_argument("--lr-scaling", choices=["none", "workers", "staleness"],
                   help="the server's lr scaling, as `minasgd train --lr-scaling` (default: none)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="test accuracy to reach, i.e. target test error 1 - ACC (default: per experiment)")
    p.add_argument("--eval-every", type=float, metavar="EPOCHS", help="epochs between test evaluations (default: 0.25)")
    p.add_argument("--pretrain-epochs", type=float, help="warmstart: single-process epochs before the sweep (default: 3)")
    p.add_argument("--max-steps", type=int, help="cap the mini-batches of every run")
    p.add_argument("--data-root", metavar="DIR", help="where datasets live (default: $MINASGD_DATA or ./data)")
    p.add_argument("--fresh", action="store_true", help="run everything again (default: skip finished runs)")
    p.add_argument("--docs", metavar="FILE.md",
                   help="also put the report into this markdown file (between <!-- experiment:NAME --> markers) "
                        "and the plots next to it in img/")


OVERRIDES = ("seeds", "workers", "nsync", "dataset", "model", "backend", "gpu", "epochs", "batch_size", "lr", "lr_scaling",
             "target", "eval_every", "pretrain_epochs", "max_steps", "data_root")


def settings_from_args(args):
    s = default_settings(args.name, quick=getattr(args, "quick", False))
    for name in OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            setattr(s, name, value)
    if s.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {s.seeds}")
    if not 0 < s.target < 1:
        raise ValueError(f"--target is a test accuracy between 0 and 1, got {s.target}")
    return s


# ------------------------------------------------------------------ one run

def _train_config(s, spec, run_dir, init=None):
    from ..train import TrainConfig

    return TrainConfig(dataset=s.dataset, model=s.model, backend=s.backend, gpu=s.gpu, epochs=s.epochs,
                       batch_size=s.batch_size, lr=s.lr, momentum=s.momentum, warmup_steps=s.warmup_steps,
                       seed=spec["seed"], init=init, out=str(run_dir), data_root=s.data_root, max_steps=s.max_steps,
                       eval_every=s.eval_every, quiet=True,
                       extra={"experiment": s.name, "spec": spec, "settings": _comparable(s)})


def _comparable(s):
    """The settings a finished run must share to be reused (not the sweep's lists or seed count)."""
    return {k: v for k, v in s.as_dict().items() if k not in ("seeds", "workers", "nsync", "target", "name", "quick")}


def _single_process(cfg):
    from ..train import train

    return train(cfg)


def _in_own_process(cfg):
    """Single-process training in a spawned process with ONE BLAS thread, like each worker: on a
    busy machine default BLAS threads made single-process training up to 8x slower, which would
    fake a speed-up of the distributed runs."""
    import multiprocess

    from ..ps.launcher import blas_threads

    with blas_threads(1), multiprocess.get_context("spawn").Pool(1) as pool:
        return pool.apply(_single_process, (cfg,))


def _pretrain(s, spec, run_dir, train_size):
    """Warm start's first phase: the single-process trainer for `pretrain_epochs` at `pretrain_lr`."""
    cfg = _train_config(s, spec, run_dir)
    steps = max(1, round(s.pretrain_epochs * (train_size // s.batch_size)))
    cfg.epochs, cfg.max_steps, cfg.lr = math.ceil(s.pretrain_epochs), steps, s.pretrain_lr
    cfg.extra["settings"]["pretrain_steps"] = steps
    return _in_own_process(cfg)


def _baseline(s, spec, run_dir, exp_dir):
    """The single-process trainer with the sweep's settings (from the pretrained model if warm)."""
    init = str(exp_dir / spec["init"] / "model.npz") if spec.get("init") else None
    return _in_own_process(_train_config(s, spec, run_dir, init=init))


def _distributed(s, spec, run_dir, dataset, exp_dir):
    from ..ps.launcher import PsOptions, train_distributed

    init = str(exp_dir / spec["init"] / "model.npz") if spec.get("init") else None
    cfg = _train_config(s, spec, run_dir, init=init)
    opts = PsOptions(workers=spec["workers"], nsync=spec["nsync"], sync=spec["sync"],
                     lr_scaling=spec["lr_scaling"], checkpoint_every=1e9, eval_every=s.eval_every)
    return train_distributed(cfg, opts, dataset=dataset)


def finished_summary(run_dir, spec, s):
    """The run's summary.json if it finished with this spec and these settings, else None."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    settings = dict(summary.get("settings", {}))
    settings.pop("pretrain_steps", None)
    if summary.get("spec") != spec or settings != _comparable(s):
        return None
    return summary


# ------------------------------------------------------------------ the sweep

def run(args, console):
    s = settings_from_args(args)
    exp_dir = Path(args.out or Path("runs") / f"experiment-{s.name}")
    exp_dir.mkdir(parents=True, exist_ok=True)
    specs = plan(s)
    console.print(f"[bold]experiment {s.name}[/]: {len(specs)} runs of {s.model} on {s.dataset} "
                  f"({s.backend}), {s.epochs} epochs each, target test accuracy {s.target:.0%} "
                  f"(test error {1 - s.target:.0%}) -> {exp_dir}")
    (exp_dir / "settings.json").write_text(json.dumps(s.as_dict(), indent=2) + "\n")

    summaries, failed, dataset = [], [], None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("runs", total=len(specs))
        for spec in specs:
            run_dir = exp_dir / spec["name"]
            summary = None if args.fresh else finished_summary(run_dir, spec, s)
            if summary is not None:
                progress.console.print(f"  {spec['name']}: done before, skipped", style="dim")
            else:
                progress.update(bar, description=f"run {spec['name']}")
                shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
                started = time.perf_counter()
                try:
                    if dataset is None:
                        dataset = _load_dataset(s)
                    if spec["mode"] == "pretrain":
                        summary = _pretrain(s, spec, run_dir, len(dataset.train_y))
                    elif spec["mode"] == "single":
                        summary = _baseline(s, spec, run_dir, exp_dir)
                    else:
                        summary = _distributed(s, spec, run_dir, dataset, exp_dir)
                except Exception as e:  # one broken run should not cost the sweep
                    failed.append(spec["name"])
                    progress.console.print(f"  [red]{spec['name']} failed: {type(e).__name__}: {e}[/]")
                else:
                    progress.console.print(_run_line(spec, run_dir, summary, s, time.perf_counter() - started))
            summaries.append(summary)
            progress.advance(bar)
        progress.update(bar, description="runs")

    result = collect(s, specs, summaries, exp_dir)
    write_tables(result, exp_dir)
    images = _plots(result, exp_dir, console)
    text = report.markdown(result, images)
    (exp_dir / "report.md").write_text(text)
    show(result, console)
    if args.docs:
        report.update_docs(args.docs, result, exp_dir, images)
        console.print(f"report and plots put into {args.docs}")
    console.print(f"tables: {exp_dir / 'results.csv'}, {exp_dir / 'summary.csv'}, {exp_dir / 'results.json'}; "
                  f"report: {exp_dir / 'report.md'}")
    if failed:
        console.print(f"[red]{len(failed)} runs failed: {', '.join(failed)} (run the command again to retry them)[/]")
        return 1
    return 0


def _load_dataset(s):
    from ..train import TrainConfig, load_dataset

    return load_dataset(TrainConfig(dataset=s.dataset, data_root=s.data_root, quiet=True))


def _run_line(spec, run_dir, summary, s, seconds):
    hit = analysis.reach(analysis.load_curve(run_dir), s.target)
    reached = f"target at {hit['time']:.1f} s / {hit['images']:.0f} images" if hit else "target not reached"
    return (f"  {spec['name']}: test accuracy {summary['test_accuracy']:.1%}, {reached}, "
            f"{summary['images_per_second']:.0f} images/s, {seconds:.0f} s")


# ------------------------------------------------------------------ tables

def collect(s, specs, summaries, exp_dir):
    """Everything the tables, plots and report need, as one JSON-able dict."""
    rows, curves, pretrain = [], {}, []
    for spec, summary in zip(specs, summaries):
        if summary is None:
            continue
        run_dir = exp_dir / spec["name"]
        if spec["mode"] == "pretrain":
            pretrain.append({"name": spec["name"], "seed": spec["seed"], "test_accuracy": summary["test_accuracy"],
                             "images": summary["images"], "steps": summary["steps"],
                             "seconds": summary["wall_seconds"]})
            continue
        rows.append(analysis.run_row(spec, run_dir, s.target, summary))
        curves[spec["name"]] = analysis.load_curve(run_dir)
    analysis.add_speedups(rows)
    hists = analysis.staleness_histograms([sp for sp, su in zip(specs, summaries) if sp["workers"]],
                                          [su for sp, su in zip(specs, summaries) if sp["workers"]])
    return {"experiment": s.name, "settings": s.as_dict(), "runs": rows, "summary": analysis.summarize(rows),
            "pretrain": pretrain, "staleness": [{"group": g, "nsync": k, "workers": w, "histogram": h}
                                                for (g, k, w), h in hists.items()],
            "curves": curves, "machine": _machine()}


def _machine():
    import platform
    import subprocess

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commit = None
    try:  # which code made the report (finished runs are reused: after changing the code, use --fresh)
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cores": cores, "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "commit": commit}


def _write_csv(path, rows):
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_tables(result, exp_dir):
    _write_csv(exp_dir / "results.csv", result["runs"])
    _write_csv(exp_dir / "summary.csv", result["summary"])
    (exp_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")


def _plots(result, exp_dir, console):
    try:
        from . import plots
    except ImportError:
        console.print("[yellow]matplotlib is not installed: tables only, no plots "
                      "(pip install -e \".[plot]\")[/]")
        return []
    return plots.make(result, exp_dir)


def show(result, console):
    """The summary table on the terminal."""
    s = result["settings"]
    table = Table(title=f"{result['experiment']}: target test error {1 - s['target']:.0%} "
                        f"(mean ± std over seeds; ≥: runs that missed the target count with their whole length)")
    for _, short, _ in report.SUMMARY_COLUMNS:
        table.add_column(short, justify="left" if short in ("group", "mode") else "right")
    for row in report.summary_cells(result["summary"]):
        table.add_row(*row)
    console.print(table)
