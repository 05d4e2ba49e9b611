"""Regenerate ``src/selfsup/assets/fashion_mnist_sample.npz``.

The embedded sample is a class-balanced subset of the real Fashion-MNIST (MIT licence,
Copyright (c) 2017 Zalando SE): 1000 training and 200 test images per class, chosen with a
fixed seed so the file is reproducible bit for bit. It lets ``load_dataset("embedded")`` work on
any machine without downloads.

Usage::

    python scripts/make_embedded_sample.py                      # reads /usr/share/datasets/fashion-mnist
    python scripts/make_embedded_sample.py --source DIR --seed 0 --out PATH
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "selfsup" / "assets" / "fashion_mnist_sample.npz"
NUM_CLASSES = 10


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0x0000 + dtype byte 0x08 (uint8) + ndim, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced_choice(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices with exactly ``per_class`` samples of each class, drawn without replacement."""
    chosen = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(NUM_CLASSES)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, prefix, per_class in (
        ("train", "train", args.train_per_class),
        ("test", "t10k", args.test_per_class),
    ):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        idx = balanced_choice(labels, per_class, rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[idx], dtype=np.uint8)
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[idx], dtype=np.uint8)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    sizes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {sizes}")


if __name__ == "__main__":
    main()
