"""How many threads the BLAS under NumPy may use in a training process: decided once, and said.

The rule, for every process that trains (a single-process run, each worker on either transport,
the parameter server, each experiment run, the tutorials): ONE BLAS thread, unless the environment names a count in
OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or MKL_NUM_THREADS (the first one set wins).

Why one: our matrix products are a few milliseconds each, and a multi-threaded BLAS spins
threads that fight other processes for the cores. On a busy 2-core machine a `--workers 0`
run of `tiny` went from 329 to 6,536 images/s with one thread; parallelism comes from
workers (one process per core), not from BLAS. A quiet machine with cores to spare and a
big net may do better with more: say so in the environment.

    with blas_threads_for_training() as line:   # "BLAS threads: 1 (one per training process ...)"
        ...train...

threadpoolctl changes the count of the BLAS NumPy already loaded (an environment variable is
read only when the library loads), and puts the old count back on leaving the block.
"""

import contextlib
import os

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
