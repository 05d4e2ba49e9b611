"""A prepared store (``selfsup prepare`` + ``--dataset store:PATH``) against today's paths, side by side in one run.

Three comparisons on the generated 0.5-MP JPEG folder of ``benchmarks/imagefolder_throughput.py``:

1. loader alone (``batch_stream``, the training loop's DataLoader, ``--workers`` processes) at 96 px
   and 224 px: the PIL image folder vs a JPEG store prepared for that size (target >= 10x);
2. pre-training at ``--pretrain-size`` (64-96 px): streamed from the store vs the same run from
   memory (the same store read whole into RAM first; target >= 0.9x); ``--nvjpeg`` adds, on a CUDA
   device, nvJPEG batch decoding of that store;
3. ``selfsup prepare`` of ``--prepare-images`` images (``--prepare-images 100000`` is the full
   figure): images/s and peak RSS (this process and its decoding workers) vs decoding every file
   once with PIL (full decode, same number of processes) and vs one epoch of the folder loader's own
   decoding (PIL draft + resize, what ``imagefolder:PATH`` pays every epoch).

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/store_throughput.py                  # all three, small
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/store_throughput.py --only prepare --prepare-images 100000

Data goes under ``--root`` (default a temporary folder in /tmp). Each line printed is one JSON result.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagefolder_throughput import make_jpeg_folder, measure_loader  # noqa: E402  (the same generator and loader)


def _loader(name: str, image_size: int, batch_size: int, workers: int, steps: int) -> float:
    import torch

    from selfsup.data.datasets import load_dataset
    from selfsup.training.steps import batch_stream

    dataset = load_dataset(name, "train", image_size=image_size, in_memory=False)
    stream = batch_stream(dataset, batch_size, 0, 0, steps + 1, workers, torch.device("cpu"))
    next(stream)  # worker start-up and the first batch are not timed
    t0, n = time.perf_counter(), 0
    for images in stream:
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def bench_loader(folder: Path, root: Path, sizes: list[int], workers: int, batch_size: int, steps: int) -> None:
    from selfsup.data.prepare import prepare_store

    for size in sizes:
        store, raw = root / f"store{size}", root / f"store{size}raw"
        prepare_store(f"imagefolder:{folder}", store, size=size, workers=workers, progress=False)
        prepare_store(f"imagefolder:{folder}", raw, size=size, format="raw", workers=workers, progress=False)
        pil = measure_loader(folder, size, batch_size, workers, steps)["loader_images_per_sec"]
        fast = _loader(f"store:{store}", size, batch_size, workers, steps * 4)
        fast_raw = _loader(f"store:{raw}", size, batch_size, workers, steps * 4)
        print(json.dumps({"bench": "loader", "image_size": size, "workers": workers, "batch_size": batch_size,
                          "imagefolder_pil_images_per_s": round(pil, 1), "store_jpeg_images_per_s": round(fast, 1),
                          "ratio": round(fast / pil, 1), "store_raw_images_per_s": round(fast_raw, 1),
                          "ratio_raw": round(fast_raw / pil, 1)}), flush=True)


def _pretrain(name: str, size: int, batch_size: int, steps: int, workers: int, run: Path, backbone: str | None,
              device: str, in_memory: bool) -> float:
    from selfsup.training import loop as train
    from selfsup.training.config import PretrainConfig, build_config
    from selfsup.data.datasets import load_dataset

    layer = {"dataset": name, "image_size": size, "batch_size": batch_size, "steps": steps, "num_workers": workers,
             "knn_monitor": False, "log_every": 1, "checkpoint_every": steps + 1, "device": device}
    if backbone:
        layer["backbone"] = backbone
    cfg = build_config(PretrainConfig, layer)
    # The in-memory run reads the very same store whole into RAM (the GPU, when it fits) first.
    train.load_dataset = (lambda *a, **k: load_dataset(*a, **{**k, "in_memory": True})) if in_memory else load_dataset
    try:
        train.pretrain(cfg, run, progress=False)
    finally:
        train.load_dataset = load_dataset
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["images_per_sec"] for r in rows if "images_per_sec" in r][1:])


def bench_pretrain(folder: Path, root: Path, size: int, batch_size: int, steps: int, workers: int,
                   backbone: str | None = None, device: str = "auto") -> None:
    from selfsup.data.prepare import prepare_store

    store = root / f"store{size}"
    prepare_store(f"imagefolder:{folder}", store, size=size, workers=workers, progress=False)
    common = (f"store:{store}", size, batch_size, steps, workers)
    memory = _pretrain(*common, root / "run_memory", backbone, device, in_memory=True)
    streamed = _pretrain(*common, root / "run_store", backbone, device, in_memory=False)
    print(json.dumps({"bench": "pretrain", "image_size": size, "backbone": backbone or "default",
                      "batch_size": batch_size, "steps": steps, "workers": workers, "device": device,
                      "memory_images_per_s": round(memory, 1), "store_images_per_s": round(streamed, 1),
                      "ratio": round(streamed / memory, 2)}), flush=True)


def bench_nvjpeg(root: Path, size: int, batch_size: int, steps: int) -> None:
    """GPU only: batches of the store's JPEG bytes decoded by nvJPEG (selfsup.data.store.decode_jpeg_batch)."""
    import torch

    from selfsup.data.store import StoreDataset, decode_jpeg_batch

    store = StoreDataset(root / f"store{size}")
    batches = [[store.sample((s * batch_size + i) % len(store))["image"] for i in range(batch_size)]
               for s in range(steps + 1)]
    decode_jpeg_batch(batches[0], "cuda", store.num_channels)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[1:]:
        decode_jpeg_batch(b, "cuda", store.num_channels)
    torch.cuda.synchronize()
    print(json.dumps({"bench": "nvjpeg", "image_size": size, "batch_size": batch_size,
                      "decode_images_per_s": round(steps * batch_size / (time.perf_counter() - t0), 1)}), flush=True)


def _pil_decode(path: str) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB").size[0]


def _folder_decode(job: tuple[str, int]) -> int:
    from selfsup.data.folders import decode_image  # what imagefolder:PATH does per image and epoch (draft + resize)

    return decode_image(Path(job[0]), job[1], 3).shape[-1]


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the pools' workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``: on a shared CPU the second is the steadier measure of work."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0


def bench_prepare(folder: Path, root: Path, size: int, workers: int) -> None:
    from selfsup.data.containers import default_load_size
    from selfsup.data.prepare import prepare_store

    files = sorted(str(p) for p in folder.iterdir())
    n = len(files)

    def pool_over(fn, jobs):
        with get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(fn, jobs, chunksize=16):
                pass

    # The engine's import is a fixed cost once per process (seconds of CPU here): timed apart, not per image.
    from selfsup.data.store import mds_engine

    import_wall, _ = _timed(mds_engine)
    pil_wall, pil_cpu = _timed(lambda: pool_over(_pil_decode, files))
    load = default_load_size(size)
    folder_wall, folder_cpu = _timed(lambda: pool_over(_folder_decode, [(f, load) for f in files]))
    shutil.rmtree(root / "prepared", ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = _timed(lambda: prepare_store(f"imagefolder:{folder}", root / "prepared", size=size, workers=workers,
                                             progress=False))
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    print(json.dumps({"bench": "prepare", "images": n, "image_size": size, "workers": workers,
                      "pil_decode_once_images_per_s": round(n / pil_wall, 1), "prepare_images_per_s": round(n / wall, 1),
                      "ratio": round(pil_wall / wall, 2),
                      "folder_loader_decode_images_per_s": round(n / folder_wall, 1),
                      "ratio_to_folder_loader": round(folder_wall / wall, 2),
                      "cpu_ms_per_image": {"pil_decode_once": round(1e3 * pil_cpu / n, 2),
                                           "folder_loader_decode": round(1e3 * folder_cpu / n, 2),
                                           "prepare": round(1e3 * cpu / n, 2)},
                      "cpu_ratio": round(pil_cpu / cpu, 2),
                      "peak_rss_mb_main": round(rss_self), "peak_rss_mb_main_before_prepare": round(before / 1024),
                      "peak_rss_mb_largest_child": round(rss_child),
                      "store_mb": round(manifest["splits"]["train"]["bytes"] / 1e6, 1),
                      "engine_import_s": round(import_wall, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("loader", "pretrain", "prepare"), action="append",
                    help="run only these comparisons (repeatable; default all three)")
    ap.add_argument("--num-images", type=int, default=800, help="JPEGs for the loader and pre-training comparisons")
    ap.add_argument("--prepare-images", type=int, default=2000, help="JPEGs for the prepare comparison (full: 100000)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    ap.add_argument("--pretrain-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loader-steps", type=int, default=6)
    ap.add_argument("--pretrain-steps", type=int, default=8)
    ap.add_argument("--backbone", help="pre-training backbone (default: the CPU default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nvjpeg", action="store_true", help="also time nvJPEG batch decoding of the store (CUDA only)")
    ap.add_argument("--root", help="keep data here (default: a temporary folder under /tmp)")
    args = ap.parse_args()
    only = args.only or ["loader", "pretrain", "prepare"]
    root = Path(args.root or tempfile.mkdtemp(prefix="selfsup-store-bench-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}), flush=True)
    try:
        if "loader" in only or "pretrain" in only:
            folder = root / "jpegs"
            print(json.dumps({"folder": make_jpeg_folder(folder, args.num_images)}), flush=True)
            if "loader" in only:
                bench_loader(folder, root, args.sizes, args.workers, args.batch_size, args.loader_steps)
            if "pretrain" in only:
                bench_pretrain(folder, root, args.pretrain_size, args.batch_size, args.pretrain_steps, args.workers,
                               args.backbone, args.device)
                if args.nvjpeg:
                    bench_nvjpeg(root, args.pretrain_size, args.batch_size, args.pretrain_steps)
        if "prepare" in only:
            folder = root / f"jpegs{args.prepare_images}"
            print(json.dumps({"prepare_folder": make_jpeg_folder(folder, args.prepare_images)}), flush=True)
            bench_prepare(folder, root, args.sizes[-1], args.workers)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"load_average_1min_end": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
