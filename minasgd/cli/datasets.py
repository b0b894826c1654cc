"""The `minasgd data` subcommand: make the shapes dataset or download CIFAR-10, ahead of training.

    minasgd data shapes [--root DIR] [--seed N] [--preview grid.png]
    minasgd data cifar10 [--root DIR] [--url URL] [--checksum md5:HEX] [--preview grid.png]

`add_arguments` fills an argparse (sub)parser and `run` carries the command out; the top-level
CLI wires them up. Errors come out as one line on stderr and exit status 1. The datasets report
how far they got through a callback; the bars are `minasgd.dashboard.TaskBars`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data import cifar10, shapes

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


def cmd_data(args: argparse.Namespace, console=None) -> int:
    return run(args, console)


def run(args: argparse.Namespace, console=None) -> int:
    """Carry out `minasgd data`; returns the exit status."""
    from ..dashboard import TaskBars
    from ..data import DatasetError, cifar10, default_root, shapes
    from ..data.preview import save_preview

    root = default_root() if args.root is None else Path(args.root)
    try:
        if args.name == "shapes":
            with TaskBars(console) as bars:
                data, path, seconds = shapes.timed_make(root, args.seed, args.train_size, args.test_size, progress=bars)
            print(f"shapes: {len(data.train_y)} train + {len(data.test_y)} test images, "
                  f"{data.num_classes} classes, in {seconds:.1f} s -> {path}")
        else:
            start = time.perf_counter()
            with TaskBars(console) as bars:
                folder = cifar10.download(root, url=args.url, checksum=args.checksum, progress=bars)
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
