"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "encoder", path=DIR, source="local")``.

``path`` is a folder written by ``selfsup export --to hub`` (or a run folder, or a ``--to safetensors``
file); the encoder is rebuilt from it alone, in eval mode, with ``image_size``, ``in_channels``,
``mean`` and ``std`` attributes. Nothing is downloaded.
"""
import os
import sys

dependencies = ["torch", "safetensors", "yaml"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:  # a source checkout: the package lives under src/
    sys.path.insert(0, _SRC)

from selfsup.artifacts.hub import load_encoder  # noqa: E402


def encoder(path):
    """The selfsup encoder stored at ``path`` (see ``selfsup.artifacts.hub.load_encoder``)."""
    return load_encoder(path)
