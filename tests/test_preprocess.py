"""One preprocessing for every path: the same images give the same features, whichever way they are read.

A Fashion-MNIST subset (the idx files when installed, else the embedded sample) is written as idx files
and as image folders (gray PNGs, RGB PNGs of the gray images, RGB JPEGs); evaluation, the kNN monitor's
extraction, ``selfsup embed``, ``selfsup.hub.embed`` and the encoders ``load_encoder`` / ``from_pretrained``
give back must all compute ``encoder(prepare_images(pixels))`` with the statistics of the run, on the
pixels each path decodes (for JPEGs: the decoded JPEG's pixels).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datasets import load_dataset
from selfsup.errors import DataNotFoundError
from selfsup.evaluation.preprocess import Preprocessing, match_channels, prepare_images

N_TRAIN, N_TEST = 200, 100
FOLDER_KINDS = ("gray_png", "rgb_png", "rgb_jpeg")


def fashion_mnist_subset(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 28, 28) uint8, labels)`` ordered by class, then position (the order a folder lists them)."""
    try:
        ds = load_dataset("fashion-mnist", split)
    except DataNotFoundError:
        ds = load_dataset("embedded", split)
    images, labels = ds.images[:n, 0].numpy(), ds.labels[:n].numpy()
    order = np.lexsort((np.arange(n), labels))
    return images[order], labels[order]


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array(images.shape, ">i4").tobytes() + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([len(labels)], ">i4").tobytes() + labels.astype(np.uint8).tobytes())


def write_folder(folder: Path, kind: str, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        sub = folder / f"{label:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray(image, "L")
        if kind == "gray_png":
            gray.save(sub / f"{i:04d}.png")
        elif kind == "rgb_png":
            gray.convert("RGB").save(sub / f"{i:04d}.png")
        else:
            gray.convert("RGB").save(sub / f"{i:04d}.jpg", quality=85)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``{"idx": data_dir, kind: folder with train/ and val/, "pixels": {split: (images, labels)}}``."""
    root = tmp_path_factory.mktemp("fmnist")
    out = {"idx": root / "idx", "pixels": {}}
    out["idx"].mkdir()
    for split, n, prefix, sub in (("train", N_TRAIN, "train", "train"), ("test", N_TEST, "t10k", "val")):
        images, labels = fashion_mnist_subset(split, n)
        out["pixels"][split] = (images, labels)
        write_idx(out["idx"], prefix, images, labels)
        for kind in FOLDER_KINDS:
            write_folder(root / kind / sub, kind, images, labels)
    for kind in FOLDER_KINDS:
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step SimCLR run on the embedded Fashion-MNIST sample (28 px, 1 channel, its own statistics)."""
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config
    from selfsup.training.loop import pretrain

    cfg = build_config(PretrainConfig, {"recipe": "cpu", "precision": "fp32", "dataset": "embedded", "backbone": "resnet18",
                                        "backbone_width": 0.0625, "batch_size": 16, "steps": 2, "checkpoint_every": 2,
                                        "knn_monitor": False, "simclr": {"proj_out_dim": 16}})
    run = tmp_path_factory.mktemp("run") / "run"
    pretrain(cfg, run, progress=False)
    return run


def decoded_pixels(folder: Path, split_folder: str) -> torch.Tensor:
    """The folder's files in listing order, decoded by PIL as gray: (N, 1, 28, 28) uint8."""
    files = sorted(p for p in (folder / split_folder).rglob("*") if p.is_file())
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("L")))[None] for p in files])


def reference(run_dir, pixels: torch.Tensor) -> torch.Tensor:
    """``encoder(prepare_images(pixels))`` with the statistics the run was trained with."""
    from selfsup.training.runs import load_encoder, load_run

    run = load_run(run_dir)
    encoder = load_encoder(run).eval()
    with torch.no_grad():
        return encoder(prepare_images(pixels, run.mean, run.std, run.image_size))


# ------------------------------------------------------------------------------------------------
# The function


def test_rgb_to_gray_is_pils_luma_bit_for_bit():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 17, 9, 3), dtype=np.uint8)
    ours = match_channels(torch.from_numpy(rgb).permute(0, 3, 1, 2), 1)[:, 0].numpy()
    pil = np.stack([np.array(Image.fromarray(a, "RGB").convert("L")) for a in rgb])
    assert np.array_equal(ours, pil)
    gray = torch.from_numpy(pil[:, None])
    assert torch.equal(match_channels(gray, 3), gray.expand(-1, 3, -1, -1))


def test_the_run_records_the_statistics_it_trained_with_and_old_folders_fall_back_to_its_data_sets(run_dir, tmp_path):
    import shutil

    from selfsup.training.runs import load_run

    prep = load_run(run_dir).preprocessing
    assert prep == Preprocessing(28, 1, (0.2860,), (0.3530,), 1.0)
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    info = json.loads((old / "run.json").read_text())
    del info["dataset_mean"], info["dataset_std"]
    (old / "run.json").write_text(json.dumps(info))
    assert load_run(old).preprocessing == prep


# ------------------------------------------------------------------------------------------------
# Every path, the same features


def test_idx_folders_and_the_kNN_monitor_extract_the_encoders_features_of_the_same_pixels(run_dir, data):
    """Built-in reader, image folders (gray PNG, RGB PNG, RGB JPEG) with the run's preprocessing, and
    the kNN monitor's extraction from the training set's own statistics: all equal the reference."""
    from selfsup.evaluation.frozen import extract_features
    from selfsup.training.runs import load_encoder, load_run

    run = load_run(run_dir)
    encoder, prep = load_encoder(run), run.preprocessing
    images, labels = data["pixels"]["train"]
    want = reference(run_dir, torch.from_numpy(images)[:, None])
    idx = load_dataset("fashion-mnist", "train", data_dir=data["idx"])
    got, y = extract_features(encoder, idx, "cpu", 28, preprocess=prep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(labels).long())
    monitor, _ = extract_features(encoder, idx, "cpu", 28)  # the loop's kNN monitor: the training set's statistics
    torch.testing.assert_close(monitor, want, rtol=1e-5, atol=1e-5)
    for kind in FOLDER_KINDS:
        folder = load_dataset(f"imagefolder:{data[kind]}", "train", image_size=28, num_channels=1)
        got, y = extract_features(encoder, folder, "cpu", 28, preprocess=prep)
        expected = want if kind != "rgb_jpeg" else reference(run_dir, decoded_pixels(data[kind], "train"))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=kind)
        assert torch.equal(y, torch.from_numpy(labels).long())


def test_a_streamed_folder_reads_as_the_same_folder_in_memory(run_dir, data):
    """Past 20,000 images a folder is streamed: at 28 px its files are decoded at 28 px, as in memory (they
    were decoded at 32 px and resized back by evaluation, cosine down to 0.91 on a 60-step run)."""
    from selfsup.data.folders import ImageFolderDataset
    from selfsup.evaluation.frozen import extract_features
    from selfsup.training.runs import load_encoder, load_run

    run = load_run(run_dir)
    streamed = load_dataset(f"imagefolder:{data['gray_png']}", "train", image_size=28, in_memory=False)
    assert isinstance(streamed, ImageFolderDataset) and streamed.load_size == 28
    got, _ = extract_features(load_encoder(run), streamed, "cpu", 28, preprocess=run.preprocessing)
    torch.testing.assert_close(got, reference(run_dir, torch.from_numpy(data["pixels"]["train"][0])[:, None]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_selfsup_embed_and_hub_embed_give_the_reference_features(run_dir, data, kind, tmp_path):
    """``selfsup embed`` on a folder; ``hub.embed`` of the decoded pixels, as gray or as RGB; encoders
    from the run folder, its Hub export (``from_pretrained``) and its safetensors export."""
    from selfsup import hub
    from selfsup.artifacts.embed import embed_run, read_embeddings
    from selfsup.artifacts.export import export_run

    pixels = decoded_pixels(data[kind], "train")
    if kind != "rgb_jpeg":
        assert torch.equal(pixels[:, 0], torch.from_numpy(data["pixels"]["train"][0]))
    want = reference(run_dir, pixels)
    summary = embed_run(run_dir, data[kind] / "train", tmp_path / "emb.npy", num_workers=0, device="cpu")
    assert summary["preprocessing"]["mean"] == [0.286] and summary["preprocessing"]["centre_crop"] == 1.0
    _, emb = read_embeddings(tmp_path / "emb.npy")
    torch.testing.assert_close(torch.from_numpy(emb), want, rtol=1e-5, atol=1e-5)
    if kind == "gray_png":  # a .parquet file carries the preprocessing in its metadata
        pq = pytest.importorskip("pyarrow.parquet")
        embed_run(run_dir, data[kind] / "train", tmp_path / "emb.parquet", num_workers=0, device="cpu")
        meta = pq.read_schema(tmp_path / "emb.parquet").metadata
        assert json.loads(meta[b"preprocessing"]) == summary["preprocessing"]
    hub.export_hub(run_dir, tmp_path / "hub")
    export_run(run_dir, "safetensors", tmp_path / "enc.safetensors")
    for source in (run_dir, tmp_path / "hub", tmp_path / "enc.safetensors"):
        encoder = hub.from_pretrained(source)
        torch.testing.assert_close(hub.embed(encoder, pixels), want, rtol=1e-5, atol=1e-5, msg=str(source))
        rgb = pixels.expand(-1, 3, -1, -1)  # RGB tensors of gray images: converted as PIL converts them
        torch.testing.assert_close(hub.embed(encoder, rgb), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hub.embed(encoder, pixels.float() / 255), want, rtol=1e-4, atol=1e-4)


def test_embed_equals_hub_embed_on_images_of_another_size(run_dir, data, tmp_path):
    """64 px files: ``selfsup embed`` decodes them whole and resizes in the one function, as ``hub.embed``
    does with the decoded image (a PIL resize at decode time made them differ, cosine down to 0.98)."""
    from selfsup import hub
    from selfsup.artifacts.embed import embed_run, read_embeddings

    folder = tmp_path / "big"
    folder.mkdir()
    for i, image in enumerate(data["pixels"]["test"][0][:24]):
        Image.fromarray(image, "L").resize((64, 48), Image.Resampling.BILINEAR).save(folder / f"{i:02d}.png")
    embed_run(run_dir, folder, tmp_path / "big.npy", num_workers=0, device="cpu")
    _, emb = read_embeddings(tmp_path / "big.npy")
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p)))[None] for p in sorted(folder.iterdir())])
    torch.testing.assert_close(torch.from_numpy(emb), hub.embed(hub.load_encoder(run_dir), pixels), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# selfsup eval: every data set kind, the same result, recorded


def test_eval_on_a_folder_copy_equals_eval_on_the_idx_files_and_records_its_preprocessing(run_dir, data, tmp_path):
    from selfsup.protocols.eval_run import evaluate

    want_prep = {"channels": 1, "centre_crop": 1.0, "image_size": 28, "mean": [0.286], "std": [0.353]}
    for kind in ("knn", "linear"):
        base = evaluate(kind, run_dir, dataset="fashion-mnist", data_dir=str(data["idx"]), out=tmp_path / "idx.json",
                        seed=0, k=20)
        assert base["num_train"] == N_TRAIN and base["num_test"] == N_TEST
        written = json.loads((tmp_path / "idx.json").read_text())
        assert {k: written["image_preprocessing"][k] for k in want_prep} == want_prep
        for folder in ("gray_png", "rgb_png"):
            res = evaluate(kind, run_dir, dataset=f"imagefolder:{data[folder]}", out=tmp_path / f"{folder}.json", seed=0,
                           k=20)
            assert abs(res["top1"] - base["top1"]) <= 0.1, (kind, folder, res["top1"], base["top1"])
            recorded = json.loads((tmp_path / f"{folder}.json").read_text())["image_preprocessing"]
            assert {k: recorded[k] for k in want_prep} == want_prep



def test_the_sgd_protocol_on_a_folder_copy_equals_it_on_the_idx_files(run_dir, data, tmp_path):
    """Its training views and test images are normalised with the run's statistics too."""
    from selfsup.protocols.eval_run import evaluate
    from selfsup.protocols.linear_sgd import LinearSGDConfig

    sgd = LinearSGDConfig(epochs=10, batch_size=50, lr=1.0)
    base = evaluate("linear", run_dir, dataset="fashion-mnist", data_dir=str(data["idx"]), linear_protocol="sgd",
                    sgd=sgd, out=tmp_path / "idx.json")
    res = evaluate("linear", run_dir, dataset=f"imagefolder:{data['gray_png']}", linear_protocol="sgd", sgd=sgd,
                   out=tmp_path / "png.json")
    assert abs(res["top1"] - base["top1"]) <= 0.1, (res["top1"], base["top1"])
    assert res["train_top1_last_epoch"] == base["train_top1_last_epoch"] and res["image_preprocessing"]["mean"] == [0.286]


def test_eval_on_a_store_and_an_hf_folder_prepares_their_pixels_with_the_runs_statistics(run_dir, data, tmp_path,
                                                                                         monkeypatch):
    """A store of the 28 px folder holds its pixels (stored at 28 px), an hf folder of RGB files is read as
    RGB: evaluation gives the features of those pixels, converted and normalised as the run was trained."""
    pytest.importorskip("streaming")
    datasets = pytest.importorskip("datasets")
    import selfsup.protocols.eval_run as er
    from selfsup.data.prepare import prepare_store

    prepare_store(f"imagefolder:{data['gray_png']}", tmp_path / "store", size=28, format="raw", workers=0, progress=False)
    rgb = [Image.fromarray(a, "L").convert("RGB") for a in data["pixels"]["train"][0]]
    rgb_test = [Image.fromarray(a, "L").convert("RGB") for a in data["pixels"]["test"][0]]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": rgb, "label": data["pixels"]["train"][1].tolist()}),
        "test": datasets.Dataset.from_dict({"image": rgb_test, "label": data["pixels"]["test"][1].tolist()})})
    dd.save_to_disk(str(tmp_path / "hf"))
    seen = []
    real = er.extract_features_sharded

    def spy(model, dataset, device, image_size, **kw):
        feats, labels = real(model, dataset, device, image_size, **kw)
        seen.append((dataset, feats))
        return feats, labels

    monkeypatch.setattr(er, "extract_features_sharded", spy)
    monkeypatch.setattr(er, "resolve_precision", lambda *a: "fp32")  # the reference is float32
    for name in (f"store:{tmp_path / 'store'}", f"hf:{tmp_path / 'hf'}"):
        seen.clear()
        res = er.evaluate("knn", run_dir, dataset=name, out=tmp_path / "r.json", k=20)
        assert res["image_preprocessing"]["mean"] == [0.286]
        train, feats = seen[0]
        stored = torch.stack([train[i][0] for i in range(len(train))])
        assert torch.equal(match_channels(stored, 1)[:, 0], torch.from_numpy(data["pixels"]["train"][0]))
        if name.startswith("hf"):
            assert stored.shape[1] == 3 and res["image_preprocessing"]["channel_conversion"].startswith("RGB to gray")
        torch.testing.assert_close(feats, reference(run_dir, match_channels(stored, 1)), rtol=1e-5, atol=1e-5, msg=name)


def test_above_32_px_every_path_keeps_the_same_centre_crop(data, tmp_path):
    """A 40 px run on files at its load size (46 px, as a folder stores them): evaluation, ``selfsup embed``
    and ``hub.embed`` all keep the central 87.5% (40 px); the Hub card says so."""
    from selfsup import hub
    from selfsup.artifacts.embed import embed_run, read_embeddings
    from selfsup.evaluation.frozen import extract_features
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config
    from selfsup.training.loop import pretrain
    from selfsup.training.runs import load_encoder, load_run

    cfg = build_config(PretrainConfig, {"recipe": "cpu", "precision": "fp32", "dataset": "embedded", "backbone": "resnet18",
                                        "backbone_width": 0.0625, "batch_size": 16, "steps": 1, "checkpoint_every": 1,
                                        "knn_monitor": False, "simclr": {"proj_out_dim": 16}, "image_size": 40})
    pretrain(cfg, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.preprocessing.crop == 0.875
    folder = tmp_path / "photos" / "train"
    for i, image in enumerate(data["pixels"]["test"][0][:12]):
        (folder / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").resize((46, 46), Image.Resampling.BILINEAR).save(folder / "c" / f"{i:02d}.png")
    pixels = decoded_pixels(tmp_path / "photos", "train")
    encoder = load_encoder(run).eval()
    with torch.no_grad():
        want = encoder(prepare_images(pixels, run.mean, run.std, 40, 0.875))
    ds = load_dataset(f"imagefolder:{folder}", "train", image_size=40, num_channels=1)
    got, _ = extract_features(encoder, ds, "cpu", 40, preprocess=run.preprocessing)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    embed_run(tmp_path / "run", folder, tmp_path / "e.npy", num_workers=0, device="cpu")
    torch.testing.assert_close(torch.from_numpy(read_embeddings(tmp_path / "e.npy")[1]), want, rtol=1e-5, atol=1e-5)
    hub.export_hub(tmp_path / "run", tmp_path / "hub")
    torch.testing.assert_close(hub.embed(hub.from_pretrained(tmp_path / "hub"), pixels), want, rtol=1e-5, atol=1e-5)
    assert "central 87.5% of the side is kept" in (tmp_path / "hub" / "README.md").read_text()
