# %% [markdown]
# # Tutorial 2: convolution three ways
#
# A convolution layer slides K small filters over an image. It is where a CNN like the
# paper's spends almost all of its time, so it is worth seeing three ways to compute it:
#
# 1. **loops**: the definition, in plain Python (clear, hopelessly slow);
# 2. **im2col + GEMM**: copy every input patch into a column of a matrix, then ONE matrix
#    multiply does the whole layer (how the NumPy reference does it, and how Caffe did it);
# 3. **a Numba CUDA kernel**: one GPU thread per output value (`naive`), and the
#    *implicit GEMM* (`tiled`) which does im2col on the fly in shared memory.
#
# All three must give the same numbers; we check them against the reference.
# Files: `minasgd/backends/numpy_backend.py` (im2col), `kernels/conv.py` (the kernels).
# Run: `python tutorials/02_convolution_three_ways.py` (about 10 s on the simulator).

# %%
import os
import shutil

if shutil.which("nvidia-smi") is None:  # no GPU: run the kernels on Numba's CUDA simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
from numba import config, cuda  # noqa: E402

import _common as C  # noqa: E402
from minasgd.backends import numpy_backend as ref  # noqa: E402
from minasgd.kernels import conv  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
rng = np.random.default_rng(0)

# %% [markdown]
# ## The definition
#
#     x: (N, C, H, W) images     w: (K, C, R, S) filters     b: (K,) biases
#     y[n, k, p, q] = b[k] + sum over c, r, s of  w[k, c, r, s] * x[n, c, p*stride - pad + r, q*stride - pad + s]
#
# with x taken as 0 outside the image (the *padding*), and an output of size
# P = (H + 2 pad - R) // stride + 1 by Q (likewise). Strictly this is a cross-correlation
# (the filter is not flipped); every deep learning library calls it convolution.

# %% [markdown]
# ## 1. Loops

# %%
def conv_loops(x, w, b, stride, pad):
    n_, c_, h_, w_ = x.shape
    k_, _, r_, s_ = w.shape
    p_ = (h_ + 2 * pad - r_) // stride + 1
    q_ = (w_ + 2 * pad - s_) // stride + 1
    y = np.zeros((n_, k_, p_, q_), dtype=np.float32)
    # BEGIN SOLUTION task 2.1: y[n, k, p, q] = b[k] plus filter w[k] applied to the input window of output (p, q), inputs outside the image counting as 0
    for n in range(n_):
        for k in range(k_):
            for p in range(p_):
                for q in range(q_):
                    acc = b[k]
                    for c in range(c_):
                        for r in range(r_):
                            for s in range(s_):
                                h, col = p * stride - pad + r, q * stride - pad + s
                                if 0 <= h < h_ and 0 <= col < w_:
                                    acc += w[k, c, r, s] * x[n, c, h, col]
                    y[n, k, p, q] = acc
    # END SOLUTION
    return y


N, Cin, H, W, K, R = 2, 3, 9, 8, 4, 3
stride, pad = 1, 1
x = rng.standard_normal((N, Cin, H, W)).astype(np.float32)
w = rng.standard_normal((K, Cin, R, R)).astype(np.float32)
b = rng.standard_normal(K).astype(np.float32)
y_ref = ref.conv2d_forward(x, w, b, stride, pad)
with C.Timer() as t:  # an exercise of task 2.1 in the course: the check cell
    y_loops, solved = C.exercise("2.1", lambda: conv_loops(x, w, b, stride, pad), lambda: y_ref)
print(f"x {x.shape} * w {w.shape} (stride {stride}, pad {pad}) -> y {y_ref.shape}")
if solved:
    print(f"loops: {t.seconds * 1e3:.0f} ms in Python, max |error| vs reference = {C.max_err(y_loops, y_ref):.2e}")

# %% [markdown]
# ## 2. im2col + GEMM
#
# Look at the innermost three loops: for a fixed output position (n, p, q) they take a dot
# product between one filter, flattened to C*R*S numbers, and the input *patch* under that
# position, flattened the same way. So copy every patch into a column of a matrix `cols` of
# shape (C*R*S, N*P*Q), view the filters as a (K, C*R*S) matrix, and one matrix product
# computes every output at once:
#
#     Y (K, N*P*Q) = W (K, C*R*S) @ cols (C*R*S, N*P*Q)
#
# Matrix multiply (GEMM) is the most optimised routine in numerical computing, so this is fast.
# The price is memory: every input pixel is copied into up to R*S columns.
#
# On a CPU that price is paid in time too: a matrix of hundreds of MB is written to main memory
# and read back. The default `numpy` backend (`minasgd/backends/numpy_fast.py`) therefore does
# im2col for a few images at a time, Caffe's way: each block fits in the CPU's cache, and the
# columns are ordered (n, p, q), so the blocks of consecutive images sit side by side. With
# im2col itself compiled as a loop, that took our CPU training step from 1.6x to about 1.2x
# PyTorch's time (docs/cpu.md).

# %%
cols = ref.im2col(x, R, R, stride, pad)
y_gemm = (w.reshape(K, -1) @ cols + b[:, None]).reshape(K, N, *y_ref.shape[2:]).transpose(1, 0, 2, 3)
print(f"im2col: cols is {cols.shape} = (C*R*S, N*P*Q); x had {x.size} numbers, cols has {cols.size} "
      f"({cols.size / x.size:.1f}x)")
print(f"im2col + GEMM: max |error| vs loops = {C.max_err(y_gemm, y_loops):.2e}")
n1, c1, h1, k1, r1 = 128, 3, 32, 32, 5  # alexnet-mini's first layer, batch 128
print(f"for alexnet-mini conv1 at batch 128 cols would hold {c1 * r1 * r1} x {n1 * h1 * h1:,} floats = "
      f"{c1 * r1 * r1 * n1 * h1 * h1 * 4 / 2**20:.0f} MiB (the input is {n1 * c1 * h1 * h1 * 4 / 2**20:.1f} MiB)")

# %% [markdown]
# ## 3. Numba CUDA kernels (`kernels/conv.py`)
#
# **naive** (`conv2d_forward_naive`): the loops above, with the four outer loops replaced by
# threads: one thread per output y[n, k, p, q] (a grid-stride loop over the flat output
# index, decoded back into n, k, p, q). Each thread reads its C*R*S inputs and weights
# straight from global memory; neighbouring threads read mostly the same pixels again.
#
# **tiled** (`conv2d_forward_tiled`): the im2col + GEMM idea without building `cols`. A block of
# 16x16 threads owns a 16x16 tile of Y; step by step it stages a tile of W and a tile of the
# (virtual) im2col matrix in shared memory, each thread computing which pixel, or padding
# zero, its entry is. Every loaded value is then used 16 times. Tutorial 3 explains tiling.
#
# On the simulator every thread runs in Python, so small shapes only. (The naive kernel
# happens to be the cheap one to *simulate*: its launcher uses only 64 threads there.)

# %%
d = cuda.to_device
for version in conv.VERSIONS:
    y = conv.conv2d_forward(d(x), d(w), d(b), stride, pad, version=version).copy_to_host()
    print(f"cuda {version:5}: max |error| vs reference = {C.max_err(y, y_ref):.2e}")
x2 = rng.standard_normal((1, 2, 7, 6)).astype(np.float32)  # stride 2: the output grid skips pixels
w2 = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
y2 = conv.conv2d_forward(d(x2), d(w2), d(b[:3]), 2, 1, version="tiled", tile=4).copy_to_host()
print(f"cuda tiled, tile 4, stride 2: max |error| = {C.max_err(y2, ref.conv2d_forward(x2, w2, b[:3], 2, 1)):.2e}")

# %% [markdown]
# The errors are not exactly 0: float32 addition is not associative, and the kernels add the
# C*R*S terms in a different order than BLAS does. A few 1e-7 relative is what to expect.
#
# ## Backward, in one paragraph
#
# Training also needs dL/dx and dL/dw. `kernels/conv.py` computes dx by *gathering* (one
# thread per input pixel sums every output it fed: no two threads write the same place) and
# dw as another implicit GEMM, dW = dY @ cols^T, split along its long N*P*Q sum across blocks
# that combine their partial sums with `cuda.atomic.add`. Quick check:

# %%
dy = rng.standard_normal(y_ref.shape).astype(np.float32)
got = conv.conv2d_backward(d(dy), d(x), d(w), stride, pad)
for name, g, e in zip(("dx", "dw", "db"), got, ref.conv2d_backward(dy, x, w, stride, pad)):
    print(f"  {name}: max |error| vs reference = {C.max_err(g.copy_to_host(), e):.2e}")

# %% [markdown]
# ## A picture: four hand-made filters on a shapes image
#
# Learned first-layer filters often end up looking like edge and blob detectors. Here are
# four written by hand, run by the CUDA kernel over the (grey) image: a vertical edge, a
# horizontal edge, a blur and a "centre minus surround" spot detector.

# %%
ds = C.shapes_data(4, 1, seed=3)
gray = ds.train_x[0].astype(np.float32).mean(axis=2) / 255.0
gray = gray[::2, ::2] if C.FAST else gray  # 16x16 in fast mode: fewer simulated threads
filters = np.array([
    [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
    [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
], dtype=np.float32)
filters[2] /= 9
xi = np.ascontiguousarray(gray[None, None])  # (1, 1, H, W)
wi = filters[:, None]  # (4, 1, 3, 3)
maps = conv.conv2d_forward(d(xi), d(wi), d(np.zeros(4, np.float32)), 1, 1, version="naive").copy_to_host()[0]
print(f"feature maps {maps.shape}; max |error| vs reference = "
      f"{C.max_err(maps, ref.conv2d_forward(xi, wi, np.zeros(4, np.float32), 1, 1)[0]):.2e}")
titles = ["vertical edge", "horizontal edge", "blur", "spot"]
plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 5, figsize=(12, 2.8))
    ax[0].imshow(ds.train_x[0])
    ax[0].set_title(f"input ({ds.classes[ds.train_y[0]]})")
    for i in range(4):
        ax[i + 1].imshow(maps[i], cmap="RdBu_r" if i != 2 else "gray")
        ax[i + 1].set_title(titles[i])
    for a in ax:
        a.axis("off")
    C.save(fig, "02_filters.png")
else:
    for i, t in enumerate(titles):
        print(f"  {t:15}: min {maps[i].min():+.2f}, max {maps[i].max():+.2f}")
    C.no_plot("02_filters.png")

# %% [markdown]
# ## How fast? (real GPU only)
#
# alexnet-mini's conv2 at batch 128 (x 128x32x15x15, w 64x32x5x5, pad 2, so P = Q = 15):
# 2 * N*K*P*Q*C*R*S = 2 * 128*64*15*15*32*5*5 = 2.95 GFLOP per call. The tiled
# version should be several times faster than the naive one: same arithmetic, far fewer
# trips to global memory. `minasgd bench kernels` runs this for every layer against PyTorch.

# %%
flops = 2 * 128 * 64 * 15 * 15 * 32 * 5 * 5
print(f"conv2 forward at batch 128: {flops / 1e9:.2f} GFLOP per call")
if GPU:
    xg = d(rng.standard_normal((128, 32, 15, 15)).astype(np.float32))
    wg = d(rng.standard_normal((64, 32, 5, 5)).astype(np.float32))
    bg = d(np.zeros(64, np.float32))
    for version in conv.VERSIONS:
        s = C.gpu_time(lambda: conv.conv2d_forward(xg, wg, bg, 1, 2, version=version))
        print(f"conv2 forward, {version:5}: {s * 1e3:7.3f} ms, {flops / s / 1e9:7.0f} GFLOP/s")
else:
    print("no real GPU: timings skipped (the simulator's times say nothing about a GPU).")

# %% [markdown]
# ## What to remember
# - A convolution is a matrix multiply in disguise (im2col); the reference does exactly that.
# - The naive kernel gives each output its own thread; the tiled one is the matrix multiply,
#   with the im2col matrix built tile by tile in shared memory and never stored.
# - Floating-point sums in a different order differ in the last bits: compare with a tolerance.
#
# Next: tutorial 3, why tiling in shared memory is faster.
print("\ntutorial 2 done")
