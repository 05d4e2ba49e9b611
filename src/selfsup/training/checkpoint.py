"""Checkpoints: weights in safetensors, the rest of the state loaded with ``weights_only=True``.

Layout of a run folder::

    RUN_DIR/config.yaml                    resolved config
    RUN_DIR/model.safetensors              final weights (tensor names say the part: backbone., head., ...)
    RUN_DIR/checkpoints/step_00000500/     one complete checkpoint:
        model.safetensors                  weights
        state.pt                           optimiser, step, length (plain tensors/containers, no pickled objects)
        meta.json                          format version, step, config

Every weights file records a checksum of its tensors (``weights_sha256`` in its metadata), and a
checkpoint's ``state.pt`` and ``meta.json`` record the checksum of the weights they were written
with: a file that stopped part-way, a damaged copy, or a folder that mixes the files of two writes
is refused on load with a one-line error. The metadata is written in sorted key order, so the same
tensors and metadata give the same bytes in every process. Files and folders are created with the
mode the umask gives every other file (``mkstemp``/``mkdtemp`` would make them private).

A checkpoint folder is first written under a temporary name, every file flushed and fsynced, then
renamed into place, so a kill at any moment leaves the previous checkpoints intact and never shows
a half-written one. Only the newest ``keep_last`` are kept; old ones are renamed out of the listing
before they are deleted, so a kill during the deletion never leaves a half-deleted "checkpoint".
A write that fails (disk full, no permission) removes its temporary folder, leaves every earlier
checkpoint in place and raises :class:`CheckpointWriteError` saying which checkpoint is kept.
``docs/reliability.md`` lists these guarantees with the tests that check them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save as _serialize

from selfsup.errors import CheckpointError, CheckpointWriteError

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
DIGEST_KEY = "weights_sha256"


def _why(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    return e.strerror or str(e)


def check_writable(run_dir: str | Path) -> None:
    """Fail before any work if ``run_dir`` cannot be created, written and fsynced."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=run_dir)
        try:
            os.write(fd, b"selfsup write check\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise CheckpointWriteError(f"output folder {run_dir} is not writable ({_why(e)}); choose another --out, "
                                   "or fix its permissions or free space") from None


def check_space_for_run(run_dir: str | Path, state_dict: dict[str, torch.Tensor], keep_last: int,
                        optimizer_slots: int = 1) -> None:
    """Fail before training if ``keep_last + 1`` checkpoints (weights + ``optimizer_slots`` copies of
    the floating-point weights as optimiser state) and the final weights do not fit on the disk."""
    weights = sum(t.numel() * t.element_size() for t in state_dict.values())
    optim = optimizer_slots * sum(t.numel() * t.element_size() for t in state_dict.values() if t.is_floating_point())
    one = weights + optim + 64 * 1024  # headers, meta.json, RNG state
    check_free_space(run_dir, (keep_last + 1) * one + weights,
                     f"this run ({keep_last} + 1 checkpoints of {one / 2**20:.1f} MiB and the final weights)")


def check_free_space(run_dir: str | Path, needed_bytes: int, what: str) -> None:
    """Fail before training when the run folder's disk has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise CheckpointWriteError(f"{run_dir} has {free / 2**20:.1f} MiB free but {what} needs about "
                                   f"{needed_bytes / 2**20:.1f} MiB; free space, choose another --out, or lower keep_last")


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


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes): equal for equal weights, whatever the file."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_file(tensors: dict[str, torch.Tensor], filename: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file`` with the metadata in sorted key order (safetensors' own order varies by process)."""
    raw = _serialize(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(filename, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(memoryview(raw)[8 + n:])


def _new_temp_file(folder: Path, suffix: str) -> Path:
    """A new empty file under a temporary name, with the umask's mode (``mkstemp`` would give 0600)."""
    path = folder / f".tmp-{uuid.uuid4().hex}{suffix}"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path


def _new_temp_dir(folder: Path, prefix: str) -> Path:
    """A new folder under a temporary name, with the umask's mode (``mkdtemp`` would give 0700)."""
    path = folder / f"{prefix}{uuid.uuid4().hex}"
    os.mkdir(path, 0o777)
    return path


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file that records its tensors' checksum."""
    tensors = _contiguous_state(state_dict)
    meta = {"format_version": str(FORMAT_VERSION), **(metadata or {}), DIGEST_KEY: weights_digest(tensors)}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, rename: readers see the old or the whole new file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_file(path.parent, path.suffix)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            old = "the previous file there is unchanged" if path.exists() else "nothing was written"
            raise CheckpointWriteError(f"could not write {path} ({_why(e)}); {old}") from None
        raise
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one that records a checksum (selfsup writes one) is checked against it."""
    return _load_checked(Path(path))[0]


def _load_checked(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """``(tensors, checksum)``; the checksum is None for a file that records none (written elsewhere)."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        tensors, recorded = load_file(str(path)), weights_metadata(path).get(DIGEST_KEY)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"weights file {path} is corrupt or not a safetensors file ({e}); "
                              "use an earlier checkpoint from the run's checkpoints/ folder") from None
    if recorded is None:
        return tensors, None
    if weights_digest(tensors) != recorded:
        raise CheckpointError(f"weights file {path} does not match the checksum recorded in it (a write that stopped "
                              "part-way, or a damaged copy); copy it again or use an earlier checkpoint from the "
                              "run's checkpoints/ folder")
    return tensors, recorded


def weights_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``RUN_DIR/checkpoints/step_XXXXXXXX`` atomically and prune to the newest ``keep_last``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_dir(root, ".tmp-step-")
        tensors = _contiguous_state(weights)
        digest = weights_digest(tensors)  # ties state.pt and meta.json to these weights
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format_version": str(FORMAT_VERSION), DIGEST_KEY: digest})
        torch.save({**state, DIGEST_KEY: digest}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, **meta,
                                                   DIGEST_KEY: digest}, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():
            # Same step written again (e.g. the final checkpoint after a resume): move the old one
            # aside first; cleanup_temporary puts it back if a kill lands between the two renames.
            os.rename(final, root / f"{_REPLACED}{final.name}")
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            cleanup_temporary(run_dir)  # restores a checkpoint moved aside above
            done = list_checkpoints(run_dir)
            kept = f"the previous checkpoint {done[-1]} is kept" if done else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write checkpoint step {step} in {root} ({_why(e)}); {kept}. "
                                       "Free space (or fix permissions), then continue the run with --resume") from None
        raise
    shutil.rmtree(root / f"{_REPLACED}{final.name}", ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _remove_dir(old)
    return final


_REPLACED = ".tmp-replaced-"


def _remove_dir(path: Path) -> None:
    """Delete a folder so that a kill midway never leaves a partial folder under its old name."""
    doomed = path.with_name(f".tmp-delete-{path.name}")
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


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
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: meta.json is not a selfsup checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')}, this selfsup "
                              f"reads version {FORMAT_VERSION}; resume it with the selfsup release that wrote it")
    weights, digest = _load_checked(path / "model.safetensors")
    try:
        # weights_only: tensors and plain containers only; any other pickled object is refused unrun.
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if isinstance(e, pickle.UnpicklingError) and found:
            raise CheckpointError(f"checkpoint {path}: state.pt holds Python objects that selfsup never writes (a "
                                  f"reference to {found.group(1)}); they were not loaded, since unpickling them could "
                                  "run code. The file was not written by selfsup or was altered; use another "
                                  "checkpoint") from None
        raise CheckpointError(f"checkpoint {path}: state.pt cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt or was not written by "
                              "selfsup; use an earlier checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: state.pt holds a {type(state).__name__}, not a selfsup state dict")
    _check_same_write(path, digest, meta.get(DIGEST_KEY), state.get(DIGEST_KEY))
    return weights, state, meta


def _check_same_write(path: Path, weights: str | None, meta: str | None, state: str | None) -> None:
    """The three files of a checkpoint must come from one write: each records the weights' checksum."""
    recorded = {"model.safetensors": weights, "meta.json": meta, "state.pt": state}
    if all(v is None for v in recorded.values()):
        return  # written before checksums were recorded
    if len(set(recorded.values())) > 1:
        which = ", ".join(f"{k} {'records none' if v is None else v[:12]}" for k, v in recorded.items())
        raise CheckpointError(f"checkpoint {path} mixes files of different writes (weights checksums: {which}); "
                              "its optimiser state does not belong to its weights. Use an earlier checkpoint (delete "
                              "this folder and resume)")


def cleanup_temporary(run_dir: str | Path) -> None:
    """Remove leftovers of writes interrupted by a kill."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.glob(f"{_REPLACED}*"):
            original = root / p.name[len(_REPLACED):]
            if not original.exists():
                os.rename(p, original)  # killed between moving it aside and renaming its successor in
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in Path(run_dir).glob(".tmp-*"):
        p.unlink(missing_ok=True)
