"""Old import path, kept for users: the code lives in ``selfsup.models.backbones`` (see docs/architecture.md).

Re-exports the public names of ``selfsup.models.backbones``; new code imports from there.
"""
from selfsup.models.backbones import (  # noqa: F401
    SMALL_IMAGE_MAX,
    LEGACY_SMALL_IMAGE_MAX,
    Conv2d,
    BasicBlock,
    Bottleneck,
    ResNet,
    BACKBONES,
    CPU_DEFAULT_BACKBONE,
    saved_stem,
    build_backbone,
)

__all__ = ['SMALL_IMAGE_MAX', 'LEGACY_SMALL_IMAGE_MAX', 'Conv2d', 'BasicBlock', 'Bottleneck', 'ResNet', 'BACKBONES', 'CPU_DEFAULT_BACKBONE', 'saved_stem', 'build_backbone']
