"""``selfsup pretrain ... --dry-run``: the resolved run, checked, without reading pixels or building a model.

What a user checks before a GPU-day: the recipe, the method's own keys, the view distributions, the
optimiser, the effective learning rate at this batch size, the warm-up and the number of steps. The
resolved config goes to stdout as YAML, exactly as the run writes it into ``config.yaml`` (loadable again
with ``--config``); the derived values follow as YAML comments.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from selfsup.data.containers import IMAGEFOLDER_PREFIX, canonical_dataset_name
from selfsup.data.folders import images_under, resolve_split_folder
from selfsup.errors import ConfigError
from selfsup.methods import recipes
from selfsup.training.config import PretrainConfig, check_length, effective_lr, lr_warning
from selfsup.training.config_io import to_dict
from selfsup.training.step import warmup_steps_for

def count_train_images(dataset: str) -> int | None:
    """Number of pre-training images, from a table or by listing an image folder (no file is opened)."""
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        path = Path(dataset[len(IMAGEFOLDER_PREFIX):]).expanduser()
        if not path.is_dir():
            raise ConfigError(f"dataset: image folder {str(path)!r} does not exist or is not a folder")
        folder, _ = resolve_split_folder(path, "train")
        return len(images_under(folder))
    name = canonical_dataset_name(dataset)
    return recipes.NUM_TRAIN_IMAGES.get("stl10" if name.startswith("stl10") else name)


def derived(cfg: PretrainConfig) -> dict:
    """Values the run will compute from the config: image size, steps, warm-up, effective lr."""
    check_length(cfg)
    size = recipes.native_image_size(cfg.dataset, cfg.image_size)
    n = count_train_images(cfg.dataset)
    out = {"image_size": size, "num_images": n, "effective_lr": round(effective_lr(cfg), 6),
           "paper_lr_at_this_batch": round(cfg.spec.paper_lr(cfg.batch_size), 6)}
    if n is not None:
        if n < cfg.batch_size:
            raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the data set ({n} images); lower --batch-size")
        spe = n // cfg.batch_size
        out["steps_per_epoch"] = spe
        total = cfg.steps if cfg.steps is not None else (
            max(1, int(round(cfg.epochs * spe))) if cfg.epochs is not None else None)
        out["total_steps"] = total if total is not None else "fixed after timing the first steps (--minutes)"
        if total is not None:
            out["warmup_steps"] = warmup_steps_for(cfg, total, spe)
            out["epochs"] = round(total / spe, 3)
    warning = lr_warning(cfg)
    if warning:
        out["warning"] = warning
        print(f"[selfsup] warning: {warning}", file=sys.stderr)
    return out


def render(cfg: PretrainConfig) -> str:
    """The resolved config as YAML followed by the derived values as comments."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    lines = [f"# {k}: {v}" for k, v in derived(cfg).items()]
    return text + "# --- derived (not config keys) ---\n" + "\n".join(lines) + "\n"
