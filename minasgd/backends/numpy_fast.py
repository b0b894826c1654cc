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
  * On n threads (`cpu_loops.use_threads(n)`, which `minasgd.threads` sets for a one-process
    run) a convolution gives each thread a contiguous run of those chunks, with serial loops and
    ONE BLAS thread each: a product of 256 columns is too small for BLAS to split well, whole
    chunks side by side are not (alexnet-mini's conv2 backward: 1.9x on 2 cores). The weight
    gradient is summed in GROUPS fixed runs of chunks and then run by run, so 1, 2 or 3 threads
    give the same bits (tests/test_numpy_fast.py).

Tried and dropped: keeping the whole-batch im2col matrix from the forward for the backward
(the previous version of this module: 1.6x PyTorch's step, now about 1.1-1.2x); the rows-first
layout (im2row), whose products are faster but whose loops over runs of only S pixels cost more
than they save; more images per product (512 or 1024 columns: no gain).
"""

import threading
from concurrent.futures import ThreadPoolExecutor

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


def _im2col(x, r, s, stride, pad, p, q, im2col):
    """The im2col matrix (C, R, S, B, P, Q) of the few images x (B, C, H, W), in a kept buffer
    (`im2col`: the loop to build it with, `cpu_loops.im2col` or its serial version)."""
    b, c, h, w = x.shape
    xp = _buffer("conv.xpad", (b, c, h + 2 * pad, w + 2 * pad), x.dtype)
    if pad:  # only the border needs zeros; the interior is overwritten just below
        xp[:, :, :pad], xp[:, :, h + pad :] = 0, 0
        xp[:, :, :, :pad], xp[:, :, :, w + pad :] = 0, 0
    xp[:, :, pad : pad + h, pad : pad + w] = x
    cols = _buffer("conv.cols", (c, r, s, b, p, q), x.dtype)
    im2col(xp, stride, cols)
    return cols


# ---------------------------------------------------------------- the batch split across threads

GROUPS = 8  # the weight gradient's partial sums: see conv2d_backward
_pool = {"size": 0, "executor": None}
_pool_lock = threading.Lock()
_blas = {}  # threadpoolctl's view of NumPy's BLAS, looked up once (3 ms); limiting it then costs 25 us


def _split_threads(chunks, elements):
    """How many threads share a convolution's chunks: the loops' thread count
    (`cpu_loops.use_threads`), unless there are too few chunks or too few outputs to pay for it."""
    n = cpu_loops.threads()
    if n == 1 or chunks < 2 or elements < cpu_loops.PARALLEL_MIN_ELEMENTS:
        return 1
    return min(n, chunks)


def _on_threads(n, tasks):
    """Run the callables `tasks` on n threads, each with ONE BLAS thread (n of them side by side
    already use n cores; BLAS threads on top would fight over them); returns when all are done."""
    with _pool_lock:
        if _pool["size"] < n:  # grown, never shrunk: a thread that still uses the old one finishes
            _pool.update(size=n, executor=ThreadPoolExecutor(n, thread_name_prefix="minasgd-conv"))
        if "blas" not in _blas:
            from threadpoolctl import ThreadpoolController

            _blas["blas"] = ThreadpoolController().select(user_api="blas")
        executor = _pool["executor"]
    with _blas["blas"].limit(limits=1):
        for future in [executor.submit(task) for task in tasks]:
            future.result()


def _parts(count, n):
    """`count` items cut into n contiguous runs, as (start, stop) pairs, sizes differing by one at most."""
    return [(t * count // n, (t + 1) * count // n) for t in range(n)]


# ---------------------------------------------------------------- convolution

def images_per_product(p, q):
    """How many images one matrix product covers: enough for B*P*Q >= 256 columns (narrower
    products run BLAS below its pace), few enough that the im2col block stays in the cache."""
    return max(1, -(-256 // (p * q)))


def conv2d_forward(x, w, b, stride=1, pad=0):
    # x: (N, C, H, W), w: (K, C, R, S), b: (K,) -> y: (N, K, P, Q)
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad, b.shape)
    c, r, s = w.shape[1:]
    dtype = np.result_type(x, w)
    y = np.empty((n, k, p * q), dtype=dtype)
    w_k = w.reshape(k, c * r * s)
    chunk = images_per_product(p, q)
    starts = range(0, n, chunk)
    threads = _split_threads(len(starts), y.size)

    def forward(first, stop, im2col):
        for n0 in starts[first:stop]:
            images = min(chunk, n - n0)
            cols = _im2col(x[n0 : n0 + images], r, s, stride, pad, p, q, im2col)
            y_k = _buffer("conv.y_k", (k, images, p * q), dtype)
            np.matmul(w_k, cols.reshape(c * r * s, images * p * q), out=y_k.reshape(k, images * p * q))
            np.add(y_k.transpose(1, 0, 2), b[:, None], out=y[n0 : n0 + images])  # to NCHW, plus the bias

    if threads == 1:
        forward(0, len(starts), cpu_loops.im2col)
    else:  # each thread its own run of chunks: their outputs are disjoint, the bits the same
        _on_threads(threads, [lambda a=a, z=z: forward(a, z, cpu_loops.im2col.serial) for a, z in _parts(len(starts), threads)])
    return y.reshape(n, k, p, q)


def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True):
    # dy: (N, K, P, Q) -> dx: (N, C, H, W) (None unless need_dx), dw: (K, C, R, S), db: (K,); all fresh
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad)
    shapes.check_same_shape("conv2d_backward dy", dy.shape, (n, k, p, q))
    c, r, s = w.shape[1:]
    dtype = np.result_type(dy, x, w)
    w_k = w.reshape(k, c * r * s)
    dx = np.empty(x.shape, dtype=dtype) if need_dx else None
    chunk = images_per_product(p, q)
    starts = range(0, n, chunk)
    # dw (transposed: BLAS computes this product ~25% faster) is a sum over the chunks. It is
    # summed in GROUPS runs of chunks, each in chunk order, and then the runs in order: threads
    # take whole runs, so every thread count gives the same bits.
    groups = _parts(len(starts), min(GROUPS, len(starts)))
    dw_groups = np.zeros((len(groups), c * r * s, k), dtype=dtype)

    def backward(group_first, group_stop, im2col, col2im):
        for g in range(group_first, group_stop):
            for n0 in starts[groups[g][0] : groups[g][1]]:
                images = min(chunk, n - n0)
                cols = _im2col(x[n0 : n0 + images], r, s, stride, pad, p, q, im2col)  # again: cheaper than keeping it
                dy_k = _buffer("conv.dy_k", (k, images, p * q), dtype)
                np.copyto(dy_k, dy[n0 : n0 + images].reshape(images, k, p * q).transpose(1, 0, 2))
                dy_k = dy_k.reshape(k, images * p * q)
                dw_part = _buffer("conv.dw_part", (c * r * s, k), dtype)
                np.matmul(cols.reshape(c * r * s, images * p * q), dy_k.T, out=dw_part)
                dw_groups[g] += dw_part
                if need_dx:
                    dcols = _buffer("conv.dcols", (c, r, s, images, p, q), dtype)
                    np.matmul(w_k.T, dy_k, out=dcols.reshape(c * r * s, images * p * q))
                    dxp = _buffer("conv.dxpad", (images, c, x.shape[2] + 2 * pad, x.shape[3] + 2 * pad), dtype)
                    col2im(dcols, stride, dxp)
                    dx[n0 : n0 + images] = dxp[:, :, pad : pad + x.shape[2], pad : pad + x.shape[3]]

    threads = _split_threads(len(groups), dy.size)
    if threads == 1:
        backward(0, len(groups), cpu_loops.im2col, cpu_loops.col2im)
    else:
        serial = (cpu_loops.im2col.serial, cpu_loops.col2im.serial)
        _on_threads(threads, [lambda a=a, z=z: backward(a, z, *serial) for a, z in _parts(len(groups), threads)])
    dw_t = dw_groups[0]
    for part in dw_groups[1:]:
        dw_t += part
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
