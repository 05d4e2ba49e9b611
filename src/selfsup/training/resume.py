"""A run's state on disk: saving a pre-training checkpoint, resuming from one, the weights exported at the end."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from selfsup.errors import CheckpointError, ConfigError, TrainingError
from selfsup.training import checkpoint as ckpt
from selfsup.distributed import unwrap
from selfsup.training.config import PretrainConfig, saved_config
from selfsup.training.config_io import to_dict


def export_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's state dict: names start with the part (``backbone.``, ``head.``, ...)."""
    return {k: v for k, v in unwrap(model).state_dict().items()}


def weights_meta(cfg: PretrainConfig, image_size: int, dataset) -> dict[str, str]:
    return {"method": cfg.method, "backbone": cfg.backbone, "image_size": str(image_size),
            "in_channels": str(dataset.num_channels), "config": json.dumps(to_dict(cfg))}


def save_run_checkpoint(run_dir, model, optimizer, cfg, step, total_steps, bad_total, main) -> Path | None:
    if not main:
        return None
    weights = export_weights(model)
    floats = {k: v for k, v in weights.items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]) if floats else torch.ones(1, dtype=torch.bool)
    if not bool(finite.all()):  # one sync; never let a broken state push a good checkpoint out of keep_last
        broken = [k for k, ok in zip(floats, finite.tolist()) if not ok]
        done = ckpt.list_checkpoints(run_dir)
        raise TrainingError(f"the model holds non-finite values at step {step} ({', '.join(broken[:3])}); it was not "
                            f"saved. The last good checkpoint is {done[-1] if done else 'none (none was written yet)'}")
    # No RNG state: the loop draws every random number from generators seeded by (seed, step)
    # (selfsup.training.batches), never from torch's global one, so a resumed run needs none.
    state = {"optimizer": optimizer.state_dict(), "step": step, "total_steps": total_steps, "bad_steps": bad_total}
    return ckpt.save_checkpoint(run_dir, step, weights, state, {"config": to_dict(cfg), "kind": "pretrain"},
                                keep_last=cfg.keep_last)


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], run_dir: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"the checkpoint in {run_dir} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}); was it written with another backbone or method?")
    model.load_state_dict(weights)


def load_resume(cfg: PretrainConfig, run_dir: Path):
    ckpts = ckpt.list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint found in {run_dir / 'checkpoints'}; "
                                   "start the run without --resume")
    weights, state, meta = ckpt.load_checkpoint(ckpts[-1])
    try:
        saved = saved_config(meta["config"])
        int(state["step"]), int(state["total_steps"]), state["optimizer"]
    except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"--resume {run_dir}: checkpoint {ckpts[-1]} was written by an incompatible selfsup "
                                   f"({type(e).__name__}: {e}); resume it with the release that wrote it") from None
    # Everything but bookkeeping must match the interrupted run; the saved config wins.
    free = {"device", "num_workers", "log_every", "checkpoint_every", "keep_last", "data_dir", "knn_monitor",
            "epochs", "steps", "minutes", "on_bad_image", "logger", "recipe"}
    given, kept = to_dict(cfg), to_dict(saved)
    diff = [k for k in kept if k not in free and given.get(k) != kept.get(k)
            and not (k in ("view", "view2") and given.get(k) is None)]
    if diff:
        raise ConfigError(f"--resume {run_dir}: the command line differs from the interrupted run in "
                          f"{', '.join(diff)}; resume with the run's own settings (saved in {run_dir / 'config.yaml'})")
    lengths = ("epochs", "steps", "minutes")
    if any(getattr(cfg, k) != getattr(saved, k) for k in lengths):
        if cfg.minutes is not None or saved.minutes is not None:
            raise ConfigError(f"--resume {run_dir}: a timed run (--minutes) keeps its length on resume; continue it "
                              "without a new length, or start a new run")
        if any(getattr(cfg, k) is not None for k in lengths):  # a new length: the run is extended (or shortened)
            for k in lengths:
                setattr(saved, k, getattr(cfg, k))
            state = {**state, "length_changed": True}
    for k in ("device", "num_workers", "log_every", "checkpoint_every", "keep_last", "data_dir", "on_bad_image", "logger"):
        setattr(saved, k, getattr(cfg, k))
    return saved, weights, state

def update_run_json(run_dir: Path, **values) -> None:
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(values)
    path.write_text(json.dumps(info, indent=1))
