"""``selfsup analyze tsne``: t-SNE of h and of z = g(h), coloured by class, side by side.

SimCLR (Sec. 4.2, Appendix B.4) shows h separates classes better than z. For a pre-trained run,
``--points`` test images are encoded without augmentation; both feature sets are L2-normalised (the
geometry the loss and the kNN monitor use) and embedded in 2-D by scikit-learn's t-SNE (PCA
initialisation, fixed seed). Because a picture can flatter either side, the study also reports a
number: leave-one-out 20-NN accuracy (cosine) of the classes in h, in z and in each 2-D embedding.
Needs scikit-learn (``pip install 'selfsup[viz]'``).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from selfsup.analyze import arguments, common as C, outputs, probes

DEFAULT_STEPS = 300
DEFAULT_BATCH = 128
DEFAULT_POINTS = 1000


def build_parser(prog: str = "selfsup analyze tsne") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    arguments.add_common_args(p, "tsne", steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH)
    arguments.add_run_args(p)
    p.add_argument("--points", type=int, default=DEFAULT_POINTS, help=f"test images to embed (default {DEFAULT_POINTS})")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default 30)")
    return p


def require_tsne():
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise C.ConfigError("selfsup analyze tsne needs scikit-learn, which is not installed; "
                            "pip install 'selfsup[viz]'") from None
    return TSNE


def knn_loo_accuracy(x: torch.Tensor, y: torch.Tensor, k: int = 20) -> float:
    """Leave-one-out k-NN (cosine, majority vote) accuracy in %: how well neighbours share a class."""
    x = F.normalize(x.float(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, len(x) - 1)
    idx = sim.topk(k, dim=1).indices
    votes = torch.zeros(len(x), int(y.max()) + 1).scatter_add_(1, y[idx], torch.ones(len(x), k))
    return 100.0 * (votes.argmax(1) == y).float().mean().item()


def embed(features: torch.Tensor, seed: int, perplexity: float) -> torch.Tensor:
    TSNE = require_tsne()
    x = F.normalize(features.float(), dim=1).numpy()
    perplexity = min(perplexity, max(1.0, (len(x) - 1) / 3))
    out = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=seed).fit_transform(x)
    return torch.from_numpy(out).float()


def run(args: argparse.Namespace) -> dict:
    require_tsne()
    if args.points < 10:
        raise C.ConfigError(f"--points: need at least 10 images for a t-SNE, got {args.points}")
    arguments.adopt_run_settings(args)
    args.test_images = max(args.test_images, args.points)
    ctx = C.StudyContext("tsne", args, {"points": args.points, "perplexity": args.perplexity,
                                        "run": str(args.run) if args.run else None, "method": args.method})
    ctx.open()
    run_dir = C.ensure_run(ctx, args)
    model, info = probes.load_method(run_dir)
    _, test = ctx.eval_slices()
    pts = C.subset(test, torch.arange(min(args.points, len(test))))
    h, z, y = probes.features_hz(model, pts, ctx.device, info.image_size)
    C.log(f"tsne: embedding {len(y)} points of h ({h.shape[1]}-d) and z ({z.shape[1]}-d)")
    eh, ez = embed(h, ctx.seed, args.perplexity), embed(z, ctx.seed, args.perplexity)
    knn = {"h": knn_loo_accuracy(h, y), "z": knn_loo_accuracy(z, y),
           "tsne_h": knn_loo_accuracy_2d(eh, y), "tsne_z": knn_loo_accuracy_2d(ez, y)}
    rows = [{"label": int(c), "h_x": float(a[0]), "h_y": float(a[1]), "z_x": float(b[0]), "z_y": float(b[1])}
            for c, a, b in zip(y, eh, ez)]
    outputs.write_csv(ctx.out / "tsne.csv", rows)
    outputs.write_json(ctx.out / "results.json", {"run": str(run_dir), "points": len(y), "knn20_loo": knn,
                                            "h_dim": int(h.shape[1]), "z_dim": int(z.shape[1])})

    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.9))
    classes = list(getattr(test, "classes", [])) or [str(c) for c in range(int(y.max()) + 1)]
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, e, name, dim in ((axes[0], eh, "h", h.shape[1]), (axes[1], ez, "z = g(h)", z.shape[1])):
        for c in range(len(classes)):
            m = y == c
            if m.any():
                ax.scatter(e[m, 0], e[m, 1], s=3, color=cmap(c % cmap.N), label=classes[c])
        key = "h" if name == "h" else "z"
        ax.set_title(f"{name} ({dim}-d), 20-NN {knn[key]:.1f}%", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"t-SNE of {len(y)} {ctx.dataset} test images, {info.config.method} run", fontsize=9)
    png = outputs.save_figure(fig, ctx.out / "tsne.png")

    lines = [
        f"t-SNE (scikit-learn, L2-normalised features, perplexity {args.perplexity:g}) of {len(y)} test images "
        f"encoded by the {info.config.method} run `{run_dir}` ({info.config.backbone}, {info.image_size} px).",
        "",
        *outputs.markdown_table(["space", "leave-one-out 20-NN class accuracy %"],
                          [["h", outputs.fmt(knn["h"])], ["z = g(h)", outputs.fmt(knn["z"])],
                           ["t-SNE of h (2-D)", outputs.fmt(knn["tsne_h"])], ["t-SNE of z (2-D)", outputs.fmt(knn["tsne_z"])]]),
        "",
        "The paper: classes are better separated in h than in z (SimCLR Appendix B.4).",
        "", "![tsne](tsne.png)",
    ]
    summary = ctx.write_summary("t-SNE of h and z", lines)
    return {"study": "tsne", "out": str(ctx.out), "run": str(run_dir), "figures": [str(png)], "summary": str(summary),
            "knn20_loo": knn}


def knn_loo_accuracy_2d(e: torch.Tensor, y: torch.Tensor, k: int = 20) -> float:
    """Leave-one-out k-NN accuracy in a 2-D embedding, by Euclidean distance (t-SNE's own geometry)."""
    d = torch.cdist(e, e)
    d.fill_diagonal_(float("inf"))
    k = min(k, len(e) - 1)
    idx = d.topk(k, dim=1, largest=False).indices
    votes = torch.zeros(len(e), int(y.max()) + 1).scatter_add_(1, y[idx], torch.ones(len(e), k))
    return 100.0 * (votes.argmax(1) == y).float().mean().item()
