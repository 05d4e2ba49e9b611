"""``selfsup prepare``: decode an image folder once into a sharded store (``selfsup.data.prepare`` does the work)."""
from __future__ import annotations

import argparse
import json
import sys

from selfsup.data.image_checks import describe_bad
from selfsup.data.prepare import DEFAULT_PART_SIZE, DEFAULT_SIZE, prepare_store
from selfsup.data.store import STORE_FORMATS


def summary(manifest: dict, out: str) -> str:
    parts = []
    for split, info in manifest["splits"].items():
        bad = f", {len(info['bad'])} bad left out ({describe_bad([(b['file'], b['problem']) for b in info['bad']])})" \
            if info["bad"] else ""
        parts.append(f"{split}: {info['images']} images in {info['shards']} shards, {info['bytes'] / 1e6:.1f} MB{bad}")
    return (f"[selfsup] store {out}: {manifest['format']} at {manifest['load_size']} px (for --set image_size="
            f"{manifest['size']}); " + "; ".join(parts) + f"; train with --dataset store:{out}")


def cmd_prepare(args) -> int:
    manifest = prepare_store(args.source, args.out, size=args.size, format=args.format, on_bad_image=args.on_bad_image,
                             quality=args.quality, workers=args.workers, part_size=args.part_size,
                             progress=not args.no_progress)
    print(summary(manifest, args.out), file=sys.stderr)
    print(json.dumps({"store": str(args.out), **{s: i["images"] for s, i in manifest["splits"].items()}}))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="decode an image folder once into a sharded store (train with --dataset store:OUT)")
    p.add_argument("source", help="imagefolder:PATH (flat, class sub-folders, or train/ and val/ splits)")
    p.add_argument("--out", required=True, help="store folder to create (or to resume)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"training image size (default {DEFAULT_SIZE}); images are stored at size*256/224 (at size itself up to 32)")
    p.add_argument("--format", choices=STORE_FORMATS, default="jpeg",
                   help="jpeg (default: small, fast to decode) or raw (uint8 pixels, identical to the folder's)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="error (default: name bad files, write nothing) or skip (leave them out, reported)")
    p.add_argument("--workers", type=int, help="decoding processes (default: CPU count, at most 8)")
    p.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE,
                   help=f"images per resumable part (default {DEFAULT_PART_SIZE})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
