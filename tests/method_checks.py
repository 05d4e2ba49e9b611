"""What the method tests share: the kNN top-1 of an encoder on a fixed part of the embedded sample, MoCo's
InfoNCE as a naive loop, and the interrupt-and-resume and Lightning helpers."""
from __future__ import annotations

import torch

from selfsup.evaluation.frozen import extract_features, knn_eval


def naive_infonce(q: torch.Tensor, k: torch.Tensor, t: float, queue: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo v3's ctr(q, k) one query at a time in float64: 2t x mean_i -log softmax_i(q_i . [k; queue] / t), all
    vectors l2-normalised."""
    q, k = q.double(), k.double()
    keys = [k[j] / k[j].norm() for j in range(k.shape[0])]
    if queue is not None:
        keys += [queue[j].double() / queue[j].double().norm() for j in range(queue.shape[0])]
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        logits = torch.stack([qi @ kj / t for kj in keys])
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return 2 * t * total / q.shape[0]


def knn_top1(encoder: torch.nn.Module, train, test, n_train: int, n_test: int, shuffled: bool = False,
             image_size: int = 16, k: int = 20) -> float:
    """kNN top-1 (k 20) of ``encoder``'s features: the first ``n_train`` / ``n_test`` images, or a fixed random
    draw of them (``shuffled``, seed 0), at ``image_size``."""
    if shuffled:
        g = torch.Generator().manual_seed(0)
        tr, te = torch.randperm(len(train), generator=g)[:n_train], torch.randperm(len(test), generator=g)[:n_test]
    else:
        tr, te = torch.arange(n_train), torch.arange(n_test)
    f_tr, y_tr = extract_features(encoder, train, "cpu", image_size, indices=tr)
    f_te, y_te = extract_features(encoder, test, "cpu", image_size, indices=te)
    return knn_eval(f_tr, y_tr, f_te, y_te, num_classes=10, k=k)["top1"]


def interrupt_and_resume(cfg, root, stop_at: int = 3) -> tuple[dict, dict, dict]:
    """``(full, saved, resumed)`` weights: an uninterrupted run of ``cfg``; the newest checkpoint of a run stopped
    after step ``stop_at``; and that run's final weights once resumed from it (equal to ``full`` for an exact
    resume)."""
    from selfsup.training.checkpoint import list_checkpoints, load_weights
    from selfsup.training.loop import pretrain

    full = load_weights(pretrain(cfg, root / "full", progress=False))

    class Stop(Exception):
        pass

    def bomb(step):
        if step == stop_at:
            raise Stop

    try:
        pretrain(cfg, root / "cut", progress=False, on_step=bomb)
    except Stop:
        pass
    else:
        raise AssertionError(f"the run was not stopped at step {stop_at}")
    saved = load_weights(list_checkpoints(root / "cut")[-1] / "model.safetensors")
    resumed = load_weights(pretrain(cfg, root / "cut", resume=True, progress=False))
    return full, saved, resumed


def lightning_two_steps(method: str, **section) -> tuple[dict, torch.nn.Module, int]:
    """Fit ``selfsup.lightning.MODULES[method]`` (tiny encoder, batch 16, fp32, the method's keys ``section``) for
    two steps on the embedded sample: ``(parameters before, the trained model, the trainer's global step)``."""
    import lightning as L

    from selfsup.data.datasets import load_dataset
    from selfsup.lightning import MODULES, step_dataloader

    dataset = load_dataset("embedded", "train")
    module = MODULES[method].for_dataset(dataset, backbone="resnet18", backbone_width=0.0625, batch_size=16,
                                         precision="fp32", **{method: section})
    before = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, step_dataloader(dataset, module.cfg, 2))
    return before, module.model, trainer.global_step
