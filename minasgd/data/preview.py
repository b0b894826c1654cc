"""A picture of a dataset: one row per class, a few train images each (`minasgd data --preview`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .dataset import Dataset, DatasetError


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
