# %% [markdown]
# # Tutorial 10: occupancy, resources and shared-memory bank conflicts
#
# A GPU hides the long wait of every global load by switching between warps: while one warp
# waits, another computes. So it wants many warps resident on each streaming multiprocessor
# (SM) at once. How many fit is the kernel's **occupancy** (resident warps / the SM's maximum),
# and it is set by what each block uses of three shared budgets: threads, registers and shared
# memory. This tutorial reads those numbers off the real compiler, works out the *theoretical*
# occupancy of our kernels on an H100 (the most that fits; what a kernel achieves needs a GPU
# profiler), and then looks inside shared memory at **bank conflicts**, with the one-column fix
# that gives `kernels/gemm.py` its third version, `tiled_padded`: the conflicts are counted by
# `minasgd.kernels.memprofile` from the addresses the GEMM kernels really issue on the simulator.
#
# Files: `kernels/gemm.py` (v2 `tiled`, v3 `tiled_padded`), `kernels/reduce.py`, `kernels/memprofile.py`.
# Run: `python tutorials/10_occupancy_and_bank_conflicts.py` (about 20 s on the simulator).

# %%
import os
import shutil

if shutil.which("nvidia-smi") is None:  # no GPU: run the kernels on Numba's CUDA simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import math  # noqa: E402

import numpy as np  # noqa: E402
from numba import config, cuda  # noqa: E402

import _common as C  # noqa: E402
from minasgd.kernels import gemm, memprofile  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. What each kernel uses, from the compiler
#
# Registers are decided by the compiler, not by us. `numba.cuda.compile_ptx(kernel.py_func,
# argument types, cc=(9, 0))` turns a kernel into PTX without a GPU, and NVIDIA's assembler
# `ptxas -arch=sm_90 -v` prints what each kernel uses (`kernels/resources.py` does both for
# every kernel; `minasgd bench kernels --static` prints the whole table; it needs
# `pip install -e ".[gpu-compile]"`). These lines were measured that way (numba-cuda 0.30.4,
# CUDA 12.9, sm_90 = H100); shared memory is also easy to check by hand: two tiles of T x W
# float32, W = T (v2) or T + 1 (v3). Outside FAST mode, the cell below compiles them again
# when the toolchain is installed, and uses what it finds.
#
#     kernel                       threads/block  registers/thread  shared memory/block
#     gemm naive                        256              32                  0
#     gemm tiled T=16                   256              38              2,048 B
#     gemm tiled_padded T=16            256              38              2,176 B
#     gemm tiled T=32                  1024              40              8,192 B
#     gemm tiled_padded T=32           1024              46              8,448 B
#     reduce block_sum                  256              28              1,024 B

# %%
USAGE = {  # name: (threads per block, registers per thread, shared bytes per block), measured as above
    "gemm naive": (256, 32, 0),
    "gemm tiled T=16": (256, 38, 2 * 16 * 16 * 4),
    "gemm tiled_padded T=16": (256, 38, 2 * 16 * 17 * 4),
    "gemm tiled T=32": (1024, 40, 2 * 32 * 32 * 4),
    "gemm tiled_padded T=32": (1024, 46, 2 * 32 * 33 * 4),
    "reduce block_sum": (256, 28, 256 * 4),
}
COMPILED_AS = {  # our names -> the compile table's (kernels/*.py signatures())
    "gemm naive": "gemm_naive", "gemm tiled T=16": "gemm_tiled 16x16", "gemm tiled_padded T=16": "gemm_tiled_padded 16x16",
    "gemm tiled T=32": "gemm_tiled 32x32", "gemm tiled_padded T=32": "gemm_tiled_padded 32x32",
    "reduce block_sum": "block_sum_kernel",
}
if not C.FAST:  # compiling every kernel takes a while: not in the test suite's FAST runs
    try:
        from minasgd.kernels import resources

        rows = {r["name"]: r for r in resources.report(("sm_90",)) if "error" not in r}
        for ours, theirs in COMPILED_AS.items():
            if theirs in rows:
                USAGE[ours] = (rows[theirs]["threads"], rows[theirs]["registers"], rows[theirs]["smem"])
        print("registers and shared memory: compiled just now for sm_90 (ptxas -v)")
    except Exception as e:  # noqa: BLE001 - no toolchain (or no resources module): use the quoted numbers
        print(f"registers and shared memory: the numbers quoted above ({str(e).splitlines()[0][:100]})")
for name, (threads, regs, smem) in USAGE.items():
    print(f"  {name:24} {threads:5} threads  {regs:3} registers  {smem:6,} B shared")

# %% [markdown]
# ## 2. Theoretical occupancy on an H100
#
# Per SM an H100 (like the A100 and V100) holds at most 2,048 threads (64 warps) and 32
# blocks and has 65,536 32-bit registers; its shared memory is up to 228 KB per SM (the A100
# has 164 KB, the V100 96 KB), and a block may use 48 KB of static shared memory. Registers are handed out per warp in chunks of 256. A block is
# resident only if ALL of its resources fit, so the number of blocks per SM is the smallest of
# four limits:

# %%
SM = dict(threads=2048, blocks=32, registers=65536, shared=228 * 1024)


def occupancy(threads, regs, shared):
    """(blocks per SM, which limit binds, theoretical occupancy) for one kernel on an H100-class SM."""
    warps = math.ceil(threads / 32)
    regs_per_block = warps * math.ceil(regs * 32 / 256) * 256
    limits = {
        "threads": SM["threads"] // threads,
        "blocks": SM["blocks"],
        "registers": SM["registers"] // regs_per_block,
        "shared memory": SM["shared"] // shared if shared else SM["blocks"],
    }
    blocks = min(limits.values())
    return blocks, min(limits, key=limits.get), blocks * threads / SM["threads"]


print(f"  {'kernel':24} {'blocks/SM':>9} {'limited by':>14} {'theoretical occupancy':>22}")
occ = {}
for name, use in USAGE.items():
    blocks, limit, o = occupancy(*use)
    occ[name] = o
    print(f"  {name:24} {blocks:>9} {limit:>14} {o:>22.0%}")

# %% [markdown]
# The 16 x 16 GEMM tiles are limited by **registers**: 38 per thread is 38 x 32 = 1,216 per
# warp, rounded up to 1,280 (chunks of 256), so a block of 8 warps takes 10,240 (not
# 38 x 256 = 9,728), and 6 blocks (1,536 threads, 75%) fit. The 32 x 32 tiles use 1,024 threads per block
# and 40-46 registers each, so only one block fits: 50%. Shared memory is nowhere near its
# limit. More occupancy is not always faster (a kernel that reuses data from registers can be
# fast at 50%), but a kernel at low occupancy with nothing else to hide its loads behind waits.
# Levers: fewer threads per block, fewer registers (`max_registers=` in `cuda.jit`, at the
# risk of spills to slow local memory), less shared memory per block.
#
# ## 3. Shared-memory banks
#
# Shared memory is split into 32 **banks**; consecutive 4-byte words go to consecutive banks
# (word w is in bank w % 32). A warp's 32 accesses are served at once when they hit 32
# different banks (or the SAME word, which is broadcast). When k different words of one bank
# are asked for, the access is replayed k times: a **k-way bank conflict**.
#
# In the tiled GEMM the shared tiles are T x W floats, row-major, so element [r, c] is word
# r * W + c. Thread (tx, ty) of a 16 x 16 block sits in warp (16 ty + tx) // 32. The accesses:
#
#     stage a normal operand      sa[ty, tx] = ...     consecutive tx -> consecutive words
#     stage a transposed operand  sa[tx, ty] = ...     consecutive tx -> words W apart (tutorial 8)
#     compute                     sa[ty, kk], sb[kk, tx]   one word per row (broadcast) / consecutive
#
# Rather than work the banks out by hand, run both versions of the real kernel under the
# profiler: C = A^T B (A transposed: its tile is stored `sa[tx, ty]`; B is not: `sb[ty, tx]`)
# on one T x T tile, and read off, for each shared-memory line of `gemm_tiled`, the worst
# conflict of any warp's request (the ways: 1 = conflict-free; a broadcast costs nothing).

# %%
def shared_ways(version, tile):
    """{(op, array): worst ways of any request} of the shared accesses of one profiled GEMM launch."""
    a = cuda.to_device(rng.standard_normal((tile, tile)).astype(np.float32))  # (K, M): op(A) = A^T
    b = cuda.to_device(rng.standard_normal((tile, tile)).astype(np.float32))  # (K, N): op(B) = B
    with memprofile.profiling() as prof:
        gemm.gemm(a, b, trans_a=True, version=version, tile=tile)
    return {(s.instruction.op, s.instruction.array): s for s in prof.instructions() if s.instruction.space == "shared"}


PATTERNS = {("store", "sa"): "sa[tx, ty]", ("store", "sb"): "sb[ty, tx]", ("load", "sa"): "sa[ty, kk]",
            ("load", "sb"): "sb[kk, tx]"}
rows = []
print(f"  {'access':12} {'T':>3} {'v2 tiled (W = T)':>17} {'v3 tiled_padded (W = T + 1)':>28}   (modelled, worst warp)")
for tile in C.pick((16,), (16, 32)):  # T = 32: 1,024 simulated threads per launch, outside FAST mode only
    v2, v3 = shared_ways("tiled", tile), shared_ways("tiled_padded", tile)
    for key, pattern in PATTERNS.items():
        worst = [v2[key].max_ways, v3[key].max_ways]
        rows.append((tile, pattern, *worst))
        print(f"  {pattern:12} {tile:>3} {f'{worst[0]}-way':>17} {f'{worst[1]}-way':>28}")
print("  the profiled lines of gemm_tiled:")
for (op, array), stats in v2.items():
    print(f"    line {stats.instruction.line} ({op} {array}): {stats.instruction.source}")

# %% [markdown]
# The transposed store is the culprit: in v2 with T = 16 a warp's 32 threads write words
# 16 apart, which land in only 4 banks (8-way conflict); with T = 32 all 32 land in ONE bank
# (32-way: the store takes 32 times as long). Padding each row by one unused float (W = T + 1)
# shifts every row by one bank, and the same stores spread over the banks: at T = 32 (a warp
# is one row) all 32 land in distinct banks. At T = 16 (the default) a warp spans two rows, so
# the padded transposed store is still 2-way (word 15 x 17 + 1 = 256 of the second row is in
# bank 0 with word 0 of the first): 2-way instead of 8-way, not conflict-free. The row-wise
# stores (`sb[ty, tx]` here) also collide once at T = 16 (word 17 + 15 = 32 is in bank 0 with
# word 0): 2-way where v2 had none. At T = 32 (run without MINASGD_TUTORIAL_FAST to see it
# profiled) v3 is conflict-free everywhere. That one extra column is
# all `tiled_padded` changes: `gemm.tiled_kernel(tile, pad=1)` builds it from the same code. It
# costs 128-256 bytes of shared memory per block (two tiles, T extra floats each) and, at
# T = 32, the compiler used 6 more registers (table above), which did not change the occupancy.
#
# Which GEMMs stage a transposed operand? In a fully connected layer the forward pass
# y = x W^T (`trans_b=True`) and the weight gradient dW = dy^T x (`trans_a=True`) do; the data
# gradient dx = dy W does not. So v3 can only help those two, and most at T = 32.

# %% [markdown]
# ## 4. v3 is the same GEMM: check it, and time it on a GPU
#
# Every version must match the reference (the test suite checks v3 like the others, with
# odd sizes and NaN-filled outputs). On the simulator nothing is timed: it has no banks. On a
# GPU this cell times both at 2048^3, and `python -m minasgd.kernels.gemm` validates and times
# v1, v2 and v3 at the model's own layer shapes (no GPU numbers have been measured for v3 yet).

# %%
m, k, n = C.pick((19, 23, 13), (37, 45, 29))
a = rng.standard_normal((k, m)).astype(np.float32)  # stored transposed: op(A) = A^T
b = rng.standard_normal((n, k)).astype(np.float32)  # op(B) = B^T
expect = a.T @ b.T
for version in ("tiled", "tiled_padded"):
    got, solved = C.exercise("5.1", lambda: gemm.gemm(cuda.to_device(a), cuda.to_device(b), trans_a=True, trans_b=True,
                                                      version=version, tile=8).copy_to_host(), lambda: None)
    if solved:
        print(f"gemm {version:12} A^T B^T ({m}x{k} @ {k}x{n}): max |error| vs NumPy = {C.max_err(got, expect):.2e}")

measured = {}
if GPU:
    size = 2048
    big_a = cuda.to_device(rng.standard_normal((size, size)).astype(np.float32))
    big_b = cuda.to_device(rng.standard_normal((size, size)).astype(np.float32))
    out = cuda.device_array((size, size), np.float32)
    for tile in (16, 32):
        for version in ("tiled", "tiled_padded"):
            s = C.gpu_time(lambda: gemm.gemm(big_a, big_b, trans_a=True, trans_b=True, out=out, version=version, tile=tile))
            measured[f"{version} T={tile}"] = s
            print(f"  A^T B^T {size}^3, {version:12} T={tile}: {s * 1e3:7.3f} ms, {2 * size ** 3 / s / 1e9:6.0f} GFLOP/s")
else:
    print("no real GPU: timings skipped (the simulator has no shared-memory banks: its times say nothing about a GPU).")

plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
    names = list(occ)
    ax[0].barh(names, [occ[x] for x in names], color="tab:blue")
    ax[0].set_xlim(0, 1)
    ax[0].set_xlabel("theoretical occupancy on an H100 SM")
    ax[0].tick_params(axis="y", labelsize=8)
    labels = [f"{p}\nT={t}" for t, p, _, _ in rows]
    xs = np.arange(len(rows))
    ax[1].bar(xs - 0.2, [r[2] for r in rows], 0.4, label="v2 tiled", color="tab:red")
    ax[1].bar(xs + 0.2, [r[3] for r in rows], 0.4, label="v3 tiled_padded", color="tab:green")
    ax[1].set_xticks(xs, labels, fontsize=7)
    ax[1].set_ylabel("bank conflict (k-way)")
    ax[1].legend(fontsize=8)
    C.save(fig, "10_occupancy_banks.png")
else:
    C.text_bars([f"{p} T={t} v2" for t, p, _, _ in rows], [r[2] for r in rows])
    C.no_plot("10_occupancy_banks.png")

# %% [markdown]
# ## What to remember
# - Theoretical occupancy = resident warps / the SM's maximum; the tightest of threads, registers, shared
#   memory and blocks per SM sets it. Read registers off the compiler (`ptxas -v`), not a guess.
# - Shared memory has 32 banks; a warp touching k words of one bank waits k times. Column
#   accesses of a T x T tile with T a multiple of 32 (or 16) conflict; pad rows to T + 1.
# - On the simulator, check that every version is right; on a GPU, measure whether it is faster.
print("\ntutorial 10 done")
