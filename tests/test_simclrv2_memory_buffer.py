"""SimCLRv2's memory buffer (Chen et al. 2020b, Sec. 2): without it the model and loss are SimCLR's exactly; with it
the loss is InfoNCE over momentum keys and a queue (checked by hand), the queue is filled only by update_target,
saved in checkpoints and resumed exactly, and the momentum encoder follows the constant 0.999."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError
from selfsup.losses import nt_xent
from selfsup.methods import METHODS
from selfsup.methods.simclr import SimCLR, build_simclr
from selfsup.methods.simclrv2 import SimCLRv2Buffer, SimCLRv2Config
from selfsup.models.backbones import build_backbone
from selfsup.training.setup import build_model
from method_checks import interrupt_and_resume


def _backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625)


def test_without_a_queue_the_model_and_loss_are_simclrs():
    spec = METHODS["simclrv2"]
    section = SimCLRv2Config(proj_out_dim=16, temperature=0.3)
    assert section.queue_size == 0
    model, before = spec.build(section, _backbone()), build_simclr(section, _backbone())
    assert type(model) is SimCLR and model.state_dict().keys() == before.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(6, 1, 16, 16, generator=g), torch.randn(6, 1, 16, 16, generator=g)
    loss, _ = model(x1, x2)
    assert torch.equal(loss, before(x1, x2)[0])
    z1, z2 = before.head(before.backbone(torch.cat([x1, x2]))).chunk(2)
    assert loss.item() == pytest.approx(nt_xent(z1, z2, 0.3).item(), rel=1e-6)
    assert spec.target_tau(section, 0, 10) is None  # no momentum encoder, no update_target call


def _naive_ce(q, k, queue, t):
    """Plain cross-entropy of q_i against [k; queue] with k_i the positive, one query at a time, in float64."""
    keys = F.normalize(torch.cat([k, queue]).double(), dim=1)
    q = F.normalize(q.double(), dim=1)
    return sum(-(q[i] @ keys[i] / t - torch.logsumexp(keys @ q[i] / t, 0)) for i in range(q.shape[0])) / q.shape[0]


def test_queue_loss_is_infonce_over_momentum_keys_and_the_queue():
    torch.manual_seed(0)
    model = SimCLRv2Buffer(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), nn.Linear(6, 5), temperature=0.2,
                           queue_size=9, key_dim=5)
    with torch.no_grad():
        model.target_backbone[1].weight.add_(0.5)  # keys from a momentum copy that differs from the online one
    x1, x2 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    before = model.queue.clone()
    loss, _ = model(x1, x2)
    z1, z2 = model.head(model.backbone(x1)), model.head(model.backbone(x2))
    k1, k2 = model.target_head(model.target_backbone(x1)), model.target_head(model.target_backbone(x2))
    want = (_naive_ce(z1, k2, model.queue, 0.2) + _naive_ce(z2, k1, model.queue, 0.2)) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.target_backbone.parameters())
    assert torch.equal(model.queue, before)  # forward leaves the queue alone
    model.update_target(0.999)
    torch.testing.assert_close(model.queue[:8], F.normalize(torch.cat([k1, k2]).detach(), dim=1))
    torch.testing.assert_close(model.queue[8:], before[:1])


def test_config_and_spec(tiny_cfg):
    with pytest.raises(ConfigError, match="simclrv2.queue_size"):
        tiny_cfg(method="simclrv2", queue_size=-1)
    with pytest.raises(ConfigError, match="simclrv2.momentum"):
        tiny_cfg(method="simclrv2", queue_size=8, momentum=1.5)
    spec = METHODS["simclrv2"]
    assert spec.target_tau(SimCLRv2Config(queue_size=8), 5, 10) == 0.999
    assert "memory buffer 8" in spec.describe(SimCLRv2Config(queue_size=8))


def test_queue_is_saved_and_resume_is_exact(tmp_path, tiny_cfg):
    cfg = tiny_cfg(method="simclrv2", steps=4, checkpoint_every=2, queue_size=80, momentum=0.9)
    full, saved, resumed = interrupt_and_resume(cfg, tmp_path)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg, 1, 28).state_dict()
    torch.testing.assert_close(saved["queue"][64:], init["queue"][:16])  # 2 steps x 2 views x 16 keys went in
    assert full.keys() == resumed.keys() and {"queue", "target_head.layers.0.0.weight"} <= set(full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
