"""Named recipes: the values a pre-training run starts from, chosen from the encoder and the image size.

A recipe is a layer of config keys put *under* everything the user gives (command line, YAML file,
``--set``), so any key given explicitly still wins. ``RECIPES`` is the registry the CLI
(``--recipe NAME``), the docs and the tests enumerate, built from the method specs:

- ``cpu``: the CPU default, tuned for the narrow CPU encoders (``*_narrow*``) on a 2-core CPU in
  ten minutes: each method's ``MethodSpec.cpu`` layer (e.g. LARS base lr 2.0 for SimCLR, 3.0 for BYOL)
  over the config's defaults.
- one paper recipe per method that defines one (``MethodSpec.recipes``: ``simclr``, ``simclrv2``,
  ``byol``); its docstring in the method's module cites the paper's values. A method may accept another
  method's recipe (``MethodSpec.accepts``): SimCLRv2 runs SimCLR's, the supervised baseline takes SimCLR's
  optimiser; the recipe's keys of the method section then fill the keys this method has.

Automatic choice (``auto_recipe``): a narrow CPU encoder gets ``cpu``; every other encoder gets the
paper recipe of its method. Within a paper recipe the image size picks the CIFAR-size (<= 32 px) or
ImageNet-size values. The chosen name is written into ``config.yaml`` (``recipe:``) and printed in
the first line of a run. ``SIMCLRV2_FINETUNE`` holds SimCLRv2's fine-tuning defaults for wide and SK
encoders, which ``selfsup finetune`` applies through ``FINETUNE_RECIPES`` (``auto_finetune_recipe``).
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Callable

from selfsup.data.containers import DEFAULT_IMAGEFOLDER_SIZE, IMAGEFOLDER_PREFIX, canonical_dataset_name
from selfsup.methods import METHODS
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.backbones import BACKBONES, CPU_DEFAULT_BACKBONE

# Native image side and number of pre-training images of the built-in data sets (STL-10: train+unlabeled), so a
# recipe can be resolved without reading pixels.
NATIVE_SIZES = {"fashion-mnist": 28, "mnist": 28, "embedded": 28, "cifar10": 32, "cifar100": 32, "stl10": 96}
NUM_TRAIN_IMAGES = {"fashion-mnist": 60000, "mnist": 60000, "embedded": 10000, "cifar10": 50000, "cifar100": 50000,
                    "stl10": 105000}

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
    """``values(spec, image_size, batch_size, epochs)``: the recipe's layers, a later one winning (``epochs`` None:
    not known before the run); ``summary``: the line a run prints."""

    name: str
    summary: str
    values: Callable[[MethodSpec, int, int, float | None], tuple[RecipeLayer, ...]]


def _cpu(spec: MethodSpec, size: int, batch: int, epochs: float | None) -> tuple[RecipeLayer, ...]:
    return (spec.cpu,)


def _paper(recipe: PaperRecipe) -> Callable[[MethodSpec, int, int, float | None], tuple[RecipeLayer, ...]]:
    def values(spec: MethodSpec, size: int, batch: int, epochs: float | None) -> tuple[RecipeLayer, ...]:
        by_size = recipe.values(size, batch)
        return (by_size,) if recipe.by_length is None else (by_size, recipe.by_length(epochs))

    return values


RECIPES: dict[str, Recipe] = {
    "cpu": Recipe("cpu", "CPU default for the narrow encoders (each method's values measured at 1,000 steps on "
                  "Fashion-MNIST, over the defaults: 5% warm-up; --dry-run shows them)", _cpu),
    **{r.name: Recipe(r.name, r.summary, _paper(r)) for spec in METHODS.values() for r in spec.recipes},
}


def recipe_layers(name: str, method: str, image_size: int, batch_size: int, epochs: float | None = None) -> list[dict]:
    """The config layers of recipe ``name`` for ``method``, a later one winning (the values by image size and batch,
    then those by run length): each its shared keys, and its method keys under the method's section (only those
    the method has: the supervised baseline takes SimCLR's optimiser, not its temperature)."""
    spec = METHODS[method]
    if name not in spec.accepts:
        raise RecipeError(f"recipe: {name!r} is not defined for {method!r}; use --recipe {spec.paper_recipe} or "
                          "--recipe cpu")
    out = []
    for layer in RECIPES[name].values(spec, image_size, batch_size, epochs):
        part = copy.deepcopy(layer.shared)
        section = {k: v for k, v in layer.section.items() if k in spec.keys()}
        if section:
            part[method] = copy.deepcopy(section)
        out.append(part)
    return out


def check_names(method: str, recipe: str | None) -> None:
    """``RecipeError`` naming the closest name for an unknown method or recipe."""
    if method not in METHODS:  # named before any recipe, which is defined per method
        close = difflib.get_close_matches(method, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"method: {method!r} is not a registered method; use one of {', '.join(METHODS)}{hint}")
    if recipe is not None and recipe not in RECIPES:
        close = difflib.get_close_matches(str(recipe), list(RECIPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"recipe: {recipe!r} is not one of {', '.join(RECIPES)}{hint}")


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
    """The paper's effective learning rate of ``method`` at ``batch_size`` (``MethodSpec.paper_lr``)."""
    return METHODS[method].paper_lr(batch_size)


def auto_recipe(method: str, backbone: str) -> str:
    """``cpu`` for the narrow CPU encoders, else the paper recipe of ``method``."""
    return "cpu" if backbone in CPU_BACKBONES else METHODS[method].paper_recipe


def native_image_size(dataset: str, image_size: int | None) -> int:
    """The training image side: ``image_size`` if given, else the data set's own (no pixels are read)."""
    if image_size is not None:
        return int(image_size)
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        return DEFAULT_IMAGEFOLDER_SIZE
    name = canonical_dataset_name(dataset)
    return NATIVE_SIZES.get("stl10" if name.startswith("stl10") else name, DEFAULT_IMAGEFOLDER_SIZE)


def run_epochs(dataset: str, batch_size: int, epochs: float | None, steps: int | None) -> float | None:
    """The run's length in epochs, known before the run: ``epochs``, or ``steps`` over a built-in data set's
    size; None for ``--minutes`` and for steps over data whose size is not in the table (read from disk)."""
    if epochs is not None:
        return float(epochs)
    name = canonical_dataset_name(dataset) if not dataset.startswith(IMAGEFOLDER_PREFIX) else ""
    n = NUM_TRAIN_IMAGES.get("stl10" if name.startswith("stl10") else name)
    if steps is None or n is None or batch_size < 1:
        return None
    return steps / max(1, n // batch_size)
