"""Test setup: the CUDA backend runs on Numba's CUDA simulator unless a real GPU run is asked for.

`NUMBA_ENABLE_CUDASIM=1` must be set before numba is first imported, so it happens here, at
collection time. Ask for a real GPU with `pytest -m gpu` or `MINASGD_TEST_GPU=1`; then
`gpu`-marked tests run and the simulator stays off.
"""

import os
import sys

import numpy as np
import pytest


def _wants_real_gpu():
    if os.environ.get("MINASGD_TEST_GPU") == "1":
        return True
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == "-m" and i + 1 < len(args) and "gpu" in args[i + 1] and "not gpu" not in args[i + 1]:
            return True
    return False


REAL_GPU = _wants_real_gpu()
if not REAL_GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real NVIDIA GPU (run with `pytest -m gpu`)")
    from minasgd.assignment import TASKS  # one marker per assignment task: its grading tests

    for task in TASKS:
        config.addinivalue_line("markers", f"{task.marker}: grading test of assignment task {task.id} ({task.title})")


def pytest_collection_modifyitems(config, items):
    if REAL_GPU:
        from minasgd.backends import cuda_available

        if cuda_available():
            return
        reason = "no usable NVIDIA GPU found"
    else:
        reason = "real-GPU test: run with `pytest -m gpu` on a machine with an NVIDIA GPU"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BACKENDS = ["numpy", "cuda"]


@pytest.fixture(params=BACKENDS)
def be(request):
    """Each backend in turn (the cuda one on the simulator unless a real GPU run is asked for).

    Both backends are part of the project: one that fails to import is a failure, never a skip.
    """
    from minasgd import backends

    return backends.get(request.param)


SEED = int(os.environ.get("MINASGD_TEST_SEED", "1234"))  # `minasgd assignment grade` draws a fresh one per run


@pytest.fixture
def rng():
    """The tests' random inputs: seed 1234, or MINASGD_TEST_SEED (grading sets it, so no table of outputs passes)."""
    return np.random.default_rng(SEED)
