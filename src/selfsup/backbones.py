"""Old import path, kept for users: the code lives in ``selfsup.models.backbones``, ``selfsup.models.resnet`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.models.backbones import (  # noqa: F401
    BACKBONES,
    CPU_DEFAULT_BACKBONE,
    saved_stem,
    build_backbone,
)
from selfsup.models.resnet import (  # noqa: F401
    SMALL_IMAGE_MAX,
    LEGACY_SMALL_IMAGE_MAX,
    Conv2d,
    BasicBlock,
    Bottleneck,
    ResNet,
)

__all__ = [
    'BACKBONES',
    'CPU_DEFAULT_BACKBONE',
    'saved_stem',
    'build_backbone',
    'SMALL_IMAGE_MAX',
    'LEGACY_SMALL_IMAGE_MAX',
    'Conv2d',
    'BasicBlock',
    'Bottleneck',
    'ResNet',
]
