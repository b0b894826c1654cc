"""Numba's CUDA simulator, made cheaper to run: fewer Python threads, and barriers as steps.

The simulator runs each block's threads as Python threads, and its `BlockManager.run` watches
them in a loop: every round it asks each thread whether it waits at `cuda.syncthreads()` or has
finished, and releases the barrier once every live thread waits there. Starting a Python thread
costs about 0.3 ms of CPU and each barrier a switch of every thread, so a launch of 1,536
threads that each write one element took 0.4 s, and a 16 x 16 tiled GEMM of 33 x 37 x 29
(1,536 threads, 6 barriers each) 2.1 s (docs/results/suite-times/simulator_cost.md: both loops).

`run_block`, swapped in for `BlockManager.run`, runs a block the cheapest of three ways:

    in order    a kernel that never makes threads wait for each other (no barrier, no warp-level
                call in it or in a device function it calls: `waits_for_other_threads`, read from
                its code) runs its threads one after another in one Python thread. Without a
                barrier that is an order a GPU may choose too. The 1,536 writes: 0.03 s.
    in steps    a kernel whose only waits are `cuda.syncthreads()` statements of its own is
                rewritten once as a generator (`stepped_kernel`: each such statement becomes
                `yield`, same file and lines), and its threads run in turns in one Python
                thread: each to its next barrier, then all pass it together. The tiled GEMM:
                0.25 s. (Not while the memory profiler watches: it traces Python threads.)
    together    any other kernel runs as the simulator runs it, one Python thread per CUDA
                thread, with a `Barrier` that counts its arrivals: the last live thread to reach
                `cuda.syncthreads()` wakes the others, and the block's manager sleeps until every
                thread has finished or one has raised.

In every way each CUDA thread has a BlockThread of its own (so `cuda.threadIdx`, the race
checker and the memory profiler see what they always saw), a barrier waits only for the threads
still running (as in the simulator), and an exception stops the launch, naming its thread. A
kernel that spins on another thread of its block (a lock taken with atomics) would wait forever
in order or in steps, as it may on a GPU: none of ours does.

`install()` swaps in `run_block` and `syncthreads` (once; `common` calls it when the simulator
is on). They use the thread attributes the simulator has had since it exists (`exception`,
`abort`, `_manager`) and `threading._active`, where `threading.current_thread()` looks; a
simulator without them keeps its own loop, slower but just as correct. The race checker and the
memory profiler (racecheck.py, memprofile.py) patch other pieces (the launch, shared arrays,
atomics) and wrap this `syncthreads`; they work the same in every way.
"""

import ast
import functools
import inspect
import sys
import textwrap
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


def _names_wait(names):
    return any(part in name for name in names for part in _WAITING_PARTS) or bool(set(_WAITING_NAMES) & names)


def _device_functions(fn):
    """The device functions `fn` can reach by the names its code uses: as a global, a closure
    variable or an attribute of a module it uses (`common.helper(...)`)."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    names = _names(fn.__code__)
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    scope = {**fn.__globals__, **cells}
    modules = [v for v in scope.values() if isinstance(v, types.ModuleType)]
    for name in names:
        for value in [scope.get(name)] + [getattr(m, name, None) for m in modules]:
            if isinstance(value, FakeCUDAKernel) and value._device:
                yield value.fn


@functools.lru_cache(maxsize=None)
def waits_for_other_threads(fn):
    """Whether the kernel `fn`, or a device function it calls, names a barrier or a warp-level call.
    Read from the code, never run."""
    return _names_wait(_names(fn.__code__)) or any(waits_for_other_threads(d) for d in _device_functions(fn))


def run_block(self, grid_point, *args):
    """BlockManager.run: the cheapest of three ways that gives the simulator's results.

    A kernel whose threads never wait for each other (`waits_for_other_threads`) runs them one
    after another (`_run_in_order`). One whose only waits are its own `cuda.syncthreads()`
    statements runs them in steps (`_run_in_steps`), unless the memory profiler watches (it traces
    each Python thread). Any other runs them together, one Python thread each (`_run_together`)."""
    from numba.cuda.simulator.kernel import BlockThread

    if not waits_for_other_threads(self._f):
        _run_in_order(self, grid_point, args)
        return
    stepped = stepped_kernel(self._f)
    if stepped is not None and BlockThread.run is NUMBA_OWN.get("BlockThread.run"):
        _run_in_steps(self, grid_point, args, stepped)
    else:
        _run_together(self, grid_point, args)


# The simulator's own methods as install() found them: a BlockThread.run other than its own is
# the memory profiler's, which watches; docs/results/suite-times/simulator_cost.py times both loops.
NUMBA_OWN = {}


class _Passed:
    """The barrier of a block run in steps: every live thread has reached it when syncthreads runs."""

    def wait(self):
        pass


@functools.lru_cache(maxsize=None)
def stepped_kernel(fn):
    """`fn` rewritten as a generator function: each `cuda.syncthreads()` statement becomes `yield`
    (same file, same line numbers, same globals and closure values), or None when that would not
    be the same kernel: no barrier statement, another waiting call left (syncthreads_count,
    syncwarp ...), a device function that waits, or no source to read."""
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    kernel = tree.body[0] if tree.body else None
    if not isinstance(kernel, ast.FunctionDef) or any(waits_for_other_threads(d) for d in _device_functions(fn)):
        return None
    kernel.lineno = min([kernel.lineno] + [d.lineno for d in kernel.decorator_list])  # as Python counts it
    kernel.decorator_list = []
    barriers = _BarrierToYield()
    kernel.body = [barriers.visit(statement) for statement in kernel.body]
    left = {n.id for n in ast.walk(kernel) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(kernel) if isinstance(n, ast.Attribute)}
    if not barriers.count or _names_wait(left) or any(isinstance(n, ast.Yield) for n in ast.walk(kernel)
                                                           if n not in barriers.made):
        return None
    freevars = fn.__code__.co_freevars
    make = ast.FunctionDef(name="_make", args=ast.arguments(posonlyargs=[], args=[ast.arg(v) for v in freevars],
                                                            kwonlyargs=[], kw_defaults=[], defaults=[]),
                           body=[kernel, ast.Return(ast.Name(kernel.name, ast.Load()))], decorator_list=[])
    module = ast.fix_missing_locations(ast.Module(body=[make], type_ignores=[]))
    ast.increment_lineno(module, first - 1)
    namespace = {}
    exec(compile(module, fn.__code__.co_filename, "exec"), fn.__globals__, namespace)
    stepped = namespace["_make"](*(c.cell_contents for c in fn.__closure__ or ()))
    stepped.__defaults__ = fn.__defaults__
    return stepped if inspect.isgeneratorfunction(stepped) else None


class _BarrierToYield(ast.NodeTransformer):
    """`cuda.syncthreads()` (or `syncthreads()`) as a statement -> `yield`; nested functions untouched."""

    def __init__(self):
        self.count, self.made = 0, []

    def visit_Expr(self, node):
        call = node.value
        if isinstance(call, ast.Call) and not call.args and not call.keywords and (
                isinstance(call.func, ast.Attribute) and call.func.attr == "syncthreads"
                or isinstance(call.func, ast.Name) and call.func.id == "syncthreads"):
            self.count += 1
            self.made.append(ast.Yield(value=None))
            return ast.copy_location(ast.Expr(value=self.made[-1]), node)
        return node

    def visit_FunctionDef(self, node):
        return node

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef


def _run_in_steps(self, grid_point, args, stepped):
    """The block's threads in turns, in one Python thread: each runs to its next barrier (a `yield`
    of `stepped_kernel`) or its end; once every live thread is at the barrier, each passes it
    (`BlockThread.syncthreads`, which the race checker counts) and the next step starts. Each CUDA
    thread has a BlockThread of its own, as in `_run_in_order`. The first exception stops the
    launch, named like the simulator names it."""
    from numba.cuda.simulator.kernel import BlockThread

    self.barrier = _Passed()

    def in_steps(become):
        live = []
        for block_point in np.ndindex(*self._block_dim):
            t = BlockThread(_nothing, self, grid_point, block_point, self._debug)
            live.append((t, stepped(*args)))
        while live:
            arrived = []
            for t, steps in live:
                become(t)
                try:
                    next(steps)
                    arrived.append((t, steps))
                except StopIteration:
                    pass
                except Exception as e:  # noqa: BLE001 - named and raised by the launch, as BlockThread.run does
                    return _named(e, t)
            for t, _ in arrived:
                become(t)
                BlockThread.syncthreads(t)
            live = arrived
        return None

    _in_one_python_thread(in_steps)


def _in_one_python_thread(body):
    """Run `body(become)` in a fresh Python thread, where `become(t)` makes `threading.current_thread()`
    answer the BlockThread `t` (its entry in `threading._active`, restored after); re-raise the
    (exception, traceback) `body` returns, if any."""
    outcome = []

    def run():
        me = threading.get_ident()
        runner = threading._active[me]
        try:
            outcome.append(body(lambda t: threading._active.__setitem__(me, t)))
        finally:
            threading._active[me] = runner

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join()
    if outcome and outcome[0] is not None:
        raise outcome[0][0].with_traceback(outcome[0][1])


def _nothing():
    pass


def _named(e, t):
    """(exception, traceback) with the thread named as BlockThread.run names it."""
    tid, ctaid = f"tid={list(t.threadIdx)}", f"ctaid={list(t.blockIdx)}"
    message = f"{tid} {ctaid}" if str(e) == "" else f"{tid} {ctaid}: {e}"
    return type(e)(message), sys.exc_info()[2]


def _run_in_order(self, grid_point, args):
    """Each CUDA thread of the block in turn, in one Python thread, each with a BlockThread of its own
    (so `threading.current_thread()` answers threadIdx, and the race checker and the memory profiler
    keep what they note per thread apart); stops at the first exception and re-raises it."""
    from numba.cuda.simulator.kernel import BlockThread

    def one_after_another(become):
        for block_point in np.ndindex(*self._block_dim):
            t = BlockThread(functools.partial(self._f, *args), self, grid_point, block_point, self._debug)
            become(t)
            t.run()  # BlockThread.run: the kernel, its exception kept in t.exception
            if t.exception:
                return t.exception
        return None

    _in_one_python_thread(one_after_another)


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
    NUMBA_OWN.update({"BlockManager.run": kernel.BlockManager.run, "BlockThread.run": kernel.BlockThread.run,
                      "BlockThread.syncthreads": kernel.BlockThread.syncthreads})
    kernel.BlockManager.run = run_block
    kernel.BlockThread.syncthreads = syncthreads
    return True
