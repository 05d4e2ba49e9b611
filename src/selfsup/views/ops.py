"""The batched image operations behind the augmentation: colour jitter, grayscale, hue, Gaussian blur, Sobel, on ``(B, C, H, W)`` tensors with per-sample factors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# ITU-R 601-2 luma with torchvision's rounding (0.2989), so grayscale matches rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Jitter op ids: the columns of colour_jitter's ``factors`` (and of ``params["jitter_factors"]``).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Vectorised colour ops on (B, C, H, W) float tensors in [0, 1]; per-sample factors of shape (B,).
# --------------------------------------------------------------------------------------------------
def per_sample(v: Tensor) -> Tensor:
    """A per-sample ``(B,)`` value as ``(B, 1, 1, 1)``, to broadcast over images."""
    return v.view(-1, 1, 1, 1)


def to_gray(x: Tensor) -> Tensor:
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


def colour_jitter(x: Tensor, jittered: Tensor, factors: Tensor, order: Tensor, strengths: Sequence[float]) -> Tensor:
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
    linear = [k for k in (BRIGHTNESS, CONTRAST, SATURATION) if strengths[k] > 0.0 and (rgb or k != SATURATION)]
    use_hue = rgb and strengths[HUE] > 0.0
    if not linear and not use_hue:
        return x
    m = len(linear)
    n_slots = 2 * m if use_hue else m
    if m:
        pos = torch.argsort(order, dim=1)  # pos[b, k]: step at which sample b applies op k
        pos_lin = torch.stack([pos[:, k] for k in linear], dim=1)  # (B, m)
        rank = (pos_lin.unsqueeze(2) > pos_lin.unsqueeze(1)).sum(dim=2)  # rank among the linear ops
        slot = rank + m * (pos_lin > pos[:, HUE:HUE + 1]) if use_hue else rank
        slot = torch.where(jittered.view(-1, 1), slot, n_slots)  # not jittered: no slot
        onehot = (slot.unsqueeze(2) == torch.arange(n_slots, device=x.device)).to(x.dtype)  # (B, m, slots)
        # Per-op (a - 1, beta, gamma): brightness (f-1, 0, 0), contrast (f-1, 0, 1-f), saturation (f-1, 1-f, 0).
        coef = []
        for k in linear:
            d = factors[:, k] - 1.0
            zero = torch.zeros_like(d)
            coef.append(torch.stack([d, -d if k == SATURATION else zero, -d if k == CONTRAST else zero], dim=1))
        coef = torch.stack(coef, dim=1)  # (B, m, 3)
        slot_coef = (onehot.unsqueeze(3) * coef.unsqueeze(2)).sum(dim=1)  # (B, slots, 3)
    need_gray = CONTRAST in linear or SATURATION in linear

    def linear_slot(x: Tensor, s: int) -> Tensor:
        a, beta, gamma = (per_sample(c) for c in slot_coef[:, s].unbind(1))
        out = x * (a + 1.0)
        if need_gray:
            g = to_gray(x)
            if SATURATION in linear:
                out = out.add_(g * beta)
            out = out.add_(gamma * g.mean(dim=(1, 2, 3), keepdim=True))
        return out.clamp_(0.0, 1.0)

    for s in range(m):
        x = linear_slot(x, s)
    if use_hue:
        x = torch.where(per_sample(jittered), _adjust_hue(x, factors[:, HUE]), x)
        for s in range(m, 2 * m):
            x = linear_slot(x, s)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
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


def sobel(x: Tensor) -> Tensor:
    """Sobel gradient magnitude of the luma, scaled to [0, 1] per image, replicated over channels."""
    g = F.pad(to_gray(x), (1, 1, 1, 1), mode="replicate")
    # Separable Sobel from slices (no constant kernels to copy to the device): smooth [1, 2, 1]
    # across the derivative direction, central difference along it.
    sm_v = g[:, :, :-2, :] + 2.0 * g[:, :, 1:-1, :] + g[:, :, 2:, :]  # (B, 1, H, W + 2)
    sm_h = g[:, :, :, :-2] + 2.0 * g[:, :, :, 1:-1] + g[:, :, :, 2:]  # (B, 1, H + 2, W)
    gx = sm_v[..., 2:] - sm_v[..., :-2]
    gy = sm_h[:, :, 2:, :] - sm_h[:, :, :-2, :]
    mag = torch.sqrt(gx * gx + gy * gy)
    mag = mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return mag.expand_as(x)


def blur_kernel_size(frac: float, size: int) -> int:
    """Odd Gaussian kernel side, ``frac`` of the image side (at least 3, below twice the side)."""
    k = max(3, int(round(frac * size)))
    if k % 2 == 0:
        k += 1
    return min(k, 2 * size - 1)  # reflect padding needs radius < side


MAX_OUT_SIZE = 8192  # beyond this a batch cannot be held in memory; refused up front
