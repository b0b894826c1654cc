"""The CUDA backend: the op contract of `minasgd.backends` on hand-written Numba CUDA kernels.

Arrays are numba device arrays and stay on the GPU: parameters, gradients, activations, even
the loss (a 1-element array). Only `asarray` and `to_numpy` cross the bus. Every function
checks shapes with `minasgd.kernels.shapes` first, so mistakes fail exactly as on NumPy.
The kernels live in `minasgd.kernels` (one module per op family); this module is the glue.

Ops accept views of one flat parameter buffer, e.g. `flat[a:b].reshape(K, C, R, S)`: slicing
and reshaping a contiguous device array gives a device array sharing its memory.

Under `NUMBA_ENABLE_CUDASIM=1` everything runs on Numba's CUDA simulator (correct, very slow).
"""

import numpy as np
from numba import cuda

from minasgd.kernels import conv, elementwise, gemm, optim, pool, reduce, shapes, softmax
from minasgd.kernels.common import SIM, fill, is_device_array

from .errors import BackendError

NAME = "cuda"
DEVICE = "CUDA simulator" if SIM else "CUDA GPU (not selected yet)"
F32 = np.float32

# Which kernel version the backend uses where a module offers several (see `minasgd.kernels`).
CONV_VERSION = "tiled"
GEMM_VERSION = "tiled"
POOL_BACKWARD_VERSION = "scatter"  # "gather": deterministic (no atomics), needs size and stride


def select_device(device=None):
    """Use GPU number `device` (None: the current one, GPU 0 unless chosen before) and set DEVICE."""
    global DEVICE
    if SIM:
        DEVICE = "CUDA simulator" if device is None else f"CUDA simulator (GPU {device})"
        return DEVICE
    try:
        dev = cuda.select_device(int(device)) if device is not None else cuda.get_current_device()
    except Exception as e:  # CudaSupportError without a driver, or a bad device number
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BackendError(
            f"cuda backend: cannot use GPU {0 if device is None else device} ({reason}). "
            "Without a GPU, use the numpy backend, or set NUMBA_ENABLE_CUDASIM=1 before numba is "
            "imported to run the kernels on the (slow) CUDA simulator."
        ) from e
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    DEVICE = f"{name} (GPU {dev.id})"
    return DEVICE


# ---------------------------------------------------------------- memory

def asarray(a):
    """A contiguous device copy of a host array (a device array is returned as it is).

    Floating-point input becomes float32, so no float64 kernel is ever compiled by accident.
    """
    if is_device_array(a):
        return a
    a = np.asarray(a)
    return cuda.to_device(np.ascontiguousarray(a, dtype=F32 if a.dtype.kind == "f" else a.dtype))


def to_numpy(a):
    """A host copy (waits for the kernels that write `a`)."""
    if is_device_array(a):
        return a.copy_to_host()
    return np.asarray(a)


def zeros(shape, dtype=F32):
    """A device array filled with zeros by a kernel (fresh device memory is uninitialised)."""
    return fill(cuda.device_array(shape, dtype=dtype), 0)


def copy_into(dst, src):
    """dst[...] = src, device to device (src may also be a host array)."""
    shapes.check_same_shape("copy_into", dst.shape, src.shape)
    if not is_device_array(src):
        src = np.ascontiguousarray(src, dtype=dst.dtype)
    dst.copy_to_device(src)


def synchronize():
    """Wait until every queued kernel has finished (before timing, or reading the clock)."""
    cuda.synchronize()


# ---------------------------------------------------------------- convolution

def conv2d_forward(x, w, b, stride=1, pad=0):
    # x: (N, C, H, W), w: (K, C, R, S), b: (K,) -> y: (N, K, P, Q)
    return conv.conv2d_forward(x, w, b, stride, pad, version=CONV_VERSION)


def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True):
    # dy: (N, K, P, Q) -> dx: (N, C, H, W) (None unless need_dx), dw: (K, C, R, S), db: (K,); all fresh
    return conv.conv2d_backward(dy, x, w, stride, pad, need_dx=need_dx)


# ---------------------------------------------------------------- max pooling

def maxpool2d_forward(x, size=3, stride=2):
    # x: (N, C, H, W) -> y: (N, C, P, Q), argmax: (N, C, P, Q) int32 index into the H*W plane
    return pool.maxpool2d_forward(x, size, stride)


def maxpool2d_backward(dy, argmax, x_shape, size=None, stride=None):
    # dy, argmax: (N, C, P, Q) -> dx: (N, C, H, W); windows that overlap add their gradients.
    # With the window size and stride, POOL_BACKWARD_VERSION = "gather" picks the deterministic kernel.
    if POOL_BACKWARD_VERSION == "gather" and size is not None and stride is not None:
        return pool.maxpool2d_backward(dy, argmax, tuple(x_shape), version="gather", size=size, stride=stride)
    return pool.maxpool2d_backward(dy, argmax, tuple(x_shape), version="scatter")


# ---------------------------------------------------------------- elementwise

def relu_forward(x):
    return elementwise.relu_forward(x)


def relu_backward(dy, y):
    return elementwise.relu_backward(dy, y)


def dropout_forward(x, p, seed):
    """Inverted dropout: keep with probability 1-p and scale by 1/(1-p); mask from (seed, index)."""
    return elementwise.dropout(x, p, seed)


def dropout_backward(dy, p, seed):
    """The same mask and scale applied to the incoming gradient."""
    return elementwise.dropout(dy, p, seed)


# ---------------------------------------------------------------- fully connected

def linear_forward(x, w, b):
    # x: (N, D), w: (M, D), b: (M,) -> y: (N, M) = x w^T + b
    shapes.linear_output_shape(x.shape, w.shape, b.shape)
    return gemm.gemm(x, w, trans_b=True, bias=b, version=GEMM_VERSION)


def linear_backward(dy, x, w):
    # dy: (N, M) -> dx: (N, D) = dy w, dw: (M, D) = dy^T x, db: (M,) = sum_n dy
    shapes.check_same_shape("linear_backward dy", dy.shape, shapes.linear_output_shape(x.shape, w.shape))
    dx = gemm.gemm(dy, w, version=GEMM_VERSION)
    dw = gemm.gemm(dy, x, trans_a=True, version=GEMM_VERSION)
    db = reduce.sum_over_batch(dy)
    return dx, dw, db


# ---------------------------------------------------------------- loss

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against int32 labels (host or device) -> (loss[1], dlogits)."""
    return softmax.softmax_cross_entropy(logits, labels)


# ---------------------------------------------------------------- optimizer

def sgd_update(w, g, v, lr, momentum=0.0, weight_decay=0.0):
    """In place: v = momentum*v + g + weight_decay*w; w -= lr*v. All flat float32 device vectors."""
    optim.sgd_update(w, g, v, lr, momentum, weight_decay)


def axpy(y, a, x):
    """In place: y += a * x (e.g. summing gradients into an accumulator)."""
    optim.axpy(y, a, x)
