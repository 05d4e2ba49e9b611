"""Recipes: each recipe's resolved values at CPU, CIFAR and ImageNet size; the lr warning; merging overrides."""
import math

import pytest
import torch
import yaml

from selfsup.views.config import ViewConfig
from selfsup.models.backbones import build_backbone
from selfsup.errors import ConfigError
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config, to_dict
from selfsup.models.heads import ProjectionHead
from selfsup.methods import METHODS
from selfsup.methods.recipes import RECIPES, auto_recipe, paper_lr
from selfsup.training.config import effective_lr, lr_warning

CPU = {"dataset": "fashion-mnist"}  # the CPU default run: narrow encoder, 28 px
CIFAR = {"dataset": "cifar10", "backbone": "resnet18", "batch_size": 512}
IMAGENET = {"dataset": "imagefolder:photos", "backbone": "resnet50", "batch_size": 4096, "image_size": 224}


def resolved(method, setting, **kw):
    return build_config(PretrainConfig, {"method": method, **setting, **kw})


def summary(cfg):
    o, sec = cfg.optim, cfg.section
    return {"recipe": cfg.recipe, "optim": (o.name, o.lr, o.lr_scaling, o.weight_decay, o.warmup_fraction, o.warmup_epochs),
            "effective_lr": round(effective_lr(cfg), 4), "temperature": getattr(sec, "temperature", None),
            "heads": (sec.proj_hidden_dim, sec.proj_out_dim, sec.proj_layers, getattr(sec, "pred_hidden_dim", None)),
            "official": (sec.proj_last_bn, sec.proj_last_bias, cfg.zero_init_residual, cfg.small_stem),
            "base_tau": getattr(sec, "base_tau", None)}


# What each method resolves to in each setting (CPU: today's defaults, unchanged).
EXPECTED = {
    ("simclr", "cpu"): {"recipe": "cpu", "optim": ("lars", 2.0, "linear", 1e-6, 0.05, None), "effective_lr": 2.0,
                        "temperature": 0.2, "heads": (None, 128, 2, None), "official": (False, True, False, True),
                        "base_tau": None},
    ("simclr", "cifar"): {"recipe": "simclr", "optim": ("lars", 0.075, "sqrt", 1e-6, 0.05, 10.0),
                          "effective_lr": round(0.075 * math.sqrt(512), 4), "temperature": 0.5,
                          "heads": (None, 128, 2, None), "official": (True, True, True, True), "base_tau": None},
    ("simclr", "imagenet"): {"recipe": "simclr", "optim": ("lars", 0.3, "linear", 1e-6, 0.05, 10.0), "effective_lr": 4.8,
                             "temperature": 0.1, "heads": (None, 128, 2, None), "official": (True, True, True, False),
                             "base_tau": None},
    ("byol", "cpu"): {"recipe": "cpu", "optim": ("lars", 3.0, "linear", 1.5e-6, 0.05, None), "effective_lr": 3.0,
                      "temperature": None, "heads": (None, 128, 2, None), "official": (False, True, False, True),
                      "base_tau": 0.996},
    ("byol", "cifar"): {"recipe": "byol", "optim": ("lars", 0.2, "linear", 1.5e-6, 0.05, 10.0), "effective_lr": 0.4,
                        "temperature": None, "heads": (4096, 256, 2, 4096), "official": (False, False, True, True),
                        "base_tau": 0.996},
    ("byol", "imagenet"): {"recipe": "byol", "optim": ("lars", 0.2, "linear", 1.5e-6, 0.05, 10.0), "effective_lr": 3.2,
                           "temperature": None, "heads": (4096, 256, 2, 4096), "official": (False, False, True, False),
                           "base_tau": 0.996},
    ("simclrv2", "cpu"): {"recipe": "cpu", "optim": ("lars", 2.0, "linear", 1e-6, 0.05, None), "effective_lr": 2.0,
                          "temperature": 0.2, "heads": (None, 128, 3, None), "official": (False, True, False, True),
                          "base_tau": None},
    ("simclrv2", "cifar"): {"recipe": "simclrv2", "optim": ("lars", 0.1, "sqrt", 1e-4, 0.05, 10.0),
                            "effective_lr": round(0.1 * math.sqrt(512), 4), "temperature": 0.5,
                            "heads": (None, 128, 3, None), "official": (True, True, True, True), "base_tau": None},
    ("simclrv2", "imagenet"): {"recipe": "simclrv2", "optim": ("lars", 0.1, "sqrt", 1e-4, 0.05, 10.0), "effective_lr": 6.4,
                               "temperature": 0.1, "heads": (None, 128, 3, None), "official": (True, True, True, False),
                               "base_tau": None},
}


@pytest.mark.parametrize("method,setting", sorted(EXPECTED))
def test_each_recipe_resolves_to_the_papers_values(method, setting):
    cfg = resolved(method, {"cpu": CPU, "cifar": CIFAR, "imagenet": IMAGENET}[setting])
    assert summary(cfg) == EXPECTED[(method, setting)]


def test_cpu_default_is_todays_defaults_exactly():
    # Other keys than the recipe's own are the dataclass defaults, for every method's CPU default run.
    for method in METHODS:
        cfg = resolved(method, CPU)
        plain = to_dict(PretrainConfig(method=method))
        got = to_dict(cfg)
        changed = {k for k in plain if plain[k] != got[k]}
        assert changed <= {"recipe", "optim", "view", "view2", "small_stem"}, changed
        byol_views = ("byol", "barlow_twins", "vicreg")  # Barlow Twins Sec. 4 and VICReg Sec. 4.2 use BYOL's
        assert got["view"] == to_dict(ViewConfig.byol(28, 1) if method in byol_views else ViewConfig.simclr(28))


def test_simclr_uses_the_linear_rule_from_batch_4096():
    assert resolved("simclr", {**IMAGENET, "batch_size": 8192}).optim.lr_scaling == "linear"
    assert resolved("simclr", {**IMAGENET, "batch_size": 256}).optim.lr_scaling == "sqrt"
    assert math.isclose(paper_lr("simclr", 4096), 4.8) and math.isclose(paper_lr("byol", 4096), 3.2)
    assert math.isclose(paper_lr("simclrv2", 4096), 6.4)


def test_explicit_keys_win_and_recipe_can_be_named():
    cfg = resolved("simclr", IMAGENET, simclr={"temperature": 0.2}, optim={"lr": 0.5})
    assert (cfg.recipe, cfg.simclr.temperature, cfg.optim.lr, cfg.optim.weight_decay) == ("simclr", 0.2, 0.5, 1e-6)
    cfg = resolved("simclr", IMAGENET, recipe="cpu")
    assert (cfg.recipe, cfg.optim.lr, cfg.simclr.temperature) == ("cpu", 2.0, 0.2)
    cfg = resolved("simclr", CPU, recipe="simclr")
    assert (cfg.recipe, cfg.optim.lr, cfg.simclr.temperature) == ("simclr", 0.075, 0.5)
    # A warm-up fraction given explicitly replaces the recipe's warm-up in epochs.
    assert resolved("byol", IMAGENET, optim={"warmup_fraction": 0.1}).optim.warmup_epochs is None
    with pytest.raises(ConfigError, match="recipe: 'byol' is not defined for 'simclr'"):
        resolved("simclr", CPU, recipe="byol")
    with pytest.raises(ConfigError, match="did you mean 'simclr'"):
        resolved("simclr", CPU, recipe="simclrr")
    assert auto_recipe("byol", "timm:resnet50") == "byol" and auto_recipe("byol", "resnet10_narrow") == "cpu"
    assert not resolved("simclr", {**IMAGENET, "backbone": "timm:resnet18"}).zero_init_residual


def test_warning_fires_for_the_user_guides_old_resnet50_example():
    # docs/user_guide.md: torchrun ... --backbone resnet50 --batch-size 4096 --epochs 100 --set image_size=224,
    # with the CPU default's lr: SimCLR 2.0 x 16 = 32 (paper 4.8), BYOL 3.0 x 16 = 48 (paper 3.2).
    simclr = resolved("simclr", IMAGENET, recipe="cpu")
    byol = resolved("byol", IMAGENET, recipe="cpu")
    assert "effective learning rate 32 " in lr_warning(simclr) and "--recipe simclr" in lr_warning(simclr)
    assert "effective learning rate 48 " in lr_warning(byol) and "optim.lr" in lr_warning(byol)
    assert "15.0x" in lr_warning(byol)
    # The paper recipes and the CPU default where it was measured do not warn.
    for method in METHODS:
        assert lr_warning(resolved(method, IMAGENET)) is None
        assert lr_warning(resolved(method, CIFAR)) is None
        assert lr_warning(resolved(method, CPU)) is None


def test_warning_is_printed_before_any_work(tmp_path, capsys):
    from selfsup.cli.app import main

    # A data set that does not exist: the warning is printed before the data is looked for.
    rc = main(["pretrain", "--backbone", "resnet50", "--batch-size", "4096", "--recipe", "cpu", "--dataset",
               "cifar10", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2 and lines[0].startswith("[selfsup] recipe cpu")
    assert lines[1].startswith("[selfsup] warning: effective learning rate 32")


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_partial_view_override_keeps_the_rest_of_the_preset(method):
    base = resolved(method, CPU)
    cfg = resolved(method, CPU, view={"blur_p": 0.0})
    assert cfg.view.blur_p == 0.0
    for f in ("jitter_strength", "jitter_brightness", "jitter_hue", "solarize_p", "crop_scale", "grayscale_p"):
        assert getattr(cfg.view, f) == getattr(base.view, f), f
    if method == "byol":
        assert cfg.view2 == base.view2 == ViewConfig.byol(28, 2)  # view 2 keeps its own preset (solarize 0.2)
        assert cfg.view2.solarize_p == 0.2
    else:
        assert cfg.view2 == cfg.view  # SimCLR's two views share one distribution
    cfg = resolved(method, CPU, view2={"solarize_p": 0.5})
    assert cfg.view == base.view and cfg.view2.solarize_p == 0.5
    assert cfg.view2.jitter_strength == base.view2.jitter_strength


def test_partial_override_via_set_on_the_command_line():
    from selfsup.cli.app import build_parser
    from selfsup.cli.app import _pretrain_config

    args = build_parser().parse_args(["pretrain", "--method", "byol", "--set", "view.blur_p=0",
                                      "--set", "optim.weight_decay=0"])
    cfg = _pretrain_config(args)
    assert cfg.view.blur_p == 0 and cfg.view.jitter_brightness == 0.4 and cfg.view2.solarize_p == 0.2
    assert cfg.optim.lr == 3.0 and cfg.optim.weight_decay == 0  # the nested optim group merges too


def test_dry_run_prints_the_resolved_config_without_reading_data(tmp_path, capsys):
    from selfsup.cli.app import main

    assert main(["pretrain", "--dry-run", "--method", "byol", "--backbone", "resnet50", "--batch-size", "4096",
                 "--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing-here"), "--epochs", "100",
                 "--set", "image_size=224"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert data["recipe"] == "byol" and data["optim"]["lr"] == 0.2 and data["byol"]["proj_hidden_dim"] == 4096
    assert "simclr" not in data and "temperature" not in data  # only the chosen method's keys
    assert "# effective_lr: 3.2" in out and "# total_steps: 1200" in out and "# warmup_steps: 120" in out
    again = build_config(PretrainConfig, data)  # the output is a loadable config
    assert to_dict(again) == data
    assert not (tmp_path / "nothing-here").exists()


def test_heads_end_as_in_the_official_code():
    head = ProjectionHead(8, 16, 4, last_bn="scale")
    bn = head.layers[-1][-1]
    assert isinstance(bn, torch.nn.BatchNorm1d) and bn.weight.requires_grad and not bn.bias.requires_grad
    assert head.layers[-1][0].bias is None
    head = ProjectionHead(8, 16, 4, last_bias=False)
    assert head.layers[-1][0].bias is None and len(head.layers[-1]) == 1
    cfg = resolved("byol", CIFAR, byol={"proj_hidden_dim": 16, "pred_hidden_dim": 16, "proj_out_dim": 8})
    model = METHODS["byol"].build(cfg.section, build_backbone("resnet10_narrow", in_channels=3, image_size=32))
    assert model.projector.layers[-1][0].bias is None and model.predictor.layers[-1][0].bias is None


def test_zero_init_residual_and_small_stem_cut_off():
    from selfsup.training.setup import build_model

    cfg = resolved("simclr", CIFAR, backbone="resnet18_narrow", recipe="simclr")
    model = build_model(cfg, 3, 32)
    assert cfg.zero_init_residual and float(model.backbone.layer1[0].bn2.weight.detach().abs().sum()) == 0
    assert model.backbone.small_stem
    stl = resolved("simclr", {"dataset": "stl10", "backbone": "resnet18"})
    assert stl.small_stem is False  # 96 px: the ImageNet stem
    assert resolved("simclr", {"dataset": "stl10", "backbone": "resnet18"}, small_stem=True).small_stem


def test_simclrv2_finetuning_values_are_the_finetune_defaults():
    from selfsup.protocols.finetune import FinetuneOptimConfig, paper_epochs
    from selfsup.methods.recipes import SIMCLRV2_FINETUNE

    o = FinetuneOptimConfig()
    assert {"name": o.name, "lr": o.lr, "lr_scaling": o.lr_scaling, "weight_decay": o.weight_decay} == SIMCLRV2_FINETUNE["optim"]
    assert (paper_epochs(0.01), paper_epochs(0.1)) == (SIMCLRV2_FINETUNE["epochs_at_1pct"], SIMCLRV2_FINETUNE["epochs_at_10pct"])


def test_evaluation_crops_the_centre_above_32_px():
    from selfsup.evaluation.preprocess import eval_crop, prepare_images

    assert eval_crop(28) == eval_crop(32) == 1.0 and eval_crop(96) == 0.875
    img = torch.zeros(1, 1, 96, 96, dtype=torch.uint8)
    img[..., 6:90, 6:90] = 255  # a border of 6 px: the central 84 px (87.5%) are white
    x = prepare_images(img, (0.0,), (1.0,), 96, eval_crop(96))
    assert x.shape == (1, 1, 96, 96) and float(x.min()) == 1.0
    assert float(prepare_images(img, (0.0,), (1.0,), 96).min()) == 0.0
