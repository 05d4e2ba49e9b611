"""Old import path, kept for users: the code lives in ``selfsup.methods.ema`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.methods.ema import (  # noqa: F401
    ema_update,
)

__all__ = [
    'ema_update',
]
