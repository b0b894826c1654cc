"""The one in-memory dataset type every source returns, its error, and how sources report progress.

Sources (`shapes`, `cifar10`, `folder`) import from here, not from the package, so the package
can import them back without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

IMAGE_SHAPE = (32, 32, 3)  # every dataset's images: height, width, RGB channels


class DatasetError(ValueError):
    """A dataset could not be found or read; the one-line message names the file or folder."""


@dataclass
class Dataset:
    """Train and test images (uint8, N x 32 x 32 x 3, NHWC) with int32 labels and class names."""

    name: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard(self, index: int, count: int) -> Dataset:
        """The index-th of `count` disjoint, nearly equal shards of the train split.

        Shard i takes train images i, i + count, i + 2*count, ... so the shards cover the train
        split exactly once and differ in size by at most one image. The test split is shared.
        """
        n = len(self.train_y)
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard: need 0 <= index < count, got index={index} count={count}")
        if count > n:
            raise ValueError(f"shard: cannot split {n} training images of {self.name} into {count} shards")
        return Dataset(
            name=f"{self.name}[shard {index + 1}/{count}]",
            classes=list(self.classes),
            train_x=np.ascontiguousarray(self.train_x[index::count]),
            train_y=np.ascontiguousarray(self.train_y[index::count]),
            test_x=self.test_x,
            test_y=self.test_y,
        )


# A progress callback: `progress(what, done, total)`, called as work advances (`done` counts up to
# `total`; total is None when unknown, e.g. a download without a length). The library never draws
# anything itself: the command line passes a callback that does (`minasgd.dashboard`).
Progress = Callable[[str, int, "int | None"], None]


def progress_counter(progress, what: str, total: int | None) -> Callable[[int], None]:
    """advance(k): report k more units of `what` done to `progress` (None or False: report nothing)."""
    if not callable(progress):
        return lambda k: None
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        progress(what, done, total)

    progress(what, 0, total)
    return advance
