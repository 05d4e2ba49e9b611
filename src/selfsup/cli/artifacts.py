"""Command line for what users do with a trained encoder: ``selfsup embed | export | report``.

Registered into ``selfsup.cli.app.build_parser`` by :func:`add_parsers`. Each command prints one JSON
line on stdout (what it wrote); user errors raise ``ConfigError`` subclasses, which the CLI prints as
one line with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfsup.artifacts.embed import embed_run
from selfsup.artifacts.export import export_run, EXPORT_TARGETS
from selfsup.artifacts.html_report import write_html_report
from selfsup.artifacts.hub import export_hub


def cmd_embed(args) -> int:
    summary = embed_run(args.run, args.images, args.out, batch_size=args.batch_size, device=args.device,
                        num_workers=args.num_workers, skip_broken=args.skip_broken, progress=not args.no_progress,
                        on_bad_image=args.on_bad_image)
    if summary["skipped"]:
        print(f"[selfsup] skipped {len(summary['skipped'])} image(s) that could not be decoded, e.g. "
              f"{summary['skipped'][0]}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_export(args) -> int:
    if args.to == "hub":  # a folder: model.safetensors, config.json, model card README.md (selfsup.artifacts.hub)
        print(json.dumps(export_hub(args.run, args.out)))
        return 0
    summary = export_run(args.run, args.to, args.out, opset=args.opset, dynamo=args.onnx_dynamo,
                         verify=not args.no_verify)
    print(json.dumps(summary))
    return 0


def cmd_report(args) -> int:
    out = write_html_report(args.run_dir, args.out)
    print(json.dumps({"report": str(out)}))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write one embedding (the representation h) per image, with its path",
                       description="Embed every image under --images with the run's frozen encoder. Output by "
                                   "suffix: .npy (+ .paths.txt index), .csv, .parquet (needs pyarrow).")
    p.add_argument("--run", required=True, help="run folder (from selfsup pretrain)")
    p.add_argument("--images", required=True, type=Path, help="folder of images (recursive) or one image")
    p.add_argument("--out", required=True, type=Path, help="FILE.npy, FILE.csv or FILE.parquet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images (default 2)")
    p.add_argument("--on-bad-image", choices=("error", "skip"),
                   help="images that cannot be decoded: error (name the file) or skip (leave them out); default: the "
                        "run's own policy")
    p.add_argument("--skip-broken", action="store_true", help="the same as --on-bad-image skip")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("export", help="write the encoder for torchvision, timm, safetensors, ONNX or a Hub-style folder",
                       description="Export the run's encoder f (no projection head).")
    p.add_argument("--run", required=True, help="run folder (or a Lightning .ckpt from selfsup.lightning)")
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS + ("hub",),
                   help="the format: " + ", ".join(EXPORT_TARGETS + ("hub",)))
    p.add_argument("--out", required=True, type=Path, help="file to write (.safetensors, .pt or .onnx); a folder for --to hub")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    p.add_argument("--onnx-dynamo", action="store_true", help="use torch's dynamo ONNX exporter (slower)")
    p.add_argument("--no-verify", action="store_true", help="do not compare the ONNX file with PyTorch")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write one self-contained HTML page for a run",
                       description="Config, curves, view grid, evaluation results and timing in one HTML file.")
    p.add_argument("run_dir", type=Path, help="run folder")
    p.add_argument("--out", type=Path, help="HTML file (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
