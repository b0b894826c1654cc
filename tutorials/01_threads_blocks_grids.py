# %% [markdown]
# # Tutorial 1: threads, blocks and grids, and a first kernel (ReLU)
#
# A GPU runs one small function, the *kernel*, in thousands of threads at once. Each thread
# works out from its coordinates which element it owns. This tutorial writes kernels with
# Numba's CUDA support, runs them, and checks them against NumPy.
#
# No GPU? No problem: Numba has a *CUDA simulator* that runs every GPU thread as a Python
# thread on the CPU. It is slow (about 0.2 ms per thread), so we keep sizes small, but the
# code is exactly what a GPU would run. Because of that, this tutorial never prints a
# simulator timing as a speed: timings appear only when a real GPU is present.
#
# Run it with `python tutorials/01_threads_blocks_grids.py` (a few seconds on a laptop).
# Files to read alongside: `kernels/elementwise.py`, `kernels/common.py`.

# %%
import math
import os
import shutil

# The simulator must be switched on BEFORE numba is first imported. We switch it on unless
# `nvidia-smi` finds a GPU; set NUMBA_ENABLE_CUDASIM=0 or 1 yourself to decide.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")  # tiny launches are on purpose here

import numpy as np  # noqa: E402
from numba import config, cuda, float32  # noqa: E402

import _common as C  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
print(f"running on: {'the CUDA simulator (no GPU timings)' if SIM else 'a real GPU' if GPU else 'no GPU!'}")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Who am I? Blocks and threads
#
# A launch `kernel[blocks, threads](args)` starts `blocks` *blocks* of `threads` threads each;
# together they form the *grid*. Inside, a thread reads its coordinates:
#
#     cuda.blockIdx.x    which block it is in         0 .. blocks - 1
#     cuda.threadIdx.x   which thread in that block   0 .. threads - 1
#     cuda.blockDim.x    threads per block
#     cuda.grid(1)       its global number = blockIdx.x * blockDim.x + threadIdx.x
#
# Threads of one block run on the same streaming multiprocessor and can share fast memory
# (tutorial 3); blocks are independent and may run in any order. Kernels return nothing:
# they write into arrays. Let every thread write down who it is:

# %%
@cuda.jit
def whoami(block_of, thread_of, global_of):
    i = cuda.grid(1)
    block_of[i] = cuda.blockIdx.x
    thread_of[i] = cuda.threadIdx.x
    global_of[i] = i


blocks, threads = 3, 4
n = blocks * threads
block_of = cuda.device_array(n, dtype=np.int32)  # memory on the GPU (uninitialised)
thread_of = cuda.device_array(n, dtype=np.int32)
global_of = cuda.device_array(n, dtype=np.int32)
whoami[blocks, threads](block_of, thread_of, global_of)
print(f"launch whoami[{blocks}, {threads}]: {n} threads")
print("  cuda.grid(1)  :", global_of.copy_to_host())  # copy_to_host brings results back to the CPU
print("  blockIdx.x    :", block_of.copy_to_host())
print("  threadIdx.x   :", thread_of.copy_to_host())

# %% [markdown]
# ## 2. ReLU: one thread per element
#
# `y = max(x, 0)`, elementwise. Thread i computes element i. The grid is rounded UP to whole
# blocks, so the last block may stick out past the end of the array: the `if i < x.size`
# guard stops those threads. Two more habits from `kernels/`: constants are `float32(0)`, never
# `0.0` (a Python float would turn the arithmetic into float64, which is slow on most GPUs),
# and data goes to the device once (`cuda.to_device`) and stays there.

# %%
@cuda.jit
def relu_kernel(x, y):
    i = cuda.grid(1)
    if i < x.size:  # the last block may stick out past the end of the array
        y[i] = max(x[i], float32(0))


n = C.pick(300, 2000)
x = rng.standard_normal(n).astype(np.float32)
threads = 64
blocks = math.ceil(n / threads)  # enough blocks to cover n; the last one is partly idle
d_x = cuda.to_device(x)
d_y = cuda.device_array_like(d_x)
relu_kernel[blocks, threads](d_x, d_y)
y = d_y.copy_to_host()
print(f"relu over {n} elements with {blocks} blocks x {threads} threads "
      f"({blocks * threads - n} threads idle): max |error| vs NumPy = {C.max_err(y, np.maximum(x, 0))}")

# %% [markdown]
# ## 3. Forget the guard and see what happens
#
# Without `if i < x.size`, the idle threads write past the end of `y`. On a GPU that silently
# corrupts whatever memory comes next (or crashes much later). The simulator checks every
# index and names the thread that went out of bounds: one good reason to debug kernels there.

# %%
@cuda.jit
def relu_no_guard(x, y):
    i = cuda.grid(1)
    y[i] = max(x[i], float32(0))


if SIM:
    try:
        relu_no_guard[blocks, threads](d_x, d_y)
        print("no error?!")
    except IndexError as e:
        print(f"the simulator caught it: IndexError: {str(e).splitlines()[0][:100]}")
else:
    print("(skipped on a real GPU: an out-of-bounds write is undefined behaviour there)")

# %% [markdown]
# ## 4. The grid-stride loop, as in `kernels/elementwise.py`
#
# One thread per element needs as many threads as elements. The kernels in this repository
# instead loop with a *grid stride*: thread t handles elements t, t + G, t + 2G, ... where G
# (`cuda.gridsize(1)`) is the number of threads in the whole grid. Any grid then covers any
# size. `kernels/common.py:grid_1d` picks the launch: on a GPU up to 2048 blocks of 256 threads
# (enough to fill every multiprocessor), on the simulator just 2 blocks of 32 (each simulated
# thread costs ~0.2 ms, so fewer threads doing more work each is much faster there). Here is
# the pattern on another elementwise op, y = a * x:

# %%
@cuda.jit
def scale_kernel(x, y, a):
    start = cuda.grid(1)  # this thread's first element
    stride = cuda.gridsize(1)  # threads in the whole grid
    for i in range(start, x.size, stride):
        y[i] = a * x[i]


d_s = cuda.device_array_like(d_x)
scale_kernel[2, 32](d_x, d_s, float32(3))  # 64 threads cover all n elements
print(f"scale by 3 over {n} elements with 2 x 32 threads: max |error| = {C.max_err(d_s.copy_to_host(), 3 * x)}")

# %% [markdown]
# `kernels/elementwise.py:relu_forward_kernel` is ReLU written this way, and `relu_backward_kernel`
# its gradient (dx = dy where the forward output y > 0, else 0). In the course they are
# **task 1.1**: in a student copy of this repository they are stubs for you to write, and the
# check below tells you whether yours match the NumPy reference
# (`minasgd.backends.numpy_backend.relu_forward`). They must agree exactly: no rounding happens.

# %%
from minasgd.backends import numpy_backend as ref  # noqa: E402
from minasgd.kernels import elementwise  # noqa: E402
from minasgd.kernels.common import grid_1d  # noqa: E402

x4 = rng.standard_normal((4, 3, 5, 7)).astype(np.float32)  # any shape: kernels see a flat view
blocks, threads = grid_1d(x4.size)
print(f"grid_1d({x4.size}) = {blocks} blocks x {threads} threads, "
      f"so each thread handles about {math.ceil(x4.size / (blocks * threads))} elements")
dy4 = rng.standard_normal(x4.shape).astype(np.float32)


def relu_both():
    y = elementwise.relu_forward(cuda.to_device(x4)).copy_to_host()
    dx = elementwise.relu_backward(cuda.to_device(dy4), cuda.to_device(y)).copy_to_host()
    return y, dx


def relu_reference():
    y = ref.relu_forward(x4)
    return y, ref.relu_backward(dy4, y)


(y4, dx4), solved = C.exercise("1.1", relu_both, relu_reference)
if solved:
    print(f"kernels.elementwise.relu_forward vs the NumPy reference: max |error| = {C.max_err(y4, ref.relu_forward(x4))}")
    print(f"relu_backward (dx = dy where y > 0, else 0): max |error| = "
          f"{C.max_err(dx4, ref.relu_backward(dy4, ref.relu_forward(x4)))}")

# %% [markdown]
# ## 5. Two-dimensional grids
#
# Images are 2-D, and so can be blocks and grids: `kernel[(gx, gy), (tx, ty)]`, and
# `cuda.grid(2)` gives the thread's (column, row). Below, a 32x32 image is covered by 4x4
# blocks of 8x8 threads; each thread paints its pixel with its block's number, and a second
# kernel applies ReLU to a real image from the `shapes` dataset (normalised, so about half its
# values are negative). The picture shows which block owns which pixel.

# %%
@cuda.jit
def paint_block_ids(out):
    col, row = cuda.grid(2)
    if row < out.shape[0] and col < out.shape[1]:
        out[row, col] = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x


@cuda.jit
def relu_2d(x, y):
    col, row = cuda.grid(2)
    if row < x.shape[0] and col < x.shape[1]:
        v = x[row, col]
        y[row, col] = v if v > float32(0) else float32(0)


from minasgd import data  # noqa: E402

ds = C.shapes_data(8, 1)
image = ds.train_x[0]  # uint8 (32, 32, 3)
red = np.ascontiguousarray(data.normalize(ds.train_x[:1])[0, 0])  # float32 (32, 32), mean about 0
ids = cuda.device_array((32, 32), dtype=np.int32)
paint_block_ids[(4, 4), (8, 8)](ids)
d_red = cuda.to_device(red)
d_relu = cuda.device_array_like(d_red)
relu_2d[(4, 4), (8, 8)](d_red, d_relu)
ids, relu_red = ids.copy_to_host(), d_relu.copy_to_host()
print(f"image class: {ds.classes[ds.train_y[0]]}; relu_2d vs NumPy: max |error| = {C.max_err(relu_red, np.maximum(red, 0))}")
print("block that owns each 4x4 patch of pixels:")
for row in ids[::4, ::4]:
    print("   " + " ".join(f"{v:2d}" for v in row))

plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 3, figsize=(10, 3.4))
    ax[0].imshow(image)
    ax[0].set_title(f"a shapes image ({ds.classes[ds.train_y[0]]})")
    ax[1].imshow(ids, cmap="tab20")
    ax[1].set_title("grid (4, 4) of blocks (8, 8):\nblock number per pixel")
    for k in range(16):
        ax[1].text(8 * (k % 4) + 3.5, 8 * (k // 4) + 3.5, str(k), ha="center", va="center", fontsize=9)
    ax[2].imshow(relu_red, cmap="gray")
    ax[2].set_title("ReLU of its normalised red channel")
    for a in ax:
        a.axis("off")
    C.save(fig, "01_blocks.png")
else:
    C.no_plot("01_blocks.png")

# %% [markdown]
# ## 6. How fast? (real GPU only)
#
# ReLU does almost no arithmetic: it reads 4 bytes and writes 4 bytes per element, so its
# speed is the GPU's memory bandwidth (an H100 moves about 3 TB/s). To time a kernel: run it
# once first (the first call compiles it), keep the data on the device, and call
# `cuda.synchronize()` before reading the clock, because launches return immediately.

# %%
if GPU:
    n = 1 << 24
    d_big = cuda.to_device(rng.standard_normal(n).astype(np.float32))
    d_out = cuda.device_array_like(d_big)
    seconds = C.gpu_time(lambda: elementwise.relu_forward(d_big, out=d_out))
    host = d_big.copy_to_host()
    with C.Timer() as t:
        np.maximum(host, 0)
    print(f"relu over {n:,} floats: GPU {seconds * 1e3:.3f} ms ({8 * n / seconds / 1e9:.0f} GB/s), "
          f"NumPy on the CPU {t.seconds * 1e3:.1f} ms")
else:
    print("no real GPU: timings skipped (the simulator's times say nothing about a GPU).")

# %% [markdown]
# ## What to remember
# - A launch is `kernel[blocks, threads_per_block](arrays...)`; each thread finds its element
#   from `cuda.grid(1)` (or `cuda.grid(2)`), and guards against running past the end.
# - Grid-stride loops let any grid cover any size; `kernels/common.py:grid_1d` picks the grid.
# - Check every kernel against a reference (here NumPy) and debug on the simulator.
#
# Next: tutorial 2, convolution three ways.
print("\ntutorial 1 done")
