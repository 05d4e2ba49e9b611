"""Semi-supervised fine-tuning from a head layer (SimCLRv2, Chen et al. 2020b, Sec. 2 and Appendix B).

SimCLRv2 fine-tunes the encoder *and the first K layers of the projection head* plus a new linear
classifier on a class-balanced label subset (1% / 10%): the network is ``fc(g_K(...g_1(f(x))))``,
i.e. the classifier reads ``head(h, return_all=True)[K]``. K=0 is the classic "drop the whole head",
K=1 (the middle of a 3-layer head) the paper's choice with few labels.

Paper recipe and what we do (ImageNet -> small data):

- LARS, no weight decay, no warm-up, lr 0.005 x sqrt(batch) (0.16 at batch 1024), cosine decay;
  60 epochs at 1% labels, 30 at 10% (and at 100%). Defaults here are the same.
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

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.data.labels import LABEL_BALANCES, label_subset, read_label_list
from selfsup.errors import ConfigError
from selfsup.models.backbones import CPU_DEFAULT_BACKBONE, build_backbone, saved_stem
from selfsup.models.heads import ProjectionHead
from selfsup.protocols.labelled_loop import (
    begin_labelled_run, LoopSettings, RESULTS_FILE, LoopSpec, classifier_optimizer, effective_batch, labeled_stream,
    length_in_steps, mix_seed, prepare_run_dir, resume_state, setup_device, train_and_evaluate,
)
from selfsup.training import checkpoint as ckpt
from selfsup.training.config import OptimConfig, _check, _choice
from selfsup.training.runs import RunInfo, load_encoder, load_run, run_weights
from selfsup.training.schedules import scaled_lr
from selfsup.views.augment import BatchAugment
from selfsup.views.config import ViewConfig

LABEL_SUBSET_FILE = "label_subset.json"
HEAD_PREFIXES = ("head.", "projector.")  # SimCLR's projection head, BYOL's projector


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

    def validate(self) -> None:
        _check("run", self.run is not None or self.from_head_layer in (None, 0),
               "--from-head-layer > 0 needs a pre-trained projection head: give --run PRETRAIN_RUN")
        if self.run is not None:
            for key in ("backbone", "backbone_width", "image_size"):
                _check(key, getattr(self, key) is None, f"is set by the pre-training run {self.run}; "
                       "leave it out (it is only for training from scratch)")
        _check("label_fraction", 0 < self.label_fraction <= 1, "must be in (0, 1], e.g. 0.01 or 0.1")
        _choice("label_balance", self.label_balance, LABEL_BALANCES)
        _check("from_head_layer", self.from_head_layer is None or self.from_head_layer >= 0, "must be >= 0")
        _check("backbone_width", self.backbone_width is None or (self.backbone_width > 0 and math.isfinite(self.backbone_width)),
               "must be > 0")
        _check("image_size", self.image_size is None or self.image_size >= 8, "must be >= 8 pixels")
        _common_checks(self)


def _common_checks(cfg) -> None:
    _check("optim.warmup_epochs", getattr(cfg, "optim", None) is None or cfg.optim.warmup_epochs is None,
           "is a pre-training key; fine-tuning and distillation take optim.warmup_fraction")
    _check("batch_size", cfg.batch_size >= 1, "must be >= 1")
    _check("steps", cfg.steps is None or cfg.steps >= 1, "must be >= 1")
    _check("epochs", cfg.epochs is None or (cfg.epochs > 0 and math.isfinite(cfg.epochs)), "must be > 0")
    _check("epochs", cfg.epochs is None or cfg.steps is None, "give at most one of epochs, steps")
    _choice("precision", cfg.precision, ("auto", "bf16", "fp32"))
    for key in ("checkpoint_every", "keep_last", "log_every", "eval_batch_size", "max_bad_steps"):
        _check(key, getattr(cfg, key) >= 1, "must be >= 1")
    if not (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: unknown device {cfg.device!r}; use auto, cpu, cuda, cuda:N or mps")
    if cfg.optim is not None:
        cfg.optim.validate()
    if cfg.view is not None:
        try:
            cfg.view.validate()
        except ValueError as e:
            raise ConfigError(f"view: {e}") from None


def crop_flip_view() -> ViewConfig:
    """Random resized crop (scale 0.08-1, aspect 3/4-4/3) + horizontal flip, nothing else (SimCLRv2 B)."""
    return ViewConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


# ------------------------------------------------------------------------------------------------
# The network: backbone -> first K head layers -> linear classifier


class HeadLayers(nn.Module):
    """The first K layers of a :class:`ProjectionHead`, under the same names (``layers.i``)."""

    def __init__(self, layers: list[nn.Module], out_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def head_prefix(head: ProjectionHead, k: int) -> HeadLayers:
    """The first ``k`` layers of ``head`` (its modules, not copies): ``forward(h) == head(h, return_all=True)[k]``."""
    out_dim = head.layer_dim(k)  # also checks 0 <= k <= num_layers
    return HeadLayers(list(head.layers[:k]), out_dim)


class Classifier(nn.Module):
    """``fc(head_K(backbone(x)))``: SimCLRv2's fine-tuned network (Sec. 2, "fine-tuning from a middle layer")."""

    def __init__(self, backbone: nn.Module, head: HeadLayers, num_classes: int, zero_init: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.fc = nn.Linear(head.out_dim, num_classes)
        if zero_init:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    @property
    def from_head_layer(self) -> int:
        return len(self.head.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.backbone(x)))


def _head_spec(weights: dict[str, torch.Tensor]) -> tuple[str, dict] | None:
    """(prefix, ProjectionHead kwargs) of the projection head stored in a pre-training run's weights."""
    for prefix in HEAD_PREFIXES:
        n = 0
        while f"{prefix}layers.{n}.0.weight" in weights:
            n += 1
        if n:
            first, last = weights[f"{prefix}layers.0.0.weight"], weights[f"{prefix}layers.{n - 1}.0.weight"]
            return prefix, {"in_dim": int(first.shape[1]), "hidden_dim": int(first.shape[0]) if n > 1 else int(last.shape[0]),
                            "out_dim": int(last.shape[0]), "num_layers": n,
                            # a scale-only BN (official code's ending) has a weight; the plain one has none
                            "last_bn": "scale" if f"{prefix}layers.{n - 1}.1.weight" in weights
                            else f"{prefix}layers.{n - 1}.1.running_mean" in weights,
                            "last_bias": f"{prefix}layers.{n - 1}.0.bias" in weights
                            or f"{prefix}layers.{n - 1}.1.running_mean" in weights}
    return None


def build_head(spec: dict | None, k: int) -> HeadLayers:
    if spec is None:
        raise ConfigError("no projection head to fine-tune from")
    return head_prefix(ProjectionHead(**spec), k)


def classifier_from_pretrain(run_dir, k: int | None, num_classes: int) -> tuple[Classifier, dict]:
    """Backbone and first ``k`` head layers of a pre-training run (trained weights), and a new classifier.

    ``run_dir`` is the run folder or its :class:`selfsup.training.runs.RunInfo`. Returns the model and a
    description (backbone name/width, image size, channels, head spec, k).
    """
    run = run_dir if isinstance(run_dir, RunInfo) else load_run(run_dir)
    run_dir = run.run_dir
    backbone = load_encoder(run)
    found = _head_spec(run.weights)
    if k is None:
        k = 1 if found is not None else 0
    if k > 0:
        if found is None:
            raise ConfigError(f"from_head_layer: {run_dir} has no projection head (no head.layers.* tensors); "
                              "use --from-head-layer 0")
        prefix, spec = found
        if k > spec["num_layers"]:
            raise ConfigError(f"from_head_layer: {k} is more than the {spec['num_layers']} layers of the projection "
                              f"head of {run_dir}; choose 0..{spec['num_layers']}")
        full = ProjectionHead(**spec)
        sub = {key[len(prefix):]: v for key, v in run.weights.items() if key.startswith(prefix)}
        try:
            full.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"the projection head in {run.weights_path} cannot be read: "
                                       f"{str(e).splitlines()[0]}") from None
        head = head_prefix(full, k)
    else:
        spec, head = None, HeadLayers([], backbone.num_features)
    info = {"backbone": run.config.backbone, "backbone_width": run.config.backbone_width,
            "image_size": run.image_size, "in_channels": run.in_channels, "head_spec": spec,
            "from_head_layer": k, "pretrain_dataset": run.config.dataset,
            "small_stem": getattr(backbone, "small_stem", None)}
    return Classifier(backbone, head, num_classes), info


def load_classifier(run_dir: str | Path) -> tuple[Classifier, dict]:
    """A fine-tuned (or distilled) network from its run folder, with its trained weights; and its run.json."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise ConfigError(f"{run_dir}: no run.json; is this a selfsup finetune or distill run folder?")
    info = json.loads(info_path.read_text())
    if info.get("kind") not in ("finetune", "distill"):
        what = "a pre-training run" if info.get("kind") in (None, "pretrain") else f"a {info['kind']} run"
        raise ConfigError(f"{run_dir} is {what}, not a fine-tuning or distillation run; give the folder written by "
                          f"`selfsup finetune` (fine-tune it first: selfsup finetune --run {run_dir} --out ...)")
    _, weights = run_weights(run_dir, str(run_dir))
    model = _empty_classifier(info)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"the weights in {run_dir} do not fit the network described by its run.json: "
                                   f"{str(e).splitlines()[0]}") from None
    return model, info


def _empty_classifier(info: dict) -> Classifier:
    kw = {} if info.get("backbone_width") is None else {"width": info["backbone_width"]}
    kw.update(saved_stem(info["backbone"], info.get("small_stem"), info["image_size"]))
    backbone = build_backbone(info["backbone"], in_channels=info["in_channels"], image_size=info["image_size"], **kw)
    k = int(info["from_head_layer"])
    head = build_head(info["head_spec"], k) if k > 0 else HeadLayers([], backbone.num_features)
    return Classifier(backbone, head, int(info["num_classes"]))


# ------------------------------------------------------------------------------------------------
# Label subsets


def prepare_label_subset(run_dir: Path, labels: torch.Tensor, dataset: str, fraction: float, seed: int,
                         num_classes: int, source: str | Path | None = None, balance: str = "equal",
                         files: list | None = None) -> torch.Tensor:
    """The labeled subset of a run: read from ``run_dir/label_subset.json`` (or ``source``) when present,
    else drawn by :func:`label_subset` (class-balanced, seeded) and written there.

    ``source`` may also be an official list (the 1% / 10% ImageNet files: one file name per line),
    matched against ``files``, the training folder's file names (image folders only).

    A stored subset must be for the same data set, training-split size and fraction, else
    :class:`ConfigError`. Indices refer to the training split; the test split is never drawn from.
    """
    own = run_dir / LABEL_SUBSET_FILE
    path = own if own.is_file() or source is None else Path(source)  # a resumed run keeps the subset it recorded
    data = None
    if not own.is_file() and source is not None and path.is_file() and not path.read_text()[:64].lstrip().startswith("{"):
        if files is None:
            raise ConfigError(f"--label-subset {source}: a list of file names needs an image-folder data set "
                              "(imagefolder:PATH), whose file names it refers to")
        try:
            idx = read_label_list(path, files)
        except ValueError as e:
            raise ConfigError(f"--label-subset {e}") from None
        data = {"seed": None, "source": str(path)}
    elif path.is_file():
        try:
            data = json.loads(path.read_text())
            idx = torch.tensor(data["indices"], dtype=torch.int64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a readable label subset ({e}); delete it or give another") from None
        expect = {"dataset": dataset, "split": "train", "num_train": len(labels), "fraction": fraction}
        if data.get("balance") == "list":  # read from an official list: its own fraction
            expect.pop("fraction")
        wrong = [f"{k} {data.get(k)!r} (this run: {v!r})" for k, v in expect.items() if data.get(k) != v]
        if wrong:
            raise ConfigError(f"{path} holds a label subset for another setting: {'; '.join(wrong)}. "
                              "Use a new --out folder, or the matching --label-fraction / --dataset")
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= len(labels):
            raise ConfigError(f"{path}: indices out of range for a training split of {len(labels)} images")
    elif source is not None:
        raise ConfigError(f"label_subset: {source} does not exist")
    else:
        idx = label_subset(labels, fraction, seed, num_classes, balance=balance)
    if not own.is_file() and dist.is_main_process():
        counts = torch.bincount(labels[idx], minlength=num_classes).tolist()
        record = {"dataset": dataset, "split": "train", "num_train": len(labels), "fraction": fraction,
                  "seed": data.get("seed") if data else seed, "num_labeled": int(idx.numel()),
                  "per_class": counts, "balance": data.get("balance", balance) if data else balance,
                  "indices": idx.tolist()}
        if data and data.get("source"):
            record.update(fraction=round(len(idx) / len(labels), 6), list=data["source"], balance="list")
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = own.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(own)
    return idx


# ------------------------------------------------------------------------------------------------
# Fine-tuning


FREE_KEYS = {"device", "data_dir", "log_every", "checkpoint_every", "keep_last", "eval_batch_size"}


def finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune (or train from scratch) on a label subset, evaluate on the test split; returns the results.

    Writes the run folder described in the module docstring. ``resume=True`` continues from the newest
    checkpoint with the saved config (given settings must agree, except device and bookkeeping).
    """
    cfg, run_dir, device, precision, owns_group, weights, state = begin_labelled_run(cfg, run_dir, resume, "finetune",
                                                                                    FREE_KEYS)

    # The network (weights from the pre-training run, or fresh).
    torch.manual_seed(cfg.seed)
    if cfg.run is not None:
        pre = load_run(cfg.run)
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
    if cfg.run is not None:
        model, info = classifier_from_pretrain(pre, cfg.from_head_layer, train.num_classes)
        if train.num_channels != info["in_channels"]:
            raise ConfigError(f"dataset: {dataset_name} has {train.num_channels}-channel images but the encoder of "
                              f"{cfg.run} was trained on {info['in_channels']}-channel images")
    else:
        name = cfg.backbone or CPU_DEFAULT_BACKBONE
        image_size = cfg.image_size or train.image_size
        kw = {} if cfg.backbone_width is None else {"width": cfg.backbone_width}
        backbone = build_backbone(name, in_channels=train.num_channels, image_size=image_size, **kw)
        model = Classifier(backbone, HeadLayers([], backbone.num_features), train.num_classes)
        info = {"backbone": name, "backbone_width": cfg.backbone_width, "image_size": image_size,
                "in_channels": train.num_channels, "head_spec": None, "from_head_layer": 0,
                "small_stem": getattr(backbone, "small_stem", None)}
    default_optim = FinetuneOptimConfig() if cfg.run is not None else replace(SCRATCH_OPTIM)
    cfg = replace(cfg, from_head_layer=info["from_head_layer"], dataset=dataset_name,
                  view=cfg.view if cfg.view is not None else crop_flip_view(), optim=cfg.optim or default_optim)
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
                "device": str(device), "world_size": world}
    result = train_and_evaluate(cfg, spec, model, optimizer, run_dir, device, precision, state, progress, run_info,
                                test, image_size, {"label_fraction": cfg.label_fraction, "num_labeled": len(idx),
                                                   "from_head_layer": info["from_head_layer"],
                                                   "pretrain_run": cfg.run, "backbone": info["backbone"]})
    if owns_group:
        dist.destroy()
    return result
