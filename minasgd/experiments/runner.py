"""Run a sweep: one training run after another (never in parallel: the workers of one run
already share the machine), each in its own folder, then the tables, the plots and the report.
"""

import csv
import json
import shutil
import time
from pathlib import Path

from ..timer import usable_cores
from . import analysis, report
from .sweeps import default_settings, plan, sweep_momentum_scaling


def settings_from(name, quick=False, **overrides):
    """The experiment's default settings with the given ones (None: keep the default) replaced."""
    s = default_settings(name, quick=quick)
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    if s.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {s.seeds}")
    if not 0 < s.target < 1:
        raise ValueError(f"--target is a test accuracy between 0 and 1, got {s.target}")
    return s


# ------------------------------------------------------------------ one run

def _train_config(s, spec, run_dir, init=None):
    """The run's TrainConfig; a warm start (`init`) continues the pretrained model's schedule."""
    from ..train import TrainConfig

    return TrainConfig(dataset=s.dataset, model=s.model, backend=s.backend, gpu=s.gpu, epochs=s.epochs,
                       batch_size=s.batch_size, lr=s.lr, momentum=s.momentum, warmup_steps=s.warmup_steps,
                       seed=spec["seed"], init=init, continue_schedule=init is not None, out=str(run_dir),
                       data_root=s.data_root, max_steps=s.max_steps, eval_train=s.eval_train,
                       eval_every=s.eval_every, quiet=True,
                       extra={"experiment": s.name, "spec": spec, "settings": _comparable(s), "code": _code()})


def _code():
    """{"commit", "dirty"}: the code a run is made with; a run is reused only by the same, clean code."""
    from .claim import code_version

    commit, dirty = code_version()
    return {"commit": commit, "dirty": dirty}


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

    from ..threads import blas_threads_for_children

    with blas_threads_for_children(1), multiprocess.get_context("spawn").Pool(1) as pool:
        return pool.apply(_single_process, (cfg,))


def _pretrain(s, spec, run_dir, train_size):
    """Warm start's first phase, as in the paper: the single-process trainer stopped after
    `pretrain_epochs` of the run's own schedule (not annealed: the warm runs continue it)."""
    cfg = _train_config(s, spec, run_dir)
    steps = max(1, round(s.pretrain_epochs * (train_size // s.batch_size)))
    cfg.stop_step = steps
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
                     lr_scaling=spec["lr_scaling"], momentum_scaling=spec.get("momentum_scaling", sweep_momentum_scaling(spec)),
                     checkpoint_every=1e9, eval_every=s.eval_every)
    return train_distributed(cfg, opts, dataset=dataset)


def finished_summary(run_dir, spec, s, any_code=False):
    """The run's summary.json if it finished with this spec and these settings (and, unless
    `any_code`, with this very code, committed), else None."""
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
    code = summary.get("code") or {}
    if any_code:
        return summary
    if code.get("dirty") or code.get("commit") is None or code != _code():  # other or unknown code: run again
        return None
    return summary


# ------------------------------------------------------------------ the sweep

def _ignore(event):
    pass


def run_sweep(s, exp_dir, fresh=False, docs=None, on_event=None, report_only=False):
    """Run every training run of the sweep `s` that is not finished yet (all of them if `fresh`),
    then write the tables, the plots and report.md into `exp_dir` (and into `docs` if given).
    `report_only`: run nothing; report the finished runs whatever code made them (the report
    names that code).

    Returns (result, failed run names). `on_event(dict)` hears how it goes: sweep_start,
    run_skipped, run_start, run_failed, run_done, run_end, sweep_end, no_plots
    (`minasgd.dashboard.SweepView` shows them).
    """
    emit = on_event or _ignore
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    specs = plan(s)
    emit({"kind": "sweep_start", "settings": s, "runs": len(specs), "exp_dir": str(exp_dir)})
    (exp_dir / "settings.json").write_text(json.dumps(s.as_dict(), indent=2) + "\n")

    summaries, failed, dataset = [], [], None
    for spec in specs:
        run_dir = exp_dir / spec["name"]
        summary = None if fresh else finished_summary(run_dir, spec, s, any_code=report_only)
        if report_only:
            pass
        elif summary is not None:
            emit({"kind": "run_skipped", "name": spec["name"]})
        else:
            emit({"kind": "run_start", "name": spec["name"]})
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
                emit({"kind": "run_failed", "name": spec["name"], "error": f"{type(e).__name__}: {e}"})
            else:
                emit({"kind": "run_done", "name": spec["name"], "summary": summary,
                      "hit": analysis.reach(analysis.load_curve(run_dir), s.target),
                      "seconds": time.perf_counter() - started})
        summaries.append(summary)
        emit({"kind": "run_end", "name": spec["name"]})
    emit({"kind": "sweep_end"})

    result = collect(s, specs, summaries, exp_dir)
    write_tables(result, exp_dir)
    images = _plots(result, exp_dir, emit)
    (exp_dir / "report.md").write_text(report.markdown(result, images))
    if docs:
        report.update_docs(docs, result, exp_dir, images)
    return result, failed


def _load_dataset(s):
    from ..train import TrainConfig, load_dataset

    return load_dataset(TrainConfig(dataset=s.dataset, data_root=s.data_root, quiet=True))


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
    made_by = sorted({(su.get("code") or {}).get("commit") or "unknown" for su in summaries if su is not None})
    return {"experiment": s.name, "settings": s.as_dict(), "runs": rows, "summary": analysis.summarize(rows),
            "made_by": made_by,
            "pretrain": pretrain, "staleness": [{"group": g, "nsync": k, "workers": w, "histogram": h}
                                                for (g, k, w), h in hists.items()],
            "curves": curves, "machine": _machine()}


def _machine():
    import platform
    import subprocess

    cores = usable_cores()
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


def _plots(result, exp_dir, emit):
    try:
        from . import plots
    except ImportError:
        emit({"kind": "no_plots"})
        return []
    return plots.make(result, exp_dir)
