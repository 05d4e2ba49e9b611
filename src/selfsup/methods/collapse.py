"""Representation-collapse monitor (BYOL, Grill et al. 2020, Sec. 3.2 and Table 5).

Without negatives a network can minimise a bootstrap loss with a constant output. The symptom is
measured on the L2-normalised projections ``zn`` of a batch: the standard deviation of each
dimension over the batch, averaged over dimensions. For ``d``-dimensional unit vectors spread
over the sphere it is about ``1/sqrt(d)``; for collapsed (constant) outputs it is 0.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F


class CollapseWarning(UserWarning):
    """The online projections have (nearly) collapsed to a constant."""


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std over the batch of ``z / |z|`` (a 0-d tensor)."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"collapse_std expects an (N, d) batch with N >= 2, got {tuple(z.shape)}")
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class CollapseMonitor:
    """Warns once when ``collapse_std`` falls below ``threshold`` after step ``after_step``.

    ``threshold`` is absolute; ``CollapseMonitor.for_dim(d, fraction)`` sets it to ``fraction/sqrt(d)``
    (a fraction of the healthy value). ``fraction = 0`` disables the monitor.
    """

    def __init__(self, threshold: float, after_step: int = 0, hint: str = "lower optim.lr"):
        if threshold < 0 or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
        self.threshold = threshold
        self.after_step = after_step
        self.hint = hint  # what to change, from the method's spec (``MethodSpec.collapse_hint``)
        self.warned_at: int | None = None

    @classmethod
    def for_dim(cls, dim: int, fraction: float, after_step: int = 0, hint: str = "lower optim.lr") -> "CollapseMonitor":
        return cls(fraction / math.sqrt(dim), after_step, hint)

    def check(self, step: int, value: float | None) -> bool:
        """True (and one ``CollapseWarning``, also printed to stderr) the first time the value is too low."""
        if value is None or self.threshold == 0 or self.warned_at is not None or step <= self.after_step:
            return False
        if not value < self.threshold:
            return False
        self.warned_at = step
        msg = (f"representation collapse: collapse_std = {value:.4g} at step {step} is below the threshold "
               f"{self.threshold:.4g} (healthy is about 1/sqrt(d)); the online projections are nearly constant "
               f"and the encoder is no longer learning useful features. To avoid it: {self.hint}; the threshold is "
               "collapse_threshold.")
        warnings.warn(msg, CollapseWarning, stacklevel=2)
        print(f"[selfsup] warning: {msg}", file=sys.stderr)
        return True
