"""Evaluation of a frozen encoder: feature extraction, kNN, the linear probe (L-BFGS / scikit-learn), sharded extraction across processes.

Plain torch below the training loop, which uses the kNN monitor during pre-training. The protocols that
train on top of a run (SGD linear protocol, fine-tuning, distillation) live in ``selfsup.protocols``.
"""
from selfsup.evaluation.frozen import knn_eval, linear_eval
from selfsup.evaluation.preprocess import Preprocessing, prepare_images

__all__ = ["knn_eval", "linear_eval", "Preprocessing", "prepare_images"]
