"""Sub-package exports imported on first use (PEP 562), so importing one module does not import its neighbours."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, homes: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` that imports ``homes[name]`` when ``name`` is first used."""
    def __getattr__(name: str):
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
