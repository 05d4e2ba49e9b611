"""Exporting the encoder: strict state-dict round trips into torchvision (and timm), ONNX agreement, refusals."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from selfsup.cli import app as cli
from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import save_weights, weights_metadata
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import save_yaml
from selfsup.artifacts.export import ExportError, export_backbone, load_exported, torchvision_arch


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default values in every tensor (BN affine and running stats too), so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def export_kwargs(model, name, in_channels=3, image_size=224):
    return dict(backbone_name=name, in_channels=in_channels, image_size=image_size,
                mean=(0.485, 0.456, 0.406)[:in_channels], std=(0.229, 0.224, 0.225)[:in_channels])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_round_trip(name, tmp_path):
    ours = randomise_(build_backbone(name, image_size=224))
    assert torchvision_arch(ours) == name
    path = tmp_path / f"{name}.safetensors"
    summary = export_backbone(ours, "torchvision", path, **export_kwargs(ours, name))
    assert summary["arch"] == name and weights_metadata(path)["arch"] == name
    # The README's two lines:
    model = getattr(torchvision.models, name)()
    model.fc = nn.Identity()
    model.load_state_dict(load_file(path), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours(x), rtol=1e-5, atol=1e-5)
    assert model.bn1.num_batches_tracked.item() == 7


def test_torchvision_pt_file_and_timm_twin(tmp_path):
    ours = randomise_(build_backbone("resnet18", image_size=224), seed=3)
    export_backbone(ours, "torchvision", tmp_path / "r18.pt", **export_kwargs(ours, "resnet18"))
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True), strict=True)
    timm = pytest.importorskip("timm")
    export_backbone(ours, "timm", tmp_path / "r18_timm.safetensors", **export_kwargs(ours, "resnet18"))
    twin = timm.create_model("resnet18", pretrained=False, num_classes=0)
    twin.load_state_dict(load_file(tmp_path / "r18_timm.safetensors"), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(name="resnet18", image_size=32), "small-image stem"),
    (dict(name="resnet18", image_size=224, width=0.5), "0.5x wide"),
    (dict(name="resnet18", image_size=224, in_channels=1), "1-channel"),
    (dict(name="resnet50_sk", image_size=224, width=0.25), "stem is not torchvision's"),
    (dict(name="resnet50_sk", image_size=224, width=0.25, resnet_d=False), "SKBottleneck blocks"),
])
def test_torchvision_refuses_what_it_cannot_hold(kwargs, reason, tmp_path):
    name = kwargs.pop("name")
    model = build_backbone(name, **kwargs)
    with pytest.raises(ExportError, match=reason) as info:
        export_backbone(model, "torchvision", tmp_path / "x.safetensors",
                        **export_kwargs(model, name, kwargs.get("in_channels", 3), kwargs["image_size"]))
    assert "use --to safetensors or onnx" in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_safetensors_round_trip_rebuilds_from_metadata(tmp_path):
    ours = randomise_(build_backbone("resnet18", width=0.125, in_channels=1, image_size=32), seed=5)
    export_backbone(ours, "safetensors", tmp_path / "enc.safetensors", width=0.125,
                    **export_kwargs(ours, "resnet18", in_channels=1, image_size=32))
    back = load_exported(tmp_path / "enc.safetensors")
    assert back.num_features == ours.num_features == 64 and back.small_stem
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x))


@pytest.mark.parametrize("name, in_channels, image_size, width", [
    ("resnet18", 3, 96, 0.0625),  # 7x7 stem + max-pool
    ("resnet50", 1, 32, 0.0625),  # small-image stem, bottlenecks, gray input
])
def test_onnx_matches_pytorch(name, in_channels, image_size, width, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ours = randomise_(build_backbone(name, width=width, in_channels=in_channels, image_size=image_size), seed=9)
    path = tmp_path / "enc.onnx"
    summary = export_backbone(ours, "onnx", path, width=width, **export_kwargs(ours, name, in_channels, image_size))
    assert summary["verified"] == "onnxruntime"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["selfsup_backbone"] == name and json.loads(meta["mean"]) == list(export_kwargs(ours, name, in_channels)["mean"])
    for batch in (1, 5):  # dynamic batch axis
        x = torch.randn(batch, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            want = ours(x)
        assert got.shape == (batch, ours.num_features)
        # 1e-4 relative to the output's size: untrained ResNet-50 features reach ~300 here, where
        # float32 rounding alone differs by ~1e-4 absolute.
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


# ------------------------------------------------------------------------------------------------
# The command line on a run folder


def make_run(folder, backbone="resnet18", width=None, image_size=96, in_channels=3, seed=0):
    """A run folder as pretrain writes it (config.yaml, run.json, model.safetensors), without the training."""
    folder.mkdir(parents=True)
    cfg = PretrainConfig(dataset="imagefolder:/nowhere", backbone=backbone, backbone_width=width, image_size=image_size)
    save_yaml(cfg, folder / "config.yaml")
    (folder / "run.json").write_text(json.dumps({"image_size": image_size, "in_channels": in_channels,
                                                 "dataset_mean": [0.5] * in_channels, "dataset_std": [0.25] * in_channels}))
    kw = {} if width is None else {"width": width}
    backbone_model = randomise_(build_backbone(backbone, in_channels=in_channels, image_size=image_size, **kw), seed)
    weights = {f"backbone.{k}": v for k, v in backbone_model.state_dict().items()}
    weights["head.layers.0.weight"] = torch.zeros(4, backbone_model.num_features)  # must not be exported
    save_weights(weights, folder / "model.safetensors")
    return backbone_model


def test_export_cli_torchvision(tmp_path, capsys):
    ours = make_run(tmp_path / "run")
    out = tmp_path / "resnet18.safetensors"
    assert cli.main(["export", "--run", str(tmp_path / "run"), "--to", "torchvision", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["arch"] == "resnet18" and summary["num_features"] == 512
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours(x), rtol=1e-5, atol=1e-5)


def test_export_cli_onnx(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    make_run(tmp_path / "run", width=0.125, in_channels=1, image_size=28)
    assert cli.main(["export", "--run", str(tmp_path / "run"), "--to", "onnx", "--out", str(tmp_path / "e.onnx")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verified"] == "onnxruntime" and summary["max_abs_diff"] <= 1e-3
    assert summary["input"].startswith("images: float32 (batch, 1, 28, 28)")


def test_export_cli_refusal_is_one_line(tmp_path, capsys):
    make_run(tmp_path / "narrow", width=0.0625)
    assert cli.main(["export", "--run", str(tmp_path / "narrow"), "--to", "torchvision",
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0.0625x wide" in err and "--to safetensors or onnx" in err
    assert cli.main(["export", "--run", str(tmp_path / "narrow"), "--to", "safetensors", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(tmp_path / "narrow"), "--to", "safetensors",
                     "--out", str(tmp_path / "enc.safetensors")]) == 0
    assert load_exported(tmp_path / "enc.safetensors").num_features == 32
