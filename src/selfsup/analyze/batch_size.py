"""``selfsup analyze batch-size``: batch size at a fixed image budget, SimCLR and BYOL on one plot.

SimCLR (Table B.1 / Figure 9) gains from bigger batches (more negatives), less so with longer
training; BYOL has no negatives and loses far less at small batches (BYOL Table 16: 4096 -> 256
costs BYOL 0.7 points, SimCLR 3.6). Every run here sees the same number of images (``--images``),
so a batch of B takes ``images / B`` steps; the learning rate follows each method's rule
(``lr x B / 256``). BYOL is included once it is registered in ``selfsup.methods.METHODS``.
"""
from __future__ import annotations

import argparse

from selfsup.analyze import arguments, common as C, outputs
from selfsup.analyze.head import parse_int_list

DEFAULT_IMAGES = 12800
DEFAULT_BATCHES = "32,64,128,256"


def build_parser(prog: str = "selfsup analyze batch-size") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    arguments.add_common_args(p, "batch-size", steps=None, batch_size=None, seeds=True)
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES, help=f"batch sizes to compare (default {DEFAULT_BATCHES})")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                   help=f"images seen by every run; steps = images / batch size (default {DEFAULT_IMAGES})")
    p.add_argument("--methods", help="comma-separated methods (default: simclr and, when registered, byol)")
    return p


def run(args: argparse.Namespace) -> dict:
    batches = parse_int_list("--batch-sizes", args.batch_sizes)
    if min(batches) < 2:
        raise C.ConfigError(f"--batch-sizes: SimCLR needs at least 2 images per batch, got {min(batches)}")
    if args.images < max(batches):
        raise C.ConfigError(f"--images: {args.images} is less than one batch of {max(batches)}; raise --images")
    methods = arguments.parse_methods(args.methods)
    ctx = C.StudyContext("batch-size", args, {"batch_sizes": batches, "images": args.images, "methods": methods})
    ctx.open()
    rows = []
    for method in methods:
        for b in batches:
            steps = max(1, args.images // b)
            res = ctx.run_cell(f"{method}-b{b}", {"method": method, "batch_size": b, "steps": steps}, with_z=False)
            rows.append({"method": method, "batch_size": b, "steps": steps, "linear_h": res["linear_h"],
                         "linear_h_std": res.get("linear_h_std"), "final_loss": res["final_loss"], "seconds": res["seconds"]})
    outputs.write_csv(ctx.out / "batch_size.csv", rows)
    baseline = C.random_init_cached(ctx)
    outputs.write_json(ctx.out / "results.json", {"rows": rows, "random_init": baseline, "images": args.images, "methods": methods})

    plt = outputs.pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.3))
    for method in methods:
        rs = [r for r in rows if r["method"] == method]
        outputs.line(ax, [r["batch_size"] for r in rs], rs, "linear_h", "o-", label=method)
    png = outputs.finish_log_axes(fig, ax, batches, "batch size (same number of images for every run)",
                            f"Batch size, {ctx.dataset}, {args.images} images per run", baseline,
                            ctx.out / "batch_size.png", base=2)

    spread = {m: (max(r["linear_h"] for r in rows if r["method"] == m) - min(r["linear_h"] for r in rows if r["method"] == m))
              for m in methods}
    lines = [
        f"{len(rows)} runs, each seeing {args.images} images (steps = images / batch size), linear evaluation of h "
        f"on {args.train_images} / {args.test_images} images.",
        "", *outputs.markdown_table(["method", "batch", "steps", "linear top-1 %", "final loss"],
                              [[r["method"], r["batch_size"], r["steps"], outputs.pm(r, "linear_h"), outputs.fmt(r["final_loss"], 3)]
                               for r in rows]),
        "", "Spread (best - worst batch size): " + ", ".join(f"{m} {v:.1f} points" for m, v in spread.items()) + ".",
        *(best_line(m, [r for r in rows if r["method"] == m]) for m in methods),
        f"Untrained encoder (random init), same probe: {baseline:.1f}%.",
        "The paper: SimCLR gains from bigger batches (Table B.1: 57.5 -> 64.8 from 256 to 8192 at 100 epochs); "
        "BYOL is robust to small batches (Table 16).",
    ]
    if "byol" not in methods:
        lines.append("BYOL was not compared (not registered in selfsup.methods, or left out by --methods).")
    lines += ["", "![batch size](batch_size.png)"]
    summary = ctx.write_summary("Batch size at a fixed image budget", lines)
    return {"study": "batch-size", "out": str(ctx.out), "figures": [str(png)], "summary": str(summary), "runs": len(rows)}


def best_line(method: str, rows: list[dict]) -> str:
    """Which batch size did best for ``method``, and whether the seed spread separates it from the others."""
    best = max(rows, key=lambda r: r["linear_h"])
    return (f"Best {method} batch: {best['batch_size']} ({outputs.pm(best, 'linear_h')}%); "
            + outputs.separation(best, rows, "linear_h", lambda r: r["batch_size"]) + ".")
