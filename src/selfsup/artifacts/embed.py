"""One embedding per image: a run's frozen encoder over a folder of images, written with the paths.

``selfsup embed --run RUN_DIR --images PATH --out FILE``. ``PATH`` is a folder (searched recursively,
hidden entries skipped; JPEG/PNG/WebP/BMP) or one image file. Images are taken in sorted order of
their path relative to ``PATH`` (POSIX separators), so two runs over the same folder list the same
images in the same order. Each image is decoded whole (EXIF rotation applied, converted to the run's
channels as PIL converts them) and prepared by the one function every path uses,
:func:`selfsup.evaluation.preprocess.prepare_images` with the run's ``RunInfo.preprocessing``: centre
square, central 87.5% above 32 px, resized to the run's ``image_size``, normalised with the mean/std
the run was trained with; so a row equals ``selfsup.hub.embed`` of the decoded image. The embedding
is the representation h (the encoder's pooled output, before any projection head), computed in
float32 with the encoder in eval mode. The preprocessing is returned in the summary and stored in a
``.parquet`` file's metadata.

Output by the suffix of ``FILE``:

- ``.npy``: a float32 ``(N, D)`` array, and beside it ``FILE`` with suffix ``.paths.txt`` holding
  the N relative paths, one a line, in the same order;
- ``.csv``: a header ``path,h0,...,h{D-1}`` then one row per image (floats with 9 significant
  digits, which round-trips float32 exactly);
- ``.parquet`` (needs pyarrow): columns ``path`` (string) and ``embedding`` (fixed-size list of D
  float32).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from selfsup.data.containers import IMAGE_EXTENSIONS
from selfsup.data.folders import decode_image
from selfsup.data.store import STORE_PREFIX, open_store
from selfsup.errors import ConfigError
from selfsup.evaluation.frozen import extract_features
from selfsup.evaluation.preprocess import Preprocessing
from selfsup.training.runs import load_encoder, load_run
from selfsup.training.devices import resolve_device

__all__ = ["EMBED_FORMATS", "EmbedError", "list_images", "ImageListDataset", "embed_images", "write_embeddings",
           "read_embeddings", "embed_run", "index_path"]

EMBED_FORMATS = (".npy", ".csv", ".parquet")


class EmbedError(ConfigError):
    """Embedding cannot proceed (no images, unreadable image, unknown output format, ...)."""


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str | os.PathLike) -> tuple[Path, list[str]]:
    """``(base folder, sorted relative POSIX paths)`` of the images under ``root`` (or ``root`` itself if a file)."""
    root = Path(root).expanduser()
    if root.is_file():
        if not is_image_file(root.name):
            raise EmbedError(f"--images {root}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return root.parent, [root.name]
    if not root.is_dir():
        raise EmbedError(f"--images {root}: no such file or folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if is_image_file(f)]
    if not found:
        raise EmbedError(f"--images {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders")
    return root, sorted(found)


class ImageListDataset(torch.utils.data.Dataset):
    """``(encoder input (C, S, S) float, index, ok)`` per file: decoded whole, then ``preprocess``; a file
    that fails to decode gives ``ok=False`` and zeros."""

    def __init__(self, base: Path, relative: list[str], preprocess: Preprocessing):
        self.base = Path(base)
        self._relative = np.array([os.fsencode(p) for p in relative])  # cheap to share with workers
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self._relative)

    def __getitem__(self, index: int):
        path = self.base / os.fsdecode(self._relative[index])
        prep = self.preprocess
        try:
            image = prep(decode_image(path, None, prep.channels)[None])[0]
            ok = True
        except OSError:
            image = torch.zeros(prep.channels, prep.image_size, prep.image_size)
            ok = False
        return image, index, ok


@torch.no_grad()
def embed_images(encoder: torch.nn.Module, base: Path, relative: list[str], *, preprocess: Preprocessing,
                 batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0,
                 skip_broken: bool = False, progress: bool = False) -> tuple[np.ndarray, list[str], list[str]]:
    """``(embeddings (N, D) float32, kept relative paths, skipped relative paths)``, in the order of ``relative``."""
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise EmbedError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    dataset = ImageListDataset(base, relative, preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), desc="embedding", unit="img", dynamic_ncols=True)
    was_training = encoder.training
    encoder.eval()
    chunks, kept, skipped = [], [], []
    try:
        for images, index, ok in loader:
            if not bool(ok.all()):
                bad = [relative[i] for i in index[~ok].tolist()]
                if not skip_broken:
                    raise EmbedError(f"could not decode {base / bad[0]}" + (f" (and {len(bad) - 1} more in this batch)"
                                                                            if len(bad) > 1 else "")
                                     + "; remove or fix it, or pass --on-bad-image skip to leave such files out")
                skipped += bad
                images, index = images[ok], index[ok]
            if len(index):
                chunks.append(encoder(images.to(device, non_blocking=True)).float().cpu().numpy())
                kept += [relative[i] for i in index.tolist()]
            if bar is not None:
                bar.update(len(ok))
    finally:
        encoder.train(was_training)
        if bar is not None:
            bar.close()
    if not chunks:
        raise EmbedError(f"none of the {len(relative)} images under {base} could be decoded")
    return np.concatenate(chunks).astype(np.float32, copy=False), kept, skipped


def index_path(out: str | Path) -> Path:
    """Where the paths of a ``.npy`` output go: ``emb.npy`` -> ``emb.paths.txt``."""
    return Path(out).with_suffix(".paths.txt")


def write_embeddings(out: str | Path, paths: list[str], embeddings: np.ndarray, metadata: dict | None = None) -> list[Path]:
    """Write ``embeddings`` with their ``paths`` in the format of ``out``'s suffix; returns the files written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in EMBED_FORMATS:
        raise EmbedError(f"--out {out}: unknown format {suffix or '(no suffix)'!r}; name it .npy, .csv or .parquet")
    if len(paths) != len(embeddings):
        raise ValueError(f"{len(paths)} paths but {len(embeddings)} embeddings")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    if suffix == ".npy":
        bad = [p for p in paths if "\n" in p or "\r" in p]
        if bad:
            raise EmbedError(f"{bad[0]!r} has a line break in its name, which a .paths.txt index cannot hold; "
                             "write .csv or .parquet instead")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32))
        index = index_path(out)
        index_tmp = index.with_name(f".tmp-{index.name}")
        index_tmp.write_text("".join(p + "\n" for p in paths), encoding="utf-8")
        os.replace(tmp, out)
        os.replace(index_tmp, index)
        return [out, index]
    if suffix == ".csv":
        dim = embeddings.shape[1]
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path"] + [f"h{j}" for j in range(dim)])
            for p, row in zip(paths, embeddings):
                writer.writerow([p] + [format(float(v), ".9g") for v in row])
        os.replace(tmp, out)
        return [out]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbedError(f"--out {out}: writing .parquet needs pyarrow (pip install pyarrow); or name it .npy or .csv") from None
    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table({"path": pa.array(paths, type=pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})
    if metadata:
        table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return [out]


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(paths, embeddings)`` from a file written by :func:`write_embeddings`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return index_path(path).read_text(encoding="utf-8").splitlines(), np.load(path)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        return [r[0] for r in rows], np.array([[float(v) for v in r[1:]] for r in rows], dtype=np.float32)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size
        return table.column("path").to_pylist(), emb.flatten().to_numpy().reshape(-1, dim).astype(np.float32)
    raise EmbedError(f"{path}: unknown embedding file format (expected .npy, .csv or .parquet)")


def embed_run(run_dir: str | Path, images: str | Path, out: str | Path, *, batch_size: int = 256,
              device: str = "auto", num_workers: int = 2, skip_broken: bool = False, progress: bool = False,
              on_bad_image: str | None = None) -> dict:
    """Embed every image under ``images`` with the encoder of ``run_dir`` and write ``out``; returns a summary.

    Images that cannot be decoded follow ``on_bad_image`` (``"error"`` or ``"skip"``; None: the run's own
    policy, as it was trained); ``skip_broken=True`` is ``"skip"``.
    """
    out = Path(out)
    if out.suffix.lower() not in EMBED_FORMATS:  # before any work
        raise EmbedError(f"--out {out}: unknown format {out.suffix or '(no suffix)'!r}; name it .npy, .csv or .parquet")
    if num_workers < 0:
        raise EmbedError(f"--num-workers must be >= 0, got {num_workers}")
    if on_bad_image not in (None, "error", "skip"):
        raise EmbedError(f"--on-bad-image: {on_bad_image!r} is not one of error, skip")
    t0 = time.perf_counter()
    run = load_run(run_dir)
    skip_broken = skip_broken or (on_bad_image or run.config.on_bad_image) == "skip"
    if str(images).startswith(STORE_PREFIX):  # a prepared store (selfsup prepare): its train split, by file name
        return _embed_store(run, str(images), out, batch_size, resolve_device(device), num_workers, progress, t0)
    base, relative = list_images(images)
    dev = resolve_device(device)
    encoder = load_encoder(run).to(dev)
    prep = run.preprocessing
    workers = min(num_workers, math.ceil(len(relative) / max(1, batch_size)))
    emb, kept, skipped = embed_images(encoder, base, relative, preprocess=prep, batch_size=batch_size, device=dev,
                                      num_workers=workers, skip_broken=skip_broken, progress=progress)
    meta = {"run": str(run_dir), "weights": str(run.weights_path), "backbone": run.config.backbone,
            "images": str(base), "image_size": run.image_size, "preprocessing": json.dumps(prep.record())}
    written = write_embeddings(out, kept, emb, metadata=meta)
    seconds = time.perf_counter() - t0
    return {"out": [str(p) for p in written], "num_images": len(kept), "dim": int(emb.shape[1]),
            "skipped": skipped, "seconds": round(seconds, 2), "images_per_sec": round(len(kept) / max(seconds, 1e-9), 1),
            "preprocessing": prep.record()}


@torch.no_grad()
def _embed_store(run, name: str, out: Path, batch_size: int, device: torch.device, num_workers: int, progress: bool,
                 t0: float) -> dict:
    """``embed_run`` over a store's train split: images as stored (the folder's centre square), names from the store."""
    store = open_store(name, "train")
    encoder = load_encoder(run).to(device)
    prep = run.preprocessing
    emb, _ = extract_features(encoder, store, device, run.image_size, batch_size=batch_size, num_workers=num_workers,
                              progress=progress, preprocess=prep)
    names = [store.name_of(i) for i in range(len(store))]
    meta = {"run": str(run.run_dir), "weights": str(run.weights_path), "backbone": run.config.backbone,
            "images": name, "image_size": run.image_size, "preprocessing": json.dumps(prep.record(store.num_channels))}
    written = write_embeddings(out, names, emb.numpy(), metadata=meta)
    seconds = time.perf_counter() - t0
    return {"out": [str(p) for p in written], "num_images": len(names), "dim": int(emb.shape[1]), "skipped": [],
            "seconds": round(seconds, 2), "images_per_sec": round(len(names) / max(seconds, 1e-9), 1),
            "preprocessing": prep.record(store.num_channels)}
