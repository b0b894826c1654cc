"""`minasgd experiment claim`: the table comes from the run files alone, and a run made by other
code or another command is never reused."""

import json

import numpy as np
import pytest

from minasgd.experiments import claim


def fake_run(out, kind, seed, accuracy, wall, curve, commit="abc", cmd=None, summary=None):
    run_dir = out / f"{kind}-s{seed}"
    run_dir.mkdir(parents=True)
    cmd = cmd or claim.command(kind, seed, run_dir, [])
    (run_dir / "run.json").write_text(json.dumps({"command": cmd, "kind": kind, "seed": seed, "exit": 0,
                                                  "wall_seconds": wall, "commit": commit, "dirty": False,
                                                  "machine": {"cores": 2, "processor": "x86_64"}}))
    (run_dir / "summary.json").write_text(json.dumps({"test_accuracy": accuracy, **(summary or {})}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "epoch", "images": images, "test_accuracy": acc}) + "\n" for images, acc in curve))
    return run_dir, cmd


def test_the_table_is_computed_from_the_files(tmp_path):
    (tmp_path / "claim.json").write_text(json.dumps({"seeds": 2, "extra_args": ["--epochs", "2"]}))
    fake_run(tmp_path, "one-process", 0, 0.80, 100.0, [(640, 0.5), (1280, 0.8)])
    fake_run(tmp_path, "2-workers", 0, 0.76, 50.0, [(640, 0.25), (1280, 0.76)])
    fake_run(tmp_path, "one-process", 1, 0.90, 120.0, [(640, 0.6), (1280, 0.9)])
    fake_run(tmp_path, "2-workers", 1, 0.90, 80.0, [(640, 0.6), (1280, 0.9)])
    table = claim.claim_table(claim.load_claim(tmp_path))
    assert "| 0 | 80.0% | 100 | 76.0% | 50 | 0.950 | 2.00x | -/-; -/- |" in table
    assert "| 1 | 90.0% | 120 | 90.0% | 80 | 1.000 | 1.50x |" in table
    assert "| mean [95% bootstrap] |" in table and "0.975 [0.950, 1.000]" in table and "1.75 [1.50, 2.00]x" in table
    assert "| ratio | 0.750 | 0.975 |" in table  # (0.5 + 1.0) / 2 at 640 images, (0.95 + 1) / 2 at 1280
    assert "`--epochs 2`" in table


def test_an_unfinished_pair_is_left_out(tmp_path):
    (tmp_path / "claim.json").write_text(json.dumps({"seeds": 2, "extra_args": []}))
    fake_run(tmp_path, "one-process", 0, 0.8, 10.0, [(64, 0.8)])
    fake_run(tmp_path, "2-workers", 0, 0.8, 10.0, [(64, 0.8)])
    fake_run(tmp_path, "one-process", 1, 0.8, 10.0, [(64, 0.8)])  # its 2-workers run never finished
    assert [p["seed"] for p in claim.load_claim(tmp_path)["pairs"]] == [0]


def test_a_run_of_other_code_or_another_command_is_not_reused(tmp_path):
    run_dir, cmd = fake_run(tmp_path, "one-process", 0, 0.8, 10.0, [(64, 0.8)], commit="abc")
    assert claim.finished(run_dir, cmd, "abc") is not None
    assert claim.finished(run_dir, cmd, "def") is None  # another code version
    assert claim.finished(run_dir, cmd + ["--epochs", "1"], "abc") is None  # another command
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "dirty": True}))
    assert claim.finished(run_dir, cmd, "abc") is None  # uncommitted code: no way to say which


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_seeds():
    mean, low, high = claim.bootstrap_mean([0.9, 1.0, 0.95])
    assert low <= mean <= high and mean == pytest.approx(0.95)
    _, low5, high5 = claim.bootstrap_mean(np.tile([0.9, 1.0, 0.95], 5))
    assert high5 - low5 < high - low


def test_the_command_line_passes_its_flags_to_both_commands(tmp_path, monkeypatch):
    from minasgd.cli import main

    seen = {}

    def fake_run_claim(out, seeds, extra_args, worker_args, on_event):
        seen.update(out=out, seeds=seeds, extra=extra_args, workers=worker_args)
        (out / "claim.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "claim.json").write_text(json.dumps({"seeds": seeds, "extra_args": extra_args}))
        return claim.load_claim(out)

    monkeypatch.setattr(claim, "run_claim", fake_run_claim)
    assert main(["experiment", "claim", "--seeds", "2", "--epochs", "3", "--nsync", "4", "--out", str(tmp_path)]) == 0
    assert seen["seeds"] == 2 and seen["extra"] == ["--epochs", "3", "--nsync", "4"]
    assert claim.command("2-workers", 0, "D", seen["extra"]) == [
        "minasgd", "train", "--workers", "2", "--seed", "0", "--epochs", "3", "--nsync", "4", "--out", "D", "--quiet"]


def test_worker_args_reach_only_the_2_worker_command(tmp_path, monkeypatch):
    from minasgd.cli import main

    seen = {}

    def fake_run_claim(out, seeds, extra_args, worker_args, on_event):
        seen.update(extra=extra_args, workers=worker_args)
        out.mkdir(parents=True, exist_ok=True)
        (out / "claim.json").write_text(json.dumps({"seeds": seeds, "extra_args": extra_args,
                                                    "worker_args": worker_args}))
        return claim.load_claim(out)

    monkeypatch.setattr(claim, "run_claim", fake_run_claim)
    assert main(["experiment", "claim", "--epochs", "3", "--worker-args", "--lr-scaling workers --sync",
                 "--out", str(tmp_path)]) == 0
    assert seen["workers"] == ["--lr-scaling", "workers", "--sync"]
    one = claim.command("one-process", 1, "D", seen["extra"], seen["workers"])
    two = claim.command("2-workers", 1, "D", seen["extra"], seen["workers"])
    assert "--sync" not in one and "--lr-scaling" not in one
    assert two[:7] == ["minasgd", "train", "--workers", "2", "--lr-scaling", "workers", "--sync"]
    assert main(["experiment", "claim", "--worker-args=--sync", "--out", str(tmp_path)]) == 0  # a lone flag, as the help says
    assert seen["workers"] == ["--sync"]


def test_the_comparison_has_one_row_per_directory_from_its_files(tmp_path):
    for name, worker_args, (a, b), more in (("plain", [], (0.5, 0.7), []), ("sync", ["--sync"], (0.9, 0.95), ["--nsync", "4"])):
        d = tmp_path / name
        d.mkdir()
        (d / "claim.json").write_text(json.dumps({"seeds": 2, "extra_args": ["--epochs", "2", *more],
                                                  "worker_args": worker_args}))
        for seed, acc in enumerate((a, b)):
            fake_run(d, "one-process", seed, 1.0, 100.0, [(64, 0.5), (128, 1.0)])
            ran = {"nsync": 4, "ps": {"lr_scaling": "average", "sync": True}, "worker_momentum": 0.9,
                   "worker_peak_lr": 0.02} if worker_args else None
            fake_run(d, "2-workers", seed, acc, 50.0, [(64, 0.25), (128, acc)], summary=ran)
    table = claim.compare_table([claim.load_claim(tmp_path / "plain"), claim.load_claim(tmp_path / "sync")])
    rows = [line for line in table.splitlines() if line.startswith("| `minasgd")]
    assert len(rows) == 2
    assert rows[0].startswith("| `minasgd train --workers 2` | - | 2 |") and "0.600 [" in rows[0]
    # how the workers ran comes from their summary.json: the same command under other defaults differs
    assert rows[1].startswith("| `minasgd train --workers 2 --sync` (both: `--nsync 4`) | "
                              "nsync 4, average (sync), m 0.9, lr 0.02 | 2 |") and "0.925 [" in rows[1]
    assert table.startswith("Both commands with the extra arguments `--epochs 2`;")
    assert rows[0].endswith("| 0.50, 0.60 |") and "2.00 [2.00, 2.00]x" in rows[0]


def test_compare_also_tabulates_plain_run_directories(tmp_path, capsys):
    from minasgd.cli import main

    for name, acc, extra in (("a", 0.8, {"worker_momentum": 0.79, "worker_peak_lr": 0.042}), ("b", 0.9, {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({
            "test_accuracy": acc, "workers": 2, "nsync": 1, "config": {"epochs": 6, "seed": 0, "lr": 0.02, "momentum": 0.9},
            "ps": {"lr_scaling": "none", "momentum_scaling": "staleness"}, **extra}))
    table = claim.runs_table([tmp_path / "a", tmp_path / "b"])
    assert "| a | 2 | 1 | none | staleness | m 0.79, lr 0.042 | 6 | 0 | 80.0% |" in table
    assert "| b | 2 | 1 | none | staleness | not recorded (--momentum 0.9, --lr 0.02) | 6 | 0 | 90.0% |" in table
    doc = tmp_path / "paper.md"
    doc.write_text(f"x\n<!-- claim:compare {tmp_path.as_posix()} begin -->\nold\n<!-- claim:compare {tmp_path.as_posix()} end -->\ny\n")
    assert main(["experiment", "claim", "--compare", str(tmp_path), "--docs", str(doc)]) == 0  # a folder of runs
    assert "old" not in doc.read_text() and table in doc.read_text() and doc.read_text().endswith("y\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "claim.json").write_text("{}")
    with pytest.raises(SystemExit, match="not both"):
        main(["experiment", "claim", "--compare", str(tmp_path / "a"), str(tmp_path / "c")])
