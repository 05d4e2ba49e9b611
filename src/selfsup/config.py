"""Old import path, kept for users: the code lives in ``selfsup.training.config``, ``selfsup.training.config_io`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.training.config import (  # noqa: F401
    ConfigError,
    OptimConfig,
    HFConfig,
    TRACKERS,
    PretrainConfig,
    MAX_IMAGE_SIZE,
    MAX_DIM,
)
from selfsup.training.config_io import (  # noqa: F401
    from_dict,
    to_dict,
    parse_overrides,
    merge,
    load_yaml,
    build_config,
    save_yaml,
)

__all__ = [
    'ConfigError',
    'OptimConfig',
    'HFConfig',
    'TRACKERS',
    'PretrainConfig',
    'MAX_IMAGE_SIZE',
    'MAX_DIM',
    'from_dict',
    'to_dict',
    'parse_overrides',
    'merge',
    'load_yaml',
    'build_config',
    'save_yaml',
]
