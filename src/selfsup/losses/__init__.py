"""Loss functions: pure functions of tensors, no training-loop imports."""
from selfsup.losses.byol import byol_loss
from selfsup.losses.distill import distill_loss
from selfsup.losses.nt_xent import nt_xent

__all__ = ["byol_loss", "distill_loss", "nt_xent"]
