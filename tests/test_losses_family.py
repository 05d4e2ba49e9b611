"""The family's losses (Barlow Twins, VICReg, DINO, MoCo v3 InfoNCE) and heads against the papers' formulas.

Each loss is compared, value and gradient, with a naive reference written as Python loops over the
elements in float64, and with hand-evaluated cases; the heads with the official code's construction.
The 2-process checks are in tests/test_distributed_family.py.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.losses import (barlow_twins_loss, dino_center_update, dino_loss, enqueue_keys, infonce_loss,
                            vicreg_loss)
from selfsup.models.heads import DINOHead, ProjectionHead

# The losses compute in fp32 (on purpose); the references in float64.
RTOL = 1e-4


def _close_grads(fast: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(fast.double(), ref, rtol=RTOL, atol=1e-5 * scale)


def _randn(seed: int, *shape: int, scale=1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _hadamard_columns() -> torch.Tensor:
    """(4, 3): zero-mean, orthogonal columns of +-1 (biased variance 1, unbiased 4/3)."""
    return torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def _values_and_grads(loss_fn, ref_fn, *inputs):
    """The two losses and their gradients with respect to every input, from separate leaf copies."""
    a = [x.clone().requires_grad_() for x in inputs]
    b = [x.clone().requires_grad_() for x in inputs]
    fast, ref = loss_fn(*a), ref_fn(*b)
    fast.backward()
    ref.backward()
    return fast, ref, [x.grad for x in a], [x.grad for x in b]


# ------------------------------------------------------------------------------------------------
# Barlow Twins (Zbontar et al. 2021, Eq. 1-2)


def naive_barlow_twins(z1, z2, lam, eps=1e-5):
    n, d = z1.shape

    def standardise(z):  # per dimension over the batch, biased variance (batch norm in training mode)
        cols = []
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
            cols.append([(z[b, j] - mean) / torch.sqrt(var + eps) for b in range(n)])
        return cols

    a, b_ = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][b] * b_[j][b] for b in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lam * c ** 2)
    return loss


@pytest.mark.parametrize("n,d,lam", [(2, 3, 0.0051), (5, 1, 0.0051), (6, 4, 0.1), (8, 6, 0.0), (3, 9, 1.0)])
def test_barlow_twins_matches_naive_loop_values_and_gradients(n, d, lam):
    z1 = _randn(n * 10 + d, n, d, scale=2.0) + 0.5
    z2 = 0.7 * z1 + _randn(n * 10 + d + 1, n, d)  # correlated views, as after training
    fast, ref, g_fast, g_ref = _values_and_grads(lambda a, b: barlow_twins_loss(a, b, lam),
                                                 lambda a, b: naive_barlow_twins(a, b, lam), z1, z2)
    assert fast.item() == pytest.approx(ref.item(), rel=RTOL, abs=1e-6)
    for gf, gr in zip(g_fast, g_ref):
        _close_grads(gf, gr)


def test_barlow_twins_hand_computed_cases():
    h = _hadamard_columns()  # standardised already: C = z1^T z2 / N up to batch norm's eps
    s = 1.0 / (1.0 + 1e-5)  # a correlation of 1 after the eps: var / (var + eps) with var = 1
    lam = 0.0051
    # Perfectly correlated, decorrelated dimensions: the minimum, d (1 - s)^2 ~ 3e-10.
    assert barlow_twins_loss(h, h, lam).item() == pytest.approx(3 * (1 - s) ** 2, abs=1e-9)
    # Standardisation makes it invariant to a per-dimension affine change of either view.
    assert barlow_twins_loss(3 * h + 5, h * torch.tensor([0.5, 2.0, 7.0]) - 1, lam).item() == pytest.approx(
        3 * (1 - s) ** 2, abs=1e-9)
    # Anti-correlated: C = -sI, every diagonal term (1 + s)^2.
    assert barlow_twins_loss(h, -h, lam).item() == pytest.approx(3 * (1 + s) ** 2, rel=1e-6)
    # Dimensions 0 and 1 swapped in one view: C_00 = C_11 = 0, C_01 = C_10 = s, C_22 = s.
    swapped = h[:, [1, 0, 2]]
    assert barlow_twins_loss(h, swapped, lam).item() == pytest.approx(2 + (1 - s) ** 2 + lam * 2 * s ** 2, rel=1e-6)
    # Collapsed embeddings standardise to 0: C = 0, the loss is d.
    const = torch.ones(4, 3) * torch.tensor([1.0, -2.0, 3.0])
    assert barlow_twins_loss(const, const, lam).item() == pytest.approx(3.0)


def test_barlow_twins_rejects_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 images"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="lambda_offdiag"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), -1.0)
    with pytest.raises(ValueError, match="lambda_offdiag"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), float("nan"))


# ------------------------------------------------------------------------------------------------
# VICReg (Bardes et al. 2022, Eq. 1-6, in the official code's form)


def naive_vicreg(z1, z2, sim, std, cov, eps=1e-4):
    n, d = z1.shape
    invariance = sum((z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def variance(z):
        total = 0.0
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / (n - 1)
            total = total + torch.relu(1 - torch.sqrt(var + eps))
        return total / d

    def covariance(z):
        means = [sum(z[b, j] for b in range(n)) / n for j in range(d)]
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    c = sum((z[b, i] - means[i]) * (z[b, j] - means[j]) for b in range(n)) / (n - 1)
                    total = total + c ** 2
        return total / d

    return sim * invariance + std * (variance(z1) + variance(z2)) / 2 + cov * (covariance(z1) + covariance(z2))


@pytest.mark.parametrize("n,d,coeffs", [(2, 3, (25.0, 25.0, 1.0)), (5, 1, (25.0, 25.0, 1.0)), (6, 4, (1.0, 0.0, 3.0)),
                                        (8, 6, (25.0, 25.0, 1.0)), (4, 7, (0.0, 2.0, 0.5))])
def test_vicreg_matches_naive_loop_values_and_gradients(n, d, coeffs):
    # Dimensions with standard deviations from 0.2 to 2: the variance hinge is active on some only.
    spread = torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    z1 = _randn(n * 10 + d, n, d) * spread
    z2 = z1 + 0.3 * _randn(n * 10 + d + 1, n, d)
    fast, ref, g_fast, g_ref = _values_and_grads(lambda a, b: vicreg_loss(a, b, *coeffs),
                                                 lambda a, b: naive_vicreg(a, b, *coeffs), z1, z2)
    assert fast.item() == pytest.approx(ref.item(), rel=RTOL, abs=1e-6)
    for gf, gr in zip(g_fast, g_ref):
        _close_grads(gf, gr)


def test_vicreg_hand_computed_cases():
    h = _hadamard_columns()  # unbiased variance 4/3 per column: std above 1, no hinge
    # Identical, decorrelated, spread-out views: every term is 0.
    assert vicreg_loss(2 * h, 2 * h).item() == pytest.approx(0.0, abs=1e-7)
    # A shifted copy: only the invariance, 25 * mean((0.5)^2).
    assert vicreg_loss(2 * h, 2 * h + 0.5).item() == pytest.approx(25 * 0.25, rel=1e-6)
    # Two equal dimensions: Cov_01 = Cov_10 = 4/3 in each view, c = 2 (4/3)^2 / 3, times 2 views.
    redundant = h[:, [0, 0, 2]]
    assert vicreg_loss(redundant, redundant).item() == pytest.approx(2 * 2 * (4 / 3) ** 2 / 3, rel=1e-6)


def test_vicreg_collapse_gives_the_variance_hinge_with_finite_gradients():
    z1 = (torch.ones(6, 5) * torch.arange(5.0)).requires_grad_()  # every row the same: zero variance
    z2 = z1.detach().clone().requires_grad_()
    loss = vicreg_loss(z1, z2)
    # Invariance and covariance are 0; v = relu(1 - sqrt(0 + 1e-4)) = 0.99 in every dimension.
    assert loss.item() == pytest.approx(25 * (1 - math.sqrt(1e-4)), rel=1e-6)
    loss.backward()  # the 1e-4 keeps d sqrt(var + eps) / d var finite at var = 0
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_vicreg_rejects_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        vicreg_loss(torch.randn(4, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="at least 2 images"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="std_coeff"):
        vicreg_loss(torch.randn(4, 3), torch.randn(4, 3), std_coeff=-1.0)


# ------------------------------------------------------------------------------------------------
# DINO (Caron et al. 2021, Eq. 1, 3, 4)


def naive_dino(student, teacher, center, ts, tt):
    total, pairs = 0.0, 0
    for q, t in enumerate(teacher):
        t = t.detach()  # the teacher is a constant (stop-gradient)
        for v, s in enumerate(student):
            if v == q:
                continue
            batch, k = s.shape
            pair = 0.0
            for b in range(batch):
                tz = sum(torch.exp((t[b, j] - center[j]) / tt) for j in range(k))
                sz = sum(torch.exp(s[b, j] / ts) for j in range(k))
                for j in range(k):
                    p_t = torch.exp((t[b, j] - center[j]) / tt) / tz
                    pair = pair - p_t * torch.log(torch.exp(s[b, j] / ts) / sz)
            total = total + pair / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("crops,batch,k,ts,tt", [(2, 1, 3, 0.1, 0.04), (3, 2, 5, 0.1, 0.04), (4, 3, 4, 0.2, 0.07),
                                                 (6, 2, 6, 1.0, 0.5)])
def test_dino_matches_naive_loop_values_and_gradients(crops, batch, k, ts, tt):
    seed = crops * 100 + batch * 10 + k
    student = [_randn(seed + i, batch, k) for i in range(crops)]
    teacher = [_randn(seed + 50 + i, batch, k, scale=0.2) for i in range(2)]
    center = _randn(seed + 99, k, scale=0.1)
    s_fast = [s.clone().requires_grad_() for s in student]
    s_ref = [s.clone().requires_grad_() for s in student]
    t_fast = [t.clone().requires_grad_() for t in teacher]
    fast = dino_loss(s_fast, t_fast, center, ts, tt)
    ref = naive_dino(s_ref, teacher, center, ts, tt)
    assert fast.item() == pytest.approx(ref.item(), rel=RTOL, abs=1e-6)
    fast.backward()
    ref.backward()
    for a, b in zip(s_fast, s_ref):
        _close_grads(a.grad, b.grad)
    assert all(t.grad is None for t in t_fast)  # no gradient reaches the teacher


def test_dino_hand_computed_two_classes():
    # One image, K = 2, 2 global crops and 1 local; centre 0; temperatures 1 for readable numbers.
    t0, t1 = [0.0, 1.0], [1.0, 0.0]
    s0, s1, s2 = [2.0, 0.0], [0.0, 0.0], [0.0, 3.0]

    def softmax(x):
        e = [math.exp(v) for v in x]
        return [v / sum(e) for v in e]

    def h(t, s):  # -sum_k P_t log P_s
        return -sum(p * math.log(q) for p, q in zip(softmax(t), softmax(s)))

    expected = (h(t0, s1) + h(t0, s2) + h(t1, s0) + h(t1, s2)) / 4  # never (t0, s0) nor (t1, s1)
    as_t = lambda x: torch.tensor([x])  # noqa: E731
    loss = dino_loss([as_t(s0), as_t(s1), as_t(s2)], [as_t(t0), as_t(t1)], torch.zeros(2), 1.0, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_never_pairs_a_crop_with_itself():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 8, generator=g).requires_grad_() for _ in range(2)]
    teacher = [torch.randn(3, 8, generator=g)]
    dino_loss(student, teacher, torch.zeros(8)).backward()
    # One teacher crop (crop 0): its only pair is student crop 1; student crop 0 gets no gradient at all.
    assert torch.count_nonzero(student[0].grad) == 0
    assert torch.count_nonzero(student[1].grad) > 0
    # And the loss does not depend on student crop 0.
    other = [torch.randn(3, 8, generator=g), student[1].detach()]
    assert dino_loss(other, teacher, torch.zeros(8)).item() == pytest.approx(
        dino_loss([s.detach() for s in student], teacher, torch.zeros(8)).item(), rel=1e-7)


def test_dino_centre_enters_the_teacher_only():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(4, 6, generator=g) for _ in range(3)]
    teacher = [torch.randn(4, 6, generator=g) for _ in range(2)]
    c = torch.randn(6, generator=g)
    base = dino_loss(student, teacher, c)
    # Shifting teacher and centre together changes nothing; the centre may be (K,) or (1, K).
    assert dino_loss(student, [t + c for t in teacher], 2 * c.view(1, 6)).item() == pytest.approx(base.item(), rel=1e-6)
    centre = c.clone().requires_grad_()
    teacher_leaf = [t.clone().requires_grad_() for t in teacher]
    student_leaf = [s.clone().requires_grad_() for s in student]
    dino_loss(student_leaf, teacher_leaf, centre).backward()
    assert centre.grad is None and all(t.grad is None for t in teacher_leaf)


def test_dino_center_update_value():
    center = torch.tensor([[1.0, 2.0]])
    teacher = [torch.tensor([[1.0, 3.0], [3.0, 5.0]]), torch.tensor([[5.0, 7.0], [7.0, 9.0]])]
    new = dino_center_update(center, teacher, momentum=0.9)
    # mean over all 4 rows = [4, 6]; 0.9 * [1, 2] + 0.1 * [4, 6]
    torch.testing.assert_close(new, torch.tensor([[1.3, 2.4]]))
    assert torch.equal(center, torch.tensor([[1.0, 2.0]]))  # a new tensor; the old centre is untouched
    torch.testing.assert_close(dino_center_update(center, torch.cat(teacher), 0.9), new)  # one (rows, K) tensor
    torch.testing.assert_close(dino_center_update(torch.tensor([1.0, 2.0]), teacher, 0.0), torch.tensor([4.0, 6.0]))
    assert dino_center_update(center.double(), teacher).dtype == torch.float64


def test_dino_rejects_bad_input():
    s = [torch.randn(2, 4) for _ in range(3)]
    t = [torch.randn(2, 4) for _ in range(2)]
    with pytest.raises(ValueError, match="list of per-crop"):
        dino_loss(torch.cat(s), t, torch.zeros(4))
    with pytest.raises(ValueError, match="every crop the teacher saw"):
        dino_loss(s[:1], t, torch.zeros(4))
    with pytest.raises(ValueError, match="at least one pair"):
        dino_loss(s[:1], t[:1], torch.zeros(4))
    with pytest.raises(ValueError, match="same"):
        dino_loss([torch.randn(2, 4), torch.randn(3, 4)], t, torch.zeros(4))
    with pytest.raises(ValueError, match="center"):
        dino_loss(s, t, torch.zeros(5))
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(s, t, torch.zeros(4), teacher_temp=0.0)
    with pytest.raises(ValueError, match="momentum"):
        dino_center_update(torch.zeros(4), t, momentum=1.5)


# ------------------------------------------------------------------------------------------------
# MoCo v3 InfoNCE (Chen, Xie and He 2021, Algorithm 1), MoCo v2's queue


def naive_infonce(q, k, t, queue=None):
    """Algorithm 1's ctr: 2t * CE(cos(q, keys) / t, own key), the queue's rows extra keys nobody's positive."""
    keys = [row.detach() for row in k] + ([row for row in queue] if queue is not None else [])
    cos = lambda a, b: torch.dot(a, b) / (a.norm() * b.norm())  # noqa: E731
    total = 0.0
    for i in range(q.shape[0]):
        num = torch.exp(cos(q[i], keys[i]) / t)
        den = sum(torch.exp(cos(q[i], key) / t) for key in keys)
        total = total - torch.log(num / den)
    return 2 * t * total / q.shape[0]


@pytest.mark.parametrize("n,d,t,m", [(1, 3, 1.0, 4), (2, 3, 1.0, 0), (4, 8, 0.2, 0), (7, 5, 0.5, 3), (5, 16, 0.1, 9)])
def test_infonce_matches_naive_loop_values_and_gradients(n, d, t, m):
    q, k = _randn(n * 10 + d, n, d), _randn(n * 10 + d + 1, n, d)
    queue = _randn(n * 10 + d + 2, m, d) if m else None
    q_fast, k_fast = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_ref = q.clone().requires_grad_()
    fast = infonce_loss(q_fast, k_fast, t, queue=queue)
    ref = naive_infonce(q_ref, k, t, queue)
    assert fast.item() == pytest.approx(ref.item(), rel=RTOL, abs=1e-6)
    fast.backward()
    ref.backward()
    _close_grads(q_fast.grad, q_ref.grad)
    assert k_fast.grad is None  # the keys are constants (the momentum encoder's)


def test_infonce_hand_computed_and_official_scale():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[3.0, 0.0], [0.0, -2.0]])  # cos: (0,0) = 1, (0,1) = 0, (1,0) = 0, (1,1) = -1
    t = 0.5
    e = math.exp
    l0 = -math.log(e(1 / t) / (e(1 / t) + e(0)))
    l1 = -math.log(e(-1 / t) / (e(0) + e(-1 / t)))
    assert infonce_loss(q, k, t).item() == pytest.approx(2 * t * (l0 + l1) / 2, rel=1e-6)
    # The official scale: 2t times the plain cross-entropy over the normalised logits.
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    plain = F.cross_entropy(F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.2, torch.arange(6))
    assert infonce_loss(a, b, 0.2).item() == pytest.approx(0.4 * plain.item(), rel=1e-5)


def test_infonce_queue_rows_are_extra_negatives_for_every_query():
    g = torch.Generator().manual_seed(4)
    q, k, queue = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    t = 0.2
    # The no-queue loss with the queue's rows appended as keys that are nobody's positive.
    keys = F.normalize(torch.cat([k, queue]), dim=1)
    expected = F.cross_entropy(F.normalize(q, dim=1) @ keys.T / t, torch.arange(5)) * 2 * t
    assert infonce_loss(q, k, t, queue=queue).item() == pytest.approx(expected.item(), rel=1e-5)
    # More negatives make it harder; the queue is normalised like the keys (its scale does not matter).
    assert infonce_loss(q, k, t, queue=queue).item() > infonce_loss(q, k, t).item()
    assert infonce_loss(q, k, t, queue=5 * queue).item() == pytest.approx(expected.item(), rel=1e-5)


def test_enqueue_keys_is_fifo_with_a_fixed_size():
    queue = torch.arange(1.0, 6.0).view(5, 1)  # d = 1: normalised keys are +-1, easy to follow
    queue = enqueue_keys(queue, torch.tensor([[-3.0], [4.0]]))
    assert queue.view(-1).tolist() == [-1.0, 1.0, 1.0, 2.0, 3.0]  # newest first; 4 and 5 dropped
    queue = enqueue_keys(queue, torch.tensor([[2.0], [2.0]]))
    assert queue.view(-1).tolist() == [1.0, 1.0, -1.0, 1.0, 1.0]
    d3 = enqueue_keys(torch.zeros(4, 3), torch.tensor([[3.0, 0.0, 4.0]]))
    torch.testing.assert_close(d3[0], torch.tensor([0.6, 0.0, 0.8]))  # stored l2-normalised
    big = enqueue_keys(torch.zeros(2, 1, dtype=torch.float64), torch.tensor([[1.0], [-1.0], [1.0]]))
    assert big.view(-1).tolist() == [1.0, -1.0] and big.dtype == torch.float64  # more keys than rows: the first M


def test_infonce_rejects_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        infonce_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        infonce_loss(torch.randn(4, 3), torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="queue"):
        infonce_loss(torch.randn(4, 3), torch.randn(4, 3), queue=torch.randn(8, 2))
    with pytest.raises(ValueError, match="at least 2 keys"):
        infonce_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="same d"):
        enqueue_keys(torch.randn(8, 3), torch.randn(2, 4))


# ------------------------------------------------------------------------------------------------
# fp32 whatever the autocast state


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "infonce", "dino"])
def test_losses_compute_in_fp32_under_autocast(name):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)
    fn = {"barlow_twins": lambda: barlow_twins_loss(a, 0.5 * a + b),
          "vicreg": lambda: vicreg_loss(a, 0.5 * a + b),
          "infonce": lambda: infonce_loss(a, a + 0.5 * b, 0.2),
          "dino": lambda: dino_loss([a, b, a + b], [b, a], torch.zeros(64))}[name]
    ref = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fn()
    # The same fp32 arithmetic: without switching autocast off the matmuls would run in bf16.
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Heads


def _official_barlow_twins_projector(sizes):
    """facebookresearch/barlowtwins main.py's projector (VICReg's expander is the same with hidden biases)."""
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


def test_projection_head_is_barlow_twins_and_vicreg_projector():
    with torch.device("meta"):  # the ImageNet size, without allocating its 150M parameters
        ours = ProjectionHead(2048, 8192, 8192, num_layers=3, last_bias=False)
        official = _official_barlow_twins_projector([2048, 8192, 8192, 8192])
    assert [p.shape for p in ours.parameters()] == [p.shape for p in official.parameters()]
    assert [b.shape for b in ours.buffers()] == [b.shape for b in official.buffers()]
    # Same function at a small size, with the official layers' weights copied in order.
    torch.manual_seed(0)
    ours = ProjectionHead(6, 10, 5, num_layers=3, last_bias=False)
    official = _official_barlow_twins_projector([6, 10, 10, 5])
    for p, o in zip(ours.parameters(), official.parameters()):
        p.data.copy_(o.data)
    x = torch.randn(8, 6)
    torch.testing.assert_close(ours(x), official(x))


class _OfficialDINOHead(nn.Module):
    """facebookresearch/dino vision_transformer.py's DINOHead (deprecated weight_norm, as released)."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        bn = lambda: [nn.BatchNorm1d(hidden_dim)] if use_bn else []  # noqa: E731
        layers = [nn.Linear(in_dim, hidden_dim), *bn(), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), *bn(), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


@pytest.mark.parametrize("use_bn", [False, True])
def test_dino_head_loads_the_official_state_dict_and_computes_the_same(use_bn):
    torch.manual_seed(0)
    official = _OfficialDINOHead(12, 40, use_bn=use_bn, hidden_dim=16, bottleneck_dim=8)
    with torch.no_grad():
        official.last_layer.weight_g.mul_(torch.rand(40, 1) + 0.5)  # g != 1, so the key mapping is really checked
    ours = DINOHead(12, 40, hidden_dim=16, bottleneck_dim=8, use_bn=use_bn)
    ours.load_state_dict(official.state_dict())  # official keys: last_layer.weight_g / weight_v
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), official(x))


def test_dino_head_structure_norm_and_frozen_last_layer():
    torch.manual_seed(0)
    head = DINOHead(384, out_dim=1000)  # the paper's hidden 2048 and bottleneck 256
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)
    assert linears[1].weight.std().item() == pytest.approx(0.02, rel=0.05) and not linears[1].bias.any()
    out = head(torch.randn(4, 384))
    assert out.shape == (4, 1000)
    # g fixed at 1: the rows of the effective weight are unit vectors, so outputs are cosines.
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(1000))
    assert out.abs().max() <= 1 + 1e-5
    frozen = {n for n, p in head.named_parameters() if not p.requires_grad}
    assert frozen == {"last_layer.parametrizations.weight.original0"}
    assert {n for n, _ in head.named_parameters() if "last_layer" in n} == {
        "last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"}
    free_g = DINOHead(8, 10, 16, 4, norm_last_layer=False)
    assert all(p.requires_grad for p in free_g.parameters())
    # The official first-epoch freeze by name leaves the MLP's gradients alone.
    head(torch.randn(4, 384)).sum().backward()
    for n, p in head.named_parameters():
        if "last_layer" in n:
            p.grad = None
    assert all(p.grad is not None for n, p in head.named_parameters() if n.startswith("mlp"))
    assert head.last_layer.parametrizations.weight.original1.grad is None
    # The teacher is a deep copy of the student.
    teacher = copy.deepcopy(head)
    x = torch.randn(3, 384)
    torch.testing.assert_close(teacher(x), head(x))
    single = DINOHead(8, 10, num_layers=1, bottleneck_dim=4)
    assert [type(m) for m in single.mlp] == [nn.Linear]
    with pytest.raises(ValueError, match="num_layers"):
        DINOHead(8, 10, num_layers=0)
