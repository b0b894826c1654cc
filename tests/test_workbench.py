"""The kernel workbenches (`python -m minasgd.kernels.<op>`): every version of every op is
validated against the NumPy reference, at the shapes of a model (micro on the simulator)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from minasgd import workbench
from minasgd.kernels import pool

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.mark.parametrize("op", workbench.OPS)
def test_every_version_matches_the_reference(op):
    lines = []
    result = workbench.run(op, validate_only=True, model="micro", batch=1, tiles=(4,), out=lines.append)
    assert result["mismatches"] == [], "\n".join(lines)
    assert "All results match." in lines and result["timings"] == []


def test_shapes_come_from_the_model():
    net = workbench.layer_shapes("alexnet-mini", 128)
    assert [(L["x"], L["w"]) for L in net["conv"]][1] == ((128, 32, 15, 15), (64, 32, 5, 5))
    assert net["num_params"] == 425_290 and net["classes"] == 10


def test_a_broken_version_is_reported_with_indices(monkeypatch):
    # plant a bug: the gather kernel launcher does nothing, so its NaN-filled output stays NaN
    monkeypatch.setattr(pool, "launch_backward_gather", lambda *a: None)
    lines = []
    result = workbench.run("pool", validate_only=True, model="micro", batch=1, out=lines.append)
    assert [label for label, _ in result["mismatches"]] == ["pool1 backward v2 gather (deterministic)"]
    assert "first (0, 0, 0, 0): nan" in result["mismatches"][0][1]


def test_first_mismatches_names_indices():
    expect = np.zeros((2, 3), np.float32)
    got = expect.copy()
    got[1, 2] = 5.0
    assert workbench.first_mismatches(got, expect, 1e-5, 1e-5) == "1 of 6 differ; first (1, 2): 5 vs 0"
    assert workbench.first_mismatches(expect, expect, 0, 0) is None


def test_python_dash_m_runs_the_workbench():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "minasgd.kernels.softmax"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "All results match." in done.stdout
    # then, on the simulator, the memory profile of the version it just validated (kernels/memprofile.py)
    assert "modelled (CUDA simulator, not measured)" in done.stdout and "softmax_xent_kernel" in done.stdout
