"""Bad images in a folder: what happens to each kind, and a cheap scan that finds them before training.

A run over someone's own photos must not die hours in on one broken JPEG. Every kind of problem
has a decided outcome (``docs/reliability.md`` lists them with the test that checks each):

========================================  =====================================================
case                                      outcome
========================================  =====================================================
zero-byte file, not an image (text or     a *bad image*. ``on_bad_image="error"`` (the default):
HTML saved as ``.jpg``), corrupt header,  the run stops before training with every bad file
truncated file                            named (the first few in the message) and the fix.
                                          ``"skip"``: the files are left out, counted, and the
                                          count is reported at the start and end of the run.
RGBA, LA, palette with transparency       handled: composited over white (PIL's ``convert``
                                          would show whatever colour transparent pixels hold).
palette, 1-bit, CMYK, YCbCr               handled: converted to RGB / L by PIL.
16-bit (``I;16*``, ``I``)                 handled: scaled to 8 bits (PIL's ``convert`` clips
                                          every value above 255 to white).
smaller than the training crop            handled: upscaled like any other image (bicubic);
                                          counted and reported.
empty class folder, empty data set,       ``DataError`` before training in both modes (a class
every image bad                           folder without images is a layout mistake, and
                                          dropping it would shift the class indices).
passes the scan, fails to decode later    ``"skip"``: replaced by the next image in data-set
(damage inside the compressed data)       order that decodes (deterministic, so a resumed run
                                          sees the same batches), counted. ``"error"``: the run
                                          stops naming the file.
========================================  =====================================================

The scan reads each file's header (``PIL.Image.open`` parses it without decoding pixels) and
its last bytes (JPEG ends with the EOI marker, PNG with the IEND chunk, WebP/BMP state their
length in the header). Only files whose ending looks wrong are decoded fully to confirm. That is
two small reads per file, run in threads: a few thousand files a second on an SSD.
"""
from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from selfsup.errors import DataError, BadImageError

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DataError",
    "BadImageError",
    "ImageReport",
    "check_image",
    "scan_images",
    "convert_image",
    "decode_with_policy",
    "final_report",
    "clean_error_message",
    "describe_bad",
]

BAD_IMAGE_POLICIES = ("error", "skip")
# What PIL raises on broken files (struct.error and SyntaxError come from damaged headers/EXIF).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)
MAX_LISTED = 5  # bad files named in an error message; the rest are counted
MAX_SUBSTITUTE_TRIES = 64  # consecutive undecodable images before giving up on a streamed data set

_SIGNATURES = {  # leading bytes of the formats selfsup reads (JPEG, PNG, WebP, BMP)
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"RIFF": "WEBP",
    b"BM": "BMP",
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def check_policy(on_bad_image: str) -> str:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    return on_bad_image


# --------------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------------


def _tail_looks_complete(path: Path, fmt: str | None, size: int, head: bytes) -> bool:
    """Whether the file ends the way a complete file of ``fmt`` ends (cheap: reads <= 64 bytes)."""
    if fmt == "WEBP" and head[:4] == b"RIFF" and len(head) >= 8:
        return int.from_bytes(head[4:8], "little") + 8 <= size
    if fmt == "BMP" and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return declared == 0 or declared <= size  # some writers leave the size field 0
    if fmt not in ("JPEG", "PNG"):
        return False  # unknown ending: let the confirming decode decide
    with open(path, "rb") as f:
        f.seek(max(0, size - 64))
        tail = f.read()
    if fmt == "PNG":
        return b"IEND" in tail[-12:]
    # JPEG ends with EOI (FF D9); some writers pad with zeros or newlines after it.
    return tail.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9")


def _full_decode_error(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
    except DECODE_ERRORS as err:
        return str(err) or type(err).__name__
    return None


def check_image(path: str | os.PathLike) -> tuple[str | None, tuple[int, int] | None]:
    """``(problem, (width, height))`` of one file; ``problem`` is ``None`` for a usable image.

    Reads the header and the last bytes; decodes the file only when its ending looks wrong.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})", None
    if size == 0:
        return "zero-byte file", None
    known = next((fmt for sig, fmt in _SIGNATURES.items() if head.startswith(sig)), None)
    try:
        with Image.open(path) as img:
            fmt, dims = img.format, img.size
    except UnidentifiedImageError:
        if known is None:
            return "not an image (the content is not JPEG, PNG, WebP or BMP)", None
        return f"corrupt {known} header", None
    except DECODE_ERRORS as err:
        return f"corrupt or truncated {known or 'image'} ({err})", None
    if dims[0] < 1 or dims[1] < 1:
        return f"image has no pixels ({dims[0]}x{dims[1]})", None
    try:
        complete = _tail_looks_complete(path, fmt, size, head)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})", None
    if not complete:
        problem = _full_decode_error(path)
        if problem is not None:
            return f"truncated or corrupt {fmt} ({problem})", None
    return None, dims


@dataclass
class ImageReport:
    """What the scan (and, for streamed data, training) found in an image folder."""

    root: str
    num_files: int
    policy: str
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, problem), left out of the data set
    upscaled: int = 0  # usable images smaller than the training size (upscaled when decoded)
    min_size: int = 0  # the training image size they were compared with
    seconds: float = 0.0
    failed_later: list[str] = field(default_factory=list)  # passed the scan, failed to decode (replaced)

    @property
    def skipped(self) -> int:
        return len(self.bad) + len(self.failed_later)

    def summary(self) -> str:
        parts = [f"{self.num_files} image files in {self.root} scanned in {self.seconds:.1f} s"]
        if self.bad:
            parts.append(f"{len(self.bad)} bad, left out (--on-bad-image skip): " + describe_bad(self.bad))
        if self.failed_later:
            parts.append(f"{len(self.failed_later)} failed to decode during training and were replaced by the next "
                         f"image: {', '.join(self.failed_later[:MAX_LISTED])}")
        if self.upscaled:
            parts.append(f"{self.upscaled} smaller than {self.min_size} px, upscaled")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"root": self.root, "num_files": self.num_files, "on_bad_image": self.policy,
                "skipped": self.skipped, "bad": [{"file": f, "problem": p} for f, p in self.bad],
                "failed_during_training": list(self.failed_later), "upscaled": self.upscaled,
                "scan_seconds": round(self.seconds, 3)}


def describe_bad(bad: Sequence[tuple[str, str]]) -> str:
    """'file: problem; ...' for the first few, then how many more."""
    shown = "; ".join(f"{f}: {p}" for f, p in bad[:MAX_LISTED])
    return shown + (f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")


def scan_images(files: Sequence[Path], on_bad_image: str = "error", min_size: int = 0, root: str | os.PathLike = "",
                workers: int | None = None, *,
                skip_hint: str = "--on-bad-image skip (config key on_bad_image: skip) to leave them out"
                ) -> tuple[list[bool], ImageReport]:
    """Check every file before training: ``(usable flags, report)``.

    ``on_bad_image="error"`` raises :class:`BadImageError` naming the bad files; ``"skip"`` only
    reports them. ``min_size`` counts the usable images smaller than it (they get upscaled). ``skip_hint``
    ends the error: how to skip them in the command that scans.
    """
    check_policy(on_bad_image)
    t0 = time.perf_counter()
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    if len(files) < 64:
        results = [check_image(p) for p in files]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check_image, files, chunksize=64))
    report = ImageReport(root=str(root), num_files=len(files), policy=on_bad_image, min_size=int(min_size))
    keep = []
    for path, (problem, dims) in zip(files, results):
        keep.append(problem is None)
        if problem is not None:
            report.bad.append((str(path), problem))
        elif min(dims) < min_size:
            report.upscaled += 1
    report.seconds = time.perf_counter() - t0
    if report.bad and on_bad_image == "error":
        raise BadImageError(
            f"{len(report.bad)} of {len(files)} files in {root} are not usable images: {describe_bad(report.bad)}. "
            f"Fix or remove them, or pass {skip_hint}"
        )
    if not any(keep):
        raise DataError(f"no usable images in {root}: all {len(files)} files are bad ({describe_bad(report.bad)})")
    return keep, report


# --------------------------------------------------------------------------------------------------
# Decoding: modes, and what to do when a file fails during training
# --------------------------------------------------------------------------------------------------


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as 8-bit ``mode`` ("L" or "RGB"): transparency over white, 16-bit scaled, palette expanded."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        a = np.asarray(img)
        if img.mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        elif img.mode in _SIXTEEN_BIT or a.max(initial=0) > 255:
            a = a / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _WITH_ALPHA:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == mode else img.convert(mode)


def decode_with_policy(decode: Callable[[int], torch.Tensor], index: int, n: int, on_bad_image: str,
                       name: Callable[[int], str], failed: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(decode(i), i)`` for the first ``i`` from ``index`` on (wrapping at ``n``) that decodes.

    With ``on_bad_image="error"`` the first failure raises :class:`BadImageError`. Failures are
    flagged in ``failed`` (a shared bool tensor, so DataLoader workers report them to the trainer).
    """
    for k in range(min(n, MAX_SUBSTITUTE_TRIES)):
        i = (index + k) % n
        try:
            return decode(i), i
        except DECODE_ERRORS as err:
            if failed is not None:
                failed[i] = True
            if on_bad_image == "error":
                raise BadImageError(f"image {name(i)} cannot be decoded ({err}); fix or remove it, or pass "
                                    "--on-bad-image skip (config key on_bad_image: skip)") from None
    raise BadImageError(f"{min(n, MAX_SUBSTITUTE_TRIES)} images in a row from {name(index)} on cannot be decoded; "
                        "the data set is unreadable here (disk or mount problem?)")


def final_report(dataset) -> ImageReport | None:
    """The data set's scan report with the files that failed during training added (``None``: not a folder)."""
    report = getattr(dataset, "image_report", None)
    failed = getattr(dataset, "failed_files", None)
    if report is not None and failed is not None:
        report.failed_later = [f for f in failed() if f not in set(report.failed_later)] + report.failed_later
    return report


def clean_error_message(err: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback."""
    text = str(err).strip()
    if "Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
