"""Old import path, kept for users: the code lives in ``selfsup.training.loop`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.training.loop import (  # noqa: F401
    ConfigError,
    BadImageError,
    TrainingError,
    resolve_device,
    bf16_supported,
    resolve_precision,
    autocast_context,
    epoch_permutation,
    step_indices,
    StepBatchSampler,
    batch_stream,
    resolve_views,
    build_model,
    total_steps_for,
    warmup_steps_for,
    unwrap,
    pretrain,
    export_weights,
)

__all__ = [
    'ConfigError',
    'BadImageError',
    'TrainingError',
    'resolve_device',
    'bf16_supported',
    'resolve_precision',
    'autocast_context',
    'epoch_permutation',
    'step_indices',
    'StepBatchSampler',
    'batch_stream',
    'resolve_views',
    'build_model',
    'total_steps_for',
    'warmup_steps_for',
    'unwrap',
    'pretrain',
    'export_weights',
]
