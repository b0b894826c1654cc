"""What every kernel module shares: the simulator switch, launch sizes and output buffers.

Most kernels here loop with a *grid stride*: thread `i` handles elements i, i + G, i + 2G, ...
where G is the number of threads in the grid. Any grid then covers any size, so launchers can
pick a modest grid: on a GPU enough blocks to fill the chip, on the CUDA simulator (which runs
every thread as a Python thread, ~0.2 ms each) just two small blocks.
"""

import math
import warnings

import numpy as np
from numba import config, cuda

SIM = bool(config.ENABLE_CUDASIM)

# 1-D launches: threads per block and a cap on the blocks (grid-stride loops do the rest).
THREADS = 32 if SIM else 256
MAX_BLOCKS = 2 if SIM else 2048

if SIM:
    # The simulator computes uint32 hashes with NumPy scalars, which warn when they wrap (on purpose).
    warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)


def grid_1d(n, threads=THREADS):
    """(blocks, threads) for a grid-stride loop over n elements."""
    return max(1, min(math.ceil(n / threads), MAX_BLOCKS)), threads


def ceil_div(a, b):
    return -(-a // b)


def output(shape, dtype, out=None, what="out"):
    """`out` when given (checked), else a fresh uninitialised device array of that shape."""
    shape = tuple(int(s) for s in shape)
    if out is None:
        return cuda.device_array(shape, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != np.dtype(dtype):
        raise ValueError(f"{what} must be {np.dtype(dtype).name} {shape}, got {out.dtype} {tuple(out.shape)}")
    return out


def flat(a):
    """A 1-D view of a C-contiguous device array (for elementwise kernels)."""
    return a.reshape(a.size)


def is_device_array(a):
    """True for a numba device array (`cuda.is_cuda_array` is missing from the simulator)."""
    return cuda.devicearray.is_cuda_ndarray(a)
