"""The papers' linear evaluation: a linear layer on the frozen encoder, trained by SGD on augmented views.

SimCLR App. B.6: SGD with Nesterov momentum 0.9, lr 0.1 x B/256, batch 4096, 90 epochs, random
resized crop + horizontal flip only, no weight decay, cosine decay; tested on the centre crop.
BYOL App. C.1: the same with batch 1024 and 80 epochs. ``selfsup eval linear --protocol sgd``.

The encoder stays in eval mode throughout (batch norm uses its running statistics, which therefore
cannot change), runs without gradients, and is proven bit-identical afterwards by
``evaluate.state_fingerprint`` (``BackboneChangedError`` otherwise). Deviations, written down:

- Default batch 1024 (BYOL's) rather than SimCLR's 4096, and 90 epochs (SimCLR's): a CPU holds a
  1024-image batch of features comfortably; ``--batch-size`` / ``--epochs`` change them.
- Test images: the centre crop of 0.875 of the side, resized to the training size, as the papers do
  on ImageNet; at 32 px and below the whole image, as SimCLR's code does for CIFAR.
- The linear layer starts at N(0, 0.01) weights and zero bias (MoCo's ``main_lincls``); epochs are
  drop-last passes over a seeded permutation (``train.step_indices``), so a run is reproducible.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import BackboneChangedError
from selfsup.evaluation.frozen import iterate_batches, state_fingerprint, topk_accuracy
from selfsup.evaluation.preprocess import Preprocessing
from selfsup.training.schedules import warmup_cosine
from selfsup.training.batches import mix_seed, batch_stream
from selfsup.training.devices import autocast_context
from selfsup.views.augment import BatchAugment
from selfsup.views.config import ViewConfig


@dataclass
class LinearSGDConfig:
    """The protocol's parameters; ``lr=None`` means the paper's ``0.1 x batch_size / 256``."""

    epochs: float = 90.0
    batch_size: int = 1024
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    test_crop: float | None = None  # None: 0.875 above 32 px, the whole image at 32 px and below
    seed: int = 0

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("momentum must be in [0, 1) and weight_decay >= 0")
        if self.test_crop is not None and not 0 < self.test_crop <= 1:
            raise ValueError(f"test_crop must be in (0, 1], got {self.test_crop}")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 0.1 * self.batch_size / 256


@torch.no_grad()
def _features(encoder: nn.Module, x: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    with autocast_context(device, precision):
        return encoder(x).float()


@torch.no_grad()
def _test_scores(encoder: nn.Module, classifier: nn.Module, test, prep: Preprocessing, precision: str,
                 device: torch.device, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores, ys = [], []
    for images, y in iterate_batches(test, 512, num_workers):
        scores.append(classifier(_features(encoder, prep(images.to(device)), precision, device)).float().cpu())
        ys.append(torch.as_tensor(y).long())
    return torch.cat(scores), torch.cat(ys)


def linear_eval_sgd(encoder: nn.Module, train, test, preprocess: Preprocessing | int, device: torch.device | str = "cpu",
                    cfg: LinearSGDConfig | None = None, precision: str = "fp32", num_workers: int = 0,
                    progress: bool = False) -> dict:
    """Train a linear layer on the frozen ``encoder`` (SimCLR App. B.6); top-1/top-5 on ``test`` and the protocol.

    ``preprocess``: the run's (``RunInfo.preprocessing``), whose statistics the views use and which prepares
    the test images (centre crop ``cfg.test_crop``); an ``int``: that size, the training set's statistics.
    """
    cfg = cfg or LinearSGDConfig()
    prep = preprocess if isinstance(preprocess, Preprocessing) else Preprocessing.of_dataset(train, preprocess)
    image_size = prep.image_size
    device = torch.device(device)
    if train.labels is None or bool((train.labels < 0).any()):
        raise ValueError("the SGD linear protocol needs a labelled training set")
    n = len(train)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    before = state_fingerprint(encoder)
    was_training = encoder.training
    encoder.eval()
    requires = [p.requires_grad for p in encoder.parameters()]
    for p in encoder.parameters():
        p.requires_grad_(False)
    view = ViewConfig(crop_scale=cfg.crop_scale, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    augment = BatchAugment(view, image_size, prep.mean, prep.std)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(mix_seed(cfg.seed, 5))
        classifier = nn.Linear(encoder.num_features, train.num_classes).to(device)  # the one backbone interface
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
        opt = torch.optim.SGD(classifier.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="linear (sgd)", leave=False)
        correct = seen = 0
        last_epoch_start = total - steps_per_epoch
        for step, (images, labels) in enumerate(batch_stream(train, batch, cfg.seed, 0, total, num_workers, device,
                                                             with_labels=True)):
            lr = warmup_cosine(step, total, 0, cfg.base_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            gen = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, step, 6))
            h = _features(encoder, augment(images, gen), precision, device)
            logits = classifier(h)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= last_epoch_start:
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        crop = cfg.test_crop if cfg.test_crop is not None else prep.crop
        scores, ys = _test_scores(encoder, classifier, test, replace(prep, crop=crop), precision, device, num_workers)
    finally:
        for p, r in zip(encoder.parameters(), requires):
            p.requires_grad_(r)
        encoder.train(was_training)
    if state_fingerprint(encoder) != before:
        raise BackboneChangedError("the frozen backbone changed during SGD linear evaluation; this is a bug in selfsup")
    return {**topk_accuracy(scores, ys), "probe": "linear-sgd",
            "paper": "SimCLR App. B.6 / BYOL App. C.1", **asdict(cfg), "lr": cfg.base_lr,
            "lr_rule": "given" if cfg.lr is not None else "0.1 x batch_size / 256", "batch_size": batch,
            "schedule": "cosine, no warm-up", "steps": total, "steps_per_epoch": steps_per_epoch,
            "train_views": "random resized crop + horizontal flip", "test_crop": crop, "batch_norm": "eval mode (frozen)",
            "train_top1_last_epoch": 100.0 * correct / max(1, seen), "precision": precision,
            "train_seconds": round(time.perf_counter() - t0, 1), "backbone_unchanged": True}
