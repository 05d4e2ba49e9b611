import math

import pytest
import torch
from torch import nn

from selfsup.training.optim import LARS, build_optimizer
from selfsup.training.schedules import scaled_lr, warmup_cosine


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


def test_lars_over_a_changing_learning_rate_against_hand_computed_updates():
    """SimCLR's LARS (official TF code): the momentum buffer holds lr-scaled updates, v <- m v + lr trust g.

    w = s (0.6, 0.8) with |w| = s and a fixed unit gradient along it, so trust = eta s, and by hand:
    step 1 (lr 1.0):  v = 0.01 x 5 = 0.05,                           s = 4.95
    step 2 (lr 0.5):  v = 0.9 x 0.05 + 0.5 x 0.0495 = 0.06975,       s = 4.88025
    step 3 (lr 0.25): v = 0.9 x 0.06975 + 0.25 x 0.0488025 = 0.074975625, s = 4.805274375
    The bias (1-d, excluded) gets plain momentum SGD with gradient 0.5:
    v = 0.5, 0.7, 0.755 and b = 1.0 - v cumulated: 0.5, -0.2, -0.955.
    (An SGD-style buffer v <- m v + g, w -= lr v would give s = 4.95, 4.9025, ... instead.)
    """
    u = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # 2-d: a weight, so LARS's trust ratio applies
    w = nn.Parameter(5.0 * u.clone())
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LARS([w, b], lr=1.0, momentum=0.9, weight_decay=0.0, eta=0.01)
    expected_s = [4.95, 4.88025, 4.805274375]
    expected_b = [0.5, -0.2, -0.955]
    for lr, s, bb in zip([1.0, 0.5, 0.25], expected_s, expected_b):
        for g in opt.param_groups:
            g["lr"] = lr
        w.grad = u.clone()
        b.grad = torch.tensor([0.5], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(w.detach(), s * u, rtol=0, atol=1e-12)
        torch.testing.assert_close(b.detach(), torch.tensor([bb], dtype=torch.float64), rtol=0, atol=1e-12)
