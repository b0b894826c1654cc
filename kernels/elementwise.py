"""Elementwise kernels: ReLU and dropout (`fill` is in `common`: every family uses it).

    relu_forward   v1: grid-stride loop, y[i] = max(x[i], 0)
    relu_backward  v1: grid-stride loop, dx[i] = dy[i] where y[i] > 0, else 0
    dropout        v1: grid-stride loop; element i is kept when hash32(seed, i) >= threshold(p),
                   so the mask is recomputed in backward instead of stored

All kernels see tensors as flat 1-D views (every activation is C-contiguous), so one loop serves
any shape. The dropout hash is the same uint32 mixer as `dropout_hash.hash32` (the NumPy version, in this package), written as
a device function; every step is wrapped in uint32(...) so the GPU, the simulator and NumPy agree
bit for bit (without it, compiled Numba widens `uint32 * uint32` to 64 bits).
"""

import numpy as np
from numba import cuda, float32, uint32

from . import dropout_hash, shapes

from .common import F1, F32, THREADS, U32, Signature, fill, flat, grid_1d, launch_fill, output  # noqa: F401
from .registry import Case, Version, dims

GOLDEN = uint32(dropout_hash.GOLDEN)
MUL1 = uint32(dropout_hash.MUL1)
MUL2 = uint32(dropout_hash.MUL2)


# ---------------------------------------------------------------- kernels

@cuda.jit(cache=True)
def relu_forward_kernel(x, y):
    """y[i] = max(x[i], 0) over flat views; grid-stride loop."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    # BEGIN SOLUTION task 1.1: every element of y is max(x, 0), for any size of x and any grid (constants as float32)
    for i in range(start, x.size, stride):
        v = x[i]
        y[i] = v if v > float32(0) else float32(0)
    # END SOLUTION


@cuda.jit(cache=True)
def relu_backward_kernel(dy, y, dx):
    """dx[i] = dy[i] if y[i] > 0 else 0 (the ReLU output decides); grid-stride loop."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    # BEGIN SOLUTION task 1.1: every element of dx is dy where the forward output y was positive, else 0, for any size and any grid
    for i in range(start, dy.size, stride):
        dx[i] = dy[i] if y[i] > float32(0) else float32(0)
    # END SOLUTION


@cuda.jit(device=True, cache=True)
def hash32(seed, index):
    """lowbias32 of (index ^ seed * GOLDEN): a uint32 with every step wrapped mod 2**32."""
    x = uint32(uint32(index) ^ uint32(uint32(seed) * GOLDEN))
    x = uint32(x ^ uint32(x >> uint32(16)))
    x = uint32(x * MUL1)
    x = uint32(x ^ uint32(x >> uint32(15)))
    x = uint32(x * MUL2)
    x = uint32(x ^ uint32(x >> uint32(16)))
    return x


@cuda.jit(cache=True)
def dropout_kernel(x, y, seed, threshold, scale):
    """Inverted dropout over flat views: y[i] = x[i] * scale if hash32(seed, i) >= threshold else 0.

    Forward and backward are the same kernel: backward feeds dy with the same seed.
    """
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    # BEGIN SOLUTION task 1.2: y is x * scale where the hash of (seed, element index) keeps the element (at or above threshold), else 0: bit-identical to the NumPy reference for any size and any grid
    for i in range(start, x.size, stride):
        if hash32(seed, i) >= threshold:
            y[i] = x[i] * scale
        else:
            y[i] = float32(0)
    # END SOLUTION


# ---------------------------------------------------------------- launchers

def launch_relu_forward(x, y):
    blocks, threads = grid_1d(x.size)
    relu_forward_kernel[blocks, threads](flat(x), flat(y))


def launch_relu_backward(dy, y, dx):
    blocks, threads = grid_1d(dy.size)
    relu_backward_kernel[blocks, threads](flat(dy), flat(y), flat(dx))


def launch_dropout(x, y, p, seed):
    # Host-side constants go in as NumPy scalars so the kernel sees uint32 / float32, not int64 / float64.
    threshold = dropout_hash.keep_threshold(p)
    scale = np.float32(1.0 / (1.0 - p))
    blocks, threads = grid_1d(x.size)
    dropout_kernel[blocks, threads](flat(x), flat(y), np.uint32(seed & 0xFFFFFFFF), threshold, scale)


def signatures():
    """What the launchers above pass (see `common.Signature`)."""
    return [
        Signature("relu_forward_kernel", "v1", relu_forward_kernel, (F1, F1), THREADS),
        Signature("relu_backward_kernel", "v1", relu_backward_kernel, (F1, F1, F1), THREADS),
        Signature("dropout_kernel", "v1", dropout_kernel, (F1, F1, U32, U32, F32), THREADS),
    ]


# ---------------------------------------------------------------- public functions

def relu_forward(x, out=None):
    # x: any shape -> y: same shape
    y = output(x.shape, x.dtype, out, "relu_forward out")
    if x.size:
        launch_relu_forward(x, y)
    return y


def relu_backward(dy, y, out=None):
    # dy, y: same shape -> dx (fresh unless out is given)
    shapes.check_same_shape("relu_backward", dy.shape, y.shape)
    dx = output(dy.shape, dy.dtype, out, "relu_backward out")
    if dy.size:
        launch_relu_backward(dy, y, dx)
    return dx


def dropout(x, p, seed, out=None):
    """Inverted dropout of x (forward) or of dy (backward: same p and seed give the same mask)."""
    shapes.check_dropout_p(p)
    y = output(x.shape, x.dtype, out, "dropout out")
    if x.size:
        launch_dropout(x, y, p, seed)
    return y


# ---------------------------------------------------------------- versions and cases

VERSIONS_OF = {op: (Version(op, "v1", "v1", launcher, deterministic=True, default=True),) for op, launcher in
               (("relu_forward", "launch_relu_forward"), ("relu_backward", "launch_relu_backward"),
                ("dropout", "launch_dropout"))}


def cases(net, ref, tiles, make):
    """ReLU forward, backward and dropout over the largest activation of `net` (`registry.cases`)."""
    size = net["largest"]
    x, dy = make.randn(size), make.randn(size)
    x_, dy_, y_ = make.dev(x), make.dev(dy), make.dev(ref.relu_forward(x))
    outs = [make.nan(size) for _ in range(3)]

    def case(name, launch, expect, moved):
        return Case("elementwise", name, "v1", name, launch, {"x": (size,)}, expect, moved, "GB/s", exact=True,
                    default=True, size=dims(size))

    return [case("relu forward", lambda: relu_forward(x_, out=outs[0]), ref.relu_forward(x), 8.0 * size),
            case("relu backward", lambda: relu_backward(dy_, y_, out=outs[1]),
                 ref.relu_backward(dy, ref.relu_forward(x)), 12.0 * size),
            case("dropout p=0.5", lambda: dropout(x_, 0.5, 1234, out=outs[2]), ref.dropout_forward(x, 0.5, 1234),
                 8.0 * size)]


if __name__ == "__main__":  # the workbench: every version vs the NumPy reference, then timed (minasgd/workbench.py)
    from minasgd.workbench import main

    raise SystemExit(main("elementwise"))
