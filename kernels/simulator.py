"""Numba's CUDA simulator, made to yield instead of spin while a block runs.

The simulator runs each block's threads as Python threads, and its `BlockManager.run` watches
them in a loop that never lets go of the GIL by itself: every round it asks each thread whether
it waits at `cuda.syncthreads()` or has finished, and the threads doing the kernel's work get
the interpreter only when the loop is preempted (every 5 ms). A 4 x 4 tiled GEMM of 17 x 19 x 13
took 3.4 s of CPU that way, 0.4 s with the loop yielding once per round (`time.sleep(0)`
releases the GIL): same threads, same barriers, same results. Kernels with few barriers gain
less (every kernel of the race check's workload: 17.5 -> 10 s of CPU; 6,400 threads that only
write one element: 2.1 -> 1.3 s).

`install()` swaps in that loop (once; `common` calls it when the simulator is on). It is the
simulator's own loop, the yield added, written against the thread attributes the simulator has
had since it exists (`syncthreads_blocked`, `syncthreads_event`, `exception`, `abort`); a
simulator without them keeps its own loop, slower but just as correct. The race checker and the
memory profiler (racecheck.py, memprofile.py) patch other pieces (the launch, syncthreads, shared
arrays, atomics) and work the same either way.
"""

import functools
import time

import numpy as np

_THREAD_ATTRIBUTES = ("syncthreads_blocked", "syncthreads_event", "exception", "abort")


def _release_all(threads):
    for t in threads:
        t.syncthreads_blocked = False
        t.syncthreads_event.set()


def _abort_all(threads):
    for t in threads:
        t.abort = True
    _release_all(threads)


def run_block(self, grid_point, *args):
    """BlockManager.run: start the block's threads, release them at each barrier all of them
    reached, re-raise the first exception; each round of watching yields the GIL once."""
    from numba.cuda.simulator.kernel import BlockThread

    threads = []
    for block_point in np.ndindex(*self._block_dim):
        # the kernel itself as the target, no Python frame around it: the memory profiler traces
        # the first frame outside numba and threading as the kernel's (memprofile._count_lines)
        t = BlockThread(functools.partial(self._f, *args), self, grid_point, block_point, self._debug)
        t.start()
        threads.append(t)
    live, blocked = set(threads), set()
    while live:
        for t in live:
            if t.syncthreads_blocked:
                blocked.add(t)
            elif t.exception:
                _abort_all(threads)  # like the simulator: abort the others, do not join them
                raise t.exception[0].with_traceback(t.exception[1])
        if live == blocked:
            _release_all(blocked)
            blocked = set()
        live = {t for t in live if t.is_alive()}
        time.sleep(0)  # let the block's threads run (the simulator's loop spins here)
    for t in threads:  # an exception set just before its thread finished
        if t.exception:
            raise t.exception[0].with_traceback(t.exception[1])


def install():
    """Use `run_block` as the simulator's BlockManager.run (if its threads look as expected). True if in use."""
    from numba.cuda.simulator import kernel

    if kernel.BlockManager.run is run_block:
        return True
    probe = kernel.BlockThread(lambda: None, kernel.BlockManager(None, (1, 1, 1), (1, 1, 1), False), (0, 0, 0),
                               (0, 0, 0), False)
    if not all(hasattr(probe, a) for a in _THREAD_ATTRIBUTES) or not hasattr(probe, "is_alive"):
        return False
    kernel.BlockManager.run = run_block
    return True
