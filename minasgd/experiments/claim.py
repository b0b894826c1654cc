"""The paper's claim as a user checks it: `minasgd train` against `minasgd train --workers 2`.

    runs = run_claim(out_dir, seeds=3, extra_args=[], worker_args=["--sync"], on_event=print_event)
    table = claim_table(load_claim(out_dir))       # markdown, generated from the files only
    table = compare_table([load_claim(d) for d in out_dirs])   # one row per claim directory

For each seed both commands run one after the other, as the README gives them: separate
processes, the same --seed, everything else at its default (plus `extra_args` for both, e.g. a
dataset or --epochs; `worker_args` for the 2-worker command only, e.g. `--sync` or
`--lr-scaling workers`, to probe one 2-worker setting), each timed from start to exit (the whole command: start-up, data, worker
processes, evaluations). Each run keeps its run directory (`metrics.jsonl`, `summary.json`;
the model files are deleted to keep the results small) and a `run.json` with the exact command,
the seed, the code version (git commit, and whether the tree had uncommitted changes), the
machine (cores, processor, load average before and after) and the wall time. A finished run
whose `run.json` names another code version or command is run again, never reused silently.

What the table compares, per seed and as a mean with a bootstrap 95% interval over seeds:
- the final test accuracy of 2 workers / that of one process (the goal: >= 0.95),
- the whole command's wall time, one process / 2 workers (the goal: >= 1.3, i.e. <= 1/1.3),
- test accuracy at equal images (each epoch), 2 workers / one process.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .analysis import bootstrap_mean

COMMANDS = {"one-process": [], "2-workers": ["--workers", "2"]}


def code_version():
    """(commit, dirty) of the checkout this module runs from; (None, None) outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip()) if commit else None


def machine():
    return {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "system": platform.system()}


def command(kind, seed, run_dir, extra_args, worker_args=()):
    only_workers = list(worker_args) if kind == "2-workers" else []
    return ["minasgd", "train", *COMMANDS[kind], *only_workers, "--seed", str(seed), *extra_args,
            "--out", str(run_dir), "--quiet"]


def finished(run_dir, cmd, commit):
    """The run's run.json if this exact command finished with this code, else None."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("command") != cmd or info.get("commit") != commit or info.get("dirty") or info.get("exit") != 0:
        return None
    return info


def run_one(kind, seed, out_dir, extra_args, commit, dirty, worker_args=()):
    """Run one command to its end (a subprocess, timed whole); returns its run.json dict."""
    run_dir = Path(out_dir) / f"{kind}-s{seed}"
    cmd = command(kind, seed, run_dir, extra_args, worker_args)
    info = finished(run_dir, cmd, commit)
    if info is not None:
        return info, True
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "minasgd", *cmd[1:]], capture_output=True, text=True)
    wall = time.perf_counter() - started
    run_dir.mkdir(parents=True, exist_ok=True)
    for big in run_dir.glob("model.npz*"):
        big.unlink()
    info = {"command": cmd, "kind": kind, "seed": seed, "exit": proc.returncode, "wall_seconds": wall,
            "commit": commit, "dirty": dirty, "machine": machine(), "load_before": load_before,
            "load_after": os.getloadavg()[0], "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if proc.returncode != 0:
        info["stderr_tail"] = proc.stderr[-2000:]
    (run_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    return info, False


def run_claim(out_dir, seeds=3, extra_args=(), worker_args=(), on_event=None):
    """Both commands for seeds 0..seeds-1, one after the other; returns load_claim(out_dir)."""
    emit = on_event or (lambda event: None)
    commit, dirty = code_version()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"seeds": seeds, "extra_args": list(extra_args), "worker_args": list(worker_args)}
    (out_dir / "claim.json").write_text(json.dumps(settings, indent=1) + "\n")
    for seed in range(seeds):
        for kind in COMMANDS:
            emit({"kind": "run_start", "name": f"{kind}-s{seed}",
                  "command": command(kind, seed, "DIR", extra_args, worker_args)})
            info, reused = run_one(kind, seed, out_dir, list(extra_args), commit, dirty, list(worker_args))
            emit({"kind": "run_done", "name": f"{kind}-s{seed}", "reused": reused, "exit": info["exit"],
                  "seconds": info["wall_seconds"]})
    return load_claim(out_dir)


# ------------------------------------------------------------------ from the files to a table

def _curve(run_dir):
    """{images: test accuracy} of a run's evaluations (metrics.jsonl "epoch" records)."""
    curve = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "epoch":
            curve[int(record["images"])] = float(record["test_accuracy"])
    return curve


def load_claim(out_dir):
    """Every finished pair in out_dir: {"pairs": [...], "settings": claim.json}."""
    out_dir = Path(out_dir)
    settings = json.loads((out_dir / "claim.json").read_text())
    pairs = []
    for seed in range(settings["seeds"]):
        runs = {}
        for kind in COMMANDS:
            run_dir = out_dir / f"{kind}-s{seed}"
            try:
                info = json.loads((run_dir / "run.json").read_text())
                summary = json.loads((run_dir / "summary.json").read_text())
            except (OSError, json.JSONDecodeError):
                break
            runs[kind] = {"info": info, "summary": summary, "curve": _curve(run_dir)}
        if len(runs) == len(COMMANDS):
            pairs.append({"seed": seed, **runs})
    return {"settings": settings, "pairs": pairs}


def pair_numbers(pair):
    one, two = pair["one-process"], pair["2-workers"]
    common = sorted(set(one["curve"]) & set(two["curve"]))
    return {"seed": pair["seed"], "acc_one": one["summary"]["test_accuracy"], "acc_two": two["summary"]["test_accuracy"],
            "accuracy_ratio": two["summary"]["test_accuracy"] / one["summary"]["test_accuracy"],
            "wall_one": one["info"]["wall_seconds"], "wall_two": two["info"]["wall_seconds"],
            "load": [one["info"].get("load_before"), one["info"].get("load_after"),
                     two["info"].get("load_before"), two["info"].get("load_after")],
            "time_ratio": one["info"]["wall_seconds"] / two["info"]["wall_seconds"],
            "per_image": {images: two["curve"][images] / one["curve"][images] for images in common}}


def _loads(load):
    """'2.9/2.9; 3.1/6.0': the 1-minute load averages around each command (other jobs on the machine)."""
    text = ["-" if v is None else f"{v:.1f}" for v in load]
    return f"{text[0]}/{text[1]}; {text[2]}/{text[3]}"


def _interval(values, fmt):
    mean, low, high = bootstrap_mean(values)
    return fmt.format(mean) + ("" if np.isnan(low) else f" [{fmt.format(low)}, {fmt.format(high)}]")


def claim_table(result):
    """The markdown tables: per seed, then the means with 95% bootstrap intervals; per image."""
    rows = [pair_numbers(p) for p in result["pairs"]]
    if not rows:
        return "No finished pair of runs yet.\n"
    first = result["pairs"][0]["one-process"]["info"]
    lines = [f"`minasgd train` (one process) against `minasgd train --workers 2{_worker_args(result)}`, extra "
             f"arguments `{' '.join(result['settings']['extra_args']) or '(none)'}`; code {first['commit']}, "
             f"{first['machine']['cores']} cores ({first['machine']['processor']}). A load average above the "
             f"core count means other jobs shared the machine: wall times are then noisy.", "",
             "| seed | one process: accuracy | wall s | 2 workers: accuracy | wall s | accuracy ratio | "
             "time ratio (1 / 2) | load average at start/end (1 process; 2 workers) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['acc_one']:.1%} | {r['wall_one']:.0f} | {r['acc_two']:.1%} | "
                     f"{r['wall_two']:.0f} | {r['accuracy_ratio']:.3f} | {r['time_ratio']:.2f}x | {_loads(r['load'])} |")
    lines.append(f"| mean [95% bootstrap] | {_interval([r['acc_one'] for r in rows], '{:.1%}')} | | "
                 f"{_interval([r['acc_two'] for r in rows], '{:.1%}')} | | "
                 f"{_interval([r['accuracy_ratio'] for r in rows], '{:.3f}')} | "
                 f"{_interval([r['time_ratio'] for r in rows], '{:.2f}')}x | |")
    images = sorted(set.intersection(*(set(r["per_image"]) for r in rows)))
    if images:
        lines += ["", "Test accuracy at equal images, 2 workers / one process (mean over seeds):", "",
                  "| images | " + " | ".join(f"{i:,}" for i in images) + " |",
                  "| --- | " + " | ".join("---" for _ in images) + " |",
                  "| ratio | " + " | ".join(f"{np.mean([r['per_image'][i] for r in rows]):.3f}" for i in images) + " |"]
    return "\n".join(lines) + "\n"


def _worker_args(result):
    """' --sync': the arguments only the 2-worker command was given, with a leading space."""
    args = result["settings"].get("worker_args") or []
    return "".join(" " + a for a in args)


def workers_ran(result):
    """'nsync 4, average, m 0.9, lr 0.02': how the 2 workers of a claim's first pair actually ran
    (their summary.json), so rows of the same command made by different defaults differ."""
    summary = result["pairs"][0]["2-workers"]["summary"] if result["pairs"] else {}
    ps = summary.get("ps") or {}
    if "nsync" not in summary:
        return "-"
    sgd = (f", m {summary['worker_momentum']:.3g}, lr {summary['worker_peak_lr']:.3g}"
           if summary.get("worker_peak_lr") is not None else "")
    return f"nsync {summary['nsync']}, {ps.get('lr_scaling', 'none')}{' (sync)' if ps.get('sync') else ''}{sgd}"


def compare_table(results):
    """One row per claim directory (each a 2-worker setting against the same one process): the
    2-worker command, seeds, mean accuracies and ratios with 95% bootstrap intervals, and the
    accuracy ratio at equal images after each evaluation."""
    extras = [list(r["settings"]["extra_args"]) for r in results]
    shared = 0  # the extra arguments all rows share (a common prefix) go in the header
    while extras and all(len(e) > shared and e[shared] == extras[0][shared] for e in extras):
        shared += 1
    lines = ["| 2-worker command | the workers ran (nsync, server, each worker's SGD) | seeds | code | "
             "one process: accuracy | 2 workers: accuracy | accuracy ratio | "
             "time ratio (1 / 2) | accuracy ratio at equal images (each evaluation) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result, extra in zip(results, extras):
        rows = [pair_numbers(p) for p in result["pairs"]]
        if not rows:
            continue
        own = "".join(" " + a for a in extra[shared:])  # given to both commands, but not shared by all rows
        images = sorted(set.intersection(*(set(r["per_image"]) for r in rows)))
        per_image = ", ".join(f"{np.mean([r['per_image'][i] for r in rows]):.2f}" for i in images)
        commits = sorted({p[k]["info"]["commit"] for p in result["pairs"] for k in COMMANDS})
        lines.append(f"| `minasgd train --workers 2{_worker_args(result)}`{f' (both: `{own.strip()}`)' if own else ''} | {workers_ran(result)} | {len(rows)} | {', '.join(commits)} | "
                     f"{_interval([r['acc_one'] for r in rows], '{:.1%}')} | "
                     f"{_interval([r['acc_two'] for r in rows], '{:.1%}')} | "
                     f"{_interval([r['accuracy_ratio'] for r in rows], '{:.3f}')} | "
                     f"{_interval([r['time_ratio'] for r in rows], '{:.2f}')}x | {per_image} |")
    common = " ".join(extras[0][:shared]) if extras else ""
    head = (f"Both commands with the extra arguments `{common or '(none)'}`; the same seeds "
            f"0..N-1 for every row; mean [95% bootstrap interval] over seeds.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def runs_table(run_dirs):
    """One row per run directory (a `minasgd train` run's summary.json): its settings as the
    workers ran them and its final test accuracy, from the files alone."""
    lines = ["| run | workers | nsync | lr scaling | momentum scaling | each worker's SGD | epochs | seed | "
             "final test accuracy |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run_dir in run_dirs:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        cfg, ps = summary.get("config", {}), summary.get("ps") or {}
        workers = summary.get("workers", 0)
        sgd = (f"m {summary['worker_momentum']:.3g}, lr {summary['worker_peak_lr']:.3g}" if "worker_momentum" in summary
               else f"not recorded (--momentum {cfg.get('momentum')}, --lr {cfg.get('lr')})")
        lines.append(f"| {Path(run_dir).name} | {workers or '1 process'} | {summary.get('nsync', '-')} | "
                     f"{ps.get('lr_scaling', '-')} | {ps.get('momentum_scaling', '-')} | {sgd} | {cfg.get('epochs')} | "
                     f"{cfg.get('seed')} | {summary['test_accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


def update_docs(doc_path, out_dir, table, marker=None, regenerate=None):
    """Put `table` into the markdown file between <!-- claim:OUT begin --> and <!-- claim:OUT end -->
    (appended if the markers are missing), saying which command regenerates it."""
    import re

    doc, key = Path(doc_path), marker or Path(out_dir).as_posix()
    begin, end = f"<!-- claim:{key} begin -->", f"<!-- claim:{key} end -->"
    regenerate = regenerate or f"minasgd experiment claim --out {key} --report --docs {doc_path}"
    block = (f"{begin}\n<!-- generated from the files in {out_dir} by `{regenerate}`; do not edit by hand -->"
             f"\n\n{table}\n{end}")
    old = doc.read_text() if doc.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n")
