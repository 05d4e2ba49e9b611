"""Pre-training throughput, side by side in one run, on the same encoder, batch and view distribution:

  (a) selfsup: uint8 data in memory, augmentation on the model's device, forward, NT-Xent, backward, LARS
  (b) the peers' way: torchvision per-image PIL transforms in DataLoader workers, then the same model step
  (c) the model step alone on ready-made tensors (the upper bound for (a))

It prints images/s for each (an image = two views), the ratios a/b and a/c, the encoder's FLOPs per
view, and the achieved FLOP/s against the machine's measured matrix-multiply peak (fp32 and bf16).

    python benchmarks/throughput.py                                   # CPU default: resnet18_narrow, 28 px, batch 256
    python benchmarks/throughput.py --backbone resnet50 --image-size 224 --channels 3 --batch-size 256 --device cuda
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from selfsup.views.augment import BatchAugment
from selfsup.views.config import ViewConfig
from selfsup.models.backbones import build_backbone
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.methods import METHODS
from selfsup.training.optim import build_optimizer
from selfsup.training.devices import autocast_context, resolve_precision


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_model(args, device):
    cfg = build_config(PretrainConfig, {"backbone": args.backbone, "batch_size": args.batch_size,
                                        "simclr": {"temperature": 0.2}, "method": "simclr"})
    backbone = build_backbone(args.backbone, in_channels=args.channels, image_size=args.image_size)
    model = METHODS["simclr"].build(cfg.section, backbone).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer("lars", model, 0.3, 1e-6)
    return model, opt


def model_step(model, opt, x1, x2, device, precision, channels_last, fn=None):
    if channels_last:
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    with autocast_context(device, precision):
        loss, _ = (model if fn is None else fn)(x1, x2)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def timed(fn, steps, warmup, device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t


def run(args) -> dict:
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    size, b, c = args.image_size, args.batch_size, args.channels
    src = int(round(size * args.source_scale))
    n_data = max(4 * b, 2048)
    data = torch.randint(0, 256, (n_data, c, src, src), dtype=torch.uint8)
    mean, std = (0.5,) * c, (0.25,) * c
    view = ViewConfig.simclr(size)
    aug = BatchAugment(view, size, mean, std)
    model, opt = make_model(args, device)
    fn = torch.compile(model) if args.compile else model
    out: dict = {"backbone": args.backbone, "image_size": size, "batch_size": b, "channels": c,
                 "device": str(device), "precision": precision, "channels_last": args.channels_last,
                 "compile": args.compile, "torch": torch.__version__}

    # FLOPs of one forward+backward of the encoder+head on one view (multiply-adds x 2).
    from torch.utils.flop_counter import FlopCounterMode

    # Counted in eval mode: the nominal convolution FLOPs (backbones.Conv2d's training-only matmul
    # paths for 2x2 maps do fewer multiply-adds, so the achieved figure stays comparable across versions).
    probe = build_backbone(args.backbone, in_channels=c, image_size=size).eval()
    with FlopCounterMode(display=False) as fc_fwd, torch.no_grad():
        probe(torch.randn(2, c, size, size))
    fwd_flops_per_view = fc_fwd.get_total_flops() / 2
    out["encoder_gmacs_per_view"] = fwd_flops_per_view / 2 / 1e9
    step_flops = 3 * fwd_flops_per_view * 2 * b  # fwd + bwd (~2x fwd), two views

    # (c) model step on ready-made tensors
    x1 = aug(data[:b]).to(device)
    x2 = aug(data[b:2 * b]).to(device)
    t_c = timed(lambda: model_step(model, opt, x1, x2, device, precision, args.channels_last, fn), args.steps,
                args.warmup, device)
    out["c_model_only_img_s"] = b * args.steps / t_c

    # (a) selfsup end to end: uint8 on the device, batched augmentation there
    data_dev = data.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    state = {"i": 0}

    def step_a():
        i = state["i"]
        state["i"] = (i + 1) % (n_data // b)
        idx = torch.randint(0, n_data, (b,), generator=gen, device=device)
        batch = data_dev[idx]
        v1, v2 = aug(batch, gen), aug(batch, gen)
        return model_step(model, opt, v1, v2, device, precision, args.channels_last, fn)

    t_a = timed(step_a, args.steps, args.warmup, device)
    out["a_selfsup_img_s"] = b * args.steps / t_a

    # (b) torchvision per-image PIL pipeline in DataLoader workers
    if args.workers >= 0:
        out["b_pil_workers_img_s"] = pil_pipeline(args, data, view, mean, std, model, opt, device, precision, fn)
        out["ratio_a_over_b"] = out["a_selfsup_img_s"] / out["b_pil_workers_img_s"]
    out["ratio_a_over_c"] = out["a_selfsup_img_s"] / out["c_model_only_img_s"]

    # kornia, when installed, as a third line
    try:
        import kornia.augmentation as K  # noqa: F401

        out["kornia_img_s"] = kornia_pipeline(args, data_dev, view, mean, std, model, opt, device, precision, fn)
    except ImportError:
        out["kornia_img_s"] = None

    peak32 = matmul_peak(device, torch.float32)
    peak16 = matmul_peak(device, torch.bfloat16) if (device.type == "cuda" or args.measure_cpu_bf16) else None
    out["peak_matmul_fp32_tflops"] = peak32 / 1e12
    out["peak_matmul_bf16_tflops"] = peak16 / 1e12 if peak16 else None
    achieved = step_flops * args.steps / t_a
    out["achieved_tflops_a"] = achieved / 1e12
    peak = peak16 if (precision == "bf16" and peak16) else peak32
    out["achieved_fraction_of_peak_a"] = achieved / peak
    return out


class _PilDataset(torch.utils.data.Dataset):
    def __init__(self, data, view: ViewConfig, size, mean, std):
        from torchvision import transforms as T

        self.data = data.numpy()
        ops = [T.RandomResizedCrop(size, scale=view.crop_scale, ratio=view.crop_ratio, antialias=True),
               T.RandomHorizontalFlip(view.flip_p)]
        if view.jitter_p > 0:
            ops.append(T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                                     p=view.jitter_p))
        if view.grayscale_p > 0 and data.shape[1] == 3:
            ops.append(T.RandomGrayscale(view.grayscale_p))
        if view.blur_p > 0:
            k = max(3, int(0.1 * size) // 2 * 2 + 1)
            ops.append(T.RandomApply([T.GaussianBlur(k, view.blur_sigma)], p=view.blur_p))
        ops += [T.ToTensor(), T.Normalize(mean, std)]
        self.tf = T.Compose(ops)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        a = self.data[i]
        img = Image.fromarray(a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)))
        return self.tf(img), self.tf(img)


def pil_pipeline(args, data, view, mean, std, model, opt, device, precision, fn) -> float:
    ds = _PilDataset(data, view, args.image_size, mean, std)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    it = iter(loader)

    def step():
        nonlocal it
        try:
            v1, v2 = next(it)
        except StopIteration:
            it = iter(loader)
            v1, v2 = next(it)
        return model_step(model, opt, v1.to(device, non_blocking=True), v2.to(device, non_blocking=True), device,
                          precision, args.channels_last, fn)

    t = timed(step, args.steps, args.warmup, device)
    return args.batch_size * args.steps / t


def kornia_pipeline(args, data_dev, view, mean, std, model, opt, device, precision, fn) -> float:
    import kornia.augmentation as K

    colour = data_dev.shape[1] == 3  # saturation and hue mean nothing for one channel (selfsup skips them too)
    ops = [K.RandomResizedCrop((args.image_size, args.image_size), scale=view.crop_scale, ratio=view.crop_ratio),
           K.RandomHorizontalFlip(p=view.flip_p),
           K.ColorJitter(view.brightness, view.contrast, view.saturation if colour else 0.0,
                         view.hue if colour else 0.0, p=view.jitter_p)]
    if data_dev.shape[1] == 3:
        ops.append(K.RandomGrayscale(p=view.grayscale_p))
    ops.append(K.Normalize(torch.tensor(mean), torch.tensor(std)))
    aug = K.AugmentationSequential(*ops).to(device)
    b = args.batch_size

    def step():
        idx = torch.randint(0, len(data_dev), (b,), device=device)
        x = data_dev[idx].float() / 255
        return model_step(model, opt, aug(x), aug(x), device, precision, args.channels_last, fn)

    t = timed(step, args.steps, args.warmup, device)
    return b * args.steps / t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18_narrow")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--source-scale", type=float, default=1.0, help="stored image side / training side")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b); -1 skips (b)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--imagefolder", type=int, default=0, metavar="N",
                   help="also measure pre-training streamed from a generated folder of N JPEGs of varied sizes "
                        "(benchmarks/imagefolder_throughput.py), at --image-size with --workers workers")
    p.add_argument("--measure-cpu-bf16", action="store_true", help="also time a bf16 matmul on the CPU (slow without AVX512-BF16/AMX)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args)
    if args.imagefolder:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from imagefolder_throughput import measure

        folder = measure(num_images=args.imagefolder, image_size=args.image_size, batch_size=min(args.batch_size, 64),
                         workers=max(args.workers, 0), backbone=args.backbone)
        r["imagefolder"] = folder
    print(f"config: {args.backbone} {args.image_size}px x{args.channels}ch batch {args.batch_size} on {r['device']}, "
          f"{r['precision']}, channels_last={r['channels_last']}, compile={r['compile']}; "
          f"encoder {r['encoder_gmacs_per_view']:.4f} GMACs/view")
    print(f"(a) selfsup, augmentation on device : {r['a_selfsup_img_s']:9.1f} images/s")
    if "b_pil_workers_img_s" in r:
        print(f"(b) PIL transforms, {args.workers} workers      : {r['b_pil_workers_img_s']:9.1f} images/s")
    if r.get("kornia_img_s"):
        print(f"    kornia on device                : {r['kornia_img_s']:9.1f} images/s")
    print(f"(c) model step only                 : {r['c_model_only_img_s']:9.1f} images/s")
    if "ratio_a_over_b" in r:
        print(f"a/b = {r['ratio_a_over_b']:.2f}   a/c = {r['ratio_a_over_c']:.2f}")
    else:
        print(f"a/c = {r['ratio_a_over_c']:.2f}")
    if "imagefolder" in r:
        f = r["imagefolder"]
        keys = [k for k in f if k.endswith("images_per_sec") or k.endswith("img_s")]
        print("    image folder streamed from disk  : " + ", ".join(f"{k} {f[k]:.1f}" for k in keys))
    bf = f"{r['peak_matmul_bf16_tflops']:.3f}" if r["peak_matmul_bf16_tflops"] else "n/a"
    print(f"achieved {r['achieved_tflops_a']:.3f} TFLOP/s in (a) = {100 * r['achieved_fraction_of_peak_a']:.1f}% of the "
          f"measured matmul peak (fp32 {r['peak_matmul_fp32_tflops']:.3f}, bf16 {bf} TFLOP/s)")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
