"""SimSiam (Chen and He 2021): Algorithm 1's loss and stop-gradient against a hand computation, the official heads,
the predictor's fixed learning rate, the collapse monitor, a short run that learns, and a Lightning fit."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.methods.simsiam import SimSiam, SimSiamConfig, build_simsiam
from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import load_weights
from selfsup.training.loop import pretrain
from selfsup.training.optim import split_decay_groups
from selfsup.training.setup import build_model
from method_checks import knn_top1


def _linear_simsiam() -> SimSiam:
    torch.manual_seed(0)
    return SimSiam(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), nn.Linear(6, 5), nn.Linear(5, 5))


def test_forward_loss_and_gradient_are_algorithm_1_with_stop_gradient():
    model = _linear_simsiam()
    twin = _linear_simsiam().double()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    loss, logs = model(x1, x2)
    loss.backward()

    # Algorithm 1 in float64, one pair at a time: D(p, z) = -p.z / (|p| |z|), z detached.
    z1, z2 = twin.projector(twin.backbone(x1.double())), twin.projector(twin.backbone(x2.double()))
    p1, p2 = twin.predictor(z1), twin.predictor(z2)
    z1, z2 = z1.detach(), z2.detach()

    def d(p, z):
        return -sum(p[i] @ z[i] / (p[i].norm() * z[i].norm()) for i in range(p.shape[0])) / p.shape[0]

    want = d(p1, z2) / 2 + d(p2, z1) / 2
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert -1.0 <= loss.item() <= 1.0 and "collapse_std" in logs


def test_official_heads_fixed_predictor_lr_and_config(tiny_cfg):
    backbone = build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625)
    model = build_simsiam(SimSiamConfig(proj_out_dim=64, proj_layers=3), backbone)  # the ImageNet projector
    proj, pred = model.projector.layers, model.predictor.layers
    assert len(proj) == 3 and len(pred) == 2  # 3-layer projector, 2-layer bottleneck predictor
    assert proj[0][0].out_features == backbone.num_features  # hidden = the backbone's width (official prev_dim)
    assert isinstance(proj[-1][-1], nn.BatchNorm1d) and not proj[-1][-1].affine  # BN on the output
    assert pred[0][0].out_features == 16 and pred[-1][0].bias is not None  # bottleneck out/4, last Linear biased
    groups = split_decay_groups(model)
    fixed = {id(p) for g in groups if g.get("fixed_lr") for p in g["params"]}
    assert fixed == {id(p) for p in model.predictor.parameters()}
    assert not any(g.get("fixed_lr") for g in split_decay_groups(build_simsiam(SimSiamConfig(fix_pred_lr=False),
                                                                                backbone)))
    with pytest.raises(ConfigError, match="simsiam.proj_layers"):
        tiny_cfg(method="simsiam", proj_layers=0)
    spec = METHODS["simsiam"]
    assert spec.collapse_dim(SimSiamConfig()) == 2048
    assert spec.paper_lr(512) == pytest.approx(0.1)
    cifar, imagenet = spec.recipes[0].values(32, 512), spec.recipes[0].values(224, 512)
    assert cifar.section["proj_layers"] == 2 and imagenet.section["proj_layers"] == 3
    assert imagenet.shared["optim"]["name"] == "sgd" and imagenet.shared["optim"]["weight_decay"] == 1e-4


def test_collapse_std_is_zero_for_constant_outputs():
    model = _linear_simsiam()
    with torch.no_grad():
        model.projector.weight.zero_()  # z = bias for every image: collapsed
    _, logs = model(torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2))
    assert float(logs["collapse_std"]) == pytest.approx(0.0, abs=1e-6)




def test_short_run_learns_features_and_the_loss_falls(tmp_path, tiny_cfg):
    # SimSiam learns slower than the contrastive methods: 300 steps, heads wider than the 32-d encoder, the CIFAR
    # projector (2 layers) and weight decay, and lr 0.4 x B/256 (the paper's 0.05 is 0.00625 at batch 32).
    cfg = tiny_cfg(method="simsiam", steps=300, batch_size=32, image_size=16, checkpoint_every=1000, seed=1,
                   proj_hidden_dim=128, proj_out_dim=128, pred_hidden_dim=64, proj_layers=2,
                   optim={"lr": 0.4, "weight_decay": 5e-4})
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg, 1, 16).backbone
    weights = load_weights(pretrain(cfg, tmp_path / "run", progress=False))
    trained = build_model(cfg, 1, 16).backbone
    trained.load_state_dict({k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")})
    train, test = load_dataset("embedded", "train", image_size=16), load_dataset("embedded", "test", image_size=16)
    before, after = knn_top1(untrained, train, test, 1000, 500), knn_top1(trained, train, test, 1000, 500)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and math.isfinite(r["loss"])]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)
    assert after > before + 4.0, (before, after)
    assert rows[-1]["collapse_std"] > 0.5 / math.sqrt(128)  # not collapsed


def test_lightning_fit_two_steps_keeps_the_predictor_lr(tmp_path):
    L = pytest.importorskip("lightning")
    from selfsup.lightning import MODULES, step_dataloader

    dataset = load_dataset("embedded", "train")
    module = MODULES["simsiam"].for_dataset(dataset, backbone="resnet18", backbone_width=0.0625, batch_size=16,
                                            precision="fp32", simsiam={"proj_out_dim": 32})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, step_dataloader(dataset, module.cfg, 2))
    assert trainer.global_step == 2
    groups = module.optimizers().optimizer.param_groups
    assert {g["lr"] for g in groups if g.get("fixed_lr")} == {module.base_lr}  # never warmed up or decayed
    assert all(g["lr"] < module.base_lr for g in groups if not g.get("fixed_lr"))  # the cosine moved the others
