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
"""

from numba import njit
from numba import uint64 as U

# A word on the U(...) around flat indices: NumPy lets a[-1] mean the last element, so Numba
# checks every signed index for "negative?" and wraps it. That check alone made these loops 4x
# slower. An unsigned index can't be negative, so the check (and the slowness) disappears.


@njit(cache=True, nogil=True)
def im2col(xp, stride, cols):
    """cols (C, R, S, B, P, Q) <- the patches of the B zero-padded images xp (B, C, Hp, Wp).

    cols[c, i, j, b, p, q] = xp[b, c, p*stride + i, q*stride + j]. Reshaped to (C*R*S, B*P*Q)
    it is the matrix whose product with the weights (K, C*R*S) is the convolution: the layout
    of `numpy_backend.im2col`. Each output row of Q values is one short run of loads.
    """
    n_c, n_r, n_s, n_b, n_p, n_q = cols.shape
    hp, wp = xp.shape[2], xp.shape[3]
    src, dst = xp.reshape(xp.size), cols.reshape(cols.size)  # flat views
    out = U(0)  # where the next row of cols starts: cols is written in order
    for c in range(n_c):
        for i in range(n_r):
            for j in range(n_s):
                for b in range(n_b):
                    for p in range(n_p):
                        start = U(((b * n_c + c) * hp + p * stride + i) * wp + j)
                        for q in range(U(n_q)):
                            dst[out + q] = src[start + q * U(stride)]
                        out += U(n_q)


@njit(cache=True, nogil=True)
def col2im(dcols, stride, dxp):
    """dxp (B, C, Hp, Wp) <- the adjoint of im2col: every patch of dcols (C, R, S, B, P, Q)
    added back where im2col took it (overlapping patches add up). Overwrites dxp."""
    n_c, n_r, n_s, n_b, n_p, n_q = dcols.shape
    hp, wp = dxp.shape[2], dxp.shape[3]
    src, dst = dcols.reshape(dcols.size), dxp.reshape(dxp.size)
    dst[:] = 0
    row = U(0)  # where the next row of dcols starts
    for c in range(n_c):
        for i in range(n_r):
            for j in range(n_s):
                for b in range(n_b):
                    for p in range(n_p):
                        start = U(((b * n_c + c) * hp + p * stride + i) * wp + j)
                        for q in range(U(n_q)):
                            dst[start + q * U(stride)] += src[row + q]
                        row += U(n_q)


@njit(cache=True, nogil=True)
def maxpool_forward(x, size, stride, y, argmax):
    """y, argmax (N, C, P, Q) <- the max of each size x size window of x (N, C, H, W), stride apart.

    The window is scanned in row-major order and only a strictly larger value takes over, so a
    tie keeps the first maximum, as in the reference and the CUDA kernel. argmax is the index of
    the winner within its (H, W) plane.
    """
    n_n, n_c, n_p, n_q = y.shape
    h, w = x.shape[2], x.shape[3]
    src, best_out, where_out = x.reshape(x.size), y.reshape(y.size), argmax.reshape(argmax.size)
    out = U(0)  # y and argmax are written in order
    for plane in range(n_n * n_c):
        base = U(plane * h * w)
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


@njit(cache=True, nogil=True)
def maxpool_backward(dy, argmax, dx):
    """dx (N, C, H, W) <- each dy element added to the input element its window's max came from.
    Overwrites dx; overlapping windows that share a winner add up."""
    plane_in, plane_out = U(dx.shape[2] * dx.shape[3]), U(dy.shape[2] * dy.shape[3])
    grad, where, dst = dy.reshape(dy.size), argmax.reshape(argmax.size), dx.reshape(dx.size)
    dst[:] = 0
    for plane in range(dy.shape[0] * dy.shape[1]):
        base_in, base_out = U(plane) * plane_in, U(plane) * plane_out
        for k in range(plane_out):
            winner = U(where[base_out + k])  # a negative index becomes huge: caught just below
            if winner >= plane_in:
                raise IndexError("maxpool2d_backward: an argmax lies outside its input plane")
            dst[base_in + winner] += grad[base_out + k]


@njit(cache=True, nogil=True)
def relu_backward(dy, y, dx):
    """dx <- dy where y > 0, else 0 (flat arrays of one size)."""
    for i in range(U(dx.size)):
        dx[i] = dy[i] if y[i] > 0 else 0
