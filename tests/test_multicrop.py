"""Tests for selfsup.views.multicrop: two global views plus N local crops (SwAV Sec. 3.2, DINO Sec. 3.1).

The local crops are drawn in one batched call; these tests check that this is the same thing as N
independent draws of the documented local distribution, and that with no local crops nothing changes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from selfsup.errors import ConfigError
from selfsup.models.backbones import build_backbone
from selfsup.views.augment import BatchAugment, two_views
from selfsup.views.config import MultiCropConfig, ViewConfig, local_size_for, local_view_config
from selfsup.views.multicrop import MultiCrop, save_multicrop_grid

MEAN, STD = [0.5], [0.25]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uint8_images(b: int = 8, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), generator=gen(seed), dtype=torch.uint8)


def simclr_crop(num_local: int = 4, size: int = 28, channels: int = 1, **kw) -> MultiCrop:
    v = ViewConfig.simclr(size)
    return MultiCrop(v, v, size, MEAN * channels, STD * channels, MultiCropConfig(num_local=num_local, **kw))


def byol_crop(num_local: int = 4, size: int = 64, **kw) -> MultiCrop:
    return MultiCrop(ViewConfig.byol(size, 1), ViewConfig.byol(size, 2), size, MEAN * 3, STD * 3,
                     MultiCropConfig(num_local=num_local, **kw))


# ------------------------------------------------------------------------------------------------
# Shapes, sizes, and the two views unchanged without local crops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,dtype", [(1, torch.uint8), (3, torch.float32)])
@pytest.mark.parametrize("num_local,local_size", [(0, None), (1, None), (4, None), (3, 16)])
def test_views_shapes_and_sizes(channels, dtype, num_local, local_size):
    images = uint8_images(6, channels)
    images = images if dtype == torch.uint8 else images.float() / 255
    mc = simclr_crop(num_local, channels=channels, local_size=local_size)
    views = mc(images, gen())
    want_local = 12 if local_size is None else local_size  # 96 px at 224 px -> 12 px at 28 px
    assert mc.num_views == len(views) == 2 + num_local
    assert mc.sizes == [28, 28] + [want_local] * num_local
    for v, s in zip(views, mc.sizes):
        assert v.shape == (6, channels, s, s) and v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize("make,size,channels", [(simclr_crop, 28, 1), (byol_crop, 64, 3)])
def test_zero_local_crops_reproduce_the_two_views_exactly(make, size, channels):
    # BYOL at 64 px has blur and solarization on: every op of both views is compared. global_scale is
    # set on purpose: it applies only when local crops are on.
    images = uint8_images(16, channels, size)
    v1, v2 = (ViewConfig.simclr(size),) * 2 if make is simclr_crop else (ViewConfig.byol(size, 1), ViewConfig.byol(size, 2))
    mc = make(0, size=size, global_scale=(0.5, 1.0))
    g_ref, g_mc = gen(3), gen(3)
    ref = two_views(images, BatchAugment(v1, size, MEAN * channels, STD * channels),
                    BatchAugment(v2, size, MEAN * channels, STD * channels), generator=g_ref)
    views = mc(images, g_mc)
    assert len(views) == 2 and mc.local is None
    assert torch.equal(views[0], ref[0]) and torch.equal(views[1], ref[1])
    # Same generator state afterwards: the next step's draws are unchanged too.
    assert torch.equal(torch.rand(4, generator=g_ref), torch.rand(4, generator=g_mc))


def test_global_views_take_global_scale_when_local_crops_are_on():
    _, params = simclr_crop(2, global_scale=(0.5, 0.6))(uint8_images(512), gen(), return_params=True)
    for p in params[:2]:
        assert p["crop_area"].min() >= 0.5 - 1e-5 and p["crop_area"].max() <= 0.6 + 1e-5
    # global_scale None: the global views keep their own crop_scale (SimCLR's 0.08-1).
    mc = simclr_crop(2, global_scale=None)
    assert mc.global1.cfg.crop_scale == mc.global2.cfg.crop_scale == (0.08, 1.0)


def test_local_crop_areas_inside_local_scale():
    lo, hi = 0.05, 0.3
    _, params = simclr_crop(3, local_scale=(lo, hi))(uint8_images(1024), gen(), return_params=True)
    area = torch.stack([p["crop_area"] for p in params[2:]])
    assert area.shape == (3, 1024)
    assert area.min() >= lo - 1e-5 and area.max() <= hi + 1e-5
    # ... and they span it: uniform draws reach within 2% of the range's ends.
    assert area.min() < lo + 0.02 * (hi - lo) and area.max() > hi - 0.02 * (hi - lo)


def test_local_crops_come_from_their_own_image():
    # Image i is the constant i / 255 and nothing but the crop acts, so crop k of image i must be i / 255 everywhere.
    b = 32
    images = torch.arange(b, dtype=torch.uint8).view(b, 1, 1, 1).expand(b, 1, 28, 28).contiguous()
    plain = ViewConfig(crop_scale=(0.5, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    mc = MultiCrop(plain, plain, 28, [0.0], [1.0], MultiCropConfig(num_local=5))
    for view in mc(images, gen()):
        torch.testing.assert_close(view, (torch.arange(b) / 255.0).view(b, 1, 1, 1).expand_as(view))


def test_crops_of_one_image_are_independent_draws():
    n, b = 4, 2048
    views, params = simclr_crop(n)(uint8_images(b), gen(1), return_params=True)
    locals_ = params[2:]
    for i in range(n):
        for j in range(i + 1, n):
            a, c = locals_[i], locals_[j]
            assert not torch.isclose(a["crop_box"], c["crop_box"]).all(dim=1).any()  # no repeated box
            r = torch.corrcoef(torch.stack([a["crop_area"], c["crop_area"]]))[0, 1]
            assert abs(r) < 0.1  # 2048 pairs: |r| of independent draws is ~0.02
            agree = (a["flipped"] == c["flipped"]).float().mean()
            assert abs(agree - 0.5) < 0.05  # independent fair flips agree half the time
            assert not torch.equal(views[2 + i], views[2 + j])


def test_determinism_with_a_seeded_generator():
    mc = byol_crop(3, size=48)
    images = uint8_images(8, 3, 48)
    first, again, other = mc(images, gen(7)), mc(images, gen(7)), mc(images, gen(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(a, b) for a, b in zip(first, other))


def test_batched_local_draw_has_the_distribution_of_separate_per_crop_draws():
    # The batched call must draw from the documented local distribution (local_view_config at local_size), like
    # N separate calls would. Compared as distributions (two-sample KS tests, binomial rates), not values.
    size, n, b = 64, 3, 1024
    v1, v2 = ViewConfig.byol(size, 1), ViewConfig.byol(size, 2)
    cfg = MultiCropConfig(num_local=n)
    mc = MultiCrop(v1, v2, size, MEAN * 3, STD * 3, cfg)
    local_size = local_size_for(size)
    reference = BatchAugment(local_view_config(v1, v2, cfg.local_scale, size, local_size), local_size, MEAN * 3, STD * 3)
    images = uint8_images(b, 3, size, seed=2)
    views, params = mc(images, gen(11), return_params=True)
    g = gen(12)
    ref = [reference(images, generator=g, return_params=True) for _ in range(n)]
    batched = {k: torch.cat([p[k] for p in params[2:]]) for k in params[2]}
    separate = {k: torch.cat([p[k] for _, p in ref]) for k in ref[0][1]}
    for key in ("crop_area", "blur_sigma"):
        assert ks_2samp(batched[key].numpy(), separate[key].numpy()).pvalue > 0.01, key
    pixel_mean = torch.cat([v.mean(dim=(1, 2, 3)) for v in views[2:]]), torch.cat([v.mean(dim=(1, 2, 3)) for v, _ in ref])
    assert ks_2samp(pixel_mean[0].numpy(), pixel_mean[1].numpy()).pvalue > 0.01
    for key in ("flipped", "jittered", "gray", "blurred", "solarized"):
        p1, p2 = batched[key].float().mean(), separate[key].float().mean()
        pooled = (p1 + p2) / 2
        se = (pooled * (1 - pooled) * 2 / (n * b)).sqrt().clamp_min(1e-6)
        assert abs(p1 - p2) / se < 4, key


def test_no_host_sync_runs_on_meta_tensors():
    # Meta tensors hold no values: reading one on the host (.item(), bool(), a data-dependent shape) raises,
    # so a clean run on them shows forward never waits for the device (the CPU-testable half of CUDA's
    # sync-debug check in test_augment).
    images = torch.empty(4, 3, 64, 64, dtype=torch.uint8, device="meta")
    views, params = byol_crop(3)(images, return_params=True)
    assert [v.shape[-1] for v in views] == [64, 64, 27, 27, 27] and all(v.is_meta for v in views)
    assert all(t.is_meta for p in params for t in p.values())


# ------------------------------------------------------------------------------------------------
# The local crops' distribution
# ------------------------------------------------------------------------------------------------
def test_local_view_is_swav_shared_distribution_for_equal_global_views():
    v = ViewConfig.simclr(224)
    local = local_view_config(v, v, (0.05, 0.14), 224, 96)
    assert local == dataclasses.replace(v, crop_scale=(0.05, 0.14), blur_sigma_ref_size=96.0)


def test_local_view_is_dino_local_recipe_for_byol_global_views():
    local = local_view_config(ViewConfig.byol(224, 1), ViewConfig.byol(224, 2), (0.05, 0.4), 224, 96)
    # main_dino.py local_transfo: flip, jitter .4/.4/.2/.1 p .8, grayscale .2, blur p .5, no solarization
    assert (local.brightness, local.contrast, local.saturation, local.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (local.flip_p, local.jitter_p, local.grayscale_p) == (0.5, 0.8, 0.2)
    assert (local.blur_p, local.solarize_p, local.crop_scale) == (0.5, 0.0, (0.05, 0.4))


def test_local_blur_sigma_in_pixels_matches_the_global_views():
    # The official codes blur every crop with sigma 0.1-2 px of that crop: the local crops' sigma in their
    # pixels has the global views' range, not one shrunk by local_size / image_size.
    v = dataclasses.replace(ViewConfig.simclr(64), blur_p=1.0)
    _, params = MultiCrop(v, v, 64, MEAN, STD, MultiCropConfig(num_local=2))(uint8_images(512, 1, 64), gen(), return_params=True)
    lo, hi = 0.1 * 64 / 224, 2.0 * 64 / 224
    for p in params:
        sigma = p["blur_sigma"]
        assert sigma.min() >= lo - 1e-6 and sigma.max() <= hi + 1e-6 and sigma.max() > 0.95 * hi


def test_explicit_local_view_takes_local_scale():
    local = dataclasses.replace(ViewConfig.simclr(28), crop_scale=(0.9, 1.0), grayscale_p=1.0)
    v = ViewConfig.simclr(28)
    mc = MultiCrop(v, v, 28, MEAN, STD, MultiCropConfig(num_local=2, local_scale=(0.1, 0.2)), local_view=local)
    assert mc.local.cfg == dataclasses.replace(local, crop_scale=(0.1, 0.2))


def test_local_size_rule():
    assert [local_size_for(s) for s in (224, 28, 32, 64, 96, 1)] == [96, 12, 14, 27, 41, 1]
    assert MultiCropConfig(num_local=2).resolved_local_size(28) == 12
    assert MultiCropConfig(num_local=2, local_size=16).resolved_local_size(28) == 16


def test_default_encoder_takes_local_crops():
    # The CPU default encoder, built for 28 px, pools any input size: 12-16 px local crops end on 1x1 maps.
    enc = build_backbone("resnet18_narrow", in_channels=1, image_size=28).eval()
    for side in (12, 14, 16, 28):
        x = torch.randn(2, 1, side, side)
        assert enc(x).shape == (2, enc.num_features)
        assert enc.forward_features(x).shape[-1] == (2 if side == 28 else 1)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,key", [
    (dict(num_local=-1), "multicrop.num_local"),
    (dict(num_local=2.0), "multicrop.num_local"),
    (dict(num_local=True), "multicrop.num_local"),
    (dict(local_size=0), "multicrop.local_size"),
    (dict(local_size=12.5), "multicrop.local_size"),
    (dict(local_scale=(0.0, 0.1)), "multicrop.local_scale"),
    (dict(local_scale=(0.3, 0.2)), "multicrop.local_scale"),
    (dict(local_scale=(0.1, 1.5)), "multicrop.local_scale"),
    (dict(local_scale=(0.1,)), "multicrop.local_scale"),
    (dict(local_scale="0.05,0.14"), "multicrop.local_scale"),
    (dict(global_scale=(0.0, 1.0)), "multicrop.global_scale"),
    (dict(global_scale=(0.4, "1")), "multicrop.global_scale"),
])
def test_bad_settings_are_refused_naming_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MultiCropConfig(**kw)


def test_settings_accept_lists_and_refuse_local_crops_larger_than_the_image():
    cfg = MultiCropConfig(num_local=2, local_scale=[0.05, 0.4], global_scale=[0.4, 1])
    assert cfg.local_scale == (0.05, 0.4) and cfg.global_scale == (0.4, 1.0)
    v = ViewConfig.simclr(28)
    with pytest.raises(ConfigError, match=r"multicrop\.local_size: 32 px is larger than the 28 px"):
        MultiCrop(v, v, 28, MEAN, STD, MultiCropConfig(num_local=2, local_size=32))


# ------------------------------------------------------------------------------------------------
# Picture
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("display", ["pad", "resize"])
def test_save_multicrop_grid_shows_global_and_local_crops(tmp_path, display):
    mc = simclr_crop(3)  # 28 px global views, 12 px local crops
    path = save_multicrop_grid(uint8_images(5), mc, tmp_path / "mc.png", n_images=4, local_display=display)
    img = Image.open(path)
    assert img.size == (6 * 30 + 2, 4 * 30 + 2)  # 1 original + 2 global + 3 local columns, 28 px + 2 padding
    pixels = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32))
    first_local = pixels[2:30, 3 * 30 + 2:3 * 30 + 30]  # row 0, column 3: the first local crop
    border = torch.cat([first_local[:8].flatten(), first_local[-8:].flatten()])  # (28 - 12) / 2 = 8 px of padding
    if display == "pad":
        assert (border == 128).all()  # mid grey (0.5 * 255, rounded by save_image)
    else:
        assert not (border == 128).all()


def test_save_multicrop_grid_refuses_an_unknown_display(tmp_path):
    with pytest.raises(ValueError, match="local_display"):
        save_multicrop_grid(uint8_images(2), simclr_crop(1), tmp_path / "x.png", local_display="stretch")
