"""Multi-crop losses of every method that takes local crops (SwAV, Caron et al. 2020, Sec. 3.2): local crops after
the two global views, compared with the global views only; with no local crops, bit for bit the two-view losses.
With local crops each method's loss equals a float64 loop written from its docstring, in value and gradient."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import barlow_twins_loss, byol_loss, infonce_loss, nt_xent, vicreg_loss
from selfsup.methods import BYOL, METHODS, SimCLR
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.moco import MoCoConfig, build_moco
from selfsup.methods.simclrv2 import SimCLRv2Buffer
from selfsup.methods.simsiam import SimSiam
from selfsup.methods.vicreg import VICReg
from selfsup.models.backbones import build_backbone
from selfsup.models.heads import ProjectionHead
from selfsup.training.loop import pretrain
from method_checks import naive_infonce


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
    assert all(METHODS[name].multicrop for name in MULTICROP_METHODS)


# --- MoCo v3, SimSiam, Barlow Twins, VICReg, SimCLRv2's memory buffer ---------------------------------------------

MULTICROP_METHODS = ("simclr", "byol", "dino", "moco", "simsiam", "barlow_twins", "vicreg", "simclrv2")
T = 0.3  # the contrastive temperature of the tiny models


def _perturb_target(params):
    with torch.no_grad():  # a momentum encoder that differs from the online one, as after some training
        for p in params:
            p.add_(0.05 * torch.randn_like(p))


def tiny_moco(queue_size: int = 0):
    backbone = _backbone()
    section = MoCoConfig(proj_hidden_dim=32, proj_out_dim=8, pred_hidden_dim=32, temperature=T, queue_size=queue_size)
    model = build_moco(section, backbone).double()
    _perturb_target(model.target_parameters())
    return model


def tiny_simsiam() -> SimSiam:
    backbone = _backbone()
    projector = ProjectionHead(backbone.num_features, 32, 8, num_layers=2, last_bn=True)
    return SimSiam(backbone, projector, ProjectionHead(8, 4, 8)).double()


def tiny_barlow_twins() -> BarlowTwins:
    backbone = _backbone()
    return BarlowTwins(backbone, ProjectionHead(backbone.num_features, 32, 8), lambda_offdiag=0.1).double()


def tiny_vicreg() -> VICReg:
    backbone = _backbone()
    return VICReg(backbone, ProjectionHead(backbone.num_features, 32, 8), 25.0, 20.0, 2.0).double()


def tiny_simclrv2_buffer() -> SimCLRv2Buffer:
    backbone = _backbone()
    model = SimCLRv2Buffer(backbone, ProjectionHead(backbone.num_features, 32, 8, num_layers=3), T, 7, 8).double()
    _perturb_target(list(model.target_backbone.parameters()) + list(model.target_head.parameters()))
    return model


def _backward_both(model, loss, want):
    """``loss`` (the model's) and ``want`` (a reference built from the model's parts): their gradients."""
    loss.backward()
    got = _grads(model)
    model.zero_grad()
    want.backward()
    return got, _grads(model)


def _assert_bit_identical(model, loss, want):
    got, ref = _backward_both(model, loss, want)
    assert torch.equal(loss, want)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def _assert_close(model, loss, want):
    """Value and every parameter gradient; the losses run in fp32 internally, so fp32 tolerances."""
    got, ref = _backward_both(model, loss, want)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert got.keys() == ref.keys() and got
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


# Naive references, one entry at a time in float64, from each loss's formula.

def _naive_neg_cos(p, z):
    """SimSiam's D(p, sg(z)) = -mean_i cos(p_i, z_i)."""
    z = z.detach()
    return -torch.stack([p[i] @ z[i] / (p[i].norm() * z[i].norm()) for i in range(p.shape[0])]).mean()


def _naive_barlow_twins(a, b, lam):
    """Eq. 1 on the cross-correlation of batch-standardised (biased variance, eps 1e-5) embeddings."""
    a, b = a.double(), b.double()
    n, d = a.shape

    def standardise(z):
        return (z - z.mean(0)) / torch.sqrt(((z - z.mean(0)) ** 2).mean(0) + 1e-5)

    an, bn = standardise(a), standardise(b)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = (an[:, i] * bn[:, j]).sum() / n
            total = total + ((1 - c) ** 2 if i == j else lam * c ** 2)
    return total


def _naive_vicreg(a, b, lam, mu, nu):
    """The official form of Eq. 6: mean squared distance, averaged variance hinges, summed covariance terms."""
    a, b = a.double(), b.double()
    n, d = a.shape

    def variance(z):
        return sum(torch.relu(1 - torch.sqrt(z[:, j].var() + 1e-4)) for j in range(d)) / d

    def covariance(z):
        zc = z - z.mean(0)
        return sum(((zc[:, i] * zc[:, j]).sum() / (n - 1)) ** 2 for i in range(d) for j in range(d) if i != j) / d

    invariance = sum(((a[i] - b[i]) ** 2).sum() for i in range(n)) / (n * d)
    return lam * invariance + mu * (variance(a) + variance(b)) / 2 + nu * (covariance(a) + covariance(b))


def _moco_parts(model, glob, loc):
    def query(x):
        return model.predictor(model.projector(model.backbone(x)))

    with torch.no_grad():
        keys = [model.target_projector(model.target_backbone(x)) for x in glob]
    queries = [query(x) for x in glob]
    return queries, keys, (query(torch.cat(loc)).chunk(len(loc)) if loc else [])


@pytest.mark.parametrize("queue_size", [0, 7])
def test_moco_without_local_crops_is_bit_identical_to_the_two_view_loss(queue_size):
    model, glob = tiny_moco(queue_size), _views()[0]
    loss, _ = model(*glob)
    (q1, q2), (k1, k2), _ = _moco_parts(model, glob, [])
    queue = model.queue if queue_size else None
    _assert_bit_identical(model, loss, infonce_loss(q1, k2, T, queue=queue) + infonce_loss(q2, k1, T, queue=queue))


@pytest.mark.parametrize("queue_size", [0, 7])
def test_moco_local_queries_contrast_with_the_global_keys_only(queue_size):
    model = tiny_moco(queue_size)
    glob, loc = _views()
    seen = []
    model.target_backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    loss, _ = model(*glob, *loc)
    assert seen == [torch.Size([5, 1, 16, 16])] * 2  # the key encoder sees the two global views only
    (q1, q2), (k1, k2), q_local = _moco_parts(model, glob, loc)
    queue = model.queue if queue_size else None
    terms = [naive_infonce(q1, k2, T, queue), naive_infonce(q2, k1, T, queue)]
    terms += [naive_infonce(qv, k, T, queue) for qv in q_local for k in (k1, k2)]
    _assert_close(model, loss, 2 * torch.stack(terms).mean())  # 2 x the mean: the two-view sum's scale


def test_moco_queue_takes_the_global_keys_only():
    model = tiny_moco(queue_size=16)
    glob, loc = _views()
    old = model.queue.clone()
    model(*glob, *loc)
    _, (k1, k2), _ = _moco_parts(model, glob, [])
    model.update_target(1.0)  # tau 1: the key encoder stays, so its keys are the ones forward stashed
    torch.testing.assert_close(model.queue[:10], F.normalize(torch.cat([k1, k2]), dim=1))
    torch.testing.assert_close(model.queue[10:], old[:6])


def test_simsiam_without_local_crops_is_bit_identical_to_the_two_view_loss():
    model, (x1, x2) = tiny_simsiam(), _views()[0]
    loss, _ = model(x1, x2)
    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    _assert_bit_identical(model, loss, (byol_loss(p1, z2) / 2 - 1) / 2 + (byol_loss(p2, z1) / 2 - 1) / 2)


def test_simsiam_local_predictions_regress_onto_both_global_projections():
    model = tiny_simsiam()
    glob, loc = _views()
    loss, _ = model(*glob, *loc)
    z1, z2 = (model.projector(model.backbone(x)) for x in glob)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    p_local = model.predictor(model.projector(model.backbone(torch.cat(loc)))).chunk(len(loc))
    terms = [_naive_neg_cos(p1, z2), _naive_neg_cos(p2, z1)] + [_naive_neg_cos(pv, z) for pv in p_local
                                                                 for z in (z1, z2)]
    _assert_close(model, loss, torch.stack(terms).mean())
    assert -1 <= loss.item() <= 1


def _per_view_parts(model, head, glob, loc):
    """Global views one at a time, then every local crop in one pass (Barlow Twins, VICReg)."""
    z1, z2 = (head(model.backbone(x)) for x in glob)
    return z1, z2, (head(model.backbone(torch.cat(loc))).chunk(len(loc)) if loc else [])


def test_barlow_twins_without_local_crops_is_bit_identical_to_the_two_view_loss():
    model, glob = tiny_barlow_twins(), _views()[0]
    loss, _ = model(*glob)
    z1, z2, _ = _per_view_parts(model, model.projector, glob, [])
    _assert_bit_identical(model, loss, barlow_twins_loss(z1, z2, 0.1))


def test_barlow_twins_local_crops_average_the_pairs_with_each_global_view():
    model = tiny_barlow_twins()
    glob, loc = _views()
    loss, _ = model(*glob, *loc)
    z1, z2, z_local = _per_view_parts(model, model.projector, glob, loc)
    terms = [_naive_barlow_twins(z1, z2, 0.1)] + [_naive_barlow_twins(zv, zg, 0.1) for zv in z_local
                                                   for zg in (z1, z2)]
    _assert_close(model, loss, torch.stack(terms).mean())


def test_vicreg_without_local_crops_is_bit_identical_to_the_two_view_loss():
    model, glob = tiny_vicreg(), _views()[0]
    loss, _ = model(*glob)
    z1, z2, _ = _per_view_parts(model, model.expander, glob, [])
    _assert_bit_identical(model, loss, vicreg_loss(z1, z2, 25.0, 20.0, 2.0))


def test_vicreg_local_crops_average_the_pairs_with_each_global_view():
    model = tiny_vicreg()
    glob, loc = _views()
    loss, _ = model(*glob, *loc)
    z1, z2, z_local = _per_view_parts(model, model.expander, glob, loc)
    terms = [_naive_vicreg(z1, z2, 25.0, 20.0, 2.0)] + [_naive_vicreg(zv, zg, 25.0, 20.0, 2.0) for zv in z_local
                                                         for zg in (z1, z2)]
    _assert_close(model, loss, torch.stack(terms).mean())


def _simclrv2_parts(model, glob, loc):
    h = model.backbone(torch.cat(glob))
    if loc:
        h = torch.cat([h, model.backbone(torch.cat(loc))])
    z1, z2, *z_local = model.head(h).chunk(2 + len(loc))
    with torch.no_grad():
        k1, k2 = model.target_head(model.target_backbone(torch.cat(glob))).chunk(2)
    return z1, z2, z_local, k1, k2


def test_simclrv2_buffer_without_local_crops_is_bit_identical_to_the_two_view_loss():
    model, glob = tiny_simclrv2_buffer(), _views()[0]
    loss, _ = model(*glob)
    z1, z2, _, k1, k2 = _simclrv2_parts(model, glob, [])
    want = (infonce_loss(z1, k2, T, queue=model.queue) + infonce_loss(z2, k1, T, queue=model.queue)) / (4 * T)
    _assert_bit_identical(model, loss, want)


def test_simclrv2_buffer_local_queries_use_the_global_keys_and_the_buffer():
    model = tiny_simclrv2_buffer()
    glob, loc = _views()
    seen = []
    model.target_backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    loss, _ = model(*glob, *loc)
    assert seen == [torch.Size([10, 1, 16, 16])]  # the momentum copy sees the two global views, once
    z1, z2, z_local, k1, k2 = _simclrv2_parts(model, glob, loc)
    pairs = [(z1, k2), (z2, k1)] + [(zv, k) for zv in z_local for k in (k1, k2)]
    # the mean cross-entropy over the (query, key) pairs; naive_infonce carries MoCo's 2t factor
    terms = [naive_infonce(q, k, T, model.queue) / (2 * T) for q, k in pairs]
    _assert_close(model, loss, torch.stack(terms).mean())
    model.update_target(1.0)  # momentum 1: the copy stays, so k1, k2 are the keys forward stashed
    torch.testing.assert_close(model.queue, F.normalize(torch.cat([k1, k2]), dim=1)[:7])  # 7 slots, 10 global keys


@pytest.mark.parametrize("method,section", [
    ("moco", {"proj_hidden_dim": 32, "queue_size": 64}),
    ("simsiam", {"proj_hidden_dim": 32}),
    ("barlow_twins", {"proj_hidden_dim": 32}),
    ("vicreg", {"proj_hidden_dim": 32}),
    ("simclrv2", {"proj_hidden_dim": 32}),
    ("simclrv2", {"proj_hidden_dim": 32, "queue_size": 64}),
], ids=["moco_queue", "simsiam", "barlow_twins", "vicreg", "simclrv2", "simclrv2_buffer"])
def test_two_multicrop_steps_of_the_loop(tmp_path, tiny_cfg, method, section):
    cfg = tiny_cfg(method=method, steps=2, checkpoint_every=100, precision="fp32",
                   multicrop={"num_local": 2, "local_size": 8}, **{method: section})
    assert cfg.multicrop.num_local == 2  # refused by the config for a method without a multi-crop loss
    pretrain(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses


@pytest.mark.parametrize("method", ["moco", "simclrv2"])
def test_lightning_fits_two_multicrop_steps_and_fills_the_queue_with_global_keys(tmp_path, tiny_cfg, method):
    L = pytest.importorskip("lightning")
    from selfsup.data.datasets import load_dataset
    from selfsup.lightning import MODULES, step_dataloader

    cfg = tiny_cfg(method=method, precision="fp32", multicrop={"num_local": 2, "local_size": 8},
                   **{method: {"proj_hidden_dim": 32, "queue_size": 80}})
    dataset = load_dataset("embedded", "train")
    module = MODULES[method].for_dataset(dataset, cfg)
    queue0 = module.model.queue.clone()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, step_dataloader(dataset, module.cfg, 2))
    assert trainer.global_step == 2
    # two steps of 2 global views x 16 images went in front; local crops bring no keys
    torch.testing.assert_close(module.model.queue[64:], queue0[:16])


def test_the_supervised_baseline_still_refuses_local_crops(tiny_cfg):
    from selfsup.errors import ConfigError

    assert [name for name, spec in METHODS.items() if not spec.multicrop] == ["supervised"]
    with pytest.raises(ConfigError, match="multicrop.num_local"):
        tiny_cfg(method="supervised", multicrop={"num_local": 2, "local_size": 8})


# --- Batch norm's running statistics: the global crops' only -----------------------------------------------------

@pytest.mark.parametrize("method", MULTICROP_METHODS)
def test_local_crops_leave_the_encoders_running_statistics_to_the_global_views(tiny_cfg, method):
    # Frozen features are computed at the global size; a local pass folded into the running statistics would
    # normalise them with another resolution's (about half of each buffer after a few steps).
    from selfsup.training.setup import build_model

    section = {"simclr": {}, "byol": {}, "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}}.get(
        method, {"proj_hidden_dim": 32})
    cfg = tiny_cfg(method=method, precision="fp32", multicrop={"num_local": 2, "local_size": 8}, **{method: section})
    torch.manual_seed(0)
    model = build_model(cfg, 1, 16).train()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    glob = [torch.randn(6, 1, 16, 16, generator=g) for _ in range(2)]
    loc = [3.0 + 2.0 * torch.randn(6, 1, 8, 8, generator=g) for _ in range(2)]  # other statistics than the globals
    model(*glob, *loc)
    twin(*glob)  # the same global passes, no local crops
    buffers = dict(model.backbone.named_buffers())
    assert any("running_mean" in k for k in buffers)
    for name, want in twin.backbone.named_buffers():
        torch.testing.assert_close(buffers[name], want, rtol=0, atol=0, msg=name)
    bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and all(m.momentum == 0.1 for m in bn)  # restored after the local pass


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cross_rank", [False, True])
def test_running_stats_frozen_normalises_by_the_batch_and_restores_everything(momentum, cross_rank):
    from selfsup.models.running_stats import running_stats_frozen
    from selfsup.models.sync_batchnorm import CrossRankBatchNorm

    torch.manual_seed(0)
    bn = (CrossRankBatchNorm if cross_rank else torch.nn.BatchNorm2d)(3, momentum=momentum)
    bn(torch.randn(4, 3, 5, 5))  # some history
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = 2.0 + 3.0 * torch.randn(4, 3, 5, 5)
    with running_stats_frozen(bn):
        y = bn(x)
    want = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(y, want)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert bn.momentum == momentum
    bn(x)  # and outside, the running statistics move again
    assert not torch.equal(bn.running_mean, before["running_mean"])
