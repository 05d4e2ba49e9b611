"""The loop's few multi-process decisions: averaging logged values, broadcasting rank 0's choice, naming a failed rank."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from selfsup import distributed as dist
from selfsup.errors import TrainingError


def mean_over_ranks(loss: float, logs: dict[str, float], device: torch.device) -> tuple[float, dict[str, float]]:
    """Average the loss and logged scalars over ranks (each rank's loss is the mean over its share)."""
    if dist.world_size() == 1:
        return loss, logs
    keys = sorted(logs)
    values = dist.all_reduce_mean(torch.tensor([loss] + [logs[k] for k in keys], dtype=torch.float64, device=device))
    return float(values[0]), {k: float(v) for k, v in zip(keys, values[1:])}


# How gloo and NCCL word a collective that failed because a peer died or stopped answering.
_LOST_PEER = r"(?i)timed out|timeout|connection (closed|reset|refused)|pair closure|by peer|nccl|gloo"


def rank_failure(e: BaseException, step: int, last_ckpt: Path | None) -> BaseException:
    """Name the rank in the error; a failed collective means another rank died or hung first."""
    who = f"rank {dist.rank()} of {dist.world_size()}"
    resume = f"continue with --resume {last_ckpt.parent.parent}" if last_ckpt else "no checkpoint was written yet"
    lost = isinstance(e, getattr(torch.distributed, "DistError", ())) or (
        isinstance(e, RuntimeError) and re.search(_LOST_PEER, str(e)) is not None)
    if lost:
        timeout = os.environ.get("SELFSUP_DIST_TIMEOUT", "600")
        return TrainingError(f"{who} lost contact with the other ranks after {step} completed steps: another rank crashed or "
                             f"stopped responding (collectives wait SELFSUP_DIST_TIMEOUT={timeout} s); if it crashed, its error is "
                             f"the root cause in torchrun's summary; {resume}. ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return e
    print(f"[selfsup] {who} failed after {step} completed steps: {type(e).__name__}: {e}; torchrun stops the other ranks; "
          f"{resume}", file=sys.stderr, flush=True)
    return e


def _init_process_group() -> bool:
    """Join torchrun's process group (kept for callers of the old name; see ``dist.init_from_env``)."""
    return dist.init_from_env()

def broadcast_int(value: int, device: torch.device) -> int:
    import torch.distributed as tdist

    t = torch.tensor([value], device=device if device.type == "cuda" else "cpu")
    tdist.broadcast(t, 0)
    return int(t.item())
