"""The command-line reference page: every ``selfsup`` subcommand's usage and options, from the real parser.

The page is built from ``selfsup.cli.build_parser()`` (and, for ``selfsup analyze STUDY``, each study's own
parser from ``selfsup.analyze.STUDIES``), so it cannot drift from what the command accepts.
"""
from __future__ import annotations

import argparse
import os

# argparse has no public way to list subcommands; its subparsers action is the documented container of them.
_SUBPARSERS = argparse._SubParsersAction


def subcommands(parser: argparse.ArgumentParser, prefix: str = "selfsup") -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command line, parser)`` of every subcommand under ``parser``, depth first, in registration order."""
    found = []
    for action in parser._actions:
        if isinstance(action, _SUBPARSERS):
            for name, sub in action.choices.items():
                found.append((f"{prefix} {name}", sub))
                found.extend(subcommands(sub, f"{prefix} {name}"))
    return found


def study_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command line, parser)`` of every ``selfsup analyze STUDY`` (each study parses its own flags)."""
    from selfsup.analyze import STUDIES

    return [(f"selfsup analyze {name}", study.load().build_parser(prog=f"selfsup analyze {name}"))
            for name, study in STUDIES.items()]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, (argparse._StoreTrueAction,
                                                                          argparse._StoreFalseAction)):
        return ""
    return f"`{action.default}`"


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if action.metavar is not None:
        return f"`{action.metavar}`"
    kind = getattr(action.type, "__name__", None)
    return f"`{kind}`" if kind in ("int", "float") else f"`{action.dest.upper()}`"


def pretrain_option_help() -> dict[str, str]:
    """``{config key: help}`` of the ``selfsup pretrain`` options that set a config key of the same name."""
    from selfsup.cli import build_parser

    pretrain = dict(subcommands(build_parser()))["selfsup pretrain"]
    return {a.dest: a.help for a in pretrain._actions if a.option_strings and a.help not in (None, argparse.SUPPRESS)}


def options_table(parser: argparse.ArgumentParser, config_meanings: dict[str, str] | None = None) -> str:
    """A Markdown table of the parser's arguments: name, value, default, help (``--help`` itself left out).

    An option without help text whose destination is a config key (``--batch-size``: ``batch_size``) gets
    the key's meaning from ``config_meanings``.
    """
    config_meanings = config_meanings or {}
    rows = ["| argument | value | default | meaning |", "| --- | --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, _SUBPARSERS)):
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
        help_text = "" if action.help in (None, argparse.SUPPRESS) else action.help.replace("%%", "%")
        if "%(" in help_text:
            help_text = help_text % {"default": action.default, "prog": parser.prog}
        if not help_text and action.dest in config_meanings:
            help_text = f"config key `{action.dest}`" + (f": {config_meanings[action.dest]}" if config_meanings[action.dest] else "")
        rows.append(f"| {name} | {_value(action)} | {_default(action)} | {_cell(help_text)} |")
    return "\n".join(rows)


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage lines as ``--help`` prints them, wrapped at 100 columns (the same page on every machine:
    argparse wraps at the terminal's width, read from ``COLUMNS``), without the ``usage:`` label."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser.format_usage().removeprefix("usage: ").rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def render(config_meanings: dict[str, str] | None = None) -> str:
    """The whole page; ``config_meanings`` (``{config key: meaning}``) fills options that have no help text."""
    from selfsup.cli import build_parser

    root = build_parser()
    commands = subcommands(root)
    studies = study_parsers()
    out = ["# Command line", "",
           "Generated from the parser itself (`selfsup.cli.build_parser`): every subcommand with its usage and "
           "options, as `selfsup COMMAND --help` prints them. Config keys that have no option of their own are "
           "set with `--set KEY=VALUE` or `--config FILE.yaml`; [Config keys](config.md) lists them.", "",
           "| command | what it does |", "| --- | --- |"]
    for line, sub in commands:
        out.append(f"| [`{line}`](#{line.replace(' ', '-')}) | {_cell(_help_of(root, line))} |")
    for line, sub in commands:
        out += ["", f"## `{line}` {{ #{line.replace(' ', '-')} }}", ""]
        description = sub.description or _help_of(root, line)
        if description:
            out += [description.split("\n")[0] if line.endswith("analyze") else _cell(description), ""]
        out += ["```text", _usage(sub), "```", "", options_table(sub, config_meanings)]
        if line == "selfsup analyze":
            for study_line, study in studies:
                out += ["", f"### `{study_line}` {{ #{study_line.replace(' ', '-')} }}", ""]
                if study.description:
                    out += [_cell(study.description), ""]
                out += ["```text", _usage(study), "```", "", options_table(study)]
    return "\n".join(out) + "\n"


def _help_of(root: argparse.ArgumentParser, line: str) -> str:
    """The one-line help a subcommand was registered with (shown in ``selfsup --help``)."""
    parser, words = root, line.split()[1:]
    text = ""
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, _SUBPARSERS))
        text = next((c.help for c in action._choices_actions if c.dest == word), "") or ""
        parser = action.choices[word]
    return text
