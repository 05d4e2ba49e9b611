"""Encoders from timm by name (``timm:resnet50``, ``timm:vit_small_patch16_224``, ...), an optional extra.

``build_backbone("timm:NAME", in_channels=..., image_size=...)`` lands here. The model is created
with ``pretrained=False`` (nothing is downloaded: pre-training starts from random weights),
``num_classes=0`` (timm then returns the pooled features instead of logits) and ``in_chans``. It
keeps selfsup's one backbone interface: ``forward(x) -> (B, num_features)``.

``num_features`` is the width of what ``forward`` returns, which is timm's ``head_hidden_size``
where a model has one (MobileNetV3 and others put a 1x1 conv after the last stage) and its
``num_features`` otherwise. Models with a fixed input size (ViTs: position embeddings) are built
for ``image_size``. Install with ``pip install 'selfsup[timm]'``.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from selfsup.errors import ConfigError

TIMM_PREFIX = "timm:"

__all__ = ["TIMM_PREFIX", "TimmBackbone", "build_timm_backbone", "timm_available"]


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _config_error(msg: str) -> Exception:
    return ConfigError(msg)


class TimmBackbone(nn.Module):
    """A timm model without its classifier. The timm model is ``self.model`` (its own parameter names
    follow under ``model.``, so ``selfsup.artifacts.export`` can hand them to ``timm.create_model`` unchanged)."""

    def __init__(self, model_name: str, in_channels: int = 3, image_size: int = 224, **timm_kwargs):
        super().__init__()
        import timm

        self.model_name = model_name
        model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels, **timm_kwargs)
        patch_embed = getattr(model, "patch_embed", None)
        fixed = getattr(patch_embed, "img_size", None)
        if fixed is not None and tuple(fixed) != (image_size, image_size) and "img_size" not in timm_kwargs:
            # Position embeddings are sized for one input resolution: rebuild for ours.
            model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels,
                                      img_size=image_size, **timm_kwargs)
        self.model = model
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return f"timm:{self.model_name}, num_features={self.num_features}"


def build_timm_backbone(model_name: str, in_channels: int = 3, image_size: int = 224, **kw) -> TimmBackbone:
    """``TimmBackbone(model_name, ...)`` with errors a user can act on (timm missing, unknown name).

    selfsup's ResNet options (``small_stem``, ``width``, ``zero_init_residual``) have no timm
    equivalent and are refused; other keyword arguments go to ``timm.create_model``.
    """
    if not timm_available():
        raise _config_error(f"backbone 'timm:{model_name}' needs timm, which is not installed; "
                            "pip install 'selfsup[timm]' (or pip install timm)")
    import timm

    if not model_name:
        raise _config_error("backbone: 'timm:' needs a model name, e.g. timm:resnet50 (see timm.list_models())")
    ours = sorted(k for k in ("small_stem", "width", "zero_init_residual") if k in kw)
    if ours:
        raise _config_error(f"backbone 'timm:{model_name}': option(s) {', '.join(ours)} apply to selfsup's own ResNets, "
                            "not to timm models; choose a timm model that has the shape you want instead")
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise _config_error(f"backbone 'timm:{model_name}': timm {timm.__version__} has no model of that name.{hint} "
                            "List them with python -c \"import timm; print(timm.list_models('*resnet*'))\"")
    return TimmBackbone(model_name, in_channels=in_channels, image_size=image_size, **kw)
