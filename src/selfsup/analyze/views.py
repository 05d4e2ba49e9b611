"""``selfsup analyze views``: what the augmentation does to real images (the first thing to check).

Writes ``views.png``: one row per image (one image of each class where there are labels), the
original first, then augmented views alternating between the two view distributions (view 1, view 2,
view 1, ...), and ``transforms.png``: the original, then each transformation of SimCLR Figure 5
(``TRANSFORM_NAMES``) alone, with blur sigma in pixels at the image size so it is visible.

The view config is a method's preset (``--preset``, default simclr, at the image size), a set of
single transformations (``--transforms crop,colour``), or a run's own (``--run``); ``--set KEY=VALUE``
then changes a ``ViewConfig`` field of both views (``view.KEY`` / ``view2.KEY``: only one of them).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from selfsup.analyze import arguments, common as C, outputs
from selfsup.analyze.augment_pairs import cell_view, parse_transforms
from selfsup.data.datasets import load_dataset
from selfsup.methods import METHODS
from selfsup.training.config_io import from_dict, merge, parse_overrides, to_dict
from selfsup.training.runs import load_run
from selfsup.views.config import ViewConfig, view_config_for, TRANSFORM_NAMES
from selfsup.views.augment import BatchAugment, save_view_grid


def build_parser(prog: str = "selfsup analyze views") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    arguments.add_common_args(p, "views", trains=False, image_size=0)
    p.add_argument("--preset", default="simclr", help="a method's view preset: simclr (default), byol, ...")
    p.add_argument("--transforms", help="instead of a preset: only these transformations, p=1 (e.g. crop,colour)")
    p.add_argument("--run", type=Path, help="instead of a preset: the views of this run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="ViewConfig field for both views (view.KEY / view2.KEY: one view), e.g. --set blur_p=1")
    p.add_argument("--images", type=int, default=8, help="rows (images) per grid (default 8)")
    p.add_argument("--views", type=int, default=6, help="augmented views per image (default 6)")
    p.add_argument("--zoom", type=int, default=1, help="enlarge the PNGs this many times, nearest neighbour (default 1)")
    return p


def resolve_views(args: argparse.Namespace, image_size: int):
    """(view 1, view 2) from --run, --transforms or --preset, then --set."""
    given = [f for f, v in (("--run", args.run), ("--transforms", args.transforms)) if v]
    if len(given) > 1:
        raise C.ConfigError(f"give at most one of --run, --transforms, --preset (got {' and '.join(given)})")
    if args.run:
        cfg = load_run(args.run).config
        if cfg.view is None:
            raise C.ConfigError(f"--run {args.run}: its config.yaml has no resolved view; use --preset {cfg.method}")
        v1, v2 = cfg.view, cfg.view2 or cfg.view
    elif args.transforms:
        v1 = cell_view(tuple(parse_transforms(args.transforms)), image_size)
        v2 = view_config_for((), image_size)
    else:
        if args.preset not in METHODS:
            raise C.ConfigError(f"--preset: {args.preset!r} has no view preset; choose from {', '.join(METHODS)}")
        v1, v2 = METHODS[args.preset].views(image_size)
    over = parse_overrides(args.overrides)
    both = {k: v for k, v in over.items() if k not in ("view", "view2")}
    out = []
    for key, v in (("view", v1), ("view2", v2)):
        data = merge(merge(to_dict(v), both), over.get(key) or {})
        out.append(from_dict(ViewConfig, data, prefix=f"{key}."))
    assert all(isinstance(v, ViewConfig) for v in out)
    return out[0], out[1]


def pick_images(dataset, n: int) -> torch.Tensor:
    """One image per class (in class order) while classes last, then the next images; uint8."""
    images = dataset.images if hasattr(dataset, "images") else None
    labels = dataset.labels
    chosen: list[int] = []
    if labels is not None:
        for c in range(dataset.num_classes):
            idx = (labels == c).nonzero().flatten()
            if len(idx) and len(chosen) < n:
                chosen.append(int(idx[0]))
    for i in range(len(dataset)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    if images is not None:
        return images[torch.tensor(chosen)]
    return torch.stack([dataset[i][0] for i in chosen])


def zoom(path: Path, factor: int) -> None:
    if factor == 1:
        return
    from PIL import Image

    with Image.open(path) as im:
        big = im.resize((im.width * factor, im.height * factor), Image.NEAREST)
    big.save(path, optimize=True)


def run(args: argparse.Namespace) -> dict:
    if args.images < 1 or args.views < 1 or args.zoom < 1:
        raise C.ConfigError("--images, --views and --zoom must be >= 1")
    if args.run and args.dataset is None:
        run = load_run(args.run)
        args.dataset, args.data_dir = run.config.dataset, args.data_dir or run.config.data_dir
        args.image_size = args.image_size or run.image_size
    ctx = C.StudyContext("views", args)
    ctx.out.mkdir(parents=True, exist_ok=True)  # a picture: no study.json, overwritten freely
    size = ctx.size
    v1, v2 = resolve_views(args, size)
    dataset = load_dataset(ctx.dataset, "train", data_dir=ctx.data_dir)
    images = pick_images(dataset, args.images)
    aug1 = BatchAugment(v1, size, dataset.mean, dataset.std)
    aug2 = BatchAugment(v2, size, dataset.mean, dataset.std)
    views_png = save_view_grid(images, [aug1, aug2], ctx.out / "views.png", n_images=args.images,
                               n_views=args.views, seed=ctx.seed)
    singles = [BatchAugment(cell_view((t,), size), size, dataset.mean, dataset.std) for t in TRANSFORM_NAMES]
    transforms_png = save_view_grid(images, singles, ctx.out / "transforms.png", n_images=args.images,
                                    n_views=len(singles), seed=ctx.seed)
    for png in (views_png, transforms_png):
        zoom(png, args.zoom)
    outputs.write_json(ctx.out / "view_config.json", {"dataset": ctx.dataset, "image_size": size,
                                                "view": to_dict(v1), "view2": to_dict(v2)})
    source = f"run {args.run}" if args.run else (f"transforms {args.transforms}" if args.transforms else f"preset {args.preset}")
    lines = [
        f"Augmented views of {len(images)} {ctx.dataset} training images at {size} px ({source}"
        f"{', with ' + ', '.join(args.overrides) if args.overrides else ''}).",
        "",
        f"`views.png`: the original, then {args.views} views alternating view 1 / view 2 (view 1 in columns 2, 4, ...).",
        "",
        "![views](views.png)",
        "",
        "`transforms.png`: the original, then each single transformation of SimCLR Figure 5, in the order "
        f"{', '.join(TRANSFORM_NAMES)} (blur sigma 0.1-2.0 px at {size} px).",
        "",
        "![transforms](transforms.png)",
        "",
        "The view configs are in `view_config.json`.",
    ]
    summary = ctx.write_summary("Augmented views", lines)
    return {"study": "views", "out": str(ctx.out), "figures": [str(views_png), str(transforms_png)],
            "summary": str(summary)}
