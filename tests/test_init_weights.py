"""selfsup pretrain --init: torchvision/timm state dicts, safetensors, earlier runs; errors name the tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
import yaml

from selfsup.cli import app as cli
from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import save_weights
from selfsup.training.init_weights import InitError, load_init
from selfsup.training.runs import load_encoder, load_run
from selfsup.training.setup import build_model
from selfsup.training.loop import pretrain

TINY = ["--dataset", "embedded", "--backbone", "resnet18", "--set", "backbone_width=0.0625", "--batch-size", "16",
        "--set", "knn_monitor=false", "--set", "simclr.proj_out_dim=16", "--set", "precision=fp32", "--no-progress"]


def test_torchvision_state_dict_file_loads_and_drops_the_classifier(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18-imagenet.pth")  # as torchvision's weights files
    backbone = build_backbone("resnet18", in_channels=3, image_size=224)
    record = load_init(backbone, tmp_path / "resnet18-imagenet.pth")
    assert record["dropped_classifier"] == ["fc.bias", "fc.weight"] and record["prefix_removed"] == ""
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k


def test_timm_state_dict_and_wrapped_names(tmp_path):
    timm = pytest.importorskip("timm")
    reference = timm.create_model("resnet18", pretrained=False)
    state = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}  # a training script's file
    torch.save(state, tmp_path / "timm.pt")
    backbone = build_backbone("timm:resnet18", in_channels=3, image_size=64)
    record = load_init(backbone, tmp_path / "timm.pt")
    assert record["prefix_removed"] == "module."
    assert torch.equal(backbone.model.conv1.weight, reference.conv1.weight)


def test_mismatches_name_the_first_tensor(tmp_path):
    backbone = build_backbone("resnet18", in_channels=1, image_size=28, width=0.0625)
    state = backbone.state_dict()
    wide = {k: v for k, v in build_backbone("resnet18", in_channels=1, image_size=28, width=0.125).state_dict().items()}
    save_weights(wide, tmp_path / "wide.safetensors")
    with pytest.raises(InitError, match=r"tensor 'conv1.weight' has shape \(8, 1, 3, 3\) in the file but \(4, 1, 3, 3\)"):
        load_init(backbone, tmp_path / "wide.safetensors")
    save_weights({f"encoder_q.{k}": v for k, v in state.items()}, tmp_path / "prefixed.safetensors")
    with pytest.raises(InitError, match=r"the encoder's tensor 'conv1.weight' is not in the file .*'encoder_q.conv1.weight'"):
        load_init(backbone, tmp_path / "prefixed.safetensors")
    save_weights({**state, "layer5.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(InitError, match="tensor 'layer5.weight' in the file has no place"):
        load_init(backbone, tmp_path / "extra.safetensors")


def test_pickled_objects_are_refused_unrun(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "why": torch.nn.ReLU()}, tmp_path / "objects.pt")
    with pytest.raises(InitError, match="were not loaded, since unpickling them could run code"):
        load_init(build_backbone("resnet18", in_channels=1, image_size=28), tmp_path / "objects.pt")


def test_cli_init_from_a_run_is_recorded_and_not_reapplied_on_resume(tmp_path, capsys):
    src, run = tmp_path / "src", tmp_path / "run"
    assert cli.main(["pretrain", *TINY, "--steps", "2", "--out", str(src)]) == 0
    assert cli.main(["pretrain", *TINY, "--steps", "2", "--out", str(run), "--init", str(src)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["init"] == str(src)
    record = json.loads((run / "init.json").read_text())
    assert record["file"] == str(src / "model.safetensors") and record["prefix_removed"] == "backbone."
    # The run started from src's encoder (the heads start fresh): rebuilt with the same init, they agree.
    cfg = load_run(run).config
    started = build_model(cfg, 1, 28, init=str(src)).backbone
    for k, v in load_encoder(load_run(src)).state_dict().items():
        assert torch.equal(started.state_dict()[k], v), k
    assert cli.main(["pretrain", *TINY, "--steps", "2", "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "none")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_resume_continues_from_the_checkpoint_not_the_init_source(tmp_path, tiny_cfg):
    src = tmp_path / "src"
    pretrain(tiny_cfg(steps=2, precision="fp32"), src, progress=False)
    moved = tmp_path / "moved"

    def stop(step):
        if step == 4:  # after the checkpoint of step 3
            raise KeyboardInterrupt

    cfg = tiny_cfg(init=str(src), precision="fp32")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "a", progress=False, on_step=stop)
    shutil.move(src, moved)  # resume must not read the init source again
    pretrain(cfg, tmp_path / "a", resume=True, progress=False)
    shutil.move(moved, src)
    pretrain(cfg, tmp_path / "b", progress=False)
    a, b = load_run(tmp_path / "a").weights, load_run(tmp_path / "b").weights
    assert all(torch.equal(a[k], b[k]) for k in a)
