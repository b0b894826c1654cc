"""The experiment's report as markdown (report.md, and the generated parts of docs/paper.md)."""

import re
import shutil
from pathlib import Path


def pm(mean, std, fmt="{:.2f}"):
    """'mean ± std' (or '-' when there is nothing)."""
    if mean is None:
        return "-"
    return fmt.format(mean) + ("" if not std else " ± " + fmt.format(std))


def _mode(row):
    scaling = row.get("lr_scaling", "none")
    return row["mode"] + ("" if scaling == "none" else f" + lr/{'N' if scaling == 'workers' else 'staleness'}")


def _worker_sgd(settings):
    """The cell for one summary row: each worker's momentum and peak lr (`minasgd.ps.run.worker_settings`)."""
    from ..ps.launcher import PsOptions
    from ..ps.run import worker_settings

    def cell(row):
        if row["workers"] == 0:
            return f"m {settings.get('momentum', 0.9):g}, lr {settings['lr']:g}"
        opts = PsOptions(workers=row["workers"], nsync=row["nsync"], sync=row["mode"] == "sync",
                         lr_scaling=row.get("lr_scaling", "none"))
        momentum, lr_scale = worker_settings(settings.get("momentum", 0.9), opts)
        return f"m {momentum:.3g}, lr {settings['lr'] * lr_scale:.3g}"
    return cell


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
    ("seconds to target", "s→tgt", lambda r: censored(r, "seconds_to_target", "{:.1f}")),
    ("images to target", "img→tgt", lambda r: censored(r, "images_to_target", "{:.0f}")),
    ("server updates to target", "upd→tgt", lambda r: censored(r, "updates_to_target", "{:.0f}")),
    ("speed-up (vs 1 worker)", "speed-up", lambda r: pm(r["measured_speedup_mean"], r["measured_speedup_std"])),
    ("= N x hardware eff.", "hw eff", lambda r: pm(r["hardware_efficiency_mean"], r["hardware_efficiency_std"])),
    ("x statistical eff.", "stat eff", lambda r: pm(r["statistical_efficiency_mean"], r["statistical_efficiency_std"])),
    ("projected speed-up (hw eff. 1)", "projected", lambda r: pm(r["projected_speedup_mean"], r["projected_speedup_std"])),
    ("speed-up vs 1 process", "vs 1 proc", lambda r: pm(r["speedup_vs_single_mean"], r["speedup_vs_single_std"])),
    ("images-to-target ratio vs 1 process", "img vs 1 proc",
     lambda r: pm(r["images_vs_single_mean"], r["images_vs_single_std"])),
    ("final test error", "error", lambda r: "-" if r["final_accuracy_mean"] is None else
        pm(1 - r["final_accuracy_mean"], r["final_accuracy_std"], "{:.1%}")),
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
           f"({m['processor']}), workers and server share them. Report made at commit {m.get('commit') or 'unknown'}.", ""]
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
            "excluded) to the first evaluation at the target, interpolated between evaluations. A run that "
            "missed the target counts with its whole length (**≥**). Speed-ups are paired by seed against the "
            "1-worker run with the same nsync and factorised: **speed-up = N x hardware efficiency x "
            "statistical efficiency**, hardware efficiency = images/s(N) / (N x images/s(1)) (this machine "
            "and the server), statistical efficiency = images-to-target(1) / images-to-target(N) (the cost "
            "of asynchrony and staleness). **Projected** = N x statistical efficiency: an assumption of N "
            "independent devices and a free server, not a measurement. The last two columns compare with "
            "the single-process trainer with the same seed (from the same pretrained model for warm runs).", ""]
    if result["staleness"] and result["experiment"] in ("staleness", "workers"):
        rows = [[h["group"], str(h["nsync"]), str(h["workers"]), _histogram_text(h["histogram"])]
                for h in result["staleness"]]
        out += ["Staleness histograms (mini-batches applied between a worker's fetch and its push: pushes "
                "per staleness, all seeds):", "", _table(["group", "nsync", "workers", "staleness: pushes"], rows), ""]
    for path in images:
        out += [f"![{Path(path).stem}]({image_prefix}{Path(path).name})", ""]
    return "\n".join(out)


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
    block = f"{begin}\n<!-- generated by `minasgd experiment {name} --docs {doc_path}`; do not edit by hand -->\n\n{text}\n{end}"
    old = doc.read_text() if doc.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    doc.write_text(new)
