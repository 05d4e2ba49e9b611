"""Loss functions: pure functions of tensors, no training-loop imports."""
from selfsup.losses.nt_xent import nt_xent

__all__ = ["nt_xent"]
