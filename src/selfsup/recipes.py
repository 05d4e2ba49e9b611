"""Old import path, kept for users: the code lives in ``selfsup.methods.recipes`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.methods.recipes import (  # noqa: F401
    SMALL_IMAGE_MAX,
    WARN_LR_FACTOR,
    NATIVE_SIZES,
    CPU_BACKBONES,
    RecipeError,
    Recipe,
    RECIPES,
    PAPER_RECIPE,
    SIMCLRV2_FINETUNE,
    paper_lr,
    auto_recipe,
    native_image_size,
    resolve,
    lr_warning,
    effective_lr,
    describe,
)

__all__ = [
    'SMALL_IMAGE_MAX',
    'WARN_LR_FACTOR',
    'NATIVE_SIZES',
    'CPU_BACKBONES',
    'RecipeError',
    'Recipe',
    'RECIPES',
    'PAPER_RECIPE',
    'SIMCLRV2_FINETUNE',
    'paper_lr',
    'auto_recipe',
    'native_image_size',
    'resolve',
    'lr_warning',
    'effective_lr',
    'describe',
]
