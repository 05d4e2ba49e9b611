"""Old import path, kept for users: the code lives in ``selfsup.training.loop``, ``selfsup.training.steps``, ``selfsup.training.build``, ``selfsup.training.resume``, ``selfsup.training.knn_monitor`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.training.loop import (  # noqa: F401
    pretrain,
    TrainingError,
    export_weights,
)
from selfsup.training.steps import (  # noqa: F401
    resolve_device,
    bf16_supported,
    resolve_precision,
    autocast_context,
    epoch_permutation,
    step_indices,
    StepBatchSampler,
    batch_stream,
    TrainStep,
)
from selfsup.training.build import (  # noqa: F401
    resolve_views,
    build_model,
    total_steps_for,
    warmup_steps_for,
    unwrap,
)
from selfsup.training.knn_monitor import (  # noqa: F401
    KNN_BANK,
    KNN_QUERIES,
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
