"""Distillation loss of SimCLRv2 (Chen et al. 2020b, Sec. 2, Eq. 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's temperature-scaled class distributions::

        L = mean over the batch of  -sum_y softmax(t / T)_y * log_softmax(s / T)_y

    The teacher is a constant: its logits are detached, so gradients reach only the student. This is
    KL(teacher || student) plus the teacher's entropy, which does not depend on the student. The
    paper uses T = 1 for big-to-small distillation and T = 0.1 for self-distillation (Appendix B).
    No T^2 factor (Hinton et al. 2015) is applied, as in the paper's Eq. 2. Computed in fp32.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distill_loss expects two (N, classes) tensors of equal shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.cross_entropy(student_logits.float() / temperature, target)  # soft targets: -sum p log q, batch mean
