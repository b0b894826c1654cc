"""`with racecheck(): launch(...)`: run kernels under the race checker, fail on the first race.

On the CUDA simulator a plain `+=` where `cuda.atomic.add` is needed almost always still gives
the right numbers, and a missing `cuda.syncthreads()` gives wrong numbers only on the launches
where the threads happen to interleave badly (tutorial 9 shows both). The
grading tests of the atomic and barrier tasks (3.2 max-pool scatter, 5.1 tiled GEMM, 7.1 block
sum) wrap their launches in this, so such a kernel fails with RaceError naming the kernel, the
array element and the two threads (`kernels/racecheck.py`). On a real GPU it does nothing.
"""

import contextlib

from numba import config

from minasgd.kernels import racecheck as _rc

SIM = bool(config.ENABLE_CUDASIM)
RaceError = _rc.RaceError


@contextlib.contextmanager
def racecheck():
    """The race checker around the kernel launches inside the block (simulator only)."""
    if not SIM:
        yield None
        return
    with _rc.checking() as races:
        yield races
    races.assert_clean()
