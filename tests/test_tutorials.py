"""Every tutorial runs start to finish (fast settings, CUDA simulator), so none can rot.

Each runs as a subprocess, `python tutorials/0N_....py`, from an empty folder, with
MINASGD_TUTORIAL_FAST=1 and its figures going to a temporary folder. Tutorials 6 and 7 train
through `minasgd train`, which caches its (small) shapes set in MINASGD_DATA: one folder for the
whole session, so it is drawn once.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
FIGURES = {
    "01_threads_blocks_grids.py": ["01_blocks.png"],
    "02_convolution_three_ways.py": ["02_filters.png"],
    "03_shared_memory_tiling.py": ["03_tiling.png"],
    "04_pool_dropout_softmax.py": ["04_ops.png"],
    "05_the_whole_net.py": ["05_learning_curve.png", "05_predictions.png"],
    "06_data_parallelism.py": ["06_staleness.png"],
    "07_reproducing_the_paper.py": ["07_warm_start.png"],
    "08_memory_coalescing.py": ["08_coalescing.png"],
    "09_block_reduction.py": ["09_reduction.png"],
    "10_occupancy_and_bank_conflicts.py": ["10_occupancy_banks.png"],
}
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_every_tutorial_is_listed_here_and_in_the_index():
    found = sorted(p.name for p in TUTORIALS.glob("[0-9][0-9]_*.py"))
    assert found == sorted(FIGURES)
    index = (TUTORIALS / "README.md").read_text()
    readme = (TUTORIALS.parent / "README.md").read_text()
    for name in found:
        assert name in index and f"tutorials/{name}" in readme, name


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tutorial-data")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_runs(name, tmp_path, data_root):
    out = tmp_path / "out"
    env = dict(os.environ, MINASGD_TUTORIAL_FAST="1", MINASGD_TUTORIAL_OUT=str(out), MINASGD_DATA=str(data_root),
               NUMBA_ENABLE_CUDASIM="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(TUTORIALS / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    number = int(name[:2])
    assert f"tutorial {number} done" in proc.stdout
    assert "Traceback" not in proc.stderr
    if HAVE_MATPLOTLIB:
        for figure in FIGURES[name]:
            assert (out / figure).is_file() and (out / figure).stat().st_size > 1000, figure
    else:
        assert "matplotlib is not installed" in proc.stdout
