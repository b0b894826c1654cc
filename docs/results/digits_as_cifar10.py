"""Write scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes) as a CIFAR-10 binary set.

    pip install scikit-learn
    python docs/results/digits_as_cifar10.py data/digits-cifar10
    minasgd train --dataset cifar10 --data-root data/digits-cifar10 --epochs 30

A second, real dataset the project never tuned on, in the format of the paper's next step up
(`minasgd.data.cifar10`): each digit is scaled up 4x (nearest neighbour) to 32x32, its 17 grey
levels stretched to 0-255 and copied into the three colour channels. The images are shuffled
with a fixed seed and split 1,500 train (data_batch_1..5, 300 each) / 297 test.
"""

import sys
from pathlib import Path

import numpy as np


def main(out):
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (n, 8, 8), 0..255
    images = images.repeat(4, axis=1).repeat(4, axis=2)  # (n, 32, 32)
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], digits.target[order].astype(np.uint8)
    chw = np.repeat(images[:, None], 3, axis=1).reshape(len(images), -1)  # R, G, B planes alike
    records = np.concatenate([labels[:, None], chw], axis=1)  # 3073 bytes each, as CIFAR-10
    folder = Path(out) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        records[i * 300:(i + 1) * 300].tofile(folder / f"data_batch_{i + 1}.bin")
    records[1500:].tofile(folder / "test_batch.bin")
    (folder / "batches.meta.txt").write_text("".join(f"{d}\n" for d in range(10)))
    print(f"wrote {len(records)} digits to {folder} (1500 train, {len(records) - 1500} test)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/digits-cifar10")
