# %% [markdown]
# # Tutorial 3: shared-memory tiling, naive vs tiled matrix multiply
#
# Matrix multiply (GEMM), C = A @ B, is the fully connected layer and, through im2col, the
# convolution too (tutorial 2). A GPU can do hundreds of times more arithmetic per second than
# it can fetch numbers from its main (*global*) memory, so a fast kernel must reuse every
# number it loads. *Tiling* does that with *shared memory*: a small, fast scratchpad that the
# threads of one block share.
#
# We write both kernels here in their simplest form, check them, count the memory traffic,
# and (on a real GPU) time them. The production versions, which also handle transposes and a
# bias, are in `kernels/gemm.py` (`gemm_naive`, `tiled_kernel`).
# Run: `python tutorials/03_shared_memory_tiling.py` (about 15 s on the simulator).

# %%
import math
import os
import shutil

if shutil.which("nvidia-smi") is None:  # no GPU: run the kernels on Numba's CUDA simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
from numba import config, cuda, float32  # noqa: E402

import _common as C  # noqa: E402
from minasgd.kernels import gemm  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Naive: one thread per element of C
#
# Thread (row, col) walks the K dimension: it reads a whole row of A and a whole column of B
# from global memory to produce one number. That is 2K loads for 2K flops (one multiply and
# one add per pair): one flop per 4 bytes loaded. Neighbouring threads load the same rows and
# columns again and again; caches help a little, but not enough.

# %%
@cuda.jit
def matmul_naive(a, b, c):
    col, row = cuda.grid(2)  # x is the column: consecutive threads read consecutive B entries
    m, n = c.shape
    if row < m and col < n:
        acc = float32(0)
        for k in range(a.shape[1]):
            acc += a[row, k] * b[k, col]
        c[row, col] = acc


# %% [markdown]
# ## 2. Tiled: a block computes a TILE x TILE tile of C
#
# The block owning C[row0 : row0+T, col0 : col0+T] needs the T rows of A and T columns of B
# around it. It walks K one *slab* of width T at a time:
#
# 1. every thread loads ONE element of the A slab and ONE of the B slab into shared memory;
# 2. `cuda.syncthreads()`: wait until the whole block has loaded (else a thread would read a
#    shared entry its neighbour has not written yet: a *race*);
# 3. every thread does T multiply-adds reading only shared memory;
# 4. `cuda.syncthreads()` again, before the next slab overwrites the tiles.
#
# Each element loaded from global memory is now used T times: T times less traffic. Entries
# outside the matrices are staged as 0, so sizes need not be multiples of T. The tile size must
# be a compile-time constant (it sizes the shared arrays), so a small factory builds one kernel
# per size, as `kernels/gemm.py:tiled_kernel` does.

# %%
def make_matmul_tiled(tile):
    @cuda.jit
    def matmul_tiled(a, b, c):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.y * tile + ty
        col = cuda.blockIdx.x * tile + tx
        m, n = c.shape
        k_dim = a.shape[1]
        # One shared array per line: the simulator makes two declared on one line the same array.
        sa = cuda.shared.array((tile, tile), float32)
        sb = cuda.shared.array((tile, tile), float32)
        # BEGIN SOLUTION task 5.1: c[row, col] = (a @ b)[row, col] inside the matrix, computed slab by slab from the shared tiles sa and sb, race-free
        acc = float32(0)
        for k0 in range(0, k_dim, tile):
            sa[ty, tx] = a[row, k0 + tx] if (row < m and k0 + tx < k_dim) else float32(0)
            sb[ty, tx] = b[k0 + ty, col] if (k0 + ty < k_dim and col < n) else float32(0)
            cuda.syncthreads()  # the tiles are complete
            for kk in range(tile):
                acc += sa[ty, kk] * sb[kk, tx]
            cuda.syncthreads()  # everyone is done with them
        if row < m and col < n:
            c[row, col] = acc
        # END SOLUTION

    return matmul_tiled


# %% [markdown]
# ## 3. Check both against NumPy
#
# Sizes deliberately not multiples of the tile, so the edge handling is tested too.

# %%
TILE = 8
m, k, n = C.pick((20, 24, 18), (37, 45, 29))
a = rng.standard_normal((m, k)).astype(np.float32)
b = rng.standard_normal((k, n)).astype(np.float32)
expect = a @ b
d_a, d_b = cuda.to_device(a), cuda.to_device(b)
grid = (math.ceil(n / TILE), math.ceil(m / TILE))  # (x: columns, y: rows)


def run(kernel):
    d_c = cuda.to_device(np.full((m, n), np.nan, np.float32))  # NaN: an element never written shows up
    kernel[grid, (TILE, TILE)](d_a, d_b, d_c)
    return d_c.copy_to_host()


print(f"naive        ({m}x{k}) @ ({k}x{n}): max |error| vs NumPy = {C.max_err(run(matmul_naive), expect):.2e}")
# The tiled kernel above is an exercise of task 5.1 in the course: this is its check cell.
c_tiled, solved = C.exercise("5.1", lambda: run(make_matmul_tiled(TILE)), lambda: expect)
if solved:
    print(f"tiled T={TILE}  ({m}x{k}) @ ({k}x{n}): max |error| vs NumPy = {C.max_err(c_tiled, expect):.2e}")
bias = rng.standard_normal(n).astype(np.float32)
for version in gemm.VERSIONS:  # the production kernels, with a transpose and a bias thrown in
    got, solved = C.exercise("5.1", lambda: gemm.gemm(d_a, cuda.to_device(np.ascontiguousarray(b.T)), trans_b=True,
                                                      bias=cuda.to_device(bias), version=version, tile=TILE).copy_to_host(),
                             lambda: None)
    if solved:
        print(f"kernels.gemm {version:12}: A @ (B^T)^T + bias, max |error| = {C.max_err(got, expect + bias):.2e}")

# %% [markdown]
# ## 4. Counting the traffic
#
# For an M x K by K x N product (2MNK flops), the naive kernel loads 2MNK floats from
# global memory; the tiled one loads every element of A once per column-tile of C and every
# element of B once per row-tile: 2MNK / T. The *arithmetic intensity* (flops per byte
# loaded) grows with T. Limits on T: T*T threads per block (at most 1024, so T <= 32) and
# 2*T*T*4 bytes of shared memory per block (48 KB by default; T = 32 needs 8 KB).

# %%
M = N = K = 1024
rows = []
print(f"GEMM {M}x{K}x{N}: {2 * M * N * K / 1e9:.1f} GFLOP")
print(f"  {'kernel':10} {'global loads':>14} {'MB moved':>9} {'flop/byte':>10} {'threads/block':>14} {'shared bytes':>13}")
for t in (1, 4, 8, 16, 32):
    loads = 2 * M * N * K // t
    name = "naive" if t == 1 else f"tiled T={t}"
    rows.append((name, loads))
    print(f"  {name:10} {loads:>14,} {loads * 4 / 1e6:>9,.0f} {2 * M * N * K / (loads * 4):>10.2f} "
          f"{'-' if t == 1 else t * t:>14} {'-' if t == 1 else 2 * t * t * 4:>13}")

# %% [markdown]
# ## 5. Measured speed (real GPU only)
#
# On a GPU we time `kernels/gemm.py` naive and tiled with several tile sizes at 1024^3.
# Without one we print nothing: the simulator runs each thread in Python and its timings say
# nothing about a GPU (the tiled kernel is in fact *slower* to simulate: more threads).

# %%
measured = {}
if GPU:
    big_a = cuda.to_device(rng.standard_normal((M, K)).astype(np.float32))
    big_b = cuda.to_device(rng.standard_normal((K, N)).astype(np.float32))
    out = cuda.device_array((M, N), np.float32)
    measured["naive"] = C.gpu_time(lambda: gemm.gemm(big_a, big_b, out=out, version="naive"))
    for t in (4, 8, 16, 32):
        measured[f"tiled T={t}"] = C.gpu_time(lambda: gemm.gemm(big_a, big_b, out=out, version="tiled", tile=t))
    for name, s in measured.items():
        print(f"  {name:10} {s * 1e3:8.3f} ms  {2 * M * N * K / s / 1e9:8.0f} GFLOP/s")
else:
    print("no real GPU: timings skipped (the simulator's times say nothing about a GPU).")

# %% [markdown]
# ## A picture: what one block reads, and the traffic per tile size

# %%
plt = C.pyplot()
if plt is not None:
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(1, 2 if not measured else 3, figsize=(14 if measured else 10, 4))
    # Left: the matrices as boxes; the block's C tile, A row-strip and B column-strip, slab by slab.
    d0 = ax[0]
    d0.set_xlim(-0.5, 9)
    d0.set_ylim(-5, 4.5)
    d0.set_aspect("equal")
    d0.axis("off")
    d0.add_patch(Rectangle((0, 0), 4, 4, fill=False))  # A (M x K) left, rows go down
    d0.add_patch(Rectangle((4.5, 4.5 - 4.5), 4, 4, fill=False))  # C
    d0.add_patch(Rectangle((4.5, -4.9), 4, 4, fill=False))  # B below C
    d0.text(2, 4.15, "A", ha="center")
    d0.text(6.5, 4.15, "C = A @ B", ha="center")
    d0.text(6.5, -0.75, "B", ha="right")
    d0.add_patch(Rectangle((5.5, 2), 1, 1, color="tab:red"))  # C tile at (row 1, col 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for s in range(4):
        d0.add_patch(Rectangle((s, 2), 1, 1, color=colors[s], alpha=0.7))  # A slab s
        d0.add_patch(Rectangle((5.5, -1.9 - s), 1, 1, color=colors[s], alpha=0.7))  # B slab s
        d0.text(s + 0.5, 2.5, str(s), ha="center", va="center", color="white")
        d0.text(6, -1.4 - s, str(s), ha="center", va="center", color="white")
    d0.set_title("one block (red tile of C) stages slab s of A and of B\n"
                 "in shared memory, for s = 0, 1, 2, 3", fontsize=9)
    names = [r[0] for r in rows]
    ax[1].bar(names, [r[1] * 4 / 1e9 for r in rows], color="tab:gray")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("GB read from global memory")
    ax[1].set_title(f"GEMM {M}x{K}x{N}: traffic vs tile size", fontsize=9)
    ax[1].tick_params(axis="x", labelsize=8)
    if measured:
        ax[2].bar(list(measured), [2 * M * N * K / s / 1e9 for s in measured.values()], color="tab:green")
        ax[2].set_ylabel("GFLOP/s (measured)")
        ax[2].set_title("measured on this GPU", fontsize=9)
        ax[2].tick_params(axis="x", labelsize=8)
    C.save(fig, "03_tiling.png")
else:
    C.text_bars([r[0] for r in rows], [r[1] * 4 / 1e9 for r in rows])
    C.no_plot("03_tiling.png")

# %% [markdown]
# ## What to remember
# - Global memory is the bottleneck; shared memory lets a block load a tile once and use it
#   T times. Traffic drops by the tile size.
# - `cuda.syncthreads()` twice per slab: after loading (so the tile is complete) and after
#   computing (so nobody overwrites a tile still being read). Every thread of the block must
#   reach each one: never put it inside an `if` that only some threads take.
# - A missing syncthreads gives wrong numbers on the simulator too, but only on the launches
#   where the threads happen to interleave badly (often, for this kernel; never guaranteed), and
#   a missing atomic almost never shows there; the race checker `kernels/racecheck.py` reports
#   both on every launch (tutorial 9).
#
# Next: tutorial 4, pooling, dropout and the loss, forward and backward.
print("\ntutorial 3 done")
