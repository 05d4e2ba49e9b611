"""A prepared store (``selfsup prepare`` + ``--dataset store:PATH``) against today's paths, side by side in one run.

Three comparisons on the generated 0.5-MP JPEG folder of ``benchmarks/imagefolder_throughput.py``:

1. loader alone (``batch_stream``, the training loop's DataLoader, ``--workers`` processes) at 96 px
   and 224 px: the PIL image folder vs a JPEG store prepared for that size (target >= 10x);
2. pre-training at ``--pretrain-size`` (64-96 px): streamed from the store vs the same run from
   memory (the same store read whole into RAM first; target >= 0.9x); ``--nvjpeg`` adds, on a CUDA
   device, nvJPEG batch decoding of that store;
3. ``selfsup prepare`` of ``--prepare-images`` images (``--prepare-images 100000 --prepare-distinct 3000``
   is the full figure), run in a child process: images/s and peak RSS (its main process and its
   largest decoding worker) vs decoding every file once with PIL (full-size ``load()``, no draft; in
   ``--workers`` processes, the target's reference, and in one process) and vs one epoch of the
   folder loader's own decoding (PIL draft + resize, what ``imagefolder:PATH`` pays every epoch).

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/store_throughput.py                  # all three, small
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/store_throughput.py --only prepare --prepare-images 100000 \\
        --prepare-distinct 3000 --no-folder-epoch

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
from imagefolder_throughput import make_jpeg_folder  # noqa: E402  (the same generator)


def _loader(name: str, image_size: int, batch_size: int, workers: int, steps: int,
            channels: int | None = None) -> tuple[float, float]:
    """Images/s out of ``batch_stream`` over ``steps`` batches, after ``max(1, workers)`` untimed ones.

    The workers start together, so the first ``workers`` batches arrive together: timing from the
    first one (as ``imagefolder_throughput.measure_loader`` does) counts the second worker's batch as
    free, which inflates a short run (6 batches: up to 6/5) far more than a long one (24: 24/23).
    """
    import torch

    from selfsup.data.datasets import load_dataset
    from selfsup.training.batches import batch_stream

    warm = max(1, workers)
    folder = {"num_channels": channels} if name.startswith("imagefolder:") else {}  # a store has its own
    dataset = load_dataset(name, "train", image_size=image_size, in_memory=False, **folder)
    c0 = _cpu_seconds()
    stream = batch_stream(dataset, batch_size, 0, 0, steps + warm, workers, torch.device("cpu"))
    for _ in range(warm):
        next(stream)  # worker start-up and each worker's first batch are not timed
    t0, n = time.perf_counter(), 0
    for images in stream:
        n += images.shape[0]
    rate = n / (time.perf_counter() - t0)
    # CPU of this process and the (finished, so counted) workers over the whole stream, start-up included:
    # the steadier figure on a loaded CPU, where wall-clock rates swing with the load.
    return rate, 1e3 * (_cpu_seconds() - c0) / (n + warm * batch_size)


def bench_loader(folder: Path, root: Path, sizes: list[int], workers: int, batch_size: int, steps: int,
                 repeats: int = 3, store_factor: int = 10, channels: int = 3) -> None:
    """Each size: the folder and the two stores measured in turn ``repeats`` times; medians and their ratios."""
    from selfsup.data.prepare import prepare_store

    for size in sizes:
        store, raw = root / f"store{size}", root / f"store{size}raw"
        prepare_store(f"imagefolder:{folder}", store, size=size, workers=workers, progress=False, num_channels=channels)
        prepare_store(f"imagefolder:{folder}", raw, size=size, format="raw", workers=workers, progress=False,
                      num_channels=channels)
        runs, cpu = {"pil": [], "jpeg": [], "raw": []}, {"pil": [], "jpeg": [], "raw": []}
        for _ in range(repeats):  # interleaved, so a change in the machine's load hits every line alike
            # The stores time ~10x the batches: a window as long as the folder's, not a fraction of a second.
            for key, name, n in (("pil", f"imagefolder:{folder}", steps), ("jpeg", f"store:{store}", steps * store_factor),
                                 ("raw", f"store:{raw}", steps * store_factor)):
                rate, ms = _loader(name, size, batch_size, workers, n, channels)
                runs[key].append(rate)
                cpu[key].append(ms)
        pil, fast, fast_raw = (statistics.median(runs[k]) for k in ("pil", "jpeg", "raw"))
        print(json.dumps({"bench": "loader", "image_size": size, "channels": channels, "workers": workers,
                          "batch_size": batch_size,
                          "timed_batches": {"folder": steps, "store": steps * store_factor}, "repeats": repeats,
                          "imagefolder_pil_images_per_s": round(pil, 1), "store_jpeg_images_per_s": round(fast, 1),
                          "ratio": round(fast / pil, 1), "store_raw_images_per_s": round(fast_raw, 1),
                          "ratio_raw": round(fast_raw / pil, 1),
                          "runs_images_per_s": {k: [round(v, 1) for v in r] for k, r in runs.items()},
                          "cpu_ms_per_image": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
                          "cpu_ratio": round(statistics.median(cpu["pil"]) / statistics.median(cpu["jpeg"]), 1),
                          "load_average_1min": round(os.getloadavg()[0], 2)}), flush=True)


def _pretrain(name: str, size: int, batch_size: int, steps: int, workers: int, run: Path, backbone: str | None,
              device: str, in_memory: bool) -> float:
    from selfsup.training import loop as train
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config
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
                   backbone: str | None = None, device: str = "auto", channels: int = 3) -> None:
    from selfsup.data.prepare import prepare_store

    store = root / f"store{size}"
    prepare_store(f"imagefolder:{folder}", store, size=size, workers=workers, progress=False, num_channels=channels)
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
    """The reference: one full-size PIL decode of a file (no draft), as a plain PIL loop would do it.

    ``load()`` decodes; a gray file is then converted to RGB (what a 3-channel reader needs). An RGB
    file is not copied again (``convert("RGB")``, used before, copied every decoded image: ~0.3 ms
    more per file, which made the reference slower than a decode).
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return (img if img.mode == "RGB" else img.convert("RGB")).size[0]


def _folder_decode(job: tuple[str, int]) -> int:
    from selfsup.data.folders import decode_image  # what imagefolder:PATH does per image and epoch (draft + resize)

    return decode_image(Path(job[0]), job[1], 3).shape[-1]


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the pools' workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``: on a loaded CPU the second is the steadier measure of work."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0


# Run in a fresh process, so its peak RSS is prepare's own (and its decoding workers'), not this
# benchmark's: imports first (a fixed cost, reported apart), then prepare_store timed. Peak RSS is read
# from /proc (VmHWM, per address space: getrusage's ru_maxrss survives exec and would report this
# benchmark's own peak), the workers' sampled every 0.2 s.
_PREPARE_CHILD = """
import json, os, resource, sys, threading, time
t0 = time.perf_counter()
from selfsup.data.prepare import prepare_store
from selfsup.data.store import mds_engine
mds_engine()
imports = time.perf_counter() - t0
def cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
def status(pid, key):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
def children(pid):
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []
peak = {"total": 0.0, "worker": 0.0}
done = threading.Event()
def sample():  # every 0.2 s: this process's RSS plus its decoding workers' (shared pages counted in each)
    me = os.getpid()
    while not done.wait(0.2):
        kids = [status(k, "VmRSS") for k in children(me)]
        peak["total"] = max(peak["total"], status(me, "VmRSS") + sum(kids))
        peak["worker"] = max([peak["worker"]] + kids)
threading.Thread(target=sample, daemon=True).start()
rss_before = status("self", "VmHWM")
t0, c0 = time.perf_counter(), cpu()
prepare_store("imagefolder:" + sys.argv[1], sys.argv[2], size=int(sys.argv[3]), workers=int(sys.argv[4]), progress=False)
wall, used = time.perf_counter() - t0, cpu() - c0
done.set()
print(json.dumps({"wall": wall, "cpu": used, "imports_s": imports, "rss_main_before_mb": rss_before,
                  "rss_main_mb": status("self", "VmHWM"), "rss_largest_worker_mb": peak["worker"],
                  "rss_main_plus_workers_mb": peak["total"]}))
"""


def bench_prepare(folder: Path, root: Path, size: int, workers: int, folder_epoch: bool = True,
                  repeats: int = 1) -> None:
    """The prepare comparison; with ``repeats`` > 1 the lines run in turn that many times (medians)."""
    import subprocess

    from selfsup.data.containers import default_load_size

    files = sorted(str(p) for p in folder.iterdir())
    n = len(files)

    def pool_over(fn, jobs):
        with get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(fn, jobs, chunksize=16):
                pass

    def prepare_child() -> tuple[float, float, dict]:
        shutil.rmtree(root / "prepared", ignore_errors=True)
        src = str(Path(__file__).resolve().parent.parent / "src")
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, "-c", _PREPARE_CHILD, str(folder), str(root / "prepared"), str(size),
                               str(workers)], env=env, check=True, capture_output=True, text=True)
        child = json.loads(done.stdout.strip().splitlines()[-1])
        return child["wall"], child["cpu"], child

    load = default_load_size(size)
    lines = {"pil": lambda: _timed(lambda: pool_over(_pil_decode, files)),
             "pil_1": lambda: _timed(lambda: [_pil_decode(f) for f in files]),
             "prepare": prepare_child}
    if folder_epoch:
        lines["folder"] = lambda: _timed(lambda: pool_over(_folder_decode, [(f, load) for f in files]))
    t0 = time.perf_counter()
    for f in files:  # one untimed read of every file: the first timed line must not be the only one reading the disk
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass
    warm_s = time.perf_counter() - t0
    walls, cpus, load_avg, child = {k: [] for k in lines}, {k: [] for k in lines}, [os.getloadavg()[0]], {}
    for _ in range(repeats):
        for key, fn in lines.items():
            out = fn()
            walls[key].append(out[0])
            cpus[key].append(out[1])
            if key == "prepare":
                child = out[2]
            load_avg.append(os.getloadavg()[0])
    w = {k: statistics.median(v) for k, v in walls.items()}
    c = {k: statistics.median(v) for k, v in cpus.items()}
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    row = {"bench": "prepare", "images": n, "image_size": size, "workers": workers, "repeats": repeats,
           "pil_decode_once_images_per_s": round(n / w["pil"], 1),
           "pil_decode_once_1_process_images_per_s": round(n / w["pil_1"], 1),
           "prepare_images_per_s": round(n / w["prepare"], 1),
           "ratio": round(w["pil"] / w["prepare"], 2), "ratio_to_1_process_pil": round(w["pil_1"] / w["prepare"], 2),
           "cpu_ms_per_image": {"pil_decode_once": round(1e3 * c["pil"] / n, 2),
                                "pil_decode_once_1_process": round(1e3 * c["pil_1"] / n, 2),
                                "prepare": round(1e3 * c["prepare"] / n, 2)},
           "cpu_ratio": round(c["pil"] / c["prepare"], 2),
           "runs_images_per_s": {k: [round(n / x, 1) for x in v] for k, v in walls.items()},
           "peak_rss_mb_prepare_main": round(child["rss_main_mb"]),
           "peak_rss_mb_prepare_main_after_imports": round(child["rss_main_before_mb"]),
           "peak_rss_mb_largest_worker": round(child["rss_largest_worker_mb"]),
           "peak_rss_mb_main_plus_workers": round(child["rss_main_plus_workers_mb"]),
           "store_mb": round(manifest["splits"]["train"]["bytes"] / 1e6, 1),
           "prepare_imports_s": round(child["imports_s"], 1), "untimed_read_all_s": round(warm_s, 1),
           "load_average_1min": [round(x, 2) for x in load_avg]}
    if folder_epoch:
        row.update(folder_loader_decode_images_per_s=round(n / w["folder"], 1),
                   ratio_to_folder_loader=round(w["folder"] / w["prepare"], 2))
        row["cpu_ms_per_image"]["folder_loader_decode"] = round(1e3 * c["folder"] / n, 2)
    print(json.dumps(row), flush=True)


def make_copied_folder(folder: Path, num_images: int, distinct: int, pool_folder: Path) -> dict:
    """``num_images`` JPEGs in ``folder``: ``distinct`` generated ones (``make_jpeg_folder``), their bytes
    written again under new names for the rest (file ``i`` holds image ``i % distinct``). Every file is
    its own inode, read from disk or page cache like any other; only the content repeats."""
    stats = make_jpeg_folder(pool_folder, distinct)
    pool = sorted(pool_folder.iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        path = folder / f"img_{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(pool[i % distinct].read_bytes())
    return {**stats, "num_images": num_images, "distinct_images": distinct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("loader", "pretrain", "prepare"), action="append",
                    help="run only these comparisons (repeatable; default all three)")
    ap.add_argument("--num-images", type=int, default=800, help="JPEGs for the loader and pre-training comparisons")
    ap.add_argument("--prepare-images", type=int, default=2000, help="JPEGs for the prepare comparison (full: 100000)")
    ap.add_argument("--prepare-distinct", type=int,
                    help="generate only this many distinct JPEGs for the prepare comparison and write their bytes "
                         "again under new names up to --prepare-images (e.g. 3000 for the 100,000-file run)")
    ap.add_argument("--prepare-repeats", type=int, default=3,
                    help="prepare comparison: run its lines in turn this many times (medians; 1 for 100,000 files)")
    ap.add_argument("--no-folder-epoch", action="store_true",
                    help="prepare comparison: skip the line timing one epoch of the folder loader's decoding")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    ap.add_argument("--channels", type=int, choices=(1, 3), default=3,
                    help="loader comparison: decode as RGB (default) or gray. Forced, because detection probes 16 "
                         "evenly spread files and the generator makes every 10th file gray: with 800 files every "
                         "probe is gray, so the folder read as gray before")
    ap.add_argument("--pretrain-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loader-steps", type=int, default=6,
                    help="timed batches of the folder loader, after one per worker")
    ap.add_argument("--store-steps-factor", type=int, default=10, help="the stores time this many times as many batches")
    ap.add_argument("--loader-repeats", type=int, default=3, help="interleaved repeats of the loader lines (median)")
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
                bench_loader(folder, root, args.sizes, args.workers, args.batch_size, args.loader_steps,
                             args.loader_repeats, args.store_steps_factor, args.channels)
            if "pretrain" in only:
                bench_pretrain(folder, root, args.pretrain_size, args.batch_size, args.pretrain_steps, args.workers,
                               args.backbone, args.device, args.channels)
                if args.nvjpeg:
                    bench_nvjpeg(root, args.pretrain_size, args.batch_size, args.pretrain_steps)
        if "prepare" in only:
            folder = root / f"jpegs{args.prepare_images}"
            if args.prepare_distinct and args.prepare_distinct < args.prepare_images:
                folder = root / f"jpegs{args.prepare_images}_from{args.prepare_distinct}"
                made = make_copied_folder(folder, args.prepare_images, args.prepare_distinct,
                                          root / f"jpegs{args.prepare_distinct}")
            else:
                made = make_jpeg_folder(folder, args.prepare_images)
            print(json.dumps({"prepare_folder": made}), flush=True)
            bench_prepare(folder, root, args.sizes[-1], args.workers, folder_epoch=not args.no_folder_epoch,
                          repeats=args.prepare_repeats)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"load_average_1min_end": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
