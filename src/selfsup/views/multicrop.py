"""Multi-crop views: two global views plus ``N`` small local crops of each image, batched on the device.

Multi-crop (Caron et al. 2020, SwAV Sec. 3.2; Caron et al. 2021, DINO Sec. 3.1) adds low-resolution crops of
small regions to the two usual views; each is compared with the global views only, and they cost little
because they are small. The settings are :class:`selfsup.views.config.MultiCropConfig`; the local crops'
distribution is :func:`selfsup.views.config.local_view_config` (SwAV's shared distribution for equal global
views, DINO's local recipe for BYOL/DINO-style asymmetric ones) unless one is given.

:class:`MultiCrop` returns ``[global1, global2, local1, ..., localN]``:

- The global views are two :class:`~selfsup.views.augment.BatchAugment` draws, in that order and with the
  same generator calls as two separate views, so with ``num_local = 0`` they are bit-identical to
  ``aug1(x, g), aug2(x, g)``. With local crops on, both take ``global_scale`` as their crop scale.
- The ``N`` local crops are one ``BatchAugment`` call on the batch repeated ``N`` times (crop-major: rows
  ``k B .. (k + 1) B - 1`` are local crop ``k`` of every image), split afterwards: one kernel sequence at
  ``local_size`` for all ``N`` crops, not ``N``. Every row draws its own parameters, so the crops of one
  image are independent draws, as in the official codes' per-crop transform calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.views.augment import BatchAugment
from selfsup.views.config import MultiCropConfig, ViewConfig, local_view_config

__all__ = ["MultiCrop", "save_multicrop_grid"]

LOCAL_DISPLAYS = ("pad", "resize")


class MultiCrop(torch.nn.Module):
    """Two global views and ``cfg.num_local`` local crops of a ``(B, C, H, W)`` batch, on its device.

    ``view1`` / ``view2`` are the global views' distributions (as for two-view training), ``image_size`` their
    side; ``mean`` / ``std`` normalise every crop. ``local_view`` replaces the derived local distribution
    (:func:`~selfsup.views.config.local_view_config`); its ``crop_scale`` is replaced by ``cfg.local_scale``.

    ``forward(images, generator=None, return_params=False)`` returns the list of ``2 + num_local`` float32
    views, the two global ones ``(B, C, image_size, image_size)`` then the local ones
    ``(B, C, local_size, local_size)``; with ``return_params=True`` also one params dict per view (see
    ``BatchAugment.forward``). No per-crop Python loop over the batch and no host-device sync.
    """

    def __init__(self, view1: ViewConfig, view2: ViewConfig, image_size: int, mean: Sequence[float],
                 std: Sequence[float], cfg: MultiCropConfig | None = None, local_view: ViewConfig | None = None):
        super().__init__()
        cfg = MultiCropConfig() if cfg is None else cfg
        cfg.validate()
        self.cfg = cfg
        self.num_local = cfg.num_local
        on = cfg.num_local > 0
        if on and cfg.global_scale is not None:
            view1, view2 = replace(view1, crop_scale=cfg.global_scale), replace(view2, crop_scale=cfg.global_scale)
        self.global1 = BatchAugment(view1, image_size, mean, std)
        self.global2 = BatchAugment(view2, image_size, mean, std)
        self.image_size = self.global1.out_size
        self.local_size = cfg.resolved_local_size(self.image_size)
        self.local: BatchAugment | None = None
        if on:
            if local_view is None:
                local_view = local_view_config(view1, view2, cfg.local_scale, self.image_size, self.local_size)
            else:
                local_view = replace(local_view, crop_scale=cfg.local_scale)
            self.local = BatchAugment(local_view, self.local_size, mean, std)

    @property
    def num_views(self) -> int:
        """``2 + num_local``: the length of the list ``forward`` returns."""
        return 2 + self.num_local

    @property
    def sizes(self) -> list[int]:
        """The side of each view ``forward`` returns, in order."""
        return [self.image_size] * 2 + [self.local_size] * self.num_local

    def extra_repr(self) -> str:
        return f"num_local={self.num_local}, image_size={self.image_size}, local_size={self.local_size}"

    def forward(self, images: Tensor, generator: torch.Generator | None = None,
                return_params: bool = False) -> list[Tensor] | tuple[list[Tensor], list[dict[str, Tensor]]]:
        views: list[Tensor] = []
        params: list[dict[str, Tensor]] = []
        for aug in (self.global1, self.global2):  # the two-view draws, in the same order
            out = aug(images, generator=generator, return_params=return_params)
            view, p = out if return_params else (out, {})
            views.append(view)
            params.append(p)
        if self.local is not None:
            # One call for all N crops: repeat crop-major, augment (each row draws its own parameters), split.
            n, bsz = self.num_local, images.shape[0]
            out = self.local(images.repeat(n, 1, 1, 1), generator=generator, return_params=return_params)
            crops, p = out if return_params else (out, {})
            views += crops.unflatten(0, (n, bsz)).unbind(0)
            per_crop = {k: v.unflatten(0, (n, bsz)).unbind(0) for k, v in p.items()}
            params += [{k: v[i] for k, v in per_crop.items()} for i in range(n)]
        return (views, params) if return_params else views

    def denormalize(self, x: Tensor) -> Tensor:
        """A view back on the [0, 1] scale (every crop is normalised with the same mean and std)."""
        return self.global1.denormalize(x)


@torch.no_grad()
def save_multicrop_grid(images: Tensor, multicrop: MultiCrop, path: str | Path, n_images: int = 8, seed: int = 0,
                        local_display: str = "pad", pad_value: float = 0.5) -> Path:
    """Write a PNG: one row per image, the original (resized to the global size) first, then the two global
    views and the ``num_local`` local crops, de-normalised back to [0, 1].

    Local crops are shown at the global size: ``"pad"`` puts each at its true pixel size in the middle of a
    ``pad_value`` grey square (their scale next to the global views), ``"resize"`` enlarges it by nearest
    neighbour (its pixels, no smoothing added). Layout as ``save_view_grid``: ``torchvision.utils.save_image``
    with ``padding=2``, ``(num_views + 1) * (image_size + 2) + 2`` wide and ``n * (image_size + 2) + 2`` high.
    """
    from torchvision.utils import save_image

    if local_display not in LOCAL_DISPLAYS:
        raise ValueError(f"local_display must be one of {', '.join(LOCAL_DISPLAYS)}, got {local_display!r}")
    if not 0.0 <= pad_value <= 1.0:
        raise ValueError(f"pad_value must be a grey level in [0, 1], got {pad_value!r}")
    imgs = images[:n_images]
    size = multicrop.image_size
    generator = torch.Generator(device=imgs.device).manual_seed(seed)
    x = imgs.to(torch.float32)
    if imgs.dtype == torch.uint8:
        x = x / 255.0
    columns = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)]
    for view in multicrop(imgs, generator=generator):
        view = multicrop.denormalize(view).clamp(0.0, 1.0)
        side = view.shape[-1]
        if side != size and local_display == "resize":
            view = F.interpolate(view, size=(size, size), mode="nearest-exact")
        elif side != size:
            lo = (size - side) // 2
            view = F.pad(view, (lo, size - side - lo, lo, size - side - lo), value=pad_value)
        columns.append(view)
    grid = torch.stack(columns, dim=1).flatten(0, 1).cpu()  # row-major: image i, then its views
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path, nrow=len(columns), padding=2)
    return path
