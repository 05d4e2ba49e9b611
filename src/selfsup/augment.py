"""Old import path, kept for users: the code lives in ``selfsup.views.augment`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.views.augment import (
    TRANSFORM_NAMES, ViewConfig, BatchAugment, two_views, save_view_grid, view_config_for, MAX_JITTER, MAX_BLUR_SIGMA,
    MAX_OUT_SIZE,
)

__all__ = [
    'TRANSFORM_NAMES',
    'ViewConfig',
    'BatchAugment',
    'two_views',
    'save_view_grid',
    'view_config_for',
    'MAX_JITTER',
    'MAX_BLUR_SIGMA',
    'MAX_OUT_SIZE',
]
