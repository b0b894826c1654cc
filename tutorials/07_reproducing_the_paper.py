# %% [markdown]
# # Tutorial 7: the paper's idea in miniature: cold vs warm start, workers vs speed-up
#
# Paine et al. (2013) found that asynchronous SGD with several GPU clients speeds training up
# most when it starts from a partly trained model (**warm start**, up to ~3.2x with 8 clients),
# while many clients from random weights (**cold start**) can hurt: early on the gradients are
# large and change fast, so stale pushes from several clients pull the model in conflicting
# directions. Later, the landscape is smoother and staleness costs little.
#
# Here are both experiments at laptop scale, with the real commands:
#
# 1. pretrain one model in one process for a little while (`minasgd train --workers 0`);
# 2. continue with 2 async workers from random weights (cold) and from the pretrained model
#    (warm: `--init RUN/model.npz`), and compare test accuracy per mini-batch;
# 3. measure images per second with 1 and 2 workers (the speed-up).
#
# The budgets are tiny, so the numbers are noisy and accuracies low: read them as a demo of
# the method, not as a result. `minasgd experiment workers|warmstart` runs the real versions.
# Run: `python tutorials/07_reproducing_the_paper.py` (a few minutes).

# %%
import json
import os
import shutil
import subprocess
import sys

if shutil.which("nvidia-smi") is None:  # no GPU: any CUDA code would run on Numba's simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import _common as C  # noqa: E402

OUT = C.OUT / "07_runs"
shutil.rmtree(OUT, ignore_errors=True)
COMMON = ["--model", "tiny", "--backend", "numpy", "--batch-size", "32", "--lr", "0.02",
          "--dataset", f"shapes:{C.pick(640, 4000)},{C.pick(200, 1000)}",
          "--data-root", str(C.DATA_ROOT), "--quiet"]
PS = ["--nsync", "4", "--checkpoint-every", "0", "--eval-every", "0.5"]


def train(name, *args):
    """Run `minasgd train ...` into OUT/name and return its summary.json."""
    cmd = [sys.executable, "-m", "minasgd", "train", *COMMON, *args, "--out", str(OUT / name)]
    print(f"$ minasgd train {' '.join(args)} ...")
    with C.Timer() as t:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-1000:], proc.stderr[-2000:])
        raise SystemExit(f"run {name} failed (exit {proc.returncode})")
    summary = json.loads((OUT / name / "summary.json").read_text())
    print(f"  {name}: test accuracy {summary['test_accuracy']:.1%}, {summary['steps']} mini-batches, "
          f"{summary['images_per_second']:.0f} images/s, {t.seconds:.0f} s")
    return summary


# %% [markdown]
# ## 1. Pretrain (one process)

# %%
pre = train("pretrain", "--workers", "0", "--epochs", str(C.pick(2, 4)))

# %% [markdown]
# ## 2. Cold vs warm start, 2 async workers each
#
# Same data, same number of mini-batches; the only difference is the starting point.

# %%
epochs = str(C.pick(2, 3))
cold = train("cold", "--workers", "2", "--epochs", epochs, *PS)
warm = train("warm", "--workers", "2", "--epochs", epochs, "--init", str(OUT / "pretrain" / "model.npz"), *PS)
for name, s in (("cold", cold), ("warm", warm)):
    curve = ", ".join(f"{e['step']}: {e['test_accuracy']:.1%}" for e in s["evaluations"])
    stale = {int(k): v for k, v in s["staleness"].items()}
    mean = sum(k * v for k, v in stale.items()) / max(1, sum(stale.values()))
    print(f"  {name}: accuracy by mini-batch {{{curve}}}; mean staleness {mean:.2f}")

# %% [markdown]
# ## 3. Workers vs speed-up
#
# Throughput in images per second with 1 and 2 worker processes. On a GPU cluster each worker
# has its own GPU and the speed-up approaches the number of workers until the server or the
# network saturates. On a laptop CPU two NumPy workers share the same few cores, so expect
# little or no speed-up here: the point is the method (and the server's bookkeeping).

# %%
one = train("workers1", "--workers", "1", "--epochs", epochs, "--init", str(OUT / "pretrain" / "model.npz"), *PS)
speedup = warm["images_per_second"] / one["images_per_second"]
print(f"{os.cpu_count()} CPU cores here; 1 worker {one['images_per_second']:.0f} images/s, "
      f"2 workers {warm['images_per_second']:.0f} images/s: speed-up {speedup:.2f}x")

# %% [markdown]
# ## A picture: accuracy per mini-batch (cold vs warm) and throughput per worker count

# %%
plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    offset = pre["steps"]  # the warm run's mini-batches come after the pretraining's
    ax[0].plot([e["step"] for e in cold["evaluations"]], [100 * e["test_accuracy"] for e in cold["evaluations"]],
               "o-", label="cold start (2 workers)")
    ax[0].plot([offset + e["step"] for e in warm["evaluations"]], [100 * e["test_accuracy"] for e in warm["evaluations"]],
               "o-", label="warm start (2 workers)")
    ax[0].axvline(offset, color="gray", linestyle=":", label="end of pretraining")
    ax[0].axhline(100 * pre["test_accuracy"], color="gray", linewidth=0.5)
    ax[0].set_xlabel("mini-batches (including pretraining)")
    ax[0].set_ylabel("test accuracy (%)")
    ax[0].legend(fontsize=8)
    ax[1].bar(["1 worker", "2 workers"], [one["images_per_second"], warm["images_per_second"]], color="tab:green")
    ax[1].set_ylabel("images / s")
    ax[1].set_title(f"speed-up {speedup:.2f}x on {os.cpu_count()} CPU cores", fontsize=9)
    C.save(fig, "07_warm_start.png")
else:
    C.text_bars(["cold", "warm"], [100 * cold["test_accuracy"], 100 * warm["test_accuracy"]])
    C.text_bars(["1 worker", "2 workers"], [one["images_per_second"], warm["images_per_second"]])
    C.no_plot("07_warm_start.png")

# %% [markdown]
# ## What to remember
# - Warm start: pretrain briefly in one process, then hand the model (`--init`) to many
#   asynchronous workers; staleness hurts least once the model is past its chaotic start.
# - Speed-up needs real parallel hardware: one GPU per worker, as in the paper.
# - Everything here is a command you can scale up: more data, more epochs, `--backend cuda`.
print("\ntutorial 7 done")
