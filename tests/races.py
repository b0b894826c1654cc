"""`with racecheck(): launch(...)`: fail a test when two GPU threads write one element without an atomic.

The CUDA simulator runs threads as Python threads and does not show races: a plain `+=` where
`cuda.atomic.add` is needed gives the right numbers there. For the grading tests of the
atomic and barrier tasks (3.2, 7.1) this helper watches every write to a kernel's array
arguments (global memory) during the block: the first thread to write an element owns it for
the rest of that launch; a write to it by ANOTHER thread that is not inside `cuda.atomic.*`
raises RaceError naming both threads and the element. Two atomic adds to one element are fine.

It is a stand-in for `kernels/racecheck.py` (a fuller checker that also sees shared memory and
missing barriers); when that module exists, this helper uses it instead. On a real GPU it does
nothing.
"""

import contextlib
import threading

from numba import config

SIM = bool(config.ENABLE_CUDASIM)


try:  # the fuller checker (shared memory, missing barriers), when this checkout has it
    from minasgd.kernels import racecheck as _rc
except ImportError:
    _rc = None

if _rc is not None:
    RaceError = _rc.RaceError
else:
    class RaceError(AssertionError):
        """Two threads wrote one element in one launch, at least one without an atomic."""


def _thread_name():
    t = threading.current_thread()
    block, thread = getattr(t, "blockIdx", None), getattr(t, "threadIdx", None)
    if block is None:
        return t.name
    return f"block {tuple(block)} thread {tuple(thread)}"


def _index(idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    return tuple(int(i) for i in idx)


@contextlib.contextmanager
def _write_recorder():
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator import kernelapi
    from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray

    atomic_code = {f.__code__ for f in vars(kernelapi.FakeCUDAAtomic).values() if callable(f)}
    lock = threading.Lock()
    owners = {}  # (array id, index) -> (thread name, atomic?)
    setitem, call = FakeWithinKernelCUDAArray.__setitem__, sim_kernel.FakeCUDAKernel.__call__

    def watched_setitem(self, idx, val):
        import sys

        atomic = sys._getframe(1).f_code in atomic_code
        key, me = (id(self._item), _index(idx)), _thread_name()
        with lock:
            first = owners.setdefault(key, (me, atomic))
        if first[0] != me and not (atomic and first[1]):
            element = ", ".join(str(i) for i in key[1])
            raise RaceError(f"write-write race on global element [{element}] of a {tuple(self._item.shape)} array: "
                            f"{first[0]} and {me} both write it, not both with an atomic (use cuda.atomic.add)")
        setitem(self, idx, val)

    def fresh_launch(self, *args):
        if not (self._device or sim_kernel._kernel_context):
            owners.clear()
        return call(self, *args)

    FakeWithinKernelCUDAArray.__setitem__ = watched_setitem
    sim_kernel.FakeCUDAKernel.__call__ = fresh_launch
    try:
        yield
    finally:
        FakeWithinKernelCUDAArray.__setitem__ = setitem
        sim_kernel.FakeCUDAKernel.__call__ = call


@contextlib.contextmanager
def _fuller_checker():
    with _rc.checking() as races:
        yield races
    races.assert_clean()


def racecheck():
    """A context manager: the race checker around the kernel launches inside it (simulator only)."""
    if not SIM:
        return contextlib.nullcontext()
    return _fuller_checker() if _rc is not None else _write_recorder()
