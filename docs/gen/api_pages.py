"""The Python API pages: one mkdocstrings page per public package, from its ``__init__``'s ``__all__``.

Packages are found by walking ``selfsup``'s sub-packages, so a new one gets a page without a change here.
The top level loads its short-path names lazily (``selfsup.pretrain``, ...), which a static reader cannot
see; ``TOP_LEVEL`` names them and each is documented at the module that defines it.
"""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

# The notebook short path: ``selfsup.<name>`` (README, "Python API").
TOP_LEVEL = ("PretrainConfig", "build_config", "pretrain", "load_encoder", "from_pretrained")
# Public modules that are not packages: the error classes, the distributed helpers, the Lightning modules.
MODULES = ("selfsup.errors", "selfsup.distributed", "selfsup.lightning")


def packages() -> list[str]:
    """Every sub-package of ``selfsup`` (``selfsup.losses``, ``selfsup.models``, ...), sorted."""
    import selfsup

    return sorted(f"selfsup.{m.name}" for m in pkgutil.iter_modules(selfsup.__path__) if m.ispkg)


def top_level_targets() -> list[str]:
    """Where each top-level short-path name is defined, as ``module.qualname``."""
    import selfsup

    out = []
    for name in TOP_LEVEL:
        obj = getattr(selfsup, name)
        out.append(f"{obj.__module__}.{obj.__qualname__}")
    return out


def exported(module: str) -> list[str]:
    """A module's ``__all__`` (what ``from module import *`` gives), in its own order.

    Read from the source without running it, so a module that needs an optional extra (``selfsup.lightning``
    needs ``lightning``) is documented where the extra is not installed.
    """
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:  # computed (a package's lazy exports): import it to read the list
                return list(importlib.import_module(module).__all__)
    return []


def page_name(module: str) -> str:
    return f"reference/api/{module}.md"


def render_top_level() -> str:
    lines = ["# `selfsup`", "", "::: selfsup", "    options:", "      members: false", "      show_root_heading: false",
             "", "## The short path", ""]
    for target in top_level_targets():
        lines += [f"::: {target}", "    options:", "      show_root_full_path: true", "      heading_level: 3", ""]
    return "\n".join(lines)


def export_target(module: str, name: str) -> str:
    """Where ``module.name`` is defined (``selfsup.losses.nt_xent`` -> ``selfsup.losses.nt_xent.nt_xent``).

    A function or class is documented at its definition: a package's export may share its name with a
    submodule (``selfsup.losses.nt_xent`` is both), which a static reader resolves to the submodule.
    Constants, and modules that cannot be imported here (an optional extra missing), keep the public path.
    """
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return f"{module}.{name}"
    home, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not (isinstance(home, str) and isinstance(qualname, str) and home.startswith("selfsup")) or "<" in qualname:
        return f"{module}.{name}"
    return f"{home}.{qualname}"


def render_package(package: str) -> str:
    """The module docstring, then every name of ``__all__`` at its definition, headed by its public name."""
    lines = [f"# `{package}`", "", f"::: {package}", "    options:", "      members: false",
             "      show_root_heading: false", ""]
    for name in exported(package):
        lines += [f"::: {export_target(package, name)}", "    options:", "      show_root_full_path: false", ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """``{path under docs/: Markdown}`` of every API page, the top level first."""
    out = {page_name("selfsup"): render_top_level()}
    for package in packages() + list(MODULES):
        out[page_name(package)] = render_package(package)
    return out
