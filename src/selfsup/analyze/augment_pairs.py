"""``selfsup analyze augment-pairs``: SimCLR Figure 5, the augmentation-pair heatmap.

SimCLR is pre-trained once per single augmentation and once per pair of augmentations from
{crop, cutout, colour, sobel, noise, blur, rotate} (``selfsup.views.augment.TRANSFORM_NAMES``), each with
a short budget, then evaluated linearly; the heatmap shows linear top-1 with the single
augmentations on the diagonal.

As in the paper (Sec. 3.1), the transformations go into one branch only and the other branch is the
identity (``--symmetric`` puts them into both). Each cell is its own run folder under
``cells/``; its ``result.json`` is written when it is finished, so an interrupted study resumes
where it stopped and a rerun with the same flags costs nothing.

Deviations from the paper, written down:

- The paper composes an ordered pair (row first, then column). ``BatchAugment`` applies its ops in
  one fixed order (crop/rotate -> colour -> Sobel -> blur -> noise -> cutout), so (a, b) and (b, a)
  are the same view distribution here: each unordered pair is trained once and the heatmap is
  mirrored.
- Fashion-MNIST images all have the same size, so no crop is forced under the other
  transformations; "crop" is the random resized crop (scale 0.08-1, with flip) back to the image size.
- Blur: ``blur_sigma_ref_size`` is set to the training image size, so sigma is 0.1-2.0 pixels at
  that size (the ImageNet recipe's sigma scaled from 224 px would be invisible at 16-28 px).
"""
from __future__ import annotations

import argparse
import dataclasses

from selfsup.analyze import arguments, common as C, outputs
from selfsup.training.config_io import to_dict
from selfsup.views.config import TRANSFORM_NAMES, view_config_for

DEFAULT_STEPS = 80
DEFAULT_BATCH = 64


def build_parser(prog: str = "selfsup analyze augment-pairs") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    arguments.add_common_args(p, "augment-pairs", steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH, seeds=True)
    p.add_argument("--transforms", default=",".join(TRANSFORM_NAMES),
                   help=f"comma-separated subset of {','.join(TRANSFORM_NAMES)} (default: all)")
    p.add_argument("--symmetric", action="store_true",
                   help="apply the transformations to both branches (default: one branch, the other identity, as the paper)")
    return p


def parse_transforms(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TRANSFORM_NAMES]
    if unknown or not names:
        raise C.ConfigError(f"--transforms: unknown {unknown or 'empty list'}; choose from {','.join(TRANSFORM_NAMES)}")
    if len(set(names)) != len(names):
        raise C.ConfigError(f"--transforms: {text!r} names a transformation twice")
    return [n for n in TRANSFORM_NAMES if n in names]  # canonical order


def cells(names: list[str]) -> list[tuple[str, ...]]:
    """Single transforms, then every unordered pair, in ``names`` order."""
    singles = [(a,) for a in names]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    return singles + pairs


def cell_name(cell: tuple[str, ...]) -> str:
    return "+".join(cell)


def cell_view(cell: tuple[str, ...], image_size: int):
    """The view config of a cell: only its transforms, p=1, blur sigma in pixels at ``image_size``."""
    return dataclasses.replace(view_config_for(cell, image_size), blur_sigma_ref_size=float(image_size))


def cell_layer(cell: tuple[str, ...], image_size: int, symmetric: bool) -> dict:
    view = to_dict(cell_view(cell, image_size))
    other = view if symmetric else to_dict(view_config_for((), image_size))
    return {"method": "simclr", "view": view, "view2": other}


def heatmap_matrix(results: dict[str, float], names: list[str]) -> list[list[float | None]]:
    """``m[i][j]``: top-1 of the pair (names[i], names[j]); the diagonal holds the single transforms."""
    m: list[list[float | None]] = []
    for i, a in enumerate(names):
        row = []
        for j, b in enumerate(names):
            key = a if i == j else cell_name(tuple(sorted((a, b), key=names.index)))
            row.append(results.get(key))
        m.append(row)
    return m


def draw_heatmap(ax, matrix: list[list[float | None]], names: list[str], title: str = ""):
    """Paper-style heatmap: rows = 1st transformation, columns = 2nd, annotated with top-1 (%)."""
    import numpy as np

    a = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    im = ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("2nd transformation")
    ax.set_ylabel("1st transformation")
    if title:
        ax.set_title(title, fontsize=9)
    finite = a[np.isfinite(a)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(a[i, j]):
                ax.text(j, i, f"{a[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if a[i, j] > mid else "black")
    return im


def run(args: argparse.Namespace) -> dict:
    names = parse_transforms(args.transforms)
    ctx = C.StudyContext("augment-pairs", args, {"transforms": names, "symmetric": bool(args.symmetric)})
    ctx.open()
    size = ctx.size
    todo = cells(names)
    C.log(f"augment-pairs: {len(todo)} cells ({len(names)} single + {len(todo) - len(names)} pairs), "
          f"{args.steps} steps of {args.batch_size} each, into {ctx.out}")
    baseline = C.random_init_cached(ctx)
    rows = []
    for cell in todo:
        res = ctx.run_cell(cell_name(cell), cell_layer(cell, size, args.symmetric), with_z=False)
        rows.append({"cell": cell_name(cell), "first": cell[0], "second": cell[-1], "linear_top1": res["linear_h"],
                     "linear_top1_std": res.get("linear_h_std"), "final_loss": res["final_loss"],
                     "seconds": res["seconds"]})
    results = {r["cell"]: r["linear_top1"] for r in rows}
    matrix = heatmap_matrix(results, names)

    outputs.write_csv(ctx.out / "cells.csv", rows)
    outputs.write_csv(ctx.out / "heatmap.csv", [{"first \\ second": a, **{b: v for b, v in zip(names, row)}}
                                          for a, row in zip(names, matrix)])
    singles = {a: results[a] for a in names}
    pairs = {r["cell"]: r["linear_top1"] for r in rows if r["first"] != r["second"]}
    best_pair = max(pairs, key=pairs.get) if pairs else None
    outputs.write_json(ctx.out / "results.json", {"transforms": names, "matrix": matrix, "random_init": baseline,
                                            "cells": rows, "symmetric": bool(args.symmetric)})

    plt = outputs.pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    branch = "both branches" if args.symmetric else "one branch"
    im = draw_heatmap(ax, matrix, names, f"SimCLR linear top-1 (%), {ctx.dataset} {size}px, "
                      f"{args.steps} steps x {args.batch_size}, {branch}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    png = outputs.save_figure(fig, ctx.out / "heatmap.png")

    order = sorted(rows, key=lambda r: -r["linear_top1"])
    lines = [
        "SimCLR Figure 5: SimCLR pre-trained with each single augmentation (diagonal) and each pair "
        f"(off-diagonal, mirrored: selfsup applies ops in a fixed order), {args.steps} steps of batch "
        f"{args.batch_size} each, then linear evaluation of h on {args.train_images} / {args.test_images} images.",
        f"Transformations in {branch}{'' if args.symmetric else ' (the other is the identity, as in the paper)'}; "
        f"blur sigma 0.1-2.0 px at {size} px.",
        "",
        f"- Untrained encoder (random init), same probe: **{baseline:.1f}%**.",
        f"- Best single: {max(singles, key=singles.get)} {max(singles.values()):.1f}%; "
        f"worst single: {min(singles, key=singles.get)} {min(singles.values()):.1f}%.",
    ]
    if best_pair:
        lines.append(f"- Best pair: {best_pair} {pairs[best_pair]:.1f}%; mean of pairs "
                     f"{sum(pairs.values()) / len(pairs):.1f}% vs mean of singles {sum(singles.values()) / len(singles):.1f}%.")
        best_row = next(r for r in rows if r["cell"] == best_pair)
        lines.append("- The best pair: " + outputs.separation(best_row, rows, "linear_top1", lambda r: r["cell"]) + ".")
        if "crop+colour" in pairs:
            lines.append(f"- crop+colour (the paper's key pair): {pairs['crop+colour']:.1f}%, rank "
                         f"{[r['cell'] for r in order].index('crop+colour') + 1} of {len(rows)} cells.")
    if args.seeds > 1:
        stds = [r["linear_top1_std"] for r in rows]
        lines.append(f"- Every cell is the mean of {args.seeds} pre-training seeds; the seed-to-seed standard deviation "
                     f"of a cell is {sum(stds) / len(stds):.1f} points on average (max {max(stds):.1f}).")
    lines += ["", "![heatmap](heatmap.png)", "", "Top cells:", ""]
    lines += outputs.markdown_table(["cell", "linear top-1 %", "final loss"],
                              [[r["cell"], outputs.pm(r, "linear_top1"), outputs.fmt(r["final_loss"], 3)] for r in order[:8]])
    summary = ctx.write_summary("Augmentation pairs (SimCLR Figure 5)", lines)
    return {"study": "augment-pairs", "out": str(ctx.out), "figures": [str(png)], "summary": str(summary),
            "random_init": baseline, "cells": len(rows)}
