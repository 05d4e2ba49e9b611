"""Every kind of bad image in a folder, and what selfsup does with it (docs/reliability.md, "Data").

Bad files (zero-byte, not an image, corrupt header, truncated) are refused before training with
``on_bad_image="error"`` (naming them) or left out and counted with ``"skip"``; odd but valid
images (RGBA, 16-bit, palette, CMYK, smaller than the crop) are converted; layout mistakes (empty
class folder, empty data set) fail before training in both modes.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datasets import load_dataset
from selfsup.errors import DataError
from selfsup.data.folders import ImageFolderDataset, decode_image
from selfsup.data.image_checks import check_image, convert_image
from selfsup.errors import BadImageError
from selfsup.training.batches import batch_stream


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(seed: int, size=(20, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# name -> bytes of each bad kind, and the words its problem must contain
BAD_FILES = {
    "zero_byte.png": (b"", "zero-byte"),
    "notes.jpg": (b"<html><body>this page was saved as .jpg</body></html>\n", "not an image"),
    "corrupt_header.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3, "corrupt"),
    "truncated.jpg": (_encode(_photo(1), "JPEG")[:300], "truncated"),
    "truncated.png": (_encode(_photo(2), "PNG")[:400], "truncated"),
    "truncated.webp": (_encode(_photo(3), "WEBP")[:200], "truncated"),
}


def _good_files() -> dict[str, bytes]:
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    gray16 = Image.fromarray(np.full((20, 20), 128 * 257, dtype=np.uint16))
    pal = _photo(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return {
        "photo.jpg": _encode(_photo(5), "JPEG"),
        "photo.png": _encode(_photo(6), "PNG"),
        "photo.webp": _encode(_photo(7), "WEBP"),
        "photo.bmp": _encode(_photo(8), "BMP"),
        "padded.jpg": _encode(_photo(9), "JPEG") + b"\x00" * 16,  # zero padding after EOI (some cameras)
        "trailing.jpg": _encode(_photo(10), "JPEG") + b"thumbnail-data",  # junk after EOI, still decodes
        "rgba.png": _encode(rgba, "PNG"),
        "gray16.png": _encode(gray16, "PNG"),
        "palette.png": _encode(pal, "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", quality=95),
        "tiny.png": _encode(_photo(11, size=(5, 3)), "PNG"),  # smaller than the 16 px crop
    }


def _folder(root: Path, with_bad: bool = True) -> Path:
    """root/a/* holds the good files, root/b/* the bad ones plus two good ones."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for name, data in _good_files().items():
        (root / "a" / name).write_bytes(data)
    (root / "b" / "ok1.png").write_bytes(_encode(_photo(12), "PNG"))
    (root / "b" / "ok2.jpg").write_bytes(_encode(_photo(13), "JPEG"))
    if with_bad:
        for name, (data, _) in BAD_FILES.items():
            (root / "b" / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_kind_is_found_by_the_scan(tmp_path, name):
    data, words = BAD_FILES[name]
    (tmp_path / name).write_bytes(data)
    problem, dims = check_image(tmp_path / name)
    assert problem is not None and words in problem, problem
    assert dims is None


def test_every_good_file_passes_the_scan(tmp_path):
    for name, data in _good_files().items():
        (tmp_path / name).write_bytes(data)
        problem, dims = check_image(tmp_path / name)
        assert problem is None, (name, problem)
        assert min(dims) >= 1


def test_error_mode_refuses_the_folder_naming_the_bad_files(tmp_path):
    root = _folder(tmp_path / "d")
    with pytest.raises(BadImageError) as info:
        load_dataset(f"imagefolder:{root}", image_size=16)  # default: on_bad_image="error"
    msg = str(info.value)
    assert f"{len(BAD_FILES)} of {len(_good_files()) + 2 + len(BAD_FILES)} files" in msg
    named = [n for n in BAD_FILES if n in msg]
    assert len(named) == 5 and "and 1 more" in msg  # the first five by name, then a count
    assert "--on-bad-image skip" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("in_memory", [True, False])
def test_skip_mode_leaves_bad_files_out_and_reports_them(tmp_path, in_memory):
    root = _folder(tmp_path / "d")
    ds = load_dataset(f"imagefolder:{root}", image_size=16, in_memory=in_memory, on_bad_image="skip")
    good = len(_good_files()) + 2
    assert len(ds) == good
    report = ds.image_report
    assert sorted(Path(f).name for f, _ in report.bad) == sorted(BAD_FILES)
    for f, problem in report.bad:
        assert BAD_FILES[Path(f).name][1] in problem
    assert report.skipped == len(BAD_FILES) and report.upscaled == 1  # tiny.png
    assert f"{len(BAD_FILES)} bad, left out" in report.summary()
    # labels still follow the class folders: the good files of a/ come first, then b/'s two
    assert ds.labels.tolist() == [0] * len(_good_files()) + [1, 1]
    first, _ = ds[0]
    assert first.dtype == torch.uint8 and first.shape[0] == 3
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["skipped"] == len(BAD_FILES)


def _decode(img: Image.Image, fmt: str, tmp_path: Path, channels: int, **kw) -> np.ndarray:
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encode(img, fmt, **kw))
    return decode_image(path, img.size[0], channels).numpy()


def test_transparency_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: shown as white, not black
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black: mid gray
    out = _decode(rgba, "PNG", tmp_path, 3)
    assert out[:, 0, 0].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[:, 0, 1].tolist())
    assert out[:, 4, 4].tolist() == [255, 0, 0]
    la = Image.new("LA", (8, 8), (10, 255))
    la.putpixel((0, 0), (10, 0))
    out = _decode(la, "PNG", tmp_path, 1)
    assert out[0, 0, 0] == 255 and out[0, 4, 4] == 10


def test_palette_images_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = _decode(pal, "PNG", tmp_path, 3)
    assert out[:, 4, 4].tolist() == [0, 200, 0] and out[:, 0, 0].tolist() == [0, 0, 0]
    out = _decode(pal, "PNG", tmp_path, 3, transparency=0)  # palette index 0 transparent -> white
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 4, 4].tolist() == [0, 200, 0]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    assert np.asarray(img.convert("L"))[0].tolist() == [0, 255, 255, 255]  # what PIL alone would do
    path = tmp_path / "g16.png"
    img.save(path)
    with Image.open(path) as reopened:
        assert np.asarray(convert_image(reopened, "L"))[0].tolist() == [0, 64, 128, 255]
        assert np.asarray(convert_image(reopened, "RGB"))[0, :, 0].tolist() == [0, 64, 128, 255]
    # 32-bit integer images holding 16-bit data are scaled the same way
    assert np.asarray(convert_image(Image.fromarray(values.astype(np.int32)), "L"))[0].tolist() == [0, 64, 128, 255]


def test_cmyk_and_one_bit_are_converted(tmp_path):
    out = _decode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", tmp_path, 3, quality=95)
    assert np.abs(out[:, 4, 4].astype(int) - [255, 0, 0]).max() <= 3  # cyan 0, magenta+yellow full: red
    gray = _decode(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "JPEG", tmp_path, 1, quality=95)
    assert gray[0, 4, 4] <= 3  # full black ink
    bw = Image.new("1", (8, 8), 1)
    bw.putpixel((0, 0), 0)
    out = _decode(bw, "PNG", tmp_path, 1)
    assert out[0, 0, 0] == 0 and out[0, 4, 4] == 255


def test_images_smaller_than_the_crop_are_upscaled_and_counted(tmp_path):
    (tmp_path / "small.png").write_bytes(_encode(_photo(0, size=(5, 3)), "PNG"))
    (tmp_path / "big.png").write_bytes(_encode(_photo(1, size=(40, 40)), "PNG"))
    ds = ImageFolderDataset(tmp_path, image_size=16, num_channels=3)
    assert ds.image_report.upscaled == 1 and ds.image_report.skipped == 0
    image, _ = ds[sorted(p.name for p in ds.files).index("small.png")]
    assert image.shape == (3, ds.load_size, ds.load_size)


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_layout_mistakes_fail_before_training_in_both_modes(tmp_path, on_bad_image):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", on_bad_image=on_bad_image)
    root = _folder(tmp_path / "d", with_bad=False)
    (root / "c").mkdir()  # a class folder without images
    with pytest.raises(DataError, match=r"class folder .*c holds no images"):
        load_dataset(f"imagefolder:{root}", on_bad_image=on_bad_image)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    for name, (data, _) in BAD_FILES.items():
        (only_bad / name).write_bytes(data)
    with pytest.raises(DataError, match="no usable images" if on_bad_image == "skip" else "not usable images"):
        load_dataset(f"imagefolder:{only_bad}", on_bad_image=on_bad_image)


def _flat_folder(root: Path, n: int = 8) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"img{i}.png").write_bytes(_encode(_photo(100 + i), "PNG"))
    return root


def test_streamed_file_failing_after_the_scan_is_replaced_deterministically(tmp_path):
    root = _flat_folder(tmp_path / "flat")
    ds = ImageFolderDataset(root, image_size=16, num_channels=3, on_bad_image="skip")
    (root / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # damaged after the scan (disk, mount)
    image, _ = ds[3]
    assert torch.equal(image, ds[4][0])  # the next image in data-set order
    assert ds.failed_files() == [str(root / "img3.png")]
    strict = ImageFolderDataset(root, image_size=16, num_channels=3, scan=False)
    with pytest.raises(BadImageError, match="img3.png"):
        strict[3]


def test_streamed_batches_stay_full_across_dataloader_workers(tmp_path):
    root = _flat_folder(tmp_path / "flat")
    ds = ImageFolderDataset(root, image_size=16, num_channels=3, on_bad_image="skip")
    (root / "img5.png").write_bytes(b"")  # truncated to nothing while "training"
    batches = list(batch_stream(ds, 4, seed=0, start_step=0, total_steps=4, num_workers=1,
                                device=torch.device("cpu")))
    assert len(batches) == 4 and all(b.shape == (4, 3, ds.load_size, ds.load_size) for b in batches)
    assert ds.failed_files() == [str(root / "img5.png")]  # flagged in the worker, seen by the trainer


def _cli(argv, capsys):
    from selfsup.cli.app import main

    code = main(argv)
    return code, capsys.readouterr()


def test_pretrain_refuses_bad_folder_before_training_and_skips_on_request(tmp_path, capsys):
    root = _folder(tmp_path / "d")
    common = ["pretrain", "--dataset", f"imagefolder:{root}", "--steps", "2", "--batch-size", "4", "--no-progress",
              "--set", "image_size=16", "--set", "backbone=resnet18", "--set", "backbone_width=0.0625",
              "--set", "knn_monitor=false", "--set", "simclr.proj_out_dim=8", "--set", "num_workers=0"]
    code, out = _cli(common + ["--out", str(tmp_path / "r1")], capsys)
    assert code == 2
    line = out.err.strip().splitlines()[-1]
    assert line.startswith("selfsup: error:") and "truncated.jpg" in line and "--on-bad-image skip" in line
    assert not (tmp_path / "r1" / "checkpoints").exists() and not (tmp_path / "r1" / "metrics.jsonl").exists()

    code, out = _cli(common + ["--out", str(tmp_path / "r2"), "--on-bad-image", "skip"], capsys)
    assert code == 0, out.err
    assert f"{len(BAD_FILES)} bad images skipped" in out.err
    summary = json.loads((tmp_path / "r2" / "train_summary.json").read_text())
    assert summary["bad_images"]["skipped"] == len(BAD_FILES)
    assert sorted(Path(b["file"]).name for b in summary["bad_images"]["bad"]) == sorted(BAD_FILES)
    assert summary["bad_images"]["upscaled"] == 1
