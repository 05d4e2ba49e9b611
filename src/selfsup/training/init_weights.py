"""Start pre-training from existing weights: ``selfsup pretrain --init SOURCE``.

``SOURCE`` is one of

- a ``.safetensors`` file: from ``selfsup export --to safetensors|torchvision|timm``, a Hub-style
  folder's ``model.safetensors``, a run's ``model.safetensors`` or any backbone state dict;
- a ``.pt`` / ``.pth`` / ``.bin`` state-dict file, e.g. torchvision's or timm's ImageNet weights
  (``torchvision.models.ResNet50_Weights.IMAGENET1K_V2`` saves as ``resnet50-11ad3fa6.pth``). It is
  read with ``torch.load(weights_only=True)``: tensors and plain containers only, never any other
  pickled object;
- a folder: an earlier selfsup run (its final weights, else its newest checkpoint) or a Hub-style
  folder written by ``selfsup export --to hub``.

Only the encoder f is initialised; heads start fresh, as in the papers' fine-tuning from ImageNet.
Names are matched after removing one wrapper prefix (``backbone.``, ``module.``, ``model.``,
``encoder.``, and Lightning's ``model.backbone.``); an ImageNet classifier (``fc.*``, ``head.*``,
``classifier.*``) that the encoder does not have is dropped. Any other difference, a missing tensor,
an extra one or a shape mismatch, is an error naming the first such tensor. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from torch import nn

from selfsup.errors import CheckpointError
from selfsup.training.checkpoint import list_checkpoints, load_weights

__all__ = ["InitError", "read_init_weights", "load_init", "init_record"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_PREFIXES = ("model.backbone.", "backbone.", "module.", "model.", "encoder.", "state_dict.")
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.")


class InitError(CheckpointError):
    """``--init SOURCE`` cannot be read or does not fit the encoder; the message names the tensor."""


def _read_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InitError(f"--init {path}: holds Python objects besides tensors ({str(e).splitlines()[0][:200]}); they "
                        "were not loaded, since unpickling them could run code. Save a plain state dict "
                        "(torch.save(model.state_dict(), ...)) or a .safetensors file") from None
    except Exception as e:
        raise InitError(f"--init {path}: cannot be read as a PyTorch state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):  # common wrappers (Lightning, training scripts)
            if isinstance(obj.get(key), dict) and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise InitError(f"--init {path}: not a state dict (a mapping of tensor names to tensors)")
    return obj


def _weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    if (source / "model.safetensors").is_file():  # a finished run or a Hub-style folder
        return source / "model.safetensors"
    found = list_checkpoints(source)
    if found:
        return found[-1] / "model.safetensors"
    raise InitError(f"--init {source}: a folder without model.safetensors or checkpoints; give a weights file, "
                    "a selfsup run folder or a folder written by selfsup export --to hub")


def read_init_weights(source: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(file read, state dict)`` of an ``--init`` source, loaded without unpickling objects."""
    source = Path(source).expanduser()
    if not source.exists():
        raise InitError(f"--init {source}: no such file or folder (selfsup never downloads weights; save them first, "
                        "see docs/how-to/pretrained-weights.md)")
    path = _weights_file(source)
    if path.suffix in PICKLE_SUFFIXES:
        return path, _read_pickle_state(path)
    if path.suffix != ".safetensors":
        raise InitError(f"--init {path}: unknown kind of file; give .safetensors, .pt, .pth or .bin")
    return path, load_weights(path)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _best_match(state: dict[str, torch.Tensor], own: set[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """The wrapper prefix whose removal makes the most names match the encoder's ('' when none helps)."""
    best, best_state, best_hits = "", state, len(own & set(state))
    for prefix in WRAPPER_PREFIXES:
        sub = _strip(state, prefix)
        hits = len(own & set(sub))
        if hits > best_hits:
            best, best_state, best_hits = prefix, sub, hits
    return best, best_state


def load_init(backbone: nn.Module, source: str | Path) -> dict:
    """Load ``source`` into ``backbone`` (strict after the rules above); returns what was done (for the run folder)."""
    path, state = read_init_weights(source)
    target = backbone.model if hasattr(backbone, "model_name") and hasattr(backbone, "model") else backbone  # timm
    own = target.state_dict()
    prefix, state = _best_match(state, set(own))
    dropped = sorted(k for k in state if k not in own and k.startswith(CLASSIFIER_PREFIXES))
    state = {k: v for k, v in state.items() if k not in dropped}
    where = f"--init {path}" + (f" (names after removing '{prefix}')" if prefix else "")
    missing = [k for k in own if k not in state]
    if missing:
        extra = [k for k in state if k not in own]
        alike = [k for k in extra if k.endswith("." + missing[0])]  # same name under another prefix
        hint = (f"; the file has {alike[0]!r}: its names carry the prefix {alike[0][:-len(missing[0])]!r}" if alike
                else f"; the file has {extra[0]!r} instead" if extra else "")
        raise InitError(f"{where}: the encoder's tensor {missing[0]!r} is not in the file ({len(missing)} of {len(own)} "
                        f"missing{hint}); was it saved from another architecture (--backbone)?")
    extra = [k for k in state if k not in own]
    if extra:
        raise InitError(f"{where}: tensor {extra[0]!r} in the file has no place in the encoder ({len(extra)} such); "
                        "was it saved from another architecture (--backbone)?")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise InitError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)} in the file but "
                            f"{tuple(v.shape)} in the encoder; check --backbone, backbone_width, the number of "
                            "channels and image_size (the stem)")
    target.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return init_record(path, prefix, dropped, len(own))


def init_record(path: Path, prefix: str, dropped: list[str], tensors: int) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": str(path), "sha256": digest.hexdigest(), "prefix_removed": prefix,
            "dropped_classifier": dropped, "tensors_loaded": tensors}
