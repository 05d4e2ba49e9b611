"""Artifacts made from a finished run: export (torchvision / timm / hub folders), embeddings, reports, the Lightning checkpoint reader."""
import importlib

# name -> the module that defines it, imported on first use (PEP 562) so importing one module stays light.
_HOMES = {
    "load_encoder": "selfsup.artifacts.hub",
    "from_pretrained": "selfsup.artifacts.hub",
    "export_hub": "selfsup.artifacts.hub",
    "export_run": "selfsup.artifacts.export",
    "embed_run": "selfsup.artifacts.embed",
}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
