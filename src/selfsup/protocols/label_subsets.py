"""The labeled subset of a fine-tuning (or distillation) run: drawn class-balanced from a seed, or read from an
official list, and recorded in the run folder as ``label_subset.json`` so that every run on it sees the same images."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from selfsup import distributed as dist
from selfsup.data.labels import label_subset, read_label_list
from selfsup.errors import ConfigError

LABEL_SUBSET_FILE = "label_subset.json"



def prepare_label_subset(run_dir: Path, labels: torch.Tensor, dataset: str, fraction: float, seed: int,
                         num_classes: int, source: str | Path | None = None, balance: str = "equal",
                         files: list | None = None) -> torch.Tensor:
    """The labeled subset of a run: read from ``run_dir/label_subset.json`` (or ``source``) when present,
    else drawn by :func:`label_subset` (class-balanced, seeded) and written there.

    ``source`` may also be an official list (the 1% / 10% ImageNet files: one file name per line),
    matched against ``files``, the training folder's file names (image folders only).

    A stored subset must be for the same data set, training-split size and fraction, else
    :class:`ConfigError`. Indices refer to the training split; the test split is never drawn from.
    """
    own = run_dir / LABEL_SUBSET_FILE
    path = own if own.is_file() or source is None else Path(source)  # a resumed run keeps the subset it recorded
    data = None
    if not own.is_file() and source is not None and path.is_file() and not path.read_text()[:64].lstrip().startswith("{"):
        if files is None:
            raise ConfigError(f"--label-subset {source}: a list of file names needs an image-folder data set "
                              "(imagefolder:PATH), whose file names it refers to")
        try:
            idx = read_label_list(path, files)
        except ValueError as e:
            raise ConfigError(f"--label-subset {e}") from None
        data = {"seed": None, "source": str(path)}
    elif path.is_file():
        try:
            data = json.loads(path.read_text())
            idx = torch.tensor(data["indices"], dtype=torch.int64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a readable label subset ({e}); delete it or give another") from None
        expect = {"dataset": dataset, "split": "train", "num_train": len(labels), "fraction": fraction}
        if data.get("balance") == "list":  # read from an official list: its own fraction
            expect.pop("fraction")
        wrong = [f"{k} {data.get(k)!r} (this run: {v!r})" for k, v in expect.items() if data.get(k) != v]
        if wrong:
            raise ConfigError(f"{path} holds a label subset for another setting: {'; '.join(wrong)}. "
                              "Use a new --out folder, or the matching --label-fraction / --dataset")
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= len(labels):
            raise ConfigError(f"{path}: indices out of range for a training split of {len(labels)} images")
    elif source is not None:
        raise ConfigError(f"label_subset: {source} does not exist")
    else:
        idx = label_subset(labels, fraction, seed, num_classes, balance=balance)
    if not own.is_file() and dist.is_main_process():
        counts = torch.bincount(labels[idx], minlength=num_classes).tolist()
        record = {"dataset": dataset, "split": "train", "num_train": len(labels), "fraction": fraction,
                  "seed": data.get("seed") if data else seed, "num_labeled": int(idx.numel()),
                  "per_class": counts, "balance": data.get("balance", balance) if data else balance,
                  "indices": idx.tolist()}
        if data and data.get("source"):
            record.update(fraction=round(len(idx) / len(labels), 6), list=data["source"], balance="list")
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = own.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(own)
    return idx
