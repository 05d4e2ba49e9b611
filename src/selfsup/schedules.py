"""Old import path, kept for users: the code lives in ``selfsup.training.schedules`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.training.schedules import (  # noqa: F401
    warmup_cosine,
    scaled_lr,
    ema_tau,
)

__all__ = [
    'warmup_cosine',
    'scaled_lr',
    'ema_tau',
]
