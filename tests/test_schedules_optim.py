import math

import pytest
import torch
from torch import nn

from selfsup.optim import LARS, build_optimizer
from selfsup.schedules import scaled_lr, warmup_cosine


def test_warmup_cosine_shape():
    total, warm, base = 100, 10, 1.0
    vals = [warmup_cosine(s, total, warm, base) for s in range(total + 1)]
    assert vals[0] == pytest.approx(0.1)  # linear warm-up: (step+1)/warmup
    assert vals[9] == pytest.approx(1.0)
    assert vals[10] == pytest.approx(1.0)
    assert all(vals[i] <= vals[i + 1] + 1e-12 for i in range(10))
    assert all(vals[i] >= vals[i + 1] - 1e-12 for i in range(10, total))
    assert vals[total] == pytest.approx(0.0, abs=1e-12)
    mid = 10 + (total - 10) // 2
    assert vals[mid] == pytest.approx(0.5, abs=1e-9)
    assert warmup_cosine(total, total, warm, base, final_value=0.2) == pytest.approx(0.2)
    assert warmup_cosine(0, 10, 0, 2.0) == pytest.approx(2.0)  # no warm-up


def test_scaled_lr():
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)  # SimCLR: 0.3 x 4096/256
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    with pytest.raises(ValueError):
        scaled_lr(0.3, 256, "cubic")


def _manual_lars(w, g, v, lr, m, wd, eta, exclude):
    if not exclude:
        g = g + wd * w
        wn, gn = w.norm(), g.norm()
        trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
        g = g * trust
    v = m * v + lr * g
    return w - v, v


def test_lars_matches_formula_and_excludes_1d():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = LARS(lin.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.001)
    vw, vb = torch.zeros_like(w0), torch.zeros_like(b0)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(4, 5)).pow(2).sum().backward()
        gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
        w0, vw = _manual_lars(w0, gw, vw, 0.5, 0.9, 1e-2, 0.001, False)
        b0, vb = _manual_lars(b0, gb, vb, 0.5, 0.9, 1e-2, 0.001, True)
        opt.step()
        torch.testing.assert_close(lin.weight.detach(), w0)
        torch.testing.assert_close(lin.bias.detach(), b0)


def test_lars_zero_weight_uses_trust_one():
    p = nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.ones(2, 2)
    LARS([p], lr=0.1, momentum=0.0, weight_decay=0.0).step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), -0.1))


def test_build_optimizer_no_decay_on_bias_and_bn():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for name in ("lars", "sgd", "adamw"):
        opt = build_optimizer(name, model, 0.1, 1e-4)
        decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
        assert [p.ndim for p in decayed] == [2]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", model, 0.1, 0.0)
    with pytest.raises(ValueError):
        LARS(model.parameters(), lr=-1)
