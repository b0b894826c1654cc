"""The built-in "shapes" dataset: ten kinds of shape, drawn with pillow, made in a few seconds.

Each 32x32 image holds one shape of a random colour, size, position, rotation and slight stretch,
on a random background colour, among clutter (thin lines behind and across the shape, small
blobs) and with pixel noise. Some classes look alike (circle / hexagon / pentagon, star / cross /
arrow), so a small CNN needs several epochs and does not reach 100%. Measured: pixel-level
baselines are at chance (nearest class mean 10%, softmax regression 12%: colours are random);
alexnet-mini with SGD (lr 0.02, momentum 0.9, batch 64, cosine schedule) went 34% -> 56% -> 77%
-> 85% test accuracy over its first four epochs. (Version 1 had more clutter, noise and
low-contrast images and was too hard for a 10-minute CPU run.)

Images are drawn at SCALE times the final size and shrunk with a box filter, which antialiases
the edges. All randomness comes from `seed`: the train and test splits use separate random
streams, so the test images do not change when the train size does. The result is cached as an
.npz file under the data root, named by VERSION, seed and sizes; bump VERSION whenever the
drawing changes.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from .dataset import Dataset, DatasetError, Progress, progress_counter

VERSION = 2
CLASSES = ["circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring", "ellipse", "arrow"]
TRAIN_SIZE = 20_000
TEST_SIZE = 2_000
SIZE = 32  # final image side, pixels
SCALE = 4  # images are drawn at SIZE * SCALE and shrunk
CHUNK = 1000  # images per progress step (also fixes the order noise is drawn in)


# ------------------------------------------------------------------ outlines

def _regular(k: int, start: float = math.pi / 2) -> np.ndarray:
    """k corners of a regular polygon on the unit circle, the first one at angle `start`."""
    a = start + 2 * math.pi * np.arange(k) / k
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(inner: float) -> np.ndarray:
    """Five-pointed star: points on the unit circle, notches at radius `inner`."""
    a = math.pi / 2 + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(t: float) -> np.ndarray:
    """Plus sign with arms reaching 1 from the centre, each 2*t wide."""
    return np.array([(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1),
                     (-t, -1), (-t, -t), (-1, -t), (-1, t), (-t, t), (-t, 1)], dtype=float)


def _arrow(shaft: float) -> np.ndarray:
    """Arrow pointing along +x: a shaft of half-width `shaft` and a triangular head."""
    return np.array([(-1, -shaft), (0.1, -shaft), (0.1, -0.65), (1, 0), (0.1, 0.65),
                     (0.1, shaft), (-1, shaft)], dtype=float)


_CIRCLE = _regular(48)


def _outline(name: str, extra: float) -> np.ndarray:
    """Unit-size outline of a shape class; `extra` in [0, 1) varies stars, crosses and arrows."""
    if name in ("circle", "ellipse", "ring"):
        return _CIRCLE
    if name == "square":
        return _regular(4, math.pi / 4)
    if name == "triangle":
        return _regular(3)
    if name == "pentagon":
        return _regular(5)
    if name == "hexagon":
        return _regular(6)
    if name == "star":
        return _star(0.35 + 0.15 * extra)
    if name == "cross":
        return _cross(0.22 + 0.12 * extra)
    if name == "arrow":
        return _arrow(0.18 + 0.14 * extra)
    raise AssertionError(name)


# ------------------------------------------------------------------ drawing

def _draw_params(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every random choice for n images, drawn up front (fast, and fixed by the seed)."""
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int32)  # balanced classes
    radius = rng.uniform(8, 14, n)  # in final pixels
    stretch = rng.uniform(0.9, 1.1, n)  # width / height ratio is stretch**2
    is_ellipse = labels == CLASSES.index("ellipse")
    stretch[is_ellipse] = rng.uniform(1.25, 1.6, is_ellipse.sum())
    margin = 0.9 * radius  # the shape may poke out of the frame a little
    centre = margin[:, None] + rng.uniform(0, 1, (n, 2)) * (SIZE - 2 * margin)[:, None]

    background = rng.uniform(0, 255, (n, 3))
    fill = rng.uniform(0, 255, (n, 3))
    # Keep the shape visible: at least 140 apart from the background in RGB.
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    diff = fill - background
    dist = np.linalg.norm(diff, axis=1)
    too_close = dist < 140
    diff[too_close] = direction[too_close] * 140
    fill = np.clip(background + diff, 0, 255)

    return {
        "labels": labels,
        "radius": radius,
        "stretch": stretch,
        "angle": rng.uniform(0, 2 * math.pi, n),
        "centre": centre,
        "extra": rng.uniform(0, 1, n),
        "ring_width": rng.uniform(0.3, 0.55, n),
        "background": background.astype(int),
        "fill": fill.astype(int),
        "lines_behind": rng.integers(0, 2, n),
        "lines_across": (rng.uniform(0, 1, n) < 0.15).astype(int),  # a thin line in front of 15%
        "line_ends": rng.uniform(-4, SIZE + 4, (n, 7, 4)),
        "line_width": rng.integers(1, 3, (n, 7)),
        "line_colour": rng.integers(0, 256, (n, 7, 3)),
        "blobs": rng.integers(0, 4, n),
        "blob_xy": rng.uniform(0, SIZE, (n, 3, 2)),
        "blob_radius": rng.uniform(1, 3, (n, 3)),
        "blob_colour": rng.integers(0, 256, (n, 3, 3)),
        "noise": rng.uniform(2, 4, n),
    }


def _draw_one(p: dict[str, np.ndarray], i: int) -> np.ndarray:
    """Draw image i of the parameter set p; returns uint8 (SIZE, SIZE, 3)."""
    image = Image.new("RGB", (SIZE * SCALE, SIZE * SCALE), tuple(p["background"][i].tolist()))
    draw = ImageDraw.Draw(image)

    def line(k: int, width: int) -> None:
        ends = (p["line_ends"][i, k] * SCALE).tolist()
        draw.line(ends, fill=tuple(p["line_colour"][i, k].tolist()), width=width * SCALE)

    for k in range(p["lines_behind"][i]):
        line(k, int(p["line_width"][i, k]))
    for k in range(p["blobs"][i]):
        x, y = (p["blob_xy"][i, k] * SCALE).tolist()
        r = float(p["blob_radius"][i, k]) * SCALE
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(p["blob_colour"][i, k].tolist()))

    name = CLASSES[p["labels"][i]]
    r, s, a = p["radius"][i], p["stretch"][i], p["angle"][i]
    rotate = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    centre = p["centre"][i] * SCALE
    outline = _outline(name, p["extra"][i]) * (r * s, r / s) @ rotate * SCALE  # around (0, 0)
    fill = tuple(p["fill"][i].tolist())
    if name == "ring":  # a thick closed line along the middle of the band
        band = p["ring_width"][i]  # band width as a fraction of the radius
        middle = [tuple(q) for q in (outline * (1 - band / 2) + centre).tolist()]
        draw.line(middle + middle[:1], fill=fill, width=max(SCALE, round(band * r * SCALE)), joint="curve")
    else:
        draw.polygon([tuple(q) for q in (outline + centre).tolist()], fill=fill)

    for k in range(p["lines_across"][i]):  # thin lines in front of the shape
        line(6 - k, 1)
    return np.asarray(image.reduce(SCALE))


def generate(n: int, rng: np.random.Generator, advance: Callable[[int], None] = lambda k: None):
    """Draw n images with their labels: (uint8 (n, 32, 32, 3), int32 (n,)).

    `advance(k)` is called after each block of k images (for a progress bar).
    """
    p = _draw_params(n, rng)
    x = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        for i in range(start, stop):
            x[i] = _draw_one(p, i)
        noise = rng.standard_normal((stop - start, SIZE, SIZE, 3), dtype=np.float32)
        noise *= p["noise"][start:stop, None, None, None].astype(np.float32)
        noise += x[start:stop]
        np.clip(noise, 0, 255, out=noise)
        x[start:stop] = np.rint(noise)
        advance(stop - start)
    return x, p["labels"]


# ------------------------------------------------------------------ cache

def cache_path(root: str | Path, seed: int, train_size: int, test_size: int) -> Path:
    return Path(root) / f"shapes-v{VERSION}-seed{seed}-train{train_size}-test{test_size}.npz"


def _read_cache(path: Path, train_size: int, test_size: int) -> Dataset | None:
    """The cached dataset, or None if the file is missing or unreadable (it is then remade)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = Dataset("shapes", [str(c) for c in f["classes"]],
                           f["train_x"], f["train_y"], f["test_x"], f["test_y"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = (data.classes == CLASSES and data.train_x.shape == (train_size, SIZE, SIZE, 3)
          and data.test_x.shape == (test_size, SIZE, SIZE, 3) and data.train_x.dtype == np.uint8
          and data.train_y.shape == (train_size,) and data.test_y.shape == (test_size,))
    return data if ok else None


def _write_cache(path: Path, data: Dataset) -> None:
    """Write via a temporary file and os.replace, so a crash never leaves a half-written cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".shapes-", suffix=".tmp")
    except OSError as e:
        raise DatasetError(f"cannot write the shapes cache in {path.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, classes=np.array(CLASSES), train_x=data.train_x, train_y=data.train_y,
                     test_x=data.test_x, test_y=data.test_y)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a cache is an ordinary data file
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DatasetError(f"cannot write the shapes cache {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make(seed: int = 0, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE,
         progress: Progress | None = None) -> Dataset:
    """Draw the whole dataset (no cache); `progress(what, done, total)` hears how far it got."""
    if train_size < 1 or test_size < 1:
        raise DatasetError(f"shapes: sizes must be >= 1, got train {train_size}, test {test_size}")
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    step = progress_counter(progress, "drawing shapes", train_size + test_size)
    train_x, train_y = generate(train_size, train_rng, step)
    test_x, test_y = generate(test_size, test_rng, step)
    return Dataset("shapes", list(CLASSES), train_x, train_y, test_x, test_y)


def load(root: str | Path, seed: int = 0, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE,
         progress: Progress | None = None) -> Dataset:
    """The shapes dataset from its cache under `root`, drawn and cached first if needed."""
    path = cache_path(root, seed, train_size, test_size)
    data = _read_cache(path, train_size, test_size)
    if data is None:
        data = make(seed, train_size, test_size, progress)
        _write_cache(path, data)
    return data


def timed_make(root: str | Path, seed: int = 0, train_size: int = TRAIN_SIZE,
               test_size: int = TEST_SIZE, progress: Progress | None = None) -> tuple[Dataset, Path, float]:
    """Draw and cache the dataset even if cached; returns it, the cache path and the seconds taken."""
    start = time.perf_counter()
    data = make(seed, train_size, test_size, progress)
    path = cache_path(root, seed, train_size, test_size)
    _write_cache(path, data)
    return data, path, time.perf_counter() - start
