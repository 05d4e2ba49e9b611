"""``selfsup prepare``: decode an image folder once into a sharded store (see :mod:`selfsup.data.store`).

One pass over the folder (flat, class sub-folders, or ``train/`` + ``val/``/``test/`` splits, as
``imagefolder:PATH`` reads it): every image becomes the streamed image folder's image
(:func:`selfsup.data.folders.decode_image`: EXIF rotation, RGB or gray, shorter side resized to the
load size, centre square), stored as raw pixels (``--format raw``: decoded exactly as the folder
decodes it, bit-identical, bigger) or re-encoded as a JPEG at that size (``--format jpeg``, the
default: ~10x smaller, decoded with libjpeg-turbo at training time). For ``--format jpeg`` a JPEG
source takes a faster path to the same image within resampling tolerance
(:func:`_jpeg_at_load_size`: the folder's DCT-scaled decode, done by libjpeg-turbo, and torch's
antialiased bicubic resize). The load size is the one the training size needs, ``size * 256 / 224``
(256 for 224; ``size`` itself at 32 px and below, :func:`selfsup.data.containers.default_load_size`).

Resumable: the images are written in parts of ``part_size`` (default 4096), each a folder of the
engine's shards finished by a ``done.json``; an interrupted run, started again with the same
command, keeps the finished parts and redoes only the rest. Memory stays bounded by one part's
worth of in-flight images whatever the folder's size. Bad images follow ``--on-bad-image``
exactly as training from the folder does (:func:`selfsup.data.image_checks.scan_images` before
anything is written; a file that still fails to decode is named (``error``) or left out and
reported (``skip``)).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from selfsup.data.containers import IMAGEFOLDER_PREFIX, MEAN_STD, default_load_size
from selfsup.data.folders import (
    class_folders, decode_image, detect_channels, is_image_file, resolve_split_folder, scan_image_folder,
)
from selfsup.data.image_checks import check_policy, scan_images
from selfsup.data.store import MANIFEST, SAFE_ENCODINGS, STORE_FORMATS, STORE_VERSION, mds_engine
from selfsup.errors import DataNotFoundError, BadImageError, DataError

__all__ = ["prepare_store"]

DEFAULT_SIZE = 224
DEFAULT_PART_SIZE = 4096
SHARD_BYTES = 1 << 26  # 64 MB shards, the engine's default


# EXIF orientation -> the PIL transpose ImageOps.exif_transpose applies (the same table).
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


def _jpeg_draft_decode(data: bytes, load_size: int, channels: int) -> tuple[np.ndarray, int] | None:
    """``(pixels (H, W, C) uint8, EXIF orientation)`` of an RGB or gray JPEG, or ``None`` for the PIL path.

    libjpeg-turbo (simplejpeg) decodes at the DCT scale PIL's ``draft`` picks for ``load_size``: the
    largest of 1/8, 1/4, 1/2 that keeps both sides >= ``load_size`` (``JpegImagePlugin.draft``), so the
    pixels are the ones the folder's drafted decode gets (bit-identical; the tests check it). ``None``
    for anything else: not a JPEG, CMYK/YCCK, or any failure, whose message PIL then gives.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    import io

    import simplejpeg
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # header only: format, mode, size, EXIF; PIL's bomb check
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            (w, h), orientation = img.size, img.getexif().get(0x0112, 1)
        fit = min(w // load_size, h // load_size)
        scale = next((s for s in (8, 4, 2) if fit >= s), 1)
        # The smallest libjpeg-turbo output at least ceil(side / scale) is exactly the 1/scale one.
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB",
                                        min_height=-(-h // scale) if scale > 1 else 0,
                                        min_width=-(-w // scale) if scale > 1 else 0)
    except Exception:  # noqa: BLE001 - any problem: the PIL path decodes it or names the problem
        return None
    if pixels.shape != (-(-h // scale), -(-w // scale), channels):
        return None
    return pixels, orientation


def _jpeg_at_load_size(data: bytes, load_size: int, channels: int) -> np.ndarray | None:
    """An RGB or gray JPEG to ``(L, L, C)`` uint8 pixels, or ``None`` (the caller decodes with PIL).

    The ``--format jpeg`` fast path, the image :func:`selfsup.data.folders.decode_image` gives within
    resampling tolerance: :func:`_jpeg_draft_decode`, the centre square cropped at whole pixels (the
    folder's box may start half a pixel further) and resized to ``L`` by torch's antialiased bicubic
    (PIL's filter, a=-0.5, vectorised for uint8: ~3x cheaper than PIL's resize here), then the EXIF
    orientation applied to the ``L x L`` result (cropping and resizing a square commute with it).
    """
    decoded = _jpeg_draft_decode(data, load_size, channels)
    if decoded is None:
        return None
    import torch
    from PIL import Image

    pixels, orientation = decoded
    side = min(pixels.shape[:2])
    y, x = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    # (1, C, H, W) with channels-last strides (built from (1, H, W, C), so the batch stride is H*W*C too)
    square = torch.from_numpy(pixels)[None].permute(0, 3, 1, 2)[:, :, y:y + side, x:x + side]
    if side != load_size:
        square = torch.nn.functional.interpolate(square.contiguous(memory_format=torch.channels_last),
                                                 size=(load_size, load_size), mode="bicubic", antialias=True)
    out = square[0].permute(1, 2, 0).numpy()  # (L, L, C); channels-last in, channels-last out: no copy
    method = _ORIENTATION.get(orientation)
    if method is not None:
        flat = Image.fromarray(np.ascontiguousarray(out[..., 0] if channels == 1 else out))
        out = np.asarray(flat.transpose(getattr(Image.Transpose, method))).reshape(load_size, load_size, channels)
    return np.ascontiguousarray(out)


def _worker_init() -> None:
    """Each decoding process runs one torch thread: the pool already uses every core."""
    import torch

    torch.set_num_threads(1)


def _encode(job: tuple[str, int, int, str, int]) -> tuple[bytes | None, str | None]:
    """One file to stored bytes, in a worker process: ``(bytes, None)`` or ``(None, problem)``.

    ``raw``: the folder's own decode (:func:`decode_image`), bit-identical to ``imagefolder:PATH``.
    ``jpeg``: JPEG sources take :func:`_jpeg_at_load_size`; other files and its refusals take the
    folder's decode. Either way the ``(L, L, C)`` pixels are encoded by libjpeg-turbo.
    """
    path, load_size, channels, fmt, quality = job
    pixels = None
    if fmt == "jpeg":
        try:
            pixels = _jpeg_at_load_size(Path(path).read_bytes(), load_size, channels)
        except OSError:
            pixels = None  # unreadable: the folder's decode names the problem
    if pixels is None:
        try:
            image = decode_image(Path(path), load_size, channels)
        except OSError as err:
            return None, str(err)
        if fmt == "raw":
            return image.numpy().tobytes(), None
        pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    import simplejpeg  # the store extra: libjpeg-turbo, as the reader's decoder

    gray = pixels.shape[-1] == 1
    return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="GRAY" if gray else "RGB",
                                  colorsubsampling="Gray" if gray else "420"), None


def _require_store_extra() -> None:
    """A one-line error naming the extra, before any work, when the engine or the JPEG codec is missing."""
    mds_engine()  # raises the one-line error itself
    try:
        import simplejpeg  # noqa: F401
    except ImportError as err:
        raise DataError(f"selfsup prepare needs the store extra ({err}); install it: pip install 'selfsup[store]'") from err


def _splits(path: Path) -> list[tuple[str, Path, list[str] | None]]:
    """``[(split, folder, classes to use or None)]`` for a source folder, as ``imagefolder:`` reads it."""
    folder, _ = resolve_split_folder(path, "train")
    out = [("train", folder, None)]
    if (path / "train").is_dir() and any((path / h).is_dir() for h in ("val", "test")):
        held_out, train_folder = resolve_split_folder(path, "test")
        flat = any(is_image_file(e.name) for e in os.scandir(train_folder) if e.is_file())
        out.append(("test", held_out, None if flat else class_folders(train_folder)))
    return out


def _list_digest(files: list[Path], labels: list[int] | None) -> str:
    h = hashlib.sha1()
    for i, f in enumerate(files):
        h.update(os.fsencode(f) + b"\0" + str(-1 if labels is None else labels[i]).encode() + b"\n")
    return h.hexdigest()


def _write_part(part_dir: Path, jobs: list, files: list[Path], labels: list[int] | None, root: Path, pool,
                policy: str, bar) -> dict:
    """Encode and write one part; returns its summary (also saved as ``done.json``, which marks it finished)."""
    MDSWriter = mds_engine()[1]
    if part_dir.exists():
        shutil.rmtree(part_dir)  # a part interrupted half-way is written again from its start
    kept_labels, bad = [], []
    with MDSWriter(out=str(part_dir), columns=dict(SAFE_ENCODINGS), hashes=["sha1"], size_limit=SHARD_BYTES,
                   progress_bar=False) as writer:
        for i, (data, problem) in enumerate(pool.imap(_encode, jobs, chunksize=32) if pool else map(_encode, jobs)):
            bar.update(1)
            if data is None:
                if policy == "error":
                    raise BadImageError(f"{files[i]} passed the scan but cannot be decoded: {problem}. Fix or remove it, "
                                        "or pass --on-bad-image skip; then run the same command again to resume")
                bad.append((str(files[i]), problem))
                continue
            label = -1 if labels is None else labels[i]
            writer.write({"image": data, "label": label, "name": str(files[i].relative_to(root))})
            kept_labels.append(label)
    np.save(part_dir / "labels.npy", np.asarray(kept_labels, dtype=np.int64), allow_pickle=False)
    summary = {"images": len(kept_labels), "bad": [{"file": f, "problem": p} for f, p in bad]}
    tmp = part_dir / "done.json.tmp"
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, part_dir / "done.json")  # atomic: a part is finished or it is not
    return summary


def _merge_split(split_dir: Path, parts: list[str]) -> dict:
    """One engine index over every part's shards (what ``streaming.base.util.merge_index`` writes), labels, checksums."""
    shards, labels, checksums, total = [], [], {}, 0
    for part in parts:
        for obj in json.loads((split_dir / part / "index.json").read_text())["shards"]:
            for key in ("raw_data", "zip_data"):
                if obj.get(key):
                    obj[key]["basename"] = f"{part}/{obj[key]['basename']}"
            checksums[obj["raw_data"]["basename"]] = obj["raw_data"]["hashes"].get("sha1")
            total += obj["raw_data"]["bytes"]
            shards.append(obj)
        labels.append(np.load(split_dir / part / "labels.npy", allow_pickle=False))
    (split_dir / "index.json").write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))
    all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    np.save(split_dir / "labels.npy", all_labels, allow_pickle=False)
    return {"shards": len(shards), "bytes": total, "checksums": checksums}


def prepare_store(source: str, out: str | os.PathLike, size: int = DEFAULT_SIZE, format: str = "jpeg",
                  on_bad_image: str = "error", quality: int = 90, workers: int | None = None,
                  part_size: int = DEFAULT_PART_SIZE, num_channels: int | None = None, progress: bool = True) -> dict:
    """Write ``source`` (``imagefolder:PATH``) into the store ``out``; returns the manifest (also ``out/manifest.json``).

    ``size`` is the training image size; images are stored at ``default_load_size(size)``.
    ``format``: ``"jpeg"`` (quality ``quality``) or ``"raw"`` pixels. ``workers`` decoding
    processes (default: the CPU count, at most 8; 0 decodes in this process). Running it again on
    an unfinished ``out`` resumes; on a finished one it returns the manifest.
    """
    from tqdm.auto import tqdm

    path, policy = _check_request(source, format, size, quality, part_size, on_bad_image)
    root = Path(out).expanduser()
    if (root / MANIFEST).is_file():  # finished before: the same command is a no-op, another one is refused
        return _finished_manifest(root, path, size, format)
    t0 = time.perf_counter()
    load_size = default_load_size(int(size))
    splits = []
    for split, folder, classes in _splits(path):
        files, labels, found_classes = scan_image_folder(folder, classes)
        keep, report = scan_images(files, policy, int(size), folder,
                                   skip_hint="--on-bad-image skip to prepare the store without them")
        splits.append((split, folder, [f for f, k in zip(files, keep) if k],
                       None if labels is None else [lab for lab, k in zip(labels, keep) if k], found_classes, report))
    channels = detect_channels(splits[0][2]) if num_channels is None else int(num_channels)
    settings = {"source": IMAGEFOLDER_PREFIX + str(path), "size": int(size), "load_size": load_size, "format": format,
                "jpeg_quality": int(quality) if format == "jpeg" else None, "num_channels": channels,
                "on_bad_image": policy, "part_size": int(part_size),
                "files": {s: _list_digest(f, lab) for s, _, f, lab, _, _ in splits}}
    _start_or_resume(root, settings)
    total = sum(len(f) for _, _, f, _, _, _ in splits)
    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    pool = get_context().Pool(workers, initializer=_worker_init) if workers > 0 else None
    bar = tqdm(total=total, unit="img", desc="prepare", disable=not progress, smoothing=0.1, file=sys.stderr)
    split_info = {}
    try:
        for split, folder, files, labels, _, report in splits:
            jobs = [(str(f), load_size, channels, format, int(quality)) for f in files]
            split_info[split] = _write_split(root / split, folder, files, labels, jobs, report, int(part_size), pool,
                                             policy, bar)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - t0
    mean, std = MEAN_STD["gray" if channels == 1 else "imagenet"]
    manifest = {"store_version": STORE_VERSION, "engine": "mosaicml-streaming (MDS)", **settings,
                "classes": splits[0][4], "labeled": splits[0][3] is not None, "mean": list(mean), "std": list(std),
                "splits": split_info, "seconds": round(seconds, 1),
                "images_per_s": round(total / seconds, 1) if seconds > 0 else None}
    del manifest["files"], manifest["part_size"]
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)  # written last: a store without it is unfinished
    return manifest


def _check_request(source: str, format: str, size: int, quality: int, part_size: int,
                   on_bad_image: str) -> tuple[Path, str]:
    """The image folder ``source`` names and the bad-image policy; DataError for what cannot be prepared."""
    if not source.startswith(IMAGEFOLDER_PREFIX) or not source[len(IMAGEFOLDER_PREFIX):]:
        raise DataError(f"prepare reads image folders: give imagefolder:PATH, not {source!r}")
    if format not in STORE_FORMATS:
        raise DataError(f"--format {format!r}: choose one of {', '.join(STORE_FORMATS)}")
    if not 8 <= int(size) <= 4096 or not 1 <= int(quality) <= 100 or int(part_size) < 1:
        raise DataError(f"need 8 <= --size <= 4096, 1 <= --quality <= 100, --part-size >= 1; got {size}, {quality}, {part_size}")
    policy = check_policy(on_bad_image)
    _require_store_extra()
    path = Path(source[len(IMAGEFOLDER_PREFIX):]).expanduser().resolve()
    if not path.is_dir():
        raise DataNotFoundError(f"image folder {str(path)!r} (from {source!r}) does not exist or is not a folder")
    return path, policy


def _finished_manifest(root: Path, path: Path, size: int, format: str) -> dict:
    """The manifest of a store finished before, if it was written from the same folder, size and format."""
    done = json.loads((root / MANIFEST).read_text())
    asked = {"source": IMAGEFOLDER_PREFIX + str(path), "size": int(size), "format": format}
    if any(done.get(k) != v for k, v in asked.items()):
        raise DataError(f"{root} already holds a store of {done.get('source')} at --size {done.get('size')}, "
                        f"--format {done.get('format')}; choose a new --out for this one")
    return done


def _start_or_resume(root: Path, settings: dict) -> None:
    """Record the settings in ``prepare.json``, or check that an unfinished prepare there used the same ones."""
    started = root / "prepare.json"
    if started.is_file():
        before = json.loads(started.read_text())
        # The policy may change on resume (an "error" stop, then --on-bad-image skip); nothing else may.
        changed = [k for k in settings if k != "on_bad_image" and before.get(k) != settings[k]]
        if changed:
            raise DataError(f"{root} holds an unfinished prepare with other settings ({', '.join(changed)} differ; "
                            "'files' means the folder changed); run the original command to resume it, or use a new --out")
    else:
        root.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(settings, indent=1))


def _write_split(split_dir: Path, folder: Path, files: list, labels: list | None, jobs: list, report, part_size: int,
                 pool, policy: str, bar) -> dict:
    """Write one split part by part (parts finished before an interruption are kept), then merge their indexes."""
    parts = []
    for p, start in enumerate(range(0, len(files), part_size)):
        part = f"part-{p:05d}"
        parts.append(part)
        chunk = files[start:start + part_size]
        if (split_dir / part / "done.json").is_file():
            bar.update(len(chunk))  # finished before an interruption: kept
            continue
        _write_part(split_dir / part, jobs[start:start + part_size], chunk,
                    None if labels is None else labels[start:start + len(chunk)], folder, pool, policy, bar)
    done = [json.loads((split_dir / part / "done.json").read_text()) for part in parts]
    failed = [(b["file"], b["problem"]) for d in done for b in d["bad"]]
    count = sum(d["images"] for d in done)
    if count == 0:
        raise DataError(f"no usable images in {folder}: none of {report.num_files} files decodes")
    return {"folder": str(folder), "images": count, "files_found": report.num_files,
            "bad": [{"file": f, "problem": p} for f, p in report.bad + failed],
            "upscaled": report.upscaled, **_merge_split(split_dir, parts)}
