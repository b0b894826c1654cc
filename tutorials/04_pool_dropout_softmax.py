# %% [markdown]
# # Tutorial 4: pooling, dropout and softmax cross-entropy, forward and backward
#
# Besides convolutions and matrix multiplies, the paper's network has three more kinds of op:
# max pooling, dropout, and the softmax cross-entropy loss. Each needs a forward AND a
# backward kernel. How do we know a backward is right? With a **gradient check**: nudge each
# input by +-eps, see how much the loss moves, and compare with what backward says.
#
# Files: `kernels/pool.py`, `kernels/elementwise.py` (dropout), `kernels/softmax.py`,
# `kernels/dropout_hash.py`, and the reference `minasgd/backends/numpy_backend.py`.
# Run: `python tutorials/04_pool_dropout_softmax.py` (a few seconds on the simulator).

# %%
import os
import shutil

if shutil.which("nvidia-smi") is None:  # no GPU: run the kernels on Numba's CUDA simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import _common as C  # noqa: E402
from minasgd import data  # noqa: E402
from minasgd.kernels import dropout_hash  # noqa: E402
from minasgd.backends import numpy_backend as ref  # noqa: E402
from minasgd.kernels import elementwise, pool, softmax  # noqa: E402

rng = np.random.default_rng(0)
d = cuda.to_device


# %% [markdown]
# ## The gradient check
#
# For a scalar loss L(x), central differences give dL/dx[i] ~ (L(x + eps e_i) - L(x - eps e_i)) / 2 eps,
# with an error of order eps^2. We compute in float64 (the reference ops accept it), so the
# difference between numeric and analytic gradients should be ~1e-8 or less. To check the
# backward of an op y = f(x), use L = sum(f(x) * g) for a fixed random g: then dL/dy = g, and
# backward(g) must equal the numeric dL/dx. (The same helper is `tests/gradcheck.py`.)

# %%
def numeric_grad(loss, x, eps=1e-4):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = loss()
        x[i] = old - eps
        down = loss()
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


# %% [markdown]
# ## 1. Max pooling
#
# `maxpool2d_forward(x, size=3, stride=2)`: each output is the max of a 3x3 window; windows
# overlap (stride 2 < size 3), as in the paper's net. Forward also returns the **argmax**, the
# position of the max inside the (n, c) plane, because backward needs it: the gradient flows
# only to the input that won. Where windows overlap, one pixel can win several windows, and
# its gradients ADD UP. The CUDA backward (`maxpool2d_backward_scatter_kernel`) gives one
# thread to each output; two threads may add into the same input pixel at the same time, so it
# uses `cuda.atomic.add`. The gather version gives one thread to each input instead (no atomics).

# %%
x = rng.standard_normal((2, 2, 7, 6))  # float64, distinct values: no ties
y, argmax = ref.maxpool2d_forward(x, 3, 2)
g = rng.standard_normal(y.shape)
num = numeric_grad(lambda: float((ref.maxpool2d_forward(x, 3, 2)[0] * g).sum()), x)
ana = ref.maxpool2d_backward(g, argmax, x.shape)
print(f"maxpool {x.shape} -> {y.shape}: gradcheck of the reference, max |numeric - analytic| = {C.max_err(num, ana):.1e}")

x32, g32 = x.astype(np.float32), g.astype(np.float32)
y_ref, arg_ref = ref.maxpool2d_forward(x32, 3, 2)
y_cu, arg_cu = pool.maxpool2d_forward(d(x32), 3, 2)
print(f"cuda forward: values equal: {np.array_equal(y_cu.copy_to_host(), y_ref)}, "
      f"argmax equal: {np.array_equal(arg_cu.copy_to_host(), arg_ref)}")
dx_ref = ref.maxpool2d_backward(g32, arg_ref, x.shape)
dx_scatter = pool.maxpool2d_backward(d(g32), arg_cu, x.shape).copy_to_host()
dx_gather = pool.maxpool2d_backward(d(g32), arg_cu, x.shape, version="gather", size=3, stride=2).copy_to_host()
print(f"cuda backward: scatter (atomics) max |error| = {C.max_err(dx_scatter, dx_ref):.1e}, "
      f"gather max |error| = {C.max_err(dx_gather, dx_ref):.1e}")

one = np.zeros((1, 1, 5, 5), np.float32)
one[0, 0, 2, 2] = 1.0  # the centre pixel is the max of all four overlapping windows
_, arg1 = pool.maxpool2d_forward(d(one), 3, 2)
dx1 = pool.maxpool2d_backward(d(np.ones((1, 1, 2, 2), np.float32)), arg1, one.shape).copy_to_host()
print(f"a pixel that wins 4 overlapping windows gets gradient {dx1[0, 0, 2, 2]:g} (1 from each)")

# %% [markdown]
# ## 2. Dropout without a stored mask: the hash RNG
#
# Dropout zeroes each activation with probability p during training and scales the survivors
# by 1/(1-p) ("inverted" dropout, so nothing changes at test time). Backward must drop the
# SAME elements. Rather than drawing random numbers and storing the mask, we *compute* it:
#
#     keep element i  <=>  hash32(seed, i) >= threshold(p)      (kernels/dropout_hash.py)
#
# `hash32` is a small integer mixer. Every GPU thread can evaluate it for its own i with no
# state and no communication, backward recomputes the mask from the same seed, and because all
# arithmetic wraps mod 2^32 in uint32, NumPy, the simulator and a GPU give bit-identical masks.
# (Compiled Numba widens `uint32 * uint32` to 64 bits, so the kernel wraps every step in
# `uint32(...)`; see `kernels/elementwise.py:hash32`.)

# %%
p, seed = 0.5, 1234
n = C.pick(2000, 20000)
mask = dropout_hash.keep_mask(seed, n, p)
print(f"p = {p}: kept {mask.mean():.3f} of {n} elements (expect {1 - p})")
ones = np.ones(n, np.float32)
y_cu = elementwise.dropout(d(ones), p, seed).copy_to_host()
print(f"cuda mask == NumPy mask, bit for bit: {np.array_equal(y_cu > 0, mask)}; kept values = {np.unique(y_cu[y_cu > 0])}")

xd = rng.standard_normal((3, 8))
gd = rng.standard_normal((3, 8))
num = numeric_grad(lambda: float((ref.dropout_forward(xd, p, seed) * gd).sum()), xd)
ana = ref.dropout_backward(gd, p, seed)
print(f"dropout gradcheck: max |numeric - analytic| = {C.max_err(num, ana):.1e}")
print(f"same seed, same mask: backward on the CUDA kernel equals the reference: "
      f"{np.array_equal(elementwise.dropout(d(gd.astype(np.float32)), p, seed).copy_to_host(), ref.dropout_backward(gd.astype(np.float32), p, seed))}")

# %% [markdown]
# ## 3. Softmax cross-entropy
#
# The network ends with 10 numbers per image (logits z). Softmax turns them into
# probabilities, and the loss is minus the log-probability of the right class, averaged over
# the batch. Its gradient is beautifully simple: (softmax(z) - onehot(label)) / N.
#
# Computed naively, exp(1000) overflows. Subtracting each row's maximum first changes nothing
# mathematically (it cancels) but keeps every exponent <= 0 and the sum >= 1, so exp cannot
# overflow and log never sees 0. The kernel (`kernels/softmax.py`) gives each row (image) its
# own thread: rows are only 10 long.

# %%
z = rng.standard_normal((4, 10))
labels = np.array([3, 0, 9, 3], np.int32)
num = numeric_grad(lambda: float(ref.softmax_cross_entropy(z, labels)[0][0]), z)
_, ana = ref.softmax_cross_entropy(z, labels)
print(f"softmax cross-entropy gradcheck: max |numeric - analytic| = {C.max_err(num, ana):.1e}")

z32 = z.astype(np.float32)
z32[0] *= 1000  # huge logits: a naive exp would overflow
loss_ref, dz_ref = ref.softmax_cross_entropy(z32, labels)
loss_cu, dz_cu = softmax.softmax_cross_entropy(d(z32), labels)
print(f"with logits up to {np.abs(z32).max():.0f}: cuda loss {loss_cu.copy_to_host()[0]:.4f}, reference {loss_ref[0]:.4f}; "
      f"dlogits max |error| = {C.max_err(dz_cu.copy_to_host(), dz_ref):.1e}; all finite: {np.isfinite(dz_cu.copy_to_host()).all()}")

# %% [markdown]
# ## A picture: the three ops on a shapes image
#
# Max pooling halves the image (each output keeps the brightest value of its window); the
# dropout mask keeps about half the pixels (and doubles them); softmax turns a row of logits
# into probabilities, and its gradient pushes the right class up and the others down.

# %%
ds = C.shapes_data(4, 1, seed=5)
img = ds.train_x[0]
xn = data.normalize(ds.train_x[:1])  # (1, 3, 32, 32) float32
pooled, _ = pool.maxpool2d_forward(d(xn), 3, 2)
pooled = pooled.copy_to_host()[0]  # (3, 15, 15)
keep = dropout_hash.keep_mask(7, 32 * 32, 0.5).reshape(32, 32)
logits = np.array([0.5, 2.0, -1.0, 0.0, 1.0, 0.2, -0.5, 1.5, 0.0, -2.0], np.float32)
label = int(ds.train_y[0])
probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
grad = probs - np.eye(10, dtype=np.float32)[label]
print(f"image class {ds.classes[label]}; pooled {xn.shape[2:]} -> {pooled.shape[1:]}; "
      f"mask keeps {keep.mean():.2f}; softmax {np.round(probs, 2)}")

plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 5, figsize=(16, 3))
    fig.subplots_adjust(wspace=0.35)
    ax[0].imshow(img)
    ax[0].set_title(f"input ({ds.classes[label]})")
    show = (pooled.transpose(1, 2, 0) * 0.25 + 0.5).clip(0, 1)  # undo the normalisation for display
    ax[1].imshow(show, interpolation="nearest")
    ax[1].set_title("max-pool 3x3 / 2 (15x15)")
    ax[2].imshow(img * keep[:, :, None], interpolation="nearest")
    ax[2].set_title("dropout p = 0.5 (hash mask)")
    for a in ax[:3]:
        a.axis("off")
    ax[3].bar(range(10), probs, color=["tab:green" if i == label else "tab:gray" for i in range(10)])
    ax[3].set_title("softmax of some logits\n(green: the true class)", fontsize=9)
    ax[4].bar(range(10), grad, color=["tab:green" if i == label else "tab:red" for i in range(10)])
    ax[4].axhline(0, color="black", linewidth=0.5)
    ax[4].set_title("gradient: softmax - onehot", fontsize=9)
    for a in ax[3:]:
        a.set_xticks(range(10))
        a.set_xticklabels(ds.classes, rotation=90, fontsize=7)
    C.save(fig, "04_ops.png")
else:
    C.text_bars(ds.classes, list(probs))
    C.no_plot("04_ops.png")

# %% [markdown]
# ## What to remember
# - A gradient check compares backward with finite differences; do it in float64.
# - Max-pool backward routes each gradient to the argmax; overlapping windows accumulate,
#   which on a GPU means atomics (scatter) or a gather from the input's side.
# - A counter-based hash makes dropout masks free to store and identical everywhere.
# - Subtract the max before exp: the same math, no overflow.
#
# Next: tutorial 5, the whole network and a training run.
print("\ntutorial 4 done")
