"""View distributions: :class:`ViewConfig` (each transform's probability and strength) and its presets for SimCLR and
BYOL; :class:`MultiCropConfig`, the multi-crop settings (how many small local crops, their size and scale).

Pure data, validated on construction and written into every checkpoint; :class:`selfsup.views.augment.BatchAugment`
draws views from a ``ViewConfig``, :class:`selfsup.views.multicrop.MultiCrop` global and local crops from both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from selfsup.errors import ConfigError


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


# Multi-crop (Caron et al. 2020, SwAV Sec. 3.2; Caron et al. 2021, DINO Sec. 3.1): both official codes pair
# 224 px global views with 96 px local crops.
LOCAL_SIZE_REF = (96, 224)  # (local side, global side) of the official ImageNet setting


def local_size_for(image_size: int) -> int:
    """The local crops' side for ``image_size`` px global views: 96 px at 224 px (SwAV, DINO), scaled with the
    image and rounded half up (28 px -> 12, 32 px -> 14, 64 px -> 27, 96 px -> 41), at least 1 px."""
    local, ref = LOCAL_SIZE_REF
    return max(1, math.floor(image_size * local / ref + 0.5))


def _scale_pair(key: str, value) -> tuple[float, float]:
    """``value`` as a ``(low, high)`` area fraction with ``0 < low <= high <= 1``, else ``ConfigError`` naming ``key``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_real(v) for v in value):
        raise ConfigError(f"{key}: must be a (low, high) pair of area fractions, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"{key}: must satisfy 0 < low <= high <= 1 (fractions of the image area), got {value!r}")
    return lo, hi


@dataclass
class MultiCropConfig:
    """Multi-crop: two global views plus ``num_local`` small local crops per image (SwAV Sec. 3.2, DINO Sec. 3.1).

    The config section ``multicrop``. ``num_local = 0`` (the default) turns it off: the two views are drawn
    exactly as without multi-crop, with their own ``crop_scale``. With local crops on, the two global views
    take ``global_scale`` and each local crop is a random resized crop of ``local_scale`` of the image area,
    resampled to ``local_size`` px. The local crops go through the encoder in a pass of their own, normalised
    by their own batch statistics; that pass leaves batch norm's running statistics, which frozen features use,
    to the global views (:func:`selfsup.models.running_stats.encode_local_crops`).

    Default scales: SwAV's, which DINO's README also prescribes for ResNet-50 (this library's encoders are
    ResNets): global (0.14, 1), local (0.05, 0.14) -- facebookresearch/swav ``scripts/swav_800ep_pretrain.sh``
    (``--min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14``, 2 x 224 + 6 x 96) and facebookresearch/dino
    README ("--global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14" for ``--arch resnet50``). DINO's ViT
    defaults (``main_dino.py``: ``--global_crops_scale 0.4 1``, ``--local_crops_scale 0.05 0.4``,
    ``--local_crops_number 8``) are one ``multicrop.global_scale`` / ``multicrop.local_scale`` away.
    ``local_size`` None: :func:`local_size_for` the image size (96 px at 224 px, 12 px at 28 px).
    Validated on construction; errors name the key (``multicrop.num_local``, ...).
    """

    num_local: int = 0  # local crops per image; 0: off (two views, unchanged)
    local_size: int | None = None  # side of the local crops in px; None: local_size_for(image_size)
    local_scale: tuple[float, float] = (0.05, 0.14)  # area fraction of the local crops (SwAV; DINO ResNet-50)
    global_scale: tuple[float, float] | None = (0.14, 1.0)  # global views' area fraction when on; None: views' own

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "multicrop.") -> None:
        """Raise ``ConfigError`` (a ``ValueError``) naming the key for a value that cannot be used; pairs given as
        lists (YAML) become tuples."""
        n = self.num_local
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"{prefix}num_local: must be an integer >= 0 (the number of local crops per image; "
                              f"0 turns multi-crop off), got {n!r}")
        size = self.local_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"{prefix}local_size: must be an integer number of pixels >= 1 or null "
                              f"(null: {LOCAL_SIZE_REF[0]} px at {LOCAL_SIZE_REF[1]} px, scaled with the image), "
                              f"got {size!r}")
        self.local_scale = _scale_pair(prefix + "local_scale", self.local_scale)
        if self.global_scale is not None:
            self.global_scale = _scale_pair(prefix + "global_scale", self.global_scale)

    def resolved_local_size(self, image_size: int, prefix: str = "multicrop.") -> int:
        """``local_size``, or :func:`local_size_for` ``image_size`` when it is None; local crops larger than the
        ``image_size`` px global views are refused (``ConfigError`` naming ``local_size``)."""
        size = local_size_for(image_size) if self.local_size is None else self.local_size
        if size > image_size:
            raise ConfigError(f"{prefix}local_size: {size} px is larger than the {image_size} px global views; "
                              f"local crops are the small ones: choose at most {image_size} "
                              f"(or null for {local_size_for(image_size)} px)")
        return size


def local_view_config(view1: ViewConfig, view2: ViewConfig, local_scale: tuple[float, float], image_size: int,
                      local_size: int) -> ViewConfig:
    """The local crops' view distribution, derived from the two global views' (``view1``, ``view2``).

    - SwAV gives every crop one distribution (facebookresearch/swav ``src/multicropdataset.py``: the same
      colour distortion and blur p=0.5 for the 224 and 96 px crops). With equal global views (SimCLR's
      presets) the local crops take that distribution.
    - DINO's two global views differ only in blur (p=1.0 / 0.1) and solarization (p=0 / 0.2); its local crops
      share their flip, colour jitter and grayscale and take blur p=0.5 without solarization
      (facebookresearch/dino ``main_dino.py``, ``DataAugmentationDINO.local_transfo``). So where the global
      views disagree, ``blur_p`` becomes 0.5 and ``solarize_p`` 0; with BYOL's presets (= DINO's global
      views) this is DINO's local recipe exactly. Any other field is ``view1``'s.

    ``crop_scale`` is ``local_scale``. Blur sigma: both official codes draw PIL's radius (sigma in pixels of the
    crop being made) from (0.1, 2) for global and local crops alike, so a local crop is blurred by as many of
    its pixels as a global view by its. Here sigma is given at ``blur_sigma_ref_size`` and scaled with the
    output side, so the local reference size is scaled by ``local_size / image_size`` (at least 1 px) to keep
    the global views' sigma in pixels. The kernel stays 10% of the (local) side, as for any output size.
    """
    kw: dict = dict(crop_scale=tuple(local_scale))
    if view1.blur_p != view2.blur_p:
        kw["blur_p"] = 0.5
    if view1.solarize_p != view2.solarize_p:
        kw["solarize_p"] = 0.0
    kw["blur_sigma_ref_size"] = max(1.0, view1.blur_sigma_ref_size * local_size / image_size)
    return replace(view1, **kw)
