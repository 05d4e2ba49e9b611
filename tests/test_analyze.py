"""``selfsup analyze``: every study end to end on a tiny slice with a tiny encoder, the heatmap's
shape and labels, the transform probe's labels against the transformation actually applied."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.analyze import STUDIES, run_study
from selfsup.errors import ConfigError

# 8 px images, a 1/8-width ResNet-18 (64-d h), two steps of 8 images, probes on 60 / 40 images.
TINY_FLAGS = {"--dataset": "embedded", "--image-size": "8", "--backbone": "resnet18", "--backbone-width": "0.125",
              "--batch-size": "8", "--steps": "2", "--train-images": "60", "--test-images": "40", "--device": "cpu"}


def tiny(*without: str) -> list[str]:
    return [a for k, v in TINY_FLAGS.items() if k not in without for a in (k, v)] + ["--no-progress"]


TINY = tiny()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny SimCLR pre-training run shared by the probe and t-SNE tests."""
    from selfsup.analyze.common import STUDY_CHECKPOINT_EVERY
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config
    from selfsup.training.loop import pretrain

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    cfg = build_config(PretrainConfig, {"dataset": "embedded", "image_size": 8, "backbone": "resnet18",
                                        "backbone_width": 0.125, "batch_size": 8, "steps": 2, "knn_monitor": False,
                                        "checkpoint_every": STUDY_CHECKPOINT_EVERY, "device": "cpu"})
    pretrain(cfg, run_dir, progress=False)
    return run_dir


def test_registry_lists_every_study_and_the_cli_knows_them(capsys, tmp_path):
    from selfsup.cli.app import main

    assert list(STUDIES) == ["augment-pairs", "head", "transform-probe", "tsne", "batch-size", "temperature", "views"]
    for study in STUDIES.values():
        module = study.load()
        assert callable(module.build_parser) and callable(module.run)
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0
    assert "augment-pairs" in capsys.readouterr().out
    assert main(["analyze", "augment-pairs", "--transforms", "crop,zoom"]) == 2  # user error: one line, exit 2
    assert "zoom" in capsys.readouterr().err
    # A typo fails before the study folder exists, so the corrected command is not refused as "other settings".
    assert main(["analyze", "head", "--dataset", "fashion", "--out", str(tmp_path / "typo")]) == 2
    assert "fashion-mnist" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_heatmap_matrix_is_mirrored_with_singles_on_the_diagonal_and_labelled():
    from selfsup.analyze.augment_pairs import cells, draw_heatmap, heatmap_matrix
    from selfsup.analyze.outputs import pyplot

    names = ["crop", "colour", "blur"]
    assert cells(names) == [("crop",), ("colour",), ("blur",), ("crop", "colour"), ("crop", "blur"), ("colour", "blur")]
    results = {"crop": 1.0, "colour": 2.0, "blur": 3.0, "crop+colour": 12.0, "crop+blur": 13.0, "colour+blur": 23.0}
    m = heatmap_matrix(results, names)
    assert m == [[1.0, 12.0, 13.0], [12.0, 2.0, 23.0], [13.0, 23.0, 3.0]]
    plt = pyplot()
    fig, ax = plt.subplots()
    draw_heatmap(ax, m, names)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xlabel() == "2nd transformation" and ax.get_ylabel() == "1st transformation"
    assert ax.images[0].get_array().shape == (3, 3)
    plt.close(fig)


def test_augment_pairs_end_to_end_resumes_cell_by_cell(tmp_path):
    out = tmp_path / "pairs"
    args = TINY + ["--out", str(out), "--transforms", "rotate,crop"]
    result = run_study("augment-pairs", args)
    assert result["cells"] == 3
    assert is_png(out / "heatmap.png") and (out / "summary.md").is_file()
    data = json.loads((out / "results.json").read_text())
    assert data["transforms"] == ["crop", "rotate"]  # canonical TRANSFORM_NAMES order
    m = data["matrix"]
    cell = {c: json.loads((out / "cells" / c / "result.json").read_text())["linear_h"] for c in ("crop", "rotate", "crop+rotate")}
    assert m == [[cell["crop"], cell["crop+rotate"]], [cell["crop+rotate"], cell["rotate"]]]
    rows = (out / "heatmap.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == ["crop", "rotate"] and [r.split(",")[0] for r in rows[1:]] == ["crop", "rotate"]
    # The cell's config is the paper's asymmetric setting: the transforms in one branch, identity in the other.
    cfg = (out / "cells" / "crop+rotate" / "config.yaml").read_text()
    assert "rotate_p: 1.0" in cfg and "rotate_p: 0.0" in cfg

    # An interrupted study: one cell lost its result. The rerun redoes only that cell's evaluation.
    kept = (out / "cells" / "crop" / "result.json").stat().st_mtime_ns
    weights = (out / "cells" / "rotate" / "model.safetensors").stat().st_mtime_ns
    (out / "cells" / "rotate" / "result.json").unlink()
    run_study("augment-pairs", args)
    assert (out / "cells" / "crop" / "result.json").stat().st_mtime_ns == kept
    assert (out / "cells" / "rotate" / "result.json").is_file()
    assert (out / "cells" / "rotate" / "model.safetensors").stat().st_mtime_ns == weights  # not retrained
    with pytest.raises(ConfigError, match="other settings"):
        run_study("augment-pairs", args + ["--steps", "3"])  # another budget into the same --out
    # A finished cell whose config is not what selfsup builds today (e.g. a default changed) is not reused.
    saved = json.loads((out / "cells" / "crop" / "result.json").read_text())
    saved["config"]["simclr"]["temperature"] = 0.123
    (out / "cells" / "crop" / "result.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"cells/crop was trained with another config .*differs in simclr"):
        run_study("augment-pairs", args)


def _images(n=64, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", ["rotation", "flip", "colour", "grayscale", "blur", "noise", "sobel", "cutout"])
def test_transform_probe_labels_are_the_transforms_applied(name):
    from selfsup.analyze.transform_probe import TASKS, ProbeTask, probe_views, task_augment

    task = TASKS[name]
    channels = 3 if task.rgb_only else 1
    mean, std = (0.5,) * channels, (0.25,) * channels
    images = _images(channels=channels)
    aug = task_augment(task, 8, mean, std)
    x, y = probe_views(images, task, aug, torch.Generator().manual_seed(1))
    _, params = aug(images, generator=torch.Generator().manual_seed(1), return_params=True)  # the same draw
    identity = task_augment(ProbeTask("nothing", 1, "flipped", {}), 8, mean, std)
    x0 = identity(images, generator=torch.Generator().manual_seed(2))
    assert x.shape == x0.shape and y.shape == (len(images),)
    assert set(y.tolist()) == set(range(task.num_classes))  # every class occurs in 64 balanced draws
    for i in range(len(images)):
        k = int(y[i])
        if name == "rotation":
            torch.testing.assert_close(x[i], torch.rot90(x0[i], k, dims=(-2, -1)), atol=1e-5, rtol=0)
        elif name == "flip":
            torch.testing.assert_close(x[i], x0[i].flip(-1) if k else x0[i], atol=1e-5, rtol=0)
        elif name == "grayscale":
            gray = aug.denormalize(x[i:i + 1])[0]
            channels_equal = torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[0], gray[2], atol=1e-5)
            assert channels_equal == bool(k)
        elif k == 0:
            torch.testing.assert_close(x[i], x0[i], atol=1e-5, rtol=0)  # not applied: the image is untouched
        elif params["blur_sigma"][i] > 0.5 or params["noise_sigma"][i] > 0.02 or name not in ("blur", "noise"):
            assert not torch.allclose(x[i], x0[i], atol=1e-3)  # applied (and not too weak to see): changed


def test_transform_probe_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "probe"
    result = run_study("transform-probe", TINY + ["--out", str(out), "--run", str(tiny_run), "--tasks",
                                                  "rotation,grayscale,blur"])
    assert result["tasks"] == ["rotation", "blur"]  # grayscale is a no-op on 1-channel images: skipped
    data = json.loads((out / "results.json").read_text())
    assert data["skipped"] == ["grayscale"]
    rot = data["rows"][0]
    assert rot["classes"] == 4 and 0 <= rot["probe_h"] <= 100 and 0 <= rot["probe_z"] <= 100
    assert data["h_dim"] == 64 and data["z_dim"] == 128
    assert is_png(out / "probe.png") and "rotation" in (out / "summary.md").read_text()


def test_transform_probe_with_seeds_pretrains_one_run_per_seed_and_reports_mean_and_sd(tmp_path):
    from selfsup.errors import ConfigError

    out = tmp_path / "probe"
    run_study("transform-probe", TINY + ["--out", str(out), "--tasks", "rotation", "--seeds", "2", "--seed", "3"])
    data = json.loads((out / "results.json").read_text())
    assert [Path(r).name for r in data["runs"]] == ["pretrain", "pretrain@seed4"]
    assert "seed: 4" in (out / "pretrain@seed4" / "config.yaml").read_text()
    assert "seed: 3" in (out / "pretrain" / "config.yaml").read_text()
    rot = data["rows"][0]
    a, b = rot["probe_h_per_seed"]
    assert rot["probe_h"] == pytest.approx((a + b) / 2) and rot["probe_h_std"] == pytest.approx(abs(a - b) / 2**0.5)
    diffs = [h - z for h, z in zip(rot["probe_h_per_seed"], rot["probe_z_per_seed"])]
    assert rot["h_minus_z_per_seed"] == pytest.approx(diffs)
    assert len(data["classes"]["linear_h_per_seed"]) == 2
    assert "±" in (out / "summary.md").read_text()
    with pytest.raises(ConfigError, match="--seeds"):
        run_study("transform-probe", TINY + ["--out", str(tmp_path / "x"), "--run", str(out / "pretrain"), "--seeds", "2"])


def test_tsne_end_to_end_trains_its_own_run(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "tsne"
    result = run_study("tsne", TINY + ["--out", str(out), "--points", "30"])
    assert (out / "pretrain" / "model.safetensors").is_file()
    assert set(result["knn20_loo"]) == {"h", "z", "tsne_h", "tsne_z"}
    rows = (out / "tsne.csv").read_text().splitlines()
    assert rows[0] == "label,h_x,h_y,z_x,z_y" and len(rows) == 31
    assert is_png(out / "tsne.png")


def test_tsne_without_scikit_learn_says_what_to_install(monkeypatch):
    import builtins

    from selfsup.analyze import tsne

    real_import = builtins.__import__

    def no_sklearn(name, *a, **kw):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ConfigError, match=r"selfsup\[viz\]"):
        tsne.require_tsne()


def test_head_study_none_linear(tmp_path):
    from selfsup.training.checkpoint import load_weights

    out = tmp_path / "head"
    run_study("head", TINY + ["--out", str(out), "--heads", "none,linear", "--dims", "8"])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["head"], r["out_dim"]) for r in rows] == [("none", 64), ("linear", 8)]
    none = rows[0]
    assert none["linear_h"] == none["linear_z"]  # no head: z is h
    assert not any(k.startswith("head.") for k in load_weights(out / "cells" / "none" / "model.safetensors"))
    assert is_png(out / "head.png")


def test_no_projection_head_config():
    from selfsup.models.backbones import build_backbone
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config
    from selfsup.methods import METHODS

    cfg = build_config(PretrainConfig, {"simclr": {"proj_layers": 0}})
    model = METHODS["simclr"].build(cfg.section, build_backbone("resnet18", in_channels=1, image_size=8, width=0.0625))
    assert isinstance(model.head, torch.nn.Identity)
    loss, _ = model(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8))
    assert torch.isfinite(loss)
    if "byol" in METHODS:
        with pytest.raises(ConfigError, match="byol.proj_layers"):
            build_config(PretrainConfig, {"method": "byol", "byol": {"proj_layers": 0}})


def test_batch_size_and_temperature_compare_methods_on_one_plot(tmp_path):
    from selfsup.methods import METHODS

    both = "simclr,byol" if "byol" in METHODS else "simclr"
    out = tmp_path / "bs"
    run_study("batch-size", tiny("--batch-size", "--steps") + ["--out", str(out), "--batch-sizes", "4,8", "--images", "16", "--methods", both])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["batch_size"], r["steps"]) for r in rows if r["method"] == "simclr"] == [(4, 4), (8, 2)]
    assert {r["method"] for r in rows} == set(both.split(","))
    assert is_png(out / "batch_size.png")

    out = tmp_path / "temp"
    run_study("temperature", TINY + ["--out", str(out), "--temperatures", "0.5", "--methods", both, "--seeds", "2"])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["temperature"]) for r in rows] == [("simclr", 0.5)] + (
        [("byol", None)] if "byol" in both else [])
    cfg = (out / "cells" / "simclr-t0.5" / "config.yaml").read_text()
    assert "  temperature: 0.5" in cfg and "seed: 0" in cfg
    assert "seed: 1" in (out / "cells" / "simclr-t0.5@seed1" / "config.yaml").read_text()
    per_seed = [json.loads((out / "cells" / c / "result.json").read_text())["linear_h"]
                for c in ("simclr-t0.5", "simclr-t0.5@seed1")]
    assert rows[0]["linear_h"] == pytest.approx(sum(per_seed) / 2)
    assert rows[0]["linear_h_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5)
    assert "±" in (out / "summary.md").read_text()
    assert "Best SimCLR temperature here: 0.5" in (out / "summary.md").read_text()
    assert is_png(out / "temperature.png")


def test_a_best_cell_is_only_called_separated_when_the_seed_spread_separates_it():
    from selfsup.analyze.outputs import not_separated, separation

    best = {"name": "a", "acc": 80.0, "acc_std": 0.5}
    close = {"name": "b", "acc": 79.0, "acc_std": 0.5}      # 80 - 0.5 = 79.5 = 79 + 0.5: intervals touch
    apart = {"name": "c", "acc": 78.0, "acc_std": 0.6}      # 79.5 > 78.6: separated
    rows = [best, close, apart]
    assert not_separated(best, rows, "acc") == [close]
    text = separation(best, rows, "acc", lambda r: r["name"])
    assert "from b " in text and "c" not in text.split("from")[1]
    assert "ahead of every other" in separation(best, [best, apart], "acc", lambda r: r["name"])
    many = [best] + [dict(close, name=str(i)) for i in range(9)]
    assert "9 of the other 9" in separation(best, many, "acc", lambda r: r["name"])
    one_seed = [{"acc": 80.0}, {"acc": 60.0}]
    assert not_separated(one_seed[0], one_seed, "acc") is None
    assert "one seed" in separation(one_seed[0], one_seed, "acc", str)


def test_views_study_writes_grids_of_the_documented_size(tmp_path):
    from PIL import Image

    out = tmp_path / "views"
    run_study("views", ["--dataset", "embedded", "--out", str(out), "--images", "3", "--views", "4",
                        "--set", "blur_p=1", "--set", "view2.solarize_p=1"])
    cfg = json.loads((out / "view_config.json").read_text())
    assert cfg["image_size"] == 28 and cfg["view"]["blur_p"] == 1.0 and cfg["view2"]["solarize_p"] == 1.0
    assert cfg["view"]["solarize_p"] == 0.0
    with Image.open(out / "views.png") as views, Image.open(out / "transforms.png") as singles:
        assert views.size == ((4 + 1) * 30 + 2, 3 * 30 + 2)  # save_view_grid's layout, 28 px tiles
        assert singles.size == ((7 + 1) * 30 + 2, 3 * 30 + 2)
    with pytest.raises(ConfigError, match="blur_q"):
        run_study("views", ["--dataset", "embedded", "--out", str(out), "--set", "blur_q=1"])
