"""Each backend says which one it is: `be.NAME` is the name `backends.get` takes for it, so
summary.json, a worker's HELLO and the benchmarks tell the reference from the fast path."""

import os
import subprocess
import sys

import pytest

from minasgd import backends


@pytest.mark.parametrize("name", ["numpy", "numpy-reference"])
def test_a_backend_is_named_by_what_gets_it(name):
    assert backends.get(name).NAME == name


def test_the_two_numpy_backends_have_distinct_names_and_devices():
    fast, ref = backends.get("numpy"), backends.get("numpy-reference")
    assert fast is not ref and fast.NAME != ref.NAME and fast.DEVICE != ref.DEVICE


def test_no_dead_name_lists():
    assert not hasattr(backends, "NAMES")  # a list of backend names nobody read, missing two of them


@pytest.mark.parametrize("simulator", ["1", "0"])
def test_auto_without_a_gpu_does_not_import_numba_cuda(simulator):
    """`auto` (minasgd train's default) asks whether a GPU is there: with the simulator on, or no
    CUDA driver library on the machine, the answer comes without importing numba.cuda (0.6-1 s of
    CPU in every process that trains on a CPU)."""
    from minasgd import backends

    if simulator == "0" and backends._driver_library_found():
        pytest.skip("this machine has a CUDA driver library: numba.cuda decides")
    code = "import sys; from minasgd import backends; b = backends.get('auto'); print(b.NAME, 'numba.cuda' in sys.modules)"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM=simulator)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["numpy", "False"], done.stdout
