"""What multi-process training costs, and when NT-Xent's global batch becomes the expensive part.

Two parts (docs/results/speed.md, "Several processes"):

``comm``  measured with 2 gloo processes on this CPU: per training step of SimCLR (CPU default encoder,
          per-rank batch b), the time of one step with global negatives and synchronised batch norm, the
          same step without synchronised BN, the same step in one process without any communication,
          and, isolated, the gather of the projections (forward + backward, what ``nt_xent`` adds) and
          DDP's gradient all-reduce.
``model`` the cost model of NT-Xent: its (2N x 2N) similarity matrix costs 2 (2N)^2 d FLOPs forward and
          twice that backward, plus O((2N)^2) softmax work, against the encoder's FLOPs for 2N views
          (counted by ``torch.utils.flop_counter.FlopCounterMode``, forward + backward), for global
          batches N up to 1M; where the loss would dominate. Also measured wall time of nt_xent and of
          the CPU default encoder on one CPU thread, so the crossover can be read in seconds too.

    python benchmarks/distributed_cost.py comm --per-rank-batch 64 256
    python benchmarks/distributed_cost.py model
    python benchmarks/distributed_cost.py all --json /tmp/distributed_cost.json

Everything runs with one thread per process; on a shared machine the timings are medians over steps.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

PROJ_DIM = 128


# ------------------------------------------------------------------------------------------------
# comm: measured with 2 gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(backbone: str, image_size: int, sync_bn: bool):
    from selfsup.models.backbones import build_backbone
    from selfsup.models.heads import ProjectionHead
    from selfsup.methods.simclr import SimCLR
    from selfsup.models.sync_batchnorm import convert_sync_batchnorm

    torch.manual_seed(0)
    enc = build_backbone(backbone, in_channels=1, image_size=image_size)
    model = SimCLR(enc, ProjectionHead(enc.num_features, enc.num_features, PROJ_DIM), temperature=0.2)
    return convert_sync_batchnorm(model) if sync_bn else model


class _Stepper:
    """One configuration of the step being timed: a model, its (possibly DDP) wrapper and an optimiser."""

    def __init__(self, model, train_model):
        self.model, self.train_model = model, train_model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def __call__(self, x1, x2) -> None:
        loss, _ = self.train_model(x1, x2)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _comm_worker(rank: int, port: int, args, out_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from selfsup import distributed as dist

    dist.init_from_env()
    import torch.distributed as tdist

    results = []
    for b in args.per_rank_batch:
        # Three configurations timed in turn, step by step, so that a shared machine's load falls on all
        # of them alike: each rank alone (no communication), DDP + gathered negatives, and + sync BN.
        local = _build(args.backbone, args.image_size, sync_bn=False)
        plain = _build(args.backbone, args.image_size, sync_bn=False)
        synced = _build(args.backbone, args.image_size, sync_bn=True)
        configs = {"one_process_ms": _Stepper(local, local),
                   "ddp_ms": _Stepper(plain, dist.wrap_ddp(plain, torch.device("cpu"))),
                   "ddp_sync_bn_ms": _Stepper(synced, dist.wrap_ddp(synced, torch.device("cpu")))}
        times: dict[str, list[float]] = {k: [] for k in configs}
        g = torch.Generator().manual_seed(1)
        for i in range(args.steps + 2):
            x1 = torch.randn(b, 1, args.image_size, args.image_size, generator=g)
            x2 = torch.randn(b, 1, args.image_size, args.image_size, generator=g)
            for key, step in configs.items():
                if key == "one_process_ms":  # nt_xent must not gather here: time it outside the group
                    tdist.barrier()
                    t = time.perf_counter()
                    with _single_process():
                        step(x1, x2)
                else:
                    tdist.barrier()
                    t = time.perf_counter()
                    step(x1, x2)
                    tdist.barrier()
                if i >= 2:  # the first steps build DDP's buckets and warm the allocator
                    times[key].append(time.perf_counter() - t)
        row = {"per_rank_batch": b, "global_batch": 2 * b}
        for key, ts in times.items():
            row[key] = 1e3 * statistics.median(ts)
            row[key[:-3] + "_min_ms"] = 1e3 * min(ts)
        n_params = sum(p.numel() for p in synced.parameters())
        # The gather nt_xent adds: (b, 2 x 128) projections of both views, forward + backward.
        z = torch.randn(b, 2 * PROJ_DIM, requires_grad=True)
        gt = []
        for i in range(args.reps + 3):
            tdist.barrier()
            t0 = time.perf_counter()
            dist.gather_with_grad(z).sum().backward()
            gt.append(time.perf_counter() - t0)
        row["gather_fwd_bwd_ms"] = 1e3 * statistics.median(gt[3:])
        flat = torch.randn(n_params)
        at = []
        for i in range(args.reps + 3):
            tdist.barrier()
            t0 = time.perf_counter()
            tdist.all_reduce(flat)
            at.append(time.perf_counter() - t0)
        row["grad_allreduce_ms"] = 1e3 * statistics.median(at[3:])
        row["params"] = n_params
        row["gather_share_of_step"] = row["gather_fwd_bwd_ms"] / row["ddp_sync_bn_ms"]
        results.append(row)
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy()


class _single_process:
    """Make selfsup's distributed helpers behave as in one process (for the no-communication baseline)."""

    def __enter__(self):
        from selfsup import distributed as dist

        self._saved = dist.is_distributed
        dist.is_distributed = lambda: False
        return self

    def __exit__(self, *exc):
        from selfsup import distributed as dist

        dist.is_distributed = self._saved
        return False


def run_comm(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "comm.json")
        mp.spawn(_comm_worker, args=(_free_port(), args, out), nprocs=2)
        rows = json.loads(Path(out).read_text())
    print(f"\n2 gloo processes, {args.backbone} at {args.image_size} px, projection {PROJ_DIM}-d, 1 thread each; "
          f"median (and min) of {args.steps} interleaved steps (gather/all-reduce: median of {args.reps} reps)\n")
    print("| per-rank batch | global batch | 1 process, no communication (ms) | 2 ranks, DDP + global negatives (ms) "
          "| + sync BN (ms) | gather fwd+bwd (ms) | gather / step | DDP grad all-reduce (ms) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['per_rank_batch']} | {r['global_batch']} | {r['one_process_ms']:.0f} (min {r['one_process_min_ms']:.0f}) | "
              f"{r['ddp_ms']:.0f} (min {r['ddp_min_ms']:.0f}) | {r['ddp_sync_bn_ms']:.0f} (min {r['ddp_sync_bn_min_ms']:.0f}) | "
              f"{r['gather_fwd_bwd_ms']:.2f} | {100 * r['gather_share_of_step']:.2f}% | {r['grad_allreduce_ms']:.2f} |")
    return rows


# ------------------------------------------------------------------------------------------------
# model: FLOP counts and measured wall time


ENCODERS = (("resnet18_narrow", 28, 1, "CPU default, Fashion-MNIST"), ("resnet18", 32, 3, "CIFAR"),
            ("resnet50", 224, 3, "ImageNet"))


def encoder_flops(name: str, size: int, channels: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of encoder + 2-layer head, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from selfsup.models.backbones import build_backbone
    from selfsup.models.heads import ProjectionHead

    enc = build_backbone(name, in_channels=channels, image_size=size)
    net = torch.nn.Sequential(enc, ProjectionHead(enc.num_features, enc.num_features, PROJ_DIM))
    x = torch.randn(2, channels, size, size)  # batch 2: BN in training mode needs more than one sample
    with FlopCounterMode(display=False) as fc:
        net(x)
    fwd = fc.get_total_flops() / 2
    with FlopCounterMode(display=False) as fc:
        net(x).sum().backward()
    return fwd, fc.get_total_flops() / 2


def nt_xent_flops_counted(n: int, d: int = PROJ_DIM) -> float:
    """FlopCounterMode's count for nt_xent forward + backward at global batch n (matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from selfsup.losses import nt_xent

    z1, z2 = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        nt_xent(z1, z2, 0.2).backward()
    return fc.get_total_flops()


def nt_xent_flops_model(n: int, d: int = PROJ_DIM) -> float:
    """Similarity matrix 2 (2n)^2 d forward, 2x that backward (grad wrt anchors and keys), plus the
    softmax / cross-entropy, about 10 (2n)^2 elementwise FLOPs forward + backward (exp, sum, divide,
    log, mask, and their gradients). Independent of the number of ranks: each rank computes its
    (2n/W) x 2n block."""
    m = 2 * n
    return 3 * 2 * m * m * d + 10 * m * m


def _timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure_nt_xent_seconds(n: int, d: int = PROJ_DIM, reps: int = 3) -> float:
    from selfsup.losses import nt_xent

    z1, z2 = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)

    def step():
        z1.grad = z2.grad = None
        nt_xent(z1, z2, 0.2).backward()

    return _timeit(step, reps)


def measure_encoder_seconds_per_image(name: str, size: int, channels: int, batch: int = 64, reps: int = 3) -> float:
    """Forward + backward of encoder + head for one view, per image, training mode."""
    from selfsup.models.backbones import build_backbone
    from selfsup.models.heads import ProjectionHead

    enc = build_backbone(name, in_channels=channels, image_size=size)
    net = torch.nn.Sequential(enc, ProjectionHead(enc.num_features, enc.num_features, PROJ_DIM))
    x = torch.randn(batch, channels, size, size)

    def step():
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()

    return _timeit(step, reps) / batch


def run_model(args) -> dict:
    torch.set_num_threads(1)
    out: dict = {"encoders": [], "nt_xent": [], "measured": {}}
    counted = {n: nt_xent_flops_counted(n) for n in (64, 256)}
    for n, c in counted.items():
        mm = 3 * 2 * (2 * n) ** 2 * PROJ_DIM
        out["nt_xent"].append({"n": n, "flop_counter": c, "matmul_model": mm})
    print("\nNT-Xent matmul FLOPs, FlopCounterMode vs 3 x 2 (2N)^2 d (d = 128):",
          ", ".join(f"N={r['n']}: {r['flop_counter']:.4g} vs {r['matmul_model']:.4g}" for r in out["nt_xent"]))

    batches = [256, 1024, 4096, 8192, 16384, 65536, 262144, 1048576]
    print("\nPer training step, forward + backward, FLOPs (1 MAC = 2 FLOPs); encoder = backbone + 2-layer head on 2N views")
    for name, size, ch, what in ENCODERS:
        fwd, fb = encoder_flops(name, size, ch)
        # Loss FLOPs = encoder FLOPs:  6 (2N)^2 d + 10 (2N)^2 = 2N fb  ->  2N = fb / (6 d + 10)
        crossover = fb / (6 * PROJ_DIM + 10) / 2
        out["encoders"].append({"name": name, "image_size": size, "what": what, "fwd_flops_per_image": fwd,
                                "fwd_bwd_flops_per_image": fb, "crossover_global_batch": crossover})
        print(f"\n{name} at {size} px ({what}): {fwd / 1e9:.3f} GFLOPs forward per image ({fwd / 2e9:.3f} GMACs), "
              f"{fb / 1e9:.3f} GFLOPs forward+backward; the loss equals the encoder at N = {crossover:,.0f}\n")
        print("| global batch N | encoder GFLOPs | NT-Xent GFLOPs | loss / encoder | logits memory (all ranks) |")
        print("|---:|---:|---:|---:|---:|")
        for n in batches:
            enc_f = 2 * n * fb
            loss_f = nt_xent_flops_model(n)
            mem = (2 * n) ** 2 * 4 * 3  # fp32 logits, their softmax and its gradient
            print(f"| {n:,} | {enc_f / 1e9:,.0f} | {loss_f / 1e9:,.1f} | {loss_f / enc_f:.4f} | {_bytes(mem)} |")

    # Measured on this CPU, one thread: where does nt_xent's wall time catch up with the encoder's?
    # The encoder is re-timed next to every loss measurement, so a shared machine's load hits both alike.
    name, size, ch, _ = ENCODERS[0]
    rows = []
    n = 256
    while n <= args.measure_up_to:
        per_image = measure_encoder_seconds_per_image(name, size, ch)
        t = measure_nt_xent_seconds(n)
        rows.append({"n": n, "nt_xent_s": t, "encoder_s_per_view": per_image, "encoder_s": 2 * n * per_image})
        n *= 2
    out["measured"]["rows"] = rows
    # Fit t = a (2N)^2 on the largest measured batch and extrapolate.
    big = rows[-1]
    per_image = statistics.median(r["encoder_s_per_view"] for r in rows)
    out["measured"]["encoder_fwd_bwd_s_per_view"] = per_image
    a = big["nt_xent_s"] / (2 * big["n"]) ** 2
    crossover = per_image / (2 * a)  # a (2N)^2 = 2N per_image  ->  N = per_image / (2a)
    out["measured"]["crossover_global_batch"] = crossover
    print(f"\nMeasured on this CPU, 1 thread: {name} at {size} px forward+backward {1e3 * per_image:.2f} ms per view "
          "(median over the rows)\n")
    print("| global batch N | nt_xent fwd+bwd (s) | encoder fwd+bwd, 2N views (s) | loss / encoder |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['nt_xent_s']:.3f} | {r['encoder_s']:.2f} | {r['nt_xent_s'] / r['encoder_s']:.3f} |")
    print(f"\nExtrapolating t_loss = a (2N)^2 from N = {big['n']:,}: the loss's wall time equals the encoder's at "
          f"N = {crossover:,.0f} for {name} at {size} px.")
    return out


def _bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024:
            return f"{x:.0f} {unit}"
        x /= 1024
    return f"{x:.0f} PiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("comm", "model", "all"))
    p.add_argument("--per-rank-batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--backbone", default="resnet18_narrow")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--measure-up-to", type=int, default=4096, help="largest global batch at which nt_xent is timed")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"torch": torch.__version__, "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    if args.part in ("comm", "all"):
        result["comm"] = run_comm(args)
    if args.part in ("model", "all"):
        result["model"] = run_model(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
