"""Artifacts made from a finished run: export (torchvision / timm / hub folders), embeddings, reports, the Lightning checkpoint reader."""
from selfsup.lazy import lazy_exports

# name -> the module that defines it, imported on first use (PEP 562) so importing one module stays light.
_HOMES = {
    "load_encoder": "selfsup.artifacts.hub",
    "export_hub": "selfsup.artifacts.hub",
    "export_run": "selfsup.artifacts.export",
    "embed_run": "selfsup.artifacts.embed",
}
__all__ = list(_HOMES)

__getattr__ = lazy_exports(__name__, _HOMES)
