"""kernels/simulator.py: the simulator's block loop that yields the GIL is in use, and it keeps
the simulator's meaning: barriers release a block only when all of its threads reached them,
and an exception in one thread stops the launch, naming the thread."""

import numpy as np
import pytest
from numba import config, cuda, float32

from minasgd.kernels import common, simulator  # noqa: F401 - common installs the loop

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="the simulator's block loop")


def test_the_yielding_block_loop_is_in_use():
    from numba.cuda.simulator import kernel

    assert kernel.BlockManager.run is simulator.run_block
    assert simulator.install()  # installing again changes nothing


@cuda.jit
def rotate_twice(x, out):
    """Each round every thread reads its right neighbour's value, after a barrier; wrong if a
    thread ran past a barrier before all of its block reached it."""
    t = cuda.threadIdx.x
    tile = cuda.shared.array(16, float32)
    tile[t] = x[cuda.blockIdx.x * 16 + t]
    for _ in range(2):
        cuda.syncthreads()
        v = tile[(t + 1) % 16]
        cuda.syncthreads()
        tile[t] = v
    out[cuda.blockIdx.x * 16 + t] = tile[t]


def test_barriers_hold_every_thread_of_the_block():
    x = np.arange(48, dtype=np.float32)
    out = cuda.device_array(48, np.float32)
    rotate_twice[3, 16](cuda.to_device(x), out)
    np.testing.assert_array_equal(out.copy_to_host(), np.roll(x.reshape(3, 16), -2, axis=1).ravel())


@cuda.jit
def fails_in_thread_5(x):
    t = cuda.threadIdx.x
    cuda.syncthreads()
    if t == 5:
        x[100] = 1  # out of bounds
    x[t] = t


def test_an_exception_in_one_thread_stops_the_launch_and_names_it():
    with pytest.raises(IndexError, match=r"tid=\[5, 0, 0\] ctaid=\[0, 0, 0\]"):
        fails_in_thread_5[1, 8](cuda.device_array(8, np.float32))
