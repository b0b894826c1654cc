"""`minasgd experiment NAME`: each sweep in --quick mode (the `micro` net on 256 shapes images,
one seed, seconds per run), the tables and plots it writes, resuming, and the numbers behind
the speed-up table on hand-made curves."""

import csv
import json

import pytest

from minasgd.cli import main
from minasgd.experiments import analysis, default_settings, plan, report

RUN_COLUMNS = {"name", "group", "mode", "workers", "nsync", "lr_scaling", "seed", "final_accuracy", "final_error",
               "reached", "seconds_to_target", "images_to_target", "updates_to_target", "measured_speedup",
               "hardware_efficiency", "statistical_efficiency", "projected_speedup", "speedup_vs_single",
               "images_vs_single", "images_per_second", "mean_staleness", "max_staleness", "target_error"}
SUMMARY_COLUMNS = {"group", "mode", "nsync", "workers", "seeds", "reached", "measured_speedup_mean",
                   "measured_speedup_std", "projected_speedup_mean", "projected_speedup_std",
                   "hardware_efficiency_mean", "statistical_efficiency_mean", "speedup_vs_single_mean",
                   "images_to_target_mean", "images_to_target_censored", "updates_to_target_mean",
                   "seconds_to_target_mean", "final_accuracy_mean"}
# Small enough for seconds per sweep; warmstart's pretraining also runs.
QUICK_ARGS = {"workers": ["--workers", "1,2", "--nsync", "2"], "warmstart": ["--workers", "2"],
              "sync-vs-async": ["--workers", "2"], "staleness": []}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(QUICK_ARGS))
def test_quick_sweep_writes_tables_plots_and_report(tmp_path, data_root, name):
    out = tmp_path / name
    assert main(["experiment", name, "--quick", "--out", str(out), "--data-root", data_root, *QUICK_ARGS[name]]) == 0
    runs, summary = _csv(out / "results.csv"), _csv(out / "summary.csv")
    assert RUN_COLUMNS <= set(runs[0]) and SUMMARY_COLUMNS <= set(summary[0])
    expected = [s for s in plan(_settings(name, data_root)) if s["mode"] != "pretrain"]
    assert sorted(r["name"] for r in runs) == sorted(s["name"] for s in expected)
    assert {r["name"] for r in runs if r["workers"] == "0"} >= {"single-s0"}  # the one-process baseline
    result = json.loads((out / "results.json").read_text())
    assert set(result) >= {"settings", "runs", "summary", "staleness", "curves", "machine", "pretrain"}
    assert all(result["curves"][r["name"]] for r in runs)  # every run was evaluated at least once
    assert "| speed-up vs 1 worker [95%] | = N x hardware eff. | x statistical eff. |" in (out / "report.md").read_text()
    if name == "warmstart":
        assert len(result["pretrain"]) == 1 and (out / "pretrain-s0" / "model.npz").exists()
        assert {r["group"] for r in runs} == {"single", "single-warm", "cold", "warm", "warm-mnone"}
        assert all(r["init"] for r in runs if r["group"] in ("warm", "warm-mnone", "single-warm"))
    if name == "staleness":
        assert {r["lr_scaling"] for r in runs if r["workers"] != "0"} == {"none", "staleness"} and result["staleness"]
    if name == "sync-vs-async":
        assert {(r["mode"], r["workers"]) for r in runs} == {("single", "0"), ("async", "2"), ("sync", "2")}
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").stat().st_size > 1000


def _settings(name, data_root):
    s = default_settings(name, quick=True)
    if name == "workers":
        s.workers, s.nsync = [1, 2], [2]
    elif name in ("warmstart", "sync-vs-async"):
        s.workers = [2]
    s.data_root = data_root
    return s


def test_a_finished_sweep_is_skipped_and_the_docs_get_the_report(tmp_path, data_root, capsys, monkeypatch):
    from minasgd.experiments import runner

    code = {"commit": "abc123", "dirty": False}
    monkeypatch.setattr(runner, "_code", lambda: dict(code))  # as in a clean checkout
    out, doc = tmp_path / "w", tmp_path / "docs" / "paper.md"
    args = ["experiment", "workers", "--quick", "--out", str(out), "--data-root", data_root, "--workers", "2",
            "--nsync", "1"]
    assert main(args) == 0
    first = (out / "cold-ns1-w2-s0" / "summary.json").stat().st_mtime_ns
    doc.parent.mkdir()
    doc.write_text("# Paper\n\n<!-- experiment:workers begin -->\nSTALE TEXT\n<!-- experiment:workers end -->\n\nafter\n")
    capsys.readouterr()
    assert main(args + ["--docs", str(doc)]) == 0
    assert "done before, skipped" in capsys.readouterr().out
    assert (out / "cold-ns1-w2-s0" / "summary.json").stat().st_mtime_ns == first
    text = doc.read_text()
    assert "STALE TEXT" not in text and text.count("<!-- experiment:workers begin -->") == 1 and text.endswith("after\n")
    assert "minasgd experiment workers" in text
    # A changed setting is a different run: it runs again (the same clean code made the last one).
    assert main(args + ["--lr", "0.04"]) == 0
    assert (out / "cold-ns1-w2-s0" / "summary.json").stat().st_mtime_ns != first
    # Other code (uncommitted changes, then a new commit) makes a different run: it runs again.
    for changed in ({"commit": "abc123", "dirty": True}, {"commit": "def456", "dirty": False}):
        code.update(changed)
        capsys.readouterr()
        assert main(args + ["--lr", "0.04"]) == 0
        assert "done before, skipped" not in capsys.readouterr().out

    # --report runs nothing, even for runs made by other code, and says which code made them;
    # the docs name the command that regenerates the report from the files.
    code.update(commit="new999")
    stamp = (out / "cold-ns1-w2-s0" / "summary.json").stat().st_mtime_ns
    assert main(args + ["--lr", "0.04", "--report", "--docs", str(doc)]) == 0
    assert (out / "cold-ns1-w2-s0" / "summary.json").stat().st_mtime_ns == stamp
    assert "Runs made by code def456; report made at commit" in (out / "report.md").read_text()
    regenerate = doc.read_text().split("<!-- generated by `")[1].split("`")[0].split()
    assert regenerate[:2] == ["minasgd", "experiment"] and "--report" in regenerate
    before = doc.read_text()
    doc.write_text(before.replace("0.04", "STALE"))
    assert main(regenerate[1:]) == 0  # the named command makes the same report again, running nothing
    assert doc.read_text() == before
    assert (out / "cold-ns1-w2-s0" / "summary.json").stat().st_mtime_ns == stamp


def test_plans_match_the_issue():
    workers = plan(default_settings("workers"))
    assert len(workers) == 3 + 4 * 4 * 3 and len({s["name"] for s in workers}) == len(workers)
    assert {(s["workers"], s["nsync"]) for s in workers if s["workers"]} == {
        (w, k) for w in (1, 2, 4, 8) for k in (1, 4, 16, 300)}  # up to the paper's nsync
    for name in ("workers", "warmstart", "sync-vs-async", "staleness"):  # every sweep has the baseline
        assert {s["name"] for s in plan(default_settings(name))} >= {"single-s0", "single-s1", "single-s2"}
    warm = plan(default_settings("warmstart"))
    assert [s["name"] for s in warm[:3]] == ["pretrain-s0", "pretrain-s1", "pretrain-s2"]
    assert all(s["init"] == f"pretrain-s{s['seed']}" for s in warm if s["group"] in ("warm", "single-warm"))
    assert not any(s["sync"] and s["workers"] == 1 for s in plan(default_settings("sync-vs-async")))
    assert {s["lr_scaling"] for s in plan(default_settings("staleness")) if s["workers"]} == {"none", "staleness"}


def test_reach_interpolates_between_evaluations():
    curve = [{"time": 10.0, "images": 1000, "updates": 10, "accuracy": 0.1},
             {"time": 20.0, "images": 2000, "updates": 20, "accuracy": 0.3}]
    hit = analysis.reach(curve, 0.2)
    assert hit == pytest.approx({"time": 15.0, "images": 1500, "updates": 15})
    assert analysis.reach(curve, 0.05) == {"time": 10.0, "images": 1000, "updates": 10}
    assert analysis.reach(curve, 0.5) is None


def _row(workers, seed, seconds, images, group="cold", ips=100.0):
    reached = seconds is not None
    return {"group": group, "mode": "single" if workers == 0 else "async", "lr_scaling": "none", "nsync": 4,
            "workers": workers, "seed": seed, "init": "", "reached": reached, "seconds_to_target": seconds,
            "images_to_target": images, "updates_to_target": None if images is None else images / 32,
            "final_accuracy": 0.3, "images_per_second": ips, "mean_staleness": 0.0, "target_accuracy": 0.2,
            "wall_seconds": 500.0, "images": 5000, "updates": 5000 / 32}


def test_speedups_are_paired_by_seed_factorised_and_censored():
    rows = [_row(1, 0, 100.0, 1000, ips=10.0), _row(1, 1, 120.0, 1200, ips=10.0), _row(4, 0, 50.0, 2000, ips=40.0),
            _row(4, 1, 40.0, 1200, ips=30.0), _row(8, 0, None, None), _row(8, 1, 30.0, 2400),
            _row(0, 0, 80.0, 800, group="single"), _row(0, 1, 90.0, 900, group="single")]
    analysis.add_speedups(rows)
    assert [r["measured_speedup"] for r in rows[2:4]] == [2.0, 3.0]
    assert [r["statistical_efficiency"] for r in rows[2:4]] == [0.5, 1.0]  # images(1) / images(N)
    assert [r["hardware_efficiency"] for r in rows[2:4]] == [1.0, 0.75]  # ips(N) / (N x ips(1))
    for r in rows[2:4]:  # speed-up = N x hardware x statistical efficiency
        assert r["measured_speedup"] == pytest.approx(r["workers"] * r["hardware_efficiency"] * r["statistical_efficiency"])
    assert [r["projected_speedup"] for r in rows[2:4]] == [2.0, 4.0]  # N x images(1) / images(N)
    assert rows[2]["speedup_vs_single"] == 80.0 / 50.0 and rows[2]["images_vs_single"] == 800 / 2000
    assert rows[4]["measured_speedup"] is None and rows[5]["projected_speedup"] == 4.0
    table = {r["workers"]: r for r in analysis.summarize(rows)}
    assert table[4]["measured_speedup_mean"] == 2.5 and table[4]["measured_speedup_std"] == pytest.approx(0.7071, 1e-3)
    assert table[8]["reached"] == 1 and table[8]["seeds"] == 2 and table[1]["measured_speedup_mean"] == 1.0
    # the seed that missed the target is not dropped: it counts with its whole length, marked "≥"
    assert table[8]["seconds_to_target_censored"] == 1 and table[8]["seconds_to_target_mean"] == (500.0 + 30.0) / 2
    cells = report.summary_cells(analysis.summarize(rows))
    # medians over seeds: 4 workers 45 s against 110 s for 1 worker; 8 workers: one seed missed
    assert cells[1][5] == "45.0" and cells[1][8].startswith("2.44 [") and cells[2][5] == "> run"
    assert cells[3][3] == "1 process"


def test_a_missed_target_is_never_dropped_from_the_speed_up():
    """Survivorship bias: pairing only the seeds that reached the target would report 4 workers
    as fast as their one lucky seed. The median counts the misses as never reached."""
    rows = [_row(1, s, 100.0, 1000) for s in range(3)]
    rows += [_row(4, 0, 20.0, 1000, ips=50.0), _row(4, 1, None, None), _row(4, 2, None, None)]
    table = {r["workers"]: r for r in analysis.summarize(analysis.add_speedups(rows))}
    assert table[4]["measured_speedup_mean"] == 5.0  # the survivors-only number, kept per run in runs.csv
    assert table[4]["seconds_to_target_median"] == float("inf")
    assert table[4]["speedup"] == 0.0  # by the median, 4 workers never got there
    rows[4] = _row(4, 1, 50.0, 1000)  # two of three reached it: the median is the slower of them
    table = {r["workers"]: r for r in analysis.summarize(analysis.add_speedups(rows))}
    assert table[4]["seconds_to_target_median"] == 50.0 and table[4]["speedup"] == 2.0
    assert table[4]["speedup_low"] == 0.0 and table[4]["speedup_high"] == 5.0  # resampled seeds
    assert table[4]["projected"] == pytest.approx(4 * table[4]["stat_eff"])
    assert table[4]["speedup"] == pytest.approx(4 * table[4]["hw_eff"] * table[4]["stat_eff"])


def test_the_factorisation_closes_when_the_whole_run_is_faster_than_the_way_to_target():
    """Hardware efficiency is measured over the same stretch as the speed-up: a run whose
    images/s over the whole run differ from its rate up to the target still factorises exactly."""
    rows = [_row(1, 0, 100.0, 1000, ips=25.0), _row(2, 0, 40.0, 1200, ips=90.0)]  # to target: 10/s and 30/s
    analysis.add_speedups(rows)
    two = rows[1]
    assert two["hardware_efficiency"] == pytest.approx(30.0 / (2 * 10.0))
    assert two["measured_speedup"] == pytest.approx(two["workers"] * two["hardware_efficiency"] * two["statistical_efficiency"])


def test_final_errors_are_means_with_bootstrap_intervals_not_standard_deviations():
    """Three seeds' spread is no confidence interval: both final errors are given as a mean and
    its 95% bootstrap interval; one seed gives the mean alone; a run without a training
    evaluation gives '-'."""
    rows = [_row(1, s, 100.0, 1000) for s in range(3)]
    for r, train_error in zip(rows, (0.10, 0.20, 0.30)):
        r["final_train_error"] = train_error
    headers = [h for h, _, _ in report.SUMMARY_COLUMNS]
    test_col, train_col = headers.index("final test error [95%]"), headers.index("final training error [95%]")
    cells = report.summary_cells(analysis.summarize(analysis.add_speedups(rows)))[0]
    assert cells[train_col].startswith("20.0% [") and "±" not in cells[train_col]
    low, high = (float(x.rstrip("%")) for x in cells[train_col].split("[")[1].rstrip("]").split(", "))
    assert 10.0 <= low < 20.0 < high <= 30.0
    assert cells[test_col] == "70.0% [70.0%, 70.0%]"  # every seed at 30% accuracy
    one = report.summary_cells(analysis.summarize(analysis.add_speedups(rows[:1])))[0]
    assert one[train_col] == "10.0%"
    rows[0]["final_train_error"] = None
    assert report.summary_cells(analysis.summarize(analysis.add_speedups(rows[:1])))[0][train_col] == "-"
