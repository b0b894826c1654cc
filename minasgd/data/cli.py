"""The `minasgd data` subcommand: make the shapes dataset or download CIFAR-10, ahead of training.

    minasgd data shapes [--root DIR] [--seed N] [--preview grid.png]
    minasgd data cifar10 [--root DIR] [--url URL] [--checksum md5:HEX] [--preview grid.png]

`add_arguments` fills an argparse (sub)parser and `run` carries the command out; the top-level
CLI wires them up. Errors come out as one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import Dataset, DatasetError, default_root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import cifar10, shapes

    parser.add_argument("name", choices=["shapes", "cifar10"], help="dataset to prepare")
    parser.add_argument("--root", type=Path, default=None,
                        help="data folder (default: $MINASGD_DATA, else ./data)")
    parser.add_argument("--seed", type=int, default=0, help="shapes: random seed (default 0)")
    parser.add_argument("--train-size", type=int, default=shapes.TRAIN_SIZE,
                        help=f"shapes: train images (default {shapes.TRAIN_SIZE})")
    parser.add_argument("--test-size", type=int, default=shapes.TEST_SIZE,
                        help=f"shapes: test images (default {shapes.TEST_SIZE})")
    parser.add_argument("--url", default=cifar10.DEFAULT_URL, help="cifar10: archive to download")
    parser.add_argument("--checksum", default=cifar10.DEFAULT_CHECKSUM,
                        help="cifar10: md5:HEX or sha256:HEX of the archive")
    parser.add_argument("--preview", type=Path, metavar="PNG", default=None,
                        help="also save a grid of sample train images, one row per class")


def run(args: argparse.Namespace) -> int:
    """Carry out `minasgd data`; returns the exit status."""
    from . import cifar10, shapes

    root = default_root() if args.root is None else Path(args.root)
    try:
        if args.name == "shapes":
            data, path, seconds = shapes.timed_make(root, args.seed, args.train_size, args.test_size)
            print(f"shapes: {len(data.train_y)} train + {len(data.test_y)} test images, "
                  f"{data.num_classes} classes, in {seconds:.1f} s -> {path}")
        else:
            start = time.perf_counter()
            folder = cifar10.download(root, url=args.url, checksum=args.checksum)
            data = cifar10.load(folder)
            print(f"cifar10: {len(data.train_y)} train + {len(data.test_y)} test images, "
                  f"{data.num_classes} classes, ready in {time.perf_counter() - start:.1f} s -> {folder}")
        if args.preview is not None:
            save_preview(data, args.preview)
            print(f"preview -> {args.preview}")
    except DatasetError as e:
        print(f"minasgd data: error: {e}", file=sys.stderr)
        return 1
    return 0


def save_preview(data: Dataset, path: str | Path, per_class: int = 10, zoom: int = 3) -> None:
    """Save a PNG grid: one row per class (name on the left), `per_class` train images each."""
    cell = 32 * zoom + 4
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # pillow < 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    label_width = 12 + max(int(font.getlength(name)) for name in data.classes)
    grid = Image.new("RGB", (label_width + per_class * cell, data.num_classes * cell), "white")
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(data.classes):
        draw.text((6, row * cell + cell // 2 - 8), name, fill="black", font=font)
        for col, i in enumerate(np.flatnonzero(data.train_y == row)[:per_class]):
            tile = Image.fromarray(data.train_x[i]).resize((32 * zoom, 32 * zoom), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + col * cell + 2, row * cell + 2))
    try:
        grid.save(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot save preview {path}: {e}") from None
