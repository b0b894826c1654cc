"""The NumPy reference backend: the ground truth every CUDA kernel is tested against.

Clear and vectorised: convolution is im2col (a strided window view copied into
a matrix) followed by one BLAS matrix multiply; pooling picks the max of each
window view; the rest are a few array expressions. See `minasgd.backends` for
the op contract.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..kernels import dropout_hash, shapes

NAME = "numpy-reference"  # `backends.get(NAME)`; numpy_fast is "numpy"
DEVICE = "CPU (NumPy)"
F32 = np.float32


def _c(a):
    """Contiguous result. Ops keep their input dtype (float32 in use; float64 inside gradchecks)."""
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------- convolution

def _pad(x, pad):
    if pad == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def im2col(x, r, s, stride, pad):
    """x (N, C, H, W) -> cols (C*R*S, N*P*Q).

    Column (n, p, q) holds the input patch under output pixel (p, q) of image n,
    so the convolution is one matrix product: y = w.reshape(K, C*R*S) @ cols.
    Rows are ordered (c, r, s) like the weights; columns (n, p, q) keep each
    output row contiguous, which makes the copy below fast.
    """
    c = x.shape[1]
    xc = _pad(x, pad).transpose(1, 0, 2, 3)  # (C, N, Hp, Wp)
    windows = sliding_window_view(xc, (r, s), axis=(2, 3))[:, :, ::stride, ::stride]  # (C, N, P, Q, R, S)
    n, p, q = windows.shape[1:4]
    return windows.transpose(0, 4, 5, 1, 2, 3).reshape(c * r * s, n * p * q)  # the reshape copies


def col2im(cols, x_shape, r, s, stride, pad, p, q):
    """Adjoint of im2col: add every patch column back where it came from -> (N, C, H, W)."""
    n, c, h, w = x_shape
    dxc = np.zeros((c, n, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    patches = cols.reshape(c, r, s, n, p, q)
    for i in range(r):
        for j in range(s):
            dxc[:, :, i : i + stride * p : stride, j : j + stride * q : stride] += patches[:, i, j]
    return dxc[:, :, pad : pad + h, pad : pad + w].transpose(1, 0, 2, 3)


def conv2d_forward(x, w, b, stride=1, pad=0):
    # x: (N, C, H, W), w: (K, C, R, S), b: (K,) -> y: (N, K, P, Q)
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad, b.shape)
    cols = im2col(x, w.shape[2], w.shape[3], stride, pad)
    y = w.reshape(k, -1) @ cols  # (K, N*P*Q)
    y += b[:, None]
    return _c(y.reshape(k, n, p, q).transpose(1, 0, 2, 3))


def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True):
    # dy: (N, K, P, Q) -> dx: (N, C, H, W) (None unless need_dx), dw: (K, C, R, S), db: (K,); all fresh
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad)
    shapes.check_same_shape("conv2d_backward dy", dy.shape, (n, k, p, q))
    r, s = w.shape[2:]
    dy_k = _c(dy.transpose(1, 0, 2, 3)).reshape(k, n * p * q)
    cols = im2col(x, r, s, stride, pad)
    dw = (dy_k @ cols.T).reshape(w.shape)
    db = dy_k.sum(axis=1)
    if not need_dx:
        return None, _c(dw), _c(db)
    dcols = w.reshape(k, -1).T @ dy_k  # (C*R*S, N*P*Q)
    dx = col2im(dcols, x.shape, r, s, stride, pad, p, q)
    return _c(dx), _c(dw), _c(db)


# ---------------------------------------------------------------- max pooling

def maxpool2d_forward(x, size=3, stride=2):
    # x: (N, C, H, W) -> y: (N, C, P, Q), argmax: (N, C, P, Q) int32 index into the H*W plane
    n, c, p, q = shapes.pool2d_output_shape(x.shape, size, stride)
    w_in = x.shape[3]
    # Visit the window offsets in row-major order; a strictly larger value takes over,
    # so ties keep the first maximum (the CUDA kernel scans the same way).
    y = x[:, :, 0 : stride * p : stride, 0 : stride * q : stride].copy()
    offset = np.zeros((n, c, p, q), dtype=np.int32)  # where in its window each max sits: i * W + j
    for i in range(size):
        for j in range(size):
            candidate = x[:, :, i : i + stride * p : stride, j : j + stride * q : stride]
            better = candidate > y
            np.maximum(y, candidate, out=y)
            np.copyto(offset, i * w_in + j, where=better)
    corner = (np.arange(p, dtype=np.int32)[:, None] * w_in + np.arange(q, dtype=np.int32)[None, :]) * stride
    return y, corner + offset


def maxpool2d_backward(dy, argmax, x_shape, size=None, stride=None):
    # dy, argmax: (N, C, P, Q) -> dx: (N, C, H, W); windows that overlap add their gradients
    # (size and stride are part of the contract for the cuda gather kernel; argmax suffices here)
    n, c, h, w = x_shape
    shapes.check_same_shape("maxpool2d_backward argmax", argmax.shape, dy.shape)
    plane = np.arange(n * c, dtype=np.int64).reshape(n, c, 1, 1) * (h * w)
    dx = np.bincount((plane + argmax).ravel(), weights=dy.ravel(), minlength=n * c * h * w)
    return dx.reshape(x_shape).astype(dy.dtype)


# ---------------------------------------------------------------- elementwise

def relu_forward(x):
    return np.maximum(x, F32(0))


def relu_backward(dy, y):
    shapes.check_same_shape("relu_backward", dy.shape, y.shape)
    return dy * (y > 0)


def _dropout(a, p, seed):
    shapes.check_dropout_p(p)
    if p == 0.0:
        return a.copy()
    keep = dropout_hash.keep_mask(seed, a.size, p).reshape(a.shape)
    scale = F32(1.0 / (1.0 - p))
    return np.where(keep, a * scale, F32(0)).astype(a.dtype, copy=False)


def dropout_forward(x, p, seed):
    """Inverted dropout: keep with probability 1-p and scale by 1/(1-p); mask from (seed, index)."""
    return _dropout(x, p, seed)


def dropout_backward(dy, p, seed):
    """The same mask and scale applied to the incoming gradient."""
    return _dropout(dy, p, seed)


# ---------------------------------------------------------------- fully connected

def linear_forward(x, w, b):
    # x: (N, D), w: (M, D), b: (M,) -> y: (N, M)
    shapes.linear_output_shape(x.shape, w.shape, b.shape)
    y = x @ w.T
    y += b
    return _c(y)


def linear_backward(dy, x, w):
    # dy: (N, M) -> dx: (N, D), dw: (M, D), db: (M,)
    shapes.check_same_shape("linear_backward dy", dy.shape, shapes.linear_output_shape(x.shape, w.shape))
    return _c(dy @ w), _c(dy.T @ x), _c(dy.sum(axis=0))


# ---------------------------------------------------------------- loss

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient."""
    shapes.check_logits_labels(logits.shape, labels.shape)
    n, m = logits.shape
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= m):
        raise ValueError(f"softmax_cross_entropy: labels must be in [0, {m}), got {labels.min()}..{labels.max()}")
    shifted = logits - logits.max(axis=1, keepdims=True)  # stable: the largest exponent is 0
    e = np.exp(shifted)
    total = e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    log_p = shifted[rows, labels] - np.log(total[:, 0])
    dlogits = e / total
    dlogits[rows, labels] -= F32(1)
    dlogits /= n
    loss = np.array([-log_p.mean()], dtype=logits.dtype)
    return loss, _c(dlogits)


# ---------------------------------------------------------------- optimizer

def sgd_update(w, g, v, lr, momentum=0.0, weight_decay=0.0):
    """In place: v = momentum*v + g + weight_decay*w; w -= lr*v. All flat float32 vectors."""
    shapes.check_same_shape("sgd_update", w.shape, g.shape)
    shapes.check_same_shape("sgd_update", w.shape, v.shape)
    v *= F32(momentum)
    v += g
    if weight_decay:
        v += F32(weight_decay) * w
    w -= F32(lr) * v


def axpy(y, a, x):
    """In place: y += a * x (e.g. summing gradients into an accumulator)."""
    shapes.check_same_shape("axpy", y.shape, x.shape)
    y += F32(a) * x


# ---------------------------------------------------------------- memory

def asarray(a):
    """A contiguous array; floating-point input becomes float32 (the hot path is float32 only)."""
    a = np.asarray(a)
    return np.ascontiguousarray(a, dtype=F32 if a.dtype.kind == "f" else a.dtype)


def to_numpy(a):
    return np.asarray(a)


def zeros(shape, dtype=F32):
    return np.zeros(shape, dtype=dtype)


def copy_into(dst, src):
    shapes.check_same_shape("copy_into", dst.shape, src.shape)
    dst[...] = src


def synchronize():
    """Nothing to wait for on the CPU (the cuda backend waits for the GPU here)."""
