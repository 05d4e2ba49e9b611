"""Reliability and safety guarantees (docs/reliability.md lists each one with the test below that checks it).

Checkpoints: a kill at every point of a checkpoint write, a full disk, an unwritable folder, a
crafted pickle, incompatible checkpoints. Training: non-finite losses and gradients are skipped
without a trace. Config and augmentation parameters: property-based tests (hypothesis).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfsup.training import checkpoint as ckpt
from selfsup.training import setup as train_mod  # home of build_model as pretrain's set-up phase calls it
from selfsup.views.config import _PROB_FIELDS, ViewConfig
from selfsup.views.augment import BatchAugment
from selfsup.models.backbones import BACKBONES, build_backbone
from selfsup.errors import CheckpointError, CheckpointWriteError
from selfsup.training.checkpoint import (list_checkpoints, load_checkpoint,
                                load_weights, save_checkpoint)
from selfsup.cli.app import main as cli_main
from selfsup.errors import ConfigError
from selfsup.training.config import OptimConfig, PretrainConfig
from selfsup.training.config_io import build_config, from_dict, parse_overrides, to_dict
from selfsup.data.containers import DATASET_NAMES, IMAGEFOLDER_PREFIX, canonical_dataset_name
from selfsup.training.setup import channels_last_hazard
from selfsup.training.optim import build_optimizer
from selfsup.training.schedules import warmup_cosine
from selfsup.training.loop import TrainingError, pretrain

# ------------------------------------------------------------------------------------------------
# Checkpoint writes: a kill at any point leaves the previous checkpoints intact


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.full((4, 3), value), "head.b": torch.full((2,), value)}


def _write(run: Path, step: int, value: float, keep_last: int = 2) -> Path:
    state = {"optimizer": {"state": {}, "param_groups": []}, "step": step, "total_steps": 10,
             "torch_rng": torch.get_rng_state()}
    return save_checkpoint(run, step, _weights(value), state, {"config": {}, "kind": "test"}, keep_last=keep_last)


_IO_POINTS = [("save_file", "ckpt"), ("_fsync_file", "ckpt"), ("_fsync_dir", "ckpt"), ("rename", "os"),
              ("rmtree", "shutil"), ("save", "torch")]


def _instrument(die_at: int | None) -> list[int]:
    """Wrap every file-system step of save_checkpoint; ``die_at``: os._exit(137) just before that call."""
    calls = [0]
    for name, where in _IO_POINTS:
        owner = {"ckpt": ckpt, "os": ckpt.os, "shutil": ckpt.shutil, "torch": ckpt.torch}[where]
        original = getattr(owner, name)

        def wrapped(*a, _original=original, **kw):
            calls[0] += 1
            if die_at is not None and calls[0] == die_at:
                os._exit(137)  # like SIGKILL: no cleanup, no finally blocks
            return _original(*a, **kw)

        setattr(owner, name, wrapped)
    return calls


def _killed_write(run: Path, step: int, value: float, die_at: int) -> int:
    pid = os.fork()
    if pid == 0:  # child: write one checkpoint and die at the chosen point
        try:
            _instrument(die_at)
            _write(run, step, value)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("new_step", [3, 2], ids=["new-step-with-pruning", "rewrite-same-step"])
def test_kill_at_every_point_of_a_checkpoint_write_keeps_the_previous_one(tmp_path, new_step):
    probe = tmp_path / "probe"
    _write(probe, 1, 1.0), _write(probe, 2, 2.0)
    saved = {n: getattr(o, n) for n, o in [("save_file", ckpt), ("_fsync_file", ckpt), ("_fsync_dir", ckpt),
                                             ("rename", ckpt.os), ("rmtree", ckpt.shutil), ("save", ckpt.torch)]}
    try:
        calls = _instrument(None)
        _write(probe, new_step, 3.0)
        n_points = calls[0]
    finally:
        for (name, where), original in zip(_IO_POINTS, saved.values()):
            setattr({"ckpt": ckpt, "os": ckpt.os, "shutil": ckpt.shutil, "torch": ckpt.torch}[where], name, original)
    assert n_points >= 8
    outcomes = set()
    for die_at in range(1, n_points + 2):
        run = tmp_path / f"run{die_at}"
        _write(run, 1, 1.0), _write(run, 2, 2.0)
        code = _killed_write(run, new_step, 3.0, die_at)
        assert code == (137 if die_at <= n_points else 0)
        ckpt.cleanup_temporary(run)  # what the next (resumed) run does first
        names = [p.name for p in list_checkpoints(run)]
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        assert "step_00000002" in names  # the previous checkpoint survives every kill
        for p in list_checkpoints(run):  # and everything listed is complete and loads
            weights, state, meta = load_checkpoint(p)
            assert state["step"] == meta["step"] == int(p.name[5:])
        newest = load_checkpoint(list_checkpoints(run)[-1])[0]["backbone.w"][0, 0].item()
        outcomes.add(newest)
    assert outcomes == {2.0, 3.0}  # some kills land before the new checkpoint is in place, some after


def test_pruned_checkpoints_never_linger_half_deleted(tmp_path):
    for step in range(1, 6):
        _write(tmp_path, step, float(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


# ------------------------------------------------------------------------------------------------
# Disk full, unwritable folder


def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    _write(tmp_path, 1, 1.0)
    monkeypatch.setattr(ckpt, "_fsync_file", _enospc)
    with pytest.raises(CheckpointWriteError) as info:
        _write(tmp_path, 2, 2.0)
    msg = str(info.value)
    assert "the disk is full" in msg and "step_00000001 is kept" in msg and "--resume" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # no temporary leftovers
    assert load_checkpoint(list_checkpoints(tmp_path)[0])[0]["head.b"][0].item() == 1.0
    monkeypatch.setattr(ckpt, "save_file", _enospc)
    with pytest.raises(CheckpointWriteError, match="previous file there is unchanged"):
        ckpt.save_weights(_weights(5.0), tmp_path / "checkpoints" / "step_00000001" / "model.safetensors")
    assert load_weights(tmp_path / "checkpoints" / "step_00000001" / "model.safetensors")["head.b"][0] == 1.0


def test_disk_full_mid_run_stops_clearly_and_resume_loses_nothing(tmp_path, tiny_cfg, monkeypatch, capsys):
    cfg = tiny_cfg()  # 6 steps, checkpoints at 3 and 6
    full = pretrain(cfg, tmp_path / "full", progress=False)
    real_save_file, calls = ckpt.save_file, []

    def fill_disk_on_second_write(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint at step 6
            _enospc()
        return real_save_file(*a, **kw)

    monkeypatch.setattr(ckpt, "save_file", fill_disk_on_second_write)
    with pytest.raises(CheckpointWriteError) as info:
        pretrain(cfg, tmp_path / "cut", progress=False)
    assert "step 6" in str(info.value) and "step_00000003 is kept" in str(info.value)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_00000003"]
    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed
    assert cli_main(["pretrain", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0  # the run's own settings
    resumed = tmp_path / "cut" / "model.safetensors"
    a, b = load_weights(full), load_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = cli_main(["pretrain", "--dataset", "embedded", "--out", str(blocker / "run"), "--steps", "1",
                     "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "is not writable" in err and "--out" in err


def test_too_little_free_space_fails_before_training(tmp_path, tiny_cfg, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointWriteError, match=r"MiB free but this run .*needs about"):
        pretrain(tiny_cfg(), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_free_space_estimate_covers_the_real_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    needed = {}
    real = ckpt.check_free_space
    monkeypatch.setattr(ckpt, "check_free_space", lambda d, n, what: needed.setdefault("n", n) and real(d, n, what))
    cfg = tiny_cfg(steps=3, keep_last=1)
    pretrain(cfg, tmp_path / "r", progress=False)
    one = sum(f.stat().st_size for f in list_checkpoints(tmp_path / "r")[-1].iterdir())
    final = (tmp_path / "r" / "model.safetensors").stat().st_size
    assert 2 * one + final <= needed["n"] <= 4 * (2 * one + final)  # keep_last + 1 checkpoints and the weights


# ------------------------------------------------------------------------------------------------
# Loading: crafted pickles, incompatible checkpoints


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('code ran')",)


def _crafted_checkpoint(run: Path, marker: Path) -> Path:
    path = _write(run, 1, 1.0)
    torch.save({"step": 1, "optimizer": _Payload(marker)}, path / "state.pt")
    return path


def test_crafted_pickle_in_a_checkpoint_does_not_run(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = _crafted_checkpoint(tmp_path / "run", marker)
    # The payload is live: an unrestricted unpickler runs it (so this test can fail).
    torch.load(path / "state.pt", weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "could run code" in str(info.value) and "a reference to exec" in str(info.value)
    assert not marker.exists()

    code = cli_main(["pretrain", "--resume", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "could run code" in err
    assert not marker.exists()


def test_plain_pickle_file_as_state_is_refused_too(tmp_path):
    marker = tmp_path / "marker"
    path = _write(tmp_path / "run", 1, 1.0)
    (path / "state.pt").write_bytes(pickle.dumps({"step": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.fixture
def finished_run(tmp_path_factory, tiny_cfg):
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = tiny_cfg(steps=3)
    pretrain(cfg, run, progress=False)
    return run, cfg


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    for k, v in changes.items():
        if k == "config":
            meta["config"].update(v)
        else:
            meta[k] = v
    (path / "meta.json").write_text(json.dumps(meta))


def test_incompatible_checkpoints_get_clear_errors(finished_run):
    run, cfg = finished_run
    last = list_checkpoints(run)[-1]
    good_meta = (last / "meta.json").read_text()

    _edit_meta(last, format_version=99)
    with pytest.raises(CheckpointError, match="format version 99.*reads version 1"):
        pretrain(cfg, run, resume=True, progress=False)
    (last / "meta.json").write_text(good_meta)

    _edit_meta(last, config={"backbone": "resnet34"})  # written by another backbone
    other = dataclasses.replace(cfg, backbone="resnet34")
    with pytest.raises(CheckpointError, match="does not fit this model.*another backbone"):
        pretrain(other, run, resume=True, progress=False)
    with pytest.raises(ConfigError, match="differs from the interrupted run in backbone"):
        pretrain(cfg, run, resume=True, progress=False)
    (last / "meta.json").write_text(good_meta)

    _edit_meta(last, config={"no_such_key": 1})  # written by an unknown selfsup version
    with pytest.raises(CheckpointError, match="incompatible selfsup"):
        pretrain(cfg, run, resume=True, progress=False)
    (last / "meta.json").write_text(good_meta)

    (last / "meta.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="no readable meta.json"):
        load_checkpoint(last)
    (last / "meta.json").write_text(good_meta)

    data = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        pretrain(cfg, run, resume=True, progress=False)
    (last / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(last)
    (last / "model.safetensors").write_bytes(data)

    state = (last / "state.pt").read_bytes()
    (last / "state.pt").write_bytes(state[:50])
    with pytest.raises(CheckpointError, match="state.pt cannot be read"):
        load_checkpoint(last)
    (last / "state.pt").write_bytes(state)
    load_checkpoint(last)  # restored: loads again


def test_evaluating_a_run_with_another_backbone_is_a_clear_error(finished_run):
    from selfsup.training.runs import load_encoder, load_run

    run, _ = finished_run
    info = load_run(run)
    info.config = dataclasses.replace(info.config, backbone="resnet34")
    with pytest.raises(CheckpointError, match="does not fit backbone 'resnet34'"):
        load_encoder(info)


# ------------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def _inject(monkeypatch, nan_input_calls=(), inf_grad_calls=()):
    """Make the model's forward see NaN inputs (-> NaN batch-norm stats and loss) or its gradients inf."""
    real_build = train_mod.build_model
    counter = {"n": 0}

    def build(cfg, in_channels, image_size, *args, **kw):
        model = real_build(cfg, in_channels, image_size, *args, **kw)
        forward = model.forward
        first = next(model.parameters())

        def patched(x1, x2):
            counter["n"] += 1
            if counter["n"] in nan_input_calls:
                x1 = x1 * float("nan")
            loss, logs = forward(x1, x2)
            if counter["n"] in inf_grad_calls:
                first.register_hook(lambda g: torch.full_like(g, float("inf")) if counter["n"] in inf_grad_calls else g)
            return loss, logs

        model.forward = patched
        return model

    monkeypatch.setattr(train_mod, "build_model", build)
    return counter


def test_non_finite_steps_are_skipped_without_a_trace(tmp_path, tiny_cfg, monkeypatch):
    clean = pretrain(tiny_cfg(), tmp_path / "clean", progress=False)
    _inject(monkeypatch, nan_input_calls={2}, inf_grad_calls={5})
    with pytest.warns(UserWarning, match="non-finite loss"):
        dirty = pretrain(tiny_cfg(), tmp_path / "dirty", progress=False)
    summary = json.loads((tmp_path / "dirty" / "train_summary.json").read_text())
    assert summary["bad_steps"] == 2
    a, b = load_weights(clean), load_weights(dirty)
    assert all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point())
    # Batch-norm statistics were put back: the skipped steps' forward passes left no count behind.
    tracked = [k for k in a if k.endswith("num_batches_tracked")]
    per_step = int(a[tracked[0]]) // 6
    assert all(int(b[k]) == int(a[k]) - 2 * per_step for k in tracked)


def test_repeated_non_finite_losses_stop_naming_the_step_and_the_good_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    _inject(monkeypatch, nan_input_calls=set(range(4, 100)))
    cfg = tiny_cfg(steps=20, max_bad_steps=3)
    with pytest.warns(UserWarning), pytest.raises(TrainingError) as info:
        pretrain(cfg, tmp_path / "r", progress=False)
    msg = str(info.value)
    assert "not finite for 3 steps in a row (last at step 6)" in msg
    assert str(tmp_path / "r" / "checkpoints" / "step_00000003") in msg
    weights, state, _ = load_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000003")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_non_finite_weights_are_never_checkpointed(tmp_path, tiny_cfg, monkeypatch):
    models = []
    real_build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda *a, **kw: models.append(real_build(*a, **kw)) or models[-1])

    def poison(step):
        if step == 3:  # just before the checkpoint at step 3
            with torch.no_grad():
                next(models[0].parameters()).fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"non-finite values at step 3 \(backbone\.conv1\.weight\); it was not saved"):
        pretrain(tiny_cfg(), tmp_path / "r", progress=False, on_step=poison)
    assert list_checkpoints(tmp_path / "r") == []


# ------------------------------------------------------------------------------------------------
# Known crashes below selfsup


def test_channels_last_guard_detects_the_onednn_hazard():
    tiny = build_backbone("resnet18", width=0.0625, in_channels=1, image_size=16)
    reason = channels_last_hazard(tiny, torch.device("cpu"))
    assert reason is not None and "layer2.0.downsample.0" in reason
    assert channels_last_hazard(tiny, torch.device("cuda")) is None
    assert channels_last_hazard(build_backbone("resnet18", width=0.25, in_channels=1, image_size=16),
                                torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------------
# Property-based: any config is accepted and works, or is refused naming the key


_FIELDS = {f.name for f in dataclasses.fields(PretrainConfig)}
_OPTIM_FIELDS = [f.name for f in dataclasses.fields(OptimConfig)]
_VIEW_FIELDS = [f.name for f in dataclasses.fields(ViewConfig)]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["simclr", "byol", "simclrv2", "embedded", "cifar_10", "imagefolder:/x", "resnet18", "lars",
                     "adamw", "sqrt", "cpu", "fp32", "skip", "error", 0, 1, 2, 16, 0.5, 1e-9, 1e9, [0.2, 1.0]]),
)
_VALUES = st.recursive(_SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c,
                                                                                              max_size=2)),
                       max_leaves=5)
_CONFIG = st.dictionaries(
    st.sampled_from(sorted(_FIELDS) + ["lr", "bacbone", "flip_p", "x"]),
    st.one_of(_VALUES, st.dictionaries(st.sampled_from(_OPTIM_FIELDS + ["lrr"]), _VALUES, max_size=3),
              st.dictionaries(st.sampled_from(_VIEW_FIELDS), _VALUES, max_size=3)),
    max_size=5,
)


def _names_a_key(msg: str, given: dict) -> bool:
    root = msg.split(":", 1)[0].split(".")[0].split("[")[0].strip()
    return root in given or root in _FIELDS


def _check_accepted(cfg: PretrainConfig) -> None:
    """An accepted config is valid: it round-trips, its names resolve and its parts work."""
    d = to_dict(cfg)
    assert to_dict(from_dict(PretrainConfig, d)) == d
    assert cfg.dataset.startswith(IMAGEFOLDER_PREFIX) or canonical_dataset_name(cfg.dataset) in DATASET_NAMES
    assert cfg.backbone in BACKBONES or cfg.backbone.startswith("timm:")
    torch.Generator().manual_seed(cfg.seed)
    for view in (cfg.view, cfg.view2):
        if view is not None:
            _check_view_runs(view, 8, 1)
    layer = torch.nn.Linear(3, 2)
    opt = build_optimizer(cfg.optim.name, layer, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum)
    layer(torch.ones(4, 3)).sum().backward()
    opt.step()
    lrs = [warmup_cosine(s, 100, int(cfg.optim.warmup_fraction * 100), cfg.optim.lr,
                         cfg.optim.lr * cfg.optim.final_lr_fraction) for s in (0, 50, 99)]
    assert all(math.isfinite(v) and v >= 0 for v in lrs)


def _check_view_runs(view: ViewConfig, size: int, channels: int) -> None:
    aug = BatchAugment(view, size, [0.5] * channels, [0.25] * channels)
    out = aug(torch.randint(0, 256, (3, channels, 9, 7), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert out.shape == (3, channels, size, size) and torch.isfinite(out).all()


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=_CONFIG)
def test_config_property_accepted_and_valid_or_refused_naming_the_key(data):
    try:
        cfg = build_config(PretrainConfig, data)
    except ConfigError as e:
        assert _names_a_key(str(e), data), str(e)
        return
    _check_accepted(cfg)


_OVERRIDE_KEYS = sorted(_FIELDS) + ["optim.lr", "optim.name", "optim.momentum", "view.flip_p", "view.crop_scale",
                                    "view2.blur_sigma", "optim", "view", "lr", ""]
_RAW = st.one_of(st.text(max_size=8), st.sampled_from(
    ["1", "-1", "0", "1e9", ".nan", "-.inf", "[1, 2]", "[0.3, 1]", "{a: 1}", "null", "true", "2020-01-01",
     "!!python/object/apply:os.system ['true']", "[", "'x", "0x10", "1_000", "~", "embedded", "byol", "skip"]))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(pairs=st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_OVERRIDE_KEYS), _RAW),
                                st.text(max_size=8)), max_size=4))
def test_set_overrides_property(pairs):
    try:
        data = parse_overrides(pairs)
    except ConfigError as e:
        assert str(e).startswith("--set "), str(e)
        return
    try:
        cfg = build_config(PretrainConfig, data)
    except ConfigError as e:
        assert _names_a_key(str(e), data), str(e)
        return
    _check_accepted(cfg)


_NUM = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(), st.none(),
                 st.text(max_size=3), st.sampled_from([0.0, 1e-300, 1e300, 0.5, 1.0, 2.0]))
_PAIR = st.one_of(st.tuples(_NUM, _NUM), st.lists(_NUM, max_size=3), _NUM)
_VIEW_KW = {f: _NUM for f in _PROB_FIELDS}
_VIEW_KW.update(crop_scale=_PAIR, crop_ratio=_PAIR, blur_sigma=_PAIR, jitter_strength=_NUM, blur_kernel_frac=_NUM,
                blur_sigma_ref_size=_NUM, solarize_threshold=_NUM, jitter_brightness=_NUM, jitter_contrast=_NUM,
                jitter_saturation=_NUM, jitter_hue=_NUM)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(kw=st.fixed_dictionaries({}, optional=_VIEW_KW),
       size=st.one_of(st.integers(-2, 12), st.sampled_from([10**6, 2.5, "8", None, True])),
       stats=st.sampled_from([(0.5, 0.25), (float("nan"), 0.2), (0.5, float("inf")), (0.5, 0.0), (0.5, -1.0)]),
       channels=st.sampled_from([1, 3]))
def test_augmentation_property_accepted_and_runs_or_refused_naming_the_field(kw, size, stats, channels):
    try:
        view = ViewConfig(**kw)
    except ValueError as e:
        assert str(e).startswith("ViewConfig.") and str(e).split(" ")[0][len("ViewConfig."):] in _VIEW_FIELDS, str(e)
        return
    try:
        aug = BatchAugment(view, size, [stats[0]] * channels, [stats[1]] * channels)
    except ValueError as e:
        assert str(e).startswith(("out_size", "mean/std", "std")), str(e)
        return
    out = aug(torch.randint(0, 256, (3, channels, 9, 7), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert out.shape == (3, channels, size, size) and torch.isfinite(out).all()
