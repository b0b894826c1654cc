"""Sums over the batch: bias gradients and the mean loss.

    sum_over_batch  v1 block reduction: out[k] = scale * sum_{n, l} x[n, k, l]. One block per
                    output k (grid-stride over k). Its threads each sum a strided share of the
                    N*L terms into a register and leave it in shared memory; thread 0 adds the B
                    partials in order (B adds by one thread; `block_sum` does that step as a tree).
    block_sum       the whole array to one number: out[0] = sum of x. Every thread of the grid
                    sums a grid-strided share into a register; each block tree-reduces its
                    partials in shared memory (a barrier per halving step), then its thread 0
                    adds the block's total to out[0] with ONE cuda.atomic.add. Blocks finish in
                    any order, so on a GPU the float32 total can differ in the last bits from
                    run to run (float addition is not associative); tutorial 9 shows it.

The same kernel serves three callers by viewing their input as (N, K, L):
    conv bias     dy (N, K, P, Q) -> (N, K, P*Q)     db[k] = sum over n, p, q
    linear bias   dy (N, M)       -> (N, M, 1)       db[m] = sum over n
    mean loss     losses (N,)     -> (N, 1, 1)       loss[0] = sum / N   (scale = 1/N)
"""

import numpy as np
from numba import cuda, float32

from .common import F1, F3, F32, MAX_BLOCKS, THREADS, Signature, fill, output
from .registry import Case, Version
from .shapes import conv2d_output_shape

BLOCK = THREADS  # threads per block, a power of two (a compile-time constant for the shared array)


# ---------------------------------------------------------------- kernels

@cuda.jit(cache=True)
def sum_over_batch_kernel(x3, out, scale):
    """out[k] = scale * sum_{n, l} x3[n, k, l]. Block b reduces k = b, b + gridDim, ...;
    thread t adds terms t, t + BLOCK, ... of the N*L terms of that k, then thread 0 adds the partials.
    """
    tid = cuda.threadIdx.x
    n_, k_, l_ = x3.shape
    partial = cuda.shared.array(BLOCK, float32)
    for k in range(cuda.blockIdx.x, k_, cuda.gridDim.x):  # same trip count for the whole block
        acc = float32(0)
        for idx in range(tid, n_ * l_, BLOCK):
            acc += x3[idx // l_, k, idx % l_]
        partial[tid] = acc
        cuda.syncthreads()  # every partial is written before thread 0 reads them
        if tid == 0:
            total = float32(0)
            for t in range(BLOCK):
                total += partial[t]
            out[k] = total * scale
        cuda.syncthreads()  # the partials are read before the next k overwrites them


@cuda.jit(cache=True)
def block_sum_kernel(x, out):
    """out[0] += sum of x. Thread (b, t) sums x[i] for i = b*BLOCK + t, + gridsize, ...; the block
    halves its BLOCK partials in shared memory; thread 0 adds the block total atomically. out is zeroed.
    """
    tid = cuda.threadIdx.x
    partial = cuda.shared.array(BLOCK, float32)
    acc = float32(0)
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        acc += x[i]
    partial[tid] = acc
    cuda.syncthreads()  # every partial is written before any thread reads a neighbour's
    # BEGIN SOLUTION task 7.1: out[0] ends up increased by the sum of this block's partials: combined inside the block through shared memory in log2(BLOCK) rounds, race-free, then added into out[0] once per block, safely against the other blocks
    half = BLOCK // 2
    while half > 0:
        if tid < half:
            partial[tid] += partial[tid + half]
        cuda.syncthreads()  # this step's sums are written before the next step reads them
        half //= 2
    if tid == 0:
        cuda.atomic.add(out, 0, partial[0])  # several blocks add to one number
    # END SOLUTION


# ---------------------------------------------------------------- launchers

def launch_block_sum(x, out, blocks):
    block_sum_kernel[blocks, BLOCK](x, out)


def launch_sum_over_batch(x3, out, scale):
    blocks = max(1, min(x3.shape[1], MAX_BLOCKS))
    sum_over_batch_kernel[blocks, BLOCK](x3, out, np.float32(scale))


def signatures():
    """What the launcher above passes (see `common.Signature`)."""
    return [Signature("sum_over_batch_kernel", "v1", sum_over_batch_kernel, (F3, F1, F32), BLOCK),
            Signature("block_sum_kernel", "v1 tree + atomic", block_sum_kernel, (F1, F1), BLOCK)]


# ---------------------------------------------------------------- public functions

def sum_over_batch(x, scale=1.0, out=None):
    """Sum a contiguous (N, K, ...) array over every axis but 1 -> (K,); a 1-D (N,) array -> (1,)."""
    n = x.shape[0]
    k = x.shape[1] if x.ndim > 1 else 1
    x3 = x.reshape(n, k, x.size // max(n * k, 1))
    s = output((k,), x.dtype, out, "sum_over_batch out")
    launch_sum_over_batch(x3, s, scale)
    return s


def block_sum(x, out=None, blocks=None):
    """The sum of every element of a contiguous float32 array -> a (1,) device array.

    `blocks` (default: enough for one element per thread, at most MAX_BLOCKS) sets how many
    blocks add their totals atomically.
    """
    flat = x.reshape(x.size)
    s = output((1,), x.dtype, out, "block_sum out")
    fill(s, 0.0)  # the blocks ADD into it
    if blocks is None:
        blocks = max(1, min((x.size + BLOCK - 1) // BLOCK, MAX_BLOCKS))
    launch_block_sum(flat, s, blocks)
    return s


# ---------------------------------------------------------------- versions and cases

VERSIONS_OF = {
    "sum_over_batch": (Version("sum_over_batch", "v1", "v1", "launch_sum_over_batch", deterministic=True, default=True),),
    # the blocks' totals meet through atomics in any order: not bit-deterministic
    "block_sum": (Version("block_sum", "v1", "v1 tree + atomic", "launch_block_sum", deterministic=False, default=True),),
}


def cases(net, ref, tiles, make):
    """Bias gradients at every layer of `net`, the mean loss and a block sum over the largest
    activation (`registry.cases`). Not rows of the benchmark table (`bench=False`)."""
    batch = net["fc"][0]["x"][0]
    sums = [(f"{L['name']} bias grad", (batch, L["w"][0], *conv2d_output_shape(L["x"], L["w"], L["stride"], L["pad"])[2:]))
            for L in net["conv"]]
    sums += [(f"{L['name']} bias grad", (batch, L["w"][0])) for L in net["fc"]]
    out = [_sum_case(label, shape, make) for label, shape in sums]
    losses = make.randn(batch)
    l_, s = make.dev(losses), make.nan((1,))
    out.append(Case("reduce", "mean loss", "v1", f"mean loss ({batch},)", lambda: sum_over_batch(l_, 1.0 / batch, out=s),
                    {"x": (batch,)}, np.array([losses.sum() / batch], np.float32), 4.0 * batch, bench=False))
    grads = make.randn(net["largest"])
    g_, t = make.dev(grads), make.nan((1,))
    out.append(Case("reduce", "block_sum", "v1", f"block_sum ({grads.size},)", lambda: block_sum(g_, out=t),
                    {"x": grads.shape}, np.array([grads.astype(np.float64).sum()], np.float32), 4.0 * grads.size,
                    deterministic=False, bench=False))
    return out


def _sum_case(label, shape, make):
    x = make.randn(*shape)
    expect = x.sum(axis=tuple(i for i in range(x.ndim) if i != 1))
    x_, s = make.dev(x), make.nan(expect.shape)
    return Case("reduce", label, "v1", f"{label} {shape}", lambda: sum_over_batch(x_, out=s), {"x": shape}, expect,
                4.0 * x.size, bench=False)


if __name__ == "__main__":  # the workbench: every version vs the NumPy reference, then timed (minasgd/workbench.py)
    from minasgd.workbench import main

    raise SystemExit(main("reduce"))
