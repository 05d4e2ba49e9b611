"""BYOL (Grill et al. 2020): loss, EMA, tau schedule, target network handling, resume, collapse monitor."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import load_weights
from selfsup.methods.collapse import CollapseMonitor, CollapseWarning, collapse_std
from selfsup.errors import ConfigError
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.methods.ema import ema_update
from selfsup.models.heads import ProjectionHead
from selfsup.losses import byol_loss
from selfsup.methods import BYOL
from selfsup.training.optim import build_optimizer
from selfsup.methods.ema import ema_tau
from selfsup.training.setup import build_model
from selfsup.training.loop import pretrain
from method_checks import interrupt_and_resume


def tiny_byol(predictor: bool = True, seed: int = 0) -> BYOL:
    torch.manual_seed(seed)
    backbone = build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625)
    proj = ProjectionHead(backbone.num_features, 32, 8)
    return BYOL(backbone, proj, ProjectionHead(8, 32, 8) if predictor else None)


# ------------------------------------------------------------------------------------------------
# byol_loss


@pytest.mark.parametrize("n,d", [(1, 3), (7, 16), (32, 128)])
def test_byol_loss_matches_formula_and_mse_of_normalised_vectors_with_gradients(n, d):
    g = torch.Generator().manual_seed(n * 100 + d)
    p = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    z = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    loss = byol_loss(p, z)

    # The paper's formula, one pair at a time: 2 - 2 <p, z> / (|p| |z|).
    naive = sum(2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(n)) / n
    # Eq. 2 as written: squared distance of the L2-normalised vectors (F.mse_loss averages over d too).
    mse = F.mse_loss(F.normalize(p, dim=1), F.normalize(z.detach(), dim=1), reduction="none").sum(1).mean()
    assert torch.allclose(loss.double(), naive, atol=1e-6)
    assert torch.allclose(loss.double(), mse, atol=1e-6)

    loss.backward()
    assert z.grad is None, "the target projection must be a constant (stop-gradient)"
    # Analytic gradient of 2 - 2 cos(p, z) with respect to p, over N.
    pn, zn = p.detach().norm(dim=1, keepdim=True), z.detach().norm(dim=1, keepdim=True)
    cos = (p.detach() * z.detach()).sum(1, keepdim=True) / (pn * zn)
    expected = -2 / n * (z.detach() / (pn * zn) - cos * p.detach() / pn**2)
    assert torch.allclose(p.grad, expected, atol=1e-5)


def test_byol_loss_range_and_errors():
    x = torch.randn(5, 8)
    assert byol_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert byol_loss(x, -x).item() == pytest.approx(4.0, abs=1e-6)
    e = torch.eye(2)
    assert byol_loss(e, e.flip(0)).item() == pytest.approx(2.0)  # orthogonal
    with pytest.raises(ValueError, match="equal shape"):
        byol_loss(torch.randn(4, 8), torch.randn(4, 7))


# ------------------------------------------------------------------------------------------------
# ema_update and ema_tau


def test_ema_update_exact_arithmetic_and_buffers_copied():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    online(torch.randn(8, 4))  # give the online BN running statistics of its own
    # Dyadic values: tau * t + (1 - tau) * o is exact in float32, so equality must be bit-exact.
    with torch.no_grad():
        for i, (t, o) in enumerate(zip(target.parameters(), online.parameters())):
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t) + i)
            o.copy_(-2 * torch.arange(t.numel(), dtype=torch.float32).view_as(o) + 0.5)
    t_before = [t.clone() for t in target.parameters()]
    ema_update(target, online, 0.75)
    for tb, t, o in zip(t_before, target.parameters(), online.parameters()):
        assert torch.equal(t, 0.75 * tb + 0.25 * o)
    for (name, tb), ob in zip(target.named_buffers(), online.buffers()):
        assert torch.equal(tb, ob), f"buffer {name} must be copied from the online network"

    # Random values in float64 against the formula; tau = 1 keeps, tau = 0 copies.
    a, b = nn.Linear(5, 5).double(), nn.Linear(5, 5).double()
    a0 = [p.clone() for p in a.parameters()]
    ema_update(a, b, 0.996)
    for p, p0, q in zip(a.parameters(), a0, b.parameters()):
        assert torch.allclose(p, 0.996 * p0 + (1 - 0.996) * q, rtol=0, atol=1e-15)
    a1 = [p.clone() for p in a.parameters()]
    ema_update(a, b, 1.0)
    assert all(torch.equal(p, p1) for p, p1 in zip(a.parameters(), a1))
    ema_update(a, b, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(not p.requires_grad or p.grad is None for p in a.parameters())


def test_ema_update_refuses_bad_tau_and_mismatched_networks():
    with pytest.raises(ValueError, match="tau"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="different shapes"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 3), 0.5)
    with pytest.raises(ValueError, match="different parameters"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.5)


def test_ema_tau_start_middle_end():
    assert ema_tau(0, 1000) == pytest.approx(0.996, abs=1e-12)
    assert ema_tau(500, 1000) == pytest.approx(1 - 0.004 / 2, abs=1e-12)  # cos(pi/2) = 0
    assert ema_tau(1000, 1000) == pytest.approx(1.0, abs=1e-12)
    assert ema_tau(250, 1000, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)
    taus = [ema_tau(k, 100, 0.9) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))
    assert all(ema_tau(k, 10, 1.0) == 1.0 for k in range(11))  # fixed target
    assert all(ema_tau(k, 10, 0.0) == 0.0 for k in range(11))  # Table 5a: tau = 0 kept constant
    with pytest.raises(ValueError):
        ema_tau(0, 0)
    with pytest.raises(ValueError):
        ema_tau(0, 10, 1.5)


# ------------------------------------------------------------------------------------------------
# The model: one step, target untouched by gradients and outside the optimiser


def test_one_byol_step_trains_online_and_leaves_target_to_the_ema():
    model = tiny_byol()
    online = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("target_")}
    for k, v in model.state_dict().items():  # the target starts as an exact copy
        if k.startswith("target_"):
            assert torch.equal(v, online[k[len("target_"):]])
    target_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("target_")}
    opt = build_optimizer("lars", model, lr=0.5, weight_decay=1e-6)
    x1, x2 = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    loss, logs = model(x1, x2)
    assert 0.0 <= loss.item() <= 8.0 and set(logs) >= {"collapse_std"}
    loss.backward()
    assert all(p.grad is None for p in model.target_parameters()), "the target received a gradient"
    assert all(p.grad is not None for p in model.predictor.parameters())
    opt.step()
    after = model.state_dict()
    assert any(not torch.equal(after[k], online[k]) for k in online if k.startswith("backbone."))
    assert any(not torch.equal(after[k], online[k]) for k in online if k.startswith("predictor."))
    target_params = {n for n, _ in model.named_parameters() if n.startswith("target_")}
    for k, v in target_before.items():
        if k in target_params:  # BN running stats of the target move in its train-mode forward
            assert torch.equal(after[k], v), f"{k} changed by the optimiser step"

    tau = 0.9
    model.update_target(tau)
    new = model.state_dict()
    for k, v in target_before.items():
        o = new[k[len("target_"):]]
        expected = tau * v + (1 - tau) * o if k in target_params else o
        assert torch.allclose(new[k].float(), expected.float(), rtol=0, atol=1e-6), k


def test_target_parameters_are_not_in_the_optimizer():
    model = tiny_byol()
    target_ids = {id(p) for p in model.target_parameters()}
    online_ids = {id(p) for n, p in model.named_parameters() if not n.startswith("target_")}
    assert target_ids and all(not p.requires_grad for p in model.target_parameters())
    for name in ("lars", "sgd", "adamw"):
        opt = build_optimizer(name, model, lr=0.1, weight_decay=1e-6)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not in_opt & target_ids, f"{name}: target parameters in the optimiser"
        assert in_opt == online_ids


def test_without_predictor_and_config_switches(tiny_cfg):
    cfg = tiny_cfg(method="byol", predictor=False, base_tau=1.0)
    model = build_model(cfg, 1, 16)
    assert isinstance(model.predictor, nn.Identity)
    loss, _ = model(torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16))
    assert torch.isfinite(loss)
    # Method defaults fill keys not given; given keys win; bad values are ConfigErrors.
    byol = build_config(PretrainConfig, {"method": "byol"})
    assert (byol.optim.lr, byol.optim.weight_decay) == (3.0, 1.5e-6)
    assert build_config(PretrainConfig, {"method": "byol", "optim": {"lr": 0.7}}).optim.lr == 0.7
    assert build_config(PretrainConfig, {"method": "simclr"}).optim.weight_decay == PretrainConfig().optim.weight_decay
    for bad in ({"byol": {"base_tau": 1.5}}, {"byol": {"base_tau": -0.1}}, {"collapse_threshold": -1},
                {"byol": {"pred_hidden_dim": 0}}, {"byol": {"predictor": "maybe"}}):
        key, value = next(iter(bad.items()))
        name = f"byol.{next(iter(value))}" if isinstance(value, dict) else key
        with pytest.raises(ConfigError, match=name):
            build_config(PretrainConfig, {"method": "byol", **bad})


# ------------------------------------------------------------------------------------------------
# Through the loop: EMA after the optimiser step, checkpoints hold the target, resume restores it


def test_loop_updates_target_by_the_ema_rule_only(tmp_path, tiny_cfg):
    cfg = tiny_cfg(method="byol", steps=1, base_tau=0.5, proj_hidden_dim=32)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg, 1, 28).state_dict()  # the loop builds the model from the same seed
    final = load_weights(pretrain(cfg, tmp_path / "run", progress=False))
    tau = ema_tau(0, 1, 0.5)
    params = {n for n, _ in build_model(cfg, 1, 28).named_parameters()}
    checked = 0
    for k, v in final.items():
        if not k.startswith("target_"):
            continue
        o = k[len("target_"):]
        if k in params:
            expected = tau * init[o] + (1 - tau) * final[o]  # target started as a copy of the online init
            assert torch.allclose(v, expected, rtol=0, atol=1e-6), k
            checked += 1
        else:
            assert torch.equal(v, final[o]), k
    assert checked > 10
    assert not torch.equal(final["target_backbone.conv1.weight"], init["backbone.conv1.weight"])


def test_resume_restores_target_exactly(tmp_path, tiny_cfg):
    cfg = tiny_cfg(method="byol", steps=4, checkpoint_every=2, proj_hidden_dim=32)
    full, saved, resumed = interrupt_and_resume(cfg, tmp_path)
    assert any(k.startswith("target_backbone.") for k in saved) and any(k.startswith("target_projector.") for k in saved)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# ------------------------------------------------------------------------------------------------
# Collapse monitor


def test_collapse_std_and_monitor_warns_once_after_warmup():
    d = 64
    spread = collapse_std(torch.randn(4096, d)).item()
    assert spread == pytest.approx(1 / math.sqrt(d), rel=0.05)
    assert collapse_std(torch.ones(32, d) + 1e-7 * torch.randn(32, d)).item() < 1e-5
    monitor = CollapseMonitor.for_dim(d, 0.2, after_step=10)
    assert monitor.threshold == pytest.approx(0.2 / 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not monitor.check(5, 0.0)  # during warm-up: silent
        assert not monitor.check(11, spread)  # healthy: silent
    with pytest.warns(CollapseWarning, match="collapse_std"):
        assert monitor.check(12, 0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not monitor.check(13, 0.0)  # only once
    assert monitor.warned_at == 12
    assert not CollapseMonitor.for_dim(d, 0.0).check(100, 0.0)  # threshold 0: off
    from selfsup.methods import METHODS

    byol = CollapseMonitor.for_dim(d, 0.2, hint=METHODS["byol"].collapse_hint)
    with pytest.warns(CollapseWarning, match="byol.predictor=true"):  # the method's own advice
        byol.check(1, 0.0)


def test_minutes_budget_with_byol(tmp_path, tiny_cfg):
    # --minutes times a few throw-away steps before the run length is known; the EMA call must cope.
    cfg = tiny_cfg(method="byol", steps=None, minutes=0.01, proj_hidden_dim=32)
    final = load_weights(pretrain(cfg, tmp_path / "run", progress=False))
    assert any(k.startswith("target_backbone.") for k in final)


def test_byol_pairs_each_prediction_with_the_other_views_target():
    """BYOL Eq. 2: L = byol_loss(p1, sg(t2)) + byol_loss(p2, sg(t1)), summed (not averaged) over directions."""
    model = tiny_byol()
    with torch.no_grad():  # make the target differ from the online network, as after some training
        for p in model.target_parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(6, 1, 16, 16, generator=g), torch.randn(6, 1, 16, 16, generator=g)
    loss, _ = model(x1, x2)
    x = torch.cat([x1, x2])  # the submodules, in train mode on the same 2N batch as forward
    p1, p2 = model.predictor(model.projector(model.backbone(x))).chunk(2)
    t1, t2 = model.target_projector(model.target_backbone(x)).chunk(2)
    torch.testing.assert_close(loss, byol_loss(p1, t2) + byol_loss(p2, t1))
    own_view = byol_loss(p1, t1) + byol_loss(p2, t2)  # each view regressed onto its own target: wrong
    assert not torch.isclose(loss, own_view, rtol=1e-3, atol=1e-4)
