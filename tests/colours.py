"""A tiny, easy dataset for the parameter-server tests: each class is a colour, plus noise."""

import numpy as np

CLASSES = [f"c{i}" for i in range(10)]
COLOURS = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                    (0, 255, 255), (255, 255, 255), (128, 128, 128), (255, 128, 0)])


def colour_images(n, seed):
    """n noisy 32x32 images whose colour gives the class: (uint8 NHWC images, int32 labels)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = COLOURS[y][:, None, None, :] + rng.normal(0, 20, (n, 32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8), y
