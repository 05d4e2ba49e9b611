"""Batched, per-sample stochastic augmentations for two-view self-supervised learning.

SimCLR (Chen et al. 2020, Appendix A) and BYOL (Grill et al. 2020, Table 6) draw each view by an
independent sample of one stochastic pipeline:

    random resized crop + horizontal flip -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p)
    -> solarize (p)

plus the ablation-only transforms of SimCLR Figure 5 (rotation, cutout, Sobel, Gaussian noise).

Everything here runs on a whole ``(B, C, H, W)`` batch on the input's device, with parameters drawn
independently per sample, fully vectorised: no per-sample Python loop and no host-device sync in
``forward``. Every op is computed for the whole batch and selected per sample with ``torch.where``
(or made an identity by its per-sample parameters), so the cost does not depend on the draw.

Order inside ``BatchAugment.forward`` (crop first, so the rest runs at ``out_size``):

    crop + flip + rotation (one ``grid_sample``) -> colour jitter -> grayscale -> Sobel -> blur
    -> solarize -> noise -> normalise -> cutout (set to 0 = the mean)

Deviations from the reference implementations, written down:

- The crop box is continuous (sub-pixel) and resampled bilinearly without antialiasing
  (``grid_sample``), where torchvision crops integer boxes and resizes with antialiasing. When the
  drawn aspect ratio cannot fit, the box is clipped to the image keeping the drawn area (so the area
  fraction is always inside ``crop_scale``) instead of torchvision's 10 retries + centre crop.
- ``blur_sigma`` is in pixels at ``blur_sigma_ref_size`` (224) and scaled linearly with ``out_size``,
  like the kernel (10% of the side). Blur padding is reflect, as in torchvision.
- Sobel output is the gradient magnitude divided by its per-image maximum (so it lies in [0, 1]).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.views import ops
from selfsup.views.config import ViewConfig
from selfsup.views.ops import MAX_OUT_SIZE, per_sample

# Columns of the per-sample uniform draw (one rand call for every scalar parameter).
_U_AREA, _U_RATIO, _U_X, _U_Y, _U_FLIP, _U_ROT_P, _U_ROT_K = 0, 1, 2, 3, 4, 5, 6
_U_JIT_P, _U_BRI, _U_CON, _U_SAT, _U_HUE = 7, 8, 9, 10, 11
_U_GRAY, _U_BLUR_P, _U_SIGMA, _U_SOL = 12, 13, 14, 15
_U_CUT_P, _U_CUT_S, _U_CUT_X, _U_CUT_Y, _U_SOBEL, _U_NOISE_P, _U_NOISE_S = 16, 17, 18, 19, 20, 21, 22
_U_ORDER = 23  # 4 columns: per-sample jitter order = argsort of these
_N_UNIFORM = _U_ORDER + 4


__all__ = ["BatchAugment", "two_views", "save_view_grid"]

class BatchAugment(torch.nn.Module):
    """One view distribution applied to a whole batch, with independent parameters per sample.

    ``forward(images)`` takes ``(B, C, H, W)`` uint8 in [0, 255] or float in [0, 1], ``C`` in {1, 3},
    on any device, and returns float32 ``(B, C, out_size, out_size)`` normalised by ``mean``/``std``.
    Always computed in float32, even under autocast. No host-device sync, no per-sample loop.
    """

    def __init__(self, cfg: ViewConfig, out_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        cfg.validate()
        try:
            size = operator.index(out_size)  # int, numpy and 0-d torch integers; not floats
        except TypeError:
            size = None
        if size is None or isinstance(out_size, bool) or not 1 <= size <= MAX_OUT_SIZE:
            raise ValueError(f"out_size must be an integer in [1, {MAX_OUT_SIZE}], got {out_size!r}")
        # Kept as Python floats: normalising per channel with scalars needs no constant tensor on the
        # device (a host-to-device copy would synchronise CUDA every call).
        try:
            self.mean = tuple(float(m) for m in mean)
            self.std = tuple(float(s) for s in std)
        except (TypeError, ValueError):
            raise ValueError(f"mean/std must be sequences of numbers, got {mean!r} and {std!r}") from None
        if not all(math.isfinite(v) for v in self.mean + self.std):
            raise ValueError(f"mean/std must be finite, got {self.mean} and {self.std}")
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3):
            raise ValueError(f"mean/std need 1 or 3 values, got {len(self.mean)} and {len(self.std)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        self.cfg = cfg
        self.out_size = int(out_size)
        self.blur_kernel_size = ops.blur_kernel_size(cfg.blur_kernel_frac, self.out_size)

    def extra_repr(self) -> str:
        return f"out_size={self.out_size}, mean={self.mean}, std={self.std}, cfg={self.cfg}"

    def _stats(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, channels):
                raise ValueError(f"{name} has {len(v)} values for {channels}-channel images")
        return self.mean * (channels // len(self.mean)), self.std * (channels // len(self.std))

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` per channel, for ``x`` in [0, 1]."""
        mean, std = self._stats(x.shape[1])
        if len(set(mean)) == 1 and len(set(std)) == 1:
            return torch.sub(x, mean[0]).div_(std[0])
        return torch.cat([(x[:, c:c + 1] - m) / s for c, (m, s) in enumerate(zip(mean, std))], dim=1)

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of ``normalize``: back to the [0, 1] scale (not clamped)."""
        mean, std = self._stats(x.shape[1])
        if len(set(mean)) == 1 and len(set(std)) == 1:
            return x * std[0] + mean[0]
        return torch.cat([x[:, c:c + 1] * s + m for c, (m, s) in enumerate(zip(mean, std))], dim=1)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, return_params: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Augment ``images``; with ``return_params=True`` also return ``(out, params)``, a dict of
        per-sample tensors describing what was applied (for probes and tests):

        - ``flipped``, ``jittered``, ``gray``, ``sobel``, ``blurred``, ``solarized``, ``noised``,
          ``cutout``: bool ``(B,)``, whether the op ran on that sample (``gray`` is the draw, a no-op
          on 1-channel images);
        - ``rotation_k``: long ``(B,)`` in {0, 1, 2, 3}, quarter turns as ``torch.rot90(dims=(-2, -1))``;
        - ``crop_box``: float ``(B, 4)`` = (x0, y0, w, h) as fractions of the source width/height;
          ``crop_area``: float ``(B,)`` = w * h, the fraction of the source area;
        - ``jitter_factors``: float ``(B, 4)`` = brightness, contrast, saturation factors and hue shift
          ((1, 1, 1, 0) where not jittered); ``jitter_order``: long ``(B, 4)``, op ids
          (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order applied;
        - ``blur_sigma``: float ``(B,)`` in pixels at ``out_size`` (0 where not blurred);
          ``noise_sigma``: float ``(B,)`` (0 where not noised); ``cutout_box``: float ``(B, 4)`` =
          (x0, y0, side, side) as fractions of ``out_size``.
        """
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, C, H, W) with C in {{1, 3}}, got shape {tuple(images.shape)}")
        dev = images.device.type
        ctx = torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda", "xpu", "mps") else contextlib.nullcontext()
        with ctx:
            out, params = self._augment(images, generator, return_params)
        return (out, params) if return_params else out

    def _augment(
        self, images: Tensor, generator: torch.Generator | None, want_params: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # Ops switched off in the config are skipped statically (no work, no kernel launches); their
        # params are only filled in when asked for.
        self._stats(images.shape[1])  # fail early on a mean/std vs channel mismatch
        params: dict[str, Tensor] = {}
        # One draw for all scalar parameters, on the generator's device, then moved (a CPU generator
        # with CUDA images works and gives the same parameters as on CPU, at the cost of a copy).
        gen_device = generator.device if generator is not None else images.device
        u = torch.rand(images.shape[0], _N_UNIFORM, generator=generator, device=gen_device).to(images.device)
        x = self._crop_flip_rotate(images, u, params, want_params)
        x = self._colour(x, u, params, want_params)
        x = self._filters(x, u, params, want_params)
        x = self._noise(x, u, params, want_params, generator, gen_device)
        x = self.normalize(x)
        x = self._cutout(x, u, params, want_params)
        return x, params

    def _crop_flip_rotate(self, images: Tensor, u: Tensor, params: dict[str, Tensor], want_params: bool) -> Tensor:
        """Random resized crop + flip + rotation as one ``grid_sample``; float in [0, 1] at ``out_size``."""
        cfg, size, col, device = self.cfg, self.out_size, u.unbind(1), images.device
        bsz, _, src_h, src_w = images.shape
        lo, hi = cfg.crop_scale
        area = (lo + (hi - lo) * col[_U_AREA]) * (src_w * src_h)
        rlo, rhi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        ratio = torch.exp(rlo + (rhi - rlo) * col[_U_RATIO])
        w0, h0 = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        # If the aspect cannot fit, clip the long side to the image and keep the drawn area
        # (w0 > W and h0 > H cannot both hold since area <= W H).
        too_wide, too_tall = w0 > src_w, h0 > src_h
        w = torch.where(too_wide, src_w, torch.where(too_tall, area / src_h, w0)).clamp_(max=src_w)
        h = torch.where(too_wide, area / src_w, torch.where(too_tall, src_h, h0)).clamp_(max=src_h)
        x0 = col[_U_X] * (src_w - w)
        y0 = col[_U_Y] * (src_h - h)
        flipped = col[_U_FLIP] < cfg.flip_p
        # Output pixel centres (normalised, align_corners=False) map to input coordinates by
        #   in = Crop(Flip(Rot^-1(out))),   so the result equals rot90(flip(crop(x)), k).
        sx = (w / src_w) * (1.0 - 2.0 * flipped.to(torch.float32))
        sy = h / src_h
        tx = (2.0 * x0 + w) / src_w - 1.0
        ty = (2.0 * y0 + h) / src_h - 1.0
        if cfg.rotate_p > 0.0:
            rot_k = torch.where(col[_U_ROT_P] < cfg.rotate_p, 1 + (col[_U_ROT_K] * 3).long().clamp_(max=2), 0)
            # Rot^-1 for k quarter turns, as torch.rot90(dims=(-2, -1)) in (x right, y down) coordinates.
            kf = rot_k.to(torch.float32)
            even = (rot_k % 2 == 0).to(torch.float32)
            cos_t = (1.0 - kf) * even  # k = 0, 1, 2, 3 -> 1, 0, -1, 0
            sin_t = (2.0 - kf) * (1.0 - even)  # k = 0, 1, 2, 3 -> 0, 1, 0, -1
            a_x = torch.stack([sx * cos_t, sy * sin_t], dim=1)  # d(in)/d(out_x), (B, 2)
            a_y = torch.stack([-sx * sin_t, sy * cos_t], dim=1)  # d(in)/d(out_y)
        else:
            rot_k = torch.zeros_like(flipped, dtype=torch.long)
            zero = torch.zeros_like(sx)
            a_x, a_y = torch.stack([sx, zero], dim=1), torch.stack([zero, sy], dim=1)
        # Same grid as F.affine_grid, built by broadcasting in a (B, 2, S, S) layout and permuted to
        # (B, S, S, 2): affine_grid's batched 3x2 matmul is ~10x slower on CPU.
        centres = (2.0 * torch.arange(size, device=device, dtype=torch.float32) + 1.0) / size - 1.0
        shift = torch.stack([tx, ty], dim=1).view(bsz, 2, 1, 1)
        rows = a_y.view(bsz, 2, 1, 1) * centres.view(1, 1, size, 1) + shift  # (B, 2, S, 1)
        grid = rows + a_x.view(bsz, 2, 1, 1) * centres.view(1, 1, 1, size)  # (B, 2, S, S)
        grid = grid.permute(0, 2, 3, 1)
        x = F.grid_sample(images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False)
        if images.dtype == torch.uint8:
            x = x.mul_(1.0 / 255.0)  # resampling is linear: scale after, at out_size
        params.update(flipped=flipped, rotation_k=rot_k)
        if want_params:
            params.update(
                crop_box=torch.stack([x0 / src_w, y0 / src_h, w / src_w, h / src_h], dim=1),
                crop_area=(w * h) / (src_w * src_h),
            )
        return x

    def _colour(self, x: Tensor, u: Tensor, params: dict[str, Tensor], want_params: bool) -> Tensor:
        """Colour jitter in a random per-sample order (torchvision ColorJitter semantics), then grayscale."""
        cfg, col = self.cfg, u.unbind(1)
        strengths = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        if cfg.jitter_p > 0.0 or want_params:
            jittered = col[_U_JIT_P] < cfg.jitter_p
            params["jittered"] = jittered
            lows = [max(0.0, 1.0 - s) for s in strengths[:3]] + [-strengths[3]]
            highs = [1.0 + s for s in strengths[:3]] + [strengths[3]]
            cols = (col[_U_BRI], col[_U_CON], col[_U_SAT], col[_U_HUE])
            factors = torch.stack([c * (hi_ - lo_) + lo_ for c, lo_, hi_ in zip(cols, lows, highs)], dim=1)  # (B, 4)
            order = torch.argsort(u[:, _U_ORDER:_U_ORDER + 4], dim=1)
            if cfg.jitter_p > 0.0:
                x = ops.colour_jitter(x, jittered, factors, order, strengths)
            if want_params:
                neutral = (torch.arange(4, device=x.device) != ops.HUE).to(factors.dtype)  # (1, 1, 1, 0)
                params.update(jitter_factors=torch.where(jittered.view(-1, 1), factors, neutral), jitter_order=order)
        if cfg.grayscale_p > 0.0 or want_params:
            gray = col[_U_GRAY] < cfg.grayscale_p
            if cfg.grayscale_p > 0.0 and x.shape[1] == 3:
                x = torch.where(per_sample(gray), ops.to_gray(x).expand_as(x), x)
            params["gray"] = gray
        return x

    def _filters(self, x: Tensor, u: Tensor, params: dict[str, Tensor], want_params: bool) -> Tensor:
        """Sobel (ablation), Gaussian blur, solarize: the per-sample filters after colour."""
        cfg, col = self.cfg, u.unbind(1)
        if cfg.sobel_p > 0.0 or want_params:
            sobeled = col[_U_SOBEL] < cfg.sobel_p
            if cfg.sobel_p > 0.0:
                x = torch.where(per_sample(sobeled), ops.sobel(x), x)
            params["sobel"] = sobeled
        if cfg.blur_p > 0.0 or want_params:
            blurred = col[_U_BLUR_P] < cfg.blur_p
            params["blurred"] = blurred
            s_lo, s_hi = cfg.blur_sigma
            sigma = (s_lo + (s_hi - s_lo) * col[_U_SIGMA]) * (self.out_size / cfg.blur_sigma_ref_size)
            if cfg.blur_p > 0.0 and self.blur_kernel_size > 1:
                x = torch.where(per_sample(blurred), ops.gaussian_blur(x, sigma, self.blur_kernel_size), x)
            params["blur_sigma"] = torch.where(blurred, sigma, 0.0)
        if cfg.solarize_p > 0.0 or want_params:
            solarized = col[_U_SOL] < cfg.solarize_p
            if cfg.solarize_p > 0.0:
                x = torch.where(per_sample(solarized) & (x >= cfg.solarize_threshold), 1.0 - x, x)
            params["solarized"] = solarized
        return x

    def _noise(self, x: Tensor, u: Tensor, params: dict[str, Tensor], want_params: bool,
               generator: torch.Generator | None, gen_device: torch.device) -> Tensor:
        """Gaussian noise (ablation): sigma ~ U(0, 0.2), clamped back to [0, 1]."""
        cfg, col = self.cfg, u.unbind(1)
        if cfg.noise_p > 0.0 or want_params:
            noised = col[_U_NOISE_P] < cfg.noise_p
            params["noised"] = noised
            noise_sigma = torch.where(noised, 0.2 * col[_U_NOISE_S], 0.0)
            if cfg.noise_p > 0.0:
                eps = torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)
                x = torch.addcmul(x, eps, per_sample(noise_sigma)).clamp_(0.0, 1.0)
            params["noise_sigma"] = noise_sigma
        return x

    def _cutout(self, x: Tensor, u: Tensor, params: dict[str, Tensor], want_params: bool) -> Tensor:
        """Cutout (ablation) on the normalised views: a square set to the mean, i.e. 0.

        Pixel-aligned: side = round(U(0.1, 0.5) * size) >= 1, top-left uniform over valid positions.
        """
        cfg, size, col = self.cfg, self.out_size, u.unbind(1)
        if cfg.cutout_p > 0.0 or want_params:
            cut = col[_U_CUT_P] < cfg.cutout_p
            params["cutout"] = cut
            side = torch.round((0.1 + 0.4 * col[_U_CUT_S]) * size).clamp_(1, size)
            cx0 = torch.floor(col[_U_CUT_X] * (size - side + 1)).clamp_(max=size - side)
            cy0 = torch.floor(col[_U_CUT_Y] * (size - side + 1)).clamp_(max=size - side)
            if cfg.cutout_p > 0.0:
                pix = torch.arange(size, device=x.device, dtype=torch.float32).view(1, -1)
                inside_x = (pix >= cx0.view(-1, 1)) & (pix < (cx0 + side).view(-1, 1))
                inside_y = (pix >= cy0.view(-1, 1)) & (pix < (cy0 + side).view(-1, 1))
                hole = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)) & cut.view(-1, 1, 1)  # (B, S, S)
                x = x.masked_fill(hole.unsqueeze(1), 0.0)
            params["cutout_box"] = torch.stack([cx0, cy0, side, side], dim=1) / size
        return x


def two_views(
    images: Tensor,
    aug1: BatchAugment,
    aug2: BatchAugment | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Two independent draws of the view distribution(s): ``(aug1(x), aug2(x))``; ``aug2`` defaults to ``aug1``."""
    aug2 = aug1 if aug2 is None else aug2
    return aug1(images, generator=generator), aug2(images, generator=generator)


@torch.no_grad()
def save_view_grid(
    images: Tensor,
    augments: Sequence[BatchAugment] | BatchAugment,
    path: str | Path,
    n_images: int = 8,
    n_views: int = 6,
    seed: int = 0,
) -> Path:
    """Write a PNG: one row per image, the original (resized) first, then ``n_views`` augmented views,
    de-normalised back to [0, 1]. With several augments, view ``j`` uses ``augments[j % len(augments)]``.

    Layout is ``torchvision.utils.save_image`` with ``padding=2``: the PNG is
    ``(n_views + 1) * (out_size + 2) + 2`` wide and ``n * (out_size + 2) + 2`` high.
    """
    from torchvision.utils import save_image

    augs = [augments] if isinstance(augments, BatchAugment) else list(augments)
    if not augs:
        raise ValueError("save_view_grid needs at least one BatchAugment")
    size = augs[0].out_size
    if any(a.out_size != size for a in augs):
        raise ValueError(f"all augments must share out_size, got {[a.out_size for a in augs]}")
    imgs = images[:n_images]
    generator = torch.Generator(device=imgs.device).manual_seed(seed)
    x = imgs.to(torch.float32)
    if imgs.dtype == torch.uint8:
        x = x / 255.0
    columns = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)]
    for j in range(n_views):
        aug = augs[j % len(augs)]
        columns.append(aug.denormalize(aug(imgs, generator=generator)).clamp(0.0, 1.0))
    grid = torch.stack(columns, dim=1).flatten(0, 1).cpu()  # row-major: image i, then its views
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path, nrow=n_views + 1, padding=2)
    return path
