"""Reading a ``.ckpt`` written by Lightning for a ``selfsup.lightning`` module, without importing Lightning.

``selfsup export --run FILE.ckpt`` and ``selfsup embed --run FILE.ckpt`` take such a file for a run folder. It is
read with ``torch.load(weights_only=True)``: tensors and plain containers only (the modules store
their hyper-parameters as a plain dict for this); any other pickled object is refused unrun.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from selfsup.errors import CheckpointError

__all__ = ["read_lightning_checkpoint"]


def read_lightning_checkpoint(path: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(config dict, {"in_channels", "image_size", "mean", "std"}, method weights)``; names start with ``backbone.``, ..."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"--run {path}: holds Python objects besides tensors and plain containers "
                              f"({str(e).splitlines()[0][:200]}); they were not loaded, since unpickling could run "
                              "code. Only checkpoints of selfsup.lightning modules are read") from None
    except Exception as e:
        raise CheckpointError(f"--run {path}: cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(hp.get("config"), dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"--run {path}: not a checkpoint of a selfsup.lightning module (no hyper_parameters "
                              "with a selfsup config)")
    weights = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    info = {k: hp[k] for k in ("in_channels", "image_size", "mean", "std") if k in hp}
    return hp["config"], info, weights
