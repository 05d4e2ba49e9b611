"""DINO's self-distillation loss and its teacher centre (Caron et al. 2021, Sec. 3.1, Eq. 1-4)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selfsup.distributed import all_reduce_sum
from selfsup.losses._precision import autocast_off


def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """Cross-entropy from the centred, sharpened teacher to the student, over pairs of different crops.

    ``student_out`` holds the student head's outputs for every crop, each (B, K): the global crops
    first, in the same order as ``teacher_out``, then the local crops. ``teacher_out`` holds the
    teacher's outputs for the global crops only. With ``P_t = softmax((t - center) / teacher_temp)``
    (centred and sharpened, then detached: the teacher gets no gradient) and
    ``P_s = softmax(s / student_temp)``::

        L = mean over pairs (q, v), q a teacher crop, v a student crop, v != q, of
            mean over the batch of  -sum_k P_t(q)_k * log P_s(v)_k                 (Eq. 1 and 3)

    A teacher crop is never paired with the student's output for the same crop (the official
    ``DINOLoss`` skips ``v == iq``): with 2 global and V local crops there are ``2 * (2 + V) - 2``
    pairs. Defaults are the official code's temperatures, student 0.1 and teacher 0.04; the paper
    warms the teacher's up linearly from 0.04 to 0.07 over the first 30 epochs (its implementation
    details), a schedule the caller evaluates and passes in as ``teacher_temp``. ``center`` (K,) or
    (1, K) is updated after the loss with ``dino_center_update``.

    Across ranks nothing is communicated: each rank returns the mean over its own rows, so with equal
    per-rank batches the mean over ranks is the loss of one process on the global batch, and DDP's
    mean of the ranks' gradients is its gradient. Computed in fp32 with autocast off (the official
    code's logits come out of fp16 autocast; its softmax is fp32).
    """
    student, teacher = _crops("student_out", student_out), _crops("teacher_out", teacher_out)
    if student.shape[1:] != teacher.shape[1:]:
        raise ValueError(f"student and teacher crops must have the same (B, K), got {tuple(student.shape[1:])} "
                         f"and {tuple(teacher.shape[1:])}")
    n_teacher, n_student = teacher.shape[0], student.shape[0]
    if n_student < n_teacher:
        raise ValueError(f"student_out must list every crop the teacher saw (the global crops, in the same order) "
                         f"then the local ones: got {n_student} student crops for {n_teacher} teacher crops")
    if n_student * n_teacher - n_teacher < 1:
        raise ValueError("dino_loss needs at least one pair of different crops: pass 2 global crops (or 1 global "
                         "and at least 1 local crop)")
    k = teacher.shape[-1]
    if center.numel() != k or center.shape[-1] != k:
        raise ValueError(f"center must have shape (K,) or (1, K) with K = {k}, got {tuple(center.shape)}")
    for name, t in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if not t > 0:
            raise ValueError(f"{name} must be > 0 (the paper's are student 0.1, teacher 0.04), got {t}")
    with autocast_off(student):
        targets = F.softmax((teacher.detach().float() - center.detach().float().reshape(k)) / teacher_temp, dim=-1)
        log_probs = F.log_softmax(student.float() / student_temp, dim=-1)
        batch = teacher.shape[1]
        # ce[q, v] = mean over the batch of -sum_k P_t(q)_k log P_s(v)_k, every (teacher, student) crop pair
        ce = -torch.einsum("qbk,vbk->qv", targets, log_probs) / batch
        same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=ce.device)
        return ce.masked_select(~same_view).mean()


@torch.no_grad()
def dino_center_update(center: torch.Tensor, teacher_out: Sequence[torch.Tensor] | torch.Tensor,
                       momentum: float = 0.9) -> torch.Tensor:
    """The teacher centre after one step: ``momentum * center + (1 - momentum) * mean(teacher_out)`` (Eq. 4).

    The mean is over every row of every teacher crop on every rank (one all-reduce of the sum and the
    row count, so ranks may hold different batch sizes), as the official ``DINOLoss.update_center``;
    every rank gets the same centre. ``teacher_out`` is the teacher's raw outputs (before centring)
    for the global crops: a list of (B, K) tensors as passed to ``dino_loss``, or one (rows, K)
    tensor. The default momentum 0.9 is the official code's ``center_momentum``. Returns a new
    tensor with ``center``'s shape, dtype and device; ``center`` itself is not modified. Every rank
    must call it (a collective).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (the paper's is 0.9), got {momentum}")
    rows = _crops("teacher_out", [teacher_out] if isinstance(teacher_out, torch.Tensor) else teacher_out)
    rows = rows.reshape(-1, rows.shape[-1])
    k = rows.shape[-1]
    if center.numel() != k or center.shape[-1] != k:
        raise ValueError(f"center must have shape (K,) or (1, K) with K = {k}, got {tuple(center.shape)}")
    rows = rows.float()
    totals = all_reduce_sum(torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])]))
    batch_center = totals[:-1] / totals[-1]
    new = center.float() * momentum + batch_center.reshape(center.shape) * (1.0 - momentum)
    return new.to(center.dtype)


def _crops(name: str, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack a list of per-crop (B, K) outputs into (crops, B, K), with errors that say what was expected."""
    if isinstance(crops, torch.Tensor):
        raise ValueError(f"{name} must be a list of per-crop (B, K) tensors, got one tensor of shape "
                         f"{tuple(crops.shape)}: split it, e.g. list(out.chunk(n_crops))")
    crops = list(crops)
    if not crops:
        raise ValueError(f"{name} is empty: expected a list of per-crop (B, K) tensors")
    shape = crops[0].shape
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must hold (B, K) tensors with B, K >= 1, got shape {tuple(shape)}")
    if any(c.shape != shape for c in crops):
        raise ValueError(f"{name}: every crop must have the same (B, K), got {[tuple(c.shape) for c in crops]}")
    return torch.stack(list(crops))
