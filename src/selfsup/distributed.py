"""Distributed helpers that are no-ops in a single process.

The same loss code runs in a CPU unit test and under DDP launched by ``torchrun``: every helper
checks whether a process group exists and otherwise returns the trivial answer. How they fit together
(process group from torchrun's environment, DDP, synchronised batch norm, failures): docs/how-to/distributed.md.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from selfsup.errors import ConfigError, TrainingError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher using the env:// protocol) set up this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient into the rows each rank owns.

    Written here rather than taken from ``torch.distributed.nn.functional.all_gather`` (deprecated in
    recent PyTorch) so that the gradient semantics the losses rely on are pinned down and tested
    (tests/test_distributed.py): forward ``[x_0; ...; x_{W-1}]``, backward
    ``dx_r = sum_k dL_k / dx_r`` (a SUM reduce-scatter).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # The list form of all_gather: stable across PyTorch versions (the single-tensor one was renamed).
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter(mine, list(grad.split(ctx.rows)), op=dist.ReduceOp.SUM)
            return mine
        # gloo has no reduce-scatter: sum everything, keep our rows (the gathered tensor is small).
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), keeping the autograd graph.

    Every rank must pass the same shape. The backward pass sums the gradients of every rank's loss
    into the rows each rank owns, so rank ``r``'s parameters receive ``d(sum_k L_k)/d theta`` through
    its own rows. If each rank's loss ``L_k`` is the mean over its own anchors, the single-process loss
    on the global batch is ``L = mean_k L_k``, and DDP's average of the ranks' gradients is exactly
    ``dL/d theta``: no factor of the world size to correct. In one process this returns ``x`` unchanged.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (equal shapes required), without gradients."""
    if not is_distributed() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 where ranks may hold different numbers of rows.

    No gradients; returns a tensor on ``x``'s device. Used to assemble features extracted shard by
    shard. The collective runs on the backend's device (CUDA for NCCL, CPU for gloo).
    """
    if not is_distributed() or world_size() == 1:
        return x
    dev = _collective_device(x)
    sizes = torch.tensor([x.shape[0]], device=dev)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s.item()) for s in all_sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[:x.shape[0]] = x.to(dev)
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts)], dim=0).to(x.device)


def _collective_device(x: torch.Tensor) -> torch.device:
    """Where a collective's tensors must live: this rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return x.device if x.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` holds on every rank; every rank gets the same answer (one tiny all-reduce)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    t = t.to(_collective_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s buffers (batch-norm statistics) from rank ``src`` to every rank.

    Rank 0's buffers are the ones a checkpoint stores; evaluating with them on every rank makes a
    sharded evaluation match a single-process one even when batch norm is not synchronised.
    """
    if not is_distributed():
        return
    for b in module.buffers():
        t = b.to(_collective_device(b))
        dist.broadcast(t, src)
        if t is not b:
            b.copy_(t)


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Returns True if this call created the group (the caller then owns ``destroy``), False when there is
    nothing to do (not launched by torchrun, or a group exists already). The backend is NCCL when CUDA
    is available and ``device`` (the configured one: auto, cpu, cuda, cuda:N) does not ask for another
    device, gloo otherwise. Collectives give up after ``SELFSUP_DIST_TIMEOUT`` seconds (default 600),
    so a rank that hangs or dies makes the others fail with an error instead of waiting forever.
    """
    if not launched_by_torchrun() or is_distributed():
        return False
    import datetime

    raw = os.environ.get("SELFSUP_DIST_TIMEOUT", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"SELFSUP_DIST_TIMEOUT={raw!r}: expected a number of seconds > 0, e.g. SELFSUP_DIST_TIMEOUT=600")
    not_gpu = device is not None and str(device) != "auto" and not str(device).startswith("cuda")
    backend = "nccl" if torch.cuda.is_available() and not not_gpu else "gloo"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank())  # binds the communicator to this rank's GPU
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds), **kwargs)
    return True


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` inside DistributedDataParallel, or ``model`` itself in one process.

    Parameters with ``requires_grad=False`` are never reduced by DDP. A method whose parts are not
    trained by gradients (BYOL's EMA target) lists them in ``ddp_ignore`` (submodule names): their
    parameters and buffers are then left entirely to the method (not broadcast, not reduced), as the
    EMA update keeps them identical on every rank anyway.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = tuple(getattr(model, "ddp_ignore", ()) or ())
    if ignore:
        names = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())
                 if any(n == m or n.startswith(m + ".") for m in ignore)]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (``model.module``), else the model."""
    return model.module if hasattr(model, "module") else model


def report_to_launcher(e: BaseException) -> None:
    """Hand ``e`` to torchrun, whose end-of-job summary then shows this message as the root cause.

    torchrun sets ``TORCHELASTIC_ERROR_FILE`` for each worker; without it (not under torchrun) this
    does nothing. Equivalent to torch's ``@record`` for a ``main`` that turns errors into exit codes.
    """
    if "TORCHELASTIC_ERROR_FILE" not in os.environ or isinstance(e, (KeyboardInterrupt, SystemExit)):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(e)
    except Exception:  # reporting must never hide the error itself
        pass


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (no gradients), returned on ``x``'s device; ``x`` itself is untouched."""
    if not is_distributed():
        return x
    y = x.detach().to(_collective_device(x), copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (no gradients), returned on ``x``'s device."""
    if not is_distributed():
        return x
    y = x.detach().to(_collective_device(x), copy=True)
    dist.all_reduce(y)
    return (y / world_size()).to(x.device)


# ------------------------------------------------------------------------------------------------
# The training loop's multi-process decisions: averaging logged values, broadcasting rank 0's choice, naming a failed rank


def mean_over_ranks(loss: float, logs: dict[str, float], device: torch.device) -> tuple[float, dict[str, float]]:
    """Average the loss and logged scalars over ranks (each rank's loss is the mean over its share)."""
    if world_size() == 1:
        return loss, logs
    keys = sorted(logs)
    values = all_reduce_mean(torch.tensor([loss] + [logs[k] for k in keys], dtype=torch.float64, device=device))
    return float(values[0]), {k: float(v) for k, v in zip(keys, values[1:])}


# How gloo and NCCL word a collective that failed because a peer died or stopped answering.
_LOST_PEER = r"(?i)timed out|timeout|connection (closed|reset|refused)|pair closure|by peer|nccl|gloo"


def rank_failure(e: BaseException, step: int, last_ckpt: Path | None) -> BaseException:
    """Name the rank in the error; a failed collective means another rank died or hung first."""
    who = f"rank {rank()} of {world_size()}"
    resume = f"continue with --resume {last_ckpt.parent.parent}" if last_ckpt else "no checkpoint was written yet"
    lost = isinstance(e, getattr(dist, "DistError", ())) or (
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

def broadcast_int(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return int(t.item())
