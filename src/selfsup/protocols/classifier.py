"""The fine-tuned network of SimCLRv2 (Chen et al. 2020b, Sec. 2): backbone -> first K projection-head layers -> a
linear classifier; built from a pre-training run, or read back from a fine-tuning or distillation run folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from selfsup.errors import CheckpointError, ConfigError
from selfsup.models.backbones import build_backbone, saved_stem
from selfsup.models.heads import ProjectionHead
from selfsup.training import checkpoint as ckpt
from selfsup.training.runs import RunInfo, load_encoder, load_run, run_weights

HEAD_PREFIXES = ("head.", "projector.")  # SimCLR's projection head, BYOL's projector



class HeadLayers(nn.Module):
    """The first K layers of a :class:`ProjectionHead`, under the same names (``layers.i``)."""

    def __init__(self, layers: list[nn.Module], out_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def head_prefix(head: ProjectionHead, k: int) -> HeadLayers:
    """The first ``k`` layers of ``head`` (its modules, not copies): ``forward(h) == head(h, return_all=True)[k]``."""
    out_dim = head.layer_dim(k)  # also checks 0 <= k <= num_layers
    return HeadLayers(list(head.layers[:k]), out_dim)


class Classifier(nn.Module):
    """``fc(head_K(backbone(x)))``: SimCLRv2's fine-tuned network (Sec. 2, "fine-tuning from a middle layer")."""

    def __init__(self, backbone: nn.Module, head: HeadLayers, num_classes: int, zero_init: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.fc = nn.Linear(head.out_dim, num_classes)
        if zero_init:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    @property
    def from_head_layer(self) -> int:
        return len(self.head.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.backbone(x)))


def head_spec_of(weights: dict[str, torch.Tensor]) -> tuple[str, dict] | None:
    """(prefix, ProjectionHead kwargs) of the projection head stored in a pre-training run's weights."""
    for prefix in HEAD_PREFIXES:
        n = 0
        while f"{prefix}layers.{n}.0.weight" in weights:
            n += 1
        if n:
            first, last = weights[f"{prefix}layers.0.0.weight"], weights[f"{prefix}layers.{n - 1}.0.weight"]
            return prefix, {"in_dim": int(first.shape[1]), "hidden_dim": int(first.shape[0]) if n > 1 else int(last.shape[0]),
                            "out_dim": int(last.shape[0]), "num_layers": n,
                            # a scale-only BN (official code's ending) has a weight; the plain one has none
                            "last_bn": "scale" if f"{prefix}layers.{n - 1}.1.weight" in weights
                            else f"{prefix}layers.{n - 1}.1.running_mean" in weights,
                            "last_bias": f"{prefix}layers.{n - 1}.0.bias" in weights
                            or f"{prefix}layers.{n - 1}.1.running_mean" in weights}
    return None


def build_head(spec: dict | None, k: int) -> HeadLayers:
    if spec is None:
        raise ConfigError("no projection head to fine-tune from")
    return head_prefix(ProjectionHead(**spec), k)


def classifier_from_pretrain(run_dir, k: int | None, num_classes: int) -> tuple[Classifier, dict]:
    """Backbone and first ``k`` head layers of a pre-training run (trained weights), and a new classifier.

    ``run_dir`` is the run folder or its :class:`selfsup.training.runs.RunInfo`. Returns the model and a
    description (backbone name/width, image size, channels, head spec, k).
    """
    run = run_dir if isinstance(run_dir, RunInfo) else load_run(run_dir)
    run_dir = run.run_dir
    backbone = load_encoder(run)
    found = head_spec_of(run.weights)
    if k is None:
        k = 1 if found is not None else 0
    if k > 0:
        if found is None:
            raise ConfigError(f"from_head_layer: {run_dir} has no projection head (no head.layers.* tensors); "
                              "use --from-head-layer 0")
        prefix, spec = found
        if k > spec["num_layers"]:
            raise ConfigError(f"from_head_layer: {k} is more than the {spec['num_layers']} layers of the projection "
                              f"head of {run_dir}; choose 0..{spec['num_layers']}")
        full = ProjectionHead(**spec)
        sub = {key[len(prefix):]: v for key, v in run.weights.items() if key.startswith(prefix)}
        try:
            full.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"the projection head in {run.weights_path} cannot be read: "
                                       f"{str(e).splitlines()[0]}") from None
        head = head_prefix(full, k)
    else:
        spec, head = None, HeadLayers([], backbone.num_features)
    info = {"backbone": run.config.backbone, "backbone_width": run.config.backbone_width,
            "image_size": run.image_size, "in_channels": run.in_channels, "head_spec": spec,
            "from_head_layer": k, "pretrain_dataset": run.config.dataset,
            "small_stem": getattr(backbone, "small_stem", None)}
    return Classifier(backbone, head, num_classes), info


def load_classifier(run_dir: str | Path) -> tuple[Classifier, dict]:
    """A fine-tuned (or distilled) network from its run folder, with its trained weights; and its run.json."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise ConfigError(f"{run_dir}: no run.json; is this a selfsup finetune or distill run folder?")
    info = json.loads(info_path.read_text())
    if info.get("kind") not in ("finetune", "distill"):
        what = "a pre-training run" if info.get("kind") in (None, "pretrain") else f"a {info['kind']} run"
        raise ConfigError(f"{run_dir} is {what}, not a fine-tuning or distillation run; give the folder written by "
                          f"`selfsup finetune` (fine-tune it first: selfsup finetune --run {run_dir} --out ...)")
    _, weights = run_weights(run_dir, str(run_dir))
    model = _empty_classifier(info)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {run_dir} do not fit the network described by its run.json: "
                                   f"{str(e).splitlines()[0]}") from None
    return model, info


def _empty_classifier(info: dict) -> Classifier:
    kw = {} if info.get("backbone_width") is None else {"width": info["backbone_width"]}
    kw.update(saved_stem(info["backbone"], info.get("small_stem"), info["image_size"]))
    backbone = build_backbone(info["backbone"], in_channels=info["in_channels"], image_size=info["image_size"], **kw)
    k = int(info["from_head_layer"])
    head = build_head(info["head_spec"], k) if k > 0 else HeadLayers([], backbone.num_features)
    return Classifier(backbone, head, int(info["num_classes"]))
