# %% [markdown]
# # Tutorial 5: putting the net together, and training it on `shapes`
#
# The ops of tutorials 1-4 become layers, the layers a network, and the network learns. Three
# ideas to take away:
#
# 1. **One flat parameter vector.** Every weight and bias of the model lives in ONE float32
#    array; each layer gets *views* (reshaped slices) into it. One optimizer launch updates the
#    whole network, and the whole model is a single buffer to send to a parameter server
#    (tutorial 6), average or save.
# 2. **A training step** is forward, loss, backward (which fills a flat gradient vector of the
#    same layout), and one SGD update of the flat vector.
# 3. **Backends are interchangeable**: the same model runs on NumPy or on the CUDA kernels.
#
# Files: `minasgd/model.py`, `minasgd/layers.py`, `minasgd/optim.py`, `minasgd/train.py`.
# Run: `python tutorials/05_the_whole_net.py` (about 20 s on 2 CPU cores; the training is on NumPy).

# %%
import os
import shutil

if shutil.which("nvidia-smi") is None:  # no GPU: run the kernels on Numba's CUDA simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
# One BLAS thread per training process (`_common` applies the rule of `minasgd/threads.py`,
# and `minasgd train` does the same in its workers): processes that each start a BLAS thread
# per core fight over a busy machine's cores (measured 5-10x slower on 2 shared cores).
# Set OPENBLAS_NUM_THREADS yourself to choose another count.

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from minasgd import backends  # noqa: E402
from minasgd.model import Model  # noqa: E402
from minasgd.optim import SGD, learning_rate  # noqa: E402
from minasgd.train import TrainConfig, evaluate, prepare_batch  # noqa: E402

be = backends.get("numpy")

# %% [markdown]
# ## 1. The network and its flat parameter vector
#
# `tiny` has the same layer types as the paper-style `alexnet-mini` (conv, ReLU, max-pool,
# fully connected, dropout) at a size that trains on a laptop CPU in minutes.
# (`minasgd model alexnet-mini` prints the big one.)

# %%
model = Model("tiny", be, seed=0)
print(f"model {model.name}: {model.num_params:,} parameters in ONE vector of shape {model.params.shape}")
print(f"  {'layer':9} {'type':8} {'output':>12} {'params':>7}   slice of the flat vector")
for layer in model.layers:
    slots = [(pname, off, shape) for (owner, pname, off, shape) in model.slots if owner is layer]
    where = ", ".join(f"{p}{list(s)} at [{o}:{o + int(np.prod(s))}]" for p, o, s in slots)
    count = sum(int(np.prod(s)) for _, _, s in slots)
    print(f"  {layer.name:9} {layer.kind:8} {'x'.join(map(str, layer.out_shape)):>12} {count:>7}   {where}")

conv1 = model.layers[0]
print(f"conv1's weight is a view into the flat vector: {np.shares_memory(conv1.params['w'], model.params)}")
model.params[0] += 1.0  # change the flat vector...
print(f"...and the layer sees it: conv1.w[0, 0, 0, 0] = {conv1.params['w'][0, 0, 0, 0]:.4f} "
      f"(flat[0] = {model.params[0]:.4f})")
model.params[0] -= 1.0

# %% [markdown]
# ## 2. One training step, by hand
#
# `prepare_batch` turns uint8 images (N, 32, 32, 3) into normalised float32 (N, 3, 32, 32);
# `loss_and_grad` runs forward (dropout on), the softmax cross-entropy, and backward, which
# OVERWRITES `model.grads` (same layout as `model.params`). SGD with momentum keeps a velocity
# vector, also flat: v = momentum v + g + weight_decay w; w -= lr v. That is one launch of
# `kernels/optim.py` on the GPU.

# %%
ds = C.shapes_data(C.pick(512, 5000), C.pick(200, 1000))
x, y = prepare_batch(be, model, ds.train_x[:64], ds.train_y[:64])
opt = SGD(be, model.num_params, momentum=0.9, weight_decay=5e-4)
loss0 = float(model.loss_and_grad(x, y, step=0)[0])
print(f"loss on a batch of 64: {loss0:.4f} (chance level is ln 10 = {np.log(10):.4f}); "
      f"gradient norm {np.linalg.norm(model.grads):.3f}")
opt.step(model.params, model.grads, lr=0.02)
loss1 = float(model.loss_and_grad(x, y, step=0)[0])  # same batch, same dropout mask
print(f"after one SGD step on it: {loss1:.4f} ({'lower' if loss1 < loss0 else 'NOT lower?'})")

# %% [markdown]
# ## 3. The same network on the CUDA kernels
#
# `backends.get("cuda")` swaps every op for the Numba kernels; the model code does not change.
# The simulator is slow, so we use the `micro` net (8x8 crops, every layer type) and a batch of
# 2, with the same parameters and the same images on both backends. Loss and every gradient
# should agree to float32 rounding.

# %%
cu = backends.get("cuda")
m_np, m_cu = Model("micro", be, seed=1), Model("micro", cu, seed=1)
xb, yb = prepare_batch(be, m_np, ds.train_x[:2], ds.train_y[:2])
l_np = float(m_np.loss_and_grad(xb, yb, step=3)[0])
xc, yc = prepare_batch(cu, m_cu, ds.train_x[:2], ds.train_y[:2])
l_cu = float(cu.to_numpy(m_cu.loss_and_grad(xc, yc, step=3))[0])
g_err = C.max_err(cu.to_numpy(m_cu.grads), m_np.grads)
print(f"micro ({m_np.num_params} parameters) on {cu.DEVICE}: loss {l_cu:.6f} vs NumPy {l_np:.6f}; "
      f"max |gradient difference| = {g_err:.1e}")

# %% [markdown]
# ## 4. A training run
#
# The whole loop fits on a screen. `minasgd train` (`minasgd/train.py`) is this loop plus a
# live progress display, a run directory with metrics.jsonl, and checkpoints:
#
#     minasgd train --model tiny --epochs 2 --backend numpy
#
# The learning rate warms up linearly and then follows a cosine down to 0. Reading the loss
# back from the device costs a synchronisation, so the real trainer does it only every
# `log_every` steps; on NumPy it is free, so we record every step.

# %%
model = Model("tiny", be, seed=0)
opt = SGD(be, model.num_params, momentum=0.9, weight_decay=5e-4)
steps, batch = C.pick(60, 800), C.pick(32, 64)
eval_every = C.pick(30, 200)
rng = np.random.default_rng(0)
losses, evals = [], []
with C.Timer() as t:
    for step in range(steps):
        idx = rng.integers(0, len(ds.train_y), batch)
        x, y = prepare_batch(be, model, ds.train_x[idx], ds.train_y[idx])
        loss = model.loss_and_grad(x, y, step)
        opt.step(model.params, model.grads, learning_rate(step, steps, base_lr=0.02, warmup_steps=steps // 10))
        losses.append(float(loss[0]))
        if (step + 1) % eval_every == 0:
            acc, test_loss = evaluate(model, ds.test_x, ds.test_y)
            evals.append((step + 1, acc, test_loss))
            print(f"  step {step + 1:4}: train loss (last {eval_every}) {np.mean(losses[-eval_every:]):.3f}, "
                  f"test loss {test_loss:.3f}, test accuracy {acc:.1%}")
print(f"{steps} steps of batch {batch} on {len(ds.train_y)} images in {t.seconds:.1f} s on NumPy "
      f"({steps * batch / t.seconds:.0f} images/s)")
print(f"(shapes is hard on purpose: a small net needs a few thousand steps to do well; "
      f"`minasgd train --model tiny` runs {TrainConfig().epochs} epochs of the 20,000 training images)")

# %% [markdown]
# ## Pictures: the learning curve and some predictions

# %%
smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    ax[0].plot(np.arange(1, steps + 1), losses, color="tab:blue", alpha=0.3, label="train loss (batch)")
    ax[0].plot(np.arange(10, steps + 1), smooth, color="tab:blue", label="train loss (mean of 10)")
    ax[0].plot([e[0] for e in evals], [e[2] for e in evals], "o-", color="tab:orange", label="test loss")
    ax[0].axhline(np.log(10), color="gray", linestyle=":", label="chance (ln 10)")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    ax[0].legend(fontsize=8)
    ax[1].plot([e[0] for e in evals], [100 * e[1] for e in evals], "o-", color="tab:green")
    ax[1].axhline(10, color="gray", linestyle=":")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("test accuracy (%)")
    C.save(fig, "05_learning_curve.png")
else:
    C.text_curve(np.arange(10, steps + 1), smooth)
    C.no_plot("05_learning_curve.png")

xt, yt = prepare_batch(be, model, ds.test_x[:16], ds.test_y[:16])
pred = be.to_numpy(model.forward(xt)).argmax(axis=1)
titles = [f"{ds.classes[p]}{'' if p == t else ' (' + ds.classes[t] + ')'}" for p, t in zip(pred, ds.test_y[:16])]
C.show_images(ds.test_x[:16], titles, "05_predictions.png")
print(f"predicted (true label in brackets when wrong): {sum(p == t for p, t in zip(pred, ds.test_y[:16]))}/16 right")

# %% [markdown]
# ## What to remember
# - All parameters in one flat vector; layers hold views. Gradients have the same layout.
# - A step: forward, loss, backward, one optimizer update over the flat vector.
# - The backend is a plug: NumPy for reference and CPUs, the CUDA kernels for GPUs.
#
# Next: tutorial 6, several workers training one model through a parameter server.
print("\ntutorial 5 done")
