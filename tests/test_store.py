"""``selfsup prepare`` and ``--dataset store:PATH``: a store trains, evaluates and resumes like the folder it came from.

Tiny generated folders (a few dozen images of ~100 px). What is checked: the manifest (counts,
classes, checksums of the shard files); raw pixels bit-identical to the streamed folder's, so a run
from the store ends with the folder run's weights; pre-training and ``selfsup eval`` from the store
through the CLI; a run SIGKILLed and resumed ends with the uninterrupted run's weights; an
interrupted ``prepare`` keeps its finished parts and ends with the same store; bad files follow
``--on-bad-image``; two gloo processes read disjoint halves that together cover an epoch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

if importlib.util.find_spec("streaming") is None or importlib.util.find_spec("simplejpeg") is None:
    pytest.skip("needs the store extra: pip install 'selfsup[store]'", allow_module_level=True)

from selfsup.cli import app as cli  # noqa: E402
from selfsup.data import prepare
from selfsup.training.checkpoint import list_checkpoints, load_weights  # noqa: E402
from selfsup.data.folders import ImageFolderDataset
from selfsup.data.datasets import load_dataset  # noqa: E402
from selfsup.errors import BadImageError  # noqa: E402
from selfsup.data.prepare import prepare_store  # noqa: E402
from selfsup.data.store import StoreDataset  # noqa: E402
from test_bad_images import BAD_FILES  # noqa: E402
from ranks import free_port, torchrun_env  # noqa: E402
from test_kill_resume import _kill_after, _logged, _newest_checkpoint_step  # noqa: E402

SIZE = 72  # > 64, so the folder streams at default_load_size(72) = 82 px, as the store stores it


def _photo(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def make_folder(root: Path, n_train: int = 12, n_val: int = 6) -> Path:
    """root/train/{a,b}/ and root/val/{a,b}/: JPEGs and PNGs of mixed sizes, one EXIF-rotated."""
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            path = root / split / "ab"[i % 2] / f"img{i:03d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = _photo(i + 1000 * (split == "val"), 90 + 7 * i, 86 + (i % 3) * 11)
            if i % 3 == 2:
                img.save(path.with_suffix(".png"))
            else:
                exif = Image.Exif()
                exif[0x0112] = 6 if i == 0 else 1
                img.save(path.with_suffix(".jpg"), quality=92, exif=exif)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def raw_store(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "raw"
    prepare_store(f"imagefolder:{folder}", out, size=SIZE, format="raw", part_size=5, workers=0, progress=False)
    return out


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_prepare_writes_a_manifest_with_counts_classes_and_checksums(raw_store):
    m = json.loads((raw_store / "manifest.json").read_text())
    assert m["size"] == SIZE and m["load_size"] == 82 and m["format"] == "raw" and m["classes"] == ["a", "b"]
    assert {s: i["images"] for s, i in m["splits"].items()} == {"train": 12, "test": 6}
    for split, info in m["splits"].items():
        assert info["shards"] == len(info["checksums"]) == {"train": 3, "test": 2}[split]  # parts of 5 images
        for basename, sha1 in info["checksums"].items():
            assert _sha1(raw_store / split / basename) == sha1
        assert info["bytes"] == sum((raw_store / split / b).stat().st_size for b in info["checksums"])


def test_raw_store_gives_the_streamed_folders_pixels_labels_and_names(folder, raw_store):
    for split, sub in (("train", "train"), ("test", "val")):
        store = load_dataset(f"store:{raw_store}", split)
        ref = ImageFolderDataset(folder / sub, image_size=SIZE, classes=["a", "b"])
        assert len(store) == len(ref) and torch.equal(store.labels, ref.labels)
        for i in range(len(ref)):
            assert torch.equal(store[i][0], ref[i][0]), i
            assert store.name_of(i) == str(ref.files[i].relative_to(folder / sub))


def test_jpeg_store_is_close_to_the_folder_and_smaller(folder, raw_store, tmp_path):
    m = prepare_store(f"imagefolder:{folder}", tmp_path / "j", size=SIZE, workers=0, progress=False)
    raw = json.loads((raw_store / "manifest.json").read_text())
    assert m["splits"]["train"]["bytes"] < raw["splits"]["train"]["bytes"] / 3
    store, ref = StoreDataset(tmp_path / "j"), ImageFolderDataset(folder / "train", image_size=SIZE)
    for i in range(len(ref)):
        a, b = store[i][0], ref[i][0]
        assert a.shape == b.shape == (3, 82, 82) and a.dtype == torch.uint8
        assert (a.float() - b.float()).abs().mean() < 3.0  # quality 90 re-encoding


def test_raw_store_trains_to_the_same_weights_as_its_folder(folder, raw_store, tiny_cfg, tmp_path):
    from selfsup.training.loop import pretrain

    weights = []
    for name in (f"imagefolder:{folder}", f"store:{raw_store}"):
        cfg = tiny_cfg(dataset=name, image_size=SIZE, batch_size=4, steps=3, num_workers=0)
        weights.append(load_weights(pretrain(cfg, tmp_path / name.split(":")[0], progress=False)))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_cli_prepare_then_pretrain_and_eval_from_the_store(folder, tmp_path, capsys):
    store, run = tmp_path / "s", tmp_path / "run"
    assert cli.main(["prepare", f"imagefolder:{folder}", "--out", str(store), "--size", str(SIZE),
                     "--workers", "0", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"store": str(store), "train": 12, "test": 6}
    assert cli.main(["pretrain", "--dataset", f"store:{store}", "--out", str(run), "--steps", "2", "--batch-size", "4",
                     "--no-progress", "--set", "backbone_width=0.0625", "--set", "num_workers=1",
                     "--set", "simclr.proj_out_dim=16", "--set", "knn_monitor=true"]) == 0
    assert (run / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(["eval", "knn", "--run", str(run), "--k", "3", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_train"] == 12 and result["num_test"] == 6 and result["dataset"] == f"store:{store}"
    assert cli.main(["embed", "--run", str(run), "--images", f"store:{store}", "--out", str(tmp_path / "e.csv"),
                     "--num-workers", "0", "--no-progress"]) == 0
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[1].startswith("a/img000.jpg,")  # header + one row per image, by file name


def test_store_errors_are_one_line_with_the_fix(folder, raw_store, tmp_path, capsys):
    assert cli.main(["pretrain", "--dataset", f"store:{tmp_path / 'none'}", "--out", str(tmp_path / "r"),
                     "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a prepared image store" in err and "selfsup prepare imagefolder:PATH" in err
    with pytest.raises(ValueError, match="--size 224"):  # stored at 82 px: 224 px would upscale
        load_dataset(f"store:{raw_store}", image_size=224)
    assert cli.main(["prepare", "cifar10", "--out", str(tmp_path / "x")]) == 2


class Interrupted(Exception):
    pass


def test_an_interrupted_prepare_resumes_keeping_finished_parts(folder, raw_store, tmp_path, monkeypatch):
    out = tmp_path / "s"
    real, calls, interrupt = prepare._write_part, [], [True]

    def interrupt_on_third(part_dir, *args, **kwargs):
        calls.append(part_dir.name)
        if len(calls) == 3 and interrupt and interrupt.pop():
            part_dir.mkdir(parents=True)
            (part_dir / "shard.00000.mds").write_bytes(b"half written")  # a kill mid-part leaves debris
            raise Interrupted  # as a kill would, mid-part
        return real(part_dir, *args, **kwargs)

    monkeypatch.setattr(prepare, "_write_part", interrupt_on_third)
    with pytest.raises(Interrupted):
        prepare_store(f"imagefolder:{folder}", out, size=SIZE, format="raw", part_size=5, workers=0, progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="prepare did not finish"):
        StoreDataset(out)
    first = (out / "train" / "part-00000" / "done.json").stat().st_mtime_ns
    calls.clear()
    prepare_store(f"imagefolder:{folder}", out, size=SIZE, format="raw", part_size=5, workers=0, progress=False)
    assert calls == ["part-00002", "part-00000", "part-00001"]  # train's third part, then the test split
    assert (out / "train" / "part-00000" / "done.json").stat().st_mtime_ns == first
    for split in ("train", "test"):
        a, b = StoreDataset(out, split), StoreDataset(raw_store, split)
        assert [a.sample(i) for i in range(len(a))] == [b.sample(i) for i in range(len(b))]
    with pytest.raises(ValueError, match="choose a new --out"):  # a finished store is not overwritten
        prepare_store(f"imagefolder:{folder}", out, size=SIZE, format="jpeg", part_size=5, workers=0, progress=False)
    with pytest.raises(ValueError, match="other settings"):  # nor is an unfinished one resumed with other settings
        (out / "manifest.json").unlink()
        prepare_store(f"imagefolder:{folder}", out, size=SIZE, format="jpeg", part_size=5, workers=0, progress=False)


def test_bad_files_follow_the_policy(tmp_path, capsys):
    root = make_folder(tmp_path / "photos", n_train=6, n_val=0)
    for name, (data, _) in BAD_FILES.items():
        (root / "train" / "b" / name).write_bytes(data)
    with pytest.raises(BadImageError, match="--on-bad-image skip"):
        prepare_store(f"imagefolder:{root}", tmp_path / "e", size=SIZE, workers=0, progress=False)
    assert not (tmp_path / "e" / "train").exists()  # refused before anything was written
    assert cli.main(["prepare", f"imagefolder:{root}", "--out", str(tmp_path / "e2"), "--workers", "0",
                     "--no-progress"]) == 2
    assert "not usable images" in capsys.readouterr().err
    m = prepare_store(f"imagefolder:{root}", tmp_path / "s", size=SIZE, on_bad_image="skip", workers=0, progress=False)
    info = m["splits"]["train"]
    assert info["images"] == 6 and info["files_found"] == 6 + len(BAD_FILES)
    assert sorted(Path(b["file"]).name for b in info["bad"]) == sorted(BAD_FILES)
    assert len(StoreDataset(tmp_path / "s")) == 6


# ------------------------------------------------------------------------------------------------
# SIGKILL and --resume from a store (as tests/test_kill_resume.py, one kill)

TOTAL, EVERY = 12, 3


def _start(store: Path, run: Path, resume: bool) -> subprocess.Popen:
    args = ["pretrain", "--dataset", f"store:{store}", "--steps", str(TOTAL), "--batch-size", "4", "--checkpoint-every",
            str(EVERY), "--seed", "5", "--no-progress", "--set", "backbone_width=0.0625", "--set", "simclr.proj_out_dim=16",
            "--set", "knn_monitor=false", "--set", "log_every=1", "--set", "num_workers=1", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "selfsup", *args] + (["--resume", str(run)] if resume else [])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_store_run_killed_and_resumed_ends_with_the_uninterrupted_weights(raw_store, tmp_path):
    reference = _start(raw_store, tmp_path / "reference", resume=False)
    run = tmp_path / "killed"
    proc = _start(raw_store, run, resume=False)
    assert _kill_after(proc, run, 7, 0.02), "the run finished before it could be killed"
    assert max(_logged(run)) - _newest_checkpoint_step(run) <= EVERY
    proc = _start(raw_store, run, resume=bool(list_checkpoints(run)))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-2000:]
    assert _logged(run) == _logged(tmp_path / "reference")
    a, b = load_weights(run / "model.safetensors"), load_weights(tmp_path / "reference" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Two gloo processes: disjoint shares that together cover the epoch

N_ID, BATCH = 24, 8


def _id_folder(root: Path) -> Path:
    """Flat folder of constant-colour PNGs: image i has red value 10 * i, so a pixel names the image."""
    root.mkdir(parents=True)
    for i in range(N_ID):
        Image.new("RGB", (80, 80), (10 * i, 0, 0)).save(root / f"{i:03d}.png")
    return root


def _shard_worker(rank: int, world: int, port: int, store: str, out_dir: str) -> None:
    torchrun_env(rank, world, port)
    import torch.distributed as tdist

    from selfsup.training.batches import batch_stream

    tdist.init_process_group("gloo")
    try:
        ds = load_dataset(f"store:{store}")
        seen = [b[:, 0, 0, 0].tolist() for b in batch_stream(ds, BATCH, 11, 0, N_ID // BATCH, 1, torch.device("cpu"))]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_read_disjoint_shares_covering_the_epoch(tmp_path):
    from selfsup.training.batches import step_indices

    store = tmp_path / "s"
    prepare_store(f"imagefolder:{_id_folder(tmp_path / 'ids')}", store, size=64, format="raw", workers=0, progress=False)
    mp.spawn(_shard_worker, args=(2, free_port(), str(store), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ids = [[[v // 10 for v in step] for step in rank] for rank in seen]
    for step in range(N_ID // BATCH):
        assert len(ids[0][step]) == len(ids[1][step]) == BATCH // 2
        assert not set(ids[0][step]) & set(ids[1][step])
        assert ids[0][step] + ids[1][step] == step_indices(N_ID, BATCH, 11, step).tolist()  # the global batch
    assert sorted(i for rank in ids for step in rank for i in step) == list(range(N_ID))  # the whole epoch


def test_a_file_that_fails_to_decode_stops_error_then_resume_with_skip_leaves_it_out(folder, tmp_path, monkeypatch):
    """Damage the scan cannot see: "error" names the file; the same command with skip resumes and reports it."""
    real = prepare.decode_image

    def damaged(path, *args):
        if path.name == "img004.jpg" and "train" in str(path):
            raise OSError(f"could not decode image {path}: broken data stream")
        return real(path, *args)

    monkeypatch.setattr(prepare, "decode_image", damaged)
    out = tmp_path / "s"
    with pytest.raises(BadImageError, match="img004.jpg.*--on-bad-image skip"):
        prepare_store(f"imagefolder:{folder}", out, size=SIZE, format="raw", part_size=2, workers=0, progress=False)
    assert (out / "train" / "part-00000" / "done.json").is_file()  # the part before it is kept
    m = prepare_store(f"imagefolder:{folder}", out, size=SIZE, format="raw", part_size=2, on_bad_image="skip",
                      workers=0, progress=False)
    assert m["splits"]["train"]["images"] == 11
    assert [Path(b["file"]).name for b in m["splits"]["train"]["bad"]] == ["img004.jpg"]
    assert "img004.jpg" not in {StoreDataset(out).name_of(i).split("/")[-1] for i in range(11)}
