"""NT-Xent against the paper's formula (a naive double loop) and a hand computation, with gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import nt_xent


def naive_nt_xent(z1, z2, t):
    """SimCLR Eq. 1 and Algorithm 1, written as loops over the 2N views."""
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n = n2 // 2
    sim = lambda a, b: torch.dot(a, b) / (a.norm() * b.norm())
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        num = torch.exp(sim(z[i], z[j]) / t)
        den = sum(torch.exp(sim(z[i], z[k]) / t) for k in range(n2) if k != i)
        total = total - torch.log(num / den)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (4, 8, 0.1), (7, 5, 1.0), (16, 32, 0.2), (3, 128, 0.05)])
def test_matches_naive_loop_values_and_gradients(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    fast = nt_xent(a1, b1, t)
    ref = naive_nt_xent(a2, b2, t)
    # nt_xent computes in fp32 on purpose; compare with fp32 tolerance.
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    fast.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, a2.grad.float().to(a1.grad.dtype), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b1.grad, b2.grad.float().to(b1.grad.dtype), rtol=1e-4, atol=1e-6)


def test_hand_computed_two_images():
    # z1 = [e1, e2], z2 = [e1, -e2]; cosine sims: (0,2)=1, (0,1)=0, (0,3)=0, (1,3)=-1, (1,2)=0
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    t = 0.5
    e = math.exp
    l0 = -math.log(e(1 / t) / (e(0) + e(1 / t) + e(0)))  # anchor z1[0]: pos z2[0]
    l1 = -math.log(e(-1 / t) / (e(0) + e(0) + e(-1 / t)))  # anchor z1[1]: pos z2[1]
    l2 = -math.log(e(1 / t) / (e(1 / t) + e(0) + e(0)))  # anchor z2[0]: pos z1[0]
    l3 = -math.log(e(-1 / t) / (e(0) + e(-1 / t) + e(0)))  # anchor z2[1]: pos z1[1]
    expected = (l0 + l1 + l2 + l3) / 4
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)


def test_scale_invariance_and_symmetry():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    base = nt_xent(a, b, 0.1)
    assert nt_xent(3 * a, 0.5 * b, 0.1).item() == pytest.approx(base.item(), rel=1e-5)
    assert nt_xent(b, a, 0.1).item() == pytest.approx(base.item(), rel=1e-5)


def test_identical_views_low_loss_and_temperature_effect():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(32, 64, generator=g), dim=1)
    # Perfect alignment with well-spread negatives: loss well below log(2N-1), the chance level.
    assert nt_xent(a, a, 0.1).item() < math.log(63) / 2
    rand = torch.randn(32, 64, generator=g)
    assert nt_xent(a, rand, 0.5).item() == pytest.approx(math.log(63), rel=0.1)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3))


def test_bf16_autocast_agrees_with_fp32():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    ref = nt_xent(a, b, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nt_xent(a.bfloat16(), b.bfloat16(), 0.2)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)
