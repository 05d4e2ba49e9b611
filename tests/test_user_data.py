"""Own images end to end: the how-to guides' commands on a tiny generated folder, embeddings, the HTML report, timm.

One module-scoped workspace runs the "tested end to end" blocks of the documentation once, page by page
in the order of the site's navigation (pre-training on a flat and on a labeled folder of mixed sizes,
modes and formats, evaluation, embed, export, report, the semi-supervised flow, --init, trackers, Hub
folders, Lightning); the tests below inspect what those commands wrote. tests/test_docs.py checks that
every command of every page parses.
"""
from __future__ import annotations

import base64
import html.parser
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfsup.cli import app as cli
from selfsup.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------------------------------------
# A tiny folder of photos: mixed sizes, modes and formats


def _pattern(seed: int, w: int, h: int) -> np.ndarray:
    """A smooth random colour field (JPEG-friendly, different for every seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def write_image(path: Path, seed: int, kind: int) -> None:
    """One of eight kinds: RGB JPEG (EXIF-rotated), L PNG, RGBA PNG, palette PNG, WebP, CMYK JPEG, BMP, LA PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = [(160, 120), (90, 140), (120, 120), (100, 80), (200, 100), (130, 130), (64, 96), (150, 110)]
    w, h = sizes[kind % 8]
    rgb = Image.fromarray(_pattern(seed, w, h))
    kind %= 8
    if kind == 0:
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees on display
        rgb.save(path.with_suffix(".jpg"), quality=90, exif=exif)
    elif kind == 1:
        rgb.convert("L").save(path.with_suffix(".png"))
    elif kind == 2:
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(path.with_suffix(".png"))
    elif kind == 3:
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path.with_suffix(".png"), transparency=0)
    elif kind == 4:
        rgb.save(path.with_suffix(".webp"), quality=90)
    elif kind == 5:
        rgb.convert("CMYK").save(path.with_suffix(".jpeg"), quality=90)
    elif kind == 6:
        rgb.save(path.with_suffix(".bmp"))
    else:
        rgb.convert("LA").save(path.with_suffix(".PNG"))


def make_workspace(root: Path) -> None:
    """``photos/`` (flat, 10 images) and ``pets/train|val/<cat|dog>/`` (8 + 2 per class), as the guide expects."""
    for i in range(10):
        write_image(root / "photos" / f"img_{i:02d}", 100 + i, i)
    for c, cls in enumerate(("cat", "dog")):
        for i in range(8):
            write_image(root / "pets" / "train" / cls / f"{cls}{i}", 10 * c + i, i + c)
        for i in range(2):
            write_image(root / "pets" / "val" / cls / f"{cls}{i}", 50 + 10 * c + i, 3 * i + c)
    (root / "pets" / "train" / "cat" / "notes.txt").write_text("not an image")


# ------------------------------------------------------------------------------------------------
# Reading the guides


def guide_pages() -> list[Path]:
    """The site's pages in the order of mkdocs.yml's nav (later blocks use what earlier ones wrote)."""
    def walk(node):
        if isinstance(node, str):
            yield node
        for item in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            yield from walk(item)

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "docs" / p for p in walk(nav) if (ROOT / "docs" / p).is_file()]


def guide_blocks() -> list[tuple[str, str, bool, str]]:
    """``(language, body, tested_end_to_end, page name)`` of every fenced bash/python block of the pages."""
    pattern = re.compile(r"(<!-- test: end-to-end -->\n)?```(bash|python)\n(.*?)```", re.S)
    return [(lang, body, bool(marker), page.name)
            for page in guide_pages() for marker, lang, body in pattern.findall(page.read_text())]


def command_lines(body: str) -> list[str]:
    """Logical lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [ln for ln in (shlex.join(shlex.split(line, comments=True)) for line in joined.splitlines()) if ln]


def selfsup_argv(line: str) -> list[str] | None:
    words = shlex.split(line)
    return words[1:] if words[0] == "selfsup" else None


# ------------------------------------------------------------------------------------------------
# The guide's end-to-end blocks, run once


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Run the guide's tested blocks in a fresh folder holding ``photos/`` and ``pets/``; returns the folder."""
    root = tmp_path_factory.mktemp("guide")
    make_workspace(root)
    old = os.getcwd()
    os.chdir(root)
    try:
        ran = 0
        for lang, body, tested, page in guide_blocks():
            if not tested:
                continue
            ran += 1
            if lang == "bash":
                for line in command_lines(body):
                    argv = selfsup_argv(line)
                    assert argv is not None, f"tested blocks hold selfsup commands only: {line}"
                    if _needs_missing_extra(line):
                        continue
                    assert cli.main(argv) == 0, f"{page}: command failed: {line}"
            elif not _needs_missing_extra(body):
                exec(compile(body, f"{page} python block", "exec"), {})
        assert ran >= 12, f"only {ran} tested blocks found in the docs"
    finally:
        os.chdir(old)
    return root


# Guide commands that need an optional extra; without it they are left out of the end-to-end run.
_EXTRA_FOR = {"--to onnx": "onnx", "import onnxruntime": "onnxruntime", "import lightning": "lightning",
              "lightning_logs/": "lightning"}


def _needs_missing_extra(text: str) -> bool:
    return any(marker in text and importlib.util.find_spec(module) is None for marker, module in _EXTRA_FOR.items())


def test_guide_flow_wrote_everything(workspace):
    runs = workspace / "runs"
    for name in ("flat", "pets"):
        assert (runs / name / "model.safetensors").is_file()
    flat = json.loads((runs / "flat" / "run.json").read_text())
    assert flat["num_images"] == 10 and flat["image_size"] == 96 and flat["in_channels"] == 3
    pets = json.loads((runs / "pets" / "run.json").read_text())
    assert pets["num_images"] == 16  # notes.txt ignored
    knn = json.loads((runs / "pets" / "eval_knn.json").read_text())
    assert knn["num_train"] == 16 and knn["num_test"] == 4 and knn["backbone_unchanged"]
    assert any("knn_top1" in json.loads(line) for line in (runs / "pets" / "metrics.jsonl").read_text().splitlines())
    for f in ("pets.npy", "pets.paths.txt", "pets.csv", "resnet18_pets.safetensors", "runs/pets/report.html"):
        assert (workspace / f).is_file(), f
    assert (workspace / "pets.onnx").is_file() == (importlib.util.find_spec("onnx") is not None)
    # SimCLRv2's flow: fine-tuned from the first layer of the 3-layer head on half the labels, then distilled
    finetuned = json.loads((runs / "v2-tiny-ft" / "results.json").read_text())
    assert finetuned["label_fraction"] == 0.5 and finetuned["from_head_layer"] == 1 and finetuned["num_test"] == 4
    distilled = json.loads((runs / "v2-tiny-distill" / "results.json").read_text())
    assert distilled["teacher"] == "runs/v2-tiny-ft" and distilled["student"] == "resnet18"
    assert "results.json" in (runs / "v2-tiny-ft" / "report.html").read_text()


def test_streamed_training_reads_at_load_size(workspace):
    """96 px training streams 110 px centre squares (round(96 * 256 / 224)); the device crops them."""
    from selfsup.data.folders import ImageFolderDataset
    from selfsup.data.datasets import load_dataset

    ds = load_dataset("imagefolder:" + str(workspace / "photos"), image_size=96)
    assert isinstance(ds, ImageFolderDataset) and ds.labels is None
    shapes = {tuple(ds[i][0].shape) for i in range(len(ds))}
    assert shapes == {(3, 110, 110)}


# ------------------------------------------------------------------------------------------------
# Embeddings


def expected_order(folder: Path) -> list[str]:
    exts = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in exts)


def test_embed_shape_order_and_formats(workspace):
    from selfsup.artifacts.embed import read_embeddings

    order = expected_order(workspace / "pets")
    assert len(order) == 20
    paths, emb = read_embeddings(workspace / "pets.npy")
    assert paths == order and emb.shape == (20, 512) and emb.dtype == np.float32
    assert np.isfinite(emb).all() and np.unique(emb.round(4), axis=0).shape[0] == 20
    csv_paths, csv_emb = read_embeddings(workspace / "pets.csv")
    assert csv_paths == order and np.array_equal(csv_emb, emb)  # 9 significant digits round-trip float32


def test_embed_rows_are_the_encoder_on_each_image(workspace, tmp_path):
    """Any batch size and worker count give the same rows; each row is h of that image alone, decoded whole and
    prepared by the run's preprocessing (as ``selfsup.hub.embed`` and evaluation prepare it)."""
    pytest.importorskip("pyarrow")
    from selfsup.data.folders import decode_image
    from selfsup.artifacts.embed import embed_run, read_embeddings
    from selfsup.training.runs import load_encoder, load_run

    out = tmp_path / "pets.parquet"
    summary = embed_run(workspace / "runs" / "pets", workspace / "pets", out, batch_size=3, num_workers=2, device="cpu")
    assert summary["num_images"] == 20 and summary["dim"] == 512 and not summary["skipped"]
    paths, emb = read_embeddings(out)
    ref_paths, ref = read_embeddings(workspace / "pets.npy")
    assert paths == ref_paths
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
    run = load_run(workspace / "runs" / "pets")
    encoder = load_encoder(run).eval()
    for i in (0, 7, 19):
        image = decode_image(workspace / "pets" / paths[i], None, 3)[None]
        with torch.no_grad():
            h = encoder(run.preprocessing(image))[0].numpy()
        np.testing.assert_allclose(emb[i], h, rtol=1e-4, atol=1e-5)


def test_embed_lists_sorted_relative_paths(tmp_path):
    from selfsup.artifacts.embed import list_images

    for rel in ("z.jpg", "m/x.png", "a.PNG", "m/sub/b.webp", ".hidden/y.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    base, rel = list_images(tmp_path)
    # os.walk lists z.jpg before the folder m/; sorted strings put "m/sub/b.webp" before "m/x.png"
    assert base == tmp_path and rel == ["a.PNG", "m/sub/b.webp", "m/x.png", "z.jpg"]
    assert list_images(tmp_path / "z.jpg") == (tmp_path, ["z.jpg"])
    with pytest.raises(ConfigError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such file"):
        list_images(tmp_path / "missing")


def test_embed_broken_image(workspace, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(workspace / "photos", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    run = str(workspace / "runs" / "flat")
    assert cli.main(["embed", "--run", run, "--images", str(folder), "--out", str(tmp_path / "e.npy"),
                     "--no-progress", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.jpg" in err and "--on-bad-image skip" in err
    assert cli.main(["embed", "--run", run, "--images", str(folder), "--out", str(tmp_path / "e.csv"),
                     "--no-progress", "--skip-broken", "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == ["broken.jpg"] and summary["num_images"] == 10 and summary["dim"] == 64
    from selfsup.artifacts.embed import read_embeddings

    paths, emb = read_embeddings(tmp_path / "e.csv")
    assert paths == expected_order(workspace / "photos") and emb.shape == (10, 64)


def test_embed_refuses_unknown_format_before_work(workspace, tmp_path, capsys):
    assert cli.main(["embed", "--run", str(workspace / "runs" / "flat"), "--images", str(workspace / "photos"),
                     "--out", str(tmp_path / "e.txt")]) == 2
    err = capsys.readouterr().err
    assert ".npy, .csv or .parquet" in err and not (tmp_path / "e.txt").exists()


# ------------------------------------------------------------------------------------------------
# The HTML report


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.external.append((tag, attrs[key]))
        if tag in ("link", "iframe", "object", "embed"):
            self.external.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_with_every_section(workspace):
    page = _Page()
    page.feed((workspace / "runs" / "pets" / "report.html").read_text(encoding="utf-8"))
    assert page.external == []
    assert len(page.images) == 2  # curves, view grid
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        data = base64.b64decode(img["src"][len(prefix):], validate=True)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG"
            im.load()  # decodes every pixel: a truncated PNG raises here
            assert min(im.size) > 50
    curves = page.images[0]["alt"]
    for series in ("loss", "lr", "knn_top1", "images_per_sec"):
        assert series in curves
    text = " ".join(page.text)
    knn = json.loads((workspace / "runs" / "pets" / "eval_knn.json").read_text())
    for heading in ("Summary", "Evaluation", "Training curves", "Augmented views", "Timing", "Config"):
        assert heading in text
    assert "eval_knn.json" in text and "eval_linear.json" in text and f"{knn['top1']:.4f}".rstrip("0").rstrip(".") in text
    assert "imagefolder:pets" in text and "image_size: 96" in text


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium) for the browser check")
def test_report_loads_its_images_in_headless_chromium(workspace, tmp_path):
    """Open the page in a real browser; a script added for the test counts images that decoded."""
    page = (workspace / "runs" / "pets" / "report.html").read_text(encoding="utf-8")
    probe = ("<script>window.addEventListener('load', () => { const i = [...document.images]; "
             "document.title = 'loaded:' + i.filter(x => x.complete && x.naturalWidth > 0).length + '/' + i.length; });"
             "</script></body>")
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe), encoding="utf-8")
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                             "--dump-dom", (tmp_path / "probe.html").as_uri()],
                            capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", result.stdout)
    assert title is not None, result.stderr[-2000:]
    assert title.group(1) == "loaded:2/2"


def test_report_of_an_unfinished_run_and_of_a_non_run(workspace, tmp_path, capsys):
    from selfsup.artifacts.html_report import render_html_report

    run = tmp_path / "interrupted"
    run.mkdir()
    shutil.copy(workspace / "runs" / "flat" / "config.yaml", run / "config.yaml")
    text = render_html_report(run)
    assert "metrics.jsonl is empty or missing" in text and "No evaluation results yet" in text and "<img" not in text
    assert cli.main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# timm backbones (optional extra)


def test_timm_backbones_by_name():
    timm = pytest.importorskip("timm")
    from selfsup.models.backbones import build_backbone

    cnn = build_backbone("timm:test_resnet", in_channels=1, image_size=32).eval()
    with torch.no_grad():
        out = cnn(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, cnn.num_features)
    vit = build_backbone("timm:test_vit", in_channels=3, image_size=32).eval()
    assert tuple(vit.model.patch_embed.img_size) == (32, 32)
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 32, 32)).shape == (2, vit.num_features)
    with pytest.raises(ConfigError, match="timm:test_resnet"):
        build_backbone("timm:test_resnett")
    with pytest.raises(ConfigError, match="width"):
        build_backbone("timm:test_resnet", width=2.0)
    assert timm.is_model("test_resnet")


def test_timm_backbone_pretrains_and_exports_for_timm(tiny_cfg, tmp_path):
    timm = pytest.importorskip("timm")
    from selfsup.artifacts.export import export_run, load_exported
    from selfsup.training.runs import load_encoder, load_run
    from selfsup.training.loop import pretrain
    from safetensors.torch import load_file

    cfg = tiny_cfg(backbone="timm:test_resnet", backbone_width=None, steps=1, batch_size=8)
    pretrain(cfg, tmp_path / "run", progress=False)
    summary = export_run(tmp_path / "run", "timm", tmp_path / "timm.safetensors")
    assert summary["arch"] == "test_resnet"
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0, in_chans=1)
    model.load_state_dict(load_file(tmp_path / "timm.safetensors"), strict=True)
    ours = load_encoder(load_run(tmp_path / "run")).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours(x))
    export_run(tmp_path / "run", "safetensors", tmp_path / "enc.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "enc.safetensors")(x), ours(x))


def test_guide_integrations_wrote_everything(workspace):
    """--init from a torchvision export and from a run, --logger csv, --to hub and the Lightning checkpoint's export."""
    runs = workspace / "runs"
    from_tv = json.loads((runs / "pets-from-tv" / "init.json").read_text())
    assert from_tv["prefix_removed"] == "" and from_tv["tensors_loaded"] > 0
    assert json.loads((runs / "pets-from-run" / "init.json").read_text())["prefix_removed"] == "backbone."
    assert (runs / "flat-csv" / "metrics.csv").read_text().startswith("step,name,value\n")
    assert sorted(p.name for p in (workspace / "hub" / "pets").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    if importlib.util.find_spec("lightning") is not None:
        assert (workspace / "lightning_encoder.safetensors").is_file()
