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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TRANSFORM_NAMES",
    "ViewConfig",
    "BatchAugment",
    "two_views",
    "save_view_grid",
    "view_config_for",
]

TRANSFORM_NAMES: tuple[str, ...] = ("crop", "cutout", "colour", "sobel", "noise", "blur", "rotate")

# ITU-R 601-2 luma with torchvision's rounding (0.2989), so grayscale matches rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Jitter op ids (the order they are reported in ``params["jitter_factors"]``).
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3
_SMALL_IMAGE = 32  # CIFAR-size and below: SimCLR's CIFAR recipe (s=0.5, no blur)

_OPTIONAL_FIELDS = ("jitter_brightness", "jitter_contrast", "jitter_saturation", "jitter_hue")


# Bounds beyond which a value changes nothing but can overflow float32 (validated, so refused up front).
MAX_JITTER = 1000.0
MAX_BLUR_SIGMA = 1000.0  # pixels at blur_sigma_ref_size


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_PROB_FIELDS = (
    "flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "cutout_p", "sobel_p", "noise_p", "rotate_p",
)


@dataclass
class ViewConfig:
    """One stochastic view distribution (SimCLR Appendix A / BYOL Table 6). Defaults = SimCLR ImageNet.

    Colour jitter strengths default to SimCLR's ``0.8 s`` (brightness, contrast, saturation) and
    ``0.2 s`` (hue); the ``jitter_*`` overrides replace one component (BYOL uses .4/.4/.2/.1).
    The config is validated on construction and by ``BatchAugment``.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_strength: float = 1.0  # s: brightness/contrast/saturation 0.8*s, hue 0.2*s
    jitter_p: float = 0.8
    jitter_brightness: float | None = None  # None = 0.8 * jitter_strength
    jitter_contrast: float | None = None  # None = 0.8 * jitter_strength
    jitter_saturation: float | None = None  # None = 0.8 * jitter_strength
    jitter_hue: float | None = None  # None = 0.2 * jitter_strength; at most 0.5
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels at blur_sigma_ref_size px
    blur_kernel_frac: float = 0.1  # kernel side = 10% of the image side (odd, >= 3)
    blur_sigma_ref_size: float = 224.0  # sigma scales with out_size / this
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    # ablation-only ops (SimCLR Figure 5), all off by default
    cutout_p: float = 0.0  # one random square of side ~ U(0.1, 0.5)*size set to the mean (0 after normalising)
    sobel_p: float = 0.0  # Sobel edge magnitude, replicated over channels
    noise_p: float = 0.0  # additive Gaussian noise, sigma ~ U(0.0, 0.2) on [0,1] scale
    rotate_p: float = 0.0  # rotate by one of {90,180,270} degrees

    def __post_init__(self) -> None:
        # Accept lists (e.g. from a YAML/JSON checkpoint config) for the pair fields.
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                try:
                    setattr(self, name, tuple(float(v) for v in value))
                except (TypeError, ValueError):
                    raise ValueError(f"ViewConfig.{name} must be a (low, high) pair of numbers, got {value!r}") from None
        self.validate()

    # --- derived jitter strengths -------------------------------------------------------------
    @property
    def brightness(self) -> float:
        return 0.8 * self.jitter_strength if self.jitter_brightness is None else self.jitter_brightness

    @property
    def contrast(self) -> float:
        return 0.8 * self.jitter_strength if self.jitter_contrast is None else self.jitter_contrast

    @property
    def saturation(self) -> float:
        return 0.8 * self.jitter_strength if self.jitter_saturation is None else self.jitter_saturation

    @property
    def hue(self) -> float:
        return 0.2 * self.jitter_strength if self.jitter_hue is None else self.jitter_hue

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for impossible values (and for values that are not numbers)."""
        for name, value in vars(self).items():
            if name in ("crop_scale", "crop_ratio", "blur_sigma"):
                ok = isinstance(value, tuple) and all(_is_real(v) for v in value)
            else:
                ok = _is_real(value) or (value is None and name in _OPTIONAL_FIELDS)
            if not ok:
                raise ValueError(f"ViewConfig.{name} must be a number{' or None' if name in _OPTIONAL_FIELDS else ''}"
                                 f"{' pair' if name in ('crop_scale', 'crop_ratio', 'blur_sigma') else ''}, got {value!r}")
        for name in _PROB_FIELDS:
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewConfig.{name} must be a probability in [0, 1], got {p!r}")
        pairs = {name: getattr(self, name) for name in ("crop_scale", "crop_ratio", "blur_sigma")}
        for name, pair in pairs.items():
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ValueError(f"ViewConfig.{name} must be a (low, high) pair, got {pair!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"ViewConfig.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not (0.0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"ViewConfig.crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        lo, hi = self.blur_sigma
        if not (0.0 <= lo <= hi <= MAX_BLUR_SIGMA):
            raise ValueError(f"ViewConfig.blur_sigma must satisfy 0 <= low <= high <= {MAX_BLUR_SIGMA}, got {self.blur_sigma}")
        if not (self.jitter_strength >= 0.0 and math.isfinite(self.jitter_strength)):
            raise ValueError(f"ViewConfig.jitter_strength must be >= 0, got {self.jitter_strength}")
        for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation", "jitter_hue"):
            value = getattr(self, name)
            if value is not None and not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"ViewConfig.{name} must be >= 0 or None, got {value}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) > MAX_JITTER:  # beyond 255 every non-black pixel saturates already
                field = f"jitter_{name}" if getattr(self, f"jitter_{name}") is not None else "jitter_strength"
                raise ValueError(f"ViewConfig.{field} gives a {name} jitter {getattr(self, name)} > {MAX_JITTER}")
        if self.hue > 0.5:
            name = "jitter_hue" if self.jitter_hue is not None else "jitter_strength"
            raise ValueError(f"ViewConfig.{name} gives a hue jitter {self.hue} > 0.5 (hue is a shift in [-0.5, 0.5])")
        if not 0.0 < self.blur_kernel_frac <= 1.0:
            raise ValueError(f"ViewConfig.blur_kernel_frac must be in (0, 1], got {self.blur_kernel_frac}")
        if not (1.0 <= self.blur_sigma_ref_size <= 1e6):
            raise ValueError(f"ViewConfig.blur_sigma_ref_size must be in [1, 1e6] pixels, got {self.blur_sigma_ref_size}")
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise ValueError(f"ViewConfig.solarize_threshold must be in [0, 1], got {self.solarize_threshold}")

    @classmethod
    def simclr(cls, image_size: int) -> ViewConfig:
        """SimCLR Appendix A: s=1 and blur p=0.5 on ImageNet; s=0.5 and no blur for images <= 32 px (B.9)."""
        if image_size <= _SMALL_IMAGE:
            return cls(jitter_strength=0.5, blur_p=0.0)
        return cls()

    @classmethod
    def byol(cls, image_size: int, view: int) -> ViewConfig:
        """BYOL Table 6: jitter .4/.4/.2/.1 with p=0.8, grayscale 0.2; view 1 blur 1.0, view 2 blur 0.1
        and solarize 0.2. For images <= 32 px blur is off in both views, as in ``simclr()``."""
        if view not in (1, 2):
            raise ValueError(f"BYOL has views 1 and 2, got view={view}")
        blur_p = 1.0 if view == 1 else 0.1
        if image_size <= _SMALL_IMAGE:
            blur_p = 0.0
        return cls(
            jitter_p=0.8,
            jitter_brightness=0.4,
            jitter_contrast=0.4,
            jitter_saturation=0.2,
            jitter_hue=0.1,
            grayscale_p=0.2,
            blur_p=blur_p,
            solarize_p=0.0 if view == 1 else 0.2,
        )


def view_config_for(names: Sequence[str], image_size: int) -> ViewConfig:
    """A config applying only the named transforms (SimCLR Figure 5), each with p=1.

    ``"crop"`` is the random resized crop with the paper's scale/ratio range and random flip
    ("random crop (with flip and resize)", SimCLR Appendix A); without it the image is only resized.
    ``"colour"`` is SimCLR's colour distortion: jitter (s=1, or 0.5 for images <= 32 px) with p=0.8
    plus grayscale with p=0.2.
    """
    unknown = [n for n in names if n not in TRANSFORM_NAMES]
    if unknown:
        raise ValueError(f"unknown transform names {unknown}; expected a subset of {TRANSFORM_NAMES}")
    chosen = set(names)
    kw: dict = dict(
        crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
    )
    if "crop" in chosen:
        kw.update(crop_scale=(0.08, 1.0), flip_p=0.5)
    if "colour" in chosen:
        kw.update(jitter_strength=0.5 if image_size <= _SMALL_IMAGE else 1.0, jitter_p=0.8, grayscale_p=0.2)
    if "blur" in chosen:
        kw.update(blur_p=1.0)
    for name in ("cutout", "sobel", "noise", "rotate"):
        if name in chosen:
            kw[f"{name}_p"] = 1.0
    return ViewConfig(**kw)


# --------------------------------------------------------------------------------------------------
# Vectorised colour ops on (B, C, H, W) float tensors in [0, 1]; per-sample factors of shape (B,).
# --------------------------------------------------------------------------------------------------
def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma; the identity for 1-channel images."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]) via RGB -> HSV -> RGB."""
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    # Hue in sextants [0, 6): which formula depends on the channel holding the maximum.
    h = torch.where(
        argmax == 0,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # HSV -> RGB: channel n in (5, 3, 1) for (r, g, b), k = (n + h) mod 6,
    # value = v - v * s * clamp(min(k, 4 - k), 0, 1).
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v = maxc.unsqueeze(1)
    return (v - v * sat.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


def _colour_jitter(x: Tensor, jittered: Tensor, factors: Tensor, order: Tensor, strengths: Sequence[float]) -> Tensor:
    """torchvision ColorJitter with a random op order per sample, vectorised.

    ``factors[:, k]`` is op k's factor (brightness, contrast, saturation; hue shift for k=3) and
    ``order[b]`` the permutation sample b applies them in. Brightness, contrast and saturation are all
    per-sample affine maps followed by a clamp,

        a * x + beta * gray(x) + gamma * mean(gray(x))   (brightness: a=f; contrast: a=f, gamma=1-f;
                                                          saturation: a=f, beta=1-f)

    so one "linear slot" applies whichever of them a sample needs (the identity for the others).
    With m active linear ops and hue, the sequence  m slots -> hue -> m slots  embeds every order:
    sample b puts the ops it runs before hue in the first block and the rest in the second, each at
    its rank among the linear ops. Hue (the expensive op) is evaluated once; zero-strength ops (and
    saturation/hue on 1-channel images) are skipped statically, so strength 0 is an exact identity.
    """
    rgb = x.shape[1] == 3
    linear = [k for k in (_BRIGHTNESS, _CONTRAST, _SATURATION) if strengths[k] > 0.0 and (rgb or k != _SATURATION)]
    use_hue = rgb and strengths[_HUE] > 0.0
    if not linear and not use_hue:
        return x
    m = len(linear)
    n_slots = 2 * m if use_hue else m
    if m:
        pos = torch.argsort(order, dim=1)  # pos[b, k]: step at which sample b applies op k
        pos_lin = torch.stack([pos[:, k] for k in linear], dim=1)  # (B, m)
        rank = (pos_lin.unsqueeze(2) > pos_lin.unsqueeze(1)).sum(dim=2)  # rank among the linear ops
        slot = rank + m * (pos_lin > pos[:, _HUE:_HUE + 1]) if use_hue else rank
        slot = torch.where(jittered.view(-1, 1), slot, n_slots)  # not jittered: no slot
        onehot = (slot.unsqueeze(2) == torch.arange(n_slots, device=x.device)).to(x.dtype)  # (B, m, slots)
        # Per-op (a - 1, beta, gamma): brightness (f-1, 0, 0), contrast (f-1, 0, 1-f), saturation (f-1, 1-f, 0).
        coef = []
        for k in linear:
            d = factors[:, k] - 1.0
            zero = torch.zeros_like(d)
            coef.append(torch.stack([d, -d if k == _SATURATION else zero, -d if k == _CONTRAST else zero], dim=1))
        coef = torch.stack(coef, dim=1)  # (B, m, 3)
        slot_coef = (onehot.unsqueeze(3) * coef.unsqueeze(2)).sum(dim=1)  # (B, slots, 3)
    need_gray = _CONTRAST in linear or _SATURATION in linear

    def linear_slot(x: Tensor, s: int) -> Tensor:
        a, beta, gamma = (_col(c) for c in slot_coef[:, s].unbind(1))
        out = x * (a + 1.0)
        if need_gray:
            g = _gray(x)
            if _SATURATION in linear:
                out = out.add_(g * beta)
            out = out.add_(gamma * g.mean(dim=(1, 2, 3), keepdim=True))
        return out.clamp_(0.0, 1.0)

    for s in range(m):
        x = linear_slot(x, s)
    if use_hue:
        x = torch.where(_col(jittered), _adjust_hue(x, factors[:, _HUE]), x)
        for s in range(m, 2 * m):
            x = linear_slot(x, s)
    return x


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one kernel per sample (grouped conv over B*C groups), reflect pad."""
    bsz, ch, h, w = x.shape
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-6).view(-1, 1)
    kern = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)  # (B, k)
    kern = kern.repeat_interleave(ch, dim=0)  # (B*C, k)
    flat = x.reshape(1, bsz * ch, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kern.view(bsz * ch, 1, 1, kernel_size), groups=bsz * ch)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kern.view(bsz * ch, 1, kernel_size, 1), groups=bsz * ch)
    return flat.view(bsz, ch, h, w)


def _sobel(x: Tensor) -> Tensor:
    """Sobel gradient magnitude of the luma, scaled to [0, 1] per image, replicated over channels."""
    g = F.pad(_gray(x), (1, 1, 1, 1), mode="replicate")
    # Separable Sobel from slices (no constant kernels to copy to the device): smooth [1, 2, 1]
    # across the derivative direction, central difference along it.
    sm_v = g[:, :, :-2, :] + 2.0 * g[:, :, 1:-1, :] + g[:, :, 2:, :]  # (B, 1, H, W + 2)
    sm_h = g[:, :, :, :-2] + 2.0 * g[:, :, :, 1:-1] + g[:, :, :, 2:]  # (B, 1, H + 2, W)
    gx = sm_v[..., 2:] - sm_v[..., :-2]
    gy = sm_h[:, :, 2:, :] - sm_h[:, :, :-2, :]
    mag = torch.sqrt(gx * gx + gy * gy)
    mag = mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return mag.expand_as(x)


def _kernel_size(frac: float, size: int) -> int:
    k = max(3, int(round(frac * size)))
    if k % 2 == 0:
        k += 1
    return min(k, 2 * size - 1)  # reflect padding needs radius < side


# Columns of the per-sample uniform draw (one rand call for every scalar parameter).
_U_AREA, _U_RATIO, _U_X, _U_Y, _U_FLIP, _U_ROT_P, _U_ROT_K = 0, 1, 2, 3, 4, 5, 6
_U_JIT_P, _U_BRI, _U_CON, _U_SAT, _U_HUE = 7, 8, 9, 10, 11
_U_GRAY, _U_BLUR_P, _U_SIGMA, _U_SOL = 12, 13, 14, 15
_U_CUT_P, _U_CUT_S, _U_CUT_X, _U_CUT_Y, _U_SOBEL, _U_NOISE_P, _U_NOISE_S = 16, 17, 18, 19, 20, 21, 22
_U_ORDER = 23  # 4 columns: per-sample jitter order = argsort of these
_N_UNIFORM = _U_ORDER + 4


MAX_OUT_SIZE = 8192  # beyond this a batch cannot be held in memory; refused up front


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
        self.blur_kernel_size = _kernel_size(cfg.blur_kernel_frac, self.out_size)

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
        cfg, size = self.cfg, self.out_size
        device = images.device
        bsz, ch, src_h, src_w = images.shape
        self._stats(ch)  # fail early on a mean/std vs channel mismatch
        params: dict[str, Tensor] = {}

        # One draw for all scalar parameters, on the generator's device, then moved (a CPU generator
        # with CUDA images works and gives the same parameters as on CPU, at the cost of a copy).
        gen_device = generator.device if generator is not None else device
        u = torch.rand(bsz, _N_UNIFORM, generator=generator, device=gen_device).to(device)
        col = u.unbind(1)

        # --- random resized crop + flip + rotation: one grid_sample --------------------------------
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

        # --- colour jitter in a random per-sample order (torchvision ColorJitter semantics) ------
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
                x = _colour_jitter(x, jittered, factors, order, strengths)
            if want_params:
                neutral = (torch.arange(4, device=device) != _HUE).to(factors.dtype)  # (1, 1, 1, 0)
                params.update(jitter_factors=torch.where(jittered.view(-1, 1), factors, neutral), jitter_order=order)

        # --- grayscale ------------------------------------------------------------------------------
        if cfg.grayscale_p > 0.0 or want_params:
            gray = col[_U_GRAY] < cfg.grayscale_p
            if cfg.grayscale_p > 0.0 and ch == 3:
                x = torch.where(_col(gray), _gray(x).expand_as(x), x)
            params["gray"] = gray

        # --- Sobel (ablation) -----------------------------------------------------------------------
        if cfg.sobel_p > 0.0 or want_params:
            sobel = col[_U_SOBEL] < cfg.sobel_p
            if cfg.sobel_p > 0.0:
                x = torch.where(_col(sobel), _sobel(x), x)
            params["sobel"] = sobel

        # --- Gaussian blur --------------------------------------------------------------------------
        if cfg.blur_p > 0.0 or want_params:
            blurred = col[_U_BLUR_P] < cfg.blur_p
            params["blurred"] = blurred
            s_lo, s_hi = cfg.blur_sigma
            sigma = (s_lo + (s_hi - s_lo) * col[_U_SIGMA]) * (size / cfg.blur_sigma_ref_size)
            if cfg.blur_p > 0.0 and self.blur_kernel_size > 1:
                x = torch.where(_col(blurred), _gaussian_blur(x, sigma, self.blur_kernel_size), x)
            params["blur_sigma"] = torch.where(blurred, sigma, 0.0)

        # --- solarize -------------------------------------------------------------------------------
        if cfg.solarize_p > 0.0 or want_params:
            solarized = col[_U_SOL] < cfg.solarize_p
            if cfg.solarize_p > 0.0:
                x = torch.where(_col(solarized) & (x >= cfg.solarize_threshold), 1.0 - x, x)
            params["solarized"] = solarized

        # --- Gaussian noise (ablation): sigma ~ U(0, 0.2) ---------------------------------------------
        if cfg.noise_p > 0.0 or want_params:
            noised = col[_U_NOISE_P] < cfg.noise_p
            params["noised"] = noised
            noise_sigma = torch.where(noised, 0.2 * col[_U_NOISE_S], 0.0)
            if cfg.noise_p > 0.0:
                eps = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
                x = torch.addcmul(x, eps, _col(noise_sigma)).clamp_(0.0, 1.0)
            params["noise_sigma"] = noise_sigma

        x = self.normalize(x)

        # --- cutout (ablation): a square set to the mean, i.e. 0 once normalised ----------------------
        # Pixel-aligned: side = round(U(0.1, 0.5) * size) >= 1, top-left uniform over valid positions.
        if cfg.cutout_p > 0.0 or want_params:
            cut = col[_U_CUT_P] < cfg.cutout_p
            params["cutout"] = cut
            side = torch.round((0.1 + 0.4 * col[_U_CUT_S]) * size).clamp_(1, size)
            cx0 = torch.floor(col[_U_CUT_X] * (size - side + 1)).clamp_(max=size - side)
            cy0 = torch.floor(col[_U_CUT_Y] * (size - side + 1)).clamp_(max=size - side)
            if cfg.cutout_p > 0.0:
                pix = torch.arange(size, device=device, dtype=torch.float32).view(1, -1)
                inside_x = (pix >= cx0.view(-1, 1)) & (pix < (cx0 + side).view(-1, 1))
                inside_y = (pix >= cy0.view(-1, 1)) & (pix < (cy0 + side).view(-1, 1))
                hole = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)) & cut.view(-1, 1, 1)  # (B, S, S)
                x = x.masked_fill(hole.unsqueeze(1), 0.0)
            params["cutout_box"] = torch.stack([cx0, cy0, side, side], dim=1) / size
        return x, params


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
