"""``selfsup pretrain --method supervised``: the same encoder trained with labels (the ceiling baseline)."""
import json

import torch
import torch.nn.functional as F

from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import load_weights
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.methods import METHODS
from selfsup.methods.supervised import Supervised
from selfsup.training.loop import pretrain


def test_supervised_loss_is_cross_entropy_of_a_linear_classifier_on_h_over_both_views():
    torch.manual_seed(0)
    model = Supervised(build_backbone("resnet18", in_channels=1, image_size=16, width=0.0625), num_classes=5).eval()
    x1, x2, y = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), torch.tensor([0, 4, 2, 2])
    loss, logs = model(x1, x2, y)
    h = model.backbone(torch.cat([x1, x2]))
    expected = F.cross_entropy(h @ model.classifier.weight.T + model.classifier.bias, torch.cat([y, y]))
    torch.testing.assert_close(loss, expected)
    wrong, _ = model(x1, x2, (y + 1) % 5)  # the labels reach the loss: other labels, another loss
    assert not torch.isclose(wrong, loss)


def test_supervised_classifier_has_the_data_sets_number_of_classes():
    from selfsup.training.setup import build_model

    cfg = build_config(PretrainConfig, {"method": "supervised", "backbone": "resnet18", "backbone_width": 0.0625})
    assert build_model(cfg, 1, 16, num_classes=3).classifier.out_features == 3
    assert build_model(cfg, 1, 16, num_classes=100).classifier.out_features == 100


def test_supervised_uses_the_default_simclr_runs_views_and_optimiser():
    sup = build_config(PretrainConfig, {"method": "supervised"})
    ssl = build_config(PretrainConfig, {"method": "simclr"})
    assert sup.optim == ssl.optim and sup.batch_size == ssl.batch_size and sup.backbone == ssl.backbone
    assert METHODS["supervised"].views(28) == METHODS["simclr"].views(28)
    assert (sup.view, sup.view2) == (ssl.view, ssl.view2)


def test_supervised_run_folder_is_probed_like_any_other(tmp_path, tiny_cfg):
    from selfsup.cli.app import run_eval

    run = tmp_path / "sup"
    pretrain(tiny_cfg(method="supervised", steps=4), run, progress=False)
    weights = load_weights(run / "model.safetensors")
    assert weights["classifier.weight"].shape[0] == 10  # the embedded sample's classes
    assert any(k.startswith("backbone.") for k in weights)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("train_top1" in r for r in rows if "loss" in r)
    result = run_eval("knn", run)
    assert result["backbone_unchanged"] and 0 <= result["top1"] <= 100
