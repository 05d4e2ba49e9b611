"""The config-keys reference page: every key of the pre-training config with its type, default and meaning.

Generic over the config's shape: it walks the root dataclass (``root_config()``, the one place that names it)
and recurses into any field whose type is a dataclass, as a dotted section (``optim.lr``, ``view.blur_p``),
so a new nested section appears without a change here. A key's meaning comes from, in this order: the
field's ``metadata["help"]`` (or ``["doc"]``), an attribute docstring (a string right after the field), the
comment on the field's line, the comment block right above it, the class docstring's ``Attributes:`` section,
and for a key that has a ``selfsup pretrain`` option of its own, that option's help. ``per_method_values()`` gives the values each method starts from.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing


def root_config() -> type:
    """The root config dataclass of ``selfsup pretrain``: the one place to change when it moves."""
    import selfsup

    return selfsup.PretrainConfig


# The setups whose resolved values the per-method tables show: the recipe each one gets is chosen from the
# encoder and image size (docs: Reference > Recipes), so together they show every recipe a method has.
SETUPS: dict[str, dict] = {
    "CPU default encoder, 28 px": {},
    "ResNet-18, CIFAR-10 (32 px)": {"backbone": "resnet18", "dataset": "cifar10"},
    "ResNet-50, 224 px": {"backbone": "resnet50", "image_size": 224},
}


@dataclasses.dataclass
class Key:
    """One config key: dotted name, type as written, default, meaning and the section note above it."""

    name: str
    type: str
    default: object
    meaning: str
    section_note: str = ""


@dataclasses.dataclass
class Section:
    """The keys of one dataclass under a dotted prefix (``""`` for the root)."""

    prefix: str
    cls: type
    intro: str
    keys: list[Key]
    same_as: str | None = None  # a dataclass already listed under this prefix


def _field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (meaning, section note)}`` from the class source: docstrings and comments around each field."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            trailing.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    body = ast.parse(source).body[0].body
    found: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno
        own = trailing.get(row, "") if not lines[row - 1].lstrip().startswith("#") else ""
        block = []
        j = row - 1
        while j >= 1 and lines[j - 1].lstrip().startswith("#"):
            block.insert(0, lines[j - 1].lstrip().lstrip("#").strip())
            j -= 1
        block_text = " ".join(block)
        doc = ""
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        # A comment block above a field that has its own comment introduces a group of fields.
        meaning = doc or own or block_text
        note = block_text if block_text and (own or doc) else ""
        found[node.target.id] = (meaning, note)
    return found


def _docstring_attributes(cls: type) -> dict[str, str]:
    """``{name: text}`` from a Google-style ``Attributes:`` section of the class docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    found: dict[str, str] = {}
    inside, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the next section (or prose) ends it
            break
        head = line.strip().split(":", 1)
        if line.startswith("    ") and not line.startswith("     ") and len(head) == 2 and head[0].split(" ")[0].isidentifier():
            current = head[0].split(" ")[0]
            found[current] = head[1].strip()
        elif current and line.strip():
            found[current] += " " + line.strip()
    return found


def _dataclass_in(hint) -> type | None:
    """The dataclass a field holds (``X``, ``X | None`` or ``Optional[X]``), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a) and isinstance(a, type)]
        return found[0] if len(found) == 1 else None
    return None


def _type_name(hint) -> str:
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{typing.get_origin(hint).__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def _first_paragraph(doc: str | None) -> str:
    return " ".join((inspect.cleandoc(doc or "").split("\n\n") or [""])[0].split())


def sections(root: type | None = None, option_help: dict[str, str] | None = None) -> list[Section]:
    """Every section of the config, the root first, then nested dataclasses depth first."""
    root = root or root_config()
    option_help = option_help or {}
    out: list[Section] = []
    seen: dict[type, str] = {}

    def walk(cls: type, prefix: str, intro: str) -> None:
        if cls in seen:
            keys = [Key(prefix + f.name, "", None, "") for f in dataclasses.fields(cls)]
            out.append(Section(prefix, cls, intro, keys, same_as=seen[cls]))
            return
        seen[cls] = prefix
        hints = typing.get_type_hints(cls)
        comments = _field_comments(cls)
        attributes = _docstring_attributes(cls)
        section = Section(prefix, cls, intro, [])
        out.append(section)
        nested = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("section"):  # the method's own section: listed per method below
                continue
            meaning, note = comments.get(f.name, ("", ""))
            meaning = f.metadata.get("help") or f.metadata.get("doc") or meaning or attributes.get(f.name, "")
            if not meaning:
                meaning = option_help.get(prefix + f.name, "")
            inner = _dataclass_in(hints[f.name])
            if inner is not None:
                nested.append((inner, f, meaning))
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            section.keys.append(Key(prefix + f.name, _type_name(hints[f.name]), default, meaning, note))
        for inner, f, meaning in nested:
            doc = _first_paragraph(inner.__doc__)
            if f.default is None and meaning:  # an optional section: what not giving it means
                doc = f"{doc} Not given (`{prefix}{f.name}: null`): {meaning}."
            walk(inner, f"{prefix}{f.name}.", doc)

    walk(root, "", _first_paragraph(root.__doc__))
    if root is root_config():  # each method's own section, named after the method (``byol.base_tau``)
        from selfsup.methods import METHODS

        for spec in METHODS.values():
            walk(spec.config, f"{spec.name}.", f"{spec.title}'s own keys, used with `method: {spec.name}` "
                 f"({spec.paper}). {_first_paragraph(spec.config.__doc__)}")
    return out


def keys(root: type | None = None) -> list[str]:
    """Every dotted config key (nested sections included)."""
    return [k.name for s in sections(root) for k in s.keys]


def flatten(value, prefix: str = "") -> dict[str, object]:
    """A config instance as ``{dotted key: value}``."""
    out = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if f.metadata.get("section") and v is not None:  # written under the method's name
            out.update(flatten(v, f"{prefix}{value.method}."))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


def per_method_values(root: type | None = None) -> dict[str, dict[str, dict[str, object]]]:
    """``{method: {setup label: {dotted key: value}}}``: what each registered method starts from in each setup.

    The values are those ``selfsup.build_config`` resolves (the recipe for the encoder and image size, the
    method's own defaults, the view presets). The lead entry point for per-method values: point it at a
    method registry's own recipe values when one exists.
    """
    import selfsup
    from selfsup.methods import METHODS

    root = root or root_config()
    table: dict[str, dict[str, dict[str, object]]] = {}
    for method in METHODS:
        table[method] = {}
        for label, setup in SETUPS.items():
            cfg = selfsup.build_config(root, {"method": method, **setup})  # no length: the papers' main setting
            table[method][f"{label}: recipe `{cfg.recipe}`"] = flatten(cfg)
    return table


def _show(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, float):
        value = float(f"{value:.6g}")
    if isinstance(value, tuple):
        value = tuple(float(f"{v:.6g}") if isinstance(v, float) else v for v in value)
    if isinstance(value, list):
        value = tuple(value)
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(root: type | None = None, option_help: dict[str, str] | None = None) -> str:
    """The whole page."""
    root = root or root_config()
    secs = sections(root, option_help)
    out = ["# Config keys", "",
           f"Generated from the config dataclasses (`{root.__module__}.{root.__qualname__}` and the dataclasses it "
           "nests). Every key is set in a YAML file (`--config FILE.yaml`, nested sections as nested mappings) "
           "or on the command line (`--set KEY=VALUE`, dotted for nested keys: `--set optim.lr=0.5`); a key "
           "given explicitly wins over the recipe. A run writes the resolved config into `config.yaml`, and "
           "`selfsup pretrain ... --dry-run` prints it without training.", "",
           "The defaults below are the dataclasses' own. A run starts from its recipe's values instead for the "
           "keys a recipe sets; [Values per method](#values-per-method) shows what each method resolves to.", ""]
    for sec in secs:
        title = f"`{sec.prefix}*`" if sec.prefix else "Top-level keys"
        out += [f"## {title}", ""]
        if sec.intro:
            out += [_cell(sec.intro), ""]
        if sec.same_as is not None:
            out += [f"The same keys as `{sec.same_as}*`: " + ", ".join(f"`{k.name}`" for k in sec.keys) + ".", ""]
            continue
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key in sec.keys:
            if key.section_note:
                out += ["", _cell(key.section_note), "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
            out.append(f"| `{key.name}` | {_cell(key.type)} | {_show(key.default)} | {_cell(key.meaning)} |")
        out.append("")
    out += ["## Values per method", "",
            "What each method resolves to in three setups (the recipe is chosen from the encoder and image "
            "size), for the keys where some setup differs from the default above. Generated with "
            "`selfsup.build_config`, as `selfsup pretrain --dry-run` resolves a run.", ""]
    defaults = {k.name: k.default for s in secs for k in s.keys if s.same_as is None}
    for method, by_setup in per_method_values(root).items():
        labels = list(by_setup)
        changed = [k for k in by_setup[labels[0]]
                   if any(_show(by_setup[lab].get(k)) != _show(_nested_default(defaults, k)) for lab in labels)
                   and k not in ("method", "steps", "recipe", "backbone", "dataset", "image_size")]
        out += [f"### `{method}`", "", "| key | default | " + " | ".join(labels) + " |",
                "| --- | --- | " + " | ".join("---" for _ in labels) + " |"]
        for k in changed:
            out.append(f"| `{k}` | {_show(_nested_default(defaults, k))} | "
                       + " | ".join(_show(by_setup[lab].get(k)) for lab in labels) + " |")
        out.append("")
    return "\n".join(out)


def _nested_default(defaults: dict[str, object], key: str):
    """The dataclass default of ``key``; for a key under a section that defaults to None, that section's class's."""
    if key in defaults:
        return defaults[key]
    head, _, rest = key.partition(".")
    for name, value in defaults.items():  # a section listed as "same as" another: view2.x -> view.x
        if name.endswith("." + rest) and name.count(".") == key.count("."):
            return value
    return None
