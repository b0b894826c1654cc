"""The race checker (kernels/racecheck.py): every kernel runs clean under it, and it catches the
three classic bugs, planted into copies of the real kernel source:

    max-pool backward scatter without its atomic   (overlapping windows add into one pixel)
    conv backward-filter without its atomic        (split-K blocks add into one dW element)
    tiled GEMM without its second syncthreads      (the next slab overwrites a tile still being read)
"""

import inspect
import linecache
import re
import sys
import types

import numpy as np
import pytest
from numba import cuda, float32

from kernel_workload import KERNEL_MODULES, dev, every_kernel, kernel_names
from minasgd.backends import cuda_backend as be
from minasgd.kernels import conv, gemm, pool, racecheck


def planted(module, old, new):
    """A copy of `module` whose source has `old` replaced by `new` (the planted bug)."""
    src = inspect.getsource(module)
    assert src.count(old) == 1, f"the line to plant the bug in is gone from {module.__name__}: {old!r}"
    name = module.__name__ + "_planted"
    path = f"<planted {module.__name__}>"
    src = src.replace(old, new)
    linecache.cache[path] = (len(src), None, src.splitlines(True), path)  # so shared arrays get names
    mod = types.ModuleType(name)
    mod.__package__ = module.__package__
    mod.__file__ = path
    sys.modules[name] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def race_message(fn):
    with racecheck.checking() as races:
        fn()
    with pytest.raises(racecheck.RaceError) as err:
        races.assert_clean()
    return str(err.value)


# ---------------------------------------------------------------- every kernel runs clean

def test_every_kernel_runs_clean(rng):
    """A tiny training step through the backend, plus every other kernel version, under the checker."""
    with racecheck.checking() as races:
        every_kernel(rng, tile=4)
    races.assert_clean()
    missing = kernel_names(KERNEL_MODULES) - set(races.launched)
    assert not missing, f"kernels never run under the race checker: {sorted(missing)}"


# ---------------------------------------------------------------- the planted bugs are caught

def test_catches_pool_backward_without_atomic(rng):
    bad = planted(pool, "cuda.atomic.add(dx, (n, c, at // w_, at % w_), dy[n, c, p, q])",
                  "dx[n, c, at // w_, at % w_] += dy[n, c, p, q]")
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 2, 2] = 1  # the max of all four overlapping 3x3 windows
    y, am = pool.maxpool2d_forward(be.asarray(x))
    msg = race_message(lambda: bad.maxpool2d_backward(y, am, x.shape))
    assert "race in kernel maxpool2d_backward_scatter_kernel on global dx[0, 0, 2, 2]: " in msg, msg
    assert msg.count("thread (") == 2 and msg.count("block (") == 2


def test_catches_conv_backward_filter_without_atomic(rng):
    bad = planted(conv, "cuda.atomic.add(dw2, (kk, tt), acc)", "dw2[kk, tt] += acc")
    x, dy = dev(rng, 2, 1, 4, 4), dev(rng, 2, 2, 4, 4)
    msg = race_message(lambda: bad.conv2d_backward_filter(dy, x, (2, 1, 3, 3), 1, 1, tile=4, splits=2))
    assert "race in kernel conv2d_backward_filter_tiled on global dw2[" in msg
    assert "in different blocks" in msg


def test_catches_tiled_gemm_without_second_syncthreads(rng):
    bad = planted(gemm, "cuda.syncthreads()  # everyone is done reading", "pass  # everyone is done reading")
    a, b = dev(rng, 4, 12), dev(rng, 12, 4)  # three K-slabs of a 4 x 4 tile
    msg = race_message(lambda: bad.gemm(a, b, tile=4))
    assert re.search(r"race in kernel gemm_tiled on shared s[ab]\[\d+, \d+\]", msg), msg
    assert "with no cuda.syncthreads() between them" in msg


def test_the_real_kernels_pass_where_the_planted_ones_fail(rng):
    """The same launches as above, on the real kernels: clean (so the plants are what fails)."""
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 2, 2] = 1
    y, am = pool.maxpool2d_forward(be.asarray(x))
    with racecheck.checking() as races:
        pool.maxpool2d_backward(y, am, x.shape)
        conv.conv2d_backward_filter(dev(rng, 2, 2, 4, 4), dev(rng, 2, 1, 4, 4), (2, 1, 3, 3), 1, 1, tile=4, splits=2)
        gemm.gemm(dev(rng, 4, 12), dev(rng, 12, 4), tile=4)
    races.assert_clean()


@cuda.jit
def shift_left(x, y):
    """y[t] = x[t + 1] through shared memory, with the barrier missing (a planted bug)."""
    t = cuda.threadIdx.x
    tile = cuda.shared.array(8, float32)
    tile[t] = x[t]
    y[t] = tile[(t + 1) % 8]  # BUG: needs cuda.syncthreads() before this read


def test_missing_barrier_read_after_write_in_shared_memory():
    """A thread reads a shared element its neighbour wrote, with no syncthreads between."""
    x = be.asarray(np.arange(8, dtype=np.float32))
    msg = race_message(lambda: shift_left[1, 8](x, be.zeros(8)))
    assert "race in kernel shift_left on shared tile[" in msg
