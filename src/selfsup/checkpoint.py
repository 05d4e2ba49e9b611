"""Checkpoints: weights in safetensors, the rest of the state loaded with ``weights_only=True``.

Layout of a run folder::

    RUN_DIR/config.yaml                    resolved config
    RUN_DIR/model.safetensors              final weights (tensor names say the part: backbone., head., ...)
    RUN_DIR/checkpoints/step_00000500/     one complete checkpoint:
        model.safetensors                  weights
        state.pt                           optimiser, step, RNG (plain tensors/containers, no pickled objects)
        meta.json                          format version, step, config

A checkpoint folder is first written under a temporary name, every file flushed and fsynced, then
renamed into place, so a kill at any moment leaves the previous checkpoints intact and never shows
a half-written one. Only the newest ``keep_last`` are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message says which and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _contiguous_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone what needs it.
    out, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        meta = {"format_version": str(FORMAT_VERSION), **(metadata or {})}
        save_file(_contiguous_state(state_dict), tmp, metadata=meta)
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"weights file {path} is corrupt or not a safetensors file ({e}); "
                              "use an earlier checkpoint from the run's checkpoints/ folder") from None


def weights_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``RUN_DIR/checkpoints/step_XXXXXXXX`` atomically and prune to the newest ``keep_last``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    try:
        save_file(_contiguous_state(weights), str(tmp / "model.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, **meta}, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # same step written again (e.g. the final checkpoint); replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: p.name)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, state, meta) of one checkpoint folder; never unpickles arbitrary objects."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable meta.json ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')}, this selfsup "
                              f"reads version {FORMAT_VERSION}; resume it with the selfsup release that wrote it")
    weights = load_weights(path / "model.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: state.pt cannot be read safely ({type(e).__name__}: {e}); "
                              "it is corrupt or was not written by selfsup") from None
    return weights, state, meta


def cleanup_temporary(run_dir: str | Path) -> None:
    """Remove leftovers of writes interrupted by a kill."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in Path(run_dir).glob(".tmp-*"):
        p.unlink(missing_ok=True)
