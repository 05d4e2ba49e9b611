"""``selfsup eval``: a run's frozen encoder, or a baseline, under one named protocol, written as JSON.

Protocols: ``knn`` (weighted kNN, k=200, t=0.1 by default), ``linear`` with ``logreg`` (the default:
logistic regression on standardised frozen features, ``selfsup.evaluation.linear_probe``) or ``sgd`` (the
papers' protocol, ``selfsup.protocols.linear_sgd``). Baselines, evaluated with exactly the same protocol:

- ``pixels``: the raw pixels (prepared as the run's encoder input, without ``--run`` with the data set's
  mean/std; flattened) as features.
- ``random-init``: the run's encoder (``--run``: its backbone config) at random initialisation, drawn
  with the run's seed, so it is the very network the run started from; without ``--run``, the default
  config's backbone. Batch norm keeps its initial statistics (eval mode, as every probe uses it).
- ``selfsup pretrain --method supervised`` (the same encoder trained with labels) is a run folder of
  its own, evaluated with ``--run`` like any other.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.data.holdout import split_off_test
from selfsup.data.image_checks import BAD_IMAGE_POLICIES
from selfsup.errors import ConfigError, BackboneChangedError, NoTestSplitError
from selfsup.evaluation.frozen import knn_eval, linear_eval, state_fingerprint
from selfsup.evaluation.preprocess import Preprocessing
from selfsup.evaluation.sharded import extract_features_sharded
from selfsup.models.backbones import build_backbone
from selfsup.protocols.linear_sgd import LinearSGDConfig, linear_eval_sgd
from selfsup.training.config import PretrainConfig
from selfsup.errors import check_choice
from selfsup.training.runs import load_encoder, load_run
from selfsup.training.devices import resolve_device, resolve_precision

BASELINES = ("pixels", "random-init")
LINEAR_PROTOCOLS = ("logreg", "sgd")


class PixelEncoder(nn.Module):
    """Raw pixels as features: ``x.flatten(1)`` (``num_features = C x size x size``); nothing to train."""

    def __init__(self, in_channels: int, image_size: int):
        super().__init__()
        self.num_features = in_channels * image_size * image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def random_init_encoder(cfg: PretrainConfig, in_channels: int, image_size: int) -> nn.Module:
    """``cfg``'s backbone as ``pretrain`` draws it at step 0 (seeded with ``cfg.seed``, built first)."""
    torch.manual_seed(cfg.seed)
    kw = {} if cfg.backbone_width is None else {"width": cfg.backbone_width}
    return build_backbone(cfg.backbone, in_channels=in_channels, image_size=image_size, **kw)


def _result_path(kind: str, run_dir, baseline: str | None, linear_protocol: str) -> Path | None:
    if run_dir is None:
        return None
    name = f"eval_{kind}"
    if kind == "linear" and linear_protocol != "logreg":
        name += f"_{linear_protocol}"
    if baseline:
        name += f"_{baseline}"
    return Path(run_dir, name + ".json")


def _check_arguments(kind: str, run_dir, baseline: str | None, linear_protocol: str, k: int, temperature: float) -> None:
    """One-line ConfigErrors for a protocol, baseline or kNN setting that does not exist."""
    if kind not in ("knn", "linear"):
        raise ConfigError(f"protocol: unknown {kind!r}; use knn or linear")
    if linear_protocol not in LINEAR_PROTOCOLS:
        raise ConfigError(f"--protocol: unknown {linear_protocol!r}; use one of {', '.join(LINEAR_PROTOCOLS)}")
    if baseline is not None and baseline not in BASELINES:
        raise ConfigError(f"--baseline: unknown {baseline!r}; use one of {', '.join(BASELINES)}")
    if run_dir is None and baseline is None:
        raise ConfigError("--run: give the run folder to evaluate (or --baseline pixels|random-init --dataset D)")
    if k < 1 or not temperature > 0:
        raise ConfigError(f"--k must be >= 1 and --temperature > 0 (got {k} and {temperature})")


def _encoder_to_evaluate(baseline: str | None, run, run_dir, cfg: PretrainConfig, in_channels: int,
                         image_size: int) -> tuple[nn.Module, str]:
    """The frozen encoder (the run's, or a baseline's) and the name the result gives it."""
    if baseline == "pixels":
        return PixelEncoder(in_channels, image_size), "raw pixels"
    if baseline == "random-init":
        return (random_init_encoder(cfg, in_channels, image_size),
                f"{cfg.backbone} at random initialisation (seed {cfg.seed})")
    return load_encoder(run), f"{run.config.method} run {run_dir}"


def _frozen_feature_protocol(kind: str, encoder: nn.Module, train, test, prep: Preprocessing, dev: torch.device,
                             device_arg: str, precision: str, batch_size: int, progress: bool, *, k: int,
                             temperature: float, seed: int, solver: str) -> tuple[dict, int, bool]:
    """kNN or logistic regression on features embedded once (under torchrun each rank embeds a shard).

    Returns ``(result, feature_dim, main)``; ``main``: this process writes the result.
    """
    owns_group = dist.init_from_env(device_arg)  # under torchrun each rank embeds a shard (docs/how-to/distributed.md)
    ftr, ytr = extract_features_sharded(encoder, train, dev, prep.image_size, batch_size=batch_size, precision=precision,
                                        progress=progress and dist.is_main_process(), preprocess=prep)
    fte, yte = extract_features_sharded(encoder, test, dev, prep.image_size, batch_size=batch_size, precision=precision,
                                        progress=progress and dist.is_main_process(), preprocess=prep)
    main = dist.is_main_process()
    if owns_group:
        dist.destroy()  # every rank now holds all features and scores them alike; rank 0 writes
    feature_dim = int(ftr.shape[1])
    if kind == "knn":
        result = {**knn_eval(ftr, ytr, fte, yte, train.num_classes, k=k, temperature=temperature),
                  "probe": "weighted-knn", "paper": "Wu et al. 2018 (k=200, t=0.1 in the peer libraries' CIFAR monitor)",
                  "similarity": "cosine (features L2-normalised)", "features_dtype": str(ftr.dtype).replace("torch.", "")}
    else:
        result = linear_eval(ftr, ytr, fte, yte, train.num_classes, seed=seed, solver=solver,
                             device=dev if solver != "sklearn" else "cpu", progress=progress and main)
    result["feature_precision"] = precision
    return result, feature_dim, main


def _splits(name: str, data_dir, image_size, cols: dict, seed: int, on_bad_image: str) -> tuple:
    """``(train, test, about)``: the data set's own splits, or (no test split) a held-out part of the training images.

    ``about`` says which, for the result JSON.
    """
    train = load_dataset(name, "train", data_dir=data_dir, image_size=image_size, on_bad_image=on_bad_image, **cols)
    if train.labels is None or bool((train.labels < 0).all()):
        raise ConfigError(f"--dataset {name}: evaluation needs labels, and this data set has none (for an image "
                          "folder: class sub-folders)")
    try:
        test = load_dataset(name, "test", data_dir=data_dir, image_size=image_size, on_bad_image=on_bad_image, **cols)
    except NoTestSplitError:
        train, test, about = split_off_test(train, seed=seed)
        if len(test) == 0:
            raise ConfigError(f"--dataset {name} has no test split and no class with two images to hold one out; "
                              "add images, or a val/ split") from None
        return train, test, about
    if test.labels is None:
        raise ConfigError(f"--dataset {name}: evaluation needs labels, and its test split has none")
    return train, test, {"test_split": "test"}


def evaluate(kind: str, run_dir: str | Path | None = None, dataset: str | None = None, data_dir: str | None = None,
             batch_size: int | None = None, device: str = "auto", k: int = 200, temperature: float = 0.1,
             progress: bool = False, *, baseline: str | None = None, linear_protocol: str = "logreg",
             solver: str = "auto", sgd: LinearSGDConfig | None = None, seed: int = 0,
             out: str | Path | None = None, on_bad_image: str | None = None) -> dict:
    """Evaluate a run's frozen encoder (or a baseline beside it); returns the result and writes it as JSON.

    A data set without a test split is evaluated on a held-out part of its training images
    (``selfsup.data.holdout``; seeded by ``seed``), and the result says so (``test_split``).
    ``on_bad_image``: ``"error"`` or ``"skip"`` for image folders; None: the run's own policy.

    Written to ``out`` if given, else into the run folder: ``eval_{kind}[_sgd][_{baseline}].json``.
    """
    t0 = time.perf_counter()
    _check_arguments(kind, run_dir, baseline, linear_protocol, k, temperature)
    run = load_run(run_dir) if run_dir is not None else None
    cfg = run.config if run is not None else PretrainConfig()
    name = dataset or cfg.dataset
    if name.startswith("stl10"):
        name = "stl10"
    image_size = run.image_size if run is not None else None
    cols = {"image_column": cfg.hf.image_column, "label_column": cfg.hf.label_column}  # hf:PATH
    # Image folders are decoded to the encoder's channels (an RGB file of a gray image reads as that gray image).
    cols["num_channels"] = run.in_channels if run is not None else None
    policy = on_bad_image or cfg.on_bad_image  # the run's policy unless one is given
    check_choice("--on-bad-image", policy, BAD_IMAGE_POLICIES)
    train, test, about_test = _splits(name, data_dir or cfg.data_dir, image_size, cols, seed, policy)
    # The encoder's input is prepared as it was trained (the run's statistics), whatever data set is read.
    prep = run.preprocessing if run is not None else Preprocessing.of_dataset(train, image_size or train.image_size)
    image_size = prep.image_size
    encoder, encoder_name = _encoder_to_evaluate(baseline, run, run_dir, cfg, prep.channels, image_size)
    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)
    encoder = encoder.to(dev)
    before = state_fingerprint(encoder)
    main = True
    if kind == "linear" and linear_protocol == "sgd":
        if dist.world_size() > 1:
            raise ConfigError("--protocol sgd runs in one process; start it without torchrun")
        if train.num_channels != prep.channels:
            raise ConfigError(f"--protocol sgd: --dataset {name} has {train.num_channels}-channel images and the "
                              f"encoder takes {prep.channels}; use the logreg protocol, which converts them")
        sgd = sgd or LinearSGDConfig(seed=seed, **({"batch_size": batch_size} if batch_size else {}))
        result = linear_eval_sgd(encoder, train, test, prep, dev, sgd, precision, progress=progress)
        feature_dim = encoder.num_features
    else:
        result, feature_dim, main = _frozen_feature_protocol(
            kind, encoder, train, test, prep, dev, device, precision, batch_size or 512, progress,
            k=k, temperature=temperature, seed=seed, solver=solver)
    if state_fingerprint(encoder) != before:
        raise BackboneChangedError("the frozen backbone changed during evaluation; this is a bug in selfsup")
    result = {"top1": result["top1"], "top5": result["top5"], "dataset": name, "protocol": kind,
              "encoder": encoder_name, "baseline": baseline, "run": None if run_dir is None else str(run_dir),
              "image_size": image_size, "num_train": len(train), "num_test": len(test), "feature_dim": feature_dim,
              "backbone_unchanged": True, "seconds": round(time.perf_counter() - t0, 1), **about_test,
              "image_preprocessing": prep.record(train.num_channels),
              **{k_: v for k_, v in result.items() if k_ not in ("top1", "top5")}}
    path = Path(out) if out is not None else _result_path(kind, run_dir, baseline, linear_protocol)
    if main and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result
