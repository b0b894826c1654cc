"""The experiment's report as markdown (report.md, and the generated parts of docs/paper.md)."""

import math
import re
import shutil
from pathlib import Path


def pm(mean, std, fmt="{:.2f}"):
    """'mean ± std' (or '-' when there is nothing)."""
    if mean is None:
        return "-"
    return fmt.format(mean) + ("" if not std else " ± " + fmt.format(std))


def ratio(point, low=None, high=None):
    """'1.85 [1.40, 2.10]': a ratio of medians with its interval; 0 = never reached, ∞ = only it did."""
    def one(x):
        return "∞" if x == float("inf") else f"{x:.2f}"
    if point is None:
        return "-"
    return one(point) + ("" if low is None or high is None else f" [{one(low)}, {one(high)}]")


def median_cell(row, name, fmt):
    """The median to target over seeds; '> run' when half or more of the runs missed it."""
    value = row.get(f"{name}_median")
    if value is None:
        return "-"
    return "> run" if value == float("inf") else fmt.format(value)


def _mode(row):
    scaling = row.get("lr_scaling", "none")
    return row["mode"] + {"none": "", "average": " + average", "sqrt": " + 1/sqrt(N)", "workers": " + lr/N"}.get(scaling, " + lr/staleness")


def _worker_sgd(settings):
    """The cell for one summary row: each worker's momentum and peak lr (`minasgd.ps.run.worker_settings`)."""
    from ..ps.launcher import PsOptions
    from ..ps.run import worker_settings

    def cell(row):
        if row["workers"] == 0:
            return f"m {settings.get('momentum', 0.9):g}, lr {settings['lr']:g}"
        opts = PsOptions(workers=row["workers"], nsync=row["nsync"], sync=row["mode"] == "sync",
                         lr_scaling=row.get("lr_scaling", "none"),
                         momentum_scaling=row.get("momentum_scaling", "staleness"))
        momentum, lr_scale = worker_settings(settings.get("momentum", 0.9), opts)
        return f"m {momentum:.3g}, lr {settings['lr'] * lr_scale:.3g}"
    return cell


def percent_interval(mean, low, high):
    """'12.3% [10.1%, 14.0%]': a mean and its 95% bootstrap interval ('-' without a mean; no
    interval from one seed, whose bounds are NaN)."""
    if mean is None:
        return "-"
    if low is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.1%}"
    return f"{mean:.1%} [{low:.1%}, {high:.1%}]"


def _workers(row):
    return "1 process" if row["workers"] == 0 else str(row["workers"])


def censored(row, name, fmt):
    """'mean ± std', with '≥' in front when runs that missed the target count with their length."""
    text = pm(row[f"{name}_mean"], row[f"{name}_std"], fmt)
    return ("≥ " + text) if row.get(f"{name}_censored") and text != "-" else text


SUMMARY_COLUMNS = [  # (markdown header, terminal header, cell)
    ("group", "group", lambda r: r["group"]),
    ("mode", "mode", _mode),
    ("nsync", "k", lambda r: str(r["nsync"])),
    ("workers", "N", _workers),
    ("reached", "hit", lambda r: f"{r['reached']}/{r['seeds']}"),
    ("median seconds to target", "s→tgt", lambda r: median_cell(r, "seconds_to_target", "{:.1f}")),
    ("median images to target", "img→tgt", lambda r: median_cell(r, "images_to_target", "{:.0f}")),
    ("median server updates to target", "upd→tgt", lambda r: median_cell(r, "updates_to_target", "{:.0f}")),
    ("speed-up vs 1 worker [95%]", "speed-up", lambda r: ratio(r["speedup"], r["speedup_low"], r["speedup_high"])),
    ("= N x hardware eff.", "hw eff", lambda r: ratio(r["hw_eff"])),
    ("x statistical eff.", "stat eff", lambda r: ratio(r["stat_eff"])),
    ("projected speed-up (hw eff. 1)", "projected", lambda r: ratio(r["projected"])),
    ("speed-up vs 1 process [95%]", "vs 1 proc", lambda r: ratio(r["vs_single"], r["vs_single_low"], r["vs_single_high"])),
    ("images-to-target ratio vs 1 process", "img vs 1 proc", lambda r: ratio(r["images_vs_single_median"])),
    ("final test error [95%]", "error", lambda r: "-" if r["final_accuracy_mean"] is None else
        percent_interval(1 - r["final_accuracy_mean"], 1 - r["final_accuracy_high"], 1 - r["final_accuracy_low"])),
    ("final training error [95%]", "train err", lambda r: percent_interval(
        r.get("final_train_error_mean"), r.get("final_train_error_low"), r.get("final_train_error_high"))),
    ("images/s", "img/s", lambda r: pm(r["images_per_second_mean"], None, "{:.0f}")),
    ("mean staleness (mini-batches)", "stale", lambda r: pm(r["mean_staleness_mean"], None, "{:.2f}")),
]


def summary_cells(summary):
    return [[fn(row) for _, _, fn in SUMMARY_COLUMNS] for row in summary]


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _histogram_text(hist, limit=12):
    items = sorted((int(k), v) for k, v in hist.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:limit])
    return text + (", ..." if len(items) > limit else "")


def markdown(result, images, image_prefix=""):
    """The report: settings, the summary table, staleness, pretraining, the plots."""
    s, m = result["settings"], result["machine"]
    seeds = s["seeds"]
    out = [f"### `minasgd experiment {result['experiment']}`" + (" --quick" if s["quick"] else ""), "",
           f"{s['model']} on {s['dataset']}, backend {s['backend']}, {s['epochs']} epochs per run (all workers "
           f"together), batch {s['batch_size']}, --lr {s['lr']} and --momentum {s.get('momentum', 0.9)} (what "
           f"each worker ran is in the table's first column), evaluation every {s['eval_every']} epochs; "
           f"{seeds} seed{'s' if seeds > 1 else ''} per configuration; target test error "
           f"**{1 - s['target']:.0%}** (accuracy {s['target']:.0%}). Machine: {m['cores']} cores "
           f"({m['processor']}), workers and server share them. Runs made by code {', '.join(result.get('made_by') or ['unknown'])}; "
           f"report made at commit {m.get('commit') or 'unknown'}.", ""]
    if result["pretrain"]:
        p = result["pretrain"]
        accs = ", ".join(f"{x['test_accuracy']:.1%}" for x in p)
        out += [f"Warm start: each seed first trains one process for {s['pretrain_epochs']} epochs "
                f"({p[0]['images']} images, about {sum(x['seconds'] for x in p) / len(p):.0f} s, not counted "
                f"in the times below), reaching test accuracy {accs}.", ""]
    sgd = _worker_sgd(s)
    out += [_table(["each worker's SGD"] + [c for c, _, _ in SUMMARY_COLUMNS],
                   [[sgd(row)] + cells for row, cells in zip(result["summary"], summary_cells(result["summary"]))]), "",
            "Each worker's SGD: the momentum and peak lr every worker (or the one process) stepped with, "
            "from --momentum and --lr through --momentum-scaling staleness and the run's --lr-scaling.", "",
            "Times are from the moment all workers joined (one process: training time, evaluations "
            "excluded) to the first evaluation at the target, interpolated between evaluations. Medians are "
            "over seeds, a run that missed the target counting as never reaching it (the Kaplan-Meier "
            "median: runs are censored only at their end), so no configuration is judged by its lucky seeds "
            "alone; **> run** means half or more of its runs missed. Speed-up = median time of the 1-worker "
            "runs with the same nsync / median time of these (0: these never reached the target by the "
            "median), with a 95% interval from resampling seeds (paired), and factorised: **speed-up = N x "
            "hardware efficiency x statistical efficiency**, statistical efficiency = median images to "
            "target(1) / median images(N) (the cost of asynchrony and staleness), hardware efficiency the "
            "rest (this machine and the server). **Projected** = N x statistical efficiency: an assumption of "
            "N independent devices and a free server, not a measurement. The next two columns compare with "
            "the single-process trainer with the same seeds (from the same pretrained model for warm runs). "
            "Final test error: mean over seeds [95% bootstrap interval].", ""]
    if result["staleness"] and result["experiment"] in ("staleness", "workers"):
        rows = [[h["group"], str(h["nsync"]), str(h["workers"]), _histogram_text(h["histogram"])]
                for h in result["staleness"]]
        out += ["Staleness histograms (mini-batches applied between a worker's fetch and its push: pushes "
                "per staleness, all seeds):", "", _table(["group", "nsync", "workers", "staleness: pushes"], rows), ""]
    for path in images:
        out += [f"![{Path(path).stem}]({image_prefix}{Path(path).name})", ""]
    return "\n".join(out)


def regenerate_command(result, exp_dir, doc_path):
    """The command that makes this report again from the run files: the settings that differ
    from the experiment's defaults, --out, --report and --docs."""
    from .sweeps import default_settings

    quick = result["settings"].get("quick", False)
    default = default_settings(result["experiment"], quick=quick).as_dict()
    flags = ["--quick"] if quick else []
    for key, value in result["settings"].items():
        if key in ("name", "quick") or value == default.get(key):
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        flags.append(f"--{key.replace('_', '-')} {text}")
    return " ".join([f"minasgd experiment {result['experiment']}", *flags, f"--out {Path(exp_dir).as_posix()}",
                     "--report", f"--docs {doc_path}"])


def update_docs(doc_path, result, exp_dir, images):
    """Copy the plots next to `doc_path` (img/NAME-*.png) and put the report between the markers
    <!-- experiment:NAME begin --> and <!-- experiment:NAME end --> (appended if they are missing)."""
    doc = Path(doc_path)
    img_dir = doc.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    name = result["experiment"]
    copied = []
    for path in images:
        dest = img_dir / f"{name}-{Path(path).name}"
        shutil.copyfile(path, dest)
        copied.append(dest)
    text = markdown(result, copied, image_prefix="img/")
    begin, end = f"<!-- experiment:{name} begin -->", f"<!-- experiment:{name} end -->"
    command = regenerate_command(result, exp_dir, doc_path)
    block = f"{begin}\n<!-- generated by `{command}`; do not edit by hand -->\n\n{text}\n{end}"
    old = doc.read_text() if doc.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    doc.write_text(new)
