"""--dataset hf:PATH: a Hugging Face data set saved with save_to_disk, as any other data set (views, resume, eval)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from selfsup.cli import app as cli
from selfsup.data.datasets import load_dataset
from selfsup.errors import DataError
from selfsup.training.runs import load_run
from selfsup.training.loop import pretrain

pa = pytest.importorskip("pyarrow")
ROOT = Path(__file__).resolve().parents[1]


def save_like_datasets(path: Path, splits: dict, names: list[str], image_column="image", label_column="label"):
    """The folder ``DatasetDict.save_to_disk`` writes (datasets 2.x-4.x): Arrow stream files + JSON, PNG-encoded images."""
    path.mkdir(parents=True)
    (path / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for split, (images, labels) in splits.items():
        folder = path / split
        folder.mkdir()
        encoded = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im[0].numpy()).save(buf, format="PNG")
            encoded.append({"bytes": buf.getvalue(), "path": None})
        table = pa.table({image_column: pa.array(encoded, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                          label_column: pa.array([int(v) for v in labels], pa.int64())})
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                       "_split": None}))
        (folder / "dataset_info.json").write_text(json.dumps({"features": {
            image_column: {"_type": "Image"}, label_column: {"names": names, "_type": "ClassLabel"}}}))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    train, test = load_dataset("embedded", "train"), load_dataset("embedded", "test")
    path = tmp_path_factory.mktemp("hf") / "fmnist"
    save_like_datasets(path, {"train": (train.images[:64], train.labels[:64]), "test": (test.images[:32], test.labels[:32])},
                       train.classes, image_column="pixels", label_column="target")
    return path, train, test


def test_decodes_to_the_same_images_and_labels(hf_folder):
    path, train, test = hf_folder
    ds = load_dataset(f"hf:{path}", "train")  # columns found by feature type (Image, ClassLabel)
    assert torch.equal(ds.images, train.images[:64]) and torch.equal(ds.labels, train.labels[:64])
    assert ds.classes == train.classes and ds.num_channels == 1 and ds.image_size == 28
    held_out = load_dataset(f"hf:{path}", "test")
    assert torch.equal(held_out.images, test.images[:32])
    streamed = load_dataset(f"hf:{path}", "train", in_memory=False)  # index-addressable, like the image folder
    assert len(streamed) == 64 and torch.equal(streamed[5][0], train.images[5]) and streamed[5][1] == int(train.labels[5])
    with pytest.raises(DataError, match="no column 'image' .*columns: pixels, target"):
        load_dataset(f"hf:{path}", "train", image_column="image")


def test_pretrain_resume_and_eval_with_named_columns(hf_folder, tmp_path):
    path, _, _ = hf_folder
    run = tmp_path / "run"
    cfg = cli._pretrain_config(cli.build_parser().parse_args([
        "pretrain", "--dataset", f"hf:{path}", "--set", "hf.image_column=pixels", "--set", "hf.label_column=target",
        "--backbone", "resnet18", "--set", "backbone_width=0.0625", "--batch-size", "16", "--set", "simclr.proj_out_dim=16",
        "--set", "knn_monitor=false", "--set", "checkpoint_every=2", "--steps", "4", "--set", "precision=fp32"]))

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, run, progress=False, on_step=stop)
    assert cli.main(["pretrain", "--resume", str(run), "--no-progress"]) == 0
    pretrain(cfg, tmp_path / "whole", progress=False)
    resumed, whole = load_run(run).weights, load_run(tmp_path / "whole").weights
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # same data order and views as an uninterrupted run
    assert load_run(run).config.hf.image_column == "pixels"
    assert cli.main(["eval", "knn", "--run", str(run), "--no-progress"]) == 0
    result = json.loads((run / "eval_knn.json").read_text())
    assert result["num_train"] == 64 and result["num_test"] == 32


def test_reads_a_folder_written_by_datasets(tmp_path):
    """The real writer, in a subprocess (datasets is slow to import)."""
    code = textwrap.dedent(f"""
        try:
            import datasets
        except ImportError:
            raise SystemExit(77)
        from PIL import Image
        import numpy as np
        rgb = [Image.fromarray(np.full((40, 30, 3), i * 20, np.uint8)) for i in range(6)]
        ds = datasets.Dataset.from_dict({{"img": rgb, "fine": ["cat", "dog"] * 3}},
                                        features=datasets.Features({{"img": datasets.Image(), "fine": datasets.Value("string")}}))
        ds.save_to_disk({str(tmp_path / 'single')!r})
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode == 77:
        pytest.skip("datasets is not installed")
    assert done.returncode == 0, done.stderr[-2000:]
    ds = load_dataset(f"hf:{tmp_path / 'single'}", "train", image_size=24, label_column="fine")
    assert ds.images.shape == (6, 3, 24, 24) and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1] * 3
    assert int(ds.images[3].float().mean().round()) == 60  # the image's grey level survived decoding
    with pytest.raises(ValueError, match="single Dataset, the training split"):
        load_dataset(f"hf:{tmp_path / 'single'}", "test")
