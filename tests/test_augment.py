"""Tests for selfsup.views.augment: per-sample batched views (SimCLR Appendix A, BYOL Table 6).

Colour ops are checked against torchvision's functional reference, applied sample by sample with the
parameters the batched augmentation reports.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from selfsup.views.config import TRANSFORM_NAMES, ViewConfig, view_config_for
from selfsup.views.augment import BatchAugment, save_view_grid, two_views

# Everything off: only an identity resize. Tests switch on what they exercise.
OFF = dict(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def off(**kw) -> ViewConfig:
    return ViewConfig(**{**OFF, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(b=16, c=3, h=20, w=20, seed=0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=gen(seed))


def coordinate_image(b: int, h: int, w: int) -> torch.Tensor:
    """Channel 0 = x, channel 1 = y of each pixel centre as a fraction of the side; bilinear sampling of
    a linear ramp returns the sampled coordinate exactly (away from the half-pixel border)."""
    xs = (torch.arange(w) + 0.5) / w
    ys = (torch.arange(h) + 0.5) / h
    img = torch.zeros(b, 3, h, w)
    img[:, 0] = xs.view(1, 1, w)
    img[:, 1] = ys.view(1, h, 1)
    return img


# ------------------------------------------------------------------------------------------------
# Crop and flip
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,ratio,hw", [((0.08, 1.0), (3 / 4, 4 / 3), (64, 64)),
                                            ((0.2, 0.5), (0.25, 4.0), (48, 80)),
                                            ((0.9, 1.0), (1 / 3, 3.0), (64, 64))])
def test_crop_area_inside_scale_and_box_inside_image(scale, ratio, hw):
    h, w = hw
    aug = BatchAugment(off(crop_scale=scale, crop_ratio=ratio), 16, [0.0], [1.0])
    _, p = aug(rand_images(512, 1, h, w), generator=gen(1), return_params=True)
    area = p["crop_area"]
    assert (area >= scale[0] - 1e-5).all() and (area <= scale[1] + 1e-5).all()
    x0, y0, bw, bh = p["crop_box"].unbind(1)
    assert (x0 >= -1e-6).all() and (y0 >= -1e-6).all()
    assert (x0 + bw <= 1 + 1e-5).all() and (y0 + bh <= 1 + 1e-5).all()
    torch.testing.assert_close(bw * bh, area)
    # the draw covers the scale range, not one corner of it
    assert area.min() < scale[0] + 0.1 * (scale[1] - scale[0]) + 1e-6
    assert area.max() > scale[1] - 0.1 * (scale[1] - scale[0]) - 1e-6


def test_crop_geometry_from_coordinate_image():
    size, src = 16, 64
    aug = BatchAugment(off(crop_scale=(0.08, 1.0)), size, [0.0], [1.0])
    out, p = aug(coordinate_image(256, src, src), generator=gen(2), return_params=True)
    sx, sy = out[:, 0], out[:, 1]
    # every sampled point lies inside the source image
    assert out[:, :2].min() >= 0.0 and out[:, :2].max() <= 1.0
    # span of sampled pixel centres = box side * (size - 1) / size (half-pixel border clamping aside)
    span_x = (sx.amax(dim=(1, 2)) - sx.amin(dim=(1, 2))) * size / (size - 1)
    span_y = (sy.amax(dim=(1, 2)) - sy.amin(dim=(1, 2))) * size / (size - 1)
    tol = 1.5 / src
    assert (span_x - p["crop_box"][:, 2]).abs().max() < tol
    assert (span_y - p["crop_box"][:, 3]).abs().max() < tol
    assert ((span_x * span_y) >= 0.08 - 3 * tol).all()
    # the box position agrees too: the centre of the sampled coordinates is the box centre
    cx = p["crop_box"][:, 0] + p["crop_box"][:, 2] / 2
    assert ((sx.amax(dim=(1, 2)) + sx.amin(dim=(1, 2))) / 2 - cx).abs().max() < tol


def test_no_crop_is_identity_resize():
    x = rand_images(4, 3, 20, 20)
    out = BatchAugment(off(), 20, [0.0], [1.0])(x, generator=gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    # non-square source with scale (1, 1): the whole image, resized
    out, p = BatchAugment(off(), 10, [0.0], [1.0])(rand_images(4, 1, 20, 40), return_params=True)
    torch.testing.assert_close(p["crop_box"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4))


def test_flip_rate_and_direction():
    n, flip_p = 4000, 0.3
    aug = BatchAugment(off(flip_p=flip_p), 8, [0.0], [1.0])
    out, p = aug(coordinate_image(n, 8, 8), generator=gen(3), return_params=True)
    rate = p["flipped"].float().mean().item()
    assert abs(rate - flip_p) < 4 * math.sqrt(flip_p * (1 - flip_p) / n)
    decreasing = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert torch.equal(decreasing, p["flipped"])
    torch.testing.assert_close(out[p["flipped"]], coordinate_image(n, 8, 8)[p["flipped"]].flip(-1), atol=1e-5, rtol=0)


def test_rotation_matches_rot90_after_flip():
    x = rand_images(64, 3, 12, 12)
    out, p = BatchAugment(off(rotate_p=1.0, flip_p=0.5), 12, [0.0], [1.0])(x, generator=gen(4), return_params=True)
    assert set(p["rotation_k"].tolist()) == {1, 2, 3}
    for i in range(len(x)):
        ref = x[i].flip(-1) if p["flipped"][i] else x[i]
        ref = torch.rot90(ref, int(p["rotation_k"][i]), dims=(-2, -1))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    _, p0 = BatchAugment(off(), 12, [0.0], [1.0])(x, return_params=True)
    assert (p0["rotation_k"] == 0).all()


# ------------------------------------------------------------------------------------------------
# Randomness: per sample, reproducible, independent draws
# ------------------------------------------------------------------------------------------------
def test_per_sample_independence_and_seeding():
    x = rand_images(1, 3, 32, 32).expand(32, -1, -1, -1)  # one image repeated
    aug = BatchAugment(ViewConfig(solarize_p=0.5), 24, [0.5] * 3, [0.25] * 3)
    out, p = aug(x, generator=gen(5), return_params=True)
    assert p["crop_area"].unique().numel() == 32
    assert 0 < p["flipped"].sum() < 32 and 0 < p["jittered"].sum() < 32
    flat = out.flatten(1)
    dists = torch.cdist(flat, flat) + torch.eye(32) * 1e9
    assert dists.min() > 1e-3  # every sample got its own view
    again, p2 = aug(x, generator=gen(5), return_params=True)
    assert torch.equal(out, again)
    assert all(torch.equal(p[k], p2[k]) for k in p)
    v1, v2 = two_views(x, aug, generator=gen(6))
    assert not torch.allclose(v1, v2)
    w1, w2 = two_views(x, aug, generator=gen(6))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_default_generator_draws_differ():
    aug = BatchAugment(ViewConfig(), 16, [0.5], [0.5])
    x = rand_images(8, 1, 16, 16)
    assert not torch.equal(aug(x), aug(x))


# ------------------------------------------------------------------------------------------------
# Types, ranges, normalisation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_output_shape_dtype_range(channels, dtype):
    x = rand_images(6, channels, 28, 20)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    mean, std = [0.3] * channels, [0.2] * channels
    cfg = ViewConfig(blur_p=0.5, solarize_p=0.5, cutout_p=0.5, sobel_p=0.3, noise_p=0.5, rotate_p=0.5)
    aug = BatchAugment(cfg, 24, mean, std)
    out = aug(x, generator=gen(7))
    assert out.shape == (6, channels, 24, 24) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    back = aug.denormalize(out)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5


def test_uint8_is_scaled_to_unit_range():
    x = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8, generator=gen())
    aug = BatchAugment(off(), 10, [0.0], [1.0])
    torch.testing.assert_close(aug(x), x.float() / 255, atol=1e-5, rtol=0)


def test_normalisation_uses_mean_and_std():
    x = rand_images(4, 3, 10, 10)
    mean, std = [0.1, 0.5, 0.9], [0.5, 0.25, 2.0]
    out = BatchAugment(off(), 10, mean, std)(x)
    ref = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mean"):
        BatchAugment(off(), 10, [0.1, 0.2, 0.3], [1.0])(rand_images(2, 1, 10, 10))
    with pytest.raises(ValueError, match="std"):
        BatchAugment(off(), 10, [0.0], [0.0])


def test_runs_in_float32_under_autocast():
    aug = BatchAugment(ViewConfig(blur_p=1.0), 16, [0.5], [0.5])
    x = rand_images(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(x, generator=gen())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, aug(x, generator=gen()))


# ------------------------------------------------------------------------------------------------
# Colour: grayscale, jitter against torchvision
# ------------------------------------------------------------------------------------------------
def test_grayscale_makes_channels_equal_luma():
    x = rand_images(8, 3, 12, 12)
    out, p = BatchAugment(off(grayscale_p=1.0), 12, [0.0], [1.0])(x, return_params=True)
    assert p["gray"].all()
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])
    torch.testing.assert_close(out, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-5, rtol=0)
    # 1-channel: a no-op
    g = rand_images(4, 1, 12, 12)
    torch.testing.assert_close(BatchAugment(off(grayscale_p=1.0), 12, [0.0], [1.0])(g), g, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_strength_zero_is_identity(channels):
    x = rand_images(8, channels, 12, 12)
    out, p = BatchAugment(off(jitter_p=1.0, jitter_strength=0.0), 12, [0.0], [1.0])(x, return_params=True)
    assert p["jittered"].all()
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


_REFERENCE_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@pytest.mark.parametrize("op", range(4))
def test_each_jitter_op_matches_torchvision(op):
    strengths = [0.0, 0.0, 0.0, 0.0]
    strengths[op] = 0.45 if op == 3 else 0.8
    cfg = off(jitter_p=1.0, jitter_brightness=strengths[0], jitter_contrast=strengths[1],
              jitter_saturation=strengths[2], jitter_hue=strengths[3])
    x = rand_images(12, 3, 10, 10, seed=8)
    out, p = BatchAugment(cfg, 10, [0.0], [1.0])(x, generator=gen(9), return_params=True)
    factors = p["jitter_factors"][:, op]
    lo, hi = (-strengths[3], strengths[3]) if op == 3 else (1 - strengths[op], 1 + strengths[op])
    assert (factors >= lo).all() and (factors <= hi).all()
    for i in range(len(x)):
        ref = _REFERENCE_OPS[op](x[i], float(factors[i]))
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0)


def test_full_jitter_applies_ops_in_per_sample_order():
    x = rand_images(48, 3, 8, 8, seed=10)
    cfg = off(jitter_p=0.7, jitter_strength=1.0)
    out, p = BatchAugment(cfg, 8, [0.0], [1.0])(x, generator=gen(11), return_params=True)
    orders = {tuple(o) for o in p["jitter_order"][p["jittered"]].tolist()}
    assert len(orders) > 6  # several of the 24 orders, drawn per sample
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    for i in range(len(x)):
        ref = x[i]
        if p["jittered"][i]:
            for k in p["jitter_order"][i].tolist():
                ref = _REFERENCE_OPS[k](ref, float(p["jitter_factors"][i, k]))
        else:
            torch.testing.assert_close(p["jitter_factors"][i], torch.tensor([1.0, 1.0, 1.0, 0.0]))
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def test_jitter_on_one_channel_uses_brightness_and_contrast_only():
    x = rand_images(16, 1, 8, 8)
    out, p = BatchAugment(off(jitter_p=1.0), 8, [0.0], [1.0])(x, generator=gen(12), return_params=True)
    for i in range(len(x)):
        ref = x[i]
        for k in p["jitter_order"][i].tolist():
            if k < 2:
                ref = _REFERENCE_OPS[k](ref, float(p["jitter_factors"][i, k]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_jitter_rate():
    n = 2000
    aug = BatchAugment(off(jitter_p=0.8), 4, [0.0], [1.0])
    _, p = aug(rand_images(n, 3, 4, 4), generator=gen(13), return_params=True)
    assert abs(p["jittered"].float().mean().item() - 0.8) < 4 * math.sqrt(0.16 / n)


# ------------------------------------------------------------------------------------------------
# Blur, solarize, ablation ops
# ------------------------------------------------------------------------------------------------
def test_blur_p0_is_identity_and_p1_matches_torchvision():
    x = rand_images(6, 3, 40, 40)
    torch.testing.assert_close(BatchAugment(off(blur_p=0.0), 40, [0.0], [1.0])(x), x, atol=1e-5, rtol=0)
    cfg = off(blur_p=1.0, blur_sigma=(0.5, 3.0), blur_sigma_ref_size=40)
    aug = BatchAugment(cfg, 40, [0.0], [1.0])
    assert aug.blur_kernel_size == 5  # 10% of 40 = 4, made odd
    out, p = aug(x, generator=gen(14), return_params=True)
    assert p["blurred"].all()
    sig = p["blur_sigma"]
    assert (sig >= 0.5).all() and (sig <= 3.0).all() and sig.unique().numel() == 6
    for i in range(len(x)):
        ref = TF.gaussian_blur(x[i], kernel_size=[5, 5], sigma=[float(sig[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_blur_sigma_and_kernel_scale_with_size():
    assert BatchAugment(ViewConfig(), 224, [0.0], [1.0]).blur_kernel_size == 23
    assert BatchAugment(ViewConfig(), 96, [0.0], [1.0]).blur_kernel_size == 11
    assert BatchAugment(ViewConfig(), 16, [0.0], [1.0]).blur_kernel_size == 3
    _, p = BatchAugment(off(blur_p=1.0), 112, [0.0], [1.0])(rand_images(64, 1, 16, 16), return_params=True)
    assert p["blur_sigma"].min() >= 0.05 - 1e-6 and p["blur_sigma"].max() <= 1.0 + 1e-6


def test_solarize_inverts_above_threshold():
    x = rand_images(8, 3, 10, 10)
    out, p = BatchAugment(off(solarize_p=1.0, solarize_threshold=0.6), 10, [0.0], [1.0])(x, return_params=True)
    assert p["solarized"].all()
    torch.testing.assert_close(out, torch.where(x >= 0.6, 1 - x, x), atol=1e-5, rtol=0)
    out, p = BatchAugment(off(solarize_p=0.5), 10, [0.0], [1.0])(x, generator=gen(15), return_params=True)
    keep = ~p["solarized"]
    assert 0 < keep.sum() < 8
    torch.testing.assert_close(out[keep], x[keep], atol=1e-5, rtol=0)


def test_cutout_zeroes_one_square_after_normalising():
    x = rand_images(32, 3, 20, 20) * 0.5 + 0.5  # never equal to the mean 0.25
    out, p = BatchAugment(off(cutout_p=1.0), 20, [0.25] * 3, [0.5] * 3)(x, generator=gen(16), return_params=True)
    zero = (out == 0).all(dim=1)  # (B, H, W)
    frac = zero.float().mean(dim=(1, 2))
    side = p["cutout_box"][:, 2]
    assert (side >= 0.1 - 0.5 / 20).all() and (side <= 0.5 + 0.5 / 20).all()  # rounded to whole pixels
    assert side.unique().numel() > 3
    torch.testing.assert_close(frac, side**2)
    rows, cols = zero.any(dim=2), zero.any(dim=1)
    assert torch.equal(zero, rows.unsqueeze(2) & cols.unsqueeze(1))  # a rectangle
    assert torch.equal(rows.sum(1), cols.sum(1))  # a square
    x0, y0 = p["cutout_box"][:, 0] * 20, p["cutout_box"][:, 1] * 20
    assert torch.equal(rows.float().argmax(1), y0.round().long())
    assert torch.equal(cols.float().argmax(1), x0.round().long())


def test_sobel_and_noise():
    x = torch.zeros(4, 3, 16, 16)
    x[..., 8:] = 1.0  # vertical step edge
    out, p = BatchAugment(off(sobel_p=1.0), 16, [0.0], [1.0])(x, return_params=True)
    assert p["sobel"].all()
    assert torch.equal(out[:, 0], out[:, 2])
    expect = torch.zeros(16)
    expect[[7, 8]] = 1.0  # central differences see the step at the two columns beside it
    torch.testing.assert_close(out, expect.expand_as(out), atol=1e-5, rtol=0)
    flat = torch.full((2, 1, 8, 8), 0.5)
    assert (BatchAugment(off(sobel_p=1.0), 8, [0.0], [1.0])(flat) == 0).all()
    out, p = BatchAugment(off(noise_p=1.0), 16, [0.0], [1.0])(x * 0 + 0.5, generator=gen(17), return_params=True)
    resid_std = (out - 0.5).flatten(1).std(dim=1)
    torch.testing.assert_close(resid_std, p["noise_sigma"], atol=0.03, rtol=0.1)
    assert (p["noise_sigma"] <= 0.2).all()


# ------------------------------------------------------------------------------------------------
# Config: validation, presets, ablation builder
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("flip_p", 1.5), ("jitter_p", -0.1), ("grayscale_p", 2.0), ("blur_p", -1.0), ("solarize_p", 1.01),
    ("cutout_p", 3.0), ("sobel_p", -0.5), ("noise_p", 7.0), ("rotate_p", 1.2),
    ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.5, 0.2)), ("crop_scale", (0.5, 1.5)), ("crop_scale", (0.5,)),
    ("crop_ratio", (0.0, 1.0)), ("crop_ratio", (2.0, 1.0)),
    ("blur_sigma", (-0.1, 1.0)), ("blur_sigma", (2.0, 1.0)), ("blur_kernel_frac", 0.0),
    ("jitter_strength", -1.0), ("jitter_strength", 3.0), ("jitter_brightness", -0.1), ("jitter_hue", 0.6),
    ("solarize_threshold", 1.5), ("blur_sigma_ref_size", 0.0),
])
def test_validate_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ViewConfig(**{field: value})
    cfg = ViewConfig()
    setattr(cfg, field, value)  # mutated after construction: validate() and BatchAugment catch it
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        BatchAugment(cfg, 8, [0.0], [1.0])


def test_config_roundtrips_through_asdict_with_lists():
    cfg = ViewConfig.byol(224, 2)
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    assert ViewConfig(**d) == cfg


def test_simclr_presets_follow_the_paper():
    big = ViewConfig.simclr(224)
    assert big.crop_scale == (0.08, 1.0) and big.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert big.flip_p == 0.5 and big.jitter_p == 0.8 and big.grayscale_p == 0.2
    assert (big.brightness, big.contrast, big.saturation, big.hue) == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert big.blur_p == 0.5 and big.blur_sigma == (0.1, 2.0) and big.blur_kernel_frac == 0.1
    assert big.solarize_p == 0.0
    small = ViewConfig.simclr(32)
    assert small.jitter_strength == 0.5 and small.blur_p == 0.0
    assert (small.brightness, small.hue) == pytest.approx((0.4, 0.1))
    assert ViewConfig.simclr(28).blur_p == 0.0 and ViewConfig.simclr(96).blur_p == 0.5


def test_byol_presets_follow_table_6():
    v1, v2 = ViewConfig.byol(224, 1), ViewConfig.byol(224, 2)
    for v in (v1, v2):
        assert (v.brightness, v.contrast, v.saturation, v.hue) == pytest.approx((0.4, 0.4, 0.2, 0.1))
        assert v.jitter_p == 0.8 and v.grayscale_p == 0.2 and v.flip_p == 0.5
        assert v.crop_scale == (0.08, 1.0) and v.blur_sigma == (0.1, 2.0)
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)
    assert (v2.blur_p, v2.solarize_p) == (0.1, 0.2)
    assert ViewConfig.byol(32, 1).blur_p == 0.0 and ViewConfig.byol(32, 2).solarize_p == 0.2
    with pytest.raises(ValueError, match="view"):
        ViewConfig.byol(224, 3)


@pytest.mark.parametrize("names", [(), ("crop",), ("colour",), ("crop", "colour"), ("blur", "rotate"),
                                   ("cutout", "sobel", "noise")])
def test_view_config_for_picks_only_named_ops(names):
    cfg = view_config_for(names, 28)
    on = {
        "crop": cfg.crop_scale == (0.08, 1.0) and cfg.flip_p == 0.5,
        "colour": cfg.jitter_p == 0.8 and cfg.grayscale_p == 0.2 and cfg.jitter_strength == 0.5,
        "blur": cfg.blur_p == 1.0, "cutout": cfg.cutout_p == 1.0, "sobel": cfg.sobel_p == 1.0,
        "noise": cfg.noise_p == 1.0, "rotate": cfg.rotate_p == 1.0,
    }
    off_ = {
        "crop": cfg.crop_scale == (1.0, 1.0) and cfg.flip_p == 0.0,
        "colour": cfg.jitter_p == 0.0 and cfg.grayscale_p == 0.0,
        "blur": cfg.blur_p == 0.0, "cutout": cfg.cutout_p == 0.0, "sobel": cfg.sobel_p == 0.0,
        "noise": cfg.noise_p == 0.0, "rotate": cfg.rotate_p == 0.0,
    }
    for name in TRANSFORM_NAMES:
        assert (on if name in names else off_)[name], name
    assert cfg.solarize_p == 0.0
    if not names:  # nothing named: an identity resize
        x = rand_images(4, 1, 28, 28)
        torch.testing.assert_close(BatchAugment(cfg, 28, [0.0], [1.0])(x), x, atol=1e-5, rtol=0)
    assert view_config_for(["colour"], 224).jitter_strength == 1.0
    with pytest.raises(ValueError, match="unknown"):
        view_config_for(["crop", "color"], 28)


# ------------------------------------------------------------------------------------------------
# Visual check
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_save_view_grid_png_dimensions(tmp_path, channels):
    from PIL import Image

    x = (rand_images(5, channels, 30, 30) * 255).to(torch.uint8)
    mean, std = [0.5] * channels, [0.25] * channels
    augs = [BatchAugment(ViewConfig.byol(24, 1), 24, mean, std), BatchAugment(ViewConfig.byol(24, 2), 24, mean, std)]
    path = save_view_grid(x, augs, tmp_path / "sub" / "grid.png", n_images=4, n_views=3, seed=1)
    assert path.exists() and path.suffix == ".png"
    with Image.open(path) as im:
        assert im.size == (4 * (24 + 2) + 2, 4 * (24 + 2) + 2)
    path2 = save_view_grid(x, augs[0], tmp_path / "one.png", n_images=8, n_views=2)
    with Image.open(path2) as im:  # only 5 images available
        assert im.size == (3 * 26 + 2, 5 * 26 + 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_cpu_generator():
    x = rand_images(16, 3, 32, 32)
    aug = BatchAugment(ViewConfig(solarize_p=0.3, rotate_p=0.3), 24, [0.5] * 3, [0.25] * 3)
    cpu = aug(x, generator=gen(18))
    cuda = aug(x.cuda(), generator=gen(18))
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels", [1, 3])
def test_cuda_forward_has_no_host_sync(channels):
    cfg = ViewConfig(solarize_p=0.5, cutout_p=0.5, sobel_p=0.3, noise_p=0.5, rotate_p=0.5, blur_p=0.5)
    aug = BatchAugment(cfg, 32, [0.5] * channels, [0.25] * channels)
    x = torch.randint(0, 256, (64, channels, 40, 48), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    aug(x, generator=g)  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, params = aug(x, generator=g, return_params=True)
        v1, v2 = two_views(x.float() / 255, aug, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and all(p.device.type == "cuda" for p in params.values())
    assert torch.isfinite(out).all() and not torch.equal(v1, v2)
