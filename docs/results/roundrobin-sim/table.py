"""The simulation's results as a markdown table: one row per setting (in grid order), the mean
final test accuracy over its seeds, and the seeds' own. `python docs/results/roundrobin-sim/table.py`"""
import json
import pathlib

DEFAULTS = {"N": 2, "k": 4, "mw": 0.9, "lrf": 1.0, "sync": 0, "ahead": 0.0, "mserver": 0, "lr": 0.02,
            "warm": 100, "wlr": 1.0, "bs": 64, "epochs": 3}
here = pathlib.Path(__file__).parent
runs = [json.loads(line) for line in (here / "results.jsonl").read_text().splitlines() if line.strip()]
rows = {}
for run in runs:
    setting = tuple((k, run.get(k, v)) for k, v in DEFAULTS.items())
    rows.setdefault(setting, []).append(run)


def describe(setting):
    s = dict(setting)
    if s["N"] == 1:
        return f"one process (lr x {s['lrf']:g}, batch {s['bs']}{', warm-up ' + str(s['warm']) if s['warm'] != 100 else ''})"
    parts = [f"{s['N']} workers, nsync {s['k']}", "sync" if s["sync"] else "async"]
    parts.append("momentum 0.9 on the server" if s["mserver"] else f"worker momentum {s['mw']:g}")
    if s["lrf"] != 1.0:
        parts.append(f"worker lr x {s['lrf']:g}")
    if s["ahead"]:
        parts.append("look-ahead fetch")
    parts.append("server applies 1/N (average)" if s["wlr"] == 1 / s["N"] else
                 "server applies the sum" if s["wlr"] == 1.0 else f"server applies x {s['wlr']:g}")
    return ", ".join(parts)


print("| setting | epochs | mean final test accuracy | seeds 0, 1, 2 |")
print("| --- | --- | --- | --- |")
for setting, rs in rows.items():
    rs.sort(key=lambda r: r["seed"])
    accs = [r["acc"] for r in rs]
    print(f"| {describe(setting)} | {dict(setting)['epochs']} | {sum(accs) / len(accs):.1%} | "
          f"{', '.join(f'{a:.1%}' for a in accs)} |")
