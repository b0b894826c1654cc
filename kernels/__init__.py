"""Hand-written Numba CUDA kernels, one module per op family (installed as `minasgd.kernels`).

    common       the simulator switch, threads per block, grid sizes, and `fill` (every family zeroes with it)
    registry     every op's versions and cases in one list (what the workbench, the benchmark, the
                 resource table, the compile check and the race check iterate)
    elementwise  relu forward/backward, dropout forward/backward (the mask is a hash, not stored)
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
    simulator    Numba's CUDA simulator made to yield instead of spin while a block runs (1.5-8x less CPU)
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
launchers that pick the grid and block (`launch_<what>_<version>`: the name says which kernel
it launches; a launcher and its kernel take the public function's inputs in its order, then the
outputs, then the scalars: `conv2d_backward_filter(dy, x, ...)` launches `(dy, x, dw, stride,
pad)`), then `VERSIONS_OF`
(each public function's versions: name, label, launcher, determinism, the backend's default)
and the public functions that `minasgd.backends.cuda_backend` calls, each choosing its kernel
by `version=`. Public functions take numba device arrays and an optional `out=` buffer (cases
pre-fill it with NaN so that any element a kernel forgets to write fails the comparison). Each
module also declares, in `signatures()`, the argument types and block sizes its launchers use,
so that every kernel is compiled for real GPUs without one (`resources`,
tests/test_compile_kernels.py), and in `cases(net, ref, tiles, make)` every version at the
model's layer shapes with the reference's answer (`registry.Case`).

Adding an op end to end (say batch norm) touches 7 files, and nothing else lists op names:
    1. kernels/batchnorm.py      kernels, launchers, signatures(), VERSIONS_OF, the public
                                 functions (with their shape checks), cases(), and the
                                 three-line `if __name__ == "__main__":` workbench block
    2. kernels/registry.py       "batchnorm" in FAMILIES: the workbench (`python -m
                                 minasgd.kernels.batchnorm`), `minasgd bench kernels`, the
                                 resource table, the compile check, the race check and
                                 tests/test_workbench.py now all run its cases
    3. minasgd/backends/__init__.py     the op in the contract (OPS and the docstring)
    4. minasgd/backends/numpy_backend.py  the reference (what every case is checked against)
    5. minasgd/backends/numpy_fast.py     its re-export list (or a fast path of its own)
    6. minasgd/backends/cuda_backend.py   the glue to the public function
    7. tests/test_reference_ops.py        the reference against finite differences
A PyTorch twin for the benchmark table (`minasgd.bench_kernels.TorchTwins`) is optional; a
layer that uses the op (layers.py, model.py, torch_reference.py) is a model change, not the op's.

Kernels are float32 throughout: constants are written `float32(0.5)`, never `0.5`, because a
Python float literal promotes the arithmetic to float64. Set `NUMBA_ENABLE_CUDASIM=1` before
numba is imported to run everything on the CUDA simulator (slow: keep shapes tiny there).
"""
