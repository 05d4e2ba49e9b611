"""Loss functions: pure functions of tensors, no training-loop imports."""
from selfsup.losses.barlow_twins import barlow_twins_loss
from selfsup.losses.byol import byol_loss
from selfsup.losses.dino import dino_center_update, dino_loss
from selfsup.losses.distill import distill_loss
from selfsup.losses.infonce import enqueue_keys, infonce_loss
from selfsup.losses.nt_xent import nt_xent
from selfsup.losses.vicreg import vicreg_loss

__all__ = ["barlow_twins_loss", "byol_loss", "dino_center_update", "dino_loss", "distill_loss", "enqueue_keys",
           "infonce_loss", "nt_xent", "vicreg_loss"]
