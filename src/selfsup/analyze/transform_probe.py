"""``selfsup analyze transform-probe``: SimCLR Table 3, what the projection head throws away.

For a pre-trained run, each probe task draws one transformation per image with a balanced
probability (e.g. rotation by 0/90/180/270 degrees, each 1/4; blur or not, each 1/2), labels each
image with what was applied (from ``BatchAugment(..., return_params=True)``), and fits a linear
classifier (``selfsup.evaluation.frozen.linear_eval``) on frozen h and on z = g(h) to predict it. The paper
finds z forgets much of it (rotation 67.6% from h vs 25.6% from z; orig. vs Sobel 96.6 vs 56.3).

Deviations, written down: the paper trains an MLP on the features; this is a linear probe (the
protocol every other evaluation here uses). Grayscale is a probe only for 3-channel images (a no-op on 1-channel data such as
Fashion-MNIST). Blur sigma is 0.1-2.0 px at the run's image size (``blur_sigma_ref_size``), so
blurred images are visibly blurred at 16-28 px. Only the probed transformation is applied (no crop).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from selfsup.analyze import arguments, common as C, outputs, probes
from selfsup.views.augment import BatchAugment
from selfsup.views.config import view_config_for

DEFAULT_STEPS = 300
DEFAULT_BATCH = 128


@dataclass(frozen=True)
class ProbeTask:
    """One question: which value of ``param`` (a key of ``BatchAugment``'s params) was drawn."""

    question: str
    num_classes: int
    param: str
    view: dict  # ViewConfig fields on top of the identity view
    rgb_only: bool = False

    def labels(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params[self.param].long()


TASKS: dict[str, ProbeTask] = {
    "rotation": ProbeTask("rotated by 0 / 90 / 180 / 270 degrees", 4, "rotation_k", {"rotate_p": 0.75}),
    "flip": ProbeTask("flipped horizontally or not", 2, "flipped", {"flip_p": 0.5}),
    "colour": ProbeTask("colour-jittered (s=1) or not", 2, "jittered", {"jitter_p": 0.5, "jitter_strength": 1.0}),
    "grayscale": ProbeTask("colour vs grayscale", 2, "gray", {"grayscale_p": 0.5}, rgb_only=True),
    "blur": ProbeTask("blurred or not", 2, "blurred", {"blur_p": 0.5}),
    "noise": ProbeTask("Gaussian noise or not", 2, "noised", {"noise_p": 0.5}),
    "sobel": ProbeTask("Sobel-filtered or not", 2, "sobel", {"sobel_p": 0.5}),
    "cutout": ProbeTask("cutout or not", 2, "cutout", {"cutout_p": 0.5}),
}


def build_parser(prog: str = "selfsup analyze transform-probe") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    arguments.add_common_args(p, "transform-probe", steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH, seeds=True)
    arguments.add_run_args(p)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {','.join(TASKS)} (default: all that apply)")
    return p


def task_augment(task: ProbeTask, image_size: int, mean, std):
    """A ``BatchAugment`` applying only ``task``'s transformation (no crop), blur sigma in pixels at ``image_size``."""
    view = dataclasses.replace(view_config_for((), image_size), blur_sigma_ref_size=float(image_size), **task.view)
    return BatchAugment(view, image_size, mean, std)


@torch.no_grad()
def probe_views(images: torch.Tensor, task: ProbeTask, aug, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented views of uint8 ``images`` and the label of what was applied to each."""
    x, params = aug(images, generator=generator, return_params=True)
    return x, task.labels(params)


@torch.no_grad()
def probe_features(model, images: torch.Tensor, task: ProbeTask, aug, seed: int, device,
                   batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, z, labels) of one random draw of ``task`` per image."""
    enc, head = probes.encoder_of(model).to(device).eval(), probes.projection_of(model).to(device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    hs, zs, ys = [], [], []
    for i in range(0, len(images), batch_size):
        x, y = probe_views(images[i:i + batch_size].to(device), task, aug, g)
        h = enc(x)
        hs.append(h.float().cpu())
        zs.append(head(h).float().cpu())
        ys.append(y.cpu())
    return torch.cat(hs), torch.cat(zs), torch.cat(ys)


def images_of(dataset) -> torch.Tensor:
    return dataset.images if hasattr(dataset, "images") else torch.stack([dataset[i][0] for i in range(len(dataset))])


def probe_run(ctx, run_dir, names: list[str], train, test) -> dict:
    """Every task's probes on one run's h and z (the draws and probe slices fixed by ``--seed``) as ``rows``,
    its class-label probe as ``classes``, the feature sizes and the run's ``info``."""
    model, info = probes.load_method(run_dir)
    rows, dims = [], (None, None)
    for k, name in enumerate(names):
        task = TASKS[name]
        aug = task_augment(task, info.image_size, train.mean, train.std)
        htr, ztr, ytr = probe_features(model, images_of(train), task, aug, ctx.seed * 1000 + 2 * k, ctx.device)
        hte, zte, yte = probe_features(model, images_of(test), task, aug, ctx.seed * 1000 + 2 * k + 1, ctx.device)
        chance = 100.0 * torch.bincount(yte, minlength=task.num_classes).max().item() / len(yte)
        acc_h = probes.linear_top1(htr, ytr, hte, yte, task.num_classes, ctx.seed)
        acc_z = probes.linear_top1(ztr, ytr, zte, yte, task.num_classes, ctx.seed)
        rows.append({"task": name, "question": task.question, "classes": task.num_classes, "chance": chance,
                     "probe_h": acc_h, "probe_z": acc_z, "h_minus_z": acc_h - acc_z})
        dims = (int(htr.shape[1]), int(ztr.shape[1]))
        C.log(f"transform-probe {name} ({run_dir.name}): h {acc_h:.1f}%, z {acc_z:.1f}% (chance {chance:.1f}%)")
    classes = C.evaluate_run(ctx, run_dir, with_z=True)  # context: how good the run is at the labels
    return {"rows": rows, "classes": classes, "h_dim": dims[0], "z_dim": dims[1], "info": info}


def run(args: argparse.Namespace) -> dict:
    arguments.adopt_run_settings(args)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise C.ConfigError(f"--tasks: unknown {bad or 'empty list'}; choose from {','.join(TASKS)}")
    if args.run is not None and args.seeds > 1:
        raise C.ConfigError("--seeds: needs runs the study pre-trains itself (one per seed); drop --run, or --seeds")
    ctx = C.StudyContext("transform-probe", args, {"tasks": names, "run": str(args.run) if args.run else None,
                                                   "method": args.method})
    ctx.open()
    train, test = ctx.eval_slices()
    skipped = [t for t in names if TASKS[t].rgb_only and train.num_channels != 3]
    names = [t for t in names if t not in skipped]
    run_dirs = [C.ensure_run(ctx, args, ctx.seed + k) for k in range(args.seeds)]
    measured = [probe_run(ctx, d, names, train, test) for d in run_dirs]
    rows, classes = measured[0]["rows"], measured[0]["classes"]
    if len(measured) > 1:
        keys = ("probe_h", "probe_z", "h_minus_z")
        rows = [C.mean_over_seeds(per_task, keys, spread=keys) for per_task in zip(*(m["rows"] for m in measured))]
        classes = C.mean_over_seeds([m["classes"] for m in measured], ("linear_h", "linear_z"), spread=("linear_h", "linear_z"))
    run_dir, info = run_dirs[0], measured[0]["info"]
    outputs.write_csv(ctx.out / "probe.csv", rows)
    outputs.write_json(ctx.out / "results.json", {"run": str(run_dir), "runs": [str(d) for d in run_dirs], "rows": rows,
                                                  "skipped": skipped, "classes": classes, "h_dim": measured[0]["h_dim"],
                                                  "z_dim": measured[0]["z_dim"]})

    plt = outputs.pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 1.5), 3.2))
    xs = range(len(rows))
    for shift, key, label, colour in ((-0.2, "probe_h", "from h", "tab:blue"), (0.2, "probe_z", "from z = g(h)", "tab:orange")):
        errs = [r.get(f"{key}_std") for r in rows]
        ax.bar([x + shift for x in xs], [r[key] for r in rows], 0.4, label=label, color=colour,
               yerr=errs if all(e is not None for e in errs) and rows else None, capsize=2)
    ax.scatter(list(xs), [r["chance"] for r in rows], marker="_", s=400, color="black", label="chance", zorder=3)
    ax.set_xticks(list(xs), labels=[r["task"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    seeds = f", mean ± sd of {args.seeds} seeds" if args.seeds > 1 else ""
    ax.set_title(f"Which transformation was applied? ({info.config.method}, {ctx.dataset}{seeds})", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    png = outputs.save_figure(fig, ctx.out / "probe.png")

    runs = f"run `{run_dir}`" if len(run_dirs) == 1 else \
        f"runs `{run_dir}` .. `{run_dirs[-1].name}` ({len(run_dirs)} pre-training seeds, mean ± sd)"
    lines = [
        f"SimCLR Table 3: linear probes predicting the applied transformation from h and from z of the "
        f"{info.config.method} {runs} ({info.config.backbone}, {info.image_size} px), {args.train_images} training / {args.test_images} test "
        "images, one draw each.",
        "",
        *outputs.markdown_table(["task", "question", "chance %", "from h %", "from z %", "h - z"],
                          [[r["task"], r["question"], outputs.fmt(r["chance"]), outputs.pm(r, "probe_h"),
                            outputs.pm(r, "probe_z"), outputs.pm(r, "h_minus_z")] for r in rows]),
        "",
        f"For reference, the same linear probe on the class labels: {outputs.pm(classes, 'linear_h')}% from h, "
        f"{outputs.pm(classes, 'linear_z')}% from z ({classes['h_dim']}-d h, {classes['z_dim']}-d z).",
        "The paper (ImageNet, MLP probe): colour vs grayscale 99.3 / 97.4, rotation 67.6 / 25.6, "
        "orig. vs corrupted 99.5 / 59.6, orig. vs Sobel 96.6 / 56.3 (h / z).",
    ]
    if skipped:
        lines.append(f"Skipped (no-ops on {train.num_channels}-channel images): {', '.join(skipped)}.")
    lines += ["", "![probe](probe.png)"]
    summary = ctx.write_summary("What h and z keep (SimCLR Table 3)", lines)
    return {"study": "transform-probe", "out": str(ctx.out), "run": str(run_dir), "figures": [str(png)],
            "summary": str(summary), "tasks": [r["task"] for r in rows]}
