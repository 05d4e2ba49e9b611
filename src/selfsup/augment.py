"""Old import path, kept for users: the code lives in ``selfsup.views.augment``, ``selfsup.views.config``, ``selfsup.views.ops`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.views.augment import (  # noqa: F401
    BatchAugment,
    two_views,
    save_view_grid,
)
from selfsup.views.config import (  # noqa: F401
    TRANSFORM_NAMES,
    MAX_JITTER,
    MAX_BLUR_SIGMA,
    ViewConfig,
    view_config_for,
)
from selfsup.views.ops import (  # noqa: F401
    MAX_OUT_SIZE,
)

__all__ = [
    'BatchAugment',
    'two_views',
    'save_view_grid',
    'TRANSFORM_NAMES',
    'MAX_JITTER',
    'MAX_BLUR_SIGMA',
    'ViewConfig',
    'view_config_for',
    'MAX_OUT_SIZE',
]
