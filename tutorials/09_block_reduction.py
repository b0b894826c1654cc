# %% [markdown]
# # Tutorial 9: a block reduction, and why atomics make float sums non-deterministic
#
# Summing n numbers is the opposite of ReLU: n inputs, ONE output. One thread adding them all
# wastes the GPU; n threads adding into one place collide. The standard answer has three steps:
#
# 1. every thread sums a grid-strided share of the input into a register (no collisions);
# 2. the threads of a block combine their partial sums in **shared memory** as a tree:
#    with B threads, threads 0..B/2-1 add the upper half of the partials onto the lower half,
#    then 0..B/4-1, ... : log2(B) steps, with a `cuda.syncthreads()` after each;
# 3. thread 0 of each block adds the block's total to the output with ONE `cuda.atomic.add`,
#    because blocks cannot wait for each other inside a launch.
#
# The bias gradients and the mean loss use a simpler cousin (`kernels/reduce.py:sum_over_batch`,
# one block per output, no atomic: thread 0 adds the block's partials one by one), and
# `kernels/reduce.py:block_sum` is the whole-array sum with the tree and the atomic finish; in
# the course it is **task 7.1**.
# Run: `python tutorials/09_block_reduction.py` (a few seconds on the simulator).

# %%
import os
import shutil

if shutil.which("nvidia-smi") is None:  # no GPU: run the kernels on Numba's CUDA simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
from numba import config, cuda, float32  # noqa: E402

import _common as C  # noqa: E402
from minasgd.kernels import reduce  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The tree, step by step
#
# One block of 8 threads sums 8 numbers; after each halving step it copies its shared partials
# to a row of `steps`, so we can watch the tree. The barrier after each step matters: in step
# 2, thread 0 reads partial[2], which thread 2 wrote in step 1. Without the barrier thread 0
# may read it before thread 2 has written it (a *read-after-write race*). On a GPU a tree
# without its barriers gives a different sum from launch to launch, often a wrong one but not
# always: whether a launch shows the bug is luck. The simulator runs the threads of a kernel
# with no barrier one after another (`kernels/simulator.py`), which shows this bug on every
# launch but hides others; a race checker (which watches who touches what between barriers)
# reports every one of them on every launch.
#
# The tree's halving loop is an exercise (task 7.1): a student copy has a stub there, and the
# check cell below says whether yours is right.

# %%
B = 8


@cuda.jit
def tree_steps(x, steps):
    """One block of B threads: steps[0] = the inputs, steps[j] = the partials after halving step j."""
    tid = cuda.threadIdx.x
    partial = cuda.shared.array(B, float32)
    partial[tid] = x[tid]
    steps[0, tid] = partial[tid]
    cuda.syncthreads()
    # BEGIN SOLUTION task 7.1: steps[j] holds the partials after halving round j (j = 1, 2, 3) and partial[0] ends with the block's sum, race-free
    half = B // 2
    step = 1
    while half > 0:
        if tid < half:
            partial[tid] += partial[tid + half]
        cuda.syncthreads()  # every thread, outside the if: the step's sums are all written
        steps[step, tid] = partial[tid]
        half //= 2
        step += 1
    # END SOLUTION


x8 = np.arange(1, B + 1, dtype=np.float32)


def run_tree():
    d_steps = cuda.to_device(np.full((4, B), np.nan, np.float32))
    tree_steps[1, B](cuda.to_device(x8), d_steps)
    steps = d_steps.copy_to_host()
    if steps[3, 0] != x8.sum():
        raise NotImplementedError(f"task 7.1: the tree gives {steps[3, 0]}, not {x8.sum()}")
    return steps


def reference_tree():
    steps, cur = [x8.copy()], x8.copy()
    for half in (4, 2, 1):
        cur = cur.copy()
        cur[:half] += cur[half:2 * half]
        steps.append(cur)
    return np.array(steps)


steps, solved = C.exercise("7.1", run_tree, reference_tree)
for j, row in enumerate(steps):
    live = B >> j  # the partials that still matter
    print(f"  {'inputs' if j == 0 else f'step {j}':>7}: " + " ".join(f"{v:4.0f}" if i < live else "   ." for i, v in enumerate(row)))
print(f"sum of 1..{B} = {steps[-1][0]:.0f} after log2({B}) = 3 steps")


# %% [markdown]
# ## 2. The whole array: many blocks, one atomic per block
#
# `reduce.block_sum(x)` launches several blocks; each runs steps 1 and 2 on its share and
# finishes with one atomic add of its total into out[0]. An atomic add is a read-modify-write
# that no other thread can interrupt. A plain `out[0] += partial[0]` is three steps (read,
# add, write): two blocks can both read 0, both add, and the second write erases the first
# (a *lost update*). Here is that interleaving, done by hand:

# %%
out = np.zeros(1, np.float32)
block_totals = np.array([10.0, 32.0], np.float32)
read_by = [out[0], out[0]]  # both blocks read before either writes
for b in range(2):
    out[0] = read_by[b] + block_totals[b]
print(f"two blocks add {block_totals[0]:.0f} and {block_totals[1]:.0f} with a plain +=, interleaved: "
      f"out = {out[0]:.0f} (should be {block_totals.sum():.0f})")

# %% [markdown]
# On the simulator a lost update never shows: a kernel without a barrier runs its threads one
# after another there, so no thread comes between the read and the write of another's `+=`, and
# the count below comes out right. A missing barrier shows there when that order exposes it:
# for the shift below that is every launch, for other kernels none.
# `kernels/racecheck.py` watches who reads and writes each element between barriers instead of
# the result, and reports both on every launch. Two tiny kernels, each in a plain and a correct
# version: 64 threads counting into one number, and threads reading a neighbour's shared slot;
# each is launched 20 times, and the checker watches the first launch.

# %%
@cuda.jit
def count_plain(out):
    out[0] += float32(1)  # read, add, write: three steps another thread can come between


@cuda.jit
def count_atomic(out):
    cuda.atomic.add(out, 0, float32(1))


@cuda.jit
def shift_no_barrier(y):
    t = cuda.threadIdx.x
    s = cuda.shared.array(64, float32)
    s[t] = float32(t)
    y[t] = s[(t + 1) % 64]  # the neighbour may not have written its slot yet


@cuda.jit
def shift_barrier(y):
    t = cuda.threadIdx.x
    s = cuda.shared.array(64, float32)
    s[t] = float32(t)
    cuda.syncthreads()  # every slot is written before anyone reads
    y[t] = s[(t + 1) % 64]


if SIM:
    from minasgd.kernels import racecheck

    right = {count_plain: np.full(1, 64, np.float32), shift_no_barrier: (np.arange(64) + 1) % 64}
    right[count_atomic], right[shift_barrier] = right[count_plain], right[shift_no_barrier]
    for kernel in (count_plain, count_atomic, shift_no_barrier, shift_barrier):
        good = 0
        for launch in range(20):
            out = cuda.to_device(np.zeros(64, np.float32))
            if launch == 0:
                with racecheck.checking() as races:
                    kernel[1, 64](out)
            else:
                kernel[1, 64](out)
            result = out.copy_to_host()[:right[kernel].size]
            good += bool(np.array_equal(result, right[kernel]))
        verdict = f"RACE: {str(races.found[0])[:110]}..." if races.found else "no race"
        print(f"  {kernel.__name__:17} right in {good:2} of 20 launches  {verdict}")
else:
    print("(the race checker runs on the simulator: NUMBA_ENABLE_CUDASIM=1)")

# %%
n = C.pick(2000, 20000)
x = rng.standard_normal(n).astype(np.float32)
total, solved = C.exercise("7.1", lambda: reduce.block_sum(cuda.to_device(x)).copy_to_host()[0], lambda: None)
if solved:
    print(f"reduce.block_sum over {n} floats: {total:.6f}; NumPy in float64: {x.astype(np.float64).sum():.6f}")

# %% [markdown]
# ## 3. Why the float32 total changes from run to run
#
# Float addition is not associative: (a + b) + c and a + (b + c) can differ in the last bits.
# With atomics, blocks add their totals in whatever order they finish, and that order changes
# between runs on a GPU. So `block_sum` of the same array can give slightly different float32
# results each time (integers small enough to be exact are the exception). Below, the same
# block totals are added in 200 random finishing orders, as the GPU would.

# %%
blocks = 64
partials = np.array([x[i::blocks].astype(np.float32).sum(dtype=np.float32) for i in range(blocks)], np.float32)
results = set()
for _ in range(200):
    acc = np.float32(0)
    for p in rng.permutation(partials):
        acc = np.float32(acc + p)  # one atomic add, in float32
    results.add(float(acc))
exact = float(x.astype(np.float64).sum())
spread = max(results) - min(results)
print(f"{len(results)} different float32 totals from 200 orders of {blocks} block totals; "
      f"spread {spread:.2e}, float64 sum {exact:.6f}")
if GPU:
    d_x = cuda.to_device(x)
    on_gpu = {float(reduce.block_sum(d_x).copy_to_host()[0]) for _ in range(20)}
    print(f"on this GPU, 20 runs of reduce.block_sum gave {len(on_gpu)} distinct value(s)")
else:
    print("(the simulator runs blocks one after another in a fixed order, so it always gives the same total)")

plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist([r - exact for r in results], bins=20, color="tab:purple")
    ax.set_xlabel("float32 total - float64 sum")
    ax.set_ylabel("orders")
    ax.set_title(f"one sum, {blocks} block totals added in 200 orders", fontsize=9)
    C.save(fig, "09_reduction.png")
else:
    C.text_bars(["orders", "distinct totals"], [200, len(results)])
    C.no_plot("09_reduction.png")

# %% [markdown]
# The differences are tiny (a few units in the last place of the total), but they mean two
# GPU runs of the same training are not bit-identical when any reduction finishes with
# atomics. Where that matters, sum in a fixed order: write each block's total to its own slot
# and add the slots in a second, one-block launch (the max-pool *gather* backward in
# `kernels/pool.py` avoids atomics for the same reason).
#
# ## What to remember
# - A block reduction: registers first, then a tree in shared memory with a barrier after
#   every step (outside any `if`), then one atomic per block.
# - Without the atomic, updates are lost; without the barriers, threads read partials that are
#   not written yet. The simulator's results hide the first and show the second only on some
#   launches; `kernels/racecheck.py` reports both on every launch (the course grades tasks
#   3.2, 5.1 and 7.1 under it).
# - Atomics make float32 sums depend on the finishing order: close, not bit-identical.
#
# Next: tutorial 10, occupancy, resources and bank conflicts.
print("\ntutorial 9 done")
