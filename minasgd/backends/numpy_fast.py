"""The NumPy backend's fast path: the same ops and results as `numpy_backend`, in less time.

`numpy_backend` stays the readable ground truth. Training spends nearly all its time in
convolution, max-pooling and the ReLU gradient, so this module redoes only those ops and takes
every other op from the reference unchanged. `minasgd.backends.get("numpy")` returns this
module; `get("numpy-reference")` returns the reference. Tests compare the two and gradcheck both.

What is different, and why (each kept because it paid, measured in `minasgd bench step` against
PyTorch in the same run, and op by op at alexnet-mini's sizes on one thread):

  * A few images per matrix product (Caffe's way), not the whole batch. The im2col block of a
    few images (C*R*S, B*P*Q) fits in the CPU's cache, so building it, multiplying it and, in
    the backward, adding it back (col2im) never go out to main memory. The whole-batch matrix
    of alexnet-mini's conv2 is 92 MB; a block of 2 images is 1.4 MB. B is the fewest images
    that give the product 256 columns (narrower products run BLAS below its pace).
  * The backward builds the block again instead of keeping the forward's: cheaper than
    writing 92 MB to memory and reading it back.
  * im2col, col2im, max-pooling and the ReLU gradient are loops compiled by Numba
    (`cpu_loops.py`): as NumPy expressions they were dozens of strided passes over short rows.
  * The weight gradient is computed transposed, cols @ dy^T -> (C*R*S, K): the same product,
    which OpenBLAS runs 20-30% faster in that orientation at these shapes.
  * Scratch buffers (padded images, im2col blocks, products) are kept per thread and shape and
    reused every step; only results are fresh arrays.

Tried and dropped: keeping the whole-batch im2col matrix from the forward for the backward
(the previous version of this module: 1.6x PyTorch's step, now about 1.1-1.2x); the rows-first
layout (im2row), whose products are faster but whose loops over runs of only S pixels cost more
than they save; more images per product (512 or 1024 columns: no gain).
"""

import threading

import numpy as np

from ..kernels import shapes
from . import cpu_loops
from .numpy_backend import (  # noqa: F401  (the ops this module does not redo)
    F32, asarray, axpy, copy_into, dropout_backward, dropout_forward, linear_backward, linear_forward,
    relu_forward, sgd_update, softmax_cross_entropy, synchronize, to_numpy, zeros,
)

NAME = "numpy"
DEVICE = "CPU (NumPy, fast path)"

_MAX_BYTES = 256 << 20  # kept per thread; past this the buffers start over (e.g. many batch sizes)
_local = threading.local()  # each thread its own buffers: threads training side by side never share one


def _buffers():
    """This thread's kept scratch arrays, by (role, shape, dtype)."""
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def _buffer(role, shape, dtype):
    """A scratch array kept for the next call with the same role, shape and dtype (contents undefined)."""
    buffers = _buffers()
    key = (role, tuple(shape), np.dtype(dtype))
    a = buffers.get(key)
    if a is None:
        a = np.empty(shape, dtype=dtype)
        if sum(b.nbytes for b in buffers.values()) + a.nbytes > _MAX_BYTES:
            buffers.clear()
        buffers[key] = a
    return a


# ---------------------------------------------------------------- convolution

def images_per_product(p, q):
    """How many images one matrix product covers: enough for B*P*Q >= 256 columns (narrower
    products run BLAS below its pace), few enough that the im2col block stays in the cache."""
    return max(1, -(-256 // (p * q)))


def _im2col(x, r, s, stride, pad, p, q):
    """The im2col matrix (C, R, S, B, P, Q) of the few images x (B, C, H, W), in a kept buffer."""
    b, c, h, w = x.shape
    xp = _buffer("conv.xpad", (b, c, h + 2 * pad, w + 2 * pad), x.dtype)
    if pad:  # only the border needs zeros; the interior is overwritten just below
        xp[:, :, :pad], xp[:, :, h + pad :] = 0, 0
        xp[:, :, :, :pad], xp[:, :, :, w + pad :] = 0, 0
    xp[:, :, pad : pad + h, pad : pad + w] = x
    cols = _buffer("conv.cols", (c, r, s, b, p, q), x.dtype)
    cpu_loops.im2col(xp, stride, cols)
    return cols


def conv2d_forward(x, w, b, stride=1, pad=0):
    # x: (N, C, H, W), w: (K, C, R, S), b: (K,) -> y: (N, K, P, Q)
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad, b.shape)
    c, r, s = w.shape[1:]
    dtype = np.result_type(x, w)
    y = np.empty((n, k, p * q), dtype=dtype)
    w_k = w.reshape(k, c * r * s)
    chunk = images_per_product(p, q)
    for n0 in range(0, n, chunk):
        images = min(chunk, n - n0)
        cols = _im2col(x[n0 : n0 + images], r, s, stride, pad, p, q)
        y_k = _buffer("conv.y_k", (k, images, p * q), dtype)
        np.matmul(w_k, cols.reshape(c * r * s, images * p * q), out=y_k.reshape(k, images * p * q))
        np.add(y_k.transpose(1, 0, 2), b[:, None], out=y[n0 : n0 + images])  # to NCHW, plus the bias
    return y.reshape(n, k, p, q)


def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True):
    # dy: (N, K, P, Q) -> dx: (N, C, H, W) (None unless need_dx), dw: (K, C, R, S), db: (K,); all fresh
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad)
    shapes.check_same_shape("conv2d_backward dy", dy.shape, (n, k, p, q))
    c, r, s = w.shape[1:]
    dtype = np.result_type(dy, x, w)
    w_k = w.reshape(k, c * r * s)
    dw_t = np.zeros((c * r * s, k), dtype=dtype)  # dw transposed: BLAS computes this product ~25% faster
    dx = np.empty(x.shape, dtype=dtype) if need_dx else None
    chunk = images_per_product(p, q)
    for n0 in range(0, n, chunk):
        images = min(chunk, n - n0)
        cols = _im2col(x[n0 : n0 + images], r, s, stride, pad, p, q)  # again: cheaper than keeping it
        dy_k = _buffer("conv.dy_k", (k, images, p * q), dtype)
        np.copyto(dy_k, dy[n0 : n0 + images].reshape(images, k, p * q).transpose(1, 0, 2))
        dy_k = dy_k.reshape(k, images * p * q)
        dw_part = _buffer("conv.dw_part", (c * r * s, k), dtype)
        np.matmul(cols.reshape(c * r * s, images * p * q), dy_k.T, out=dw_part)
        dw_t += dw_part
        if need_dx:
            dcols = _buffer("conv.dcols", (c, r, s, images, p, q), dtype)
            np.matmul(w_k.T, dy_k, out=dcols.reshape(c * r * s, images * p * q))
            dxp = _buffer("conv.dxpad", (images, c, x.shape[2] + 2 * pad, x.shape[3] + 2 * pad), dtype)
            cpu_loops.col2im(dcols, stride, dxp)
            dx[n0 : n0 + images] = dxp[:, :, pad : pad + x.shape[2], pad : pad + x.shape[3]]
    db = dy.sum(axis=(0, 2, 3), dtype=dtype)
    return dx, np.ascontiguousarray(dw_t.T).reshape(w.shape), db


# ---------------------------------------------------------------- max pooling

def maxpool2d_forward(x, size=3, stride=2):
    # x: (N, C, H, W) -> y: (N, C, P, Q), argmax: (N, C, P, Q) int32 index into the H*W plane
    n, c, p, q = shapes.pool2d_output_shape(x.shape, size, stride)
    y = np.empty((n, c, p, q), dtype=x.dtype)
    argmax = np.empty((n, c, p, q), dtype=np.int32)
    cpu_loops.maxpool_forward(np.ascontiguousarray(x), size, stride, y, argmax)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, size=None, stride=None):
    # dy, argmax: (N, C, P, Q) -> dx: (N, C, H, W); windows that overlap add their gradients
    shapes.check_same_shape("maxpool2d_backward argmax", argmax.shape, dy.shape)
    shapes.check_same_shape("maxpool2d_backward images and channels", tuple(x_shape[:2]), dy.shape[:2])
    dx = np.empty(x_shape, dtype=dy.dtype)
    cpu_loops.maxpool_backward(np.ascontiguousarray(dy), np.ascontiguousarray(argmax), dx)
    return dx


# ---------------------------------------------------------------- relu

def relu_backward(dy, y):
    shapes.check_same_shape("relu_backward", dy.shape, y.shape)
    dx = np.empty(dy.shape, dtype=dy.dtype)
    cpu_loops.relu_backward(np.ascontiguousarray(dy).ravel(), np.ascontiguousarray(y).ravel(), dx.ravel())
    return dx
