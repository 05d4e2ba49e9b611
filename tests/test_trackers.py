"""--logger: TensorBoard + metrics.jsonl by default, CSV, W&B (offline) and MLflow (local file store); resume continues the tracker run."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from selfsup.cli import app as cli
from selfsup.errors import ConfigError
from selfsup.training.trackers import TrackerError, open_trackers
from selfsup.training.loop import pretrain


def _stop_at(n):
    def stop(step):
        if step == n:
            raise KeyboardInterrupt
    return stop


def test_default_is_tensorboard_and_jsonl_and_csv_resumes_cleanly(tmp_path, tiny_cfg):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    pretrain(tiny_cfg(steps=2), run, progress=False)
    assert (run / "metrics.jsonl").is_file() and any((run / "tb").iterdir()) and not (run / "metrics.csv").exists()

    cfg = tiny_cfg(logger="csv")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "csv", progress=False, on_step=_stop_at(5))  # checkpoint at 3, rows for 1..4 written
    pretrain(cfg, tmp_path / "csv", resume=True, progress=False)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["name"] == "loss"]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint were dropped, not duplicated
    assert not (tmp_path / "csv" / "tb").exists()


def test_wandb_offline_and_mlflow_continue_the_same_run_on_resume(tmp_path, tiny_cfg, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "wandb").mkdir()
    run = tmp_path / "run"
    cfg = tiny_cfg(logger="wandb,mlflow")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, run, progress=False, on_step=_stop_at(5))
    first = json.loads((run / "trackers.json").read_text())
    pretrain(cfg, run, resume=True, progress=False)
    second = json.loads((run / "trackers.json").read_text())
    assert second == first

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("selfsup").experiment_id])
    assert [r.info.run_id for r in runs] == [first["mlflow"]["run_id"]]  # one tracker run, not two
    history = client.get_metric_history(first["mlflow"]["run_id"], "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]
    assert runs[0].data.params["batch_size"] == "16" and runs[0].info.status == "FINISHED"

    offline = sorted(p.name for p in (tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(first["wandb"]["id"]) for name in offline), offline


def test_unknown_or_missing_trackers_are_user_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="logger: 'wandbb' is not one of .*did you mean 'wandb'"):
        cli._pretrain_config(cli.build_parser().parse_args(["pretrain", "--logger", "csv,wandbb"]))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(TrackerError, match=r"pip install 'selfsup\[wandb\]'"):
        open_trackers("wandb", tmp_path, {})
    code = cli.main(["pretrain", "--dataset", "embedded", "--out", str(tmp_path / "r"), "--steps", "1",
                     "--logger", "wandb", "--no-progress", "--backbone", "resnet18", "--set", "backbone_width=0.0625",
                     "--batch-size", "8", "--set", "knn_monitor=false"])
    assert code == 2 and "needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work
