"""Timing helpers for the benchmarks: one home for "warm up, then take the median".

A benchmark passes `sync`, which waits for queued device work (`be.synchronize`,
`cuda.synchronize`), so that the clock stops when the work is done, not when it was queued.
"""

import statistics
import time


def median_seconds(fn, repeats=7, calls=1, sync=lambda: None, warmup=1):
    """Median seconds per call of fn(): `warmup` calls first, then `repeats` timings of `calls`
    back-to-back calls each (several calls per timing keep short kernels above the clock's noise)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def rate(fn, seconds, warmup=3):
    """Calls per second of fn(), run for about `seconds` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def usable_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
