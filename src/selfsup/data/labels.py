"""Label subsets for semi-supervised learning: seeded class-balanced fractions and official label lists (SimCLRv2's 1% / 10%)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch


LABEL_BALANCES = ("equal", "proportional")


def label_subset(labels: torch.Tensor, fraction: float, seed: int, num_classes: int | None = None,
                 balance: str = "equal") -> torch.Tensor:
    """Sorted indices of a class-balanced, seeded subset of ``round(fraction * N)`` labeled samples.

    For semi-supervised evaluation with 1% / 10% of the labels (SimCLR sec. 6; SimCLRv2). The
    papers' ImageNet lists (Zhai et al., S4L) hold an *equal* number of images per class (12-13 at 1%,
    128-129 at 10%): ``balance="equal"`` (default) gives every class ``round(fraction * N) // C``
    images and a seeded choice of classes one more, or, when a class is too small for that, as many
    as the smallest class holds for every class (with a warning). ``balance="proportional"`` keeps
    ``round(fraction * count_c)`` (at least 1) per class instead. Drawn from a seed, not read from the
    papers' lists (for those, see ``selfsup finetune --label-subset FILE``). Deterministic for a seed,
    and nested: with one seed, the subset for a smaller fraction is contained in the subset for a
    larger one. Samples labeled ``-1`` are never chosen; classes (``range(num_classes)``, default
    ``max(label) + 1``) with no samples are skipped.
    """
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):  # also rejects NaN
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if balance not in LABEL_BALANCES:
        raise ValueError(f"label balance must be one of {', '.join(LABEL_BALANCES)}, got {balance!r}")
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    generator = torch.Generator().manual_seed(int(seed))
    classes = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        # One permutation per class, drawn whatever the fraction: this is what makes subsets nested.
        order = torch.randperm(members.numel(), generator=generator)
        classes.append(members[order])
    if not classes:
        return torch.empty(0, dtype=torch.int64)
    if balance == "proportional":
        keep = [max(1, round(fraction * m.numel())) for m in classes]
    else:
        total = max(len(classes), round(fraction * sum(m.numel() for m in classes)))
        base, extra = divmod(total, len(classes))
        plus_one = set(torch.randperm(len(classes), generator=generator)[:extra].tolist())
        keep = [base + (i in plus_one) for i in range(len(classes))]
        smallest = min(m.numel() for m in classes)
        if max(keep) > smallest:
            warnings.warn(f"label subset: equal counts of {base}-{base + (extra > 0)} images per class need more than the "
                          f"smallest class holds ({smallest}); every class gets {smallest} "
                          f"({smallest * len(classes)} labeled images instead of {total}). "
                          "Use balance='proportional' (selfsup finetune --label-balance proportional) to keep the class shares")
            keep = [smallest] * len(classes)
    return torch.sort(torch.cat([m[:k] for m, k in zip(classes, keep)])).values


def read_label_list(path: str | os.PathLike, files: Sequence[str | os.PathLike]) -> torch.Tensor:
    """Sorted indices of the files named in ``path``: the official 1% / 10% ImageNet list format.

    One file name per line (``n01440764_10026.JPEG``; blank lines and ``#`` comments ignored), matched
    against the base names of ``files`` (an image folder's training files, in data-set order).
    """
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    index: dict[str, int] = {}
    for i, f in enumerate(files):
        index.setdefault(Path(f).name, i)
    missing = [n for n in names if Path(n).name not in index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(names)} listed files are not in the training folder "
                         f"(first: {', '.join(missing[:3])})")
    if not names:
        raise ValueError(f"{path} lists no file names (expected one per line)")
    return torch.tensor(sorted({index[Path(n).name] for n in names}), dtype=torch.int64)
