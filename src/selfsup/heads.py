"""Old import path, kept for users: the code lives in ``selfsup.models.heads`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.models.heads import (  # noqa: F401
    ProjectionHead,
)

__all__ = [
    'ProjectionHead',
]
