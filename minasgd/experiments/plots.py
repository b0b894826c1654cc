"""The experiment's plots (matplotlib, no display needed). Importing this module fails without
matplotlib; the runner then writes the tables only."""

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLES = {"cold": "-", "warm": "--", "async": "-", "sync": "--", "plain": "-", "staleness-lr": "--"}
DPI = 80


def _save(fig, path):
    """Write the figure as a 256-colour PNG (a third of the size; plots have few colours)."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    try:
        from PIL import Image

        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
    except (ImportError, OSError):  # keep matplotlib's full-colour file
        pass


def _colour(workers, all_workers):
    cmap = plt.get_cmap("viridis")
    ranks = sorted(set(all_workers))
    return cmap(ranks.index(workers) / max(1, len(ranks) - 1) * 0.9)


def curves(result, path):
    """Test error vs wall time (top) and vs images seen (bottom), one panel per (group, nsync),
    one line per run, colour = workers."""
    runs = result["runs"]
    panels = []
    for r in runs:
        if r["workers"] and (r["group"], r["nsync"]) not in panels:
            panels.append((r["group"], r["nsync"]))
    workers = [r["workers"] for r in runs if r["workers"]]
    target = 1 - result["settings"]["target"]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.4), squeeze=False, sharey=True)
    for col, (group, k) in enumerate(panels):
        for row, x in enumerate(("time", "images")):
            ax = axes[row][col]
            labelled = set()
            baseline = "single-warm" if group == "warm" else "single"
            for r in runs:
                if r["group"] == baseline:  # the single-process trainer, in every panel
                    curve = result["curves"].get(r["name"], [])
                    ax.plot([p[x] for p in curve], [1 - p["accuracy"] for p in curve], ":", color="black",
                            linewidth=1.2, label="1 process" if "1 process" not in labelled else None)
                    labelled.add("1 process")
                if (r["group"], r["nsync"]) != (group, k) or not r["workers"]:
                    continue
                curve = result["curves"].get(r["name"], [])
                label = f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
                ax.plot([p[x] for p in curve], [1 - p["accuracy"] for p in curve], STYLES.get(r["group"], "-"),
                        color=_colour(r["workers"], workers), linewidth=1.0, alpha=0.7, marker=".", markersize=3,
                        label=label if label not in labelled else None)
                labelled.add(label)
            ax.axhline(target, color="red", linewidth=0.7, linestyle=":")
            ax.set_xlabel("seconds (all workers joined = 0)" if x == "time" else "images seen (all workers)")
            ax.set_ylabel("test error")
            ax.set_title(f"{group}, nsync {k}", fontsize=10)
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:  # one legend for all panels
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[0][0].legend(handles.values(), handles.keys(), fontsize=7, loc="upper right")
    fig.suptitle(f"{result['experiment']}: test error (red: target {target:.0%})", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return path


def speedups(result, path):
    """Measured and projected speed-up vs workers (ratio of median times over seeds, a missed
    target counting as never; bars: 95% interval from resampling seeds), per group and nsync."""
    finite = lambda x: x is not None and np.isfinite(x)
    rows = [r for r in result["summary"] if r["workers"] and (finite(r["speedup"]) or r["workers"] == 1)]
    if not any(r["workers"] > 1 and finite(r["projected"]) for r in rows):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    top = 1
    for ax, kind in zip(axes, ("measured", "projected")):
        keys = sorted({(r["group"], r["mode"], r["lr_scaling"], r["nsync"]) for r in rows if r["workers"]})
        for i, key in enumerate(keys):
            pts = sorted((r for r in rows if (r["group"], r["mode"], r["lr_scaling"], r["nsync"]) == key),
                         key=lambda r: r["workers"])
            value = "speedup" if kind == "measured" else "projected"
            pts = [r for r in pts if finite(r[value])]
            if not pts:
                continue
            ys = [r[value] for r in pts]
            top = max(top, max(ys))
            low = [y - r["speedup_low"] if kind == "measured" and finite(r["speedup_low"]) else 0 for y, r in zip(ys, pts)]
            high = [r["speedup_high"] - y if kind == "measured" and finite(r["speedup_high"]) else 0 for y, r in zip(ys, pts)]
            ax.errorbar([r["workers"] for r in pts], ys, yerr=[low, high],
                        marker="o", capsize=3, linestyle=STYLES.get(key[0], "-"),
                        color=plt.get_cmap("tab10")(i % 10), label=f"{key[0]}, nsync {key[3]}")
        n = max(r["workers"] for r in rows)
        ax.plot([1, n], [1, n], color="gray", linewidth=0.7, linestyle=":", label="linear")
        ax.set_xticks(sorted({r["workers"] for r in rows}))
        ax.set_xlabel("workers")
        ax.set_title(f"{kind} speed-up" + (" (N independent devices)" if kind == "projected" else
                                            f" ({result['machine']['cores']} cores shared)"), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time(1 worker) / time(N workers)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{result['experiment']}: speed-up to test error {1 - result['settings']['target']:.0%}", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return path


def staleness(result, path):
    """Staleness histograms (pushes per staleness, all seeds), one panel per (nsync, workers)."""
    hists = [h for h in result["staleness"] if h["workers"]]
    if not hists:
        return None
    panels = sorted({(h["nsync"], h["workers"]) for h in hists})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (k, w) in zip(axes[0], panels):
        groups = [h for h in hists if (h["nsync"], h["workers"]) == (k, w)]
        width = 0.8 / len(groups)
        for i, h in enumerate(groups):
            hist = {int(s): n for s, n in h["histogram"].items()}  # JSON keys are strings
            total = sum(hist.values())
            xs = sorted(hist)
            ax.bar([x + (i - (len(groups) - 1) / 2) * width for x in xs], [hist[x] / total for x in xs], width=width,
                   label=h["group"], color=plt.get_cmap("tab10")(i))
        ax.set_title(f"{w} workers, nsync {k}", fontsize=10)
        ax.set_xlabel("staleness (mini-batches)")
        ax.set_ylabel("fraction of pushes")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path


def make(result, exp_dir):
    """All plots for this experiment; returns the paths written."""
    exp_dir = Path(exp_dir)
    if not result["runs"]:
        return []
    written = [curves(result, exp_dir / "curves.png"), speedups(result, exp_dir / "speedup.png")]
    if result["experiment"] in ("staleness", "workers"):
        written.append(staleness(result, exp_dir / "staleness.png"))
    return [str(p) for p in written if p]
