import json
import subprocess
import sys

import pytest
import torch

from selfsup.views.config import ViewConfig
from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import list_checkpoints, load_weights
from selfsup.errors import ConfigError
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.errors import DataNotFoundError
from selfsup.models.heads import ProjectionHead
from selfsup.methods import METHODS, SimCLR
from selfsup.training.loop import pretrain


def test_simclr_one_step_changes_weights_and_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = SimCLR(build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625),
                   ProjectionHead(32, 32, 8), temperature=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x1, x2 = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss0, logs = model(x1, x2)
    assert loss0.ndim == 0 and "z_std" in logs
    loss0.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("head.") for k in changed)
    for _ in range(5):
        opt.zero_grad()
        loss, _ = model(x1, x2)
        loss.backward()
        opt.step()
    assert loss.item() < loss0.item()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_runs_a_step(method, tiny_cfg):
    cfg = tiny_cfg(method=method)
    spec = METHODS[method]
    model = spec.build(cfg.section, build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625),
                       4 if spec.needs_labels else None)  # a method that needs labels sizes its classifier
    labels = (torch.tensor([0, 1, 2, 3]),) if spec.needs_labels else ()
    loss, logs = model(torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), *labels)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.precision
def test_resume_equals_uninterrupted(tmp_path, tiny_cfg):
    cfg = tiny_cfg()
    full = pretrain(cfg, tmp_path / "full", progress=False)

    class Stop(Exception):
        pass

    def bomb(step):
        if step == 4:  # after the checkpoint at step 3
            raise Stop

    with pytest.raises(Stop):
        pretrain(cfg, tmp_path / "cut", progress=False, on_step=bomb)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_00000003"]
    resumed = pretrain(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = load_weights(full), load_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log was cut back to the checkpoint, then continued


def test_run_folder_contents(tmp_path, tiny_cfg):
    run = tmp_path / "r"
    pretrain(tiny_cfg(steps=3, knn_monitor=True), run, progress=False)
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "run.json", "views.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "images_per_sec"} <= set(rows[0])
    assert any("knn_top1" in r for r in rows)
    keys = load_weights(run / "model.safetensors").keys()
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)
    assert "backbone: resnet18" in (run / "config.yaml").read_text()


def test_refuses_to_overwrite_a_run(tmp_path, tiny_cfg):
    pretrain(tiny_cfg(steps=3), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(tiny_cfg(steps=3), tmp_path / "r", progress=False)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="temperatur.*simclr.temperature"):
        build_config(PretrainConfig, {"temperatur": 0.1})
    with pytest.raises(ConfigError, match="temperature: this key is in the method's section now: simclr.temperature"):
        build_config(PretrainConfig, {"temperature": 0.1})
    with pytest.raises(ConfigError, match="base_tau: a key of method 'byol'"):
        build_config(PretrainConfig, {"base_tau": 0.9})
    with pytest.raises(ConfigError, match="optim.lr"):
        build_config(PretrainConfig, {"optim": {"lr": -1}})
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(PretrainConfig, {"batch_size": 1})
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(PretrainConfig, {"batch_size": "many"})
    with pytest.raises(ConfigError, match="simclr.temperature: must be > 0"):
        build_config(PretrainConfig, {"simclr": {"temperature": 0}})
    with pytest.raises(ConfigError, match="view"):
        build_config(PretrainConfig, {"view": {"flip_p": 2}})
    cfg = build_config(PretrainConfig, {"view": {"blur_p": 0.0, "crop_scale": [0.2, 1.0]}})
    assert isinstance(cfg.view, ViewConfig) and cfg.view.crop_scale == (0.2, 1.0)


def test_missing_dataset_error_says_where_and_how(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError) as e:
        pretrain(tiny_cfg(dataset="cifar10", data_dir=str(tmp_path)), tmp_path / "r", progress=False)
    assert str(tmp_path) in str(e.value)


def _cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "selfsup", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_cli_end_to_end_and_linear_eval_keeps_backbone(tmp_path):
    run = tmp_path / "run"
    _cli("pretrain", "--method", "simclr", "--dataset", "embedded", "--out", str(run), "--steps", "4",
         "--batch-size", "32", "--no-progress", "--set", "backbone=resnet18", "--set", "backbone_width=0.0625",
         "--set", "knn_monitor=false")
    before = load_weights(run / "model.safetensors")
    for proto in ("linear", "knn"):
        out = _cli("eval", proto, "--run", str(run), "--dataset", "embedded", "--no-progress")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert 10.0 < result["top1"] <= 100.0 and result["top5"] >= result["top1"]
        assert json.loads((run / f"eval_{proto}.json").read_text())["top1"] == result["top1"]
    assert json.loads((run / "eval_linear.json").read_text())["backbone_unchanged"] is True
    after = load_weights(run / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_user_errors_are_one_line(tmp_path):
    out = _cli("pretrain", "--dataset", "embedded", "--out", str(tmp_path / "x"), "--set", "temperatre=0.1", check=False)
    assert out.returncode == 2
    assert "temperatre" in out.stderr and "temperature" in out.stderr and "Traceback" not in out.stderr
    out = _cli("pretrain", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "y"),
               "--steps", "1", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "cifar" in out.stderr.lower()


def test_minutes_budget_fixes_a_step_count_and_stays_reproducible(tmp_path, tiny_cfg, capsys, monkeypatch):
    # --minutes times throw-away steps, restores the state, then trains a fixed number of steps: the
    # weights equal those of a --steps run of that length (the timing leaves no trace in the run).
    # A steady fake clock, so the pace does not drift and the run is not re-planned (tests/test_timed.py).
    import selfsup.training.loop

    ticks = iter(range(10**6))
    monkeypatch.setattr(selfsup.training.loop, "_clock", lambda: next(ticks) * 0.25)
    timed = pretrain(tiny_cfg(steps=None, minutes=0.5, checkpoint_every=1000), tmp_path / "timed", progress=False)
    total = json.loads((tmp_path / "timed" / "run.json").read_text())["total_steps"]
    assert total >= 1 and "ms/step measured" in capsys.readouterr().err
    fixed = pretrain(tiny_cfg(steps=total, checkpoint_every=1000), tmp_path / "fixed", progress=False)
    a, b = load_weights(timed), load_weights(fixed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
