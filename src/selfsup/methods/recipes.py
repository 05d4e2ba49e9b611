"""Named recipes: the values a pre-training run starts from, chosen from the encoder and the image size.

A recipe is a layer of config keys put *under* everything the user gives (command line, YAML file,
``--set``), so any key given explicitly still wins. ``RECIPES`` is the registry the CLI
(``--recipe NAME``), the docs and the tests enumerate:

- ``cpu``: the CPU default, tuned for the narrow CPU encoders (``*_narrow*``) on a 2-core CPU in
  ten minutes (docs/benchmarks.md): LARS base lr 2.0 (SimCLR, SimCLRv2) or 3.0 (BYOL) x B/256,
  temperature 0.2, 5% warm-up. These are the generic ``PretrainConfig`` defaults plus
  ``selfsup.methods.METHOD_DEFAULTS``, unchanged.
- ``simclr``: SimCLR (Chen et al. 2020), App. B.1 and B.9: LARS, lr 0.3 x B/256 at batch >= 4096 and
  the square-root rule 0.075 x sqrt(B) below (the paper recommends it for small batches and short runs,
  Fig. B.1; the two rules agree at 4096), weight decay 1e-6, temperature 0.1 (0.5 for CIFAR-size
  images of at most 32 px, App. B.9), 10 warm-up epochs then cosine, head 2048-2048-128 on a
  ResNet-50 (hidden width = the encoder's ``num_features``, as in the official code) ending in batch
  norm with a scale and no bias (official code), zero-initialised last BN scale of every residual
  block (official code).
- ``byol``: BYOL (Grill et al. 2020), Sec. 3.3 / App. C: LARS lr 0.2 x B/256, weight decay 1.5e-6,
  base tau 0.996, projector and predictor 4096-256 whose last layer has no bias (official code),
  10 warm-up epochs, zero-initialised residual BN scales (official code).
- ``simclrv2``: SimCLRv2 (Chen et al. 2020b), Sec. 2 / App.: LARS lr 0.1 x sqrt(B) (6.4 at 4096),
  weight decay 1e-4, temperature 0.1 (0.5 at CIFAR size, taken from SimCLR App. B.9; the v2 paper is
  silent), 3-layer head ending in BN with a scale (official code), 10 warm-up epochs (the official
  code uses 5). ``SIMCLRV2_FINETUNE`` holds its fine-tuning defaults for wide and SK encoders, which
  ``selfsup finetune`` applies through ``FINETUNE_RECIPES`` (``auto_finetune_recipe``).

Automatic choice (``auto_recipe``): a narrow CPU encoder gets ``cpu``; every other encoder gets the
paper recipe of its method. Within a paper recipe the image size picks the CIFAR-size (<= 32 px) or
ImageNet-size values. The chosen name is written into ``config.yaml`` (``recipe:``) and printed in
the first line of a run.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Callable

from selfsup.data.containers import DEFAULT_IMAGEFOLDER_SIZE, IMAGEFOLDER_PREFIX, canonical_dataset_name
from selfsup.methods import METHOD_DEFAULTS, METHODS, VIEW_PRESETS
from selfsup.models.backbones import BACKBONES, CPU_DEFAULT_BACKBONE
from selfsup.views.config import ViewConfig

SMALL_IMAGE_MAX = 32  # the official code's cut-off between CIFAR-size and ImageNet-size recipes and stems
WARN_LR_FACTOR = 3.0  # warn when the effective lr is more than this times the paper's

# Native image side of the built-in data sets, so a recipe can be resolved without reading pixels.
NATIVE_SIZES = {"fashion-mnist": 28, "mnist": 28, "embedded": 28, "cifar10": 32, "cifar100": 32, "stl10": 96}

# Image folders trained with a narrow CPU encoder default to this side (224, the ImageNet size, for other
# encoders): the CPU recipe was tuned on small images, and folders of up to 20,000 images at <= 64 px are
# decoded once into memory rather than streamed (selfsup.data.containers.IN_MEMORY_MAX_SIZE).
CPU_IMAGEFOLDER_SIZE = 64

# The narrow encoders the CPU default was tuned for.
CPU_BACKBONES = tuple(name for name in BACKBONES if "narrow" in name)
assert CPU_DEFAULT_BACKBONE in CPU_BACKBONES


class RecipeError(ValueError):
    """A recipe that does not exist or does not fit the method; ``config.build_config`` reports it as a ConfigError."""


@dataclass(frozen=True)
class Recipe:
    """``values(method, image_size, batch_size) -> config layer``; ``methods``: the methods it is defined for."""

    name: str
    summary: str
    methods: tuple[str, ...]
    values: Callable[[str, int, int], dict]


def _cpu(method: str, size: int, batch: int) -> dict:
    return copy.deepcopy(METHOD_DEFAULTS.get(method, {}))


def _simclr(method: str, size: int, batch: int) -> dict:
    small = size <= SMALL_IMAGE_MAX
    sqrt = batch < 4096  # App. B.1: square-root scaling for small batches; equal to 0.3 x B/256 at 4096
    out = {"temperature": 0.5 if small else 0.1, "proj_out_dim": 128, "proj_hidden_dim": None,
           "proj_layers": 3 if method == "simclrv2" else 2, "proj_last_bn": True, "zero_init_residual": True,
           "optim": {"name": "lars", "lr": 0.075 if sqrt else 0.3, "lr_scaling": "sqrt" if sqrt else "linear",
                     "weight_decay": 1e-6, "momentum": 0.9, "warmup_epochs": 10.0, "final_lr_fraction": 0.0}}
    return out


def _simclrv2(method: str, size: int, batch: int) -> dict:
    return {"temperature": 0.5 if size <= SMALL_IMAGE_MAX else 0.1, "proj_out_dim": 128, "proj_hidden_dim": None,
            "proj_layers": 3, "proj_last_bn": True, "zero_init_residual": True,
            "optim": {"name": "lars", "lr": 0.1, "lr_scaling": "sqrt", "weight_decay": 1e-4, "momentum": 0.9,
                      "warmup_epochs": 10.0, "final_lr_fraction": 0.0}}


def _byol(method: str, size: int, batch: int) -> dict:
    return {"proj_hidden_dim": 4096, "proj_out_dim": 256, "pred_hidden_dim": 4096, "proj_last_bias": False,
            "base_tau": 0.996, "zero_init_residual": True,
            "optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "weight_decay": 1.5e-6, "momentum": 0.9,
                      "warmup_epochs": 10.0, "final_lr_fraction": 0.0}}


RECIPES: dict[str, Recipe] = {
    "cpu": Recipe("cpu", "CPU default for the narrow encoders (LARS 2.0 x B/256 SimCLR / 3.0 BYOL, temperature 0.2, "
                  "5% warm-up; docs/benchmarks.md)", ("simclr", "simclrv2", "byol", "supervised"), _cpu),
    "simclr": Recipe("simclr", "SimCLR paper (LARS 0.075 x sqrt(B) below batch 4096, 0.3 x B/256 from 4096, wd 1e-6, "
                     "temperature 0.1 / 0.5 at <= 32 px, 10 warm-up epochs)", ("simclr", "simclrv2", "supervised"), _simclr),
    "byol": Recipe("byol", "BYOL paper (LARS 0.2 x B/256, wd 1.5e-6, tau 0.996, heads 4096-256, 10 warm-up epochs)",
                   ("byol",), _byol),
    "simclrv2": Recipe("simclrv2", "SimCLRv2 paper (LARS 0.1 x sqrt(B), wd 1e-4, temperature 0.1 / 0.5 at <= 32 px, "
                       "3-layer head, 10 warm-up epochs)", ("simclr", "simclrv2"), _simclrv2),
}

# supervised: the baseline beside a SimCLR run takes SimCLR's optimiser and views, so only the loss differs
PAPER_RECIPE = {"simclr": "simclr", "simclrv2": "simclrv2", "byol": "byol", "supervised": "simclr"}

# SimCLRv2's fine-tuning for wide and SK encoders (Sec. 3 / App. B): LARS, lr 0.005 x sqrt(B), batch 1024,
# no weight decay, fine-tuning from the head's first layer; 60 epochs at 1% labels, 30 at 10%.
SIMCLRV2_FINETUNE = {"optim": {"name": "lars", "lr": 0.005, "lr_scaling": "sqrt", "weight_decay": 0.0},
                     "batch_size": 1024, "epochs_at_1pct": 60, "epochs_at_10pct": 30, "from_head_layer": 1}

# The recipes ``selfsup finetune`` chooses from (``auto_finetune_recipe``), with the one-line summary it prints.
FINETUNE_RECIPES: dict[str, str] = {
    "default": "fine-tuning defaults (LARS 0.005 x sqrt(B), no weight decay, batch 256, 60 epochs at 1% labels "
               "and 30 above, from head layer 1 where the run has a head)",
    "simclrv2": "SimCLRv2 paper for wide and SK encoders (LARS 0.005 x sqrt(B), no weight decay, batch 1024, "
                "60 epochs at 1% labels and 30 above, from head layer 1)",
    "scratch": "from scratch, the supervised baseline (SGD 0.1 x B/256, weight decay 5e-4, batch 256)",
}
WIDE_OR_SK_TAGS = ("_2x", "_3x", "_sk")  # SimCLRv2's wide and selective-kernel ResNets (models/backbones.py)


def auto_finetune_recipe(pretrain_recipe: str | None, backbone: str) -> str:
    """``simclrv2`` for a run pre-trained with that recipe or on a wide or SK ResNet, else ``default``."""
    wide_or_sk = not backbone.startswith("timm:") and any(tag in backbone for tag in WIDE_OR_SK_TAGS)
    return "simclrv2" if pretrain_recipe == "simclrv2" or wide_or_sk else "default"


def finetune_values(name: str, label_fraction: float) -> dict:
    """The config layer of fine-tuning recipe ``name`` at ``label_fraction`` (``default``/``scratch``: none, the
    config's own defaults)."""
    if name != "simclrv2":
        return {}
    v = SIMCLRV2_FINETUNE
    return {"batch_size": v["batch_size"], "optim": dict(v["optim"]), "from_head_layer": v["from_head_layer"],
            "epochs": float(v["epochs_at_1pct"] if label_fraction <= 0.01 else v["epochs_at_10pct"])}


def paper_lr(method: str, batch_size: int) -> float:
    """The paper's effective LARS learning rate at ``batch_size`` (SimCLR: the larger of its two rules)."""
    if method == "byol":
        return 0.2 * batch_size / 256
    if method == "simclrv2":
        return 0.1 * math.sqrt(batch_size)
    return max(0.3 * batch_size / 256, 0.075 * math.sqrt(batch_size))


def auto_recipe(method: str, backbone: str) -> str:
    """``cpu`` for the narrow CPU encoders, else the paper recipe of ``method``."""
    return "cpu" if backbone in CPU_BACKBONES else PAPER_RECIPE.get(method, "cpu")


def native_image_size(dataset: str, image_size: int | None) -> int:
    """The training image side: ``image_size`` if given, else the data set's own (no pixels are read)."""
    if image_size is not None:
        return int(image_size)
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        return DEFAULT_IMAGEFOLDER_SIZE
    name = canonical_dataset_name(dataset)
    return NATIVE_SIZES.get("stl10" if name.startswith("stl10") else name, DEFAULT_IMAGEFOLDER_SIZE)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _view_dict(view: ViewConfig) -> dict:
    return {f.name: getattr(view, f.name) for f in dataclasses.fields(view)}


def resolve(data: dict, defaults: dict) -> dict:
    """Put the recipe's layer under ``data`` (the merged user layers) and merge partial view overrides.

    ``defaults`` holds the generic ``PretrainConfig`` defaults of the keys used here (method, backbone,
    batch_size, ...). Returns the complete layer with ``recipe`` set to the recipe's name. ``view`` and
    ``view2`` given partially change only the keys given, on top of the method's preset for the image
    size; a symmetric method's view 2 follows view 1 (one augmentation distribution, SimCLR Sec. 2.1),
    BYOL's view 2 keeps its own preset unless ``view2`` keys are given.
    """
    def get(key):
        return data.get(key, defaults.get(key))

    method, backbone = get("method"), get("backbone")
    if not isinstance(method, str) or not isinstance(backbone, str):
        return data  # validation names the bad key
    if data.get("recipe") is not None and not isinstance(data.get("recipe"), str):
        return data  # validation names the bad key
    if method not in METHODS:  # named before any recipe, which is defined per method
        close = difflib.get_close_matches(method, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"method: {method!r} is not a registered method; use one of {', '.join(METHODS)}{hint}")
    name = data.get("recipe") or auto_recipe(method, backbone)
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), list(RECIPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"recipe: {name!r} is not one of {', '.join(RECIPES)}{hint}")
    recipe = RECIPES[name]
    if method not in recipe.methods:
        raise RecipeError(f"recipe: {name!r} is defined for {', '.join(recipe.methods)}, not {method!r}; "
                          f"use --recipe {PAPER_RECIPE.get(method, 'cpu')} or --recipe cpu")
    dataset = get("dataset")
    if "image_size" not in data and isinstance(dataset, str) and dataset.startswith(IMAGEFOLDER_PREFIX) \
            and backbone in CPU_BACKBONES:
        data = {**data, "image_size": CPU_IMAGEFOLDER_SIZE}  # written into config.yaml, so a resume reads the same
    given = data.get("image_size")
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not 8 <= given <= 4096 or given != int(given):
        given = None  # absent or invalid: validation names an invalid one
    size = native_image_size(dataset if isinstance(dataset, str) else "", given)
    batch = get("batch_size")
    batch = batch if isinstance(batch, int) and batch >= 1 else 256
    layer = recipe.values(method, size, batch)
    if backbone.startswith("timm:"):
        layer.pop("zero_init_residual", None)  # a selfsup ResNet option; timm models have their own init
    # A warm-up given as a fraction wins over the recipe's warm-up in epochs.
    if isinstance(data.get("optim"), dict) and "warmup_fraction" in data["optim"] and "warmup_epochs" not in data["optim"]:
        layer.get("optim", {}).pop("warmup_epochs", None)
    out = _merge(layer, data)
    out["recipe"] = name
    if "small_stem" not in data and not backbone.startswith("timm:"):
        out["small_stem"] = size <= SMALL_IMAGE_MAX
    preset = VIEW_PRESETS.get(method)
    if preset is not None:
        p1, p2 = preset(size)
        symmetric = p1 == p2
        v1 = data.get("view")
        v2 = data.get("view2")
        if isinstance(v1, dict) or v1 is None:
            out["view"] = _merge(_view_dict(p1), v1 or {})
        if isinstance(v2, dict) or v2 is None:
            base2 = out["view"] if symmetric and isinstance(out.get("view"), dict) else _view_dict(p2)
            out["view2"] = _merge(base2, v2 or {})
    return out


def lr_warning(cfg) -> str | None:
    """The warning for an effective LARS lr more than 3x the paper's at this method and batch size, or None.

    Not given for the CPU recipe's own lr on a CPU encoder at batch <= 512, the setting it was measured in.
    """
    if cfg.optim.name != "lars":
        return None
    eff = effective_lr(cfg)
    ref = paper_lr(cfg.method, cfg.batch_size)
    if eff <= WARN_LR_FACTOR * ref:
        return None
    recipe = cfg.recipe or "none"
    if recipe == "cpu" and cfg.backbone in CPU_BACKBONES and cfg.batch_size <= 512 \
            and cfg.optim.lr == RECIPES["cpu"].values(cfg.method, 0, cfg.batch_size).get("optim", {}).get("lr"):
        return None
    paper = PAPER_RECIPE.get(cfg.method, "simclr")
    return (f"effective learning rate {eff:.3g} (optim.lr {cfg.optim.lr:g}, {cfg.optim.lr_scaling} scaling, batch "
            f"{cfg.batch_size}) is {eff / ref:.1f}x the {cfg.method} paper's {ref:.3g} at this batch size (recipe "
            f"{recipe}); lower optim.lr (--set optim.lr=...) or use --recipe {paper}")


def effective_lr(cfg) -> float:
    """The learning rate at the end of warm-up: ``optim.lr`` scaled by ``optim.lr_scaling`` with the batch size."""
    from_rule = {"linear": cfg.batch_size / 256, "sqrt": math.sqrt(cfg.batch_size), "none": 1.0}
    return cfg.optim.lr * from_rule[cfg.optim.lr_scaling]


def describe(cfg) -> str:
    """One line for the start of a run: the recipe and what it resolved to."""
    name = cfg.recipe or "none (values as given)"
    summary = RECIPES[cfg.recipe].summary if cfg.recipe in RECIPES else ""
    return (f"[selfsup] recipe {name}{': ' + summary if summary else ''}; {cfg.method}, {cfg.backbone}, batch "
            f"{cfg.batch_size}, {cfg.optim.name} lr {effective_lr(cfg):.4g}, weight decay {cfg.optim.weight_decay:g}"
            + (f", temperature {cfg.temperature:g}" if cfg.method != "byol" else f", base tau {cfg.base_tau:g}"))
