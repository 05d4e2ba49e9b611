"""DINO, self-distillation with no labels (Caron et al. 2021, arXiv 2104.14294), on ResNets.

Student: encoder f -> :class:`~selfsup.models.heads.DINOHead` (MLP, l2 normalisation, weight-normalised
``last_layer`` to K outputs). Teacher: a copy of the student whose weights are an exponential moving average
of the student's (Sec. 3.1, cosine schedule from ``base_tau`` to 1), never trained by gradients. The teacher
sees the two global crops, the student every crop (multi-crop, Sec. 3.1); the loss is the cross-entropy from
the teacher's centred, sharpened softmax to the student's softmax over every pair of different crops
(Algorithm 1, Eq. 3; :func:`selfsup.losses.dino_loss`).

What happens when, in the training loop's order (the official ``train_one_epoch`` of ``main_dino.py``):

1. ``before_step`` (the spec's hook): the teacher temperature of this step, linear from
   ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs``.
2. ``forward(g1, g2, *locals)``: the loss with the current centre; the teacher's raw outputs are kept for 3.
3. ``before_optimizer_step`` (the spec's hook): per-parameter gradient clipping at ``clip_grad`` (the
   official ``clip_gradients``), then the gradients of the head's ``last_layer`` are dropped during the
   first ``freeze_last_layer`` epochs (the official ``cancel_gradients_last_layer``).
4. ``update_target(tau)``, called by the loop after the optimiser step: the teacher's EMA update and the
   centre's, ``c <- m c + (1 - m) mean(teacher outputs)`` over every rank (Eq. 4,
   :func:`selfsup.losses.dino_center_update`). The official code updates the centre at the end of the loss's
   forward; it is only read by the next step's loss, so doing it here is the same computation, made
   explicit. ``forward`` changes no parameter or buffer.

Deviations from the official code, written down:

- The teacher temperature rises per step (``step / (warmup_teacher_temp_epochs x steps_per_epoch)``); the
  official ``DINOLoss`` steps it once per epoch (``np.linspace`` over epochs). Fractional epochs are allowed,
  for short runs. ``freeze_last_layer`` is also in (possibly fractional) epochs.
- The weight decay is constant (``optim.weight_decay``); the official cosine weight-decay schedule is off
  in its ResNet-50 command anyway (``--weight_decay 1e-4 --weight_decay_end 1e-4``).
- ``optim.name: sgd`` in selfsup is Nesterov SGD; the official ResNet-50 run uses plain SGD with momentum 0.9.
- The student's local crops go through the encoder in one batch and its global crops in another, as in the
  official ``MultiCropWrapper`` (one forward pass per resolution), so batch norm sees each group's statistics.
  The local pass does not update the encoder's batch-norm running statistics
  (:func:`selfsup.models.running_stats.encode_local_crops`): evaluation takes the student's encoder at the
  global size, and the official code's teacher, which its evaluation takes, keeps running statistics of the
  global crops only (its own forward passes); here the teacher copies the student's buffers (``ema_update``).

The ``cpu`` recipe (narrow CPU encoders, Fashion-MNIST at 28 px, batch 256): 4 local crops of 12 px
(``local_size_for(28)``) of (0.25, 0.6) of the image area with global crops of (0.5, 1); K = 4096 (solo-learn's
CIFAR value), head hidden width = the encoder's ``num_features`` (as the other methods' CPU heads), bottleneck
256, no batch norm in the head; LARS base lr 3.0 x B/256 with weight decay 1e-6 (BYOL's CPU values: the same
LARS regime of few small-batch steps); teacher temperature 0.04 without warm-up, teacher momentum 0.996, clip
3.0, last layer frozen for 1 epoch (the official values). The crop scales are the one value found by the search
(1,000 steps, full Fashion-MNIST, cells of ``benchmarks/reference.py``; linear / kNN top-1 %, seeds 0, 1, 2): with
them 84.86 / 74.24, 84.24 / 74.56 and 84.67 / 71.62; with the ResNet scales (0.05, 0.14) and (0.14, 1) 84.16 /
72.99, 79.29 / 63.95 and 81.95 / 68.62, the second below the untrained encoder (81.00 / 72.45). At the ResNet
scales the 12-px local crops hold a few pixels of a 28-px image and the teacher stays near uniform (entropy
7.2-7.6 of log K = 8.3 at step 1,000, loss 7.6); with the larger crops it sharpens (entropy 4.5, loss 4.9). Base
lr 1.5 and 6.0 were lower (docs/results/accuracy.md). The normalised bottleneck starts nearly constant
(collapse_std 0.008 at step 10, of a healthy 0.0625), so the collapse monitor may warn once around the end of
warm-up; it recovers (0.046 at step 1,000).

Why the start collapses under LARS on narrow encoders (measured on the 1/16-width test encoder, 32-d features,
head 128-128-64, K 1024, LARS lr 1.0 x B/256): LARS leaves biases out of the trust ratio, so they move at the raw
lr while the weights move by about ``lr x eta`` (eta 0.001) of their norm per step. The std-0.02 MLP init makes the
bottleneck's norm about 0.01 at init, so after one step its bias (norm 0.19, 2.8 after 10 steps, weights unchanged)
is most of every image's bottleneck and the l2-normalised bottleneck is the same for all of them (collapse_std
0.0735 -> 0.003 after one step); the centred teacher is then uniform. The official ResNet run uses SGD, which moves
biases and weights alike. With SGD and batch norm in the head the tiny encoder learns if the bottleneck is wide
enough: in d dimensions a bottleneck vector's cosines with random unit prototypes have std 1/sqrt(d), so at
d = 16 (K = 64) the teacher at temperature 0.02 starts one-hot, the normalised bottleneck collapses within 10
steps and whether a run recovers is chance; at d = 128, 17 of 20 seeds gain 3 points or more of kNN in 500 steps
(``tests/test_method_dino.py`` lists the measurements). The recipes' 256-d bottleneck (the paper's) is in the
second regime.
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
from selfsup.losses import dino_center_update, dino_loss
from selfsup.methods.byol import byol_views
from selfsup.methods.collapse import collapse_std
from selfsup.methods.ema import ema_tau, ema_update
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.heads import DINOHead
from selfsup.models.running_stats import encode_local_crops

MAX_OUT_DIM = 262144  # K beyond this cannot be held in memory for a batch; refused before any work


@dataclass
class DINOConfig:
    """DINO's keys (section ``dino``). Defaults: the official ``main_dino.py`` defaults (its ResNet-50 run's)."""

    out_dim: int = 65536  # K, the head's outputs (official --out_dim)
    hidden_dim: int | None = 2048  # the head's hidden width; None: the encoder's num_features
    bottleneck_dim: int = 256  # the head's output before l2 normalisation and last_layer
    head_layers: int = 3  # Linear layers of the head's MLP (GELU between them)
    use_bn_in_head: bool = False  # batch norm after each hidden Linear (official --use_bn_in_head)
    norm_last_layer: bool = True  # last_layer's weight-norm scale fixed at 1 (official --norm_last_layer)
    student_temp: float = 0.1  # Sec. 3.1 / official DINOLoss
    teacher_temp: float = 0.04  # after the warm-up (official default; the paper's ViT runs 0.07)
    warmup_teacher_temp: float = 0.04  # at step 0 (Sec. 3.1, implementation details)
    warmup_teacher_temp_epochs: float = 0.0  # linear warm-up length (official default 0; the paper's ViT runs 30)
    center_momentum: float = 0.9  # m of the centre's EMA (Eq. 4)
    base_tau: float = 0.996  # teacher EMA rate at step 0, cosine to 1 (Sec. 3.1, official --momentum_teacher)
    freeze_last_layer: float = 1.0  # epochs during which last_layer gets no update (official --freeze_last_layer)
    clip_grad: float = 3.0  # per-parameter gradient-norm clip (official --clip_grad); 0: off

    def validate(self, prefix: str = "dino.") -> None:
        check_field(prefix + "out_dim", 1 <= self.out_dim <= MAX_OUT_DIM, f"must be in [1, {MAX_OUT_DIM}]")
        check_field(prefix + "hidden_dim", self.hidden_dim is None or self.hidden_dim >= 1, "must be >= 1 or null")
        check_field(prefix + "bottleneck_dim", self.bottleneck_dim >= 1, "must be >= 1")
        check_field(prefix + "head_layers", self.head_layers >= 1, "must be >= 1 (the paper's head has 3)")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            v = getattr(self, key)
            check_field(prefix + key, v > 0 and math.isfinite(v), "must be > 0")
        for key in ("warmup_teacher_temp_epochs", "freeze_last_layer", "clip_grad"):
            v = getattr(self, key)
            check_field(prefix + key, v >= 0 and math.isfinite(v), "must be >= 0 (0: off)")
        check_field(prefix + "center_momentum", 0 <= self.center_momentum <= 1, "must be in [0, 1] (paper: 0.9)")
        check_field(prefix + "base_tau", 0 <= self.base_tau <= 1, "must be in [0, 1] (paper: 0.996)")


class DINO(nn.Module):
    """Student ``backbone -> head``, teacher ``teacher_backbone -> teacher_head`` (an EMA copy), and the centre.

    ``forward(g1, g2, *locals)`` returns ``(loss, logs)``: :func:`~selfsup.losses.dino_loss` of the student's
    outputs for every crop against the teacher's for the two global crops, centred with ``center`` and
    sharpened with ``teacher_temp`` (set before each step by the spec's ``before_step``). It records the
    teacher's raw outputs (training mode only) for the centre update that ``update_target`` makes after the
    optimiser step; it changes no parameter or buffer. The teacher's parameters have ``requires_grad=False``
    and change only through ``update_target(tau)``.
    """

    # Under DDP the teacher is left out of gradient reduction and buffer broadcast: update_target computes it
    # from the student's weights, identical on every rank. The centre is all-reduced in update_target.
    ddp_ignore = ("teacher_backbone", "teacher_head", "center")

    def __init__(self, backbone: nn.Module, head: DINOHead, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(head)
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, head.out_dim))
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.pending_teacher_out: list[torch.Tensor] = []  # this step's teacher outputs, for the centre update

    def teacher_parameters(self):
        yield from self.teacher_backbone.parameters()
        yield from self.teacher_head.parameters()

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        global_views = torch.cat([view1, view2], dim=0)
        # One encoder pass per resolution (the official MultiCropWrapper), one head pass on all of them.
        feats = [self.backbone(global_views)]
        if local_views:
            feats.append(encode_local_crops(self.backbone, local_views))
        # The head's forward (DINOHead.forward) in its two parts, to watch the normalised bottleneck for collapse.
        bottleneck = F.normalize(self.head.mlp(torch.cat(feats, dim=0)), dim=-1)
        student = self.head.last_layer(bottleneck)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(global_views))
        loss = dino_loss(list(student.chunk(2 + len(local_views))), list(teacher.chunk(2)), self.center,
                         self.student_temp, self.teacher_temp)
        if self.training:
            self.pending_teacher_out.append(teacher.detach())
        with torch.no_grad():
            t = teacher.float()
            probs = torch.softmax((t - self.center.float()) / self.teacher_temp, dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1).mean()
        n = view1.shape[0]
        logs = {"collapse_std": collapse_std(bottleneck[:2 * n]), "teacher_entropy": entropy,
                "teacher_temp": torch.tensor(self.teacher_temp)}
        return loss, logs

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """After the optimiser step: the teacher's EMA ``xi <- tau xi + (1 - tau) theta`` (Sec. 3.1) and the
        centre's update from this step's teacher outputs over every rank (Eq. 4); a collective."""
        ema_update(self.teacher_backbone, self.backbone, tau)
        ema_update(self.teacher_head, self.head, tau)
        if self.pending_teacher_out:
            rows = torch.cat(self.pending_teacher_out, dim=0)
            self.center.copy_(dino_center_update(self.center, rows, self.center_momentum))
        self.pending_teacher_out = []

    def encoder(self) -> nn.Module:
        """The student's encoder, evaluated downstream (the official linear evaluation takes the teacher's;
        both are the same network up to the EMA)."""
        return self.backbone


def build_dino(section: DINOConfig, backbone: nn.Module, num_classes: int | None = None) -> DINO:
    head = DINOHead(backbone.num_features, section.out_dim, hidden_dim=section.hidden_dim or backbone.num_features,
                    bottleneck_dim=section.bottleneck_dim, num_layers=section.head_layers,
                    use_bn=section.use_bn_in_head, norm_last_layer=section.norm_last_layer)
    return DINO(backbone, head, student_temp=section.student_temp, teacher_temp=section.warmup_teacher_temp,
                center_momentum=section.center_momentum)


def teacher_temp_at(section: DINOConfig, step: int, steps_per_epoch: int) -> float:
    """The teacher temperature of step ``step``: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs, then constant (Sec. 3.1, implementation details)."""
    warm = section.warmup_teacher_temp_epochs * steps_per_epoch
    if warm <= 0 or step >= warm:
        return section.teacher_temp
    return section.warmup_teacher_temp + (section.teacher_temp - section.warmup_teacher_temp) * step / warm


def last_layer_frozen(section: DINOConfig, step: int, steps_per_epoch: int) -> bool:
    """True during the first ``freeze_last_layer`` epochs (Sec. 3.1 / official ``cancel_gradients_last_layer``)."""
    return step < section.freeze_last_layer * steps_per_epoch


def clip_gradients(module: nn.Module, clip: float) -> None:
    """Scale each parameter's gradient to norm at most ``clip`` (the official ``clip_gradients``: per parameter,
    not one global norm)."""
    for p in module.parameters():
        if p.grad is not None:
            norm = torch.linalg.vector_norm(p.grad)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def dino_before_step(model: DINO, step: int, schedule) -> None:
    """Set this step's teacher temperature; forget teacher outputs of a step that was skipped."""
    model.teacher_temp = teacher_temp_at(schedule.cfg.section, step, schedule.steps_per_epoch)
    model.pending_teacher_out = []


def dino_before_optimizer_step(model: DINO, step: int, schedule) -> None:
    """Clip the student's gradients, then drop the last layer's during the first epoch(s)."""
    section = schedule.cfg.section
    if section.clip_grad > 0:
        clip_gradients(model.backbone, section.clip_grad)
        clip_gradients(model.head, section.clip_grad)
    if last_layer_frozen(section, step, schedule.steps_per_epoch):
        for p in model.head.last_layer.parameters():
            p.grad = None


def dino_target_tau(section: DINOConfig, step: int, total_steps: int | None) -> float:
    """The teacher's EMA rate after step ``step``: cosine from ``base_tau`` to 1 over the run (``base_tau`` while
    a timed run measures its pace)."""
    return ema_tau(step, total_steps, section.base_tau) if total_steps else section.base_tau


def dino_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """DINO's ResNet recipes.

    ImageNet size (> 32 px): the official ResNet-50 run (facebookresearch/dino README, "ResNet-50 and other
    convnets trainings", and the released ``dino_resnet50_pretrain/args.txt``): SGD momentum 0.9, lr 0.03 x B/256
    (batch 64 per GPU on 8 GPUs, 512), weight decay 1e-4 (constant), 10 warm-up epochs then cosine to min_lr 1e-6,
    100 epochs; 2 global crops at (0.14, 1) and 8 local crops of 96 px at (0.05, 0.14) of the image area; head
    2048-2048-256 -> K = 65536, no batch norm, last layer normalised; teacher temperature 0.04 without warm-up,
    student 0.1, centre momentum 0.9, teacher momentum 0.996, per-parameter gradient clip 3.0, last layer frozen
    for 1 epoch.

    CIFAR size (<= 32 px): solo-learn's DINO for CIFAR (vturrisi/solo-learn ``scripts/pretrain/cifar/dino.yaml``
    and ``solo/methods/dino.py`` defaults, ResNet-18): LARS lr 0.3 x B/256, weight decay 1e-6, batch 256, 10
    warm-up epochs (its ``warmup_cosine`` default), head 2048-2048-256 -> K = 4096, teacher temperature 0.07
    without warm-up, teacher momentum 0.9995, no gradient clipping, last layer frozen for 1 epoch. Its
    ``dino.yaml`` trains 2 crops; the local crops here are solo-learn's CIFAR multi-crop setting
    (``scripts/pretrain/cifar-multicrop/augmentations/swav.yaml``: 6 local crops of 18 px at (0.08, 0.5), global
    crops at (0.2, 1)), the local side scaled with the image (18 px at 32 px). Deviation: solo-learn's LARS has
    eta 0.02 with ``clip_lr``; selfsup's LARS is the official SimCLR one (eta 0.001).
    """
    if image_size <= SMALL_IMAGE_MAX:
        return RecipeLayer(
            shared={"optim": {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-6,
                              "momentum": 0.9, "warmup_epochs": 10.0, "final_lr_fraction": 0.0},
                    "multicrop": {"num_local": 6, "local_size": max(1, math.floor(image_size * 18 / 32 + 0.5)),
                                  "local_scale": [0.08, 0.5], "global_scale": [0.2, 1.0]}},
            section={"out_dim": 4096, "hidden_dim": 2048, "bottleneck_dim": 256, "head_layers": 3,
                     "use_bn_in_head": False, "norm_last_layer": True, "teacher_temp": 0.07,
                     "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0.0, "base_tau": 0.9995,
                     "clip_grad": 0.0, "freeze_last_layer": 1.0})
    lr = 0.03
    return RecipeLayer(
        shared={"optim": {"name": "sgd", "lr": lr, "lr_scaling": "linear", "weight_decay": 1e-4, "momentum": 0.9,
                          "warmup_epochs": 10.0, "final_lr_fraction": 1e-6 / (lr * batch_size / 256)},
                "multicrop": {"num_local": 8, "local_size": None, "local_scale": [0.05, 0.14],
                              "global_scale": [0.14, 1.0]}},
        section={"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "head_layers": 3,
                 "use_bn_in_head": False, "norm_last_layer": True, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                 "warmup_teacher_temp_epochs": 0.0, "base_tau": 0.996, "clip_grad": 3.0, "freeze_last_layer": 1.0})


def dino_paper_lr(batch_size: int) -> float:
    """The LARS reference the lr warning compares with: solo-learn's CIFAR recipe, 0.3 x B/256 (the official
    ResNet-50 run uses SGD at 0.03 x B/256, which the warning, for LARS only, does not concern)."""
    return 0.3 * batch_size / 256


def dino_describe(section: DINOConfig) -> str:
    warm = (f"{section.warmup_teacher_temp:g} -> {section.teacher_temp:g} over {section.warmup_teacher_temp_epochs:g} "
            "epochs" if section.warmup_teacher_temp_epochs > 0 else f"{section.teacher_temp:g}")
    return f"K {section.out_dim}, teacher temperature {warm}, base tau {section.base_tau:g}"


SPEC = MethodSpec(
    name="dino", title="DINO",
    paper="Caron, Touvron, Misra, Jegou, Mairal, Bojanowski and Joulin 2021, Emerging Properties in Self-Supervised "
          "Vision Transformers (arXiv 2104.14294)",
    config=DINOConfig, build=build_dino,
    views=byol_views,  # DINO's global views are BYOL's (DataAugmentationDINO: blur 1.0 / 0.1, solarize 0 / 0.2)
    cpu=RecipeLayer(shared={"optim": {"lr": 3.0, "weight_decay": 1e-6},
                            "multicrop": {"num_local": 4, "local_scale": [0.25, 0.6], "global_scale": [0.5, 1.0]}},
                    section={"out_dim": 4096, "hidden_dim": None, "base_tau": 0.996}),
    recipes=(PaperRecipe("dino", "DINO ResNet recipes (ImageNet: official ResNet-50 run, SGD 0.03 x B/256, wd 1e-4, "
                         "8 local crops; CIFAR: solo-learn, LARS 0.3 x B/256, wd 1e-6, K 4096, 6 local crops)",
                         dino_recipe),),
    paper_recipe="dino", accepts=("cpu", "dino"), paper_lr=dino_paper_lr,
    describe=dino_describe, target_tau=dino_target_tau, collapse_dim=lambda section: section.bottleneck_dim,
    multicrop=True, before_step=dino_before_step, before_optimizer_step=dino_before_optimizer_step,
)
