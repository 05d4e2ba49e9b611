"""selfsup: self-supervised visual representation learning (SimCLR, SimCLRv2, BYOL), paper-faithful.

Building blocks (plain torch): ``selfsup.losses``, ``selfsup.models.backbones``, ``selfsup.models.heads``,
``selfsup.views.augment``, ``selfsup.training.schedules``, ``selfsup.training.optim``, ``selfsup.methods``.
The training loop (``selfsup.training.loop``) and the command line (``selfsup.cli.app``) sit on top.

The short path for notebooks, loaded on first use so ``import selfsup`` stays light:
``selfsup.PretrainConfig`` / ``selfsup.build_config`` (config), ``selfsup.pretrain`` (the loop),
``selfsup.load_encoder(DIR)`` / ``selfsup.from_pretrained(DIR)`` (a run folder, or a Hub-style folder
from ``selfsup export --to hub``); ``selfsup.hub.embed(encoder, images)`` gives features of a tensor of images.
"""
__version__ = "0.2.0"

# name -> (module, attribute), resolved by __getattr__ (PEP 562) when first used.
_LAZY = {
    "PretrainConfig": ("selfsup.training.config", "PretrainConfig"),
    "build_config": ("selfsup.training.config_io", "build_config"),
    "pretrain": ("selfsup.training.loop", "pretrain"),
    "load_encoder": ("selfsup.artifacts.hub", "load_encoder"),
    "from_pretrained": ("selfsup.artifacts.hub", "from_pretrained"),
}


def __getattr__(name):
    if name == "hub":  # selfsup.hub.embed(...) without importing the submodule first
        import importlib

        return importlib.import_module("selfsup.artifacts.hub")
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
