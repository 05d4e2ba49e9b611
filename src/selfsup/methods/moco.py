"""MoCo v3 on ResNets (Chen, Xie and He 2021, arXiv 2104.02057, Algorithm 1; facebookresearch/moco-v3), with
MoCo v2's optional queue of past keys (Chen, Fan, Girshick and He 2020, arXiv 2003.04297).

Query encoder: backbone -> projector -> predictor. Key (momentum) encoder: a copy of backbone and projector
whose weights are an exponential moving average of the query encoder's, momentum raised from ``base_tau`` to 1
by a half-cycle cosine (official ``--moco-m-cos``). Loss (Algorithm 1's ``ctr``): ``infonce_loss(q1, k2) +
infonce_loss(q2, k1)`` over the keys of the global batch, ``CE(q k^T / t, labels) * 2t``.

The architecture follows the official ResNet code (``moco/builder.py`` ``MoCo_ResNet``), which differs from the
ViT one and from the paper's generic description ("3-layer projector"):

- projector: **2** Linear layers (``_build_mlp(2, 2048, 4096, 256)``), Linear-BN-ReLU then Linear followed by a
  BN without affine parameters; no Linear has a bias. The 3-layer projector is the ViT one (``MoCo_ViT``), so
  ``proj_layers`` defaults to 2 here.
- predictor: 2 Linear layers 256 -> 4096 -> 256, Linear-BN-ReLU then a plain Linear (``last_bn=False`` for
  ResNets), no biases.
- temperature 1.0 (``--moco-t`` default, kept by every ResNet-50 command of CONFIG.md; ViTs use 0.2).

Deviations from the official code, written down:

- The momentum encoder's batch-norm running statistics are copied from the query encoder at every update
  (``selfsup.methods.ema.ema_update``); the official code averages the parameters only and lets the momentum
  encoder keep its own running statistics. In training mode both normalise with the batch's statistics, so the
  loss is the same; only an eval-mode use of the key encoder would differ.
- The momentum update comes after the optimiser step (``update_target``, called by the loop) with the rate of
  that step; the official ``forward`` updates first with the rate of the coming iteration. The sequence of
  updates is the same except that each uses the rate one iteration earlier.
- CPU defaults (the ``cpu`` recipe): heads follow the encoder (hidden width = ``num_features``, 128 out)
  instead of 4096 / 256, as for SimCLR and BYOL here, LARS base lr 2.0 x B/256 (SimCLR's CPU value) and
  temperature 0.2 (solo-learn's CIFAR value) instead of 1.0. 1,000 steps on Fashion-MNIST (narrow ResNet-18,
  batch 256, one CPU thread): linear / kNN top-1 87.42 / 80.79 at temperature 0.2, 86.26 / 79.03 at the
  official 1.0; SimCLR's CPU default gives 86.68 / 79.86 at 1,000 steps (docs/benchmarks.md).

Queue (``queue_size > 0``, off by default; MoCo v2's 65536 keys): a buffer of past keys (saved in checkpoints,
so a resumed run continues with the same negatives) appended to the negatives of every query
(``infonce_loss(..., queue=)``). The step's keys are stashed by ``forward`` in a non-persistent attribute and
enqueued by ``update_target`` after the optimiser step (an explicit call of the loop, never in ``forward``);
the stash is emptied before every step (``SPEC.before_step``), so the keys of a skipped step never enter it.
Both global views' keys are enqueued (2N keys per step), since the loss is symmetric; local crops (multi-crop)
have no keys, so they never enter the queue.

Multi-crop (``forward(g1, g2, *local_crops)``; SwAV, Caron et al. 2020, Sec. 3.2: every crop is compared with the
global views only): each local crop's query (the query encoder and predictor, one pass over all local crops, which
have another resolution) is contrasted with the momentum encoder's keys of both global views, one InfoNCE term
per (local crop, global view) pair with the same ``2t`` scale and the same negatives (the other keys of that
global view over the global batch, then the queue). The key encoder sees the global views only. The loss is
``2 x`` the mean of the ``2 + 2V`` terms (V local crops), so it keeps the two-view loss's scale (a sum of two
terms) and with no local crops is exactly it. MoCo v3 itself has no multi-crop; this follows BYOL's here.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.containers import SMALL_IMAGE_MAX
from selfsup.errors import check_field
from selfsup.losses import enqueue_keys, infonce_loss
from selfsup.losses.multicrop import mean_with_local_terms
from selfsup.methods.ema import ema_tau, ema_update
from selfsup.methods.simclr import MAX_DIM
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.heads import ProjectionHead
from selfsup.models.running_stats import encode_local_crops
from selfsup.views.config import ViewConfig

MAX_QUEUE = 1 << 20  # keys; MoCo v2 keeps 65536


@dataclass
class MoCoConfig:
    """MoCo v3's keys (section ``moco``). Defaults: the CPU recipe's heads and temperature (the ``moco`` recipe sets
    the official ones), the official ResNet values otherwise."""

    proj_hidden_dim: int | None = None  # None: the backbone's num_features (official ResNet-50: 4096)
    proj_out_dim: int = 128  # official: 256
    proj_layers: int = 2  # official ResNet code: 2 (the ViT projector has 3)
    pred_hidden_dim: int | None = None  # None: proj_hidden_dim (official: 4096)
    temperature: float = 0.2  # the CPU recipe's; official ResNet-50 1.0 (--moco-t, the moco recipe), ViT 0.2
    base_tau: float = 0.99  # momentum at step 0, cosine to 1 (--moco-m 0.99 --moco-m-cos)
    queue_size: int = 0  # past keys as extra negatives (MoCo v2: 65536); 0: off (MoCo v3)

    def validate(self, prefix: str = "moco.") -> None:
        check_field(prefix + "proj_out_dim", 1 <= self.proj_out_dim <= MAX_DIM, f"must be in [1, {MAX_DIM}]")
        for key in ("proj_hidden_dim", "pred_hidden_dim"):
            value = getattr(self, key)
            check_field(prefix + key, value is None or 1 <= value <= MAX_DIM, f"must be in [1, {MAX_DIM}]")
        check_field(prefix + "proj_layers", self.proj_layers >= 1, "must be >= 1 (official ResNet code: 2, ViT: 3)")
        check_field(prefix + "temperature", self.temperature > 0 and math.isfinite(self.temperature),
                    "must be > 0 (official: 1.0 for ResNets, 0.2 for ViTs)")
        check_field(prefix + "base_tau", 0 <= self.base_tau <= 1,
                    "must be in [0, 1] (official ResNet-50: 0.99; 1 = fixed key encoder)")
        check_field(prefix + "queue_size", 0 <= self.queue_size <= MAX_QUEUE,
                    f"must be in [0, {MAX_QUEUE}] (0: no queue; MoCo v2: 65536)")


class MoCo(nn.Module):
    """Query ``backbone -> projector -> predictor``; key ``target_backbone -> target_projector`` (EMA copies).

    ``forward(view1, view2)`` returns ``infonce_loss(q1, k2) + infonce_loss(q2, k1)`` (MoCo v3 Algorithm 1),
    each view through each encoder separately (as the official code: batch norm sees one view at a time);
    local crops after them (``forward(view1, view2, *local_crops)``) go through the query encoder in one pass
    together and give the multi-crop loss of the module docstring.
    The key encoder has ``requires_grad=False`` and changes only through ``update_target(tau)``, which the
    loop calls after every optimiser step, together with the enqueueing of the step's keys when there is a
    queue (``queue_size > 0``).
    """

    # Under DDP the key encoder and the queue are left to the method (selfsup.distributed.wrap_ddp): both are
    # computed identically on every rank (EMA of identical weights; enqueue_keys gathers every rank's keys).
    ddp_ignore = ("target_backbone", "target_projector", "queue")

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, temperature: float = 1.0,
                 queue_size: int = 0, key_dim: int | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.temperature = temperature
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        self.queue_size = queue_size
        if queue_size:
            if key_dim is None:
                raise ValueError("a queue needs key_dim, the projector's output dimension")
            # MoCo (He et al. 2020) starts the queue from random unit vectors.
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, key_dim), dim=1))
        self._pending_keys: list[torch.Tensor] = []  # this step's keys, enqueued by update_target (not saved)

    def target_parameters(self):
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        """The loss of two global views and any number of local crops after them (multi-crop, module docstring):
        ``2 x`` the mean over the ``2 + 2V`` (query, key) pairs ``(q1, k2)``, ``(q2, k1)`` and ``(q_v, k_g)`` of
        each local crop ``v`` with each global view ``g``; with no local crops, Algorithm 1's ``ctr`` exactly."""
        q1 = self.predictor(self.projector(self.backbone(view1)))
        q2 = self.predictor(self.projector(self.backbone(view2)))
        with torch.no_grad():
            k1 = self.target_projector(self.target_backbone(view1))
            k2 = self.target_projector(self.target_backbone(view2))
        queue = self.queue if self.queue_size else None
        loss = (infonce_loss(q1, k2, self.temperature, queue=queue)
                + infonce_loss(q2, k1, self.temperature, queue=queue))
        if local_views:  # another resolution: one query-encoder pass over every local crop; no keys
            q_local = self.predictor(self.projector(encode_local_crops(self.backbone, local_views)))
            terms = [infonce_loss(qv, k, self.temperature, queue=queue)
                     for qv in q_local.chunk(len(local_views), dim=0) for k in (k1, k2)]
            loss = 2 * mean_with_local_terms(loss, 2, terms)
        if self.queue_size and torch.is_grad_enabled():  # a training step's keys, for update_target
            self._pending_keys.append(torch.cat([k1, k2]).detach())
        with torch.no_grad():
            logs = {"z_std": F.normalize(torch.cat([k1, k2]).float(), dim=1).std(dim=0).mean()}
        return loss, logs

    def clear_pending_keys(self) -> None:
        """Forget the keys stashed by ``forward`` (before every step: a skipped step's keys never enter the queue)."""
        self._pending_keys = []

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """After the optimiser step: ``xi <- tau xi + (1 - tau) theta`` for the key encoder (MoCo v3 Algorithm 1),
        then, with a queue, the step's keys (every rank's; a collective) go in front of the queue."""
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
        if self.queue_size and self._pending_keys:
            self.queue.copy_(enqueue_keys(self.queue, torch.cat(self._pending_keys)))
        self._pending_keys = []

    def encoder(self) -> nn.Module:
        """The query encoder's backbone, whose features are evaluated downstream (MoCo v3 Sec. 4)."""
        return self.backbone


def build_moco(section: MoCoConfig, backbone: nn.Module, num_classes: int | None = None) -> MoCo:
    hidden = section.proj_hidden_dim or backbone.num_features
    out = section.proj_out_dim
    # Official _build_mlp: no Linear biases; the projector ends in BN(affine=False), the ResNet predictor in a Linear.
    projector = ProjectionHead(backbone.num_features, hidden, out, num_layers=section.proj_layers, last_bn=True)
    predictor = ProjectionHead(out, section.pred_hidden_dim or hidden, out, num_layers=2, last_bias=False)
    return MoCo(backbone, projector, predictor, temperature=section.temperature, queue_size=section.queue_size,
                key_dim=out)


def moco_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """The official code's views: BYOL's asymmetric pair (``main_moco.py``: jitter .4/.4/.2/.1, blur 1.0 / 0.1,
    solarize 0 / 0.2) with crops of at least 20% of the image (``--crop-min=.2`` in every ResNet-50 command)."""
    return tuple(replace(ViewConfig.byol(image_size, v), crop_scale=(0.2, 1.0)) for v in (1, 2))


def moco_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """ImageNet size: the official ResNet-50 100-epoch recipe (facebookresearch/moco-v3 ``main_moco.py`` defaults
    and CONFIG.md): LARS (trust 0.001, biases and BN excluded), lr 0.6 x B/256, weight decay 1e-6, momentum 0.9,
    10 warm-up epochs then cosine, batch 4096, momentum 0.99 -> 1 by cosine, temperature 1.0, projector 2048-4096-256
    and predictor 256-4096-256, zero-initialised residual BN scales (``zero_init_residual=True``). The 300- and
    1000-epoch commands lower lr to 0.3 (and at 1000 epochs set wd 1.5e-6, momentum 0.996).

    CIFAR size (<= 32 px), taken from solo-learn's CIFAR-10 MoCo v3 config (vturrisi/solo-learn
    ``scripts/pretrain/cifar/mocov3.yaml``; there is no official one): LARS lr 0.3 x B/256, weight decay 1e-6,
    batch 256, temperature 0.2, momentum 0.99 -> 1, heads 4096-256 (predictor 4096), warm-up then cosine
    (10 epochs, solo-learn's ``warmup_cosine``). Its LARS uses trust coefficient 0.02 with lr clipping, which
    selfsup's LARS (0.001, no clipping) does not offer, so the same lr gives smaller updates here."""
    small = image_size <= SMALL_IMAGE_MAX
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "lars", "lr": 0.3 if small else 0.6, "lr_scaling": "linear", "weight_decay": 1e-6,
                          "momentum": 0.9, "warmup_epochs": 10.0, "final_lr_fraction": 0.0}},
        section={"proj_hidden_dim": 4096, "proj_out_dim": 256, "proj_layers": 2, "pred_hidden_dim": 4096,
                 "temperature": 0.2 if small else 1.0, "base_tau": 0.99})


def moco_target_tau(section: MoCoConfig, step: int, total_steps: int | None) -> float:
    """``1 - (1 - base_tau)(cos(pi k / K) + 1) / 2`` (official ``adjust_moco_momentum``); ``base_tau`` while a
    timed run measures its pace."""
    return ema_tau(step, total_steps, section.base_tau) if total_steps else section.base_tau


def _clear_keys(model: nn.Module, step: int, schedule) -> None:
    model.clear_pending_keys()


def _describe(section: MoCoConfig) -> str:
    queue = f", queue {section.queue_size}" if section.queue_size else ""
    return f"temperature {section.temperature:g}, base tau {section.base_tau:g}{queue}"


SPEC = MethodSpec(
    name="moco", title="MoCo v3",
    paper="Chen, Xie and He 2021, An Empirical Study of Training Self-Supervised Vision Transformers "
          "(arXiv 2104.02057)",
    config=MoCoConfig, build=build_moco, views=moco_views,
    cpu=RecipeLayer(shared={"optim": {"lr": 2.0}}),  # with the section's temperature 0.2; measured: module docstring
    recipes=(PaperRecipe("moco", "MoCo v3 official ResNet-50 (LARS 0.6 x B/256, wd 1e-6, momentum 0.99 -> 1, "
                         "temperature 1.0, 10 warm-up epochs; CIFAR size: solo-learn's 0.3 x B/256, temperature 0.2)",
                         moco_recipe),),
    paper_recipe="moco", accepts=("cpu", "moco"), paper_lr=lambda batch_size: 0.6 * batch_size / 256,
    describe=_describe, target_tau=moco_target_tau, min_batch=2, before_step=_clear_keys, multicrop=True,
)
