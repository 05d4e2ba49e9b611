"""The documentation: every command in the pages is a real one, the generated reference pages cover the
parser and the config, the site's navigation holds every page, and the pages describe the software (no
development narrative). The site itself is built by ``make docs`` (``mkdocs build --strict``) in CI."""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from selfsup.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "gen"))

import api_pages  # noqa: E402
import cli_pages  # noqa: E402
import config_pages  # noqa: E402

# Generated during the build (docs/gen/reference_pages.py), so not in git.
GENERATED = ("reference/cli.md", "reference/config.md", "reference/api/")


def doc_pages() -> list[Path]:
    """README.md and every Markdown page under docs/ (the generators' folder excepted)."""
    return [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "gen" not in p.relative_to(DOCS).parts)


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in order, as paths under docs/."""
    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    return list(walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))


def bash_blocks(text: str) -> list[str]:
    """Bodies of the fenced ``bash`` blocks (``sh`` blocks are scripts shown whole and are not parsed)."""
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def command_lines(body: str) -> list[str]:
    """Logical lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [ln for ln in (shlex.join(shlex.split(line, comments=True)) for line in joined.splitlines()) if ln]


def strip_prefix(words: list[str]) -> list[str]:
    """Drop what runs the command rather than being it: ``time``, ``nice -n N``, ``VAR=value`` settings."""
    while words:
        if words[0] == "time" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        elif words[0] == "nice" and len(words) > 2 and words[1] == "-n":
            words = words[3:]
        else:
            break
    return words


def selfsup_argv(words: list[str]) -> list[str] | None:
    if Path(words[0]).name == "selfsup":
        return words[1:]
    if words[0] == "torchrun":
        i = words.index("-m")
        assert words[i + 1] == "selfsup", words
        rest = words[i + 2:]
        return rest[1:] if rest[:1] == ["--"] else rest
    return None


def check_selfsup(parser: argparse.ArgumentParser, argv: list[str], line: str, page: Path) -> None:
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{page.relative_to(ROOT)} shows a command the CLI rejects: {line}")
    if argv[0] == "analyze":  # the study parses its own flags
        from selfsup.analyze import STUDIES

        study = STUDIES[args.study].load().build_parser(prog=f"selfsup analyze {args.study}")
        try:
            study.parse_args(args.study_args)
        except SystemExit:
            pytest.fail(f"{page.relative_to(ROOT)} shows a study command its parser rejects: {line}")


def test_every_command_in_the_docs_is_valid():
    """Each selfsup/torchrun line parses with the real parser; pip extras, make targets and scripts exist."""
    parser = build_parser()
    extras = set(__import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    makefile = (ROOT / "Makefile").read_text()
    counts = {"selfsup": 0, "torchrun": 0, "pip": 0, "make": 0, "script": 0}
    for page in doc_pages():
        for body in bash_blocks(page.read_text()):
            for line in command_lines(body):
                words = strip_prefix(shlex.split(line))
                argv = selfsup_argv(words)
                if argv is not None:
                    check_selfsup(parser, argv, line, page)
                    counts["torchrun" if words[0] == "torchrun" else "selfsup"] += 1
                elif words[:3] == ["pip", "install", "-e"]:
                    extra = re.fullmatch(r"\.\[([\w-]+)\]", words[3]).group(1)
                    assert extra in extras, f"{page.name} installs extra {extra!r}; pyproject.toml has {sorted(extras)}"
                    counts["pip"] += 1
                elif words[0] == "make":
                    assert re.search(rf"^{words[1]}:", makefile, re.M), f"{page.name}: Makefile has no target {words[1]!r}"
                    counts["make"] += 1
                elif words[0] in ("python", "bash", ".venv/bin/python") and words[1].startswith("benchmarks/"):
                    assert (ROOT / words[1]).is_file(), f"{page.name} runs {words[1]}, which does not exist"
                    counts["script"] += 1
                elif words[0] == "export" and all("=" in w for w in words[1:]):
                    continue
                elif words[0] in (".", "source") and words[1:] == [".venv/bin/activate"]:
                    continue
                else:
                    pytest.fail(f"{page.relative_to(ROOT)} shows a command this test does not know how to check: {line}")
    assert counts["selfsup"] >= 80 and counts["torchrun"] >= 5 and counts["pip"] >= 8 and counts["make"] >= 5, counts
    assert counts["script"] >= 15, counts


def test_the_checker_refuses_a_wrong_option_and_a_wrong_study_flag():
    parser = build_parser()
    with pytest.raises(pytest.fail.Exception, match="the CLI rejects"):
        check_selfsup(parser, ["pretrain", "--no-such-flag"], "selfsup pretrain --no-such-flag", ROOT / "README.md")
    with pytest.raises(pytest.fail.Exception, match="study command"):
        check_selfsup(parser, ["analyze", "views", "--no-such-flag"], "selfsup analyze views --no-such-flag",
                      ROOT / "README.md")
    assert strip_prefix(["OMP_NUM_THREADS=1", "nice", "-n", "5", "time", "selfsup", "demo"]) == ["selfsup", "demo"]


def test_the_nav_holds_every_page_and_every_page_exists():
    nav = nav_pages()
    handwritten = {p.relative_to(DOCS).as_posix() for p in doc_pages()[1:]} - {"README.md"}
    assert handwritten - set(nav) == set(), "pages missing from mkdocs.yml's nav"
    for page in nav:
        assert page.startswith(GENERATED) or (DOCS / page).is_file(), f"mkdocs.yml's nav names {page}, which does not exist"


def test_the_readme_is_a_short_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = bash_blocks(text)[0]
    assert command_lines(first_block)[:2] == ["make demo", "make test"]


# What the pages must not hold: how the software was developed rather than what it does.
NARRATIVE = [r"\bsessions?\b", r"\bissues? ?\d+", r"\bissue-\d+", r"shared CPU", r"\bsuperseded\b",
             r"\bhelpers?' runs\b", r"other (engineers|helpers|jobs|sessions)", r"\bhistory\.md\b",
             r"\bas committed\b", r"\bthe old probe\b"]


def test_the_docs_hold_no_development_narrative():
    found = []
    for page in doc_pages() + [ROOT / "benchmarks" / "README.md"]:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            found += [f"{page.relative_to(ROOT)}:{n}: {pat}" for pat in NARRATIVE if re.search(pat, line, re.I)]
    assert found == []


def test_the_narrative_check_catches_a_session_and_an_issue():
    line = "Measured this session on a shared CPU (issue 12)."
    assert sum(bool(re.search(p, line, re.I)) for p in NARRATIVE) == 3


# ------------------------------------------------------------------------------------------------
# The generated reference pages


def _walk(parser: argparse.ArgumentParser, prefix: str = "selfsup"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _walk(sub, f"{prefix} {name}")


def test_the_cli_page_covers_every_subcommand_and_option():
    page = cli_pages.render()
    commands = list(_walk(build_parser()))
    assert len(commands) >= 10
    for line, sub in commands + cli_pages.study_parsers():
        assert f"## `{line}`" in page or f"### `{line}`" in page, f"{line} has no section"
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in page, f"{line} {option} missing"


def test_an_option_without_help_gets_the_config_keys_meaning():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--batch-size", type=int)
    table = cli_pages.options_table(parser, {"batch_size": "global batch"})
    assert "| `--batch-size` | `int` |  | config key `batch_size`: global batch |" in table


def _resolved_keys() -> set[str]:
    """Every key of a resolved config (views resolved, so every section is there), over every method's section."""
    import selfsup
    from selfsup.methods import METHODS

    return {key for method in METHODS
            for key in config_pages.flatten(selfsup.build_config(selfsup.PretrainConfig, {"method": method, "steps": 1}))}


def test_the_config_page_lists_every_key_with_type_and_default():
    page = config_pages.render()
    keys = _resolved_keys()
    assert {"optim.lr", "view.blur_p", "view2.solarize_p", "byol.base_tau", "simclr.temperature",
            "multicrop.num_local"} <= keys
    for key in keys:
        assert f"`{key}`" in page, f"config key {key} missing"
    assert "| `optim.lr` | float | `0.3` | base learning rate" in page
    assert "| `recipe` | str \\| None | `None` |" in page
    assert set(config_pages.keys()) == keys


@dataclasses.dataclass
class _Method:
    """A method's own section."""

    base_tau: float = 0.996  # target EMA rate at step 0
    lr: float = dataclasses.field(default=0.2, metadata={"help": "base learning rate"})
    hidden: int | None = None
    """width of the hidden layer; None: the encoder's"""


@dataclasses.dataclass
class _Root:
    """A root config."""

    # the seed of everything
    seed: int = 0
    byol: _Method = dataclasses.field(default_factory=_Method)
    other: _Method | None = None  # None: as byol


def test_the_config_page_recurses_into_any_nested_section_as_dotted_keys():
    secs = config_pages.sections(_Root)
    rows = {k.name: k for s in secs for k in s.keys}
    assert rows["seed"].meaning == "the seed of everything"
    assert (rows["byol.base_tau"].type, rows["byol.base_tau"].default, rows["byol.base_tau"].meaning) == \
        ("float", 0.996, "target EMA rate at step 0")
    assert rows["byol.lr"].meaning == "base learning rate"
    assert rows["byol.hidden"].type == "int | None" and rows["byol.hidden"].meaning.startswith("width of the hidden")
    other = next(s for s in secs if s.prefix == "other.")
    assert other.same_as == "byol." and [k.name for k in other.keys] == ["other.base_tau", "other.lr", "other.hidden"]


def test_per_method_values_resolve_every_registered_method():
    from selfsup.methods import METHODS

    table = config_pages.per_method_values()
    assert set(table) == set(METHODS)
    byol = table["byol"]
    paper = next(v for label, v in byol.items() if "224 px" in label)
    assert paper["optim.lr"] == 0.2 and paper["byol.proj_hidden_dim"] == 4096


def test_the_api_pages_cover_every_package_and_its_exports():
    pages = api_pages.pages()
    import selfsup

    packages = {p.name for p in Path(selfsup.__file__).parent.iterdir() if (p / "__init__.py").is_file()}
    for name in packages:
        page = pages[f"reference/api/selfsup.{name}.md"]
        targets = re.findall(r"^::: (\S+)$", page, re.M)[1:]  # after the package's own docstring
        exports = api_pages.exported(f"selfsup.{name}")
        assert [t.rsplit(".", 1)[1] for t in targets] == exports, name
    # an export that shares its name with a submodule is documented at its definition, not as the module
    assert api_pages.export_target("selfsup.losses", "nt_xent") == "selfsup.losses.nt_xent.nt_xent"
    top = pages["reference/api/selfsup.md"]
    for name in ("PretrainConfig", "build_config", "pretrain", "load_encoder", "from_pretrained"):
        obj = getattr(selfsup, name)
        assert f"::: {obj.__module__}.{obj.__qualname__}\n" in top, name
