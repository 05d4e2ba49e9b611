"""Old import path, kept for users: the code lives in ``selfsup.models.heads`` (see docs/architecture.md).

Re-exports the public names of ``selfsup.models.heads``; new code imports from there.
"""
from selfsup.models.heads import (  # noqa: F401
    ProjectionHead,
)

__all__ = ['ProjectionHead']
