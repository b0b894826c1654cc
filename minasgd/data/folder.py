"""Image-folder datasets: `folder:PATH` reads PATH/train/<class>/* and PATH/test/<class>/*.

Any image pillow can open with a .png, .jpg, .jpeg, .bmp, .gif or .webp name, of any size and
mode, is converted to RGB and resized to 32x32 (a GIF gives its first frame). Class names are
the train sub-folder names, sorted; every test class must also be a train class. Files whose
names start with "." are skipped (e.g. .DS_Store), as are folders below the class folders; any
other file that is not a readable image is an error, named in the message.

The train split is shuffled with `seed` so that classes are mixed (and `Dataset.shard` gives
every worker every class); the test split keeps the sorted class / file order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import IMAGE_SHAPE, Dataset, DatasetError, Progress, progress_counter

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _list(folder: Path) -> list[Path]:
    """The entries of `folder`, sorted, skipping names that start with "."."""
    try:
        return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    except OSError as e:
        raise DatasetError(f"cannot list folder {folder}: {e.strerror or e}") from None


def _class_folders(split: Path) -> dict[str, Path]:
    """{class name: folder} for PATH/train or PATH/test."""
    if not split.is_dir():
        raise DatasetError(f"image folder {split} not found (expected PATH/train/<class>/ and PATH/test/<class>/)")
    classes = {p.name: p for p in _list(split) if p.is_dir()}
    if not classes:
        raise DatasetError(f"no class folders in {split}")
    return classes


def _image_files(folder: Path) -> list[Path]:
    """The image files of one class folder; other files are an error, so is an empty folder."""
    files = [p for p in _list(folder) if p.is_file()]
    for p in files:
        if p.suffix.lower() not in EXTENSIONS:
            raise DatasetError(f"not an image file: {p} (expected one of {' '.join(EXTENSIONS)})")
    if not files:
        raise DatasetError(f"empty class folder: {folder}")
    return files


def read_image(path: Path) -> np.ndarray:
    """One image file -> uint8 (32, 32, 3)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize(IMAGE_SHAPE[1::-1], Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).split("\n")[0] or type(e).__name__
        raise DatasetError(f"cannot read image {path}: {reason}") from None


def _list_split(classes: list[str], folders: dict[str, Path]) -> list[tuple[Path, int]]:
    """(file, label) for every image of a split, in class then file-name order."""
    return [(path, classes.index(name)) for name, folder in folders.items() for path in _image_files(folder)]


def _read_split(files: list[tuple[Path, int]], advance) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(files), *IMAGE_SHAPE), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        x[i] = read_image(path)
        advance(1)
    return x, np.array([label for _, label in files], dtype=np.int32)


def load(path: str | Path, seed: int = 0, progress: Progress | None = None) -> Dataset:
    """The image-folder dataset under `path` (see the module docstring for the layout)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"image folder {path} not found")
    train_folders = _class_folders(path / "train")
    test_folders = _class_folders(path / "test")
    classes = sorted(train_folders)
    extra = sorted(set(test_folders) - set(train_folders))
    if extra:
        raise DatasetError(f"test class folder {test_folders[extra[0]]} has no match in {path / 'train'}")

    train_files = _list_split(classes, train_folders)  # check every folder before reading images
    test_files = _list_split(classes, test_folders)
    step = progress_counter(progress, f"reading {path}", len(train_files) + len(test_files))
    train_x, train_y = _read_split(train_files, step)
    test_x, test_y = _read_split(test_files, step)

    order = np.random.default_rng(seed).permutation(len(train_y))
    return Dataset(f"folder:{path}", classes, train_x[order], train_y[order], test_x, test_y)
