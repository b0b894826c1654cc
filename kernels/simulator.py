"""Numba's CUDA simulator, made cheaper to run: fewer Python threads, and barriers that count.

The simulator runs each block's threads as Python threads, and its `BlockManager.run` watches
them in a loop: every round it asks each thread whether it waits at `cuda.syncthreads()` or has
finished, and releases the barrier once every live thread waits there. That loop never lets go
of the GIL by itself, and starting a Python thread costs about 0.3 ms of CPU: a launch of 1,536
threads that each write one element took 0.4 s.

`run_block`, swapped in for `BlockManager.run`, runs a block one of two ways:

    in order    a kernel that never makes threads wait for each other (no barrier, no warp-level
                call in it or in a device function it calls: `waits_for_other_threads`, read from
                its code) runs its threads one after another in one Python thread. Without a
                barrier that is an order a GPU may choose too. Each CUDA thread still has a
                BlockThread of its own, so threadIdx, the race checker and the memory profiler
                see what they see in the other mode. The 1,536 one-element writes: 0.03 s.
    together    any other kernel runs as the simulator runs it, one Python thread per CUDA
                thread, with a `Barrier` that counts its arrivals: the last live thread to reach
                `cuda.syncthreads()` wakes the others, a thread that returns counts as gone (as
                in the simulator: a barrier waits only for the threads still running), and the
                block's manager sleeps until every thread has finished or one has raised.

Same results either way; an exception stops the launch and names its thread. A kernel that
spins on another thread of its block (a lock taken with atomics) would wait forever in order,
as it may on a GPU: none of ours does.

`install()` swaps in `run_block` and `syncthreads` (once; `common` calls it when the simulator
is on). They use the thread attributes the simulator has had since it exists (`exception`,
`abort`, `_manager`) and `threading._active`, where `threading.current_thread()` looks; a
simulator without them keeps its own loop, slower but just as correct. The race checker and the
memory profiler (racecheck.py, memprofile.py) patch other pieces (the launch, shared arrays,
atomics) and wrap this `syncthreads`; they work the same either way.
"""

import functools
import threading
import types

import numpy as np

_THREAD_ATTRIBUTES = ("exception", "abort", "_manager")


class Barrier:
    """One block's `cuda.syncthreads()`: `alive` threads still running, `waiting` of them at the
    barrier, `generation` counts releases; `aborted` wakes everyone when a thread has raised."""

    def __init__(self, threads):
        self.cond = threading.Condition()
        self.alive, self.waiting, self.generation, self.aborted = threads, 0, 0, False

    def _release_if_all_arrived(self):  # called holding self.cond
        if self.waiting and self.waiting == self.alive:
            self.waiting = 0
            self.generation += 1
            self.cond.notify_all()

    def wait(self):
        with self.cond:
            generation = self.generation
            self.waiting += 1
            self._release_if_all_arrived()
            while self.generation == generation and not self.aborted:
                self.cond.wait()

    def leave(self, failed):
        """A thread is done (returned, or raised when `failed`)."""
        with self.cond:
            self.alive -= 1
            self.aborted |= failed
            self._release_if_all_arrived()
            self.cond.notify_all()  # the manager waits for the last thread or the first failure


def syncthreads(self):
    """BlockThread.syncthreads: wait at the block's barrier (RuntimeError once the launch aborted)."""
    if self.abort:
        raise RuntimeError("abort flag set on syncthreads call")
    self._manager.barrier.wait()
    if self.abort:
        raise RuntimeError("abort flag set on syncthreads clear")


def _thread_body(f, barrier, *args):
    """What a block thread runs: the kernel, then leave the barrier (raising or not)."""
    failed = True
    try:
        f(*args)
        failed = False
    finally:
        barrier.leave(failed)


# What makes threads of a block wait for each other: cuda.syncthreads and its _count/_and/_or forms,
# syncwarp and the other *_sync warp calls, shuffles, votes, masks, cooperative groups (cuda.cg).
_WAITING_PARTS = ("sync", "shfl", "ballot", "vote", "activemask", "lanemask", "this_grid", "grid_group")
_WAITING_NAMES = ("cg",)


def _names(code):
    names = set(code.co_names) | set(code.co_freevars)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names(const)
    return names


@functools.lru_cache(maxsize=None)
def waits_for_other_threads(fn):
    """Whether the kernel `fn`, or a device function it calls, names a barrier or a warp-level call.

    Read from the code, never run: every name the code uses (`_names`), and every device function
    it can reach by those names, as a global, a closure variable or an attribute of a module it
    uses (`common.helper(...)`)."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    names = _names(fn.__code__)
    if any(part in name for name in names for part in _WAITING_PARTS) or set(_WAITING_NAMES) & names:
        return True
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    scope = {**fn.__globals__, **cells}
    modules = [v for v in scope.values() if isinstance(v, types.ModuleType)]
    for name in names:
        for value in [scope.get(name)] + [getattr(m, name, None) for m in modules]:
            if isinstance(value, FakeCUDAKernel) and value._device and waits_for_other_threads(value.fn):
                return True
    return False


def run_block(self, grid_point, *args):
    """BlockManager.run: a kernel that has threads wait for each other (`waits_for_other_threads`)
    runs its block as the simulator does, one Python thread per CUDA thread (`_run_together`);
    any other runs the block's threads one after another (`_run_in_order`): without a barrier,
    one after another is an order a GPU may choose, and it starts one Python thread, not 256."""
    if waits_for_other_threads(self._f):
        _run_together(self, grid_point, args)
    else:
        _run_in_order(self, grid_point, args)


def _run_in_order(self, grid_point, args):
    """Each CUDA thread of the block in turn, in one Python thread, each with a BlockThread of its own
    (so `threading.current_thread()` answers threadIdx, and the race checker and the memory profiler
    keep what they note per thread apart); stops at the first exception and re-raises it."""
    from numba.cuda.simulator.kernel import BlockThread

    failed = []

    def one_after_another():
        me = threading.get_ident()
        runner = threading._active[me]  # what threading.current_thread() looks up
        try:
            for block_point in np.ndindex(*self._block_dim):
                t = BlockThread(functools.partial(self._f, *args), self, grid_point, block_point, self._debug)
                threading._active[me] = t
                t.run()  # BlockThread.run: the kernel, its exception kept in t.exception
                if t.exception:
                    failed.append(t)
                    return
        finally:
            threading._active[me] = runner

    worker = threading.Thread(target=one_after_another, daemon=True)
    worker.start()
    worker.join()
    if failed:
        raise failed[0].exception[0].with_traceback(failed[0].exception[1])


def _run_together(self, grid_point, args):
    """All the block's threads at once, one Python thread each; sleep until all of them finished or
    one raised, re-raise the first exception (the others are aborted, not joined, like the simulator)."""
    from numba.cuda.simulator.kernel import BlockThread

    count = int(np.prod(self._block_dim))
    barrier = self.barrier = Barrier(count)
    threads = []
    for block_point in np.ndindex(*self._block_dim):
        # the kernel is the first frame outside numba and threading, as the memory profiler expects
        # (memprofile._count_lines): _thread_body lives in this module, which it also skips
        t = BlockThread(functools.partial(_thread_body, self._f, barrier, *args), self, grid_point, block_point,
                        self._debug)
        t.start()
        threads.append(t)
    with barrier.cond:
        while barrier.alive and not barrier.aborted:
            barrier.cond.wait()
    failed = next((t for t in threads if t.exception), None)
    if failed is None and barrier.aborted:  # the failing thread stores its exception just after leaving
        for t in threads:
            t.join()
        failed = next(t for t in threads if t.exception)
    if failed is not None:
        for t in threads:
            t.abort = True
        with barrier.cond:
            barrier.aborted = True
            barrier.cond.notify_all()
        raise failed.exception[0].with_traceback(failed.exception[1])


def install():
    """Use `run_block` and `syncthreads` in the simulator (if its threads look as expected). True if in use."""
    from numba.cuda.simulator import kernel

    if kernel.BlockManager.run is run_block:
        return True
    probe = kernel.BlockThread(lambda: None, kernel.BlockManager(None, (1, 1, 1), (1, 1, 1), False), (0, 0, 0),
                               (0, 0, 0), False)
    looks_as_expected = all(hasattr(probe, a) for a in _THREAD_ATTRIBUTES)
    if not looks_as_expected or not isinstance(getattr(threading, "_active", None), dict):
        return False
    kernel.BlockManager.run = run_block
    kernel.BlockThread.syncthreads = syncthreads
    return True
