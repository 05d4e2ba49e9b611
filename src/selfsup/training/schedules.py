"""Schedules as pure functions of the step: easy to plot, test and resume."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_value: float, final_value: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base_value`` over ``warmup_steps``, then cosine decay to ``final_value``.

    SimCLR (Sec. B.6 / Appendix B.1): 10 warm-up epochs, then cosine decay without restarts. Step
    ``warmup_steps - 1`` reaches ``base_value``; step ``total_steps`` reaches ``final_value``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return base_value * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_value + (base_value - final_value) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """SimCLR's learning-rate scaling: ``linear`` = base x B/256, ``sqrt`` = base x sqrt(B), ``none``."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}: use 'linear', 'sqrt' or 'none'")
