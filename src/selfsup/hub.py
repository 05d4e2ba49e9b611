"""Old import path, kept for users: the code lives in ``selfsup.artifacts.hub`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.artifacts.hub import (  # noqa: F401
    CheckpointError,
    ConfigError,
    FORMAT,
    DATA_LICENCES,
    export_hub,
    load_encoder,
    from_pretrained,
    embed,
)

__all__ = [
    'CheckpointError',
    'ConfigError',
    'FORMAT',
    'DATA_LICENCES',
    'export_hub',
    'load_encoder',
    'from_pretrained',
    'embed',
]
