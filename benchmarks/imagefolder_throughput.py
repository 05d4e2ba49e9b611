"""Images/s of pre-training on a folder of JPEGs streamed from disk (``--dataset imagefolder:PATH``).

Generates a folder of photo-like JPEGs of varied sizes and aspect ratios (10% gray) in a temporary
folder, then measures two figures on the CPU:

1. the loader alone: ``batch_stream`` (the training loop's DataLoader with the step-indexed batch
   sampler) decoding, resizing and centre-cropping in ``--workers`` worker processes;
2. pre-training: ``selfsup.training.loop.pretrain`` on that folder, median images/s over the logged steps
   (each image is two augmented views), so loading and compute overlap as in a real run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/imagefolder_throughput.py                # 2000 JPEGs, 224 px
    python benchmarks/imagefolder_throughput.py --num-images 500 --image-size 96 --steps 10
    python benchmarks/imagefolder_throughput.py --folder /tmp/jpegs               # keep the JPEGs for reruns

``measure(...)`` returns the figures as a dict, for ``benchmarks/throughput.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

_SIDES = (320, 480, 640, 800, 1024, 1280)  # longer side; ImageNet's photos average ~400 x 350
_ASPECTS = (4 / 3, 3 / 4, 16 / 9, 1.0, 3 / 2)


def _photo(i: int) -> Image.Image:
    """A photo-like image: smooth colour regions plus fine texture (JPEG sizes like real photos)."""
    rng = np.random.default_rng(i)
    side = int(rng.choice(_SIDES))
    aspect = float(rng.choice(_ASPECTS))
    w, h = (side, int(side / aspect)) if aspect >= 1 else (int(side * aspect), side)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    texture = rng.normal(0, 6, (h, w, 1))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert("L") if i % 10 == 0 else image


def make_jpeg_folder(folder: Path, num_images: int, threads: int = 4) -> dict:
    """Write ``num_images`` JPEGs into ``folder`` (flat, unlabeled); returns size statistics."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> tuple[int, int, int]:
        path = folder / f"img_{i:05d}.jpg"
        if not path.exists():
            _photo(i).save(path, quality=90)
        with Image.open(path) as im:
            return im.size[0], im.size[1], path.stat().st_size

    with ThreadPoolExecutor(threads) as pool:
        stats = list(pool.map(write, range(num_images)))
    pixels = [w * h for w, h, _ in stats]
    return {"num_images": num_images, "mean_megapixels": round(statistics.mean(pixels) / 1e6, 3),
            "mean_kb": round(statistics.mean(s for _, _, s in stats) / 1024, 1)}


def measure_loader(folder: Path, image_size: int, batch_size: int, workers: int, steps: int) -> dict:
    """Images/s through the training loop's DataLoader (decode + resize + crop in workers), no model."""
    import torch

    from selfsup.data.datasets import load_dataset
    from selfsup.training.batches import batch_stream

    dataset = load_dataset(f"imagefolder:{folder}", "train", image_size=image_size, in_memory=False)
    stream = batch_stream(dataset, batch_size, 0, 0, steps + 1, workers, torch.device("cpu"))
    first = next(stream)  # worker start-up and the first batch are not timed
    t0 = time.perf_counter()
    n = 0
    for images in stream:
        n += images.shape[0]
    seconds = time.perf_counter() - t0
    return {"loader_images_per_sec": round(n / seconds, 1), "load_size": int(first.shape[-1]), "timed_images": n}


def measure_pretrain(folder: Path, image_size: int, batch_size: int, workers: int, steps: int, backbone: str | None,
                     run_dir: Path) -> dict:
    """Median images/s of ``pretrain`` streaming the folder (the first logged step excluded)."""
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config
    from selfsup.training.loop import pretrain

    layer = {"dataset": f"imagefolder:{folder}", "image_size": image_size, "batch_size": batch_size, "steps": steps,
             "num_workers": workers, "knn_monitor": False, "log_every": 1, "checkpoint_every": steps + 1}
    if backbone:
        layer["backbone"] = backbone
    cfg = build_config(PretrainConfig, layer)
    t0 = time.perf_counter()
    pretrain(cfg, run_dir, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ips = [r["images_per_sec"] for r in rows if "images_per_sec" in r][1:]
    return {"pretrain_images_per_sec": round(statistics.median(ips), 1), "backbone": cfg.backbone,
            "pretrain_wall_sec": round(wall, 1), "steps": steps}


def measure(num_images: int = 2000, image_size: int = 224, batch_size: int = 64, workers: int = 2,
            loader_steps: int = 20, pretrain_steps: int = 12, backbone: str | None = None,
            folder: str | Path | None = None) -> dict:
    """Generate (or reuse) the JPEG folder and measure loader-only and pre-training images/s."""
    with tempfile.TemporaryDirectory(prefix="selfsup-imagefolder-") as tmp:
        folder = Path(folder) if folder else Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        result = make_jpeg_folder(folder, num_images)
        result["generate_sec"] = round(time.perf_counter() - t0, 1)
        result.update(image_size=image_size, batch_size=batch_size, workers=workers)
        result.update(measure_loader(folder, image_size, batch_size, workers, loader_steps))
        result.update(measure_pretrain(folder, image_size, batch_size, workers, pretrain_steps, backbone,
                                       Path(tmp) / "run"))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    result.update(cpus=os.cpu_count(), load_average_1min=round(load, 2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-steps", type=int, default=20, help="batches timed for the loader-only figure")
    p.add_argument("--steps", type=int, default=12, help="pre-training steps (the first is not counted)")
    p.add_argument("--backbone", help="default: the CPU default backbone")
    p.add_argument("--folder", help="generate into / reuse this folder instead of a temporary one")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line only")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    r = measure(args.num_images, args.image_size, args.batch_size, args.workers, args.loader_steps, args.steps,
                args.backbone, args.folder)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"image folder: {r['num_images']} JPEGs, mean {r['mean_megapixels']} MP, {r['mean_kb']} KB "
          f"(generated in {r['generate_sec']} s)")
    print(f"loader only ({r['workers']} workers, decode + resize to {r['load_size']} px): "
          f"{r['loader_images_per_sec']} images/s")
    print(f"pre-training ({r['backbone']}, {r['image_size']} px, batch {r['batch_size']}, {r['workers']} workers, "
          f"streamed from disk): {r['pretrain_images_per_sec']} images/s (two views each)")
    print(f"machine: {r['cpus']} CPUs, load average {r['load_average_1min']} (shared CPUs lower both figures)")
    print(json.dumps(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
