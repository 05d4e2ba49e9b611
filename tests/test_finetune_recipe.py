"""`selfsup finetune --run RUN` takes its fine-tuning values from a recipe chosen from the pre-training run.

SimCLRv2 (Chen et al. 2020b, App. B) fine-tunes wide and SK encoders with LARS, lr 0.005 x sqrt(B) at batch 1024,
no weight decay, from the head's first layer, 60 epochs with 1% of the labels and 30 with 10%. The numbers below are
the paper's, written out, not read from ``selfsup.methods.recipes``, so a change to the recipe fails here. Nothing is
fine-tuned at batch 1024: the resolved config is checked (``build_config``, or the CLI with ``finetune`` replaced).
"""
import contextlib
import dataclasses
import io
import json

import pytest

from selfsup.cli import semisup
from selfsup.cli.app import main
from selfsup.protocols.finetune import FinetuneConfig, crop_flip_view
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.training.schedules import scaled_lr

PAPER = {"batch_size": 1024, "optim": ("lars", 0.005, "sqrt", 0.0), "epochs_1pct": 60.0, "epochs_10pct": 30.0,
         "from_head_layer": 1}

# One tiny pre-training run per kind: the recipe follows the run's recipe name or its encoder's name, so the
# wide and SK encoders are built at 1/16 width (the name, not the width, makes them SimCLRv2's encoders).
RUNS = {
    "simclrv2": {"method": "simclrv2", "recipe": "simclrv2", "backbone": "resnet18", "backbone_width": 0.0625},
    "wide": {"method": "simclr", "recipe": "cpu", "backbone": "resnet50_2x", "backbone_width": 0.0625},
    "sk": {"method": "simclr", "recipe": "cpu", "backbone": "resnet50_sk", "backbone_width": 0.0625},
    "cpu": {"method": "simclr", "recipe": "cpu", "backbone": "resnet18_narrow"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from selfsup.training.loop import pretrain

    root = tmp_path_factory.mktemp("finetune-recipe")
    out = {}
    for kind, values in RUNS.items():
        cfg = build_config(PretrainConfig, {"dataset": "embedded", "batch_size": 8, "steps": 1, "knn_monitor": False,
                                            values["method"]: {"proj_out_dim": 16, "proj_hidden_dim": 24},
                                            "channels_last": False, **values})
        pretrain(cfg, root / kind, progress=False)
        out[kind] = root / kind
    return out


def _cli_config(monkeypatch, tmp_path, argv: list[str]) -> FinetuneConfig:
    """The config ``selfsup finetune ARGV`` would fine-tune with (``finetune`` itself replaced)."""
    seen = {}

    def capture(cfg, run_dir, resume=False, progress=True):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(semisup, "finetune", capture)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["finetune", *argv, "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    return seen["cfg"]


def _assert_paper_optimiser(cfg: FinetuneConfig) -> None:
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.weight_decay) == PAPER["optim"]
    assert cfg.optim.warmup_fraction == 0.0 and cfg.optim.warmup_epochs is None


@pytest.mark.parametrize("fraction,epochs", [(0.01, PAPER["epochs_1pct"]), (0.1, PAPER["epochs_10pct"])])
@pytest.mark.parametrize("kind", ["simclrv2", "wide", "sk"])
def test_simclrv2_wide_and_sk_runs_resolve_the_papers_finetuning(runs, kind, fraction, epochs):
    cfg = build_config(FinetuneConfig, {"run": str(runs[kind]), "label_fraction": fraction})
    assert cfg.recipe == "simclrv2"
    assert cfg.batch_size == PAPER["batch_size"]
    _assert_paper_optimiser(cfg)
    assert scaled_lr(cfg.optim.lr, cfg.batch_size, cfg.optim.lr_scaling) == pytest.approx(0.16)  # 0.005 x sqrt(1024)
    assert cfg.epochs == epochs and cfg.steps is None
    assert cfg.from_head_layer == PAPER["from_head_layer"]


def test_the_cli_resolves_the_recipe_and_explicit_flags_win(runs, tmp_path, monkeypatch):
    run = str(runs["wide"])
    cfg = _cli_config(monkeypatch, tmp_path, ["--run", run, "--label-fraction", "0.01"])
    assert (cfg.recipe, cfg.batch_size, cfg.epochs, cfg.from_head_layer) == ("simclrv2", 1024, 60.0, 1)
    _assert_paper_optimiser(cfg)

    cfg = _cli_config(monkeypatch, tmp_path, ["--run", run, "--label-fraction", "0.01", "--batch-size", "64"])
    assert cfg.recipe == "simclrv2" and cfg.batch_size == 64  # the flag wins; the rest is the recipe's
    assert (cfg.epochs, cfg.from_head_layer) == (60.0, 1)
    _assert_paper_optimiser(cfg)

    cfg = _cli_config(monkeypatch, tmp_path, ["--run", run, "--steps", "3", "--from-head-layer", "0",
                                              "--set", "optim.lr=0.01", "--set", "optim.weight_decay=0.0001"])
    assert (cfg.steps, cfg.epochs, cfg.from_head_layer, cfg.batch_size) == (3, None, 0, 1024)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.weight_decay) == ("lars", 0.01, "sqrt", 1e-4)

    cfg = _cli_config(monkeypatch, tmp_path, ["--run", run, "--epochs", "5", "--set", "recipe=default"])
    assert (cfg.recipe, cfg.batch_size, cfg.epochs, cfg.optim) == ("default", 256, 5.0, None)


def test_a_cpu_run_fine_tunes_exactly_as_before(runs, tmp_path, monkeypatch):
    run = str(runs["cpu"])
    cfg = build_config(FinetuneConfig, {"run": run})
    assert cfg.recipe == "default"
    assert dataclasses.replace(cfg, recipe=None) == FinetuneConfig(run=run)  # the defaults, untouched
    assert (cfg.batch_size, cfg.optim, cfg.epochs, cfg.from_head_layer) == (256, None, None, None)
    cfg = _cli_config(monkeypatch, tmp_path, ["--run", run, "--label-fraction", "0.01"])
    assert dataclasses.replace(cfg, recipe=None) == FinetuneConfig(run=run, label_fraction=0.01, view=crop_flip_view())
    assert cfg.recipe == "default"


@pytest.mark.parametrize("kind,recipe", [("simclrv2", "simclrv2"), ("cpu", "default")])
def test_finetune_prints_the_recipe_first_and_records_it(runs, kind, recipe, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--run", str(runs[kind]), "--label-fraction", "0.01", "--steps", "1", "--batch-size", "8",
                 "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0].startswith(f"[selfsup] fine-tuning recipe {recipe}: ")
    assert "batch 8" in captured.err.splitlines()[0]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["recipe"] == recipe
    assert json.loads((out / "results.json").read_text())["recipe"] == recipe
    assert json.loads((out / "run.json").read_text())["recipe"] == recipe
    assert f"recipe: {recipe}" in (out / "config.yaml").read_text().splitlines()
