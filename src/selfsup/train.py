"""Old import path, kept for users: the code lives in ``selfsup.training.loop``, ``selfsup.training.steps``, ``selfsup.training.build``, ``selfsup.training.resume``, ``selfsup.training.knn_monitor`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.training.build import resolve_views, build_model, total_steps_for, warmup_steps_for, unwrap
from selfsup.training.knn_monitor import KNN_BANK, KNN_QUERIES
from selfsup.training.loop import pretrain, TrainingError, export_weights
from selfsup.training.steps import (
    resolve_device, bf16_supported, resolve_precision, autocast_context, epoch_permutation, step_indices,
    StepBatchSampler, batch_stream, TrainStep,
)

__all__ = [
    'pretrain',
    'TrainingError',
    'export_weights',
    'resolve_device',
    'bf16_supported',
    'resolve_precision',
    'autocast_context',
    'epoch_permutation',
    'step_indices',
    'StepBatchSampler',
    'batch_stream',
    'TrainStep',
    'resolve_views',
    'build_model',
    'total_steps_for',
    'warmup_steps_for',
    'unwrap',
    'KNN_BANK',
    'KNN_QUERIES',
]
