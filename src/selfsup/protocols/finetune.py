"""Semi-supervised fine-tuning from a head layer (SimCLRv2, Chen et al. 2020b, Sec. 2 and Appendix B).

SimCLRv2 fine-tunes the encoder *and the first K layers of the projection head* plus a new linear
classifier on a class-balanced label subset (1% / 10%): the network is ``fc(g_K(...g_1(f(x))))``,
i.e. the classifier reads ``head(h, return_all=True)[K]``. K=0 is the classic "drop the whole head",
K=1 (the middle of a 3-layer head) the paper's choice with few labels.

Paper recipe and what we do (ImageNet -> small data):

- LARS, no weight decay, no warm-up, lr 0.005 x sqrt(batch) (0.16 at batch 1024), cosine decay;
  60 epochs at 1% labels, 30 at 10% (and at 100%). Defaults here are the same, at batch 256.
- Recipes (``selfsup.methods.recipes.FINETUNE_RECIPES``): ``build_config`` picks one from the pre-training run
  (``FinetuneConfig.resolve``) and puts its values under the keys given, as pre-training does. A run pre-trained
  with the ``simclrv2`` recipe or on a wide (``_2x``, ``_3x``) or SK (``_sk``) ResNet gets ``simclrv2``: the paper's
  values above at batch 1024, explicitly; any other run ``default`` (the defaults, unchanged); no ``--run``
  ``scratch``. The name is printed first and recorded in ``config.yaml``, ``run.json`` and ``results.json``.
- Augmentation: random crop (inception crop, scale 0.08-1) and horizontal flip only.
- The classifier starts at zero (all classes equally likely) and is excluded from LARS's trust ratio
  and from weight decay, as the released code treats its supervised head.
- Without ``--run`` the same network is trained from scratch on the subset (the supervised baseline)
  with the usual supervised recipe instead (``SCRATCH_OPTIM``: SGD, lr 0.1 x B/256, wd 5e-4).
- The paper's batch norm is global; under torchrun each rank here normalises over its own share of
  the batch (no SyncBN in fine-tuning and distillation).
- The label subset is drawn by :func:`selfsup.data.datasets.label_subset` from a seed, not read from the
  paper's fixed ImageNet lists. Its indices (into the training split) are written to the run folder
  as ``label_subset.json`` and reused from there, so that every run on a subset sees the same images.

A run folder holds ``config.yaml``, ``run.json``, ``label_subset.json``, ``metrics.jsonl``,
``checkpoints/``, ``model.safetensors`` (``backbone.*``, ``head.layers.*``, ``fc.*``) and
``results.json`` (top-1/top-5 on the test split).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.data.labels import LABEL_BALANCES
from selfsup.errors import ConfigError
from selfsup.methods.recipes import FINETUNE_RECIPES, auto_finetune_recipe, finetune_values
from selfsup.models.backbones import CPU_DEFAULT_BACKBONE, build_backbone
from selfsup.protocols.classifier import Classifier, HeadLayers, classifier_from_pretrain, head_spec_of
from selfsup.protocols.label_subsets import prepare_label_subset
from selfsup.protocols.labelled_loop import (
    begin_labelled_run, check_loop_settings, LoopSettings, LoopSpec, classifier_optimizer, effective_batch,
    labeled_stream, length_in_steps, train_and_evaluate,
)
from selfsup.training.config import OptimConfig
from selfsup.errors import check_choice, check_field
from selfsup.training.config_io import merge
from selfsup.training.runs import RunInfo, load_run
from selfsup.training.schedules import scaled_lr
from selfsup.training.batches import mix_seed
from selfsup.views.augment import BatchAugment
from selfsup.views.config import ViewConfig


# ------------------------------------------------------------------------------------------------
# Config


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """SimCLRv2 Appendix B fine-tuning: LARS, lr 0.005 x sqrt(B), no weight decay, no warm-up."""

    lr: float = 0.005
    lr_scaling: str = "sqrt"
    weight_decay: float = 0.0
    warmup_fraction: float = 0.0


# From scratch (the supervised baseline): the usual ResNet recipe (He et al. 2016), SGD with Nesterov
# momentum, lr 0.1 x B/256, weight decay 5e-4, cosine. SimCLRv2's tiny fine-tuning lr would barely
# move randomly initialised weights.
SCRATCH_OPTIM = FinetuneOptimConfig(name="sgd", lr=0.1, lr_scaling="linear", weight_decay=5e-4)


def paper_epochs(label_fraction: float) -> float:
    """SimCLRv2 / SimCLR B.5: 60 epochs of fine-tuning with 1% of the labels, 30 with more."""
    return 60.0 if label_fraction <= 0.01 else 30.0


@dataclass
class FinetuneConfig(LoopSettings):
    """A fine-tuning run. ``run`` is a pre-training run folder; without it the network is trained from
    scratch (``backbone``, ``backbone_width``, ``image_size``), the supervised baseline."""

    run: str | None = None
    backbone: str | None = None  # from scratch only; None: the CPU default encoder
    backbone_width: float | None = None  # from scratch only
    image_size: int | None = None  # from scratch only; None: the data set's size (a run's: its own)
    dataset: str | None = None  # None: the pre-training run's data set
    data_dir: str | None = None
    label_fraction: float = 0.1
    label_seed: int = 0
    label_subset: str | None = None  # a label_subset.json from another run, or an official list (one file name a line)
    label_balance: str = "equal"  # equal: the same count per class (the papers' lists); proportional: f x n_c per class
    from_head_layer: int | None = None  # None: 1 with a pre-trained projection head, else 0
    batch_size: int = 256
    epochs: float | None = None  # None (and no steps): paper_epochs(label_fraction)
    steps: int | None = None
    view: ViewConfig | None = None  # None: random crop + flip only (the paper)
    optim: FinetuneOptimConfig | None = None  # None: FinetuneOptimConfig() with --run, SCRATCH_OPTIM without
    # FINETUNE_RECIPES name whose values fill the keys not given; build_config picks it from the run (resolve).
    # None: no recipe, the values as given (a FinetuneConfig built directly, or a run resumed from before recipes).
    recipe: str | None = None

    @staticmethod
    def resolve(data: dict) -> dict:
        """The fine-tuning recipe's values under ``data`` (the keys given win), its name in ``recipe``.

        The recipe is ``data["recipe"]`` if given, else chosen from the pre-training run ``data["run"]`` by
        :func:`~selfsup.methods.recipes.auto_finetune_recipe` (its recipe and backbone), or ``scratch`` without a run.
        ``recipe`` given as None keeps the values as given.
        """
        if "recipe" in data and data["recipe"] is None:
            return data
        name = data.get("recipe")
        has_head = True
        if isinstance(data.get("run"), (str, Path)):
            pre = load_run(data["run"])
            name = name or auto_finetune_recipe(pre.config.recipe, pre.config.backbone)
            has_head = head_spec_of(pre.weights) is not None
        name = name or "scratch"
        if name not in FINETUNE_RECIPES:
            return data  # validate names the bad recipe
        fraction = data.get("label_fraction", FinetuneConfig.label_fraction)
        layer = finetune_values(name, fraction if isinstance(fraction, (int, float)) else FinetuneConfig.label_fraction)
        if data.get("epochs") is not None or data.get("steps") is not None:
            layer.pop("epochs", None)  # a length given in steps (or epochs) wins
        if not has_head:
            layer.pop("from_head_layer", None)  # nothing to fine-tune from: the classifier reads the backbone
        return {**merge(layer, data), "recipe": name}

    def validate(self) -> None:
        if self.recipe is not None:
            check_choice("recipe", self.recipe, tuple(FINETUNE_RECIPES))
        check_field("run", self.run is not None or self.from_head_layer in (None, 0),
                    "--from-head-layer > 0 needs a pre-trained projection head: give --run PRETRAIN_RUN")
        if self.run is not None:
            for key in ("backbone", "backbone_width", "image_size"):
                check_field(key, getattr(self, key) is None, f"is set by the pre-training run {self.run}; "
                            "leave it out (it is only for training from scratch)")
        check_field("label_fraction", 0 < self.label_fraction <= 1, "must be in (0, 1], e.g. 0.01 or 0.1")
        check_choice("label_balance", self.label_balance, LABEL_BALANCES)
        check_field("from_head_layer", self.from_head_layer is None or self.from_head_layer >= 0, "must be >= 0")
        check_field("backbone_width", self.backbone_width is None or (self.backbone_width > 0 and math.isfinite(self.backbone_width)),
                    "must be > 0")
        check_field("image_size", self.image_size is None or self.image_size >= 8, "must be >= 8 pixels")
        check_loop_settings(self)


def crop_flip_view() -> ViewConfig:
    """Random resized crop (scale 0.08-1, aspect 3/4-4/3) + horizontal flip, nothing else (SimCLRv2 B)."""
    return ViewConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


# ------------------------------------------------------------------------------------------------
# Fine-tuning


FREE_KEYS = {"device", "data_dir", "log_every", "checkpoint_every", "keep_last", "eval_batch_size"}


def _optim_of(cfg: FinetuneConfig) -> FinetuneOptimConfig:
    """``cfg.optim``, else the default of its kind of run: SimCLRv2's with a pre-training run, SCRATCH_OPTIM without."""
    return cfg.optim or (FinetuneOptimConfig() if cfg.run is not None else replace(SCRATCH_OPTIM))


def describe(cfg: FinetuneConfig) -> str:
    """One line for the start of a fine-tuning run: the recipe and what it resolved to."""
    name = cfg.recipe or "none (values as given)"
    summary = FINETUNE_RECIPES.get(cfg.recipe, "")
    optim = _optim_of(cfg)
    scaling = {"linear": " x B/256", "sqrt": " x sqrt(B)", "none": ""}[optim.lr_scaling]
    length = (f"{cfg.steps} steps" if cfg.steps is not None else
              f"{cfg.epochs if cfg.epochs is not None else paper_epochs(cfg.label_fraction):g} epochs")
    head = "1 with a head, else 0" if cfg.from_head_layer is None else cfg.from_head_layer
    return (f"[selfsup] fine-tuning recipe {name}{': ' + summary if summary else ''}; batch {cfg.batch_size}, "
            f"{optim.name} lr {optim.lr:g}{scaling} = {scaled_lr(optim.lr, cfg.batch_size, optim.lr_scaling):.4g}, "
            f"weight decay {optim.weight_decay:g}, {length} at {cfg.label_fraction:g} of the labels, "
            f"from head layer {head}")


def _load_splits(cfg: FinetuneConfig, pre: RunInfo | None) -> tuple[str, str | None, object, object]:
    """(data set name, data dir, training split, test split): the pre-training run's data set unless given."""
    if pre is not None:
        dataset_name = cfg.dataset or pre.config.dataset
        data_dir, load_size = cfg.data_dir or pre.config.data_dir, pre.image_size
    else:
        dataset_name, data_dir, load_size = cfg.dataset or "fashion-mnist", cfg.data_dir, cfg.image_size
    if dataset_name.startswith("stl10"):
        dataset_name = "stl10"
    train = load_dataset(dataset_name, "train", data_dir=data_dir, image_size=load_size)
    test = load_dataset(dataset_name, "test", data_dir=data_dir, image_size=load_size)
    if train.labels is None or test.labels is None:
        raise ConfigError(f"dataset: {dataset_name} has no labels to fine-tune on")
    return dataset_name, data_dir, train, test


def _build_network(cfg: FinetuneConfig, pre: RunInfo | None, train, dataset_name: str) -> tuple[Classifier, dict]:
    """The classifier and its description: the pre-training run's weights, or a fresh network (from scratch)."""
    if pre is not None:
        model, info = classifier_from_pretrain(pre, cfg.from_head_layer, train.num_classes)
        if train.num_channels != info["in_channels"]:
            raise ConfigError(f"dataset: {dataset_name} has {train.num_channels}-channel images but the encoder of "
                              f"{cfg.run} was trained on {info['in_channels']}-channel images")
        return model, info
    name = cfg.backbone or CPU_DEFAULT_BACKBONE
    image_size = cfg.image_size or train.image_size
    kw = {} if cfg.backbone_width is None else {"width": cfg.backbone_width}
    backbone = build_backbone(name, in_channels=train.num_channels, image_size=image_size, **kw)
    model = Classifier(backbone, HeadLayers([], backbone.num_features), train.num_classes)
    info = {"backbone": name, "backbone_width": cfg.backbone_width, "image_size": image_size,
            "in_channels": train.num_channels, "head_spec": None, "from_head_layer": 0,
            "small_stem": getattr(backbone, "small_stem", None)}
    return model, info


def finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune (or train from scratch) on a label subset, evaluate on the test split; returns the results.

    Writes the run folder described in the module docstring. ``resume=True`` continues from the newest
    checkpoint with the saved config (given settings must agree, except device and bookkeeping).
    """
    cfg, run_dir, device, precision, owns_group, weights, state = begin_labelled_run(cfg, run_dir, resume, "finetune",
                                                                                    FREE_KEYS)
    if dist.is_main_process():  # the first line of the run, before any data is read
        print(describe(cfg), file=sys.stderr, flush=True)
    torch.manual_seed(cfg.seed)
    pre = load_run(cfg.run) if cfg.run is not None else None
    dataset_name, data_dir, train, test = _load_splits(cfg, pre)
    model, info = _build_network(cfg, pre, train, dataset_name)
    cfg = replace(cfg, from_head_layer=info["from_head_layer"], dataset=dataset_name,
                  view=cfg.view if cfg.view is not None else crop_flip_view(), optim=_optim_of(cfg))
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    model.to(device)
    image_size = info["image_size"]

    # The label subset, its batches and their augmentation.
    idx = prepare_label_subset(run_dir, train.labels, dataset_name, cfg.label_fraction, cfg.label_seed,
                               train.num_classes, cfg.label_subset, cfg.label_balance, getattr(train, "files", None))
    world = dist.world_size()
    batch = effective_batch(cfg.batch_size, len(idx), world)
    total_steps = int(state["total_steps"]) if state else length_in_steps(
        cfg.epochs, cfg.steps, paper_epochs(cfg.label_fraction), len(idx), batch)
    aug = BatchAugment(cfg.view, image_size, train.mean, train.std)
    base_lr = scaled_lr(cfg.optim.lr, batch, cfg.optim.lr_scaling)
    optimizer = classifier_optimizer(cfg.optim, model, base_lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    def step_loss(step: int, net: nn.Module, item) -> tuple[torch.Tensor, dict]:
        images, labels = item
        gen = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, step, dist.rank(), 4))
        logits = net(aug(images, gen))
        loss = F.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean() * 100
        return loss, {"train_top1": float(acc)}

    spec = LoopSpec("finetune", total_steps, base_lr, int(round(cfg.optim.warmup_fraction * total_steps)),
                    base_lr * cfg.optim.final_lr_fraction, step_loss,
                    lambda s, t: labeled_stream(train, idx, batch, mix_seed(cfg.seed, 5), s, t, device), batch)
    run_info = {**info, "num_classes": train.num_classes, "dataset": dataset_name, "data_dir": data_dir,
                "dataset_mean": list(train.mean), "dataset_std": list(train.std), "num_labeled": len(idx),
                "batch_size": batch, "total_steps": total_steps, "base_lr": base_lr, "precision": precision,
                "device": str(device), "world_size": world, "recipe": cfg.recipe}
    result = train_and_evaluate(cfg, spec, model, optimizer, run_dir, device, precision, state, progress, run_info,
                                test, image_size, {"label_fraction": cfg.label_fraction, "num_labeled": len(idx),
                                                   "from_head_layer": info["from_head_layer"],
                                                   "pretrain_run": cfg.run, "backbone": info["backbone"],
                                                   "recipe": cfg.recipe})
    if owns_group:
        dist.destroy()
    return result
