"""The kNN accuracy logged once per epoch during pre-training (a fixed 10k bank and 2k queries)."""

from __future__ import annotations

import torch

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.evaluation.frozen import knn_eval
from selfsup.evaluation.sharded import extract_features_sharded
from selfsup.training.build import unwrap
from selfsup.training.steps import mix_seed


KNN_BANK, KNN_QUERIES = 10000, 2000


def knn_cost_estimate(cfg, per_step: float) -> float:
    # Feature extraction of bank + queries, forward only (~1/3 of a training pass), two views per step image.
    images = KNN_BANK + KNN_QUERIES
    return per_step * images / (cfg.batch_size * 2) / 3 * 2


def run_knn_monitor(cfg, model, dataset, device, image_size, precision, step, logger, cache):
    """kNN accuracy on a fixed subset (10k bank from the training set, 2k held-out queries).

    Under torchrun every rank embeds a shard of the bank and queries (``dist_eval``); rank 0 scores
    and logs. All ranks take part, so none waits in a collective while another evaluates.
    """
    if cache is None:
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, 3))
        perm = torch.randperm(len(dataset), generator=g)
        try:
            test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, image_size=cfg.image_size,
                                on_bad_image=cfg.on_bad_image, image_column=cfg.hf.image_column,
                                label_column=cfg.hf.label_column)
            tperm = torch.randperm(len(test), generator=g)[:KNN_QUERIES]
            cache = (perm[:KNN_BANK], test, tperm)
        except Exception:
            cache = (perm[KNN_QUERIES:KNN_QUERIES + KNN_BANK], dataset, perm[:KNN_QUERIES])
    bank_idx, qset, q_idx = cache
    enc = unwrap(model).backbone
    bf, bl = extract_features_sharded(enc, dataset, device, image_size, indices=bank_idx, precision=precision)
    qf, ql = extract_features_sharded(enc, qset, device, image_size, indices=q_idx, precision=precision)
    if dist.is_main_process():
        res = knn_eval(bf, bl, qf, ql, dataset.num_classes, cfg.knn_k, cfg.knn_temperature)
        logger.log({"step": step, "knn_top1": res["top1"], "knn_top5": res["top5"]})
    model.train()
