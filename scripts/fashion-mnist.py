"""Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`) as an image folder raybench reads.

    python scripts/fashion-mnist.py /tmp/fmnist --train 10000 --test 2000

Writes `<out>/train/<class>/*.png` and `<out>/test/<class>/*.png`: 32 px RGB (the 28 px grey images padded by
2 px and repeated over three channels, so a CIFAR-shaped model reads them unchanged). The first N images of each
split are taken; Fashion-MNIST's splits are class-balanced and shuffled, so a prefix stays near balanced.
For benchmarks only: the tests never depend on this package.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def write_split(out: Path, split: str, prefix: str, n: int) -> None:
    images = read_idx(SOURCE / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:n]
    labels = read_idx(SOURCE / f"{prefix}-labels-idx1-ubyte.gz", 8)[:n]
    if len(images) < n:
        raise SystemExit(f"--{split} {n}: Fashion-MNIST's {split} split has only {len(images)} images")
    for name in CLASSES:
        (out / split / name).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        rgb = np.repeat(np.pad(img, 2)[:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(out / split / CLASSES[y] / f"{i:05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=10_000, help="training images, at most 60000 (default: 10000)")
    p.add_argument("--test", type=int, default=2_000, help="test images, at most 10000 (default: 2000)")
    a = p.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} is missing: apt-get install dataset-fashion-mnist")
    write_split(a.out, "train", "train", a.train)
    write_split(a.out, "test", "t10k", a.test)
    print(f"{a.out}: {a.train} training and {a.test} test images, {len(CLASSES)} classes, 32 px RGB")


if __name__ == "__main__":
    main()
