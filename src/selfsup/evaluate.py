"""Old import path, kept for users: the code lives in ``selfsup.evaluation.frozen`` (see docs/architecture.md).

Re-exports the public names; new code imports from the new home.
"""
from selfsup.evaluation.frozen import (  # noqa: F401
    BackboneChangedError,
    EVAL_CENTER_CROP,
    eval_crop,
    prepare_images,
    iterate_batches,
    extract_features,
    topk_accuracy,
    knn_scores,
    knn_eval,
    standardise,
    linear_eval,
    state_fingerprint,
)

__all__ = [
    'BackboneChangedError',
    'EVAL_CENTER_CROP',
    'eval_crop',
    'prepare_images',
    'iterate_batches',
    'extract_features',
    'topk_accuracy',
    'knn_scores',
    'knn_eval',
    'standardise',
    'linear_eval',
    'state_fingerprint',
]
