"""Pictures and a markdown report of a run: loss / lr / kNN curves, the view grid, evaluation results."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot_curves(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """loss.png: training loss, learning rate and (if logged) kNN accuracy against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    knn = [r for r in rows if "knn_top1" in r]
    if not train:
        return None
    path = Path(path or Path(run_dir) / "loss.png")
    ncols = 3 if knn else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3), dpi=100)
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    axes[1].set(title="learning rate", xlabel="step")
    if knn:
        axes[2].plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], marker="o", color="tab:green")
        axes[2].set(title="kNN top-1 (%)", xlabel="step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_markdown_report(run_dir: str | Path, extra: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    curves = plot_curves(run_dir)
    lines = [f"# selfsup run `{run_dir.name}`", ""]
    cfg = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if info:
        lines += [f"- device: {info.get('device')}, precision: {info.get('precision')}, steps: {info.get('total_steps')} "
                  f"({info.get('total_steps', 0) / max(1, info.get('steps_per_epoch', 1)):.2f} epochs of "
                  f"{info.get('num_images')} images)"]
    if train:
        last = train[-1]
        ips = [r["images_per_sec"] for r in train[1:]] or [train[0]["images_per_sec"]]
        lines += [f"- final loss {last['loss']:.4f} after {last.get('elapsed_sec', 0) / 60:.1f} min; "
                  f"median throughput {sorted(ips)[len(ips) // 2]:.0f} images/s (two views each)"]
    for name in ("eval_linear.json", "eval_knn.json", "eval_linear_pixels.json"):
        p = run_dir / name
        if p.is_file():
            r = json.loads(p.read_text())
            what = "raw-pixel baseline (the same linear probe on the pixels)" if name.endswith("_pixels.json") else name[5:-5]
            lines.append(f"- {what} evaluation on {r.get('dataset')}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%")
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    if curves:
        lines += ["## Training curves", "", f"![curves]({curves.name})", ""]
    if (run_dir / "views.png").is_file():
        lines += ["## Augmented views", "", "First column: the original; then views drawn from the two view distributions.",
                  "", "![views](views.png)", ""]
    if cfg:
        lines += ["## Config", "", "```yaml", cfg.rstrip(), "```", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
