"""Multi-crop losses of SimCLR and BYOL (SwAV, Caron et al. 2020, Sec. 3.2): local crops after the two global
views, compared with the global views only; with no local crops, bit for bit the two-view losses."""
import torch
import torch.nn.functional as F

from selfsup.losses import byol_loss, nt_xent
from selfsup.methods import BYOL, METHODS, SimCLR
from selfsup.models.backbones import build_backbone
from selfsup.models.heads import ProjectionHead


def _backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625)


def tiny_simclr() -> SimCLR:
    backbone = _backbone()
    return SimCLR(backbone, ProjectionHead(backbone.num_features, 32, 8), temperature=0.2).double()


def tiny_byol() -> BYOL:
    backbone = _backbone()
    model = BYOL(backbone, ProjectionHead(backbone.num_features, 32, 8), ProjectionHead(8, 32, 8)).double()
    with torch.no_grad():  # a target that differs from the online network, as after some training
        for p in model.target_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _views(b: int = 5, n_local: int = 2):
    g = torch.Generator().manual_seed(7)
    glob = [torch.randn(b, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    loc = [torch.randn(b, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(n_local)]
    return glob, loc


def _naive_nt_xent(a, b, t):
    """SimCLR Eq. 1, one anchor at a time, averaged over the 2N anchors."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    terms = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[k] / t for k in range(2 * n) if k != i])
        terms.append(-(z[i] @ z[pos] / t - torch.logsumexp(sims, 0)))
    return torch.stack(terms).mean()


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_simclr_without_local_crops_is_bit_identical_to_the_two_view_loss():
    model, (x1, x2) = tiny_simclr(), _views()[0]
    loss, _ = model(x1, x2)
    loss.backward()
    got = _grads(model)
    model.zero_grad()
    z1, z2 = model.head(model.backbone(torch.cat([x1, x2]))).chunk(2)  # the two-view forward, as before
    want = nt_xent(z1, z2, 0.2)
    want.backward()
    assert torch.equal(loss, want)
    assert all(torch.equal(got[k], v) for k, v in _grads(model).items())


def test_simclr_local_crops_pair_with_each_global_view_and_the_global_pair_averaged():
    model = tiny_simclr()
    glob, loc = _views()
    loss, _ = model(*glob, *loc)
    h = torch.cat([model.backbone(torch.cat(glob)), model.backbone(torch.cat(loc))])
    z1, z2, za, zb = model.head(h).chunk(4)
    terms = [_naive_nt_xent(z1, z2, 0.2)] + [_naive_nt_xent(zv, zg, 0.2) for zv in (za, zb) for zg in (z1, z2)]
    want = torch.stack(terms).mean()
    assert abs(loss.item() - want.item()) < 1e-5
    local_pair = _naive_nt_xent(za, zb, 0.2)  # local crops are never compared with each other
    assert abs(loss.item() - (want * 5 + local_pair).item() / 6) > 1e-4


def test_byol_without_local_crops_is_bit_identical_to_the_two_view_loss():
    model, (x1, x2) = tiny_byol(), _views()[0]
    loss, _ = model(x1, x2)
    loss.backward()
    got = _grads(model)
    model.zero_grad()
    x = torch.cat([x1, x2])
    p1, p2 = model.predictor(model.projector(model.backbone(x))).chunk(2)
    with torch.no_grad():
        t1, t2 = model.target_projector(model.target_backbone(x)).chunk(2)
    want = byol_loss(p1, t2) + byol_loss(p2, t1)
    want.backward()
    assert torch.equal(loss, want)
    assert all(torch.equal(got[k], v) for k, v in _grads(model).items())


def test_byol_local_crops_regress_onto_the_global_targets_only():
    model = tiny_byol()
    glob, loc = _views()
    seen = []
    model.target_backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    loss, _ = model(*glob, *loc)
    assert seen == [torch.Size([10, 1, 16, 16])]  # the target sees the two global views, once
    h = torch.cat([model.backbone(torch.cat(glob)), model.backbone(torch.cat(loc))])
    p1, p2, pa, pb = model.predictor(model.projector(h)).chunk(4)
    with torch.no_grad():
        t1, t2 = model.target_projector(model.target_backbone(torch.cat(glob))).chunk(2)

    def naive(p, t):  # 2 - 2 cos, BYOL Eq. 2, averaged over the batch
        return (2 - 2 * F.cosine_similarity(p, t, dim=1)).mean()

    terms = [naive(p1, t2), naive(p2, t1)] + [naive(pv, t) for pv in (pa, pb) for t in (t1, t2)]
    want = 2 * torch.stack(terms).mean()  # the two-view loss's scale, L + L~
    assert abs(loss.item() - want.item()) < 1e-6
    assert 0 <= loss.item() <= 8


def test_specs_take_local_crops():
    assert METHODS["simclr"].multicrop and METHODS["byol"].multicrop
