# %% [markdown]
# # Tutorial 8: warps and memory coalescing
#
# Tutorials 1-3 treated threads as independent. On the hardware they are not: a block is cut
# into **warps** of 32 consecutive threads (threadIdx.x 0-31, 32-63, ...), and a warp executes
# ONE instruction at a time for all its 32 threads (*SIMT*: single instruction, multiple
# threads). When that instruction is a load from global memory, the 32 addresses are combined
# into as few memory transactions as cover them: global memory moves whole 32-byte *sectors*
# (8 floats). So what matters is not how many floats a warp asks for, but how many sectors
# its 32 addresses fall in:
#
#     32 consecutive floats (thread t reads x[base + t])   ->  128 bytes = 4 sectors, all used
#     32 floats 32 apart    (thread t reads x[32 * t])     ->  32 sectors, 1/8 of each used
#
# Loads of the first kind are *coalesced*. This tutorial copies an array with unit and with
# strided reads, counts the sectors each warp touches, and then explains the odd-looking
# transposed stores in `kernels/gemm.py`'s tiled kernel.
#
# Files: `kernels/gemm.py` (the tiled GEMM's staging), `kernels/memprofile.py` (the profiler).
# Run: `python tutorials/08_memory_coalescing.py` (about 15 s on the simulator). The simulator
# runs warps as 32 Python threads and has no memory system, so it cannot say how long a load
# takes. But it sees every address: `minasgd.kernels.memprofile` records, while the kernels
# below really run, the addresses each warp asks for at each load, and counts the sectors a
# GPU would move for them. Those counts are *modelled* (what the addresses imply), not
# measured; on a GPU the last cell times both copies.

# %%
import os
import shutil

if shutil.which("nvidia-smi") is None:  # no GPU: run the kernels on Numba's CUDA simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
from numba import config, cuda  # noqa: E402

import _common as C  # noqa: E402
from minasgd.kernels import gemm, memprofile  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
rng = np.random.default_rng(0)

WARP = 32
SECTOR = 32  # bytes


def load_of(prof, kernel, array):
    """The profiler's statistics of the (one) global load of `array` in `kernel`."""
    [stats] = [s for s in prof.instructions(kernel)
               if s.instruction.space == "global" and s.instruction.op == "load" and s.instruction.array == array]
    return stats


# %% [markdown]
# ## 1. The same copy, two access patterns
#
# Both kernels copy n floats with one thread per element; they differ only in WHICH element
# thread i reads. `copy_unit` reads x[i]. `copy_strided` reads the array column by column as
# if it were an (n / s) x s matrix: thread i reads x[(i % rows) * s + i // rows], so
# neighbouring threads read addresses s floats apart. Both write y[i] (coalesced).

# %%
@cuda.jit
def copy_unit(x, y):
    i = cuda.grid(1)
    if i < x.size:
        y[i] = x[i]


@cuda.jit
def copy_strided(x, y, s):
    i = cuda.grid(1)
    rows = x.size // s
    if i < x.size:
        y[i] = x[(i % rows) * s + i // rows]


n = C.pick(1024, 4096)
x = rng.standard_normal(n).astype(np.float32)
d_x, d_y = cuda.to_device(x), cuda.device_array(n, np.float32)
copy_unit[n // 128, 128](d_x, d_y)
print(f"copy_unit over {n} floats: equal to x: {np.array_equal(d_y.copy_to_host(), x)}")
s = 32
copy_strided[n // 128, 128](d_x, d_y, s)
expect = x.reshape(n // s, s).T.ravel()  # column by column
print(f"copy_strided (s = {s}): equal to the column-by-column order: {np.array_equal(d_y.copy_to_host(), expect)}")

# %% [markdown]
# ## 2. What a warp's 32 loads become
#
# For each stride, one block of 128 threads (4 warps) runs the copy again under the profiler:
# the 32-byte sectors each warp's load of x touches (its *request*), averaged over the
# requests, and the share of the moved bytes the kernel asked for. Every number in the table
# comes from the addresses the kernel issued (`prof.instructions(...)`), not from its formula.

# %%
print(f"  {'stride':>6} {'sectors/request':>16} {'bytes moved':>12} {'bytes used':>11} {'efficiency':>11}   (modelled)")
rows = []
for s in (1, 2, 4, 8, 16, 32):
    with memprofile.profiling() as prof:
        if s == 1:
            copy_unit[1, 128](d_x, d_y)
        else:
            copy_strided[1, 128](d_x, d_y, s)
    load = load_of(prof, "copy_unit" if s == 1 else "copy_strided", "x")
    mean = load.sectors_per_request
    rows.append((s, mean))
    print(f"  {s:>6} {mean:>16.1f} {mean * SECTOR:>12.0f} {load.asked // load.requests:>11} {load.efficiency:>10.0%}")

# %% [markdown]
# From stride 8 on, every thread of a warp gets its own sector: the memory system moves 1024
# bytes to deliver 128. A memory-bound kernel (a copy, ReLU, the optimizer update) runs at the
# memory's bandwidth, so a strided copy should take about 8x as long as the unit copy on a GPU:
# the hardware is busy moving the 7/8 of each sector nobody asked for. (Caches soften this
# when the other floats of a sector are read soon after by another warp, as the columns here
# are; a truly scattered access pattern gets no such help.)
#
# ## 3. Why the tiled GEMM stores transposed operands the way it does
#
# `kernels/gemm.py`'s tiled kernel computes C = op(A) @ op(B) where op(A) may be A^T: the
# backward pass computes dW = dy^T @ x without copying a transpose. The block's 16 x 16
# threads stage a 16 x 16 tile of op(A) in shared memory, `sa[i, kk] = op(A)[row0 + i, k0 + kk]`.
# Thread (tx, ty) is in warp (ty * 16 + tx) // 32: consecutive tx are neighbours in a warp.
# For A^T, A is stored (K, M), so op(A)[i, k] = A[k, i] lives at address k * M + i. Two ways
# to give each thread one element:
#
#     natural:    thread (tx, ty) loads op(A)[row0 + ty, k0 + tx] = A[k0 + tx, row0 + ty]
#                 into sa[ty, tx]    -> neighbours tx, tx+1 read addresses M floats apart
#     gemm.py:    thread (tx, ty) loads A[k0 + ty, row0 + tx] (= op(A)[row0 + tx, k0 + ty])
#                 into sa[tx, ty]    -> neighbours read consecutive addresses: coalesced
#
# The tile ends up the same; only who loads what changes. The price of the coalesced choice is
# paid in shared memory instead: thread tx writes sa[tx, ty], 16 floats away from its
# neighbour's, which makes *bank conflicts* (tutorial 10, and the padded v3 of the GEMM).
#
# Below, `stage_natural` does the first, and the real `gemm.gemm(..., trans_a=True)` the
# second; the profiler reports the sectors of each one's load of A. (A is 16 x 16 here: with
# any M of 8 floats or more the counts are the same as at alexnet-mini's M = 1152.)

# %%
TILE = 16


@cuda.jit
def stage_natural(a, out):
    """One 16 x 16 tile of op(A) = A^T staged the natural way: thread (tx, ty) loads A[tx, ty]."""
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    sa = cuda.shared.array((16, 16), np.float32)
    sa[ty, tx] = a[tx, ty]
    cuda.syncthreads()
    out[ty, tx] = sa[ty, tx]


a = rng.standard_normal((TILE, TILE)).astype(np.float32)  # A stored (K, M): op(A) = A^T
d_a, d_out = cuda.to_device(a), cuda.device_array((TILE, TILE), np.float32)
with memprofile.profiling() as prof:
    stage_natural[1, (TILE, TILE)](d_a, d_out)
    c = gemm.gemm(d_a, cuda.to_device(np.eye(TILE, dtype=np.float32)), trans_a=True, version="tiled", tile=TILE)
assert np.array_equal(d_out.copy_to_host(), a.T) and np.allclose(c.copy_to_host(), a.T)
for layout, kernel in (("natural", "stage_natural"), ("gemm.py", "gemm_tiled")):
    load = load_of(prof, kernel, "a")
    print(f"  {layout:8} staging of A^T: {load.sectors_per_request:4.1f} sectors per warp load "
          f"({load.asked // load.requests} bytes used of {load.sectors_per_request * SECTOR:.0f} moved; modelled)")

# %% [markdown]
# A warp of a 16 x 16 block covers two rows ty and ty + 1, so the coalesced layout reads two
# runs of 16 consecutive floats: 4 sectors, the minimum for 128 bytes. The natural layout
# reads 16 columns of A, M floats apart, two neighbouring floats in each (rows ty and ty + 1):
# 16 sectors, 4x the traffic (with a 32-wide tile, 32 sectors and 8x: the strided copy above).
# The non-transposed operands need no trick: A[row, k0 + tx] is already consecutive in tx.

# %% [markdown]
# ## 4. On a GPU: time both copies

# %%
plt = C.pyplot()
measured = {}
if GPU:
    big = 1 << 24
    d_big, d_out = cuda.to_device(rng.standard_normal(big).astype(np.float32)), cuda.device_array(big, np.float32)
    measured["unit"] = C.gpu_time(lambda: copy_unit[big // 256, 256](d_big, d_out))
    for s in (2, 8, 32):
        measured[f"stride {s}"] = C.gpu_time(lambda: copy_strided[big // 256, 256](d_big, d_out, s))
    for name, t in measured.items():
        print(f"  copy {name:9}: {t * 1e3:7.3f} ms, {8 * big / t / 1e9:6.0f} GB/s (read + write)")
else:
    print("no real GPU: timings skipped (the simulator has no memory system: its times say nothing about a GPU).")
if plt is not None:
    fig, ax = plt.subplots(1, 2 if measured else 1, figsize=(10 if measured else 5, 3.4), squeeze=False)
    ax = ax[0]
    ax[0].bar([str(s) for s, _ in rows], [m for _, m in rows], color="tab:blue")
    ax[0].set_xlabel("stride between neighbouring threads (floats)")
    ax[0].set_ylabel("32-byte sectors per warp load (modelled)")
    ax[0].set_title("one warp's 32 float loads", fontsize=9)
    if measured:
        ax[1].bar(list(measured), [8 * big / t / 1e9 for t in measured.values()], color="tab:green")
        ax[1].set_ylabel("GB/s (measured)")
        ax[1].set_title("copy bandwidth on this GPU", fontsize=9)
    C.save(fig, "08_coalescing.png")
else:
    C.text_bars([f"stride {s}" for s, _ in rows], [m for _, m in rows])
    C.no_plot("08_coalescing.png")

# %% [markdown]
# ## What to remember
# - Threads run in warps of 32 that execute one instruction together; a warp's loads are
#   served in 32-byte sectors.
# - Coalesced: neighbouring threads (consecutive threadIdx.x) read neighbouring addresses.
#   Make threadIdx.x the fastest-varying index of the array you read.
# - When the math wants a transposed access, load coalesced and transpose in shared memory,
#   as the tiled GEMM does; then watch for bank conflicts (tutorial 10).
#
# Next: tutorial 9, a block reduction and atomics.
print("\ntutorial 8 done")
