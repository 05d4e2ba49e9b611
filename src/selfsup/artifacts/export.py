"""Hand a run's encoder f to other code: torchvision / timm state dicts, a plain safetensors file, ONNX.

Targets (``selfsup export --to ...``):

- ``torchvision``: a state dict that loads with ``load_state_dict(strict=True)`` into
  ``torchvision.models.resnetNN()`` once its classifier is removed (``model.fc = nn.Identity()``).
  selfsup's ResNets use torchvision's module names, so this is the backbone's own state dict; it only
  matches torchvision's architecture for a 1x width, the standard 7x7 stride-2 stem with max-pool and
  3 input channels, and plain (non-SK) blocks. Anything else is refused with the reason.
- ``timm``: for ``timm:NAME`` backbones, timm's own state dict for ``timm.create_model(NAME,
  num_classes=0)``; for selfsup ResNets, the torchvision dict, which timm's ``resnetNN`` shares.
- ``safetensors``: the backbone alone, loadable by :func:`load_exported` (which rebuilds it from the
  metadata stored in the file) or ``build_backbone(...).load_state_dict``.
- ``onnx``: ``torch.onnx.export`` of the backbone in eval mode, input ``images`` (B, C, S, S) with a
  dynamic batch axis, output ``features`` (B, num_features). The input is prepared as evaluation
  prepares it (:func:`selfsup.evaluation.preprocess.prepare_images`: channels, centre square, central
  ``centre_crop`` share, resize to S, ``/ 255``, ``mean``/``std`` normalisation); ``mean``, ``std``,
  ``centre_crop`` and the whole ``preprocessing`` record are in the file's metadata. When onnxruntime is installed the file is
  run once and compared with PyTorch (max |difference| must be <= 1e-4 x max(1, max |output|)).

State dicts are written as safetensors (``.pt``/``.pth`` names get ``torch.save`` instead).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from selfsup.errors import ConfigError, CheckpointError
from selfsup.evaluation.preprocess import Preprocessing, eval_crop
from selfsup.models.backbones import build_backbone, saved_stem
from selfsup.models.resnet import BasicBlock, Bottleneck, ResNet
from selfsup.training.checkpoint import save_weights, load_weights, weights_metadata, write_atomically
from selfsup.training.runs import load_encoder, load_run

__all__ = [
    "EXPORT_TARGETS",
    "ExportError",
    "torchvision_arch",
    "torchvision_state_dict",
    "timm_state_dict",
    "export_backbone",
    "export_run",
    "load_exported",
    "onnx_max_difference",
]

EXPORT_TARGETS = ("torchvision", "timm", "safetensors", "onnx")
ONNX_TOLERANCE = 1e-4

_TORCHVISION_RESNETS = {
    (BasicBlock, (2, 2, 2, 2)): "resnet18",
    (BasicBlock, (3, 4, 6, 3)): "resnet34",
    (Bottleneck, (3, 4, 6, 3)): "resnet50",
    (Bottleneck, (3, 4, 23, 3)): "resnet101",
    (Bottleneck, (3, 8, 36, 3)): "resnet152",
}


class ExportError(ConfigError):
    """The encoder cannot be written in the asked format; the message says why and what works instead."""


# ------------------------------------------------------------------------------------------------
# torchvision / timm state dicts


def _block_type(backbone: ResNet) -> type | None:
    block = backbone.layer1[0]
    for cls in (Bottleneck, BasicBlock):  # the most derived class we know the torchvision twin of
        if type(block) is cls:
            return cls
    return None


def torchvision_arch(backbone: nn.Module, target: str = "torchvision") -> str:
    """The torchvision model (``"resnet50"``, ...) whose state dict equals ``backbone``'s, or ExportError why none does.

    ``target`` (``torchvision`` or ``timm``, whose ``resnetNN`` shares torchvision's layout) names the export
    target and the library the error messages speak of.
    """
    lib = "timm" if target == "timm" else "torchvision"
    alt = " (or pre-train a timm backbone, e.g. --backbone timm:resnet18)" if target == "timm" else ""
    if not isinstance(backbone, ResNet):
        raise ExportError(f"--to {target}: the encoder is a {type(backbone).__name__}, not a selfsup ResNet; "
                          f"{lib} state dicts exist for resnet18/34/50/101/152 only (use --to safetensors or onnx"
                          + (", or --to timm for a timm backbone)" if hasattr(backbone, "model_name") else ")"))
    conv1 = backbone.conv1
    if not isinstance(conv1, nn.Conv2d):
        raise ExportError(f"--to {target}: the encoder's stem is not {lib}'s single 7x7 convolution "
                          f"(e.g. the ResNet-D deep stem of the SK ResNets); use --to safetensors or onnx{alt}")
    if backbone.small_stem or conv1.kernel_size != (7, 7):
        raise ExportError(f"--to {target}: the encoder uses the small-image stem (3x3 stride-1 conv, no max-pool; "
                          f"chosen for images of at most 64 px), which {lib}'s ResNets do not have. Pre-train with "
                          f"image_size > 64 (or --set image_size=...) for a {lib}-compatible encoder, or use "
                          f"--to safetensors or onnx{alt}")
    if conv1.in_channels != 3:
        raise ExportError(f"--to {target}: the encoder takes {conv1.in_channels}-channel images and {lib}'s "
                          f"resnetNN take 3 (RGB); use --to safetensors or onnx{alt}")
    block = _block_type(backbone)
    layers = tuple(len(getattr(backbone, f"layer{i}")) for i in range(1, 5))
    arch = _TORCHVISION_RESNETS.get((block, layers))
    if arch is None:
        kind = type(backbone.layer1[0]).__name__
        raise ExportError(f"--to {target}: a ResNet with {kind} blocks and stages {list(layers)} has no {lib} "
                          f"twin (selective-kernel blocks and custom depths do not); use --to safetensors or onnx{alt}")
    if conv1.out_channels != 64:
        raise ExportError(f"--to {target}: the encoder is {conv1.out_channels / 64:g}x wide (stem has "
                          f"{conv1.out_channels} channels, {lib}'s resnetNN 64). selfsup's width multiplier widens "
                          f"every layer, {lib}'s wide_resnet only the bottleneck, so no {lib} model matches; "
                          f"use --to safetensors or onnx{alt}")
    _check_same_shapes(backbone.state_dict(), _torchvision_model(arch).state_dict(), f"torchvision {arch}")
    return arch


def _torchvision_model(arch: str) -> nn.Module:
    import torchvision

    with torch.device("meta"):  # shapes only, no memory and no init time
        model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model


def _check_same_shapes(ours: dict, theirs: dict, what: str) -> None:
    missing, unexpected = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    wrong = sorted(k for k in set(ours) & set(theirs) if tuple(ours[k].shape) != tuple(theirs[k].shape))
    if missing or unexpected or wrong:
        raise ExportError(f"the encoder's tensors do not match {what}: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {wrong[:3]}; use --to safetensors or onnx")


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def torchvision_state_dict(backbone: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """``(arch, state_dict)`` for ``torchvision.models.<arch>()`` with ``fc = nn.Identity()`` (strict load)."""
    arch = torchvision_arch(backbone)
    return arch, _plain_state(backbone)


def timm_state_dict(backbone: nn.Module) -> tuple[str, dict[str, torch.Tensor], dict]:
    """``(model_name, state_dict, create_kwargs)`` for ``timm.create_model(model_name, num_classes=0, **create_kwargs)``."""
    try:
        import timm
    except ImportError:
        raise ExportError("--to timm needs timm; pip install 'selfsup[timm]'") from None
    if hasattr(backbone, "model_name") and hasattr(backbone, "model"):  # selfsup.models.timm_adapter.TimmBackbone
        kwargs = {"in_chans": backbone.in_channels}
        fixed = getattr(getattr(backbone.model, "patch_embed", None), "img_size", None)
        if fixed is not None:
            kwargs["img_size"] = int(fixed[0])
        return backbone.model_name, _plain_state(backbone.model), kwargs
    arch = torchvision_arch(backbone, "timm")  # same checks: timm's resnetNN shares torchvision's layout and names
    with torch.device("meta"):
        reference = timm.create_model(arch, pretrained=False, num_classes=0)
    _check_same_shapes(backbone.state_dict(), reference.state_dict(), f"timm {arch}")
    return arch, _plain_state(backbone), {}


# ------------------------------------------------------------------------------------------------
# Writing files


def _save_state(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    if out.suffix in (".pt", ".pth"):
        write_atomically(out, lambda tmp: torch.save(state, tmp))
        return
    save_weights(state, out, metadata=metadata)


def onnx_max_difference(path: str | Path, backbone: nn.Module, inputs: torch.Tensor) -> float:
    """max |ONNX Runtime output - PyTorch output| on ``inputs`` (needs onnxruntime)."""
    return _onnx_compare(path, backbone, inputs)[0]


def _onnx_compare(path: str | Path, backbone: nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    """(max |ONNX - PyTorch|, max |PyTorch|) on ``inputs``, the backbone in eval mode."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            want = backbone(inputs).float().numpy()
    finally:
        backbone.train(was_training)
    if got.shape != want.shape:
        raise ExportError(f"the ONNX file outputs shape {got.shape}, PyTorch {want.shape}")
    return float(np.abs(got - want).max()), float(np.abs(want).max())


def _write_onnx(backbone: nn.Module, out: Path, in_channels: int, image_size: int, metadata: dict[str, str],
                opset: int | None, dynamo: bool) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("--to onnx needs the onnx package; pip install 'selfsup[export]'") from None
    example = torch.zeros(2, in_channels, image_size, image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"input_names": ["images"], "output_names": ["features"], "dynamo": dynamo}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    else:
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "features": {0: "batch"}}
    was_training = backbone.training
    backbone.eval()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo=True, which is ~20x slower
            # for these plain CNNs; both give the same graph here (tests check the numbers).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(backbone, (example,), str(out), **kwargs)
    finally:
        backbone.train(was_training)
    model = onnx.load(str(out))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def export_backbone(backbone: nn.Module, to: str, out: str | Path, *, backbone_name: str, in_channels: int,
                    image_size: int, mean=(), std=(), width: float | None = None, opset: int | None = None,
                    dynamo: bool = False, verify: bool = True, crop: float | None = None) -> dict:
    """Write ``backbone`` to ``out`` in format ``to`` (one of :data:`EXPORT_TARGETS`); returns a summary dict.

    ``mean``/``std``/``crop`` (None: :func:`eval_crop`) describe the input preparation, stored in the metadata.
    """
    crop = eval_crop(image_size) if crop is None else float(crop)
    if to not in EXPORT_TARGETS:
        raise ExportError(f"--to {to!r}: choose one of {', '.join(EXPORT_TARGETS)}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name, e.g. {out / ('encoder.' + _default_suffix(to))}")
    meta = {"selfsup_backbone": backbone_name, "in_channels": str(in_channels), "image_size": str(image_size),
            "num_features": str(backbone.num_features), "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
            "backbone_width": "" if width is None else repr(float(width)), "centre_crop": repr(crop),
            "small_stem": str(getattr(backbone, "small_stem", ""))}
    if len(mean) == len(std) == in_channels:
        meta["preprocessing"] = json.dumps(Preprocessing(image_size, in_channels, mean, std, crop).record())
    summary = {"to": to, "out": str(out), "num_features": int(backbone.num_features), "backbone": backbone_name}
    if to == "torchvision":
        arch, state = torchvision_state_dict(backbone)
        meta.update(format="torchvision", arch=arch)
        _save_state(state, out, meta)
        summary["load"] = f"torchvision.models.{arch}(); model.fc = torch.nn.Identity(); model.load_state_dict(...)"
        summary["arch"] = arch
    elif to == "timm":
        name, state, kwargs = timm_state_dict(backbone)
        meta.update(format="timm", arch=name, timm_kwargs=json.dumps(kwargs))
        _save_state(state, out, meta)
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        summary["load"] = f"timm.create_model({name!r}, num_classes=0{args}).load_state_dict(...)"
        summary["arch"] = name
    elif to == "safetensors":
        meta.update(format="selfsup-backbone")
        _save_state(_plain_state(backbone), out, meta)
        summary["load"] = "selfsup.artifacts.export.load_exported(path)"
    else:
        meta.update(format="onnx")
        _write_onnx(backbone, out, in_channels, image_size, meta, opset, dynamo)
        summary["input"] = (f"images: float32 (batch, {in_channels}, {image_size}, {image_size}), prepared as the "
                            "metadata's preprocessing says (selfsup.evaluation.preprocess.prepare_images)")
        if verify:
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                summary["verified"] = "skipped: onnxruntime is not installed"
            else:
                x = torch.randn(3, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
                diff, largest = _onnx_compare(out, backbone, x)
                scale = max(1.0, largest)
                summary["max_abs_diff"] = diff
                if not diff <= ONNX_TOLERANCE * scale:
                    raise ExportError(f"the ONNX file's outputs differ from PyTorch's by {diff:.3g} (> {ONNX_TOLERANCE} x "
                                      f"{scale:.3g}); try --opset with a newer opset, or --onnx-dynamo")
                summary["verified"] = "onnxruntime"
    return summary


def _default_suffix(to: str) -> str:
    return "onnx" if to == "onnx" else "safetensors"


def export_run(run_dir: str | Path, to: str, out: str | Path, *, opset: int | None = None, dynamo: bool = False,
               verify: bool = True) -> dict:
    """Export the encoder of the run in ``run_dir`` (its final weights, else the newest checkpoint)."""
    run = load_run(run_dir)
    backbone = load_encoder(run).cpu().float().eval()
    prep = run.preprocessing
    summary = export_backbone(backbone, to, out, backbone_name=run.config.backbone, in_channels=run.in_channels,
                              image_size=run.image_size, mean=prep.mean, std=prep.std,
                              width=getattr(run.config, "backbone_width", None), opset=opset, dynamo=dynamo,
                              verify=verify, crop=prep.crop)
    summary["run"] = str(run_dir)
    summary["weights"] = str(run.weights_path)
    return summary


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild the backbone of a ``--to safetensors`` (or ``torchvision``) file from its metadata and load it strictly."""
    path = Path(path)
    state = load_weights(path)
    meta = weights_metadata(path)
    name = meta.get("selfsup_backbone")
    if not name:
        raise CheckpointError(f"{path} has no selfsup_backbone metadata; it was not written by selfsup export")
    kw = {"in_channels": int(meta["in_channels"]), "image_size": int(meta["image_size"])}
    if meta.get("backbone_width"):
        kw["width"] = float(meta["backbone_width"])
    stem = {"True": True, "False": False}.get(meta.get("small_stem", ""))
    kw.update(saved_stem(name, stem, kw["image_size"]))
    backbone = build_backbone(name, **kw)
    target = backbone.model if meta.get("format") == "timm" and hasattr(backbone, "model") else backbone
    target.load_state_dict(state, strict=True)
    return backbone.eval()
