"""The files a run writes: weights and checkpoint folders tied together by a checksum, refused when part-written
or mixed; modes that follow the umask; byte-identical weights files in every process; no RNG state to restore."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfsup.artifacts.hub import export_hub
from selfsup.errors import CheckpointError, CheckpointWriteError
from selfsup.methods import METHODS
from selfsup.training import checkpoint as ckpt
from selfsup.training.checkpoint import list_checkpoints, load_checkpoint, load_weights, save_checkpoint, save_weights
from selfsup.training.loop import pretrain


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.full((64, 3), value), "head.b": torch.arange(5.0) + value,
            "backbone.n": torch.tensor(7), "head.h": torch.full((4,), value, dtype=torch.bfloat16)}


def _write(run: Path, step: int, value: float) -> Path:
    state = {"optimizer": {"state": {}, "param_groups": []}, "step": step, "total_steps": 10}
    return save_checkpoint(run, step, _weights(value), state, {"config": {}, "kind": "test"}, keep_last=5)


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------------
# Checksums


@pytest.mark.parametrize("stray", ["model.safetensors", "state.pt", "meta.json"])
def test_a_checkpoint_folder_mixing_two_writes_is_refused(tmp_path, stray):
    one, two = _write(tmp_path, 1, 1.0), _write(tmp_path, 2, 2.0)
    load_checkpoint(one), load_checkpoint(two)  # each folder as written loads
    shutil.copyfile(two / stray, one / stray)  # one file from another write, as an in-place write would leave
    if stray == "meta.json":  # the step would differ too; keep it, so only the checksum tells
        (one / "meta.json").write_text((one / "meta.json").read_text().replace('"step": 2', '"step": 1'))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(one)
    message = _one_line(e)
    assert "mixes files of different writes" in message and "earlier checkpoint" in message and str(one) in message


def test_resuming_from_a_mixed_checkpoint_folder_is_a_one_line_error(tmp_path, tiny_cfg):
    cfg = tiny_cfg(steps=6, checkpoint_every=3, keep_last=3)
    pretrain(cfg, tmp_path / "r", progress=False)
    three, six = list_checkpoints(tmp_path / "r")
    shutil.copyfile(three / "model.safetensors", six / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        pretrain(cfg, tmp_path / "r", resume=True, progress=False)
    assert "mixes files of different writes" in _one_line(e)


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("where", ["weights file", "checkpoint"])
def test_a_part_written_weights_file_is_refused(tmp_path, where):
    path = save_weights(_weights(3.0), tmp_path / "model.safetensors", metadata={"method": "simclr"})
    if where == "checkpoint":
        path = _write(tmp_path / "run", 1, 3.0) / "model.safetensors"
    # A write that stopped part-way after the file had its size: the last pages were never written (zeros).
    data = bytearray(path.read_bytes())
    start = _data_start(path)
    data[start + (len(data) - start) // 2:] = bytes(len(data) - start - (len(data) - start) // 2)
    path.write_bytes(bytes(data))
    load = load_weights if where == "weights file" else (lambda p: load_checkpoint(p.parent))
    with pytest.raises(CheckpointError) as e:
        load(path)
    message = _one_line(e)
    assert "does not match the checksum" in message and "earlier checkpoint" in message
    path.write_bytes(bytes(data[:start + 10]))  # cut short: safetensors itself refuses it
    with pytest.raises(CheckpointError, match="corrupt"):
        load(path)


def test_weights_written_elsewhere_without_a_checksum_still_load(tmp_path):
    from safetensors.torch import save_file

    save_file(_weights(1.0), str(tmp_path / "w.safetensors"))
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["backbone.w"], _weights(1.0)["backbone.w"])


def _fail_part_way(_obj, path, *a, **kw):
    Path(path).write_bytes(b"\x00" * 100)  # some bytes reach the disk, then it is full
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_weights_write_failing_part_way_leaves_the_previous_file(tmp_path, monkeypatch):
    path = save_weights(_weights(1.0), tmp_path / "model.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(ckpt, "save_file", _fail_part_way)
    with pytest.raises(CheckpointWriteError) as e:
        save_weights(_weights(2.0), path)
    assert "the disk is full" in _one_line(e) and "unchanged" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_pt_export_failing_part_way_leaves_the_previous_file(tmp_path, monkeypatch):
    from selfsup.artifacts.export import export_backbone
    from selfsup.models.backbones import build_backbone

    backbone = build_backbone("resnet18", image_size=96)
    kwargs = {"backbone_name": "resnet18", "in_channels": 3, "image_size": 96}
    out = tmp_path / "encoder.pt"
    export_backbone(backbone, "torchvision", out, **kwargs)
    before = out.read_bytes()
    monkeypatch.setattr(torch, "save", _fail_part_way)
    with pytest.raises(CheckpointWriteError):
        export_backbone(backbone, "torchvision", out, **kwargs)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["encoder.pt"]


# ------------------------------------------------------------------------------------------------
# File modes


def _modes(root: Path) -> dict[str, int]:
    # Below root only: pytest makes tmp_path itself 0700.
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> int:
        os.umask(mask)
        return mask

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_weights_and_checkpoint_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    save_weights(_weights(1.0), tmp_path / "w" / "model.safetensors")
    ckpt.write_atomically(tmp_path / "w" / "encoder.pt", lambda tmp: torch.save(_weights(1.0), tmp))
    _write(tmp_path / "run", 1, 1.0)
    modes = _modes(tmp_path)
    wrong = {k: oct(m) for k, m in modes.items()
             if m != (0o777 & ~mask if (tmp_path / k).is_dir() else 0o666 & ~mask)}
    assert not wrong, wrong


def test_a_run_folder_and_its_hub_export_are_readable_by_the_group(tmp_path, tiny_cfg, umask):
    umask(0o027)  # a shared folder: the group reads everything, others nothing
    pretrain(tiny_cfg(steps=3, checkpoint_every=2), tmp_path / "r", progress=False)
    export_hub(tmp_path / "r", tmp_path / "hub")
    modes = _modes(tmp_path)
    assert "r/checkpoints/step_00000002/model.safetensors" in modes and "hub/model.safetensors" in modes
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o750 if (tmp_path / k).is_dir() else 0o640)}
    assert not wrong, wrong


# ------------------------------------------------------------------------------------------------
# Byte-identical files


_WRITE = """
import sys, torch
from selfsup.training.checkpoint import save_weights
keys = ["method", "backbone", "image_size", "in_channels", "config", "a", "b", "c", "d", "e"]
meta = {k: k.upper() for k in (keys if sys.argv[2] == "forward" else keys[::-1])}
save_weights({"backbone.w": torch.arange(12.0).reshape(3, 4), "head.b": torch.ones(2, dtype=torch.bfloat16)},
             sys.argv[1], metadata=meta)
"""


def test_weights_files_are_byte_identical_across_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    files = []
    for i, (seed, order) in enumerate([("1", "forward"), ("2", "forward"), ("3", "reverse"), ("4", "reverse")]):
        out = tmp_path / f"w{i}.safetensors"
        subprocess.run([sys.executable, "-c", _WRITE, str(out), order], env={**env, "PYTHONHASHSEED": seed},
                       check=True, timeout=120)
        files.append(out.read_bytes())
    assert all(f == files[0] for f in files)  # safetensors alone orders the metadata by a per-process hash
    assert ckpt.weights_metadata(tmp_path / "w0.safetensors")["method"] == "METHOD"
    assert load_weights(tmp_path / "w0.safetensors")["backbone.w"][2, 3].item() == 11.0
    from safetensors.torch import load_file  # the plain safetensors reader takes the rewritten header

    assert load_file(str(tmp_path / "w0.safetensors"))["head.b"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Randomness: nothing but (seed, step) to restore


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_loop_draws_nothing_from_the_global_rng_so_checkpoints_hold_none(tmp_path, tiny_cfg, method):
    # Every random number of a step comes from a generator seeded by (seed, step); torch's global generator is
    # left alone, so a checkpoint needs no RNG state for a resumed run to replay the same steps.
    states = []
    pretrain(tiny_cfg(method=method, steps=3, checkpoint_every=2), tmp_path / "r", progress=False,
             on_step=lambda step: states.append(torch.get_rng_state()))
    assert len(states) == 3 and all(torch.equal(s, states[0]) for s in states)
    state = load_checkpoint(list_checkpoints(tmp_path / "r")[-1])[1]
    assert not [k for k in state if "rng" in k]
