"""Hub-style model folders: ``selfsup export --to hub --out DIR`` and ``selfsup.load_encoder(DIR)``.

The folder is what the Hugging Face Hub expects of a model repository, and needs nothing but itself
to rebuild the encoder:

- ``model.safetensors``: the encoder f's weights (no projection head);
- ``config.json``: ``backbone`` (registry name) and ``backbone_args`` (``in_channels``, ``image_size``,
  ``width``) for ``selfsup.models.backbones.build_backbone``, ``num_features``, the input size and channels,
  the normalisation (``mean``, ``std`` on [0, 1]), the evaluation centre crop (``centre_crop``), the
  whole preprocessing as evaluation records it (``preprocessing``) and where the weights came from;
- ``README.md``: a model card: method, recipe, data (with its licence line), steps, and the
  evaluation results of the run folder (``eval_knn.json``, ``eval_linear.json``) with their protocol.

Publishing is one call for users who are online (not run by selfsup or its tests)::

    from huggingface_hub import HfApi
    HfApi().upload_folder(repo_id="USER/NAME", folder_path="DIR", repo_type="model")  # after create_repo / login

``torch.hub.load(REPO_DIR, "encoder", path=DIR, source="local")`` works through ``hubconf.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from selfsup import __version__
from selfsup.artifacts.export import load_exported
from selfsup.errors import CheckpointError, ConfigError
from selfsup.evaluation.preprocess import Preprocessing
from selfsup.models.backbones import build_backbone
from selfsup.training.checkpoint import load_weights, save_weights, weights_metadata
from selfsup.training.config_io import to_dict
from selfsup.training.runs import load_encoder as run_encoder, load_run, training_statistics

__all__ = ["export_hub", "load_encoder", "from_pretrained", "embed", "DATA_LICENCES"]

FORMAT = "selfsup-encoder"

# One line per data set for the model card; a user's own data gets a line to fill in.
DATA_LICENCES = {
    "fashion-mnist": "Fashion-MNIST, MIT licence (Zalando SE), https://github.com/zalandoresearch/fashion-mnist",
    "embedded": "a 12,000-image subset of Fashion-MNIST, MIT licence (Zalando SE), shipped inside selfsup",
    "mnist": "MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0 as distributed by its authors",
    "cifar10": "CIFAR-10 (Krizhevsky 2009); no licence stated by its authors, see https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "CIFAR-100 (Krizhevsky 2009); no licence stated by its authors, see https://www.cs.toronto.edu/~kriz/cifar.html",
    "stl10": "STL-10 (Coates, Lee, Ng 2011, from ImageNet images); see https://cs.stanford.edu/~acoates/stl10/ for terms",
}
_OWN_DATA = "the user's own images ({name}); state their licence here before publishing"


def _data_licence(dataset: str) -> str:
    key = dataset.split("+")[0]
    if key.startswith("stl10"):
        key = "stl10"
    return DATA_LICENCES.get(key, _OWN_DATA.format(name=dataset))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model_card(run, config: dict, info: dict, summary: dict, evals: list[dict]) -> str:
    cfg = run.config
    method = cfg.method
    spec = cfg.spec
    paper = f"{spec.title} ({spec.paper})"
    steps = summary.get("steps") or info.get("total_steps")
    kind = info.get("kind")
    lines = ["---", "library_name: selfsup", "pipeline_tag: image-feature-extraction",
             f"tags: [self-supervised, {method}, selfsup]", "---", "",
             f"# {config['backbone']} encoder pre-trained with {paper}", "",
             f"Encoder f ({config['backbone']}, {config['num_features']}-dimensional features) written by selfsup "
             f"{__version__} from the run `{run.run_dir.name}`" + (f" ({kind} run)." if kind else "."), "",
             "## Recipe", ""]
    if kind in ("finetune", "distill"):
        lines.append(f"- {kind} run; see its run folder for the recipe")
    else:
        o = cfg.optim
        lines += [f"- method: `{method}`, {spec.describe(cfg.section)}",
                  f"- batch size {cfg.batch_size}, optimiser {o.name} (base lr {o.lr}, {o.lr_scaling} scaling, weight decay "
                  f"{o.weight_decay}), warm-up "
                  + (f"{o.warmup_epochs:g} epochs" if o.warmup_epochs is not None else f"{o.warmup_fraction:.0%}")
                  + " then cosine",
                  "- the method's own keys: " + ", ".join(f"`{method}.{k}` {v}" for k, v in to_dict(cfg.section).items())
                  + " (its heads are not included)",
                  f"- precision {info.get('precision', cfg.precision)}, seed {cfg.seed}"
                  + (f", started from `{cfg.init}`" if cfg.init else "")]
    lines += [f"- steps: {steps}" + (f" ({steps / info['steps_per_epoch']:.2f} epochs)"
                                     if steps and info.get("steps_per_epoch") else ""), "",
              "## Data", "",
              f"- `{cfg.dataset}`" + (f", {info['num_images']} training images" if info.get("num_images") else "")
              + f", {config['in_channels']} channel(s) at {config['image_size']} px",
              f"- licence: {_data_licence(cfg.dataset)}", "",
              "## Evaluation", ""]
    if evals:
        lines += ["| protocol | data set | top-1 | top-5 | train / test images |", "|---|---|---|---|---|"]
        for e in evals:
            protocol = {"knn": f"weighted kNN on frozen features (k={e.get('k', 200)}, "
                                f"temperature {e.get('temperature', 0.1)})",
                        "linear": "logistic regression on frozen features"}.get(e.get("protocol"), e.get("protocol"))
            lines.append(f"| {protocol} | {e.get('dataset')} | {e.get('top1', float('nan')):.2f} | "
                         f"{e.get('top5', float('nan')):.2f} | {e.get('num_train')} / {e.get('num_test')} |")
    else:
        lines.append("Not evaluated (run `selfsup eval knn|linear --run RUN_DIR` before exporting to include results).")
    crop = config["centre_crop"]
    lines += ["", "## Use", "", "```python", "import selfsup",
              "encoder = selfsup.load_encoder(\"THIS_FOLDER\")   # or selfsup.from_pretrained(...)",
              "features = selfsup.hub.embed(encoder, images)     # uint8 (B, C, H, W) -> (B, "
              f"{config['num_features']})", "```", "",
              "## Preprocessing", "",
              "The encoder was trained, and is evaluated, on inputs prepared like this; `embed` does it (as do "
              "`selfsup eval` and `selfsup embed`):", "",
              f"1. {config['in_channels']} channel(s): gray repeated to RGB, or RGB to gray as PIL's `convert(\"L\")`;",
              "2. the centre square of the image" + (f", of which the central {crop:.1%} of the side is kept;"
                                                    if crop < 1 else ";"),
              f"3. resized to {config['image_size']} x {config['image_size']} px (bilinear, antialiased when shrinking);",
              f"4. scaled to [0, 1], then normalised with mean {config['mean']} and std {config['std']}.", ""]
    return "\n".join(lines)


def export_hub(run_dir: str | Path, out: str | Path) -> dict:
    """Write the Hub-style folder ``out`` for the run (or fine-tuning / distillation run) in ``run_dir``."""
    run = load_run(run_dir)
    out = Path(out)
    if out.is_file():
        raise ConfigError(f"--out {out} is a file; --to hub writes a folder (model.safetensors, config.json, README.md)")
    backbone = run_encoder(run).cpu().float().eval()
    prep = run.preprocessing
    width = run.config.backbone_width
    config = {"format": FORMAT, "selfsup_version": __version__, "backbone": run.config.backbone,
              "backbone_args": {"in_channels": run.in_channels, "image_size": run.image_size,
                                **({} if width is None else {"width": float(width)})},
              "num_features": int(backbone.num_features), "image_size": run.image_size,
              "in_channels": run.in_channels, "mean": list(prep.mean), "std": list(prep.std),
              "centre_crop": prep.crop, "preprocessing": prep.record(), "method": run.config.method,
              "dataset": run.config.dataset, "source_run": run.run_dir.name}
    info, summary = _read_json(run.run_dir / "run.json"), _read_json(run.run_dir / "train_summary.json")
    evals = [e for e in (_read_json(run.run_dir / f"eval_{k}.json") for k in ("knn", "linear")) if e]
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    save_weights(state, out / "model.safetensors", metadata={"format": FORMAT, "config": json.dumps(config)})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "README.md").write_text(_model_card(run, config, info, summary, evals))
    return {"to": "hub", "out": str(out), "files": ["model.safetensors", "config.json", "README.md"],
            "backbone": run.config.backbone, "num_features": config["num_features"], "run": str(run_dir),
            "weights": str(run.weights_path), "load": f"selfsup.load_encoder({str(out)!r})"}


def _from_hub_folder(folder: Path) -> nn.Module:
    config = _read_json(folder / "config.json")
    if config.get("format") != FORMAT or "backbone" not in config:
        raise CheckpointError(f"{folder}/config.json was not written by selfsup export --to hub (no "
                              f"format={FORMAT!r} and backbone)")
    backbone = build_backbone(config["backbone"], **config.get("backbone_args", {}))
    try:
        backbone.load_state_dict(load_weights(folder / "model.safetensors"), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}/model.safetensors does not fit backbone {config['backbone']!r}: "
                              f"{str(e).splitlines()[0]}") from None
    _describe(backbone, _saved_preprocessing(config["image_size"], config["in_channels"], config["mean"],
                                             config["std"], config.get("centre_crop"), config.get("dataset", "")))
    return backbone


def _saved_preprocessing(image_size, channels, mean, std, crop, dataset: str) -> Preprocessing:
    """The stored preprocessing; files written from run folders without statistics: the data set's."""
    channels = int(channels)
    if len(mean) != channels or len(std) != channels:
        mean, std = training_statistics(dataset, channels)
    return Preprocessing(int(image_size), channels, mean, std, None if crop in (None, "") else float(crop))


def _describe(backbone: nn.Module, prep: Preprocessing) -> None:
    # Plain attributes so callers (and ``embed``) know how to prepare images; not part of the state dict.
    backbone.preprocessing = prep
    backbone.image_size, backbone.in_channels = prep.image_size, prep.channels
    backbone.mean, backbone.std = prep.mean, prep.std


def load_encoder(path: str | Path) -> nn.Module:
    """The encoder f, in eval mode, from a Hub-style folder, a run folder (or a ``selfsup.lightning`` ``.ckpt``),
    or a ``--to safetensors`` file.

    The module carries ``preprocessing`` (a :class:`selfsup.evaluation.preprocess.Preprocessing`: how to
    prepare its input, the run's own; :func:`embed` applies it), its parts ``image_size``, ``in_channels``,
    ``mean`` and ``std``, and ``num_features``.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _from_hub_folder(path).eval()
    if path.is_dir() or path.suffix == ".ckpt":  # a run folder or a selfsup.lightning checkpoint
        run = load_run(path)
        backbone = run_encoder(run)
        _describe(backbone, run.preprocessing)
        return backbone.eval()
    if path.is_file() and path.suffix == ".safetensors":
        backbone = load_exported(path)
        meta = weights_metadata(path)
        _describe(backbone, _saved_preprocessing(meta["image_size"], meta["in_channels"], json.loads(meta["mean"]),
                                                 json.loads(meta["std"]), meta.get("centre_crop"), ""))
        return backbone
    raise ConfigError(f"{path}: not a folder written by selfsup export --to hub, a run folder or an exported "
                      ".safetensors file")


from_pretrained = load_encoder  # the Hugging Face name for the same thing


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features ``(B, num_features)`` of ``images``: uint8 ``(B, C, H, W)`` in [0, 255] or float in [0, 1],
    with 1 or 3 channels.

    Prepared by ``encoder.preprocessing`` (:func:`selfsup.evaluation.preprocess.prepare_images` with the
    statistics the encoder was trained with: channels converted, centre crop, resize, normalisation),
    the same function ``selfsup eval`` and ``selfsup embed`` use; on the encoder's device, in eval mode.
    """
    prep = getattr(encoder, "preprocessing", None)
    if prep is None:  # a module described by hand with the four attributes
        prep = Preprocessing(encoder.image_size, encoder.in_channels, encoder.mean, encoder.std)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.is_floating_point():
        images = images.clamp(0, 1) * 255  # prepare_images divides by 255 (no rounding to uint8)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        out = [encoder(prep(chunk.to(device))).float() for chunk in images.split(batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(out)
