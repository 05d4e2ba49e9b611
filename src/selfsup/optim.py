"""Old import path, kept for users: the code lives in ``selfsup.training.optim`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.training.optim import (  # noqa: F401
    LARS,
    split_decay_groups,
    build_optimizer,
    optimizer_from_groups,
)

__all__ = [
    'LARS',
    'split_decay_groups',
    'build_optimizer',
    'optimizer_from_groups',
]
