"""Backends: one op contract, two implementations.

    be = minasgd.backends.get("numpy")   # runs anywhere: the reference's fast path (numpy_fast)
    be = minasgd.backends.get("numpy-reference")   # the readable ground truth (numpy_backend)
    be = minasgd.backends.get("cuda")    # hand-written Numba CUDA kernels
    be = minasgd.backends.get("auto")    # cuda when a GPU is present, else numpy

Every backend offers the same functions, all float32, images NCHW:

  memory      asarray(np_array) -> array (floats become float32)    to_numpy(array) -> np.ndarray
              zeros(shape) -> array             copy_into(dst, src)  (dst[...] = src)
              synchronize()  (wait for queued GPU work)      NAME, DEVICE  (strings)
  conv        conv2d_forward(x[N,C,H,W], w[K,C,R,S], b[K], stride, pad) -> y[N,K,P,Q]
                  P = (H + 2*pad - R) // stride + 1, Q likewise
              conv2d_backward(dy, x, w, stride, pad, need_dx=True) -> (dx, dw, db)
                  need_dx=False skips the input gradient and returns dx = None
  pooling     maxpool2d_forward(x, size, stride) -> (y, argmax)
                  floor output size; argmax int32, the index within the (n, c) input plane
              maxpool2d_backward(dy, argmax, x_shape, size=None, stride=None) -> dx
                  overlapping windows accumulate; with the window size and stride a backend
                  may use a deterministic gather (cuda: POOL_BACKWARD_VERSION = "gather")
  relu        relu_forward(x) -> y           relu_backward(dy, y) -> dx
  dropout     dropout_forward(x, p, seed) -> y    dropout_backward(dy, p, seed) -> dx
                  inverted dropout; the mask is `minasgd.kernels.dropout_hash.keep_mask(seed, x.size, p)`
  linear      linear_forward(x[N,D], w[M,D], b[M]) -> y[N,M]     (y = x w^T + b)
              linear_backward(dy, x, w) -> (dx, dw, db)
  loss        softmax_cross_entropy(logits[N,M], labels[N] int32) -> (loss[1], dlogits[N,M])
                  mean loss over the batch, left on the device as a 1-element array (read it
                  with float(be.to_numpy(loss)[0]) only when logging); dlogits is its gradient
  optimizer   sgd_update(w, g, v, lr, momentum, weight_decay)   in place, flat vectors:
                  v = momentum * v + (g + weight_decay * w);  w -= lr * v
              axpy(y, a, x)   in place: y += a * x  (sums gradients, e.g. on a worker)

Backward functions return fresh arrays; none accumulates into its inputs.
"""

OPS = (
    "asarray", "to_numpy", "zeros", "copy_into", "synchronize",
    "conv2d_forward", "conv2d_backward",
    "maxpool2d_forward", "maxpool2d_backward",
    "relu_forward", "relu_backward",
    "dropout_forward", "dropout_backward",
    "linear_forward", "linear_backward",
    "softmax_cross_entropy", "sgd_update", "axpy",
)


from .errors import BackendError  # noqa: E402,F401  (re-exported: `backends.BackendError`)


def cuda_available():
    """True when numba can see a real GPU (False under the simulator).

    Importing `numba.cuda` costs 0.6-1 s of CPU, so the cheap answers come first: the simulator
    is on, or the machine has no CUDA driver library at all (a laptop without an NVIDIA GPU).
    Then every `minasgd train` on a CPU, and each of its workers, starts that much sooner."""
    from numba import config

    if config.ENABLE_CUDASIM or not _driver_library_found():
        return False
    from numba import cuda

    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def _driver_library_found():
    """Whether one of the places numba's driver search tries (numba.cuda.cudadrv.driver
    `locate_driver_and_loader`) holds a CUDA driver library; `NUMBA_CUDA_DRIVER`, a path of the
    user's, is left to numba's own check."""
    import ctypes
    import os
    import sys

    if os.environ.get("NUMBA_CUDA_DRIVER"):
        return True
    if sys.platform == "win32":
        dirs, names, load = ["\\windows\\system32"], ["nvcuda.dll"], getattr(ctypes, "WinDLL", ctypes.CDLL)
    elif sys.platform == "darwin":
        dirs, names, load = ["/usr/local/cuda/lib"], ["libcuda.dylib"], ctypes.CDLL
    else:
        dirs, names, load = ["/usr/lib", "/usr/lib64"], ["libcuda.so", "libcuda.so.1"], ctypes.CDLL
    for path in names + [os.path.join(d, n) for d in dirs for n in names]:
        if os.path.isfile(path):
            return True
        try:
            load(path)
            return True
        except OSError:
            pass
    return False


def get(name="numpy", device=None):
    """Return the backend module called `name` ("numpy", "numpy-reference", "cuda" or "auto").

    A backend is a plain module: `be.conv2d_forward(...)`, `be.NAME` (the `name` that gets it:
    summary.json says which backend ran), `be.DEVICE`.

    `device` selects a GPU for the cuda backend (default: the current one).
    """
    if name == "auto":
        name = "cuda" if cuda_available() else "numpy"
    if name == "numpy":
        from . import numpy_fast

        return numpy_fast
    if name == "numpy-reference":
        from . import numpy_backend

        return numpy_backend
    if name == "cuda":
        from . import cuda_backend

        cuda_backend.select_device(device)
        return cuda_backend
    raise ValueError(f"unknown backend {name!r}; choose one of: numpy, numpy-reference, cuda, auto")
