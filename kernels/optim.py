"""SGD with momentum and weight decay, in place over the flat parameter vector.

    v = momentum * v + (g + weight_decay * w)
    w = w - lr * v

    v1 grid-stride loop, one element per iteration: read w, g, v, write v, w (20 bytes per
       parameter, memory bound). The model keeps every parameter in ONE flat float32 buffer, so a
       single launch updates the whole network.

    axpy: y += a * x over a flat vector (a parameter-server worker sums its gradients with it).
"""

import numpy as np
from numba import cuda

from . import shapes

from .common import F1, F32, THREADS, Signature, flat, grid_1d
from .registry import Case, Version


# ---------------------------------------------------------------- kernels

@cuda.jit(cache=True)
def sgd_momentum_kernel(w, g, v, lr, momentum, weight_decay):
    """Element i: v[i] = momentum*v[i] + g[i] + weight_decay*w[i]; w[i] -= lr*v[i]. Grid-stride."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, w.size, step):
        vi = momentum * v[i] + g[i] + weight_decay * w[i]
        v[i] = vi
        w[i] = w[i] - lr * vi


@cuda.jit(cache=True)
def axpy_kernel(y, a, x):
    """Element i: y[i] += a * x[i]. Grid-stride."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, y.size, step):
        y[i] += a * x[i]


# ---------------------------------------------------------------- launchers

def launch_sgd(w, g, v, lr, momentum, weight_decay):
    # float32 scalars, so the kernel's arithmetic stays float32
    blocks, threads = grid_1d(w.size)
    f32 = np.float32
    sgd_momentum_kernel[blocks, threads](flat(w), flat(g), flat(v), f32(lr), f32(momentum), f32(weight_decay))


def launch_axpy(y, a, x):
    blocks, threads = grid_1d(y.size)
    axpy_kernel[blocks, threads](flat(y), np.float32(a), flat(x))


def signatures():
    """What the launchers above pass (see `common.Signature`)."""
    return [
        Signature("sgd_momentum_kernel", "v1", sgd_momentum_kernel, (F1, F1, F1, F32, F32, F32), THREADS),
        Signature("axpy_kernel", "v1", axpy_kernel, (F1, F32, F1), THREADS),
    ]


# ---------------------------------------------------------------- public functions

def sgd_update(w, g, v, lr, momentum=0.0, weight_decay=0.0):
    """In place on w and v (same-shape float32 device arrays, usually flat)."""
    shapes.check_same_shape("sgd_update", w.shape, g.shape)
    shapes.check_same_shape("sgd_update", w.shape, v.shape)
    if w.size:
        launch_sgd(w, g, v, lr, momentum, weight_decay)


def axpy(y, a, x):
    """In place: y += a * x (same-shape float32 device arrays)."""
    shapes.check_same_shape("axpy", y.shape, x.shape)
    if y.size:
        launch_axpy(y, a, x)


# ---------------------------------------------------------------- versions and cases

VERSIONS_OF = {"sgd_update": (Version("sgd_update", "v1", "v1", "launch_sgd", deterministic=True, default=True),),
               "axpy": (Version("axpy", "v1", "v1", "launch_axpy", deterministic=True, default=True),)}


def cases(net, ref, tiles, make):
    """One SGD step and one axpy over all of `net`'s parameters (`registry.cases`). Both work in
    place, so their checks start from fresh copies."""
    n = net["num_params"]
    w, g, v = make.randn(n), make.randn(n), make.randn(n)
    w_ref, v_ref = w.copy(), v.copy()
    ref.sgd_update(w_ref, g, v_ref, 0.01, 0.9, 5e-4)
    w_, g_, v_, y_ = make.dev(w), make.dev(g), make.dev(v), make.dev(w)

    def sgd_check():
        w_.copy_to_device(w)
        v_.copy_to_device(v)
        sgd_update(w_, g_, v_, 0.01, 0.9, 5e-4)
        return w_, v_

    def axpy_check():
        y_.copy_to_device(w)
        axpy(y_, -0.5, g_)
        return y_

    return [Case("optim", "sgd momentum + decay", "v1", f"sgd momentum + decay ({n:,} params)",
                 lambda: sgd_update(w_, g_, v_, 0.01, 0.9, 5e-4), {"w": (n,)}, (w_ref, v_ref), 20.0 * n,
                 check=sgd_check, default=True, size=f"{n:,} params"),
            Case("optim", "axpy", "v1", f"axpy ({n:,} params)", lambda: axpy(y_, -0.5, g_), {"y": (n,)},
                 w + np.float32(-0.5) * g, 12.0 * n, check=axpy_check, default=True, bench=False, size=f"{n:,} params")]


if __name__ == "__main__":  # the workbench: every version vs the NumPy reference, then timed (minasgd/workbench.py)
    from minasgd.workbench import main

    raise SystemExit(main("optim"))
