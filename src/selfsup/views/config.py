"""View distributions: :class:`ViewConfig` (each transform's probability and strength) and its presets for SimCLR and BYOL.

Pure data, validated on construction and written into every checkpoint; :class:`selfsup.views.augment.BatchAugment`
draws views from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


TRANSFORM_NAMES: tuple[str, ...] = ("crop", "cutout", "colour", "sobel", "noise", "blur", "rotate")

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


def _derived(given: float | None, default: float) -> float:
    return default if given is None else given


@dataclass
class ViewConfig:
    """One stochastic view distribution (SimCLR Appendix A / BYOL Table 6). Defaults = SimCLR ImageNet.

    Colour jitter strengths default to SimCLR's ``0.8 s`` (brightness, contrast, saturation) and
    ``0.2 s`` (hue); the ``jitter_*`` overrides replace one component (BYOL uses .4/.4/.2/.1).
    The config is validated on construction and by ``BatchAugment``.

    Attributes:
        crop_scale: area fraction of the random resized crop, drawn uniformly from (low, high) (SimCLR: 0.08-1).
        crop_ratio: aspect ratio of the crop, drawn log-uniformly from (low, high) (SimCLR: 3/4-4/3).
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter (brightness, contrast, saturation, hue in random order).
        grayscale_p: probability of converting the view to gray.
        blur_p: probability of a Gaussian blur (SimCLR ImageNet: 0.5; off at 32 px and below).
        solarize_p: probability of solarisation (BYOL's second view: 0.2).
        solarize_threshold: solarisation inverts the pixels at or above this value (on the [0, 1] scale).
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

    # --- derived jitter strengths: the explicit value, else SimCLR's 0.8 s (0.2 s for hue) -------
    brightness = property(lambda self: _derived(self.jitter_brightness, 0.8 * self.jitter_strength))
    contrast = property(lambda self: _derived(self.jitter_contrast, 0.8 * self.jitter_strength))
    saturation = property(lambda self: _derived(self.jitter_saturation, 0.8 * self.jitter_strength))
    hue = property(lambda self: _derived(self.jitter_hue, 0.2 * self.jitter_strength))

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
