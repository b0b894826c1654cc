"""Hand-written Numba CUDA kernels, one module per op family (installed as `minasgd.kernels`).

    common       the simulator switch, threads per block and grid sizes for grid-stride loops
    elementwise  fill, relu forward/backward, dropout forward/backward (the mask is a hash, not stored)
    gemm         matrix multiply C = op(A) op(B) (+ bias): v1 naive, v2 shared-memory tiled
    conv         conv2d: forward v1 naive and v2 tiled implicit GEMM; backward-data (gather)
                 and backward-filter (tiled implicit GEMM with split-K)
    pool         max-pool forward with argmax; backward v1 atomic scatter, v2 gather
    reduce       sums over batch (and pixels): bias gradients, the mean loss
    softmax      softmax + cross-entropy: one thread per row, max-subtracted
    optim        SGD with momentum and weight decay over the flat parameter vector
    racecheck    a race checker for the CUDA simulator (missing atomics, missing syncthreads)
    memprofile   what each warp's memory accesses would cost on a GPU, from the simulator's addresses:
                 32-byte sectors per request, coalescing, shared-memory bank conflicts, a roofline
    resources    every kernel compiled offline for real GPUs: registers, shared memory, occupancy
    shapes       output shapes and input checks (pure Python; the backends and layers use them too)
    dropout_hash the dropout mask's uint32 hash in NumPy (the kernel's twin; the reference uses it)

This package is the bottom floor: it imports nothing from `minasgd`, so it can be read (and
copied) alone. Everything above it imports from here, never the other way round.

Each op family is a workbench, as in llm.c's dev/cuda: `python -m minasgd.kernels.conv` (or
pool, gemm, softmax, elementwise, reduce, optim) validates every version and tile size against
the NumPy reference at the layer shapes of Model("alexnet-mini"), then times them (on the CUDA
simulator: Model("micro")'s shapes, validate only). The loop itself is `minasgd/workbench.py`;
each module's `if __name__ == "__main__":` block only calls it.

Each module has the same layout: the kernels (naive first, then optimized), then the host
launchers that pick the grid and block, then the public functions that `minasgd.backends.cuda_backend`
calls. Public functions take numba device arrays and an optional `out=` buffer (tests pre-fill
it with NaN so that any element a kernel forgets to write fails the comparison). Each module also
declares, in `signatures()`, the argument types and block sizes its launchers use, so that every
kernel is compiled for real GPUs without one (`resources`, tests/test_compile_kernels.py).

Kernels are float32 throughout: constants are written `float32(0.5)`, never `0.5`, because a
Python float literal promotes the arithmetic to float64. Set `NUMBA_ENABLE_CUDASIM=1` before
numba is imported to run everything on the CUDA simulator (slow: keep shapes tiny there).
"""
