"""From run folders to tables: time / images / server updates to a target accuracy, and speed-ups.

    curve = load_curve(run_dir)               # [{"time", "images", "updates", "accuracy"}, ...]
    hit = reach(curve, 0.2)                    # {"seconds", "images", "updates"} or None
    rows = [run_row(spec, run_dir, settings) for ...]
    table = summarize(rows)                    # one row per (group, nsync, workers)

Definitions (as in the paper, plus what one machine cannot measure):
- time to target: the run's clock (the server's from the moment all workers joined, process
  start-up not counted; the single-process trainer's training time, evaluations not counted)
  to the first test evaluation at or above the target accuracy, interpolated linearly between
  that evaluation and the one before it. Images and server updates to target are interpolated
  the same way. Evaluations happen at exact step counts (every `eval_every` epochs).
- A run that never reaches the target is CENSORED, not dropped: in the means it counts with its
  whole length (a lower bound, shown as "≥"). The table's speed-ups are ratios of MEDIANS over
  seeds in which a missed target counts as never reached (+inf): the Kaplan-Meier median, since
  runs are censored only at their end. So a configuration that misses the target in some seeds
  is not judged by its lucky seeds alone (pairing only the runs that both reached the target
  would be survivorship bias); when half or more of its runs miss, its median is beyond the run
  ("> run" in the table) and its speed-up is 0. The 95% intervals resample seeds (paired) with
  replacement. Per-seed paired speed-ups stay in runs.csv.
- speed-up of N workers = time to target of 1 worker / time to target of N workers, paired by
  seed (same seed, nsync and group), factorised as
      speed-up = N x hardware efficiency x statistical efficiency
      hardware efficiency    = images/s with N / (N x images/s with 1), both up to the target
                                                                        (the machine, the server)
      statistical efficiency = images to target with 1 / images with N      (asynchrony, staleness)
  so a reader sees which part failed. On one shared CPU the hardware part cannot scale; the
  statistical part is what N real devices would keep.
- projected speed-up = N x statistical efficiency: hardware efficiency assumed 1 (N devices, a
  free server). An assumption, not a measurement.
- against one process: the same two numbers against the single-process trainer ("single", or
  "single-warm" for warm starts) with the same seed: speed-up and images-to-target ratio.
"""

import json
import math
from pathlib import Path

import numpy as np

from .sweeps import sweep_momentum_scaling


def load_records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-line
            pass
    return records


def load_curve(run_dir):
    """The test evaluations of a run, in order: time (s), images seen, server updates, accuracy."""
    curve = []
    for r in load_records(run_dir):
        if r.get("kind") == "epoch":
            curve.append({"time": float(r["time"]), "images": int(r["images"]),
                          "updates": int(r.get("version", r.get("step", 0))),
                          "accuracy": float(r["test_accuracy"]),
                          "train_accuracy": float(r["train_accuracy"]) if "train_accuracy" in r else None})
    return curve


def reach(curve, target):
    """When the curve first reaches `target` accuracy (interpolated), or None if it never does."""
    previous = None
    for point in curve:
        if point["accuracy"] >= target:
            if previous is None:  # already there at the first evaluation
                return {k: point[k] for k in ("time", "images", "updates")}
            f = (target - previous["accuracy"]) / (point["accuracy"] - previous["accuracy"])
            return {k: previous[k] + f * (point[k] - previous[k]) for k in ("time", "images", "updates")}
        previous = point
    return None


def staleness_stats(histogram):
    """(mean, max, number of pushes) of a {"staleness": count} histogram."""
    hist = {int(k): int(v) for k, v in (histogram or {}).items()}
    total = sum(hist.values())
    if not total:
        return None, None, 0
    return sum(k * v for k, v in hist.items()) / total, max(hist), total


def run_row(spec, run_dir, target, summary=None):
    """One results row for a finished run (spec fields + numbers)."""
    if summary is None:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    curve = load_curve(run_dir)
    hit = reach(curve, target)
    mean_stale, max_stale, _ = staleness_stats(summary.get("staleness"))
    return {
        "name": spec["name"], "group": spec["group"], "mode": spec["mode"], "workers": spec["workers"],
        "nsync": spec["nsync"], "lr_scaling": spec.get("lr_scaling", "none"), "seed": spec["seed"],
        "momentum_scaling": spec.get("momentum_scaling", sweep_momentum_scaling(spec)),
        "init": spec.get("init") or "", "target_accuracy": target, "target_error": 1 - target,
        "final_accuracy": summary["test_accuracy"], "final_error": 1 - summary["test_accuracy"],
        "best_accuracy": max((p["accuracy"] for p in curve), default=summary["test_accuracy"]),
        "final_train_error": 1 - curve[-1]["train_accuracy"] if curve and curve[-1]["train_accuracy"] is not None else None,
        "reached": hit is not None,
        "seconds_to_target": hit["time"] if hit else None,
        "images_to_target": hit["images"] if hit else None,
        "updates_to_target": hit["updates"] if hit else None,
        "wall_seconds": summary["wall_seconds"], "images": summary["images"],
        "images_per_second": summary["images_per_second"],
        "updates": summary.get("version", summary.get("steps")), "pushes": summary.get("pushes"),
        "mean_staleness": mean_stale, "max_staleness": max_stale,
        "run": str(run_dir),
    }


def bootstrap_mean(values, samples=10_000, seed=0):
    """(mean, low, high): the mean and a 95% percentile-bootstrap interval over `values`."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan"), float("nan")
    draws = np.random.default_rng(seed).choice(values, size=(samples, len(values))).mean(axis=1)
    return float(values.mean()), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def mean_std(values):
    """(mean, sample std) of the non-None values; (None, None) if there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _baseline(rows, row, same_seed=True):
    """The 1-worker run (or summary row) with the same seed and nsync: from the same group, else any
    group (sync uses async's: one worker is the same either way)."""
    same = [r for r in rows if r["workers"] == 1 and r["nsync"] == row["nsync"]
            and (not same_seed or r["seed"] == row["seed"])]
    in_group = [r for r in same if r["group"] == row["group"] and r["lr_scaling"] == row["lr_scaling"]]
    family = [r for r in same if r["group"] == row["group"].split("-")[0]]  # an ablation: "warm-mnone" -> "warm"
    return (in_group or family or same or [None])[0]


def _single(rows, row, same_seed=True):
    """The single-process run (or summary row) with the same seed and start (cold or warm), or None."""
    group = "single-warm" if row.get("init") or row["group"].startswith("warm") else "single"
    return next((r for r in rows if r["group"] == group and (not same_seed or r["seed"] == row["seed"])), None)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _rate_to_target(row):
    """Images per second up to the target (images to target / seconds to target)."""
    return _ratio(row["images_to_target"], row["seconds_to_target"])


def add_speedups(rows):
    """Per run: speed-up, hardware and statistical efficiency against its 1-worker baseline, the
    projection, and speed-up and images ratio against one process (None where a run missed the
    target, or there is no baseline)."""
    for row in rows:
        for key in ("measured_speedup", "hardware_efficiency", "statistical_efficiency", "projected_speedup",
                    "speedup_vs_single", "images_vs_single"):
            row[key] = None
        if row["workers"] == 0:
            continue
        base, single = _baseline(rows, row), _single(rows, row)
        if base is not None:
            # Over the same stretch as the speed-up (to the target), so that speed-up = N x hardware
            # x statistical efficiency holds exactly per run; whole-run images/s where one missed it.
            if base["reached"] and row["reached"]:
                row["hardware_efficiency"] = _ratio(_rate_to_target(row), row["workers"] * _rate_to_target(base))
                row["measured_speedup"] = _ratio(base["seconds_to_target"], row["seconds_to_target"])
                row["statistical_efficiency"] = _ratio(base["images_to_target"], row["images_to_target"])
                if row["statistical_efficiency"] is not None:
                    row["projected_speedup"] = row["workers"] * row["statistical_efficiency"]
            else:
                row["hardware_efficiency"] = _ratio(row["images_per_second"], row["workers"] * base["images_per_second"])
        if single is not None and single["reached"] and row["reached"]:
            row["speedup_vs_single"] = _ratio(single["seconds_to_target"], row["seconds_to_target"])
            row["images_vs_single"] = _ratio(single["images_to_target"], row["images_to_target"])
    return rows


SPEEDUP_FIELDS = ("measured_speedup", "hardware_efficiency", "statistical_efficiency", "projected_speedup",
                  "speedup_vs_single", "images_vs_single", "final_accuracy", "final_train_error", "images_per_second",
                  "mean_staleness")
# to-target numbers, and the whole-run number a censored run (target missed) counts with instead
TARGET_FIELDS = {"seconds_to_target": "wall_seconds", "images_to_target": "images", "updates_to_target": "updates"}
SUMMARY_FIELDS = tuple(TARGET_FIELDS) + SPEEDUP_FIELDS
GROUP_KEY = ("group", "mode", "lr_scaling", "nsync", "workers", "momentum_scaling")


def median_to_target(values):
    """The median over seeds of a to-target number, a run that missed the target (None) counting as
    never reaching it (+inf): the Kaplan-Meier median when runs are censored only at their end.
    +inf when half or more of the runs missed."""
    xs = sorted(math.inf if v is None else float(v) for v in values)
    if not xs:
        return math.inf
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def _median_ratio(base, runs):
    """median(base) / median(runs) with +inf for misses; None when both medians are +inf."""
    a, b = median_to_target(base), median_to_target(runs)
    if math.isinf(a) and math.isinf(b):
        return None
    return math.inf if math.isinf(a) else a / b  # a / inf = 0.0: N workers never got there


def _paired(base_runs, runs, name):
    """(baseline values, values): `name` per seed both have (None where the target was missed)."""
    seeds = sorted({r["seed"] for r in base_runs} & {r["seed"] for r in runs})
    by_seed = lambda rs: {r["seed"]: (r[name] if r["reached"] else None) for r in rs}
    b, n = by_seed(base_runs), by_seed(runs)
    return [b[s] for s in seeds], [n[s] for s in seeds]


def median_ratio(base_runs, runs, name):
    """Median `name` of the baseline's runs / that of `runs`, paired by seed (misses +inf)."""
    base, mine = _paired(base_runs, runs, name)
    return _median_ratio(base, mine) if base else None


def median_speedup(base_runs, runs, name="seconds_to_target", samples=2000, seed=0):
    """(ratio, low, high): `median_ratio`, and a 95% interval from resampling the seeds both
    have, paired, with replacement."""
    base, mine = _paired(base_runs, runs, name)
    if not base:
        return None, None, None
    point = _median_ratio(base, mine)
    picks = np.random.default_rng(seed).integers(0, len(base), size=(samples, len(base)))
    draws = [_median_ratio([base[i] for i in pick], [mine[i] for i in pick]) for pick in picks]
    draws = np.array([d for d in draws if d is not None])
    if point is None or not len(draws):
        return point, None, None
    low, high = np.percentile(draws, [2.5, 97.5], method="inverted_cdf")  # no interpolation across inf
    return point, float(low), float(high)


def add_median_speedups(table, rows):
    """Per summary row with workers: the speed-up of medians against the 1-worker row with the same
    nsync and against one process, with its factors (N x hardware x statistical efficiency)."""
    def runs_of(summary_row):
        return [r for r in rows if tuple(r.get(k) for k in GROUP_KEY) == tuple(summary_row.get(k) for k in GROUP_KEY)]

    for out in table:
        for key in ("speedup", "speedup_low", "speedup_high", "stat_eff", "hw_eff", "projected",
                    "vs_single", "vs_single_low", "vs_single_high", "images_vs_single_median"):
            out[key] = None
        if out["workers"] == 0:
            continue
        mine = runs_of(out)
        base = _baseline(table, out, same_seed=False)
        if base is not None:
            out["speedup"], out["speedup_low"], out["speedup_high"] = median_speedup(runs_of(base), mine)
            out["stat_eff"] = median_ratio(runs_of(base), mine, "images_to_target")
            if out["stat_eff"] not in (None, 0.0, math.inf) and out["speedup"] not in (None, 0.0, math.inf):
                out["hw_eff"] = out["speedup"] / (out["workers"] * out["stat_eff"])
            if out["stat_eff"] is not None:
                out["projected"] = out["workers"] * out["stat_eff"]
        single = _single(table, out, same_seed=False)
        if single is not None:
            out["vs_single"], out["vs_single_low"], out["vs_single_high"] = median_speedup(runs_of(single), mine)
            out["images_vs_single_median"] = median_ratio(runs_of(single), mine, "images_to_target")
    return table


def summarize(rows):
    """One row per (group, mode, lr_scaling, nsync, workers): counts and mean/std over seeds. For
    the to-target numbers a censored run counts with its whole length (`*_censored` says how many)."""
    keys = []
    for r in rows:
        key = tuple(r.get(k) for k in GROUP_KEY)
        if key not in keys:
            keys.append(key)
    table = []
    for key in keys:
        runs = [r for r in rows if tuple(r.get(k) for k in GROUP_KEY) == key]
        out = dict(zip(GROUP_KEY, key))
        out.update(seeds=len(runs), reached=sum(r["reached"] for r in runs), target_accuracy=runs[0]["target_accuracy"])
        for name, whole in TARGET_FIELDS.items():
            values = [r[name] if r["reached"] else r.get(whole) for r in runs]
            out[f"{name}_mean"], out[f"{name}_std"] = mean_std(values)
            out[f"{name}_censored"] = sum(not r["reached"] for r in runs)
        for name in SPEEDUP_FIELDS:
            out[f"{name}_mean"], out[f"{name}_std"] = mean_std([r.get(name) for r in runs])
        out["speedup_pairs"] = sum(r.get("measured_speedup") is not None for r in runs)
        _, out["final_accuracy_low"], out["final_accuracy_high"] = bootstrap_mean([r["final_accuracy"] for r in runs])
        train_errors = [r["final_train_error"] for r in runs if r.get("final_train_error") is not None]
        out["final_train_error_low"] = out["final_train_error_high"] = float("nan")
        if train_errors:
            _, out["final_train_error_low"], out["final_train_error_high"] = bootstrap_mean(train_errors)
        for name in TARGET_FIELDS:
            out[f"{name}_median"] = median_to_target([r[name] if r["reached"] else None for r in runs])
        table.append(out)
    return add_median_speedups(table, rows)


def staleness_histograms(specs, summaries):
    """{(group, nsync, workers): {staleness: pushes}} summed over seeds."""
    hists = {}
    for spec, summary in zip(specs, summaries):
        if summary is None or not summary.get("staleness"):
            continue
        key = (spec["group"], spec["nsync"], spec["workers"])
        h = hists.setdefault(key, {})
        for k, v in summary["staleness"].items():
            h[int(k)] = h.get(int(k), 0) + int(v)
    return {key: dict(sorted(h.items())) for key, h in hists.items()}
