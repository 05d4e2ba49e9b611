"""What multi-crop costs per training step on the CPU default, side by side in one run.

Configurations: 2 global views (today's two-view step) against 2 global views + N local crops, for local
crops of each ``--local-sizes`` px and N in ``--num-local``. For each it times

  augment  ``selfsup.views.multicrop.MultiCrop`` on the uint8 batch (the N local crops in one call)
  step     forward + backward of the encoder and projection head and the loss (no optimiser update:
           its cost does not depend on the crops)

and prints both, their sum, and the ratios to the 2-view configuration, next to the ratio that the forward
FLOPs of encoder + head predict (``torch.utils.flop_counter``). It also times the local crops alone, drawn by
the one batched ``BatchAugment`` call that ``MultiCrop`` makes and by ``num_local`` separate calls (what the
batched call replaces).

Model: what ``selfsup pretrain --dataset fashion-mnist --dry-run`` picks: ``resnet18_narrow`` (small stem of
stride 2) at 28 px, 1 channel, batch 256, SimCLR's head (Linear-BN-ReLU-Linear, 1024-1024-128),
channels_last, precision ``auto`` (bf16 where oneDNN computes it natively). As in DINO's
``MultiCropWrapper``, the encoder runs once per resolution (the 2B global views together, the N B local
crops together) and the head once on all outputs. Loss (NT-Xent-like, temperature 0.2, SwAV Sec. 3.2's
rule that local crops are compared with the global views only): ``nt_xent(z1, z2)`` plus, per local
crop v, ``(nt_xent(z_v, z1) + nt_xent(z_v, z2)) / 2``, averaged over the 1 + N terms.

The images are random uint8 pixels: neither the augmentation (every op runs on every sample) nor the
convolutions take data-dependent paths, so the times are those of real images. Timing is interleaved:
each round runs every configuration once, and the median over rounds is reported, so load from other
processes on a shared machine falls on all configurations alike.

    OMP_NUM_THREADS=1 python benchmarks/multicrop_cost.py
    python benchmarks/multicrop_cost.py --num-local 2 6 --local-sizes 12 --rounds 5 --precision fp32
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfsup.losses import nt_xent
from selfsup.models.backbones import CPU_DEFAULT_BACKBONE, build_backbone
from selfsup.models.heads import ProjectionHead
from selfsup.views.config import MultiCropConfig, ViewConfig
from selfsup.views.multicrop import MultiCrop

FASHION_MNIST_MEAN, FASHION_MNIST_STD = [0.2860], [0.3530]


def cpu_report() -> dict:
    """The CPU model (``lscpu``), its bf16 instruction flags, and whether oneDNN computes bf16 natively."""
    model, flags = platform.processor() or "unknown", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        flags = fields.get("Flags", "")
    except (OSError, subprocess.CalledProcessError):
        pass
    bf16_flags = sorted(f for f in flags.split() if "bf16" in f)
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return {"cpu": model, "bf16_flags": bf16_flags, "onednn_bf16": native, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def multicrop_loss(z_global: torch.Tensor, z_local: torch.Tensor | None, n_local: int, temperature: float) -> torch.Tensor:
    """NT-Xent between the global views plus each local crop against both global views, averaged over 1 + N terms."""
    z1, z2 = z_global.chunk(2)
    loss = nt_xent(z1, z2, temperature)
    if z_local is not None:
        for zv in z_local.chunk(n_local):
            loss = loss + (nt_xent(zv, z1, temperature) + nt_xent(zv, z2, temperature)) / 2
    return loss / (1 + n_local)


class Step:
    """Forward + backward of encoder, head and loss on a list of views ``[global1, global2, local1, ...]``."""

    def __init__(self, backbone, head, precision: str, channels_last: bool, temperature: float = 0.2):
        self.backbone, self.head, self.temperature = backbone, head, temperature
        self.precision, self.channels_last = precision, channels_last
        self.params = [p for m in (backbone, head) for p in m.parameters()]

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, views: list[torch.Tensor]) -> float:
        for p in self.params:
            p.grad = None
        n_local = len(views) - 2
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with ctx:
            h = [self.backbone(self._prep(torch.cat(views[:2])))]
            if n_local:
                h.append(self.backbone(self._prep(torch.cat(views[2:]))))
            z = self.head(torch.cat(h))
        z_global, z_local = (z[: 2 * views[0].shape[0]], z[2 * views[0].shape[0]:] if n_local else None)
        loss = multicrop_loss(z_global, z_local, n_local, self.temperature)
        loss.backward()
        return float(loss.detach())


def forward_flops(backbone, head, side: int, channels: int) -> int:
    """FLOPs of the forward pass of encoder and head on one ``side`` px image (the head costs the same at any size)."""
    backbone.eval()
    head.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        head(backbone(torch.zeros(1, channels, side, side)))
    backbone.train()
    head.train()
    return counter.get_total_flops()


def feature_map_side(backbone, side: int, channels: int) -> int:
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        out = backbone.forward_features(torch.zeros(1, channels, side, side)).shape[-1]
        backbone.train(was)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--local-sizes", type=int, nargs="+", default=[12, 14, 16])
    ap.add_argument("--num-local", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (each runs every configuration once)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    info = cpu_report()
    precision = ("bf16" if info["onednn_bf16"] else "fp32") if args.precision == "auto" else args.precision
    channels_last = not args.no_channels_last
    print(f"CPU: {info['cpu']}; bf16 flags: {', '.join(info['bf16_flags']) or 'none'}; oneDNN native bf16: "
          f"{info['onednn_bf16']}; torch {info['torch']}, {info['threads']} thread(s)")
    print(f"encoder {CPU_DEFAULT_BACKBONE} at {args.image_size} px, {args.channels} channel(s), batch {args.batch_size}, "
          f"precision {precision}, channels_last {channels_last}; median of {args.rounds} rounds after {args.warmup}")

    torch.manual_seed(0)
    backbone = build_backbone(CPU_DEFAULT_BACKBONE, in_channels=args.channels, image_size=args.image_size)
    head = ProjectionHead(backbone.num_features, backbone.num_features, 128, num_layers=2)
    backbone.train()
    head.train()
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    step = Step(backbone, head, precision, channels_last)

    sides = [args.image_size] + args.local_sizes
    flops = {s: forward_flops(backbone, head, s, args.channels) for s in sides}
    for s in sides:
        side = feature_map_side(backbone, s, args.channels)
        print(f"  {s:3d} px input: last feature map {side}x{side}, forward {flops[s] / 1e6:.1f} MFLOPs per image "
              f"(encoder + head)")

    view = ViewConfig.simclr(args.image_size)
    mean, std = FASHION_MNIST_MEAN * args.channels, FASHION_MNIST_STD * args.channels
    configs = [("2 views", 0, None)] + [(f"2 + {n} x {s} px", n, s) for s in args.local_sizes for n in args.num_local]
    crops = {name: MultiCrop(view, view, args.image_size, mean, std, MultiCropConfig(num_local=n, local_size=s))
             for name, n, s in configs}
    images = torch.randint(0, 256, (args.batch_size, args.channels, args.image_size, args.image_size),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {name: {"augment": [], "step": [], "batched": [], "loop": []} for name, _, _ in configs}
    gen = torch.Generator().manual_seed(0)
    for r in range(args.warmup + args.rounds):
        for name, _, _ in configs:
            t0 = time.perf_counter()
            views = crops[name](images, gen)
            t1 = time.perf_counter()
            step(views)
            t2 = time.perf_counter()
            mc = crops[name]
            t3 = t2
            if mc.local is not None:  # the local crops alone: one batched call, then one call per crop
                mc.local(images.repeat(mc.num_local, 1, 1, 1), generator=gen)
                t3 = time.perf_counter()
                for _ in range(mc.num_local):
                    mc.local(images, generator=gen)
            t4 = time.perf_counter()
            if r >= args.warmup:
                times[name]["augment"].append(t1 - t0)
                times[name]["step"].append(t2 - t1)
                times[name]["batched"].append(t3 - t2)
                times[name]["loop"].append(t4 - t3)

    rows = []
    for name, n, s in configs:
        t = {k: [1e3 * x for x in v] for k, v in times[name].items()}
        t["total"] = [a + b for a, b in zip(t["augment"], t["step"])]
        row = {"config": name, "num_local": n, "local_size": s,
               "flop_ratio": 1.0 if not n else 1.0 + n * flops[s] / (2 * flops[args.image_size])}
        for k, v in t.items():
            row[f"{k}_ms"], row[f"{k}_min_ms"], row[f"{k}_max_ms"] = statistics.median(v), min(v), max(v)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for k in ("augment", "step", "total"):
            row[f"{k}_ratio"] = row[f"{k}_ms"] / base[f"{k}_ms"]
            row[f"{k}_min_ratio"] = row[f"{k}_min_ms"] / base[f"{k}_min_ms"]
    print(f"\nTraining step (median over rounds; min in brackets), ratios to the 2-view step:")
    print(f"{'configuration':>16} | {'augment ms':>14} {'step ms':>14} {'total ms':>14} | {'step x':>12} {'total x':>12} "
          f"{'FLOPs x':>7} | {'step min-max ms':>15}")
    for r in rows:
        print(f"{r['config']:>16} | {r['augment_ms']:6.1f} ({r['augment_min_ms']:5.1f}) {r['step_ms']:6.1f} "
              f"({r['step_min_ms']:5.1f}) {r['total_ms']:6.1f} ({r['total_min_ms']:5.1f}) | {r['step_ratio']:5.2f} "
              f"({r['step_min_ratio']:4.2f}) {r['total_ratio']:5.2f} ({r['total_min_ratio']:4.2f}) {r['flop_ratio']:7.2f} | "
              f"{r['step_min_ms']:6.0f}-{r['step_max_ms']:<6.0f}")
    print(f"\nLocal crops alone (median; min in brackets): one batched call (MultiCrop) vs one call per crop:")
    print(f"{'configuration':>16} | {'1 call ms':>14} {'N calls ms':>14}")
    for r in rows[1:]:
        print(f"{r['config']:>16} | {r['batched_ms']:6.1f} ({r['batched_min_ms']:5.1f}) {r['loop_ms']:6.1f} "
              f"({r['loop_min_ms']:5.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "precision": precision, "batch_size": args.batch_size,
                       "image_size": args.image_size, "rounds": args.rounds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
