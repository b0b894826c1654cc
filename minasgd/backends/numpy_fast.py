"""The NumPy backend's fast path: the same ops and results as `numpy_backend`, in less time.

`numpy_backend` stays the readable ground truth. Training spends nearly all its time in
convolution and max-pooling, so this module redoes only those three ops and takes every other
op from the reference unchanged. `minasgd.backends.get("numpy")` returns this module;
`get("numpy-reference")` returns the reference. Tests compare the two and gradcheck both.

What is different, and why (each kept because it paid, measured against the reference in the
same run: `minasgd bench step`, and op by op at alexnet-mini's sizes):

  * Buffers kept across calls. A training run calls every op with the same shapes every step,
    so the padded input, the im2col matrix and the col2im scratch are allocated once (per
    shape) and reused: no page faults on hundreds of MB per step. Only results are fresh.
  * The forward's im2col matrix is kept for the backward, which then skips rebuilding it. It
    is reused only if backward gets the same array object *and* its values still equal the
    copy the forward padded (checked exactly, a cheap pass over x), else it is rebuilt.
  * The forward's product goes into a kept buffer, and one pass both moves it to NCHW and adds
    the bias. (N per-image products writing NCHW directly cost the same on one thread, but a
    multi-threaded BLAS synchronises its threads once per product: 2-15x slower on 2 threads.)
  * Max-pooling forward first copies the nine window offsets into contiguous slabs, then
    scans them (compare, max, and the winning offset as max(which, k * better)); the
    reference's nine strided passes with np.copyto(where=) are several times slower.

The price is memory: each thread keeps its buffers, about 380 MB for alexnet-mini at batch
128 (im2col matrices, products, col2im scratch, pooling windows), never more than 1 GiB: past
that they are all dropped and made anew.

Tried and dropped (no gain here): max-pooling by separable row/column maxima, on flat shifted
views, or in an (H, W, N, C) layout; the max-pool backward as nine strided adds, or by phases
of the stride, instead of the reference's one bincount; the input gradient as R*S small
products added in place, or col2im over rows padded to the full width, instead of one product
and the reference's col2im.
"""

import threading

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..kernels import shapes
from .numpy_backend import (  # noqa: F401  (the ops this module does not redo)
    F32, asarray, axpy, copy_into, dropout_backward, dropout_forward, linear_backward, linear_forward,
    maxpool2d_backward, relu_backward, relu_forward, sgd_update, softmax_cross_entropy, synchronize, to_numpy, zeros,
)

NAME = "numpy"
DEVICE = "CPU (NumPy, fast path)"

_MAX_BYTES = 1 << 30  # kept per thread; past this the buffers start over (e.g. many batch sizes)
_local = threading.local()  # each thread its own buffers: threads training side by side never share one


def _caches():
    """This thread's (buffers, conv cache); the conv cache maps (x shape, w shape, stride, pad,
    dtype) to the latest forward's (x, padded x, cols)."""
    if not hasattr(_local, "buffers"):
        _local.buffers, _local.conv = {}, {}
    return _local.buffers, _local.conv


def _buffer(role, shape, dtype):
    """A scratch array kept for the next call with the same role, shape and dtype (contents undefined)."""
    buffers, conv = _caches()
    key = (role, tuple(shape), np.dtype(dtype))
    a = buffers.get(key)
    if a is None:
        a = np.empty(shape, dtype=dtype)
        if sum(b.nbytes for b in buffers.values()) + a.nbytes > _MAX_BYTES:
            buffers.clear()
            conv.clear()
        buffers[key] = a
    return a


# ---------------------------------------------------------------- convolution

def _im2col(x, r, s, stride, pad, p, q):
    """Fill the kept buffers: padded (C, N, Hp, Wp) copy of x, then cols (C*R*S, N*P*Q) as in the reference."""
    n, c, h, w = x.shape
    xp = _buffer("conv.xpad", (c, n, h + 2 * pad, w + 2 * pad), x.dtype)
    if pad:  # only the border needs zeros; the interior is overwritten just below
        xp[:, :, :pad], xp[:, :, h + pad :] = 0, 0
        xp[:, :, :, :pad], xp[:, :, :, w + pad :] = 0, 0
    xp[:, :, pad : pad + h, pad : pad + w] = x.transpose(1, 0, 2, 3)
    cols = _buffer("conv.cols", (c, r, s, n, p, q), x.dtype)
    windows = sliding_window_view(xp, (r, s), axis=(2, 3))[:, :, ::stride, ::stride]  # (C, N, P, Q, R, S)
    np.copyto(cols, windows.transpose(0, 4, 5, 1, 2, 3))
    return xp, cols.reshape(c * r * s, n * p * q)


def _cols_for(x, w_shape, stride, pad, p, q):
    """The im2col matrix of x: the one the forward built if x is unchanged since, else a new one."""
    key = (x.shape, tuple(w_shape), stride, pad, x.dtype)
    entry = _caches()[1].get(key)
    if entry is not None and entry[0] is x:
        _, xp, cols = entry
        h, w = x.shape[2:]
        if np.array_equal(xp[:, :, pad : pad + h, pad : pad + w], x.transpose(1, 0, 2, 3)):
            return cols
    xp, cols = _im2col(x, w_shape[2], w_shape[3], stride, pad, p, q)
    _caches()[1][key] = (x, xp, cols)
    return cols


def conv2d_forward(x, w, b, stride=1, pad=0):
    # x: (N, C, H, W), w: (K, C, R, S), b: (K,) -> y: (N, K, P, Q)
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad, b.shape)
    cols = _cols_for(x, w.shape, stride, pad, p, q)
    dtype = np.result_type(x, w)
    y_k = _buffer("conv.y_k", (k, n * p * q), dtype)
    np.matmul(w.reshape(k, -1), cols, out=y_k)  # (K, N*P*Q), one product
    y = np.empty((n, k, p * q), dtype=dtype)
    np.add(y_k.reshape(k, n, p * q).transpose(1, 0, 2), b[:, None], out=y)  # to NCHW and the bias, one pass
    return y.reshape(n, k, p, q)


def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True):
    # dy: (N, K, P, Q) -> dx: (N, C, H, W) (None unless need_dx), dw: (K, C, R, S), db: (K,); all fresh
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad)
    shapes.check_same_shape("conv2d_backward dy", dy.shape, (n, k, p, q))
    c, r, s = w.shape[1:]
    dy_k = _buffer("conv.dy_k", (k, n, p, q), dy.dtype)
    np.copyto(dy_k, dy.transpose(1, 0, 2, 3))
    dy_k = dy_k.reshape(k, n * p * q)
    cols = _cols_for(x, w.shape, stride, pad, p, q)
    dw = (dy_k @ cols.T).reshape(w.shape)
    db = dy_k.sum(axis=1)
    if not need_dx:
        return None, dw, db
    dcols = _buffer("conv.dcols", (c * r * s, n * p * q), dy.dtype)
    np.matmul(w.reshape(k, -1).T, dy_k, out=dcols)
    h, wd = x.shape[2:]
    dxp = _buffer("conv.dxpad", (c, n, h + 2 * pad, wd + 2 * pad), dy.dtype)
    dxp[...] = 0
    patches = dcols.reshape(c, r, s, n, p, q)
    for i in range(r):
        for j in range(s):
            dxp[:, :, i : i + stride * p : stride, j : j + stride * q : stride] += patches[:, i, j]
    return np.ascontiguousarray(dxp[:, :, pad : pad + h, pad : pad + wd].transpose(1, 0, 2, 3)), dw, db


# ---------------------------------------------------------------- max pooling

def maxpool2d_forward(x, size=3, stride=2):
    # x: (N, C, H, W) -> y: (N, C, P, Q), argmax: (N, C, P, Q) int32 index into the H*W plane
    n, c, p, q = shapes.pool2d_output_shape(x.shape, size, stride)
    w_in = x.shape[3]
    # One copy lays the size*size window offsets out as contiguous (N, C, P, Q) slabs; on strided
    # views every pass below would run ~10x slower (NumPy loops over rows of only Q elements).
    windows = _buffer("pool.windows", (size, size, n, c, p, q), x.dtype)
    np.copyto(windows, sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
              .transpose(4, 5, 0, 1, 2, 3))
    windows = windows.reshape(size * size, n, c, p, q)
    # The reference's scan: offsets in row-major order, a strictly larger value takes over, so
    # ties keep the first maximum. `which` is the winning offset; k only grows, so "set it to k
    # where better" is max(which, k * better), a plain arithmetic pass.
    y = windows[0].copy()
    which = np.zeros((n, c, p, q), dtype=np.int8 if size * size < 128 else np.int32)
    better = np.empty((n, c, p, q), dtype=bool)
    for k in range(1, size * size):
        np.greater(windows[k], y, out=better)
        np.maximum(which, better.astype(which.dtype) * which.dtype.type(k), out=which)
        np.maximum(y, windows[k], out=y)
    offsets = np.array([i * w_in + j for i in range(size) for j in range(size)], dtype=np.int32)
    argmax = offsets.take(which)
    argmax += (np.arange(p, dtype=np.int32)[:, None] * w_in + np.arange(q, dtype=np.int32)[None, :]) * stride
    return y, argmax
