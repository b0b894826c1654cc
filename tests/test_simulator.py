"""kernels/simulator.py: its block loop is in use, and in each of its three ways to run a block
(in order, in steps, together) it keeps the simulator's meaning: each thread sees its own
indices, barriers release a block only when all of its threads reached them, and an exception
in one thread stops the launch, naming the thread."""

import types

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


@cuda.jit(device=True)
def wait_for_the_block():
    cuda.syncthreads()


@cuda.jit
def rotate_twice_waiting_in_a_device_function(x, out):
    """rotate_twice, its barriers in a device function: run together, one Python thread per CUDA thread."""
    t = cuda.threadIdx.x
    tile = cuda.shared.array(16, float32)
    tile[t] = x[cuda.blockIdx.x * 16 + t]
    for _ in range(2):
        wait_for_the_block()
        v = tile[(t + 1) % 16]
        wait_for_the_block()
        tile[t] = v
    out[cuda.blockIdx.x * 16 + t] = tile[t]


@pytest.mark.parametrize("rotate, in_steps", [(rotate_twice, True), (rotate_twice_waiting_in_a_device_function, False)])
def test_barriers_hold_every_thread_of_the_block(rotate, in_steps):
    assert (simulator.stepped_kernel(rotate.py_func) is not None) == in_steps
    x = np.arange(48, dtype=np.float32)
    out = cuda.to_device(np.full(48, np.nan, np.float32))
    rotate[3, 16](cuda.to_device(x), out)
    np.testing.assert_array_equal(out.copy_to_host(), np.roll(x.reshape(3, 16), -2, axis=1).ravel())


@cuda.jit
def fails_in_thread_5(x):
    t = cuda.threadIdx.x
    cuda.syncthreads()
    if t == 5:
        x[100] = 1  # out of bounds
    x[t] = t


@cuda.jit
def fails_in_thread_5_after_a_device_barrier(x):
    t = cuda.threadIdx.x
    wait_for_the_block()
    if t == 5:
        x[100] = 1  # out of bounds
    x[t] = t


@pytest.mark.parametrize("kernel", [fails_in_thread_5, fails_in_thread_5_after_a_device_barrier])
def test_an_exception_in_one_thread_stops_the_launch_and_names_it(kernel):
    with pytest.raises(IndexError, match=r"tid=\[5, 0, 0\] ctaid=\[0, 0, 0\]"):
        kernel[1, 8](cuda.device_array(8, np.float32))


def test_a_kernel_in_steps_is_the_same_code_at_the_same_lines():
    """Each syncthreads statement became a yield; file and line numbers are the kernel's (the race
    checker, the memory profiler and the simulator's shared arrays go by them)."""
    stepped = simulator.stepped_kernel(rotate_twice.py_func)
    code, original = stepped.__code__, rotate_twice.py_func.__code__
    assert (code.co_filename, code.co_firstlineno) == (original.co_filename, original.co_firstlineno)
    assert sorted({line for _, _, line in code.co_lines() if line}) == \
        sorted({line for _, _, line in original.co_lines() if line})


def test_only_barrier_statements_of_the_kernel_itself_are_stepped():
    def counting(x):
        x[0] = cuda.syncthreads_count(1)  # a value from every thread: together

    def both(x):
        cuda.syncthreads()
        cuda.syncwarp()

    assert simulator.stepped_kernel(counting) is None and simulator.stepped_kernel(both) is None
    assert simulator.stepped_kernel(rotate_twice_waiting_in_a_device_function.py_func) is None


# ---------------------------------------------------------------- kernels without a barrier: one thread after another

@cuda.jit
def where_am_i(out):
    """out[block, thread] = 1000 * blockIdx.x + threadIdx.x + 100 * threadIdx.y: each thread must see its own indices."""
    t = cuda.threadIdx.x + cuda.blockDim.x * cuda.threadIdx.y
    out[cuda.blockIdx.x, t] = float32(1000 * cuda.blockIdx.x + cuda.threadIdx.x + 100 * cuda.threadIdx.y)


def test_a_kernel_without_a_barrier_runs_in_order_and_each_thread_sees_its_own_index():
    assert not simulator.waits_for_other_threads(where_am_i.py_func)
    out = cuda.to_device(np.full((3, 15), np.nan, np.float32))
    where_am_i[3, (5, 3)](out)
    b, ty, tx = np.meshgrid(np.arange(3), np.arange(3), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(out.copy_to_host(), (1000 * b + tx + 100 * ty).reshape(3, 15).astype(np.float32))


@cuda.jit
def fails_in_thread_6_without_a_barrier(x):
    t = cuda.threadIdx.x
    if t == 6:
        x[100] = 1  # out of bounds
    x[t] = t


def test_an_exception_in_a_kernel_without_a_barrier_names_its_thread():
    with pytest.raises(IndexError, match=r"tid=\[6, 0, 0\] ctaid=\[0, 0, 0\]"):
        fails_in_thread_6_without_a_barrier[1, 8](cuda.device_array(8, np.float32))


@cuda.jit(device=True)
def add_one(v):
    return v + float32(1)


def test_a_barrier_is_found_in_the_kernel_and_in_the_device_functions_it_calls():
    def direct(x):
        cuda.syncthreads()

    def through_a_device_function(x):
        x[0] = add_one(x[0])
        wait_for_the_block()

    def counting(x):
        x[0] = cuda.syncthreads_count(1)

    def none(x):
        x[0] = add_one(x[cuda.grid(1)])

    for fn in (direct, through_a_device_function, counting):
        assert simulator.waits_for_other_threads(fn), fn.__name__
    assert not simulator.waits_for_other_threads(none)
    helpers = types.ModuleType("helpers")  # a device function reached as a module's attribute: helpers.wait()
    helpers.wait = wait_for_the_block
    namespace = {"helpers": helpers}
    exec("def via_a_module(x):\n    helpers.wait()\n", namespace)
    assert simulator.waits_for_other_threads(namespace["via_a_module"])
