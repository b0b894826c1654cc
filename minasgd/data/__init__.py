"""Datasets: one in-memory `Dataset` type, three sources, and the helpers the trainer needs.

Every source yields the same thing: uint8 images of shape (N, 32, 32, 3) (NHWC, RGB) and int32
labels, for a train and a test split. Sources, picked by a spec string given to `load`:

    "shapes"        the built-in procedurally drawn dataset (`minasgd.data.shapes`), made in seconds
    "shapes:N,M"    the same with N train and M test images (quick looks, tests)
    "cifar10"       CIFAR-10 in its binary version (`minasgd.data.cifar10`), downloaded once
    "folder:PATH"   an image-folder tree PATH/{train,test}/<class>/* (`minasgd.data.folder`)

Images stay uint8 until a batch is fed to the model; `normalize` turns a batch into the float32
NCHW layout the backends use. Anything wrong with a file raises `DatasetError`, a one-line
message that names the file or folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .dataset import IMAGE_SHAPE, Dataset, DatasetError, Progress, progress_counter  # noqa: F401

MEAN = (0.5, 0.5, 0.5)  # per-channel mean and std used by `normalize`, the same for all datasets
STD = (0.25, 0.25, 0.25)
SPECS = ("shapes", "shapes:TRAIN,TEST", "cifar10", "folder:PATH")


def default_root() -> Path:
    """Where datasets live: $MINASGD_DATA if set, else ./data (relative to the current folder)."""
    return Path(os.environ.get("MINASGD_DATA") or "data")


def load(spec: str, root: str | Path | None = None, seed: int = 0, progress: Progress | None = None) -> Dataset:
    """Load the dataset named by `spec` ("shapes", "shapes:TRAIN,TEST", "cifar10" or "folder:PATH").

    `root` (default: `default_root()`) holds the shapes cache and the CIFAR-10 files; `seed`
    picks the shapes images and the order of a folder dataset's train split. Nothing is drawn on
    a screen: `progress`, when given, is called as `progress(what, done, total)` (see `minasgd.data.dataset`).
    """
    root = default_root() if root is None else Path(root)
    if spec == "shapes" or spec.startswith("shapes:"):
        from . import shapes

        train_size, test_size = _shapes_sizes(spec)
        return shapes.load(root, seed=seed, train_size=train_size, test_size=test_size, progress=progress)
    if spec == "cifar10":
        from . import cifar10

        return cifar10.load(root)
    if spec.startswith("folder:") and spec != "folder:":
        from . import folder

        return folder.load(spec[len("folder:"):], seed=seed, progress=progress)
    raise DatasetError(f"unknown dataset {spec!r}: choose one of {', '.join(SPECS)}")


def _shapes_sizes(spec: str) -> tuple[int, int]:
    """"shapes" -> the default sizes; "shapes:2000,500" -> a smaller set for quick looks and tests."""
    from . import shapes

    if spec == "shapes":
        return shapes.TRAIN_SIZE, shapes.TEST_SIZE
    try:
        train_size, test_size = (int(v) for v in spec[len("shapes:"):].split(","))
    except ValueError:
        raise DatasetError(f"bad dataset {spec!r}: write shapes:TRAIN,TEST, e.g. shapes:2000,500") from None
    if train_size < 1 or test_size < 1:
        raise DatasetError(f"bad dataset {spec!r}: both sizes must be at least 1")
    return train_size, test_size


def normalize(x: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> float32 (N, 3, H, W), C-contiguous, (x/255 - MEAN) / STD."""
    if x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"normalize: expected uint8 images of shape (N, H, W, 3), got {x.shape}")
    out = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
    out /= np.float32(255)
    out -= np.asarray(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    out /= np.asarray(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return out


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x, y) mini-batches; in a random order drawn from `rng` if given, else in order.

    The last batch is smaller when batch_size does not divide len(x), unless drop_last.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"batches: x has {n} images but y has {len(y)} labels")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    order = None if rng is None else rng.permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
