"""DINO (Caron et al. 2021) on ResNets: the loss through forward against the paper's formula, the teacher's EMA
and centre, the teacher-temperature warm-up, the frozen last layer, the recipes, a short run and Lightning."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.methods.dino import (
    DINOConfig, build_dino, clip_gradients, dino_before_optimizer_step, dino_before_step, teacher_temp_at,
)
from selfsup.models.backbones import build_backbone
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.training.loop import pretrain
from selfsup.training.runs import load_encoder, load_run
from selfsup.training.setup import build_model
from selfsup.training.step import Schedule
from method_checks import knn_top1


def tiny_dino(seed: int = 0, **kw):
    torch.manual_seed(seed)
    backbone = build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625)
    return build_dino(DINOConfig(**{"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, **kw}), backbone).double()


def schedule_for(section: DINOConfig, steps_per_epoch: int = 10, total: int = 100) -> Schedule:
    return Schedule(PretrainConfig(method="dino", section=section), 0.1, total, 0, steps_per_epoch)


def _views(b: int = 6, n_local: int = 2):
    g = torch.Generator().manual_seed(3)
    glob = [torch.randn(b, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    loc = [torch.randn(b, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(n_local)]
    return glob, loc


def _naive_dino_loss(student, teacher, center, ts, tt):
    """Caron et al. 2021, Algorithm 1 / Eq. 3, one image and one pair of crops at a time."""
    total, pairs = 0.0, 0
    for iq, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            per_image = []
            for b in range(t.shape[0]):
                p_t = torch.softmax((t[b] - center) / tt, dim=0)
                log_p_s = torch.log_softmax(s[b] / ts, dim=0)
                per_image.append(-(p_t * log_p_s).sum())
            total = total + torch.stack(per_image).mean()
            pairs += 1
    return total / pairs


def test_loss_through_forward_equals_the_papers_formula_with_local_crops():
    model = tiny_dino()
    with torch.no_grad():  # a teacher that differs from the student, a centre that is not zero, as after training
        for p in model.teacher_parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.center.copy_(torch.randn_like(model.center))
    model.teacher_temp = 0.05
    glob, loc = _views()
    center = model.center.clone()
    loss, logs = model(*glob, *loc)
    # The submodules, in train mode on the same batches as forward: globals together, locals together.
    student = list(model.head(model.backbone(torch.cat(glob))).chunk(2)) \
        + list(model.head(model.backbone(torch.cat(loc))).chunk(2))
    with torch.no_grad():
        teacher = list(model.teacher_head(model.teacher_backbone(torch.cat(glob))).chunk(2))
    want = _naive_dino_loss(student, teacher, center[0], 0.1, 0.05)
    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    # 2 x (2 + 2) - 2 = 6 pairs: a teacher crop is never paired with the student's same crop.
    same_pair = sum(_naive_dino_loss([student[i], student[i]], [teacher[i]], center[0], 0.1, 0.05) for i in range(2))
    assert abs(loss.item() - (want * 6 + same_pair).item() / 8) > 1e-4  # including v == q would differ
    # Gradients reach the student only; forward leaves the centre alone and records the teacher's outputs.
    loss.backward()
    assert all(p.grad is None for p in model.teacher_parameters())
    assert model.backbone.conv1.weight.grad is not None and model.head.mlp[0].weight.grad is not None
    assert torch.equal(model.center, center)
    assert len(model.pending_teacher_out) == 1 and model.pending_teacher_out[0].shape == (12, 32)
    assert {"collapse_std", "teacher_entropy", "teacher_temp"} <= set(logs)


def test_two_global_crops_only_is_the_two_pair_loss():
    model = tiny_dino()
    glob, _ = _views()
    loss, _ = model(*glob)
    student = list(model.head(model.backbone(torch.cat(glob))).chunk(2))
    with torch.no_grad():
        teacher = list(model.teacher_head(model.teacher_backbone(torch.cat(glob))).chunk(2))
    want = _naive_dino_loss(student, teacher, model.center[0], 0.1, model.teacher_temp)
    assert abs(loss.item() - want.item()) < 1e-6 * max(1.0, abs(want.item()))


def test_update_target_moves_teacher_by_ema_and_centre_by_eq4():
    model = tiny_dino()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)
    glob, loc = _views()
    model(*glob, *loc)
    model(*loc[::-1])  # a second micro-batch (other images): the centre takes the mean over both
    rows = torch.cat(model.pending_teacher_out)
    c0 = model.center.clone()
    t0 = {k: v.clone() for k, v in model.teacher_backbone.named_parameters()}
    model.update_target(0.9)
    torch.testing.assert_close(model.center, 0.9 * c0 + 0.1 * rows.mean(0, keepdim=True))
    online = dict(model.backbone.named_parameters())
    for k, v in model.teacher_backbone.named_parameters():
        torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * online[k].detach())
    assert model.pending_teacher_out == []
    model.eval()
    model(*glob)  # evaluation forwards are not remembered for the centre
    assert model.pending_teacher_out == []


def test_teacher_temperature_warms_up_linearly_then_stays():
    s = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    assert teacher_temp_at(s, 0, 10) == pytest.approx(0.04)
    assert teacher_temp_at(s, 10, 10) == pytest.approx(0.055)
    assert teacher_temp_at(s, 20, 10) == pytest.approx(0.07)
    assert teacher_temp_at(s, 500, 10) == pytest.approx(0.07)
    assert teacher_temp_at(DINOConfig(teacher_temp=0.07, warmup_teacher_temp_epochs=0), 0, 10) == 0.07
    model = tiny_dino()
    model.pending_teacher_out = [torch.zeros(1)]  # from a step that was skipped
    dino_before_step(model, 5, schedule_for(s))
    assert model.teacher_temp == pytest.approx(0.0475) and model.pending_teacher_out == []


def test_last_layer_frozen_during_the_first_epoch_and_gradients_clipped_per_parameter():
    section = DINOConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, freeze_last_layer=1.0, clip_grad=0.0)
    for step, frozen in ((0, True), (9, True), (10, False)):
        model = tiny_dino()
        glob, loc = _views()
        model(*glob, *loc)[0].backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        dino_before_optimizer_step(model, step, schedule_for(section))
        last = [p for p in model.head.last_layer.parameters() if p.requires_grad]
        assert last and all((p.grad is None) == frozen for p in last)
        for k, p in model.named_parameters():  # nothing else is touched (clip_grad 0: off)
            if "last_layer" not in k and k in grads:
                assert torch.equal(p.grad, grads[k]), k
    model = tiny_dino()
    glob, loc = _views()
    model(*glob, *loc)[0].backward()
    norms = {k: p.grad.norm().item() for k, p in model.named_parameters() if p.grad is not None}
    clip = sorted(norms.values())[len(norms) // 2]
    clip_gradients(model, clip)
    for k, p in model.named_parameters():
        if p.grad is not None:
            want = min(norms[k], clip)  # each parameter on its own, not one global norm
            assert p.grad.norm().item() == pytest.approx(want, rel=1e-5), k


def test_section_validation_names_the_key():
    for key, value in (("out_dim", 0), ("student_temp", 0.0), ("center_momentum", 1.5), ("freeze_last_layer", -1),
                       ("base_tau", 2.0), ("head_layers", 0)):
        with pytest.raises(ConfigError, match=f"dino.{key}"):
            DINOConfig(**{key: value}).validate()


def _resolved(**kw):
    return build_config(PretrainConfig, {"method": "dino", "steps": 10, **kw})


def test_recipes_resolve_to_the_cited_values_and_turn_local_crops_on():
    cfg = _resolved(backbone="resnet50", dataset="imagefolder:/nowhere", image_size=224, batch_size=512)
    assert cfg.recipe == "dino"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.weight_decay) == ("sgd", 0.03, "linear", 1e-4)
    assert cfg.optim.warmup_epochs == 10.0 and cfg.optim.final_lr_fraction == pytest.approx(1e-6 / 0.06)
    assert (cfg.multicrop.num_local, cfg.multicrop.local_scale, cfg.multicrop.global_scale) == (8, (0.05, 0.14), (0.14, 1.0))
    assert cfg.multicrop.resolved_local_size(224) == 96
    d = cfg.dino
    assert (d.out_dim, d.hidden_dim, d.bottleneck_dim, d.teacher_temp, d.base_tau, d.clip_grad) == (65536, 2048, 256, 0.04, 0.996, 3.0)
    cfg = _resolved(backbone="resnet18", dataset="cifar10", batch_size=256)
    assert (cfg.recipe, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("dino", "lars", 0.3, 1e-6)
    assert (cfg.multicrop.num_local, cfg.multicrop.local_size) == (6, 18)
    assert (cfg.dino.out_dim, cfg.dino.teacher_temp, cfg.dino.base_tau, cfg.dino.clip_grad) == (4096, 0.07, 0.9995, 0.0)
    cfg = _resolved()  # the CPU default: Fashion-MNIST on the narrow encoder, local crops of 12 px
    assert cfg.recipe == "cpu" and cfg.multicrop.num_local > 0 and cfg.multicrop.resolved_local_size(28) == 12
    assert (cfg.multicrop.local_scale, cfg.multicrop.global_scale) == ((0.25, 0.6), (0.5, 1.0))  # found by the search
    assert METHODS["dino"].multicrop and METHODS["simclr"].multicrop and METHODS["byol"].multicrop


def test_a_short_run_learns_features_and_lowers_the_loss(tmp_path, tiny_cfg):
    # The settings, measured: kNN gain = the student's encoder minus the untrained encoder (same seed) on this
    # sample, 2,000 / 1,000 images, in points; 500 steps take about 30 s on one thread.
    # - SGD, not LARS: LARS leaves the head's biases out of the trust ratio, so they move at the raw lr while the
    #   weights move by about lr x 1e-3; on this head the bottleneck's bias outgrows the image-dependent part in one
    #   step and the l2-normalised bottleneck is the same for every image (kNN 64.6 -> 37). The official ResNet run
    #   uses SGD too. Batch norm in the head (the official ResNet setting).
    # - The bottleneck as wide as the hidden layer (128), not 8x narrower as in the paper (2,048 / 256): with 16-d,
    #   the 64 unit prototypes' cosines with a bottleneck vector have std 1/4, the teacher at 0.02 starts one-hot
    #   and the normalised bottleneck collapses within 10 steps (collapse_std 0.21 -> 0.03, healthy 0.25); whether
    #   a seed recovers was chance: gains over seeds 0-4 from -0.3 to +7.5, and none of about 40 other settings
    #   (lr, optimiser, teacher temperature and its warm-up, tau, centre momentum, K, crops, steps, the frozen or
    #   normalised last layer, clipping, head init, width, batch) made every seed pass. At 32-d seeds 0-5 gain +0.9
    #   to +12.1; at 64-d seeds 0-19 -1.2 to +17.0; at 128-d (here) seeds 0-19 -1.4 to +20.4, loss down 0.1-2.6,
    #   and 5 of the 20 runs stall (loss down under 0.5 or kNN gain under +3). A stall is chance, not a bug, so the
    #   test passes on the first of seeds 0-3 whose loss falls by 0.5 and whose kNN gains 3 points: a correct DINO
    #   fails it when four runs stall (about 4 in 1,000), one that does not learn on every seed (a teacher left at
    #   its init: loss down 0.2). A centre that never moves is caught by the unit test above, not here (seed 0
    #   gains 0.0, seed 1 +5.7 in 500 steps). Seed 0 alone (CPU kernels and thread counts change the trajectory):
    #   +5.0 to +7.0 with AVX-512, AVX2 or no vector kernels, +3.4 with AVX2 on one thread.
    # - The CPU recipe's crops (local (0.25, 0.6), global (0.5, 1) of the area), a small K (64), a sharp teacher
    #   (0.02), a faster teacher (base tau 0.99) and centre (0.5) for a run of 500 steps instead of 100 epochs.
    train, test = load_dataset("embedded", "train"), load_dataset("embedded", "test")
    tried = []
    for seed in (0, 1, 2, 3):
        cfg = tiny_cfg(method="dino", image_size=16, batch_size=32, steps=500, checkpoint_every=1000, log_every=10,
                       precision="fp32", channels_last=False, seed=seed,
                       multicrop={"num_local": 4, "local_size": 8, "local_scale": [0.25, 0.6],
                                  "global_scale": [0.5, 1.0]},
                       optim={"name": "sgd", "lr": 4.0, "weight_decay": 1e-4, "warmup_fraction": 0.1},
                       dino={"out_dim": 64, "hidden_dim": 128, "bottleneck_dim": 128, "use_bn_in_head": True,
                             "norm_last_layer": False, "freeze_last_layer": 0.0, "teacher_temp": 0.02,
                             "base_tau": 0.99, "center_momentum": 0.5})
        run = tmp_path / f"seed{seed}"
        pretrain(cfg, run, progress=False)
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
        loss_drop = sum(losses[:5]) / 5 - sum(losses[-5:]) / 5
        trained = load_encoder(load_run(run))
        torch.manual_seed(cfg.seed)
        untrained = build_model(cfg, 1, 16).backbone  # the loop's starting weights (same seed)
        gain = knn_top1(trained, train, test, 2000, 1000) - knn_top1(untrained, train, test, 2000, 1000)
        tried.append({"seed": seed, "loss_drop": round(loss_drop, 2), "knn_gain": round(gain, 1)})
        if loss_drop > 0.5 and gain > 3.0:
            break
    else:
        pytest.fail(f"DINO learned nothing on any of four seeds (loss drop, kNN gain over the untrained "
                    f"encoder): {tried}")


def test_lightning_fits_two_steps(tmp_path, tiny_cfg):
    L = pytest.importorskip("lightning")
    from selfsup.lightning import MODULES, step_dataloader

    cfg = tiny_cfg(method="dino", multicrop={"num_local": 2, "local_size": 8}, precision="fp32",
                   dino={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16})
    dataset = load_dataset("embedded", "train")
    module = MODULES["dino"].for_dataset(dataset, cfg)
    teacher0 = {k: v.clone() for k, v in module.model.teacher_backbone.named_parameters()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, step_dataloader(dataset, module.cfg, 2))
    assert trainer.global_step == 2
    assert any(not torch.equal(v, teacher0[k]) for k, v in module.model.teacher_backbone.named_parameters())
    assert module.model.center.abs().sum() > 0  # the centre moved in the post-step call


def test_resume_restores_teacher_and_centre_exactly(tmp_path, tiny_cfg):
    from selfsup.training.checkpoint import list_checkpoints, load_weights

    cfg = tiny_cfg(method="dino", precision="fp32", multicrop={"num_local": 2, "local_size": 8},
                   dino={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 0.01,
                         "teacher_temp": 0.07, "freeze_last_layer": 0.01})
    full = pretrain(cfg, tmp_path / "full", progress=False)

    class Stop(Exception):
        pass

    def bomb(step):
        if step == 4:  # after the checkpoint at step 3
            raise Stop

    with pytest.raises(Stop):
        pretrain(cfg, tmp_path / "cut", progress=False, on_step=bomb)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_00000003"]
    resumed = pretrain(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = load_weights(full), load_weights(resumed)
    assert "center" in a and any(k.startswith("teacher_") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["center"].abs().sum() > 0
