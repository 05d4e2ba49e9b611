"""Distillation with unlabeled data (SimCLRv2, Chen et al. 2020b, Sec. 2 "Self-training / knowledge
distillation via unlabeled examples", Eq. 2-3).

A fine-tuned network, the teacher, labels every training image (its labels unused) with its
temperature-scaled class distribution; a student minimises the cross-entropy to it
(:func:`selfsup.losses.distill_loss`), optionally plus ``labeled_weight`` times the cross-entropy
on the teacher's label subset. With a student of the teacher's architecture this is
self-distillation; with a smaller one, big-to-small distillation.

The teacher is frozen: eval mode (its batch-norm statistics fixed), ``requires_grad=False``, no
part of the optimiser, and never wrapped in DDP (each process holds its own copy). It labels the
same augmented view the student sees, computed on the fly.

Paper recipe and what we do:

- Temperature 0.1 for self-distillation, 1.0 big-to-small (Appendix B); the default picks by
  whether the student's architecture equals the teacher's.
- The paper's Eq. 3 weighs the two terms (1 - alpha) and alpha; here the loss is
  ``distill + A x supervised`` (A = ``labeled_weight``). The paper mostly uses the distillation term
  alone (A = 0, the default).
- "The same learning rate schedule, weight decay, batch size as pre-training" (LARS, lr 0.1 x
  sqrt(B), weight decay 1e-4, 5% warm-up, cosine), with random crop + flip only. The student's
  classifier is under LARS like every other weight matrix (with T = 0.1 the gradient of Eq. 2 is
  10x larger; plain SGD on it at this lr diverged in our runs) and starts random, not at zero. The
  paper trains 400 epochs on ImageNet; the default here is 10 epochs (a CPU budget).
- The student starts from scratch or from its own pre-training (``student_init``); its classifier
  reads the backbone's output (K = 0, "excluding projection head").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError
from selfsup.losses import distill_loss
from selfsup.models.backbones import build_backbone, saved_stem
from selfsup.protocols.classifier import Classifier, HeadLayers, load_classifier
from selfsup.protocols.finetune import crop_flip_view
from selfsup.protocols.label_subsets import LABEL_SUBSET_FILE, prepare_label_subset
from selfsup.protocols.labelled_loop import (
    begin_labelled_run, check_loop_settings, LoopSettings, RESULTS_FILE, LoopSpec, effective_batch, labeled_stream,
    length_in_steps, train_and_evaluate,
)
from selfsup.training.config import OptimConfig
from selfsup.errors import check_field
from selfsup.training.optim import build_optimizer
from selfsup.training.runs import load_encoder, load_run
from selfsup.training.schedules import scaled_lr
from selfsup.training.batches import mix_seed
from selfsup.views.augment import BatchAugment
from selfsup.views.config import ViewConfig

DEFAULT_EPOCHS = 10.0


@dataclass
class DistillOptimConfig(OptimConfig):
    """SimCLRv2 pre-training recipe, reused for distillation: LARS, lr 0.1 x sqrt(B), wd 1e-4, 5% warm-up."""

    lr: float = 0.1
    lr_scaling: str = "sqrt"
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05


@dataclass
class DistillConfig(LoopSettings):
    teacher: str = ""  # a `selfsup finetune` (or distill) run folder
    student: str | None = None  # backbone name; None: the teacher's (self-distillation)
    student_width: float | None = None  # width multiplier; None: the teacher's (same name) or the registered one
    student_init: str | None = None  # pre-training run whose backbone initialises the student
    dataset: str | None = None  # unlabeled images: this data set's training split; None: the teacher's
    data_dir: str | None = None
    temperature: float | None = None  # None: 0.1 for self-distillation, 1.0 otherwise (paper)
    labeled_weight: float = 0.0  # A: weight of the cross-entropy on the teacher's label subset
    labeled_batch_size: int | None = None  # None: batch_size
    batch_size: int = 256
    epochs: float | None = None  # None (and no steps): DEFAULT_EPOCHS
    steps: int | None = None
    view: ViewConfig | None = None  # None: random crop + flip only (the paper)
    optim: DistillOptimConfig = field(default_factory=DistillOptimConfig)

    def validate(self) -> None:
        check_field("teacher", bool(self.teacher), "give the fine-tuned teacher's run folder (--teacher RUN)")
        check_field("temperature", self.temperature is None or (self.temperature > 0 and math.isfinite(self.temperature)),
                    "must be > 0 (paper: 1.0 big-to-small, 0.1 self-distillation)")
        check_field("labeled_weight", self.labeled_weight >= 0 and math.isfinite(self.labeled_weight), "must be >= 0")
        check_field("labeled_batch_size", self.labeled_batch_size is None or self.labeled_batch_size >= 1, "must be >= 1")
        check_field("student_width", self.student_width is None or (self.student_width > 0 and math.isfinite(self.student_width)),
                    "must be > 0")
        check_loop_settings(self)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher's outputs are constants (SimCLRv2 Eq. 2)."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def distill_objective(student: nn.Module, teacher: nn.Module, images: torch.Tensor, temperature: float,
                      labeled: tuple[torch.Tensor, torch.Tensor] | None = None,
                      labeled_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``distill_loss(student(x), teacher(x), T) + labeled_weight x CE(student(x_l), y_l)``.

    The teacher runs under ``no_grad``; the labeled images (if any) go through the student in the same
    forward pass as the unlabeled ones.
    """
    with torch.no_grad():
        t_logits = teacher(images)
    x = images if labeled is None else torch.cat([images, labeled[0]])
    s_all = student(x)
    s_logits = s_all[:len(images)]
    loss = distill_loss(s_logits, t_logits, temperature)
    logs = {"distill_loss": float(loss.detach())}
    with torch.no_grad():
        logs["agreement"] = float((s_logits.argmax(1) == t_logits.argmax(1)).float().mean() * 100)
    if labeled is not None:
        ce = F.cross_entropy(s_all[len(images):].float(), labeled[1])
        loss = loss + labeled_weight * ce
        logs["labeled_ce"] = float(ce.detach())
    return loss, logs


FREE_KEYS = {"device", "data_dir", "log_every", "checkpoint_every", "keep_last", "eval_batch_size"}


def _teacher_and_data(cfg: DistillConfig, device: torch.device):
    """The frozen teacher, its run.json, and the data set's training and test splits (checked against it)."""
    teacher, tinfo = load_classifier(cfg.teacher)
    teacher = freeze_teacher(teacher).to(device)
    dataset_name = cfg.dataset or tinfo["dataset"]
    image_size = tinfo["image_size"]
    data_dir = cfg.data_dir or tinfo.get("data_dir")
    train = load_dataset(dataset_name, "train", data_dir=data_dir, image_size=image_size)
    test = load_dataset(dataset_name, "test", data_dir=data_dir, image_size=image_size)
    if train.num_channels != tinfo["in_channels"] or len(train.classes) != tinfo["num_classes"]:
        raise ConfigError(f"dataset: {dataset_name} ({train.num_channels} channels, {len(train.classes)} classes) does not "
                          f"fit the teacher {cfg.teacher} ({tinfo['in_channels']} channels, {tinfo['num_classes']} classes)")
    return teacher, tinfo, dataset_name, data_dir, train, test


def _student_backbone(cfg: DistillConfig, tinfo: dict, in_channels: int) -> tuple[nn.Module, str, float | None]:
    """The student's backbone, its name and width: from its own pre-training (``student_init``), or fresh."""
    image_size = tinfo["image_size"]
    if cfg.student_init is not None:
        init = load_run(cfg.student_init)
        if cfg.student is not None and (cfg.student, cfg.student_width) != (init.config.backbone, init.config.backbone_width):
            raise ConfigError(f"student: {cfg.student_init} holds a {init.config.backbone} backbone "
                              f"(width {init.config.backbone_width}), not {cfg.student} (width {cfg.student_width}); "
                              "leave --student out to use the initialising run's backbone")
        if init.image_size != image_size or init.in_channels != tinfo["in_channels"]:
            raise ConfigError(f"student_init: {cfg.student_init} was trained on {init.in_channels}-channel {init.image_size} px "
                              f"images, the teacher on {tinfo['in_channels']}-channel {image_size} px images")
        return load_encoder(init), init.config.backbone, init.config.backbone_width
    student_name = cfg.student or tinfo["backbone"]
    student_width = cfg.student_width
    if cfg.student is None or (cfg.student == tinfo["backbone"] and student_width is None):
        student_width = tinfo.get("backbone_width")
    kw = {} if student_width is None else {"width": student_width}
    if student_name == tinfo["backbone"]:  # the teacher's stem (runs saved before small_stem: the 64 px rule)
        kw.update(saved_stem(student_name, tinfo.get("small_stem"), image_size))
    backbone = build_backbone(student_name, in_channels=in_channels, image_size=image_size, **kw)
    return backbone, student_name, student_width


def _teacher_label_subset(cfg: DistillConfig, run_dir: Path, train, dataset_name: str) -> torch.Tensor:
    """The teacher's label subset, for the supervised term (``labeled_weight > 0``)."""
    teacher_subset = Path(cfg.teacher) / LABEL_SUBSET_FILE
    tcfg_fraction = json.loads(teacher_subset.read_text())["fraction"] if teacher_subset.is_file() else None
    if tcfg_fraction is None:
        raise ConfigError(f"labeled_weight: the teacher {cfg.teacher} has no {LABEL_SUBSET_FILE} to take labels from")
    return prepare_label_subset(run_dir, train.labels, dataset_name, tcfg_fraction, 0, train.num_classes,
                                source=teacher_subset if not (run_dir / LABEL_SUBSET_FILE).is_file() else None)


def distill(cfg: DistillConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Distill the teacher into a student on the training split's images; evaluate on the test split."""
    cfg, run_dir, device, precision, owns_group, weights, state = begin_labelled_run(cfg, run_dir, resume, "distill",
                                                                                    FREE_KEYS)

    teacher, tinfo, dataset_name, data_dir, train, test = _teacher_and_data(cfg, device)
    image_size = tinfo["image_size"]

    # The student: its own pre-training, or fresh.
    torch.manual_seed(cfg.seed)
    backbone, student_name, student_width = _student_backbone(cfg, tinfo, train.num_channels)
    # A randomly initialised classifier (a zero one would have no scale for LARS's trust ratio to keep).
    student = Classifier(backbone, HeadLayers([], backbone.num_features), tinfo["num_classes"], zero_init=False)
    same_arch = (student_name, student_width) == (tinfo["backbone"], tinfo.get("backbone_width"))
    temperature = cfg.temperature if cfg.temperature is not None else (0.1 if same_arch else 1.0)
    cfg = replace(cfg, temperature=temperature, dataset=dataset_name, student=student_name, student_width=student_width,
                  view=cfg.view if cfg.view is not None else crop_flip_view())
    if weights is not None:
        student.load_state_dict(weights, strict=True)
    student.to(device)

    # Data: every training image unlabeled; the teacher's label subset for the optional supervised term.
    world = dist.world_size()
    batch = effective_batch(cfg.batch_size, len(train), world)
    idx = _teacher_label_subset(cfg, run_dir, train, dataset_name) if cfg.labeled_weight > 0 else None
    if idx is not None:
        lbatch = effective_batch(cfg.labeled_batch_size or cfg.batch_size, len(idx), world)
    total_steps = int(state["total_steps"]) if state else length_in_steps(cfg.epochs, cfg.steps, DEFAULT_EPOCHS,
                                                                          len(train), batch)
    aug = BatchAugment(cfg.view, image_size, train.mean, train.std)
    base_lr = scaled_lr(cfg.optim.lr, batch, cfg.optim.lr_scaling)
    # The pre-training recipe, classifier included: LARS's trust ratio makes the step size independent
    # of the gradient's scale, which grows as 1 / temperature (Eq. 2 has no T^2 factor).
    optimizer = build_optimizer(cfg.optim.name, student, base_lr, cfg.optim.weight_decay, cfg.optim.momentum)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    def batches(start: int, total: int):
        unlabeled = labeled_stream(train, None, batch, mix_seed(cfg.seed, 6), start, total, device)
        if idx is None:
            for images, _ in unlabeled:
                yield images, None
        else:
            yield from zip((u for u, _ in unlabeled), labeled_stream(train, idx, lbatch, mix_seed(cfg.seed, 7), start, total, device))

    def step_loss(step: int, net: nn.Module, item):
        images, labeled = item
        gen = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, step, dist.rank(), 8))
        x = aug(images, gen)
        lab = None if labeled is None else (aug(labeled[0], gen), labeled[1])
        return distill_objective(net, teacher, x, temperature, lab, cfg.labeled_weight)

    spec = LoopSpec("distill", total_steps, base_lr, int(round(cfg.optim.warmup_fraction * total_steps)),
                    base_lr * cfg.optim.final_lr_fraction, step_loss, batches, batch)
    run_info = {"backbone": student_name, "backbone_width": student_width, "image_size": image_size,
                "small_stem": getattr(student.backbone, "small_stem", None),
                "in_channels": train.num_channels, "head_spec": None, "from_head_layer": 0,
                "num_classes": tinfo["num_classes"], "dataset": dataset_name, "data_dir": data_dir,
                "dataset_mean": list(train.mean), "dataset_std": list(train.std), "teacher": str(cfg.teacher),
                "self_distillation": same_arch, "temperature": temperature, "batch_size": batch,
                "total_steps": total_steps, "base_lr": base_lr, "precision": precision, "device": str(device),
                "world_size": world}
    teacher_result = Path(cfg.teacher) / RESULTS_FILE
    teacher_top1 = json.loads(teacher_result.read_text()).get("top1") if teacher_result.is_file() else None
    result = train_and_evaluate(cfg, spec, student, optimizer, run_dir, device, precision, state, progress, run_info,
                                test, image_size, {"teacher": str(cfg.teacher), "teacher_top1": teacher_top1,
                                                   "student": student_name, "student_width": student_width,
                                                   "self_distillation": same_arch, "temperature": temperature,
                                                   "labeled_weight": cfg.labeled_weight})
    if owns_group:
        dist.destroy()
    return result
