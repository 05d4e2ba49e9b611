"""VICReg as a method: the loss through its forward against Eq. 1-6 written out (the official code's form), the
expander and the paper recipe, a short run that learns, and a Lightning fit."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.methods.vicreg import VICReg, VICRegConfig
from selfsup.models.heads import ProjectionHead
from method_checks import knn_top1, lightning_two_steps

SPEC = METHODS["vicreg"]


def _naive_vicreg(z1: torch.Tensor, z2: torch.Tensor, lam: float, mu: float, nu: float) -> float:
    """Invariance: mean over the N*d entries of (z - z')^2; variance: mean over dimensions of
    relu(1 - sqrt(unbiased Var + 1e-4)), the two views averaged; covariance: sum of the squared off-diagonal
    entries of the unbiased covariance over d, the two views summed (official main_vicreg.py)."""
    n, d = z1.shape
    z1, z2 = z1.double(), z2.double()
    inv = sum((z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def var_cov(z):
        mean = [sum(z[b, j] for b in range(n)) / n for j in range(d)]
        cov = [[sum((z[b, i] - mean[i]) * (z[b, j] - mean[j]) for b in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        v = sum(max(0.0, 1 - (cov[j][j] + 1e-4) ** 0.5) for j in range(d)) / d
        c = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, c

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    return float(lam * inv + mu * (v1 + v2) / 2 + nu * (c1 + c2))


@pytest.mark.parametrize("n, d, coeffs", [(5, 3, (25.0, 25.0, 1.0)), (8, 6, (1.0, 2.0, 3.0))])
def test_forward_loss_is_eq_6_on_the_embeddings(n, d, coeffs):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g) * 0.5 + 1, torch.randn(n, d, generator=g) * 1.5
    model = VICReg(nn.Identity(), nn.Identity(), *coeffs)
    loss, logs = model(z1, z2)  # identity encoder and expander: the views are the embeddings
    assert loss.item() == pytest.approx(_naive_vicreg(z1, z2, *coeffs), rel=1e-5)
    assert set(logs) == {"collapse_std"} and logs["collapse_std"] > 0


def test_forward_applies_one_network_to_each_view_and_collapse_costs_the_variance_term():
    torch.manual_seed(0)
    expander = ProjectionHead(4, 8, 6, num_layers=3, last_bias=False)
    model = VICReg(nn.Identity(), expander)
    x1, x2 = torch.randn(7, 4), torch.randn(7, 4)
    ref = ProjectionHead(4, 8, 6, num_layers=3, last_bias=False)
    ref.load_state_dict(expander.state_dict())
    loss, _ = model(x1, x2)  # one view at a time (official code), batch norm per view
    assert loss.item() == pytest.approx(_naive_vicreg(ref(x1).detach(), ref(x2).detach(), 25, 25, 1), rel=1e-5)
    const = VICReg(nn.Identity(), lambda x: torch.ones(x.shape[0], 6))
    loss, logs = const(x1, x2)  # collapsed: only the variance hinge is left, 25 x (1 - sqrt(1e-4))
    assert loss.item() == pytest.approx(25 * 0.99) and logs["collapse_std"] == 0


def test_paper_recipe_and_expander():
    layer = SPEC.recipes[0].values(224, 2048)
    optim = layer.shared["optim"]
    assert (optim["name"], optim["lr"], optim["lr_scaling"], optim["weight_decay"]) == ("lars", 0.2, "linear", 1e-6)
    assert optim["warmup_epochs"] == 10 and optim["final_lr_fraction"] == 0.001
    assert layer.shared["zero_init_residual"] is True
    assert SPEC.paper_lr(2048) == pytest.approx(1.6)
    section = layer.section
    assert (section["sim_coeff"], section["std_coeff"], section["cov_coeff"]) == (25.0, 25.0, 1.0)
    assert (section["proj_hidden_dim"], section["proj_out_dim"], section["proj_layers"]) == (8192, 8192, 3)
    assert SPEC.recipes[0].values(32, 256).section["proj_out_dim"] == 2048
    head = VICRegConfig(**section).head(2048)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [8192] * 3 and linears[-1].bias is None  # official Projector
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2


def test_config_errors_name_the_key():
    for bad, key in (({"sim_coeff": -1.0}, "vicreg.sim_coeff"), ({"cov_coeff": float("nan")}, "vicreg.cov_coeff"),
                     ({"proj_layers": 0}, "vicreg.proj_layers")):
        with pytest.raises(ConfigError, match=key):
            VICRegConfig(**bad).validate()




def test_a_short_run_learns_features_and_its_loss_falls(tmp_path, tiny_cfg):
    from selfsup.data.datasets import load_dataset
    from selfsup.training.loop import pretrain
    from selfsup.training.runs import load_encoder, load_run
    from selfsup.training.setup import build_model

    cfg = tiny_cfg(method="vicreg", image_size=16, precision="fp32", steps=200, batch_size=32,
                   checkpoint_every=1000, log_every=10, vicreg={"proj_hidden_dim": 64, "proj_out_dim": 64},
                   optim={"lr": 4.8})  # 3x the CPU layer's: 200 steps of a 1/16-width encoder (+2 kNN points at 1.6)
    train, test = load_dataset("embedded", "train"), load_dataset("embedded", "test")
    torch.manual_seed(cfg.seed)  # the run's own initialisation (build_run seeds, then builds)
    untrained = build_model(cfg, 1, 16).backbone
    pretrain(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    before = knn_top1(untrained, train, test, 2000, 1000, shuffled=True)
    after = knn_top1(load_encoder(load_run(tmp_path / "run")), train, test, 2000, 1000, shuffled=True)
    print(f"kNN top-1 {before:.1f} -> {after:.1f}; loss {losses[:3]} -> {losses[-5:]}")
    # The variance and covariance terms keep the loss well above 0 here (~22 -> ~18.5): a flat loss fails.
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:3]) / 3, losses
    assert after > before + 3, (before, after)  # measured 63.5 -> 68.9 on these 1,000 test images


def test_lightning_fits_two_steps():
    pytest.importorskip("lightning")
    before, model, steps = lightning_two_steps("vicreg", proj_hidden_dim=32, proj_out_dim=32)
    assert steps == 2
    after = dict(model.named_parameters())  # trained weights, not only batch-norm statistics
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("expander."))


def test_recipes_resolve_at_cpu_cifar_and_imagenet_size():
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config

    def resolved(**setting):
        return build_config(PretrainConfig, {"method": "vicreg", **setting})

    cpu = resolved(dataset="fashion-mnist")
    assert cpu.recipe == "cpu" and cpu.optim.lr == 1.6 and cpu.optim.weight_decay == 1e-6
    assert (cpu.section.proj_hidden_dim, cpu.section.proj_out_dim, cpu.section.proj_layers) == (2048, 2048, 3)
    cifar = resolved(dataset="cifar10", backbone="resnet18", batch_size=512)
    assert cifar.recipe == "vicreg" and cifar.small_stem and cifar.section.proj_out_dim == 2048
    assert cifar.optim.lr == 0.2 and cifar.optim.warmup_epochs == 10 and cifar.zero_init_residual
    imagenet = resolved(dataset="imagefolder:photos", backbone="resnet50", batch_size=2048, image_size=224)
    assert imagenet.section.proj_out_dim == 8192 and imagenet.optim.final_lr_fraction == 0.001
    assert getattr(imagenet.section, "std_coeff") == SPEC.recipes[0].values(224, 2048).section["std_coeff"]
    assert imagenet.view.blur_p == 1.0 and imagenet.view2.solarize_p == 0.2  # BYOL's asymmetric views
