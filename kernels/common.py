"""What every kernel module shares: the simulator switch, launch sizes and output buffers.

Most kernels here loop with a *grid stride*: thread `i` handles elements i, i + G, i + 2G, ...
where G is the number of threads in the grid. Any grid then covers any size, so launchers can
pick a modest grid: on a GPU enough blocks to fill the chip, on the CUDA simulator (which runs
every thread in Python) just two small blocks.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numba import config, cuda, types

SIM = bool(config.ENABLE_CUDASIM)

# 1-D launches: threads per block and a cap on the blocks (grid-stride loops do the rest).
THREADS = 32 if SIM else 256
MAX_BLOCKS = 2 if SIM else 2048

if SIM:
    # The simulator computes uint32 hashes with NumPy scalars, which warn when they wrap (on purpose).
    warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
    from . import simulator

    simulator.install()  # the simulator's block loop yields the GIL instead of spinning (1.5-8x less CPU)


def bounded(threads):
    """cuda.jit options promising the compiler at most `threads` threads per block (CUDA's
    __launch_bounds__), so it keeps registers x threads within the 65,536-register file: a 32 x 32
    tile is 1,024 threads, which allows at most 64 registers each. (The simulator takes no such option.)
    """
    return {} if SIM else {"launch_bounds": threads}


# Tile sizes (a tile x tile thread block) of the tiled kernels that the code and the benchmarks use.
TILES = (8, 16, 32)


@dataclass(frozen=True)
class Signature:
    """One way a launcher launches a kernel: the offline compile check (tests/test_compile_kernels.py)
    compiles every one of these for real GPUs, and `minasgd bench kernels --static` reports them.
    A test on the simulator checks that the launchers pass exactly these argument types.
    """

    name: str  # row label: the kernel's name, plus the tile for a tiled kernel
    version: str  # "v1 naive", "v2 tiled", ...
    kernel: object  # the cuda.jit dispatcher
    argtypes: tuple  # numba types, as the launcher passes them
    threads: int  # threads per block the launcher uses on a GPU


# Argument types as launchers pass them: C-contiguous float32 arrays (1-D to 4-D), int32 arrays,
# Python ints (int64 in numba), NumPy float32 / uint32 scalars and bools.
F1, F2, F3, F4 = (types.float32[::1], types.float32[:, ::1], types.float32[:, :, ::1], types.float32[:, :, :, ::1])
I1, I4 = types.int32[::1], types.int32[:, :, :, ::1]
INT, F32, U32, BOOL = types.int64, types.float32, types.uint32, types.boolean


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


# ---------------------------------------------------------------- fill: every family zeroes outputs with it

@cuda.jit(cache=True)
def fill_kernel(x, value):
    """x[i] = value for every i (x flat). Thread t handles t, t + G, t + 2G, ..."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.size, stride):
        x[i] = value


def launch_fill(x, value):
    blocks, threads = grid_1d(x.size)
    fill_kernel[blocks, threads](flat(x), x.dtype.type(value))


def fill(x, value):
    """x[...] = value, in place (device_array memory starts uninitialised)."""
    if x.size:
        launch_fill(x, value)
    return x


def signatures():
    """What the launcher above passes (see `Signature`)."""
    return [Signature("fill_kernel", "v1", fill_kernel, (F1, F32), THREADS)]
