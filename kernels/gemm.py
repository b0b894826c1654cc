"""Matrix multiply for the fully connected layer: C = op(A) @ op(B) (+ bias), float32.

op(A) is A or A^T (trans_a), op(B) likewise, so one kernel serves the three products of a
linear layer without copying a transpose:

    forward          y  = x  @ w^T + b      gemm(x, w, trans_b=True, bias=b)
    backward data    dx = dy @ w            gemm(dy, w)
    backward weight  dw = dy^T @ x          gemm(dy, x, trans_a=True)

    v1 naive: one thread per output element C[i, j] (grid-stride loop over M*N); each thread
       reads a row of op(A) and a column of op(B) from global memory, 2K loads per 2K flops.
    v2 tiled: a TILE x TILE thread block owns a TILE x TILE tile of C. It walks the K dimension
       one TILE-wide slab at a time: each thread stages one element of op(A) and one of op(B) in
       shared memory, the block synchronises, and every thread does TILE multiply-adds out of
       shared memory. Each element of A and B is read from global memory TILE times less often
       than in v1. Loads of a transposed operand read along its rows, so they stay coalesced.
    v3 tiled_padded: v2 with each shared tile one column wider (TILE x (TILE + 1)). A transposed
       operand is STORED down a column of its tile (sa[tx, ty]): in v2 the 32 threads of a warp
       then write addresses TILE floats apart, which fall in the same few of shared memory's 32
       banks and are served one after another (an 8-way conflict at TILE 16, 32-way at 32). The
       unused extra column shifts each row by one bank: at TILE 32 the same stores hit distinct
       banks; at TILE 16 (a warp spans two rows) they are still 2-way, down from 8-way.
       Same code, same arithmetic: only the shared arrays' row length differs (tutorial 10).

Shapes: op(A) is (M, K), op(B) is (K, N), C is (M, N). The tile size is a compile-time
constant, so `tiled_kernel(tile)` builds (and caches) one kernel per size.
"""

import functools

from numba import cuda, float32

from .common import BOOL, F1, F2, THREADS, TILES, Signature, grid_1d, output
from .registry import Case, Version, dims, pick

TILE = 16  # 16 x 16 = 256 threads per block


# ---------------------------------------------------------------- kernels

@cuda.jit(cache=True)
def gemm_naive(a, b, c, trans_a, trans_b, bias, has_bias):
    """C[i, j] = sum_k op(A)[i, k] * op(B)[k, j] (+ bias[j]); one thread per C element."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    m, n = c.shape
    k_dim = a.shape[0] if trans_a else a.shape[1]
    for idx in range(start, m * n, stride):
        i = idx // n
        j = idx % n
        acc = float32(0)
        for k in range(k_dim):
            av = a[k, i] if trans_a else a[i, k]
            bv = b[j, k] if trans_b else b[k, j]
            acc += av * bv
        if has_bias:
            acc += bias[j]
        c[i, j] = acc


@functools.cache
def tiled_kernel(tile, pad=0):
    """Build the shared-memory tiled GEMM for a tile x tile thread block (v2; pad=1: v3, rows tile + 1 long)."""
    width = tile + pad  # row length of the shared tiles; columns tile .. width-1 are never used

    def gemm_tiled(a, b, c, trans_a, trans_b, bias, has_bias):
        """C = op(A) op(B) (+ bias) by tiles. Block (bx, by) owns C[by*T : by*T+T, bx*T : bx*T+T];
        thread (tx, ty) computes C[row, col] with row = by*T + ty, col = bx*T + tx.
        """
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row0 = cuda.blockIdx.y * tile
        col0 = cuda.blockIdx.x * tile
        row = row0 + ty
        col = col0 + tx
        m, n = c.shape
        k_dim = a.shape[0] if trans_a else a.shape[1]

        sa = cuda.shared.array((tile, width), float32)  # sa[i, kk] = op(A)[row0 + i, k0 + kk]
        sb = cuda.shared.array((tile, width), float32)  # sb[kk, j] = op(B)[k0 + kk, col0 + j]

        # BEGIN SOLUTION task 5.1: c[row, col] = (op(A) op(B))[row, col] (+ bias[col]) for this thread's element inside C, computed from the shared tiles sa and sb so that each element of A and B is loaded from global memory once per tile of C it feeds, race-free (a transposed operand is stored transposed)
        acc = float32(0)
        for k0 in range(0, k_dim, tile):
            # Stage one element of each operand. Consecutive tx read consecutive addresses:
            # for a transposed operand the thread stores its element transposed instead.
            if trans_a:  # A is (K, M): read A[k0 + ty, row0 + tx] into sa[tx, ty]
                k = k0 + ty
                i = row0 + tx
                sa[tx, ty] = a[k, i] if (k < k_dim and i < m) else float32(0)
            else:  # A is (M, K): read A[row, k0 + tx] into sa[ty, tx]
                k = k0 + tx
                sa[ty, tx] = a[row, k] if (k < k_dim and row < m) else float32(0)
            if trans_b:  # B is (N, K): read B[col0 + ty, k0 + tx] into sb[tx, ty]
                k = k0 + tx
                j = col0 + ty
                sb[tx, ty] = b[j, k] if (k < k_dim and j < n) else float32(0)
            else:  # B is (K, N): read B[k0 + ty, col] into sb[ty, tx]
                k = k0 + ty
                sb[ty, tx] = b[k, col] if (k < k_dim and col < n) else float32(0)
            cuda.syncthreads()  # the whole tile is staged
            for kk in range(tile):
                acc += sa[ty, kk] * sb[kk, tx]
            cuda.syncthreads()  # everyone is done reading before the next slab overwrites it
        if row < m and col < n:
            if has_bias:
                acc += bias[col]
            c[row, col] = acc
        # END SOLUTION

    if pad:  # v3 under its own name: the race checker, the compile table and profilers tell them apart
        gemm_tiled.__name__ = gemm_tiled.__qualname__ = "gemm_tiled_padded"
    return cuda.jit(cache=True)(gemm_tiled)


# ---------------------------------------------------------------- launchers

def launch_naive(a, b, c, trans_a, trans_b, bias):
    blocks, threads = grid_1d(c.size)
    gemm_naive[blocks, threads](a, b, c, trans_a, trans_b, _bias_arg(bias, c), bias is not None)


def launch_tiled(a, b, c, trans_a, trans_b, bias, tile=TILE, pad=0):
    m, n = c.shape
    grid = ((n + tile - 1) // tile, (m + tile - 1) // tile)
    tiled_kernel(tile, pad)[grid, (tile, tile)](a, b, c, trans_a, trans_b, _bias_arg(bias, c), bias is not None)


def _bias_arg(bias, c):
    # Kernels always take a 1-D bias array; without a bias, pass a row of C itself (never read).
    return bias if bias is not None else c[0]


def signatures():
    """What the launchers above pass (see `common.Signature`), for every tile size in use."""
    args = (F2, F2, F2, BOOL, BOOL, F1, BOOL)
    return [Signature("gemm_naive", "v1 naive", gemm_naive, args, THREADS)] + [
        Signature(f"gemm_tiled {t}x{t}", "v2 tiled", tiled_kernel(t), args, t * t) for t in TILES
    ] + [Signature(f"gemm_tiled_padded {t}x{t}", "v3 tiled_padded", tiled_kernel(t, 1), args, t * t) for t in TILES]


# ---------------------------------------------------------------- public functions

VERSIONS_OF = {  # every version of the public function (`registry.Version`); the backend's is `default`
    "gemm": (Version("gemm", "naive", "v1 naive", "launch_naive", deterministic=True),
             Version("gemm", "tiled", "v2 tiled", "launch_tiled", deterministic=True, default=True),
             Version("gemm", "tiled_padded", "v3 tiled_padded", "launch_tiled", deterministic=True)),
}
VERSIONS = tuple(v.name for v in VERSIONS_OF["gemm"])


def gemm(a, b, trans_a=False, trans_b=False, bias=None, out=None, version="tiled", tile=TILE):
    """C = op(A) @ op(B) (+ bias[None, :]) -> (M, N) float32 device array (fresh unless out is given)."""
    pick(VERSIONS_OF, "gemm", version)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb:
        raise ValueError(f"gemm: inner dimensions differ, op(A) is {(m, k)} and op(B) is {(kb, n)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"gemm: bias must have shape ({n},), got {tuple(bias.shape)}")
    c = output((m, n), a.dtype, out, "gemm out")
    if c.size == 0:
        return c
    if version == "naive":
        launch_naive(a, b, c, trans_a, trans_b, bias)
    elif version == "tiled":
        launch_tiled(a, b, c, trans_a, trans_b, bias, tile)
    else:  # "tiled_padded": the same kernel with each shared row one float longer (no bank conflicts)
        launch_tiled(a, b, c, trans_a, trans_b, bias, tile, pad=1)
    return c


# ---------------------------------------------------------------- cases: every version at the model's shapes

def cases(net, ref, tiles, make):
    """The three products of each fully connected layer of `net` (forward, dx, dw), every version,
    tiled ones at each of `tiles` (`registry.cases`). `ref` is not needed: NumPy's @ is the reference."""
    return [c for L in net["fc"] for c in _layer_cases(L, tiles, make)]


def _layer_cases(L, tiles, make):
    (n, d), (m, _) = L["x"], L["w"]
    x, w, b, dy = make.randn(n, d), make.randn(m, d), make.randn(m), make.randn(n, m)
    products = (("forward y = x w^T + b", (x, w, False, True, b), x @ w.T + b),
                ("backward dx = dy w", (dy, w, False, False, None), dy @ w),
                ("backward dw = dy^T x", (dy, x, True, False, None), dy.T @ x))
    out = []
    for what, (a, bm, ta, tb, bias), expect in products:
        a_, b_, bias_ = make.dev(a), make.dev(bm), None if bias is None else make.dev(bias)
        for v in VERSIONS_OF["gemm"]:
            for t in (None,) if v.name == "naive" else tiles:
                out.append(Case("gemm", f"{L['name']} {what}", v.name, f"{L['name']} {what} {v.label}"
                                + ("" if t is None else f" {t}x{t}"),
                                lambda a=a_, b=b_, ta=ta, tb=tb, bias=bias_, c=make.nan(expect.shape), v=v.name,
                                kw={} if t is None else {"tile": t}: gemm(a, b, ta, tb, bias=bias, out=c, version=v, **kw),
                                {"a": a.shape, "b": bm.shape, "c": expect.shape}, expect, 2.0 * n * d * m, "GFLOP/s",
                                default=v.default, tile=t, size=f"{dims(n, d)} -> {dims(n, m)}"))
    return out


if __name__ == "__main__":  # the workbench: every version vs the NumPy reference, then timed (minasgd/workbench.py)
    from minasgd.workbench import main

    raise SystemExit(main("gemm"))
