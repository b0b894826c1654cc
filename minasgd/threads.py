"""How many threads a training process may use: decided once, and said.

Two rules. Every process that trains next to others (each worker on either transport, the
parameter server, each experiment run, the tutorials): ONE BLAS thread, unless the environment
names a count in OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or MKL_NUM_THREADS (the first one set
wins). A one-process run (`minasgd train`, `--workers 0`): see `threads_for_one_process` below,
the cores it is given that nobody else is using.

Why one for those: our matrix products are a few milliseconds each, and a multi-threaded BLAS
spins threads that fight the other processes for the cores. On a busy 2-core machine a
`--workers 0` run of `tiny` went from 329 to 6,536 images/s with one thread; parallelism there
comes from the processes (one per core). A lone process on a quiet machine is the other case:
it gets the idle cores (docs/cpu.md has the measurement both ways).

    with blas_threads_for_training() as line:   # "BLAS threads: 1 (one per training process ...)"
        ...train...

threadpoolctl changes the count of the BLAS NumPy already loaded (an environment variable is
read only when the library loads), and puts the old count back on leaving the block.
"""

import contextlib
import os
import time

ENV_NAMES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def chosen_blas_threads(environ=None):
    """(threads, why): the count the rule above picks."""
    environ = os.environ if environ is None else environ
    for name in ENV_NAMES:
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r}: expected a whole number of threads, 1 or more")
            return int(value), f"from {name}"
    return 1, f"one per training process; set {ENV_NAMES[0]} to choose"


def blas_threads():
    """The BLAS thread count in force now (the largest if several BLAS libraries are loaded), or None."""
    from threadpoolctl import threadpool_info

    counts = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return max(counts) if counts else None


@contextlib.contextmanager
def limit_blas_threads(n):
    """Inside the block BLAS uses `n` threads (None: leave it as it is); the old count comes back after."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


@contextlib.contextmanager
def blas_threads_for_children(n):
    """Inside the block, processes started from here use `n` BLAS threads: every variable of
    ENV_NAMES is set (they read it when NumPy loads); the old values come back after. (This
    process's own BLAS is `limit_blas_threads`' business.)"""
    saved = {name: os.environ.get(name) for name in ENV_NAMES}
    os.environ.update({name: str(n) for name in ENV_NAMES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def blas_threads_for_training(environ=None):
    """Apply the rule inside the block; yields the one line to tell the user."""
    n, why = chosen_blas_threads(environ)
    with limit_blas_threads(n):
        yield f"BLAS threads: {n} ({why})"


def pin_blas_threads_for_training(environ=None):
    """Apply the rule for the rest of this process (scripts, tutorials); returns the line to print."""
    n, why = chosen_blas_threads(environ)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    return f"BLAS threads: {n} ({why})"


# ------------------------------------------------------------------ one process, the whole machine

THREADS_ENV = "MINASGD_THREADS"


def cores():
    """The cores this process may run on (its CPU affinity, e.g. `taskset`), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


def chosen_threads_for_one_process(requested=None, environ=None, n_cores=None, load=None):
    """(threads, why) for a training run that is the only training process: the compiled loops
    and the convolutions' chunks of images (`minasgd.backends.cpu_loops.use_threads`) get this
    count, BLAS keeps one thread (see `threads_for_one_process`). The user's count if they gave
    one (`threads_the_user_chose`), else the idle cores (`idle_threads`)."""
    return threads_the_user_chose(requested, environ) or idle_threads(n_cores, load)


def threads_the_user_chose(requested=None, environ=None):
    """(threads, why) from `requested` (`--threads N`), else MINASGD_THREADS, else
    OPENBLAS_NUM_THREADS and the like; None if the user named no count."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"--threads {requested}: expected 1 or more")
        return int(requested), "from --threads"
    for name in (THREADS_ENV, *ENV_NAMES):
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r}: expected a whole number of threads, 1 or more")
            return int(value), f"from {name}"
    return None


def idle_threads(n_cores=None, load=None):
    """(threads, why): the cores this process is given that are idle: the core count minus the
    1-minute load average (`os.getloadavg`, the runnable processes of everyone else: this one
    has not started yet), rounded, between 1 and the cores. An idle 8-core laptop gets 8; a
    2-core machine with one other busy process gets 1, because multi-threaded BLAS on a core
    someone else is using thrashes (docs/cpu.md: the measurement, quiet and loaded)."""
    n_cores = cores() if n_cores is None else n_cores
    load = os.getloadavg()[0] if load is None else load
    idle = max(0.0, n_cores - load)
    n = max(1, min(n_cores, int(idle + 0.5)))
    return n, (f"{n_cores} cores given, load {load:.1f} leaves {idle:.1f} idle; "
               f"--threads N or {THREADS_ENV} to choose")


def measured_at_start(step, n, repeats=2):
    """{1: ms, n: ms}: the best of `repeats` timed calls of `step` (one training step's forward
    and backward) on 1 and on n threads (`cpu_loops.use_threads`; BLAS on one), each after one
    untimed call (compilation, caches). The start-up measurement behind the thread choice."""
    from .backends import cpu_loops

    times = {}
    for k in (1, n):
        cpu_loops.use_threads(k)
        with limit_blas_threads(1):
            step()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - t0)
        times[k] = 1000.0 * best
    return times


@contextlib.contextmanager
def threads_for_one_process(requested=None, environ=None, n_cores=None, load=None, make_step=None):
    """Inside the block the compiled loops and the convolutions' chunks of images use the count
    `chosen_threads_for_one_process` picks, and BLAS one thread; yields the one line to tell the
    user. The old counts come back after.

    Why BLAS stays at one: the numpy backend splits each convolution's chunks of images over
    our threads, so its matrix products already run side by side; a multi-threaded BLAS only
    adds threads that keep spinning after a product and take a core from ours (alexnet-mini,
    batch 128, 2 cores, one run: 221 ms a step with BLAS on 2 threads, 174 ms on 1).

    `make_step`: makes a function running one training step's forward and backward (called only
    when needed). When the count was not chosen by the user (flag or environment) and is above 1,
    both 1 and that count are timed on that function at start (`measured_at_start`) and more
    threads are kept only if they are faster: on the 2-core machine docs/cpu.md measures, 2
    threads were slower than 1 even when it was idle."""
    from .backends import cpu_loops

    chosen = threads_the_user_chose(requested, environ)
    n, why = chosen or idle_threads(n_cores, load)
    before = cpu_loops.threads()
    try:
        if chosen is None and n > 1 and make_step is not None:
            times = measured_at_start(make_step(), n)
            best = n if times[n] < 0.95 * times[1] else 1  # a tie keeps 1 thread: less to go wrong
            why += (f"; measured at start, a step took {times[1]:.0f} ms on 1 thread and {times[n]:.0f} ms "
                    f"on {n}")
            n = best
        loops = cpu_loops.use_threads(n)
        with limit_blas_threads(1):
            extra = "" if loops == n else f"; compiled loops: {loops}, Numba's pool"
            yield f"threads: {n} ({why}{extra})"
    finally:
        cpu_loops.use_threads(before)
