"""Old import path, kept for users: the code lives in ``selfsup.artifacts.hub`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.artifacts.hub import (  # noqa: F401
    export_hub,
    load_encoder,
    from_pretrained,
    embed,
    DATA_LICENCES,
    FORMAT,
)

__all__ = [
    'export_hub',
    'load_encoder',
    'from_pretrained',
    'embed',
    'DATA_LICENCES',
    'FORMAT',
]
