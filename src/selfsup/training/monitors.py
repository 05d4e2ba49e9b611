"""The run's monitors: the metric log (``metrics.jsonl`` plus TensorBoard or the ``--logger`` trackers, written
by rank 0) and the kNN accuracy logged once per epoch during pre-training (a fixed 10k bank and 2k queries)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.data.holdout import HOLDOUT_FRACTION, holdout_split
from selfsup.errors import DataNotFoundError, NoTestSplitError
from selfsup.evaluation.frozen import knn_eval
from selfsup.evaluation.preprocess import Preprocessing
from selfsup.evaluation.sharded import extract_features_sharded
from selfsup.training.batches import mix_seed


class MetricsLogger:
    """metrics.jsonl + TensorBoard (if installed), written by rank 0 only.

    ``trackers`` (from ``selfsup.training.trackers.open_trackers``, ``--logger``) replace the built-in TensorBoard writer.
    """

    def __init__(self, run_dir: Path, enabled: bool, trackers: list | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.trackers = list(trackers or [])
        if enabled and trackers is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # tensorboard is an optional extra
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk must not end the run here; the next checkpoint says so clearly
            if not getattr(self, "_warned", False):
                warnings.warn(f"could not append to {self.path} ({e.strerror or e}); metrics are not being logged")
                self._warned = True
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint we restart from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) <= last_step:
                keep.append(line)
        except ValueError:
            continue
    path.write_text("".join(k + "\n" for k in keep))


KNN_BANK, KNN_QUERIES = 10000, 2000


def knn_images(dataset) -> int:
    """Images one kNN-monitor evaluation embeds: the bank and the queries (as ``run_knn_monitor`` draws them)."""
    return min(KNN_BANK, len(dataset)) + min(KNN_QUERIES, len(dataset))


def measure_knn_cost(model, dataset, device, image_size, precision, clock, sample: int = 512) -> float:
    """Seconds one kNN-monitor evaluation will take, measured: embed ``sample`` images, scale to the bank.

    A timed run reserves this for each evaluation it will make. It replaced an estimate from the
    training step (a third of a step's two-view pass per image), which for BYOL, whose step also runs
    the target network and the predictor, was twice the real cost: a 10-minute BYOL run that ended
    before its first epoch stopped 20 s (3.4%) early. Embedding happens in eval mode; the model is put
    back in train mode, and nothing it holds changes.
    """
    enc = dist.unwrap(model).backbone
    n = max(1, min(sample, len(dataset)))
    warm = torch.arange(min(64, n))
    extract_features_sharded(enc, dataset, device, image_size, indices=warm, precision=precision)  # one-time costs
    t0 = clock()
    extract_features_sharded(enc, dataset, device, image_size, indices=torch.arange(n), precision=precision)
    seconds = clock() - t0
    model.train()
    return seconds * knn_images(dataset) / n


def knn_monitor_sets(cfg, dataset) -> tuple:
    """``(bank indices, query data set, query indices, where the queries come from)``: the test split's, else held out from the training images.

    Without a test split (an image folder without ``val/``, a single ``hf:`` Dataset, a store prepared
    without one), ``HOLDOUT_FRACTION`` of each class's training images are the queries and the bank is
    drawn from the rest (``selfsup.data.holdout``); rank 0 says so once. With no class of two images
    both are empty and the monitor steps aside.
    """
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, 3))
    perm = torch.randperm(len(dataset), generator=g)
    try:
        test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, image_size=cfg.image_size,
                            on_bad_image=cfg.on_bad_image, image_column=cfg.hf.image_column,
                            label_column=cfg.hf.label_column, num_channels=dataset.num_channels)
    except (NoTestSplitError, DataNotFoundError):
        kept, held = holdout_split(dataset.labels, HOLDOUT_FRACTION, mix_seed(cfg.seed, 3))
        bank = kept[torch.randperm(len(kept), generator=g)[:KNN_BANK]]
        queries = held[torch.randperm(len(held), generator=g)[:KNN_QUERIES]]
        if dist.is_main_process():
            note = (f"the kNN monitor uses {len(queries)} images held out of the training split as queries (no test "
                    f"split in {cfg.dataset})") if len(queries) else \
                f"the kNN monitor is off: {cfg.dataset} has no test split and no class with two images to hold one out"
            print(f"[selfsup] {note}", file=sys.stderr, flush=True)
        return (bank if len(queries) else bank[:0]), dataset, queries, "held out of the training images"
    return perm[:KNN_BANK], test, torch.randperm(len(test), generator=g)[:KNN_QUERIES], "test"


def run_knn_monitor(cfg, model, dataset, device, image_size, precision, step, logger, cache):
    """kNN accuracy on a fixed subset (10k bank from the training set, 2k queries: ``knn_monitor_sets``).

    Under torchrun every rank embeds a shard of the bank and queries (``dist_eval``); rank 0 scores
    and logs. All ranks take part, so none waits in a collective while another evaluates.
    """
    if cache is None:
        cache = knn_monitor_sets(cfg, dataset)
    bank_idx, qset, q_idx, source = cache
    if len(bank_idx) == 0 or len(q_idx) == 0:
        return cache  # too few labelled images to hold any out: the monitor steps aside (said once, at the start)
    enc = dist.unwrap(model).backbone
    prep = Preprocessing.of_dataset(dataset, image_size)  # the training set's statistics, for the queries too
    bf, bl = extract_features_sharded(enc, dataset, device, image_size, indices=bank_idx, precision=precision,
                                      preprocess=prep)
    qf, ql = extract_features_sharded(enc, qset, device, image_size, indices=q_idx, precision=precision,
                                      preprocess=prep)
    if dist.is_main_process():
        res = knn_eval(bf, bl, qf, ql, dataset.num_classes, cfg.knn_k, cfg.knn_temperature)
        logger.log({"step": step, "knn_top1": res["top1"], "knn_top5": res["top5"], "knn_queries": source})
    model.train()
