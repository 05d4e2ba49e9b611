"""Evaluation on frozen features: weighted kNN (Wu et al. 2018, k=200, tau=0.1) and linear evaluation.

Linear evaluation (the default protocol) is the small-data practice: features are extracted once
without augmentation, standardised, and scikit-learn's multinomial logistic regression is fitted to
convergence, with C chosen on a held-out tenth of the training set (``selfsup.evaluation.linear_probe``). The
papers' own protocol (SimCLR App. B.6, BYOL App. C.1: SGD on augmented crops of the frozen encoder)
is ``selfsup.protocols.linear_sgd`` (``selfsup eval linear --protocol sgd``).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.evaluation.linear_probe import DEFAULT_C_GRID, select_and_fit
from selfsup.evaluation.preprocess import Preprocessing, eval_crop, prepare_images


def iterate_batches(dataset, batch_size: int, num_workers: int = 0, indices: torch.Tensor | None = None) -> Iterable:
    """Yield (uint8 images, labels) in order, from memory or through a DataLoader for streamed folders."""
    if hasattr(dataset, "images"):
        images, labels = dataset.images, dataset.labels
        n = len(images)
        order = torch.arange(n) if indices is None else indices
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield images[idx], (labels[idx] if labels is not None else torch.full((len(idx),), -1, dtype=torch.long))
        return
    from torch.utils.data import DataLoader, Subset

    ds = dataset if indices is None else Subset(dataset, indices.tolist())
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, labels in loader:
        yield images, labels


@torch.no_grad()
def extract_features(model: nn.Module, dataset, device: torch.device | str, image_size: int, batch_size: int = 512,
                     num_workers: int = 0, indices: torch.Tensor | None = None, precision: str = "fp32",
                     channels_last: bool = False, progress: bool = False,
                     crop: float | None = None, preprocess: Preprocessing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image (eval mode, no augmentation): (N, D) float32 on CPU, labels (N,).

    Each batch goes through ``preprocess`` (:func:`selfsup.evaluation.preprocess.prepare_images` with the
    encoder's statistics; pass the run's, ``RunInfo.preprocessing``, when the data set is not the one it
    was trained on). None: the data set's own statistics at ``image_size``, centre crop ``crop`` (None:
    :func:`eval_crop`, 0.875 above 32 px as the official code), which is right for the training set.
    """
    preprocess = Preprocessing.of_dataset(dataset, image_size, crop) if preprocess is None else preprocess
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    batches = iterate_batches(dataset, batch_size, num_workers, indices)
    if progress:
        from tqdm.auto import tqdm

        total = math.ceil((len(indices) if indices is not None else len(dataset)) / batch_size)
        batches = tqdm(batches, total=total, desc="features", leave=False)
    try:
        for images, y in batches:
            x = preprocess(images.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                f = model(x)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        top = scores.topk(k_eff, dim=1).indices
        out[f"top{k}"] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores: the k most cosine-similar training features vote with exp(sim / tau)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for i in range(0, test_features.shape[0], chunk):
        q = F.normalize(test_features[i:i + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_eval(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 200,
             temperature: float = 0.1) -> dict[str, float]:
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return {**topk_accuracy(scores, test_labels), "k": k, "temperature": temperature}


def standardise(train_features: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x - mean) / std`` with the training features' per-dimension mean and std (std floored at 1e-6)."""
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6)
    return tuple(((x - mean) / std).float() for x in (train_features, *others))


def canonical_order(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """An order of the samples that depends on their values alone: by label, then by a fixed random
    projection of the features. The probe's validation split and its float32 sums follow the order
    of the samples, so an image folder (listed class by class) and the same images in a data set's
    own order would otherwise get slightly different probes."""
    g = torch.Generator().manual_seed(0)
    key = features.float() @ torch.randn(features.shape[1], generator=g)
    by_key = torch.argsort(key, stable=True)
    return by_key[torch.argsort(labels.long()[by_key], stable=True)]


def linear_eval(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                test_labels: torch.Tensor, num_classes: int, c_grid=DEFAULT_C_GRID, max_iter: int = 10000,
                seed: int = 0, *, val_fraction: float = 0.1, solver: str = "auto", tol: float = 1e-4,
                device: str | torch.device = "cpu", widen: bool = True, refine: bool = True,
                progress: bool = False) -> dict:
    """Multinomial logistic regression on standardised frozen features (``selfsup.evaluation.linear_probe``).

    scikit-learn's ``LogisticRegression`` (lbfgs) objective, fitted to convergence; C is chosen on a
    stratified, seeded ``val_fraction`` (10%) of the training features from ``c_grid`` (widened by
    decades while the best sits at an end, refined by half-decades), then the probe is refitted on
    all training features and scored on the test features. ``solver="torch"`` (``"auto"``, the default)
    fits every C of the search at once in float32 on ``device`` (the CPU or a GPU; bounded memory);
    ``"sklearn"`` fits scikit-learn's ``LogisticRegression`` one C at a time, the reference. The result holds top-1/top-5 and every
    parameter of the protocol (grid, chosen C, validation scores, iterations, converged, features'
    dtype and preprocessing, seed), so a figure can be reproduced from it alone. ``progress``: a line on stderr
    after each fit of the C search and after the refit.
    """
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError(f"features and labels differ in length: train {len(train_features)} vs {len(train_labels)}, "
                         f"test {len(test_features)} vs {len(test_labels)}")
    if solver == "auto":
        solver = "torch"
    order = canonical_order(train_features, train_labels)  # the same images in any order: the same probe
    xtr, xte = standardise(train_features.float()[order], test_features.float())
    ytr, yte = train_labels.long()[order], test_labels.long()
    probe = select_and_fit(xtr, ytr, num_classes, c_grid, val_fraction, seed, max_iter, tol, solver, device,
                           widen, refine, progress)
    with torch.no_grad():
        scores = probe.fit.scores(xte)
    return {**topk_accuracy(scores, yte), **probe.record, "features_dtype": str(train_features.dtype).replace("torch.", ""),
            "preprocessing": "standardise: (x - mean) / std per dimension, mean and std of the training features",
            "num_fit": len(ytr) - probe.record["num_val"]}


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, to prove a frozen backbone stayed bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
