"""selfsup.lightning: the plain loop's first step under lightning.Trainer, BYOL's EMA hook, .ckpt export."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

import selfsup  # noqa: E402
from selfsup.cli import app as cli  # noqa: E402
from selfsup.errors import ConfigError  # noqa: E402
from selfsup.data.datasets import load_dataset  # noqa: E402
from selfsup.artifacts.export import load_exported  # noqa: E402
from selfsup.lightning import BYOLModule, SimCLRModule, SimCLRv2Module, step_dataloader  # noqa: E402
from selfsup.methods.ema import ema_tau  # noqa: E402
from selfsup.training.loop import pretrain  # noqa: E402

TINY = {"dataset": "embedded", "backbone": "resnet18", "backbone_width": 0.0625, "batch_size": 16,
        "precision": "fp32", "knn_monitor": False, "log_every": 1}


class FirstLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(module, dataset, steps, root: Path, callbacks=()):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=str(root),
                        logger=L.pytorch.loggers.CSVLogger(str(root)), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, step_dataloader(dataset, module.cfg, steps))
    return trainer


def _logged(root: Path) -> list[dict]:
    path = next(root.rglob("metrics.csv"))
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_first_step_loss_equals_the_plain_loop_and_the_checkpoint_exports(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**TINY, steps=1)
    pretrain(cfg, tmp_path / "plain", progress=False)
    plain = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    assert plain["step"] == 1

    dataset = load_dataset("embedded", "train")
    module = SimCLRModule.for_dataset(dataset, cfg)
    first = FirstLoss()
    _fit(module, dataset, 2, tmp_path / "lt", [first])
    assert first.losses[0] == plain["loss"]  # same weights, batch, views and ops: bit for bit on one CPU
    assert first.losses[1] != first.losses[0]
    logged = _logged(tmp_path / "lt")
    assert {"loss", "lr", "z_std"} <= set(logged[0]), logged[0].keys()

    ckpt = next((tmp_path / "lt").rglob("*.ckpt"))
    out = tmp_path / "enc.safetensors"
    assert cli.main(["export", "--run", str(ckpt), "--to", "safetensors", "--out", str(out)]) == 0
    exported = load_exported(out)
    assert torch.equal(selfsup.load_encoder(ckpt).conv1.weight, exported.conv1.weight)
    for k, v in module.model.backbone.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v.cpu()), k


def test_byol_target_is_updated_after_the_optimiser_step(tmp_path):
    dataset = load_dataset("embedded", "train")
    module = BYOLModule.for_dataset(dataset, byol={"proj_out_dim": 16},
                                    **{k: v for k, v in TINY.items() if k not in ("dataset", "log_every", "knn_monitor")})
    xi0 = {k: v.clone() for k, v in module.model.target_backbone.named_parameters()}
    _fit(module, dataset, 1, tmp_path)
    tau = ema_tau(0, 1, module.cfg.byol.base_tau)
    online = dict(module.model.backbone.named_parameters())
    for k, t in module.model.target_backbone.named_parameters():
        # BYOL Eq. 1 with the *updated* online weights: an update before the step would give xi0 back.
        torch.testing.assert_close(t, tau * xi0[k] + (1 - tau) * online[k].detach(), rtol=0, atol=1e-6)
    assert any(not torch.equal(xi0[k], online[k]) for k in xi0)
    assert {"loss", "lr", "collapse_std", "target_collapse_std"} <= set(_logged(tmp_path)[0])
    again = BYOLModule.load_from_checkpoint(next(tmp_path.rglob("*.ckpt")))  # plain hyper-parameters rebuild it
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in again.state_dict().items())


def test_config_or_keywords_with_the_methods_defaults():
    by_kwargs = SimCLRv2Module(backbone="resnet18", backbone_width=0.0625, in_channels=1, image_size=28)
    assert by_kwargs.cfg.method == "simclrv2" and by_kwargs.cfg.simclrv2.proj_layers == 3  # the method's default
    with pytest.raises(ConfigError, match="temprature"):
        SimCLRModule(temprature=0.1)
    with pytest.raises(ConfigError, match="BYOLModule trains 'byol'"):
        BYOLModule({"method": "simclr"})


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_loop_and_lightning_take_the_same_steps_across_the_end_of_warm_up(tmp_path, tiny_cfg, method):
    """One OptimStep: losses and learning rates agree step by step, warm-up given in epochs (2 steps of 6)."""
    steps = 6
    cfg = tiny_cfg(**{**TINY, "batch_size": 1000}, method=method, steps=steps, optim={"warmup_epochs": 0.2},
                   channels_last=False)  # 10 steps per epoch of the 10,000 embedded images: warm-up 2 steps
    pretrain(cfg, tmp_path / "plain", progress=False)
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert run["warmup_steps"] == 2 and len(plain) == steps

    dataset = load_dataset("embedded", "train")
    module = (BYOLModule if method == "byol" else SimCLRModule).for_dataset(dataset, cfg)
    first = FirstLoss()
    _fit(module, dataset, steps, tmp_path / "lt", [first])
    logged = [row for row in _logged(tmp_path / "lt") if row.get("lr")]
    assert [float(r["lr"]) for r in logged] == pytest.approx([r["lr"] for r in plain], rel=1e-6)  # logged as float32
    assert first.losses == [r["loss"] for r in plain]  # bit for bit: the same step code on one CPU
