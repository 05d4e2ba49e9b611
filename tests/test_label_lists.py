"""The official 1% / 10% list format (one file name per line) read against an image folder."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.errors import ConfigError
from selfsup.data.datasets import load_dataset
from selfsup.data.labels import read_label_list
from selfsup.protocols.label_subsets import LABEL_SUBSET_FILE, prepare_label_subset


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        (tmp_path / "photos" / "train" / c).mkdir(parents=True)
        (tmp_path / "photos" / "val" / c).mkdir(parents=True)
        for i in range(4):
            for split in ("train", "val"):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / "photos" / split / c / f"{c}_{split}{i}.png")
    return tmp_path / "photos"


def test_official_list_selects_the_named_files(folder, tmp_path):
    train = load_dataset(f"imagefolder:{folder}", "train", image_size=12)
    listing = tmp_path / "1percent.txt"
    listing.write_text("n01_train2.png\n\n# a comment\nn02_train0.png\n")
    idx = read_label_list(listing, train.files)
    assert [train.files[i].name for i in idx] == ["n01_train2.png", "n02_train0.png"]
    run = tmp_path / "ft"
    got = prepare_label_subset(run, train.labels, "imagefolder", 0.1, 0, 2, source=listing, files=train.files)
    assert torch.equal(got, idx)
    record = json.loads((run / LABEL_SUBSET_FILE).read_text())
    assert record["balance"] == "list" and record["per_class"] == [1, 1] and record["fraction"] == 0.25
    # A resumed run reads its own record again, whatever --label-fraction says.
    assert torch.equal(prepare_label_subset(run, train.labels, "imagefolder", 0.1, 0, 2, source=listing,
                                            files=train.files), idx)


def test_official_list_errors_name_the_problem(folder, tmp_path):
    train = load_dataset(f"imagefolder:{folder}", "train", image_size=12)
    listing = tmp_path / "list.txt"
    listing.write_text("n01_train2.png\nn09_missing.JPEG\n")
    with pytest.raises(ConfigError, match="1 of 2 listed files are not in the training folder .first: n09_missing.JPEG"):
        prepare_label_subset(tmp_path / "a", train.labels, "imagefolder", 0.1, 0, 2, source=listing, files=train.files)
    with pytest.raises(ConfigError, match="needs an image-folder data set"):
        prepare_label_subset(tmp_path / "b", train.labels, "embedded", 0.1, 0, 2, source=listing, files=None)
