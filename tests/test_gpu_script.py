"""`.ci/gpu`, the first-GPU-run script, in its dry mode: every stage's plumbing on a CPU, in seconds
(the CUDA simulator for the GPU tests and kernel benchmark, which report "skipped"; the numpy
backend for the training runs), so the script works the first time a GPU is there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "gpu"


def run_script(*args):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    done = run_script("--dry", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["stages"]) == ["env", "pytest", "kernels", "static", "step", "train", "asgd"]
    assert all(s["status"] in ("ok", "skipped") for s in summary["stages"].values())
    for stage in summary["stages"]:
        assert json.loads((tmp_path / f"{stage}.json").read_text())
    assert json.loads((tmp_path / "pytest.json").read_text())["tests"] > 0  # the gpu tests were collected
    asgd = json.loads((tmp_path / "asgd.json").read_text())
    assert [(r["kind"], r["n"]) for r in asgd["runs"]] == [("asgd", 1), ("asgd", 2), ("control", 1), ("control", 2)]
    for row in asgd["runs"]:  # target 0 in the dry run: every run reaches it, so every factor is computed
        assert row["images_per_second"] > 0 and row["speedup"] == pytest.approx(
            row["hardware_efficiency"] * row["statistical_efficiency"])
    md = (tmp_path / "summary.md").read_text()
    assert "| A-SGD, 2 workers |" in md and "DRY" in md


def test_first_failure_stops_the_run_and_keeps_what_finished(tmp_path):
    done = run_script("--dry", tmp_path, "--stages", "env,step,train", "--model", "no-such-model")
    assert done.returncode == 1
    assert "step FAILED" in done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["env"]["status"] == "ok"
    assert summary["stages"]["step"]["status"] == "FAILED" and "no-such-model" in summary["stages"]["step"]["error"]
    assert "train" not in summary["stages"] and not (tmp_path / "train.json").exists()
    assert json.loads((tmp_path / "env.json").read_text())["gpu"].startswith("CUDA simulator")


def test_unknown_stage_is_one_line():
    done = run_script("--dry", "--stages", "env,warp")
    assert done.returncode == 2 and "unknown stages ['warp']" in done.stderr
