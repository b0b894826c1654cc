"""The loops of the NumPy fast path, compiled for the CPU by Numba (`@njit`).

NumPy does a pass over an array fast when its innermost axis is long and contiguous. im2col,
col2im and max-pooling are the opposite: many short strided rows (a 15-pixel output row, a 3x3
window), so as NumPy expressions they become dozens of slow strided passes. Written as plain
loops and compiled, each is one pass that reads its input once, while the matrix products stay
with NumPy's BLAS. The loops mirror the CUDA kernels in `kernels/` (`minasgd.kernels`): where a kernel
maps one thread to one output element, the loop here visits that element.

Every function fills an output array it is given (no allocation), works for float32 and
float64 (the gradchecks), and releases the GIL (`nogil`), so threads training side by side run
truly in parallel. `cache=True` keeps the machine code on disk: only the first run compiles.

Each loop is compiled twice from the one Python source: serially, and with its outer loop
(`prange`) split across Numba's threads. The public names (`im2col`, ...) run the serial one
unless `use_threads(n)` asked for n > 1 threads; `minasgd.threads` does that for a one-process
training run on an idle machine, never for workers. Every `prange` iteration writes its own
outputs (a row of cols, one image plane, one chunk of the flat arrays), and each output element
sums its terms in the serial order, so the results are bitwise the serial ones
(tests/test_numpy_fast.py checks that at 1 and 2 threads).
"""

import os
import types

# Numba's parallel loops run on OpenMP here, whose idle threads spin at full speed for a while
# after each loop, taking the core from BLAS's threads and from other processes. Passive waiting
# (set before OpenMP loads, unless the environment chose) measured on alexnet-mini, batch 128,
# BLAS and loops on 2 threads, load average 5 (one sample each): 13.8 s a step spinning, 4.5 s
# passive (1 thread: 0.3 s; the thread rule picks 1 at that load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402
from numba import uint64 as U  # noqa: E402

# A word on the U(...) around flat indices: NumPy lets a[-1] mean the last element, so Numba
# checks every signed index for "negative?" and wraps it. That check alone made these loops 4x
# slower. An unsigned index can't be negative, so the check (and the slowness) disappears.

_threads = 1  # the Numba threads the loops use: see use_threads
# Below this many output elements a loop runs serially whatever the thread count: starting and
# joining the threads costs more than the work. On a loaded 2-core machine each parallel call
# also waits for a thread the scheduler put aside: `micro` (small arrays) went from 13 ms a step
# with serial loops to 1,052 ms with every loop on two threads (load average 10, same run).
PARALLEL_MIN_ELEMENTS = 1 << 16


def use_threads(n):
    """Run the loops on `n` threads from now on (1: the serial versions, the default); returns
    the count in force, at most the Numba thread pool's size (NUMBA_NUM_THREADS, the core count)."""
    global _threads
    if int(n) < 1:
        raise ValueError(f"threads: expected 1 or more, got {n}")
    _threads = min(int(n), numba.config.NUMBA_NUM_THREADS)
    return _threads


def threads():
    """The thread count the loops use now."""
    return _threads


def _serial_and_parallel(py_func):
    """(serial, parallel) compiled versions of `py_func`. The serial copy gets its own qualified
    name, so Numba's on-disk cache keeps the two apart (its index doesn't record `parallel`)."""
    copy = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial",
                              py_func.__defaults__, py_func.__closure__)
    copy.__qualname__ = py_func.__qualname__ + "_serial"
    copy.__doc__ = py_func.__doc__
    return njit(cache=True, nogil=True)(copy), njit(cache=True, nogil=True, parallel=True)(py_func)


def _dispatching(py_func):
    """The public loop: the serial version on one thread or a small output (its last argument),
    the parallel one otherwise."""
    serial, parallel = _serial_and_parallel(py_func)

    def run(*args):
        if _threads == 1 or args[-1].size < PARALLEL_MIN_ELEMENTS:
            return run.serial(*args)
        numba.set_num_threads(_threads)  # per calling thread in Numba: set where the loop runs
        return run.parallel(*args)

    run.__name__, run.__qualname__, run.__doc__ = py_func.__name__, py_func.__qualname__, py_func.__doc__
    run.serial, run.parallel = serial, parallel
    return run


@_dispatching
def im2col(xp, stride, cols):
    """cols (C, R, S, B, P, Q) <- the patches of the B zero-padded images xp (B, C, Hp, Wp).

    cols[c, i, j, b, p, q] = xp[b, c, p*stride + i, q*stride + j]. Reshaped to (C*R*S, B*P*Q)
    it is the matrix whose product with the weights (K, C*R*S) is the convolution: the layout
    of `numpy_backend.im2col`. Each output row of Q values is one short run of loads. In
    parallel, each thread takes whole rows (c, i, j) of that matrix.
    """
    n_c, n_r, n_s, n_b, n_p, n_q = cols.shape
    hp, wp = xp.shape[2], xp.shape[3]
    src, dst = xp.reshape(xp.size), cols.reshape(cols.size)  # flat views
    row_len = n_b * n_p * n_q
    for row in prange(n_c * n_r * n_s):
        c, i, j = row // (n_r * n_s), (row // n_s) % n_r, row % n_s
        out = U(row * row_len)  # where this row of cols starts: the row is written in order
        for b in range(n_b):
            for p in range(n_p):
                start = U(((b * n_c + c) * hp + p * stride + i) * wp + j)
                for q in range(U(n_q)):
                    dst[out + q] = src[start + q * U(stride)]
                out += U(n_q)


@_dispatching
def col2im(dcols, stride, dxp):
    """dxp (B, C, Hp, Wp) <- the adjoint of im2col: every patch of dcols (C, R, S, B, P, Q)
    added back where im2col took it (overlapping patches add up). Overwrites dxp.

    In parallel, each thread takes whole image planes (b, c): patches overlap only within a
    plane, so no two threads add into one element, and each element gets its terms in the
    serial order (i, then j).
    """
    n_c, n_r, n_s, n_b, n_p, n_q = dcols.shape
    hp, wp = dxp.shape[2], dxp.shape[3]
    src, dst = dcols.reshape(dcols.size), dxp.reshape(dxp.size)
    for plane in prange(n_b * n_c):
        b, c = plane // n_c, plane % n_c
        base = U(plane * hp * wp)
        for k in range(U(hp * wp)):
            dst[base + k] = 0
        for i in range(n_r):
            for j in range(n_s):
                row = U((((c * n_r + i) * n_s + j) * n_b + b) * n_p * n_q)  # dcols[c, i, j, b]
                for p in range(n_p):
                    start = base + U((p * stride + i) * wp + j)
                    for q in range(U(n_q)):
                        dst[start + q * U(stride)] += src[row + q]
                    row += U(n_q)


@_dispatching
def maxpool_forward(x, size, stride, y, argmax):
    """y, argmax (N, C, P, Q) <- the max of each size x size window of x (N, C, H, W), stride apart.

    The window is scanned in row-major order and only a strictly larger value takes over, so a
    tie keeps the first maximum, as in the reference and the CUDA kernel. argmax is the index of
    the winner within its (H, W) plane. In parallel, each thread takes whole planes.
    """
    n_n, n_c, n_p, n_q = y.shape
    h, w = x.shape[2], x.shape[3]
    src, best_out, where_out = x.reshape(x.size), y.reshape(y.size), argmax.reshape(argmax.size)
    for plane in prange(n_n * n_c):
        base = U(plane * h * w)
        out = U(plane * n_p * n_q)  # this plane's y and argmax are written in order
        for p in range(n_p):
            for q in range(n_q):
                top, left = p * stride, q * stride
                where = U(top * w + left)
                best = src[base + where]
                for i in range(size):
                    for j in range(size):
                        k = U((top + i) * w + left + j)
                        if src[base + k] > best:
                            best, where = src[base + k], k
                best_out[out] = best
                where_out[out] = where
                out += U(1)


@_dispatching
def maxpool_backward(dy, argmax, dx):
    """dx (N, C, H, W) <- each dy element added to the input element its window's max came from.
    Overwrites dx; overlapping windows that share a winner add up. In parallel, each thread
    takes whole planes (a winner lies in its own window's plane: checked)."""
    plane_in, plane_out = U(dx.shape[2] * dx.shape[3]), U(dy.shape[2] * dy.shape[3])
    grad, where, dst = dy.reshape(dy.size), argmax.reshape(argmax.size), dx.reshape(dx.size)
    outside = 0  # planes with an argmax outside their input plane (raised after the loop)
    for plane in prange(dy.shape[0] * dy.shape[1]):
        base_in, base_out = U(plane) * plane_in, U(plane) * plane_out
        for k in range(plane_in):
            dst[base_in + k] = 0
        for k in range(plane_out):
            winner = U(where[base_out + k])  # a negative index becomes huge: caught just below
            if winner >= plane_in:
                outside += 1
                break
            dst[base_in + winner] += grad[base_out + k]
    if outside:
        raise IndexError("maxpool2d_backward: an argmax lies outside its input plane")


@_dispatching
def relu_backward(dy, y, dx):
    """dx <- dy where y > 0, else 0 (flat arrays of one size). In parallel: chunks of the arrays."""
    for i in prange(dx.size):
        dx[U(i)] = dy[U(i)] if y[U(i)] > 0 else 0
