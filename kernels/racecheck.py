"""A race checker for kernels running on Numba's CUDA simulator, in the spirit of compute-sanitizer's racecheck.

On a GPU, threads of a block run in any order between two `cuda.syncthreads()` barriers, and
blocks run in any order (with no barrier between them at all). The simulator runs a block's
threads as Python threads taking turns, so whether a race shows in its answer is luck: a lost
update (`+=` for an atomic) almost never does, a missing barrier on some launches only. This
checker watches every element access instead of the answer, and reports a race on every launch:

    with racecheck.checking() as races:
        pool.maxpool2d_backward(dy, argmax, x.shape)
    races.assert_clean()   # RaceError naming the kernel, the array, the element and both threads

Each access is recorded as (block, thread, epoch), where the epoch counts the barriers the
thread has passed. Two accesses to the same element by different threads are a race when

    * at least one of them writes, and they are not both atomics (`cuda.atomic.add` etc.), and
    * nothing orders them: they are in different blocks (blocks never synchronise within a
      launch), or in the same block and the same epoch (no syncthreads between them).

That covers two threads writing one element without an atomic (global or shared memory), a
thread reading an element another thread of its block wrote since the last syncthreads (a
missing barrier), and the reverse: overwriting what another thread has not finished reading.
Global elements are identified by address, so two views of one buffer are one array; shared
elements by address and block (each block has its own shared memory). Views a kernel makes
(`x.T`, `x.reshape(..)`, `x.ravel()`, `x[1:]`, `x.transpose()`) are watched like the array.

It also counts what it sees (`Races.count`, `Races.launches`), so a test can check the
algorithm and not only the answer: how many times a tiled GEMM reads each input element from
global memory, how many atomics a block reduction does per block.

It works by swapping a few simulator pieces while the `with` block runs: the kernel launch
(to wrap array arguments), `cuda.shared.array`, `cuda.syncthreads` and the atomics. Kernels
run several times slower under it: keep shapes tiny. Only the simulator is checked (set
NUMBA_ENABLE_CUDASIM=1 before numba is imported).
"""

import collections
import contextlib
import inspect
import linecache
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
from numba import config

ATOMICS = ("add", "sub", "and_", "or_", "xor", "inc", "dec", "exch", "max", "min", "nanmax", "nanmin", "cas")


class RaceError(AssertionError):
    """A data race found by the checker; the message names the kernel, array, element and both threads."""


@dataclass(frozen=True)
class Access:
    """One access to an element: who (block, thread), when (the thread's barrier epoch), what."""

    block: tuple
    thread: tuple
    epoch: int
    op: str  # "read", "write" or "atomic"
    array: str
    index: tuple
    # Where the element lives, for profilers (kernels/memprofile.py); the race checker ignores them.
    offset: int = field(default=0, compare=False)  # bytes from the start of its allocation
    size: int = field(default=4, compare=False)  # bytes (the element's itemsize)

    def ordered_before(self, other):
        """True if a barrier separates self from a later access `other` (same block, later epoch)."""
        return self.block == other.block and self.epoch != other.epoch

    def __str__(self):
        return f"block {self.block} thread {self.thread} ({self.op} {self.array}{list(self.index)})"


@dataclass(frozen=True)
class Race:
    kernel: str
    space: str  # "global" or "shared"
    first: Access
    second: Access

    @property
    def kind(self):
        if self.first.op == "read":
            return "write-after-read"
        return "read-after-write" if self.second.op == "read" else "write-write"

    def __str__(self):
        idx = ", ".join(str(i) for i in self.second.index)
        return (f"{self.kind} race in kernel {self.kernel} on {self.space} {self.second.array}[{idx}]: "
                f"block {self.first.block} thread {self.first.thread} did a {self.first.op}, then "
                f"block {self.second.block} thread {self.second.thread} did a {self.second.op}, "
                + ("in different blocks (blocks never synchronise: use an atomic)" if self.first.block != self.second.block
                   else "with no cuda.syncthreads() between them (add one, or use an atomic)"))


class Races:
    """What one `checking()` block saw: the races found and the kernels launched."""

    def __init__(self):
        self.found = []  # Race, at most one per (kernel, array element)
        self.launched = []  # kernel names, in launch order
        self.launches = []  # (kernel name, grid dim, block dim), in launch order
        self.counts = collections.Counter()  # (kernel, space, array, op) -> accesses
        self._lock = threading.Lock()
        self._elements = {}  # key -> (writes by thread, reads by thread): {(block, thread): Access}
        self._reported = set()
        self._kernel = None

    def assert_clean(self):
        """Raise RaceError describing the first race (and how many more) if any was found."""
        if self.found:
            more = f" (and {len(self.found) - 1} more)" if len(self.found) > 1 else ""
            raise RaceError(f"{self.found[0]}{more}")

    def count(self, kernel, space, op, array=None):
        """How many accesses (op: "read", "write" or "atomic") kernel made to `space` ("global" or
        "shared") memory, over every launch of it, of the array named `array` (default: any)."""
        return sum(n for (k, s, a, o), n in self.counts.items()
                   if k == kernel and s == space and o == op and (array is None or a == array))

    # -- recording (called from the simulated threads)

    def _start(self, kernel, grid=None, block=None):
        self._kernel = kernel
        self.launched.append(kernel)
        self.launches.append((kernel, grid, block))
        self._elements = {}

    def _access(self, space, key, access):
        """Record `access` to the element `key` and report any race with an earlier access."""
        with self._lock:
            self.counts[(self._kernel, space, access.array, access.op)] += 1
            writes, reads = self._elements.setdefault(key, ({}, {}))
            me = (access.block, access.thread)
            earlier = list(writes.values())
            if access.op != "read":
                earlier += reads.values()
            for prev in earlier:
                if (prev.block, prev.thread) == me or prev.ordered_before(access):
                    continue
                if prev.op == access.op == "atomic":
                    continue
                if (self._kernel, key) not in self._reported:
                    self._reported.add((self._kernel, key))
                    self.found.append(Race(self._kernel, space, prev, access))
                break
            (reads if access.op == "read" else writes)[me] = access


_active = None  # the Races being recorded (one checking() block at a time)


def _who():
    """(block, thread, epoch) of the simulated thread running now (each simulated thread runs one
    thread of one block, so its (block, thread) is worked out once and kept on it)."""
    t = threading.current_thread()
    try:
        block, thread = t.racecheck_who
    except AttributeError:
        block, thread = t.racecheck_who = tuple(t.blockIdx), tuple(t.threadIdx)
    return block, thread, getattr(t, "racecheck_epoch", 0)


def _normalise(index, shape):
    """A tuple of non-negative ints for a full element index, or None for a slice/partial index."""
    if not isinstance(index, tuple):
        if len(shape) == 1 and isinstance(index, (int, np.integer)):  # the common case: x[i]
            return (int(index) + (shape[0] if index < 0 else 0),)
        index = (index,)
    if len(index) != len(shape) or not all(isinstance(i, (int, np.integer)) for i in index):
        return None
    return tuple(int(i) + (n if i < 0 else 0) for i, n in zip(index, shape))


class Tracked:
    """An array seen by a kernel under the checker: every element access is recorded."""

    def __init__(self, name, ary, space):
        self._name, self._ary, self._space = name, ary, space
        self._shape, self._strides, self._itemsize = ary.shape, ary.strides, ary.itemsize  # read at every access
        self._base = ary.__array_interface__["data"][0]
        root = ary
        while isinstance(root.base, np.ndarray):  # the array that owns the memory: the allocation
            root = root.base
        self._allocation = root.__array_interface__["data"][0]

    def __getattr__(self, attr):  # shape, size, ndim, dtype ... and views: .T, reshape(), ravel() ...
        value = getattr(self._ary, attr)
        if isinstance(value, np.ndarray):
            return self._watched(value)
        if callable(value):
            def method(*args, **kwargs):
                return self._watched(value(*args, **kwargs))
            return method
        return value

    def _watched(self, value):
        """A view of this array is watched too (its own strides give the same element addresses)."""
        if isinstance(value, np.ndarray) and value.ndim and np.may_share_memory(value, self._ary):
            return Tracked(self._name, value, self._space)
        return value

    def __len__(self):
        return len(self._ary)

    def _record(self, index, op):
        idx = _normalise(index, self._shape)
        if idx is None:  # a slice: record each element of the view
            view = Tracked(self._name, self._ary[index], self._space)
            for i in np.ndindex(view.shape):
                view._record(i, op)
            return
        block, thread, epoch = _who()
        address = self._base + sum(i * s for i, s in zip(idx, self._strides))
        key = (address,) if self._space == "global" else (address, block)
        _active._access(self._space, key, Access(block, thread, epoch, op, self._name, idx,
                                                 address - self._allocation, self._itemsize))

    def __getitem__(self, index):
        value = self._ary[index]
        if isinstance(value, np.ndarray):
            return Tracked(self._name, value, self._space)
        self._record(index, "read")
        return value

    def __setitem__(self, index, value):
        self._ary[index] = value
        self._record(index, "write")


def _shared_name(frame):
    """The variable a `cuda.shared.array(...)` call is assigned to, read from its source line."""
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    left = line.split("=")[0].strip() if "=" in line else ""
    return left if left.isidentifier() else f"shared@line{frame.f_lineno}"


@contextlib.contextmanager
def checking():
    """Record every kernel launched inside the block; yields a `Races` (call `assert_clean()`)."""
    with watching(Races()) as races:
        yield races


@contextlib.contextmanager
def watching(recorder):
    """Send every access of the kernels launched inside the block to `recorder`, and yield it.

    A recorder has a `_lock` (threading.Lock), `_start(kernel, grid, block)` (called at each
    launch) and `_access(space, key, access)` (called from the simulated thread doing the access),
    and may have `_thread_started()` (called in each simulated thread before the kernel runs):
    `Races` is one, `minasgd.kernels.memprofile.Profile` another.
    """
    global _active
    if not config.ENABLE_CUDASIM:
        raise RuntimeError("racecheck needs the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 before numba is imported")
    if _active is not None:
        raise RuntimeError("racecheck.checking() blocks cannot be nested")
    saved, patches = _patches(recorder)
    _active = recorder
    for (cls, attr), fn in patches.items():
        setattr(cls, attr, fn)
    try:
        yield recorder
    finally:
        for (cls, attr), fn in saved.items():
            setattr(cls, attr, fn)
        _active = None


def _patches(recorder):
    """(saved, patches): the simulator's methods `watching` replaces, as they are, and their
    replacements that report every launch and access to `recorder`: {(class, attribute): function}."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernel, kernelapi
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    races = recorder
    saved = {
        (kernel.FakeCUDAKernel, "__call__"): kernel.FakeCUDAKernel.__call__,
        (kernel.BlockThread, "syncthreads"): kernel.BlockThread.syncthreads,
        (kernelapi.FakeCUDAShared, "array"): kernelapi.FakeCUDAShared.array,
    }
    saved.update({(kernelapi.FakeCUDAAtomic, op): getattr(kernelapi.FakeCUDAAtomic, op) for op in ATOMICS})
    launch, syncthreads, shared_array = (saved[k] for k in list(saved)[:3])

    def checked_launch(self, *args):
        if self._device or kernel._get_kernel_context() is not None:  # a device function call
            return launch(self, *args)
        names = list(inspect.signature(self.fn).parameters)
        wrapped = []
        for name, a in zip(names, args):
            ary = a._ary if isinstance(a, FakeCUDAArray) else a
            wrapped.append(Tracked(name, ary, "global") if isinstance(ary, np.ndarray) and ary.ndim else a)
        races._start(self.fn.__name__, tuple(self.grid_dim), tuple(self.block_dim))
        return launch(self, *wrapped)

    def checked_syncthreads(self):
        syncthreads(self)
        self.racecheck_epoch = getattr(self, "racecheck_epoch", 0) + 1

    def checked_shared_array(self, shape, dtype, alignment=None):
        # Like the simulator: one array per source line of the kernel, shared by its threads.
        caller = sys._getframe(1)
        if shape == 0:  # dynamic shared memory
            ary = shared_array(self, shape, dtype, alignment)
        else:
            with races._lock:
                key = ("racecheck", caller.f_code.co_filename, caller.f_lineno)
                if key not in self._allocations:
                    self._allocations[key] = np.empty(shape, numpy_support.as_dtype(dtype)
                                                      if isinstance(dtype, types.Type) else dtype)
                ary = self._allocations[key]
        return Tracked(_shared_name(caller), ary, "shared")

    def checked_atomic(op):
        original = saved[(kernelapi.FakeCUDAAtomic, op)]

        def atomic(self, array, index, *rest):
            if not isinstance(array, Tracked):
                return original(self, array, index, *rest)
            result = original(self, array._ary, index, *rest)
            array._record(index, "atomic")
            return result

        return atomic

    patches = {
        (kernel.FakeCUDAKernel, "__call__"): checked_launch,
        (kernel.BlockThread, "syncthreads"): checked_syncthreads,
        (kernelapi.FakeCUDAShared, "array"): checked_shared_array,
    }
    patches.update({(kernelapi.FakeCUDAAtomic, op): checked_atomic(op) for op in ATOMICS})
    if hasattr(recorder, "_thread_started"):
        thread_run = saved[(kernel.BlockThread, "run")] = kernel.BlockThread.run

        def started_run(self):
            recorder._thread_started()
            thread_run(self)

        patches[(kernel.BlockThread, "run")] = started_run
    return saved, patches
