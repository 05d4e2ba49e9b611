"""A new user's first runs on tiny generated folders: each ends in a result or in one line naming the fix.

A labelled folder without ``val/`` (kNN monitor and ``eval`` on a held-out part of the training images),
a run trained with bad images skipped, ``--resume`` of something that is not a run, a run without a
length, an unknown method, extending a finished run, float images under Lightning, what a failed
command leaves behind, and the smaller messages and defaults of exports, ``prepare`` and image folders.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import app as cli
from selfsup.data.datasets import load_dataset
from selfsup.data.holdout import HOLDOUT_FRACTION, holdout_split
from selfsup.training.schedules import warmup_cosine

TINY = ["--batch-size", "8", "--no-progress", "--recipe", "cpu", "--backbone", "resnet18", "--set", "backbone_width=0.0625",
        "--set", "image_size=16", "--set", "simclr.proj_out_dim=16", "--set", "precision=fp32", "--set", "num_workers=0",
        "--set", "log_every=1"]


def write_folder(root: Path, per_class: int = 12, classes=("cat", "dog"), size: int = 40) -> Path:
    """``root/<class>/<i>.jpg``: smooth random colour fields, different for every image; no val/ split."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            path = root / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(100 * c + i)
            small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)
    return root


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    """The last stderr line, after checking it is the CLI's one-line error (no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("selfsup: error: "), err
    return line


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

def pretrain_and_evaluate_held_out(dataset: str, steps: int, kind: str, run: Path, capsys) -> dict:
    """Pre-train on a data set without a test split (the kNN monitor must say it held images out),
    then ``selfsup eval KIND`` on the run; returns the result JSON."""
    code, _, err = run_cli(["pretrain", "--dataset", dataset, "--out", run, "--steps", str(steps), *TINY], capsys)
    assert code == 0, err
    assert any(r.get("knn_queries") == "held out of the training images" for r in metrics(run))
    code, out, err = run_cli(["eval", kind, "--run", run, "--no-progress"], capsys)
    assert code == 0, err
    return json.loads(out)



@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Two class folders of 12 JPEGs (no val/) and a 2-step run on them (kNN monitor off)."""
    root = tmp_path_factory.mktemp("first")
    folder = write_folder(root / "mini")
    run = root / "run"
    assert cli.main(["pretrain", "--dataset", f"imagefolder:{folder}", "--out", str(run), "--steps", "2", *TINY,
                     "--set", "knn_monitor=false"]) == 0
    return folder, run


# ------------------------------------------------------------------------------------------------
# No val/ split: the kNN monitor and eval hold out part of the training images


def test_holdout_split_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [-1] * 3)
    kept, held = holdout_split(labels, HOLDOUT_FRACTION, seed=3)
    assert set(kept.tolist()).isdisjoint(held.tolist()) and len(kept) + len(held) == len(labels)
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]  # 20% of 10, at least 1 of 5, none of 1
    assert torch.equal(held, holdout_split(labels, HOLDOUT_FRACTION, seed=3)[1])
    assert not torch.equal(held, holdout_split(labels, HOLDOUT_FRACTION, seed=4)[1])


def test_knn_monitor_without_val_holds_out_training_images(mini, tmp_path, capsys):
    folder, _ = mini
    run = tmp_path / "r"
    code, _, err = run_cli(["pretrain", "--dataset", f"imagefolder:{folder}", "--out", run, "--steps", "3", *TINY], capsys)
    assert code == 0, err
    assert "held out of the training split" in err
    rows = [r for r in metrics(run) if "knn_top1" in r]
    assert [r["step"] for r in rows] == [3]  # the end of the first (and only) epoch: no crash, a result
    assert rows[0]["knn_queries"] == "held out of the training images"


def test_knn_monitor_steps_aside_when_nothing_can_be_held_out(tmp_path, capsys):
    folder = write_folder(tmp_path / "two", per_class=1)
    code, _, err = run_cli(["pretrain", "--dataset", f"imagefolder:{folder}", "--out", tmp_path / "r", "--steps", "1",
                            *TINY, "--batch-size", "2"], capsys)
    assert code == 0, err
    assert "the kNN monitor is off" in err
    assert not any("knn_top1" in r for r in metrics(tmp_path / "r"))


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_eval_without_val_uses_a_stated_held_out_part(mini, protocol, capsys):
    folder, run = mini
    code, out, err = run_cli(["eval", protocol, "--run", run, "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["test_split"] == "held out from the training images" and result["holdout_fraction"] == HOLDOUT_FRACTION
    assert (result["num_train"], result["num_test"]) == (20, 4)  # round(0.2 x 12) = 2 of each class held out
    assert json.loads((run / f"eval_{protocol}.json").read_text())["test_split"] == result["test_split"]


def test_knn_monitor_and_eval_on_a_single_hf_dataset(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import io

    train = load_dataset("embedded", "train")
    path = tmp_path / "single"  # a single Dataset's save_to_disk folder: no dataset_dict.json, no test split
    path.mkdir()
    encoded = []
    for im in train.images[:32]:
        buf = io.BytesIO()
        Image.fromarray(im[0].numpy()).save(buf, format="PNG")
        encoded.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"image": pa.array(encoded, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array([int(v) for v in train.labels[:32]], pa.int64())})
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {
        "image": {"_type": "Image"}, "label": {"names": train.classes, "_type": "ClassLabel"}}}))
    result = pretrain_and_evaluate_held_out(f"hf:{path}", 4, "knn", tmp_path / "r", capsys)
    assert result["test_split"] == "held out from the training images"


# ------------------------------------------------------------------------------------------------
# A run trained with bad images skipped is evaluated and embedded with the same policy


def test_eval_and_embed_follow_the_runs_bad_image_policy(tmp_path, capsys):
    folder = write_folder(tmp_path / "photos")
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    run = tmp_path / "r"
    code, _, err = run_cli(["pretrain", "--dataset", f"imagefolder:{folder}", "--out", run, "--steps", "2",
                            "--on-bad-image", "skip", *TINY, "--set", "knn_monitor=false"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", "knn", "--run", run, "--no-progress"], capsys)  # the run's policy: skip
    assert code == 0, err
    assert json.loads(out)["num_train"] + json.loads(out)["num_test"] == 24
    line = one_line_error(*run_cli(["eval", "knn", "--run", run, "--no-progress", "--on-bad-image", "error"], capsys)[::2])
    assert "broken.jpg" in line and "--on-bad-image skip" in line and "train without them" not in line
    code, out, err = run_cli(["embed", "--run", run, "--images", folder, "--out", tmp_path / "e.npy", "--no-progress",
                              "--num-workers", "0"], capsys)
    assert code == 0, err
    assert json.loads(out)["skipped"] == ["cat/broken.jpg"]
    line = one_line_error(*run_cli(["embed", "--run", run, "--images", folder, "--out", tmp_path / "f.npy",
                                    "--no-progress", "--num-workers", "0", "--on-bad-image", "error"], capsys)[::2])
    assert "broken.jpg" in line and "--on-bad-image skip" in line


def test_prepare_bad_file_error_speaks_of_the_store(tmp_path, capsys):
    folder = write_folder(tmp_path / "photos", per_class=2)
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    line = one_line_error(*run_cli(["prepare", f"imagefolder:{folder}", "--out", tmp_path / "store", "--size", "16",
                                    "--no-progress"], capsys)[::2])
    assert "broken.jpg" in line and "--on-bad-image skip to prepare the store without them" in line
    assert "train" not in line.split("--on-bad-image")[-1]


# ------------------------------------------------------------------------------------------------
# Mistakes on the command line: one line, before any work, nothing created


def test_resume_of_a_missing_or_non_run_folder_is_refused_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "notarun"
    line = one_line_error(*run_cli(["pretrain", "--resume", missing, "--no-progress"], capsys)[::2])
    assert "--resume" in line and "no such folder" in line and f"--out {missing}" in line
    assert not missing.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a run")
    line = one_line_error(*run_cli(["pretrain", "--resume", other, "--no-progress"], capsys)[::2])
    assert "not a run folder" in line
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_run_without_a_length_is_refused_naming_the_three_flags(tmp_path, dry_run, capsys):
    argv = ["pretrain", "--dataset", "embedded", "--out", tmp_path / "r"] + (["--dry-run"] if dry_run else [])
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert "--steps" in line and "--epochs" in line and "--minutes" in line
    assert not (tmp_path / "r").exists()


def test_unknown_method_is_named_with_the_registered_ones(tmp_path, capsys):
    line = one_line_error(*run_cli(["pretrain", "--method", "mocov3", "--dataset", "embedded", "--out", tmp_path / "r",
                                    "--steps", "1"], capsys)[::2])
    assert "'mocov3'" in line and "simclr" in line and "byol" in line and "recipe" not in line
    line = one_line_error(*run_cli(["pretrain", "--method", "byl", "--dataset", "embedded", "--out", tmp_path / "r",
                                    "--steps", "1"], capsys)[::2])
    assert "did you mean 'byol'" in line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# Extending a finished run


def test_resume_with_a_longer_length_extends_the_run(tmp_path, capsys):
    run = tmp_path / "r"
    base = ["--dataset", "embedded", *TINY, "--set", "knn_monitor=false"]
    assert run_cli(["pretrain", *base, "--out", run, "--steps", "2"], capsys)[0] == 0
    line = one_line_error(*run_cli(["pretrain", "--resume", run, "--no-progress"], capsys)[::2])
    assert "already finished" in line and "--steps" in line
    line = one_line_error(*run_cli(["pretrain", "--resume", run, "--steps", "1", "--no-progress"], capsys)[::2])
    assert "at step 2" in line
    code, _, err = run_cli(["pretrain", "--resume", run, "--steps", "5", "--no-progress"], capsys)
    assert code == 0, err
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    info = json.loads((run / "run.json").read_text())
    assert info["total_steps"] == 5 and info["length_changes"] == [{"from_step": 2, "total_steps_before": 2}]
    assert "steps: 5" in (run / "config.yaml").read_text()
    # From the resume point the schedule is the 5-step one (lr logged at step s is the lr of step s - 1).
    base_lr, warmup = info["base_lr"], info["warmup_steps"]
    for r in rows[2:]:
        assert r["lr"] == pytest.approx(warmup_cosine(r["step"] - 1, 5, warmup, base_lr, 0.0))
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 5


# ------------------------------------------------------------------------------------------------
# What a failed command leaves behind, and reusing a folder


def test_a_failed_run_removes_only_what_it_created(tmp_path, capsys):
    argv = ["pretrain", "--dataset", "embedded", "--steps", "1", *TINY, "--batch-size", "20000"]  # larger than the data
    one_line_error(*run_cli([*argv, "--out", tmp_path / "a" / "b" / "r"], capsys)[::2])
    assert not (tmp_path / "a").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(*run_cli([*argv, "--out", empty], capsys)[::2])
    assert empty.is_dir() and not any(empty.iterdir())


def test_a_run_that_fails_once_started_keeps_its_folder_for_resume(tmp_path, tiny_cfg):
    from selfsup.training.loop import pretrain

    def fail(step):
        raise RuntimeError("the machine broke")

    with pytest.raises(RuntimeError):
        pretrain(tiny_cfg(checkpoint_every=1000), tmp_path / "r", progress=False, on_step=fail)
    assert (tmp_path / "r" / "config.yaml").is_file() and (tmp_path / "r" / "metrics.jsonl").is_file()
    pretrain(tiny_cfg(checkpoint_every=1000), tmp_path / "r", resume=True, progress=False)  # from step 0
    assert (tmp_path / "r" / "model.safetensors").is_file()


def test_a_folder_holding_files_is_reused_only_through_resume(tmp_path, capsys):
    crashed = tmp_path / "crashed"  # what a run killed before its first checkpoint leaves
    crashed.mkdir()
    (crashed / "config.yaml").write_text("method: simclr\n")
    line = one_line_error(*run_cli(["pretrain", "--dataset", "embedded", "--out", crashed, "--steps", "1", *TINY],
                                   capsys)[::2])
    assert f"--resume {crashed}" in line and "config.yaml" in line
    assert [p.name for p in crashed.iterdir()] == ["config.yaml"]


# ------------------------------------------------------------------------------------------------
# Smaller: image size default, export message


def test_image_folders_default_to_64_px_with_a_narrow_cpu_encoder(mini, tmp_path, capsys):
    folder, _ = mini
    argv = ["pretrain", "--dataset", f"imagefolder:{folder}", "--out", tmp_path / "r", "--steps", "1",
            "--batch-size", "8", "--dry-run"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "backbone: resnet18_narrow" in out and "\nimage_size: 64\n" in out
    code, out, err = run_cli([*argv, "--backbone", "resnet18"], capsys)
    assert code == 0, err
    assert "# image_size: 224" in out


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="could not import timm")
def test_export_to_timm_of_a_narrow_encoder_speaks_of_timm(mini, tmp_path, capsys):
    _, run = mini
    line = one_line_error(*run_cli(["export", "--run", run, "--to", "timm", "--out", tmp_path / "e.pt"], capsys)[::2])
    assert "timm" in line.split("--to timm", 1)[1] and "torchvision" not in line


# ------------------------------------------------------------------------------------------------
# Lightning: float images, plain tensors and (images, labels)


def test_lightning_takes_float_images_and_refuses_what_it_cannot_use(tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from selfsup.errors import DataError
    from selfsup.lightning import SimCLRModule, check_image_batch

    module = SimCLRModule(backbone="resnet18", backbone_width=0.0625, batch_size=8, simclr={"proj_out_dim": 16}, precision="fp32",
                          in_channels=3, image_size=16)
    x = torch.rand(8, 3, 20, 20)
    for data in (TensorDataset(x), TensorDataset(x, torch.zeros(8, dtype=torch.long)), x):
        trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, DataLoader(data, batch_size=8))
        assert trainer.global_step == 1
    with pytest.raises(DataError, match=r"must be in \[0, 1\]"):
        check_image_batch(x * 255)
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        check_image_batch(torch.rand(8, 20, 20))


def test_a_run_stopped_in_its_final_save_still_finishes_on_resume(tmp_path, tiny_cfg):
    from selfsup.training.loop import pretrain

    run = tmp_path / "r"
    pretrain(tiny_cfg(steps=3), run, progress=False)
    (run / "train_summary.json").unlink()  # killed after the last checkpoint, before the summary
    (run / "model.safetensors").unlink()
    pretrain(tiny_cfg(steps=3), run, resume=True, progress=False)
    assert (run / "model.safetensors").is_file() and json.loads((run / "train_summary.json").read_text())["steps"] == 3


def test_knn_monitor_and_eval_on_a_store_without_a_test_split(mini, tmp_path, capsys):
    folder, _ = mini
    store = tmp_path / "store"
    code, _, err = run_cli(["prepare", f"imagefolder:{folder}", "--out", store, "--size", "16", "--format", "raw",
                            "--no-progress"], capsys)
    assert code == 0, err
    result = pretrain_and_evaluate_held_out(f"store:{store}", 3, "linear", tmp_path / "r", capsys)
    assert result["test_split"] == "held out from the training images" and result["num_test"] == 4
