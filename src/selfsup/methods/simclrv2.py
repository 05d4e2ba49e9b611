"""SimCLRv2's pre-training (Chen et al. 2020b, Sec. 2): SimCLR with a deeper (3-layer) projection head, and
optionally its memory buffer.

Without a buffer (``queue_size: 0``, the default) the model is :class:`selfsup.methods.simclr.SimCLR`; what
differs is the head's depth, the recipe and what follows pre-training (fine-tuning from the head's first layer
and distillation, ``selfsup.protocols``).

Memory buffer (Sec. 2, "we also incorporate the memory mechanism from MoCo"): a queue of 64K past negatives
whose keys come from a momentum encoder with momentum 0.999, worth about 1% in linear evaluation at small
batch sizes. With ``queue_size > 0`` the model is :class:`SimCLRv2Buffer`: the queries are
the online head's outputs z, the keys the momentum copy's, and the loss is InfoNCE over the other view's key,
the rest of the global batch's keys and the queue (``selfsup.losses.infonce_loss``), each direction's plain
cross-entropy averaged over the two directions, the scale of NT-Xent. The paper does not say more; the
deviations from NT-Xent follow MoCo: the negatives are keys (the other view's momentum outputs), not the
online z of the same view, and the momentum is constant (the paper's 0.999, no schedule). The buffer is
off by default and in the ``simclrv2`` recipe (``--set simclrv2.queue_size=65536`` turns it on).

Multi-crop (``forward(g1, g2, *local_crops)``): without a buffer, SimCLR's (each local crop paired with each
global view, the mean of the NT-Xent terms). With the buffer the momentum copy sees the global views only, so
only they have keys and only their keys enter the queue: each local crop's query (one encoder pass over all
local crops, then the head on every crop, as SimCLR) is contrasted with each global view's keys, with the same
negatives as a global query (the rest of that view's keys over the global batch, then the queue). The loss is
the mean cross-entropy over the ``2 + 2V`` (query, key) pairs, the two-view loss's scale, and with no local crops
exactly the two-view loss.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.containers import SMALL_IMAGE_MAX
from selfsup.errors import check_field
from selfsup.losses import enqueue_keys, infonce_loss
from selfsup.losses.multicrop import mean_with_local_terms
from selfsup.methods.ema import ema_update
from selfsup.methods.moco import MAX_QUEUE
from selfsup.methods.simclr import SimCLRConfig, build_simclr, simclr_views
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.running_stats import encode_local_crops


@dataclass
class SimCLRv2Config(SimCLRConfig):
    """SimCLRv2's keys (section ``simclrv2``): SimCLR's with a 3-layer head."""

    proj_layers: int = 3  # Sec. 2: a 3-layer head, fine-tuned from its first layer
    queue_size: int = 0  # the memory buffer of past keys (Sec. 2: 64K); 0: off, the model is SimCLR's
    momentum: float = 0.999  # the buffer's momentum encoder (Sec. 2); used only with queue_size > 0

    def validate(self, prefix: str = "simclrv2.") -> None:
        super().validate(prefix)
        check_field(prefix + "proj_layers", self.proj_layers >= 1,
                    "must be >= 1 (SimCLRv2 fine-tunes from a layer of its head; 0 is SimCLR's ablation)")
        check_field(prefix + "queue_size", 0 <= self.queue_size <= MAX_QUEUE,
                    f"must be in [0, {MAX_QUEUE}] (0: no memory buffer; paper: 65536)")
        check_field(prefix + "momentum", 0 <= self.momentum <= 1, "must be in [0, 1] (paper: 0.999)")


class SimCLRv2Buffer(nn.Module):
    """SimCLR's ``backbone -> head`` for the queries, a momentum copy (``target_backbone -> target_head``) for the
    keys, and a queue of past keys (a buffer: saved in checkpoints, so a resume continues with the same negatives).

    ``forward`` stashes the step's keys in a non-persistent attribute; ``update_target(tau)``, which the loop calls
    after the optimiser step, moves the momentum copy and enqueues them (never ``forward``).
    """

    ddp_ignore = ("target_backbone", "target_head", "queue")  # computed identically on every rank

    def __init__(self, backbone: nn.Module, head: nn.Module, temperature: float, queue_size: int, key_dim: int):
        super().__init__()
        if temperature <= 0 or queue_size < 1:
            raise ValueError(f"need temperature > 0 and queue_size >= 1, got {temperature} and {queue_size}")
        self.backbone, self.head, self.temperature = backbone, head, temperature
        self.target_backbone, self.target_head = copy.deepcopy(backbone), copy.deepcopy(head)
        for p in list(self.target_backbone.parameters()) + list(self.target_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, key_dim), dim=1))  # MoCo: random keys
        self._pending_keys: list[torch.Tensor] = []

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        # Queries as SimCLR (both views in one batch; local crops in one pass of their own, the head on every
        # crop); the keys of the momentum copy, of the global views only.
        h = self.backbone(torch.cat([view1, view2]))
        if local_views:
            h = torch.cat([h, encode_local_crops(self.backbone, local_views)])
        z1, z2, *z_local = self.head(h).chunk(2 + len(local_views))
        with torch.no_grad():
            k1, k2 = self.target_head(self.target_backbone(torch.cat([view1, view2]))).chunk(2)
        t = self.temperature
        # infonce_loss is the cross-entropy times 2t (MoCo v3's scale); / (4t) = the two directions' mean cross-entropy.
        loss = (infonce_loss(z1, k2, t, queue=self.queue) + infonce_loss(z2, k1, t, queue=self.queue)) / (4 * t)
        if z_local:  # the mean cross-entropy over all 2 + 2V (query, key) pairs
            terms = [infonce_loss(zv, k, t, queue=self.queue) for zv in z_local for k in (k1, k2)]
            loss = mean_with_local_terms(2 * loss, 2, terms, local_divisor=2 * t)
        if torch.is_grad_enabled():
            self._pending_keys.append(torch.cat([k1, k2]).detach())
        with torch.no_grad():
            logs = {"z_std": F.normalize(torch.cat([z1, z2]).float(), dim=1).std(dim=0).mean()}
        return loss, logs

    def clear_pending_keys(self) -> None:
        self._pending_keys = []

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """The momentum copy ``xi <- tau xi + (1 - tau) theta``, then the step's keys in front of the queue."""
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_head, self.head, tau)
        if self._pending_keys:
            self.queue.copy_(enqueue_keys(self.queue, torch.cat(self._pending_keys)))
        self._pending_keys = []

    def encoder(self) -> nn.Module:
        return self.backbone


def build_simclrv2(section: SimCLRv2Config, backbone: nn.Module, num_classes: int | None = None) -> nn.Module:
    """SimCLR's model without a buffer (exactly), :class:`SimCLRv2Buffer` with one."""
    if not section.queue_size:
        return build_simclr(section, backbone, num_classes)
    head = section.head(backbone.num_features)
    key_dim = section.proj_out_dim if section.proj_layers else backbone.num_features
    return SimCLRv2Buffer(backbone, head, section.temperature, section.queue_size, key_dim)


def _clear_keys(model: nn.Module, step: int, schedule) -> None:
    if hasattr(model, "clear_pending_keys"):  # a skipped step's keys never enter the buffer
        model.clear_pending_keys()


def simclrv2_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """SimCLRv2 Sec. 3 ("Settings"): LARS, the learning rate increased linearly over the first 5% of the epochs to
    0.1 x sqrt(B) (6.4 at 4096), then cosine decay; weight decay 1e-4, temperature 0.1 (0.5 at CIFAR size, taken
    from SimCLR App. B.9; the v2 paper is silent), 3-layer head ending in BN with a scale (official code). The
    warm-up is a fraction of the run (``optim.warmup_fraction``), so it scales with the run's length."""
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "lars", "lr": 0.1, "lr_scaling": "sqrt", "weight_decay": 1e-4, "momentum": 0.9,
                          "warmup_fraction": 0.05, "warmup_epochs": None, "final_lr_fraction": 0.0}},
        section={"temperature": 0.5 if image_size <= SMALL_IMAGE_MAX else 0.1, "proj_out_dim": 128,
                 "proj_hidden_dim": None, "proj_layers": 3, "proj_last_bn": True})


SPEC = MethodSpec(
    name="simclrv2", title="SimCLRv2",
    paper="Chen, Kornblith, Swersky, Norouzi and Hinton 2020, Big Self-Supervised Models are Strong Semi-Supervised "
          "Learners (arXiv 2006.10029)",
    config=SimCLRv2Config, build=build_simclrv2, views=simclr_views,
    cpu=RecipeLayer(shared={"optim": {"lr": 2.0}}),  # SimCLR's CPU default
    recipes=(PaperRecipe("simclrv2", "SimCLRv2 paper (LARS 0.1 x sqrt(B), wd 1e-4, temperature 0.1 / 0.5 at <= 32 px, "
                         "3-layer head, warm-up 5% of the run)", simclrv2_recipe),),
    paper_recipe="simclrv2", accepts=("cpu", "simclr", "simclrv2"),
    paper_lr=lambda batch_size: 0.1 * math.sqrt(batch_size),
    describe=lambda section: f"temperature {section.temperature:g}"
                             + (f", memory buffer {section.queue_size} (momentum {section.momentum:g})"
                                if section.queue_size else ""),
    min_batch=2, before_step=_clear_keys, multicrop=True,
    target_tau=lambda section, step, total_steps: section.momentum if section.queue_size else None,
)
