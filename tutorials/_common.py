"""Small helpers the tutorials share: settings, headings, figures with a text fallback.

Nothing here is about GPUs or training; it only keeps the tutorials short. Import it AFTER the
tutorial has decided between the CUDA simulator and a real GPU (it does not import numba), and
BEFORE minasgd: it makes `import minasgd` find the code of the checkout this folder sits in (a
student's copy of the repository runs the student's kernels, whatever else is installed).

    FAST        MINASGD_TUTORIAL_FAST=1: tiny sizes and few steps (the test suite sets it)
    OUT         where figures and runs go: $MINASGD_TUTORIAL_OUT, else tutorials/out/
    DATA_ROOT   where datasets are cached: $MINASGD_DATA, else the repository's data/ folder
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _use_this_checkout():
    """Put ROOT first on sys.path and bind `minasgd.kernels` to ROOT/kernels (what an editable
    install does through setuptools' package-dir), so this checkout's code is the one imported."""
    if not (ROOT / "minasgd" / "__init__.py").is_file() or "minasgd" in sys.modules:
        return
    sys.path.insert(0, str(ROOT))
    import minasgd

    spec = importlib.util.spec_from_file_location("minasgd.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["minasgd.kernels"] = kernels
    spec.loader.exec_module(kernels)
    minasgd.kernels = kernels


_use_this_checkout()
FAST = os.environ.get("MINASGD_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("MINASGD_TUTORIAL_OUT") or HERE / "out")
DATA_ROOT = Path(os.environ.get("MINASGD_DATA") or HERE.parent / "data")

# Tutorials follow the training rule of minasgd.threads: one BLAS thread unless the environment says.
from minasgd.threads import pin_blas_threads_for_training  # noqa: E402

BLAS_THREADS = pin_blas_threads_for_training()


def pick(fast, full):
    """`fast` under MINASGD_TUTORIAL_FAST=1, else `full`."""
    return fast if FAST else full


def heading(title):
    """Print a cell heading, so the output reads like the file."""
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def max_err(a, b):
    """Largest absolute difference between two arrays (host or anything np.asarray takes)."""
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed.

    Plots are an optional extra: `pip install -e ".[plot]"`. Without it every tutorial still runs
    and prints a text version of its pictures.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, name):
    """Save a matplotlib figure as OUT/name (PNG) and close it; returns the path."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    pyplot().close(fig)
    print(f"[figure] {path}")
    return path


def no_plot(name):
    print(f"[figure] {name}: matplotlib is not installed (pip install -e \".[plot]\"), text version above")


def text_bars(labels, values, width=40):
    """A horizontal bar chart in text (the fallback when there is no matplotlib)."""
    top = max(max(values), 1e-12)
    for label, v in zip(labels, values):
        print(f"  {str(label):>12} | {'#' * int(round(width * v / top)):<{width}} {v:g}")


def text_curve(xs, ys, rows=8, width=60):
    """A rough text plot of y against x (x increasing)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    lo, hi = float(ys.min()), float(ys.max())
    grid = [[" "] * width for _ in range(rows)]
    for x, y in zip(xs, ys):
        c = int((x - xs[0]) / max(xs[-1] - xs[0], 1e-12) * (width - 1))
        r = int((hi - y) / max(hi - lo, 1e-12) * (rows - 1))
        grid[r][c] = "*"
    for i, row in enumerate(grid):
        label = f"{hi:8.3f}" if i == 0 else (f"{lo:8.3f}" if i == rows - 1 else " " * 8)
        print(f"  {label} |{''.join(row)}")
    print(f"  {'':8} +{'-' * width}\n  {'':8}  {xs[0]:g}{'':>{width - 12}}{xs[-1]:g}")


def show_images(images, titles, name, cols=8):
    """Save a grid of uint8 HWC images with titles, or print the titles when there is no matplotlib."""
    plt = pyplot()
    if plt is None:
        for i in range(0, len(titles), cols):
            print("  " + " | ".join(f"{t:>10}" for t in titles[i:i + cols]))
        no_plot(name)
        return None
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), images, titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    return save(fig, name)


class Timer:
    """Wall time of a block: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def gpu_time(fn, repeats=10):
    """Median seconds of fn() on a REAL GPU: warm up (compile) once, synchronize around each call.

    Never call this on the simulator: it runs every thread as Python, so its times say nothing
    about a GPU.
    """
    from numba import cuda

    fn()
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def exercise(task, run, reference):
    """A check cell for an exercise cut from assignment task `task`: (run(), True), or, while the
    student's copy still has the stub (NotImplementedError), a note and (reference(), False), so
    the tutorial reads on. In the instructor's copy the solution is there and this is just run().
    """
    try:
        return run(), True
    except NotImplementedError as e:
        reason = str(e).splitlines()[0] if str(e) else "a stub"
        print(f"[exercise, task {task}] not solved yet ({reason.split(': ', 1)[-1]}); "
              "going on with the reference. Solve it, then run this tutorial again.")
        return reference(), False


def shapes_data(train, test, seed=0):
    """A small shapes dataset drawn in memory (about 0.5 ms an image), no cache file."""
    from minasgd.data import shapes

    return shapes.make(seed, train, test, progress=False)
