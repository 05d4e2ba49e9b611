"""Configs as data: dict and YAML <-> dataclass conversion with type checking, ``--set key=value`` overrides, and
the one-line checks every config's ``validate`` uses.

Generic over the dataclass: :mod:`selfsup.training.config` (pre-training) and the protocols' configs (fine-tuning,
distillation) are built, checked and saved with it. Every problem is a ``ConfigError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from selfsup.errors import ConfigError


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, tp, value: Any):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: may not be empty (null)")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict, refusing unknown keys and wrong types.

    A class with ``split_section(data, prefix)`` (``PretrainConfig``) takes its method's section out first;
    its field marked ``metadata={"section": True}`` is set from that, never by name.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    section = None
    if hasattr(cls, "split_section"):
        data, section = cls.split_section(data, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("section")]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown config key{_suggest(cls, str(key), prefix)}; "
                              f"valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(prefix + key, hints[key], value)
    if section is not None:
        kwargs[_section_field(cls)] = section
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _section_field(cls) -> str:
    return next(f.name for f in dataclasses.fields(cls) if f.metadata.get("section"))


def _suggest(cls, key: str, prefix: str) -> str:
    """' (did you mean ...?)' with the closest key, also looking one level down (``lr`` -> ``optim.lr``)."""
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("section")]
    candidates = {f.name: prefix + f.name for f in fields}
    hints = typing.get_type_hints(cls)
    for f in fields:
        sub, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(sub):
            for g in dataclasses.fields(sub):
                candidates.setdefault(g.name, f"{prefix}{f.name}.{g.name}")
    if key in candidates:  # a nested key given at this level
        return f" (did you mean {candidates[key]!r}?)"
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {candidates[close[0]]!r}?)" if close else ""


def to_dict(obj) -> dict:
    """Plain dicts, lists and scalars (for YAML, JSON and checkpoints); a method's section is written under the
    method's name, right after the keys ``method`` and ``recipe``."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            out = {}
            for f in dataclasses.fields(v):
                if f.metadata.get("section"):
                    continue
                out[f.name] = conv(getattr(v, f.name))
                if f.name == "recipe" and hasattr(v, "section_items"):
                    out.update(v.section_items())
            return out
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(obj)


def parse_overrides(pairs: list[str]) -> dict:
    """``["optim.lr=0.5", "view.blur_p=0"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {pair!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys at the top level")
    return data


def build_config(cls, *layers: dict):
    """Merge dict layers (later wins) into a validated ``cls`` instance."""
    data: dict = {}
    for layer in layers:
        data = merge(data, layer)
    if hasattr(cls, "resolve"):
        data = cls.resolve(data)  # the recipe's values fill only keys not given (selfsup.methods.recipes)
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_yaml(obj, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
