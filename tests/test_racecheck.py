"""The race checker (kernels/racecheck.py): every kernel runs clean under it, and it catches the
three classic bugs:

    a scatter without its atomic                   (two threads add into one element: a histogram)
    conv backward-filter without its atomic        (split-K blocks add into one dW element; planted
                                                    into a copy of the real kernel source)
    a slab loop without its second syncthreads     (the next slab overwrites a tile still being read)

and it follows views (`.T`, reshape, ravel, slices), so a race written through one is caught too.
None of these tests depends on how a student words the code of a task: the kernels with bugs
are written here (not one line of a task's answer) or planted outside every task's region.
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

@cuda.jit
def histogram_plain(values, counts):
    """counts[v] += 1 for each value: two threads with the same value collide (a planted bug)."""
    for i in range(cuda.grid(1), values.size, cuda.gridsize(1)):
        counts[values[i]] += 1  # BUG: needs cuda.atomic.add(counts, values[i], 1)


@cuda.jit
def histogram_atomic(values, counts):
    for i in range(cuda.grid(1), values.size, cuda.gridsize(1)):
        cuda.atomic.add(counts, values[i], 1)


def test_catches_a_scatter_without_atomic():
    values = be.asarray(np.array([0, 2, 2, 1], np.int32))  # threads 1 and 2 both add into counts[2]
    msg = race_message(lambda: histogram_plain[1, 4](values, be.asarray(np.zeros(3, np.int32))))
    assert "race in kernel histogram_plain on global counts[2]: " in msg, msg
    assert msg.count("thread (") == 2 and msg.count("block (") == 2


def test_catches_conv_backward_filter_without_atomic(rng):
    bad = planted(conv, "cuda.atomic.add(dw2, (kk, tt), acc)", "dw2[kk, tt] += acc")
    x, dy = dev(rng, 2, 1, 4, 4), dev(rng, 2, 2, 4, 4)
    msg = race_message(lambda: bad.conv2d_backward_filter(dy, x, (2, 1, 3, 3), 1, 1, tile=4, splits=2))
    assert "race in kernel conv2d_backward_filter_tiled on global dw2[" in msg
    assert "in different blocks" in msg


def slab_sums(second_barrier):
    """out[t] = sum over slabs of tile[(t + 1) % 4], the tile refilled from x each slab; without the
    second barrier a thread refills its element while a neighbour may still be reading it."""
    @cuda.jit
    def slab_sum(x, out):
        t = cuda.threadIdx.x
        tile = cuda.shared.array(4, float32)
        total = float32(0)
        for s0 in range(0, x.size, 4):
            tile[t] = x[s0 + t]
            cuda.syncthreads()
            total += tile[(t + 1) % 4]
            if second_barrier:
                cuda.syncthreads()
        out[t] = total

    return slab_sum


def test_catches_a_slab_loop_without_second_syncthreads():
    x = be.asarray(np.arange(12, dtype=np.float32))  # three slabs of four
    msg = race_message(lambda: slab_sums(False)[1, 4](x, be.zeros(4)))
    assert re.search(r"(write-after-read|read-after-write) race in kernel slab_sum on shared tile\[", msg), msg
    assert "with no cuda.syncthreads() between them" in msg
    with racecheck.checking() as races:
        slab_sums(True)[1, 4](x, be.zeros(4))
    races.assert_clean()


@cuda.jit
def scatter_through_views(values, counts, how):
    """The lost update of `histogram_plain`, written through a view of counts."""
    for i in range(cuda.grid(1), values.size, cuda.gridsize(1)):
        v = values[i]
        if how == 0:
            counts.T[v // 3, v % 3] += 1
        elif how == 1:
            counts.reshape(9)[v] += 1
        elif how == 2:
            counts.ravel()[v] += 1
        elif how == 3:
            counts[v // 3:, :][0, v % 3] += 1
        else:
            counts.transpose()[v % 3, v // 3] += 1


@pytest.mark.parametrize("how", [0, 1, 2, 3, 4], ids=["T", "reshape", "ravel", "slice", "transpose"])
def test_races_through_views_are_caught(how):
    values = be.asarray(np.array([4, 7, 7, 1], np.int32))  # threads 1 and 2 both add into one element
    counts = be.asarray(np.zeros((3, 3), np.int32))
    msg = race_message(lambda: scatter_through_views[1, 4](values, counts, how))
    assert "race in kernel scatter_through_views on global counts[" in msg, msg
    assert "block (0, 0, 0) thread (1, 0, 0)" in msg and "thread (2, 0, 0)" in msg, msg


def test_a_view_names_the_element_of_the_view_and_counts_accesses():
    """Atomic adds through a view are no race; the checker counts every access by kernel and array."""
    @cuda.jit
    def add_through_t(values, counts):
        i = cuda.grid(1)
        cuda.atomic.add(counts.T, (values[i] % 3, values[i] // 3), 1)

    values = be.asarray(np.array([4, 7, 7, 1], np.int32))
    with racecheck.checking() as races:
        add_through_t[2, 2](values, be.asarray(np.zeros((3, 3), np.int32)))
    races.assert_clean()
    assert races.count("add_through_t", "global", "atomic", "counts") == 4
    assert races.count("add_through_t", "global", "read", "values") == 8  # each thread reads values[i] twice
    assert races.launches == [("add_through_t", (2, 1, 1), (2, 1, 1))]


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
