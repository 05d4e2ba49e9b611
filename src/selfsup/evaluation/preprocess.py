"""From a stored image to the encoder's input: the one preprocessing every frozen-encoder path applies.

:func:`prepare_images` is the function; :class:`Preprocessing` holds its parameters, which come from
the run that trained the encoder (``RunInfo.preprocessing``), never from the data set being
evaluated. Evaluation (every data set kind), the training loop's kNN monitor, ``selfsup embed``,
``selfsup.hub.embed`` and the exported models' documented input all go through it, so the same
pixels give the same features whichever way they are read.

The steps, in order:

1. channels: converted to the encoder's (gray to RGB: the one channel repeated; RGB to gray: ITU-R
   601-2 luma, on uint8 pixels exactly as PIL's ``convert("L")``, so an RGB file of a gray image
   gives the gray image's pixels);
2. the centre square (side = the shorter side), of which the central ``crop`` share is kept
   (:func:`eval_crop`: 87.5% above 32 px as in the official SimCLR code, else all of it);
3. resized to ``image_size`` (bilinear; antialiased when shrinking), skipped when already there;
4. scaled to [0, 1] (``/ 255``) and normalised with the run's per-channel ``mean``/``std``.

The pre-training views (``selfsup.views.augment.BatchAugment``) normalise with the same statistics;
their geometry is the random resized crop instead of steps 2 and 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EVAL_CENTER_CROP = 0.875  # official SimCLR code: evaluation crops the central 87.5%, for images above 32 px
RESIZE = "bilinear (torch interpolate, align_corners=False; antialiased when shrinking)"
_LUMA = (19595, 38470, 7471)  # PIL's convert("L"): (R*19595 + G*38470 + B*7471 + 2**15) >> 16


def eval_crop(image_size: int) -> float:
    """Share of the image side kept by evaluation's centre crop: 0.875 above 32 px (official code), else 1."""
    return EVAL_CENTER_CROP if image_size > 32 else 1.0


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """``images`` (B, C, H, W) with ``channels`` channels: gray repeated to RGB, RGB to gray as PIL's luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        if images.dtype == torch.uint8:  # integer arithmetic: bit-identical to PIL's convert("L")
            w = torch.tensor(_LUMA, dtype=torch.int32, device=images.device).view(1, 3, 1, 1)
            return ((images.to(torch.int32) * w).sum(1, keepdim=True) + 32768).div(65536, rounding_mode="floor") \
                .to(torch.uint8)
        w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) / 65536
        return (images * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels (1 or 3 only)")


def prepare_images(images: torch.Tensor, mean, std, size: int, crop: float = 1.0) -> torch.Tensor:
    """uint8 (B, C, H, W) (or float on [0, 255]) -> the encoder's input: float (B, len(mean), size, size).

    Channels converted to ``len(mean)`` (:func:`match_channels`), the centre square's central ``crop``
    share kept, resized to ``size`` (bilinear, antialiased when shrinking), ``/ 255``, then
    ``(x - mean) / std`` per channel.
    """
    x = match_channels(images, len(mean)).float().div(255.0)
    h, w = x.shape[-2:]
    s = min(h, w)
    if crop < 1.0:
        s = max(1, int(round(s * crop)))
    if (h, w) != (s, s):
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class Preprocessing:
    """The parameters of :func:`prepare_images` for one encoder: what it was trained with.

    ``crop=None`` means :func:`eval_crop` of ``image_size``. ``record()`` is what result files store.
    """

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "crop", eval_crop(self.image_size) if self.crop is None else float(self.crop))
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"need 1 or 3 channels with a mean and std each, got {self.channels}, {self.mean}, {self.std}")
        if self.image_size < 1 or not 0.0 < self.crop <= 1.0 or not all(s > 0 for s in self.std):
            raise ValueError(f"need image_size >= 1, 0 < crop <= 1 and std > 0, got {self.image_size}, {self.crop}, "
                             f"{self.std}")

    @classmethod
    def of_dataset(cls, dataset, image_size: int, crop: float | None = None) -> Preprocessing:
        """The statistics a data set carries (what pre-training on it normalises with)."""
        return cls(int(image_size), int(dataset.num_channels), tuple(dataset.mean), tuple(dataset.std), crop)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_images(images, self.mean, self.std, self.image_size, self.crop)

    def record(self, source_channels: int | None = None) -> dict:
        """The steps as result files store them; ``source_channels``: the images' own, when known."""
        out = {"channels": self.channels, "centre_crop": self.crop, "image_size": self.image_size, "resize": RESIZE,
               "scale": "x / 255", "mean": list(self.mean), "std": list(self.std),
               "function": "selfsup.evaluation.preprocess.prepare_images"}
        if source_channels is not None and source_channels != self.channels:
            out["channel_conversion"] = ("gray repeated to RGB" if self.channels == 3 else
                                         "RGB to gray, ITU-R 601-2 luma as PIL convert('L')")
        return out
