"""Hub-style folders (export --to hub, load_encoder / from_pretrained, hubconf.py) and the README's Python API example."""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import selfsup
from selfsup.cli import app as cli
from selfsup.training.runs import load_encoder as run_encoder
from selfsup.training.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "embedded", "--backbone", "resnet18", "--set", "backbone_width=0.0625", "--batch-size", "16",
        "--set", "knn_monitor=false", "--set", "simclr.proj_out_dim=16", "--no-progress"]


@pytest.fixture(scope="module")
def run_and_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    run, hub = root / "run", root / "hub"
    assert cli.main(["pretrain", *TINY, "--steps", "2", "--out", str(run)]) == 0
    assert cli.main(["eval", "knn", "--run", str(run), "--no-progress"]) == 0
    assert cli.main(["export", "--run", str(run), "--to", "hub", "--out", str(hub)]) == 0
    return run, hub


def test_folder_holds_weights_config_and_model_card(run_and_hub):
    run, hub = run_and_hub
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((hub / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["backbone_args"] == {"in_channels": 1, "image_size": 28, "width": 0.0625}
    assert config["image_size"] == 28 and config["in_channels"] == 1 and config["num_features"] == 32
    assert config["mean"] == [0.286] and config["std"] == [0.353]
    card = (hub / "README.md").read_text()
    knn = json.loads((run / "eval_knn.json").read_text())
    assert "pre-trained with SimCLR (Chen, Kornblith, Norouzi and Hinton 2020" in card and "batch size 16" in card and "- steps: 2" in card
    assert f"weighted kNN on frozen features (k=200, temperature 0.1) | embedded | {knn['top1']:.2f}" in card
    assert "licence: a 12,000-image subset of Fashion-MNIST, MIT licence" in card


def test_load_encoder_from_the_folder_alone_and_through_torch_hub(run_and_hub, tmp_path):
    run, hub = run_and_hub
    moved = tmp_path / "elsewhere"
    hub.rename(moved)  # nothing outside the folder is needed
    try:
        x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
        want = selfsup.hub.embed(selfsup.load_encoder(run), x)  # from the run folder itself
        reference = run_encoder(load_run(run)).eval()
        for k, v in selfsup.from_pretrained(moved).state_dict().items():
            assert torch.equal(v, reference.state_dict()[k]), k
        torch.testing.assert_close(selfsup.hub.embed(selfsup.from_pretrained(moved), x), want, rtol=0, atol=0)
        via_hub = torch.hub.load(str(ROOT), "encoder", path=str(moved), source="local")
        torch.testing.assert_close(selfsup.hub.embed(via_hub, x), want, rtol=0, atol=0)
        assert not via_hub.training and via_hub.image_size == 28
    finally:
        moved.rename(hub)


def test_push_one_liner_binds_to_huggingface_hub():
    hf = pytest.importorskip("huggingface_hub")
    guide = (ROOT / "docs" / "how-to" / "export.md").read_text()
    assert 'HfApi().upload_folder(repo_id="USER/NAME", folder_path="hub/pets", repo_type="model")' in guide
    assert 'HfApi().create_repo("USER/NAME", exist_ok=True)' in guide
    inspect.signature(hf.HfApi.create_repo).bind(hf.HfApi(), "USER/NAME", exist_ok=True)
    inspect.signature(hf.HfApi.upload_folder).bind(hf.HfApi(), repo_id="USER/NAME", folder_path="hub/pets",
                                                     repo_type="model")  # not run: no network in tests


def test_readme_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md python block", "exec"), {})
    assert capsys.readouterr().out.strip().endswith("torch.Size([8, 128])")
    assert (tmp_path / "runs" / "notebook" / "model.safetensors").is_file()
