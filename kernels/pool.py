"""Max pooling (floor mode, no padding), forward with argmax and backward, float32.

    x, dx: (N, C, H, W)    y, dy, argmax: (N, C, P, Q)    P = (H - size) // stride + 1

    forward   v1: one thread per output y[n, c, p, q] (grid-stride loop). It scans its window in
              row-major order and takes a new maximum only when strictly greater, so ties keep the
              FIRST maximum, as numpy.argmax does. argmax is the int32 index h * W + w in the plane.
    backward  v1 scatter: zero dx, then one thread per dy[n, c, p, q] (grid-stride loop) adds it to
              dx at its argmax with cuda.atomic.add: windows overlap when size > stride, so two
              threads may hit the same pixel. Needs only argmax, as the op contract gives.
              v2 gather: one thread per input pixel dx[n, c, h, w]. It visits the few windows
              that contain (h, w) and adds dy wherever that window's argmax is this pixel. No
              atomics, no zeroing, a fixed summation order; it needs the window size and stride,
              which the backend contract passes: `maxpool2d_backward(dy, argmax, x_shape, version=
              "gather", size=size, stride=stride)` (the cuda backend's POOL_BACKWARD_VERSION picks).

Deterministic: forward, and backward v2 gather. Backward v1 scatter is not when windows overlap
(size > stride): two atomic adds into one pixel land in either order, which can change its last bit.
"""

from numba import cuda, float32

from . import shapes

from .common import F4, I4, INT, THREADS, Signature, fill, grid_1d, output
from .registry import Case, Version, dims, pick


# ---------------------------------------------------------------- kernels

@cuda.jit(cache=True)
def maxpool2d_forward_kernel(x, y, argmax, size, stride):
    """One thread per output y[n, c, p, q]: max and first argmax of its size x size window."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n_, c_, h_, w_ = x.shape
    p_, q_ = y.shape[2], y.shape[3]
    # BEGIN SOLUTION task 3.1: each y[n, c, p, q] is the max of its size x size window (at stride), and argmax[n, c, p, q] the flat position h * W + w of the FIRST element holding it, for any shape and any grid
    for idx in range(start, y.size, step):
        q = idx % q_
        p = (idx // q_) % p_
        c = (idx // (q_ * p_)) % c_
        n = idx // (q_ * p_ * c_)
        h0 = p * stride
        w0 = q * stride
        best = x[n, c, h0, w0]
        best_at = h0 * w_ + w0
        for r in range(size):
            for s in range(size):
                v = x[n, c, h0 + r, w0 + s]
                if v > best:  # strictly greater: ties keep the first maximum
                    best = v
                    best_at = (h0 + r) * w_ + w0 + s
        y[n, c, p, q] = best
        argmax[n, c, p, q] = best_at
    # END SOLUTION


@cuda.jit(cache=True)
def maxpool2d_backward_scatter_kernel(dy, argmax, dx):
    """One thread per dy[n, c, p, q]: dx[n, c, argmax] += dy (atomically). dx must be zeroed."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    c_, w_ = dx.shape[1], dx.shape[3]
    p_, q_ = dy.shape[2], dy.shape[3]
    # BEGIN SOLUTION task 3.2: every dy[n, c, p, q] ends up added into dx at the pixel its window's argmax names, correct even when windows overlap and several outputs send their gradient to one pixel
    for idx in range(start, dy.size, step):
        q = idx % q_
        p = (idx // q_) % p_
        c = (idx // (q_ * p_)) % c_
        n = idx // (q_ * p_ * c_)
        at = argmax[n, c, p, q]
        cuda.atomic.add(dx, (n, c, at // w_, at % w_), dy[n, c, p, q])
    # END SOLUTION


@cuda.jit(cache=True)
def maxpool2d_backward_gather_kernel(dy, argmax, dx, size, stride):
    """One thread per input dx[n, c, h, w]: sum dy over the windows whose argmax is (h, w).

    Window p covers rows p*stride .. p*stride + size - 1, so row h lies in windows
    p = ceil((h - size + 1) / stride) .. floor(h / stride), clipped to [0, P); columns likewise.
    """
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n_, c_, h_, w_ = dx.shape
    p_, q_ = dy.shape[2], dy.shape[3]
    for idx in range(start, dx.size, step):
        w = idx % w_
        h = (idx // w_) % h_
        c = (idx // (w_ * h_)) % c_
        n = idx // (w_ * h_ * c_)
        p_lo = 0 if h < size else (h - size) // stride + 1
        q_lo = 0 if w < size else (w - size) // stride + 1
        p_hi = min(h // stride, p_ - 1)
        q_hi = min(w // stride, q_ - 1)
        here = h * w_ + w
        acc = float32(0)
        for p in range(p_lo, p_hi + 1):
            for q in range(q_lo, q_hi + 1):
                if argmax[n, c, p, q] == here:
                    acc += dy[n, c, p, q]
        dx[n, c, h, w] = acc


# ---------------------------------------------------------------- launchers

def launch_forward(x, y, argmax, size, stride):
    blocks, threads = grid_1d(y.size)
    maxpool2d_forward_kernel[blocks, threads](x, y, argmax, size, stride)


def launch_backward_scatter(dy, argmax, dx):
    """dx must be zeroed."""
    blocks, threads = grid_1d(dy.size)
    maxpool2d_backward_scatter_kernel[blocks, threads](dy, argmax, dx)


def launch_backward_gather(dy, argmax, dx, size, stride):
    blocks, threads = grid_1d(dx.size)
    maxpool2d_backward_gather_kernel[blocks, threads](dy, argmax, dx, size, stride)


def signatures():
    """What the launchers above pass (see `common.Signature`)."""
    return [
        Signature("maxpool2d_forward_kernel", "v1", maxpool2d_forward_kernel, (F4, F4, I4, INT, INT), THREADS),
        Signature("maxpool2d_backward_scatter_kernel", "v1 scatter", maxpool2d_backward_scatter_kernel,
                  (F4, I4, F4), THREADS),
        Signature("maxpool2d_backward_gather_kernel", "v2 gather", maxpool2d_backward_gather_kernel,
                  (F4, I4, F4, INT, INT), THREADS),
    ]


# ---------------------------------------------------------------- versions and public functions

VERSIONS_OF = {  # every version of each public function (`registry.Version`); the backend's is `default`
    "maxpool2d_forward": (Version("maxpool2d_forward", "v1", "v1", "launch_forward", deterministic=True, default=True),),
    "maxpool2d_backward": (
        # not deterministic when windows overlap: two atomic adds into one pixel land in either order
        Version("maxpool2d_backward", "scatter", "v1 scatter (atomics)", "launch_backward_scatter",
                deterministic=False, default=True),
        Version("maxpool2d_backward", "gather", "v2 gather (deterministic)", "launch_backward_gather",
                deterministic=True)),
}
BACKWARD_VERSIONS = tuple(v.name for v in VERSIONS_OF["maxpool2d_backward"])


def maxpool2d_forward(x, size=3, stride=2, out=None, out_argmax=None):
    # x: (N, C, H, W) -> y: (N, C, P, Q), argmax: (N, C, P, Q) int32 index into the H*W plane
    y_shape = shapes.pool2d_output_shape(x.shape, size, stride)
    y = output(y_shape, x.dtype, out, "maxpool2d_forward out")
    argmax = output(y_shape, "int32", out_argmax, "maxpool2d_forward out_argmax")
    if y.size:
        launch_forward(x, y, argmax, size, stride)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, out=None, version="scatter", size=None, stride=None):
    """dy, argmax: (N, C, P, Q) -> dx: (N, C, H, W). version "scatter" (the backend's) needs only
    argmax; "gather" (deterministic) needs the window `size` and `stride` too."""
    pick(VERSIONS_OF, "maxpool2d_backward", version)
    shapes.check_same_shape("maxpool2d_backward argmax", argmax.shape, dy.shape)
    if version == "gather":
        if size is None or stride is None:
            raise ValueError("maxpool2d_backward: version 'gather' needs the window size and stride")
        shapes.check_same_shape("maxpool2d_backward dy", dy.shape, shapes.pool2d_output_shape(x_shape, size, stride))
    else:
        _check_batch_channels(dy.shape, x_shape)
    dx = output(x_shape, dy.dtype, out, "maxpool2d_backward out")
    if version == "gather":
        if dx.size:
            launch_backward_gather(dy, argmax, dx, size, stride)
    else:
        fill(dx, 0)
        if dy.size:
            launch_backward_scatter(dy, argmax, dx)
    return dx


def _check_batch_channels(dy_shape, x_shape):
    if len(x_shape) != 4 or len(dy_shape) != 4 or tuple(dy_shape[:2]) != tuple(x_shape[:2]):
        raise ValueError(f"maxpool2d_backward: dy {tuple(dy_shape)} does not pool x {tuple(x_shape)}")


# ---------------------------------------------------------------- cases: every version at the model's shapes

def cases(net, ref, tiles, make):
    """Forward, and every backward version, at each pooling layer of `net` (`registry.cases`)."""
    return [c for L in net["pool"] for c in _layer_cases(L, ref, make)]


def _layer_cases(L, ref, make):
    x, size, stride = make.randn(*L["x"]), L["size"], L["stride"]
    y_ref, arg_ref = ref.maxpool2d_forward(x, size, stride)
    dy = make.randn(*y_ref.shape)
    dx_ref = ref.maxpool2d_backward(dy, arg_ref, x.shape)
    x_, dy_, arg_ = make.dev(x), make.dev(dy), make.dev(arg_ref)
    moved, label = 4.0 * x.size + 8.0 * y_ref.size, f"{dims(*x.shape)} window {size} stride {stride}"
    sizes = {"x": x.shape, "y": y_ref.shape}
    forward = VERSIONS_OF["maxpool2d_forward"][0]
    out = [Case("pool", f"{L['name']} forward", forward.name, f"{L['name']} forward",
                lambda y=make.nan(y_ref.shape), a=make.nan(y_ref.shape, "int32"):
                maxpool2d_forward(x_, size, stride, out=y, out_argmax=a), sizes, (y_ref, arg_ref), moved, "GB/s",
                exact=True, default=True, size=label, extra={"size": size, "stride": stride})]
    for v in VERSIONS_OF["maxpool2d_backward"]:
        out.append(Case("pool", f"{L['name']} backward", v.name, f"{L['name']} backward {v.label}",
                        lambda g=make.nan(x.shape), v=v.name:
                        maxpool2d_backward(dy_, arg_, g.shape, out=g, version=v, size=size, stride=stride),
                        sizes, dx_ref, moved + 4.0 * x.size, "GB/s", deterministic=v.deterministic,
                        default=v.default, size=label, extra={"size": size, "stride": stride}))
    return out


if __name__ == "__main__":  # the workbench: every version vs the NumPy reference, then timed (minasgd/workbench.py)
    from minasgd.workbench import main

    raise SystemExit(main("pool"))
