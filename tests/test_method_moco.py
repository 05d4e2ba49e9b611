"""MoCo v3 (Chen, Xie and He 2021): the loss through forward against Algorithm 1 by hand, the official ResNet heads,
the momentum encoder and the MoCo v2 queue (enqueued only by update_target, saved and resumed), a short run that
learns, and a Lightning fit."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.methods.ema import ema_tau
from selfsup.methods.moco import MoCo, MoCoConfig, build_moco
from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import load_weights
from selfsup.training.loop import pretrain
from selfsup.training.setup import build_model
from method_checks import interrupt_and_resume, knn_top1, naive_infonce


def _linear_moco(temperature: float, queue_size: int = 0) -> MoCo:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    return MoCo(backbone, nn.Linear(6, 5), nn.Linear(5, 5), temperature=temperature, queue_size=queue_size, key_dim=5)


@pytest.mark.parametrize("temperature,queue_size", [(1.0, 0), (0.2, 0), (0.5, 7)])
def test_forward_loss_is_algorithm_1_symmetric_ctr(temperature, queue_size):
    model = _linear_moco(temperature, queue_size)
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    with torch.no_grad():
        model.target_backbone[1].weight.add_(0.3)  # a key encoder that differs from the query encoder
    loss, _ = model(x1, x2)
    q1 = model.predictor(model.projector(model.backbone(x1)))
    q2 = model.predictor(model.projector(model.backbone(x2)))
    k1 = model.target_projector(model.target_backbone(x1))
    k2 = model.target_projector(model.target_backbone(x2))
    queue = model.queue if queue_size else None
    want = naive_infonce(q1, k2, temperature, queue) + naive_infonce(q2, k1, temperature, queue)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    assert all(p.grad is None for p in model.target_parameters())  # keys are constants
    assert model.predictor.weight.grad is not None and model.backbone[1].weight.grad.abs().sum() > 0


def test_update_target_is_the_ema_and_enqueues_only_there():
    model = _linear_moco(1.0, queue_size=6)
    x1, x2 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    before = model.queue.clone()
    model(x1, x2)[0].backward()
    assert torch.equal(model.queue, before)  # forward has no side effect on the queue
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # an "optimiser step"
        k = torch.cat([model.target_projector(model.target_backbone(x)) for x in (x1, x2)])
    xi = {n: p.clone() for n, p in model.target_backbone.named_parameters()}
    model.update_target(0.9)
    for n, p in model.target_backbone.named_parameters():
        torch.testing.assert_close(p, 0.9 * xi[n] + 0.1 * dict(model.backbone.named_parameters())[n])
    # The step's 2N keys, normalised, go in front; the oldest fall out.
    torch.testing.assert_close(model.queue[:4], F.normalize(k, dim=1))
    torch.testing.assert_close(model.queue[4:], before[:2])
    model.update_target(0.9)  # nothing stashed: the queue stays
    torch.testing.assert_close(model.queue[4:], before[:2])


def test_skipped_step_keys_never_enter_the_queue():
    model = _linear_moco(1.0, queue_size=4)
    model(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2))  # a step that is then skipped: no update_target
    METHODS["moco"].before_step(model, 1, None)  # the next step begins
    before = model.queue.clone()
    model.update_target(0.99)
    assert torch.equal(model.queue, before)


def test_official_resnet_heads_and_config(tiny_cfg):
    backbone = build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625)
    model = build_moco(MoCoConfig(proj_hidden_dim=64, proj_out_dim=16, pred_hidden_dim=48), backbone)
    proj, pred = model.projector.layers, model.predictor.layers
    assert len(proj) == 2 and len(pred) == 2  # MoCo_ResNet: _build_mlp(2, ...) for both
    assert isinstance(proj[-1][-1], nn.BatchNorm1d) and not proj[-1][-1].affine  # BN without affine at the end
    assert isinstance(pred[-1][-1], nn.Linear) and len(pred[-1]) == 1  # the ResNet predictor ends in a Linear
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))  # bias=False everywhere
    assert pred[0][0].out_features == 48 and proj[0][0].out_features == 64
    assert "queue" not in model.state_dict()  # no queue unless asked: MoCo v3 exactly
    assert not any(p.requires_grad for p in model.target_parameters())

    for bad, key in (({"temperature": 0.0}, "moco.temperature"), ({"queue_size": -1}, "moco.queue_size"),
                     ({"base_tau": 1.5}, "moco.base_tau"), ({"proj_layers": 0}, "moco.proj_layers")):
        with pytest.raises(ConfigError, match=key):
            tiny_cfg(method="moco", **bad)
    spec = METHODS["moco"]
    assert spec.paper_lr(4096) == pytest.approx(9.6)  # 0.6 x 4096 / 256
    assert spec.target_tau(MoCoConfig(), 0, 100) == pytest.approx(0.99)
    assert spec.target_tau(MoCoConfig(), 100, 100) == 1.0
    imagenet = spec.recipes[0].values(224, 4096)
    assert imagenet.section["temperature"] == 1.0 and imagenet.shared["optim"]["lr"] == 0.6
    assert spec.recipes[0].values(32, 256).section["temperature"] == 0.2


def test_queue_is_saved_and_resume_is_exact(tmp_path, tiny_cfg):
    cfg = tiny_cfg(method="moco", steps=4, checkpoint_every=2, proj_hidden_dim=32, queue_size=80)
    full, saved, resumed = interrupt_and_resume(cfg, tmp_path)
    torch.manual_seed(cfg.seed)
    init_queue = build_model(cfg, 1, 28).queue
    assert not torch.equal(saved["queue"], init_queue)  # two steps of 2 x 16 keys went in
    torch.testing.assert_close(saved["queue"][64:], init_queue[:16])
    assert full.keys() == resumed.keys() and "queue" in full
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_loop_updates_key_encoder_by_the_cosine_momentum(tmp_path, tiny_cfg):
    cfg = tiny_cfg(method="moco", steps=1, base_tau=0.5, proj_hidden_dim=32)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg, 1, 28).state_dict()
    final = load_weights(pretrain(cfg, tmp_path / "run", progress=False))
    tau = ema_tau(0, 1, 0.5)
    w = "backbone.conv1.weight"
    torch.testing.assert_close(final["target_" + w], tau * init[w] + (1 - tau) * final[w], rtol=0, atol=1e-6)




def test_short_run_learns_features_and_the_loss_falls(tmp_path, tiny_cfg):
    cfg = tiny_cfg(method="moco", steps=150, batch_size=32, image_size=16, checkpoint_every=1000,
                   proj_hidden_dim=64, temperature=0.2, seed=1)
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg, 1, 16).backbone
    weights = load_weights(pretrain(cfg, tmp_path / "run", progress=False))
    trained = build_model(cfg, 1, 16).backbone
    trained.load_state_dict({k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")})
    train, test = load_dataset("embedded", "train", image_size=16), load_dataset("embedded", "test", image_size=16)
    before, after = knn_top1(untrained, train, test, 1000, 500), knn_top1(trained, train, test, 1000, 500)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for v in losses if math.isfinite(v)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)
    assert after > before + 5.0, (before, after)


def test_lightning_fit_two_steps(tmp_path):
    L = pytest.importorskip("lightning")
    from selfsup.lightning import MODULES

    dataset = load_dataset("embedded", "train")
    module = MODULES["moco"].for_dataset(dataset, backbone="resnet18", backbone_width=0.0625, batch_size=16,
                                         precision="fp32", moco={"proj_out_dim": 16, "queue_size": 96})
    queue = module.model.queue.clone()
    xi = module.model.target_backbone.conv1.weight.clone()
    from selfsup.lightning import step_dataloader

    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, step_dataloader(dataset, module.cfg, 2))
    assert trainer.global_step == 2
    assert not torch.equal(module.model.target_backbone.conv1.weight, xi)
    torch.testing.assert_close(module.model.queue[64:], queue[:32])  # 2 steps x 2 views x 16 keys went in front
