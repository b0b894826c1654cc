"""2-D convolution (cross-correlation, NCHW), forward and backward, float32.

    x: (N, C, H, W)   w: (K, C, R, S)   b: (K,)   y, dy: (N, K, P, Q)
    y[n, k, p, q] = b[k] + sum_{c, r, s} w[k, c, r, s] * x[n, c, p*stride - pad + r, q*stride - pad + s]
    (x is zero outside the image)

Forward
    v1 naive: one thread per output y[n, k, p, q] (grid-stride loop); it walks c, r, s and reads
       input and filter straight from global memory.
    v2 tiled (implicit GEMM): view the convolution as a matrix product
           Y[k, j] = sum_t W[k, t] * X[t, j],   j = (n, p, q),  t = (c, r, s)
       where X is the im2col matrix, never built in memory: when a block stages its tile of X in
       shared memory, each thread computes which input pixel (or padding zero) that entry is.
       Otherwise it is the tiled GEMM of `gemm.py`: a TILE x TILE block owns a tile of Y.
Backward
    data   v1 naive: one thread per input pixel dx[n, c, h, w]; it walks EVERY output (k, p, q)
              and adds w[k, c, r, s] * dy where the filter tap r = h + pad - p*stride (and s
              likewise) falls inside the filter. Straight from the definition; K*P*Q steps each.
           v2 gather: the same thread visits only the taps (r, s) whose output position
              (h + pad - r) / stride lands on the grid: R*S*K steps instead. No atomics.
    filter v1 naive: one thread per weight dw[k, c, r, s]; it sums dy * x over all N*P*Q output
              positions, reading both from global memory.
           v2 tiled implicit GEMM with split-K: dW[k, t] = sum_j dY[k, j] * X[t, j]. The sum runs
              over all N*P*Q output positions, far longer than dW is wide, so the j range is split
              into chunks (grid z); each block reduces its chunk in shared-memory tiles and adds its
              partial result into dW with cuda.atomic.add (dW is zeroed first).
    bias   `reduce.sum_over_batch` (db[k] = sum over n, p, q of dy).
All backward functions overwrite their output. All versions are deterministic (`VERSIONS_OF`) but
backward filter v2 with splits > 1: the split sums arrive through atomics in any order.
"""

import functools

from numba import cuda, float32

from . import reduce, shapes
from .common import F1, F2, F4, INT, MAX_BLOCKS, SIM, THREADS, TILES, Signature, bounded, ceil_div, fill, grid_1d, output
from .registry import Case, Version, dims, pick

TILE = 16  # the implicit-GEMM tile: 16 x 16 = 256 threads per block


# ---------------------------------------------------------------- kernels

@cuda.jit(cache=True)
def conv2d_forward_naive(x, w, b, y, stride, pad):
    """One thread per output element y[n, k, p, q] (flat index, grid-stride loop)."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n_, c_, h_, w_ = x.shape
    k_, _, r_, s_ = w.shape
    p_, q_ = y.shape[2], y.shape[3]
    # BEGIN SOLUTION task 2.1: each y[n, k, p, q] is b[k] plus filter w[k] applied to the input window of output (p, q) at this stride, with inputs outside the image counting as 0 (zero padding), for any shape and any grid
    for idx in range(start, y.size, step):
        q = idx % q_
        p = (idx // q_) % p_
        k = (idx // (q_ * p_)) % k_
        n = idx // (q_ * p_ * k_)
        acc = b[k]
        for c in range(c_):
            for r in range(r_):
                h = p * stride - pad + r
                if 0 <= h < h_:
                    for s in range(s_):
                        col = q * stride - pad + s
                        if 0 <= col < w_:
                            acc += w[k, c, r, s] * x[n, c, h, col]
        y[n, k, p, q] = acc
    # END SOLUTION


@functools.cache
def forward_tiled_kernel(tile):
    """Build the implicit-GEMM forward kernel for a tile x tile thread block."""

    @cuda.jit(cache=True, **bounded(tile * tile))
    def conv2d_forward_tiled(x, w2, b, y, stride, pad, r_, s_):
        """Y[k, j] = sum_t W[k, t] X[t, j] by tiles. w2 is w viewed as (K, C*R*S).

        Block (bx, by) owns output channels k0 = by*T .. +T and positions j0 = bx*T .. +T;
        thread (tx, ty) computes Y[k0 + ty, j0 + tx]. Consecutive tx are consecutive output
        pixels q, so the final writes (and most input reads) are coalesced.
        """
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        k0 = cuda.blockIdx.y * tile
        j0 = cuda.blockIdx.x * tile
        n_, c_, h_, w_ = x.shape
        k_, p_, q_ = y.shape[1], y.shape[2], y.shape[3]
        rs = r_ * s_
        t_dim = c_ * rs
        j_dim = n_ * p_ * q_

        # This thread's output column j = (n, p, q): fixed for the whole loop, decode it once.
        j = j0 + tx
        q = j % q_
        p = (j // q_) % p_
        n = j // (q_ * p_)
        k = k0 + ty

        sw = cuda.shared.array((tile, tile), float32)  # sw[i, tt] = W[k0 + i, t0 + tt]
        sx = cuda.shared.array((tile, tile), float32)  # sx[tt, jj] = X[t0 + tt, j0 + jj]

        acc = float32(0)
        for t0 in range(0, t_dim, tile):
            # Filter tile: W is row-major in t, so consecutive tx read consecutive addresses.
            t = t0 + tx
            sw[ty, tx] = w2[k, t] if (k < k_ and t < t_dim) else float32(0)
            # Input tile: the im2col entry X[t, j] is pixel (c, h, col) of image n, or a padding 0.
            t = t0 + ty
            c = t // rs
            r = (t // s_) % r_
            s = t % s_
            h = p * stride - pad + r
            col = q * stride - pad + s
            inside = t < t_dim and j < j_dim and 0 <= h < h_ and 0 <= col < w_
            sx[ty, tx] = x[n, c, h, col] if inside else float32(0)
            cuda.syncthreads()
            for tt in range(tile):
                acc += sw[ty, tt] * sx[tt, tx]
            cuda.syncthreads()
        if k < k_ and j < j_dim:
            y[n, k, p, q] = acc + b[k]

    return conv2d_forward_tiled


@cuda.jit(cache=True)
def conv2d_backward_data_naive(dy, w, dx, stride, pad):
    """One thread per input element dx[n, c, h, col] (grid-stride): every output (k, p, q) it could feed.

    Output (p, q) read input (h, col) through tap r = h + pad - p*stride, s = col + pad - q*stride,
    when both lie inside the R x S filter.
    """
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n_, c_, h_, w_ = dx.shape
    k_, _, r_, s_ = w.shape
    p_, q_ = dy.shape[2], dy.shape[3]
    for idx in range(start, dx.size, step):
        col = idx % w_
        h = (idx // w_) % h_
        c = (idx // (w_ * h_)) % c_
        n = idx // (w_ * h_ * c_)
        acc = float32(0)
        for p in range(p_):
            r = h + pad - p * stride
            if 0 <= r < r_:
                for k in range(k_):
                    for q in range(q_):
                        s = col + pad - q * stride
                        if 0 <= s < s_:
                            acc += w[k, c, r, s] * dy[n, k, p, q]
        dx[n, c, h, col] = acc


@cuda.jit(cache=True)
def conv2d_backward_filter_naive(dy, x, dw, stride, pad):
    """One thread per weight dw[k, c, r, s] (grid-stride): sum over n, p, q of dy * the input it saw."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n_, c_, h_, w_ = x.shape
    k_, _, r_, s_ = dw.shape
    p_, q_ = dy.shape[2], dy.shape[3]
    for idx in range(start, dw.size, step):
        s = idx % s_
        r = (idx // s_) % r_
        c = (idx // (s_ * r_)) % c_
        k = idx // (s_ * r_ * c_)
        acc = float32(0)
        for n in range(n_):
            for pq in range(p_ * q_):  # every output position (p, q), q fastest
                p = pq // q_
                q = pq % q_
                h = p * stride + r - pad  # the input pixel that met tap (r, s) at output (p, q)
                col = q * stride + s - pad
                if 0 <= h < h_ and 0 <= col < w_:
                    acc += dy[n, k, p, q] * x[n, c, h, col]
        dw[k, c, r, s] = acc


@cuda.jit(cache=True)
def conv2d_backward_data_gather(dy, w, dx, stride, pad):
    """One thread per input element dx[n, c, h, col] (grid-stride): gather every output it fed.

    Output (p, q) read input (h, col) through filter tap (r, s) when h = p*stride - pad + r, so
    p = (h + pad - r) / stride must be a whole number inside [0, P); likewise q.
    """
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n_, c_, h_, w_ = dx.shape
    k_, _, r_, s_ = w.shape
    p_, q_ = dy.shape[2], dy.shape[3]
    for idx in range(start, dx.size, step):
        col = idx % w_
        h = (idx // w_) % h_
        c = (idx // (w_ * h_)) % c_
        n = idx // (w_ * h_ * c_)
        acc = float32(0)
        for r in range(r_):
            ph = h + pad - r
            p = ph // stride
            if ph >= 0 and p * stride == ph and p < p_:
                for s in range(s_):
                    qw = col + pad - s
                    q = qw // stride
                    if qw >= 0 and q * stride == qw and q < q_:
                        for k in range(k_):
                            acc += w[k, c, r, s] * dy[n, k, p, q]
        dx[n, c, h, col] = acc


@functools.cache
def backward_filter_tiled_kernel(tile):
    """Build the split-K implicit-GEMM filter-gradient kernel for a tile x tile thread block."""

    @cuda.jit(cache=True, **bounded(tile * tile))
    def conv2d_backward_filter_tiled(dy, x, dw2, stride, pad, r_, s_, chunk):
        """dW[k, t] += sum_{j in this block's chunk} dY[k, j] X[t, j]; dw2 is dw viewed as (K, C*R*S).

        Block (bx, by, bz) owns dW[k0 + ty, t0 + tx] with k0 = by*T, t0 = bx*T, and sums over
        output positions j in [bz*chunk, bz*chunk + chunk), a multiple of T wide.
        """
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        k0 = cuda.blockIdx.y * tile
        t0 = cuda.blockIdx.x * tile
        n_, c_, h_, w_ = x.shape
        k_, p_, q_ = dy.shape[1], dy.shape[2], dy.shape[3]
        rs = r_ * s_
        t_dim = c_ * rs
        j_dim = n_ * p_ * q_
        j_begin = cuda.blockIdx.z * chunk
        j_end = min(j_begin + chunk, j_dim)

        # Both staged elements of this thread share one output position per step: j = j1 + tx.
        # The X element it stages is at row t = t0 + ty: decode (c, r, s) once.
        t = t0 + ty
        c = t // rs
        r = (t // s_) % r_
        s = t % s_

        sd = cuda.shared.array((tile, tile), float32)  # sd[i, jj] = dY[k0 + i, j1 + jj]
        sx = cuda.shared.array((tile, tile), float32)  # sx[jj, tt] = X[t0 + tt, j1 + jj]

        acc = float32(0)
        for j1 in range(j_begin, j_end, tile):
            j = j1 + tx
            q = j % q_
            p = (j // q_) % p_
            n = j // (q_ * p_)
            k = k0 + ty
            sd[ty, tx] = dy[n, k, p, q] if (k < k_ and j < j_end) else float32(0)
            h = p * stride - pad + r
            col = q * stride - pad + s
            inside = t < t_dim and j < j_end and 0 <= h < h_ and 0 <= col < w_
            sx[tx, ty] = x[n, c, h, col] if inside else float32(0)
            cuda.syncthreads()
            for jj in range(tile):
                acc += sd[ty, jj] * sx[jj, tx]
            cuda.syncthreads()
        kk = k0 + ty
        tt = t0 + tx
        if kk < k_ and tt < t_dim:
            cuda.atomic.add(dw2, (kk, tt), acc)

    return conv2d_backward_filter_tiled


# ---------------------------------------------------------------- launchers

def launch_forward_naive(x, w, b, y, stride, pad):
    blocks, threads = grid_1d(y.size)
    conv2d_forward_naive[blocks, threads](x, w, b, y, stride, pad)


def launch_forward_tiled(x, w, b, y, stride, pad, tile=TILE):
    n, k, p, q = y.shape
    k_, c, r, s = w.shape
    grid = (ceil_div(n * p * q, tile), ceil_div(k, tile))
    w2 = w.reshape(k_, c * r * s)
    forward_tiled_kernel(tile)[grid, (tile, tile)](x, w2, b, y, stride, pad, r, s)


def launch_backward_data_naive(dy, w, dx, stride, pad):
    blocks, threads = grid_1d(dx.size)
    conv2d_backward_data_naive[blocks, threads](dy, w, dx, stride, pad)


def launch_backward_data_gather(dy, w, dx, stride, pad):
    blocks, threads = grid_1d(dx.size)
    conv2d_backward_data_gather[blocks, threads](dy, w, dx, stride, pad)


def launch_backward_filter_naive(dy, x, dw, stride, pad):
    blocks, threads = grid_1d(dw.size)
    conv2d_backward_filter_naive[blocks, threads](dy, x, dw, stride, pad)


def launch_backward_filter_tiled(dy, x, dw, stride, pad, tile=TILE, splits=None):
    """dw must be zeroed: blocks add their partial sums into it."""
    n, k, p, q = dy.shape
    _, c, r, s = dw.shape
    j_dim = n * p * q
    tiles = ceil_div(k, tile) * ceil_div(c * r * s, tile)
    if splits is None:
        # Enough blocks to fill the GPU (a few per SM), each still summing many output positions.
        target = 2 if SIM else MAX_BLOCKS // 4
        splits = max(1, min(ceil_div(j_dim, 16 * tile), target // tiles))
    chunk = ceil_div(ceil_div(j_dim, splits), tile) * tile  # a whole number of tiles
    grid = (ceil_div(c * r * s, tile), ceil_div(k, tile), ceil_div(j_dim, chunk))
    dw2 = dw.reshape(k, c * r * s)
    backward_filter_tiled_kernel(tile)[grid, (tile, tile)](dy, x, dw2, stride, pad, r, s, chunk)


def signatures():
    """What the launchers above pass (see `common.Signature`), for every tile size in use."""
    sigs = [Signature("conv2d_forward_naive", "v1 naive", conv2d_forward_naive, (F4, F4, F1, F4, INT, INT), THREADS)]
    sigs += [Signature(kernel.py_func.__name__, label, kernel, (F4, F4, F4, INT, INT), THREADS) for label, kernel in (
        ("v1 naive", conv2d_backward_data_naive), ("v2 gather", conv2d_backward_data_gather),
        ("v1 naive", conv2d_backward_filter_naive))]
    for t in TILES:
        sigs += [
            Signature(f"conv2d_forward_tiled {t}x{t}", "v2 tiled", forward_tiled_kernel(t),
                      (F4, F2, F1, F4, INT, INT, INT, INT), t * t),
            Signature(f"conv2d_backward_filter_tiled {t}x{t}", "v2 tiled split-K", backward_filter_tiled_kernel(t),
                      (F4, F4, F2, INT, INT, INT, INT, INT), t * t),
        ]
    return sigs


# ---------------------------------------------------------------- versions and public functions

VERSIONS_OF = {  # each public function's versions (`registry.Version`: name, label, launcher, deterministic)
    "conv2d_forward": (Version("conv2d_forward", "naive", "v1 naive", "launch_forward_naive", True),
                       Version("conv2d_forward", "tiled", "v2 tiled", "launch_forward_tiled", True, default=True)),
    "conv2d_backward_data": (
        Version("conv2d_backward_data", "naive", "v1 naive", "launch_backward_data_naive", True),
        Version("conv2d_backward_data", "gather", "v2 gather", "launch_backward_data_gather", True, default=True)),
    "conv2d_backward_filter": (  # tiled: deterministic only with splits=1 (atomics add the split sums)
        Version("conv2d_backward_filter", "naive", "v1 naive", "launch_backward_filter_naive", True),
        Version("conv2d_backward_filter", "tiled", "v2 tiled split-K", "launch_backward_filter_tiled", False,
                default=True)),
}
# The names `version=` takes: forward, backward data, backward filter.
VERSIONS, DATA_VERSIONS, FILTER_VERSIONS = (tuple(v.name for v in VERSIONS_OF[op]) for op in VERSIONS_OF)


def conv2d_forward(x, w, b, stride=1, pad=0, out=None, version="tiled", tile=TILE):
    # x: (N, C, H, W), w: (K, C, R, S), b: (K,) -> y: (N, K, P, Q)
    pick(VERSIONS_OF, "conv2d_forward", version)
    y_shape = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad, b.shape)
    y = output(y_shape, x.dtype, out, "conv2d_forward out")
    if not y.size:
        return y
    if version == "naive":
        launch_forward_naive(x, w, b, y, stride, pad)
    else:
        launch_forward_tiled(x, w, b, y, stride, pad, tile)
    return y


def conv2d_backward_data(dy, w, x_shape, stride=1, pad=0, out=None, version="gather"):
    # dy: (N, K, P, Q), w: (K, C, R, S) -> dx: (N, C, H, W) (fresh unless out is given); deterministic
    pick(VERSIONS_OF, "conv2d_backward_data", version)
    shapes.check_same_shape("conv2d_backward dy", dy.shape, shapes.conv2d_output_shape(x_shape, w.shape, stride, pad))
    dx = output(x_shape, dy.dtype, out, "conv2d_backward_data out")
    if not dx.size:
        return dx
    if version == "naive":
        launch_backward_data_naive(dy, w, dx, stride, pad)
    else:
        launch_backward_data_gather(dy, w, dx, stride, pad)
    return dx


def conv2d_backward_filter(dy, x, w_shape, stride=1, pad=0, out=None, tile=TILE, splits=None, version="tiled"):
    # dy: (N, K, P, Q), x: (N, C, H, W) -> dw: (K, C, R, S) (overwritten, fresh unless out is given)
    # naive: deterministic; tiled: deterministic only with splits=1 (atomics add the split sums)
    pick(VERSIONS_OF, "conv2d_backward_filter", version)
    shapes.check_same_shape("conv2d_backward dy", dy.shape, shapes.conv2d_output_shape(x.shape, w_shape, stride, pad))
    dw = output(w_shape, dy.dtype, out, "conv2d_backward_filter out")
    if not dw.size:
        return dw
    if version == "naive":
        launch_backward_filter_naive(dy, x, dw, stride, pad)
    else:
        fill(dw, 0)  # the blocks add their partial sums into it
        if dy.size:
            launch_backward_filter_tiled(dy, x, dw, stride, pad, tile, splits)
    return dw


def conv2d_backward(dy, x, w, stride=1, pad=0, tile=TILE, need_dx=True):
    """dy: (N, K, P, Q) -> (dx, dw, db), all freshly allocated; nothing accumulates into the inputs.

    need_dx=False skips the input gradient (dx is None): the first layer has no use for it.
    """
    n, k, p, q = shapes.conv2d_output_shape(x.shape, w.shape, stride, pad)
    shapes.check_same_shape("conv2d_backward dy", dy.shape, (n, k, p, q))
    dx = conv2d_backward_data(dy, w, x.shape, stride, pad) if need_dx else None
    dw = conv2d_backward_filter(dy, x, w.shape, stride, pad, tile=tile)
    db = reduce.sum_over_batch(dy)
    return dx, dw, db


# ---------------------------------------------------------------- cases: every version at the model's shapes

def cases(net, ref, tiles, make):
    """Every version of forward, backward data and backward filter at each conv layer of `net`
    (`registry.cases`), tiled ones at each of `tiles`, against `ref` (the NumPy reference)."""
    return [c for L in net["conv"] for c in _layer_cases(L, ref, tiles, make)]


def _layer_cases(L, ref, tiles, make):
    """The cases of one conv layer (a function of its own, so each launch sees its own arrays)."""
    x, w, b, s, p = make.randn(*L["x"]), make.randn(*L["w"]), make.randn(L["w"][0]), L["stride"], L["pad"]
    y_ref = ref.conv2d_forward(x, w, b, s, p)
    dy = make.randn(*y_ref.shape)
    dx_ref, dw_ref, _ = ref.conv2d_backward(dy, x, w, s, p)
    x_, w_, b_, dy_ = make.dev(x), make.dev(w), make.dev(b), make.dev(dy)
    size = f"{dims(*x.shape)} * {dims(*w.shape)} pad {p}" + (f" stride {s}" if s != 1 else "")
    sizes, flops = {"x": x.shape, "w": w.shape, "y": y_ref.shape}, 2.0 * y_ref.size * w[0].size

    def case(what, v, launch, expect, tile=0):
        return Case("conv", f"{L['name']} {what}", v.name, f"{L['name']} {what} {v.label}" + (f" {tile}x{tile}" if tile
                    else ""), launch, sizes, expect, flops, "GFLOP/s", deterministic=v.deterministic,
                    default=v.default, tile=tile or None, size=size, extra={"stride": s, "pad": p})

    def each(op):  # (version, tile): the tiled versions at every tile size
        return [(v, t) for v in VERSIONS_OF[op] for t in (tiles if v.name == "tiled" else (0,))]

    out = [case("forward", v, lambda y=make.nan(y_ref.shape), v=v.name, t=t: conv2d_forward(
        x_, w_, b_, s, p, out=y, version=v, **({"tile": t} if t else {})), y_ref, t) for v, t in each("conv2d_forward")]
    out += [case("backward data", v, lambda g=make.nan(x.shape), v=v.name: conv2d_backward_data(
        dy_, w_, g.shape, s, p, out=g, version=v), dx_ref) for v, _ in each("conv2d_backward_data")]
    out += [case("backward filter", v, lambda g=make.nan(w.shape), v=v.name, t=t: conv2d_backward_filter(
        dy_, x_, g.shape, s, p, out=g, version=v, **({"tile": t} if t else {})), dw_ref, t)
        for v, t in each("conv2d_backward_filter")]
    return out


if __name__ == "__main__":  # the workbench: every version vs the NumPy reference, then timed (minasgd/workbench.py)
    from minasgd.workbench import main

    raise SystemExit(main("conv"))
