"""Writes the generated reference pages during ``mkdocs build`` (run by the mkdocs-gen-files plugin).

The pages exist only in the build, never in git: ``reference/cli.md`` (the command line), ``reference/config.md``
(the config keys) and ``reference/api/*.md`` (the Python API), plus ``reference/api/SUMMARY`` for the nav.
"""
from __future__ import annotations

import sys
from pathlib import Path

import mkdocs_gen_files

sys.path.insert(0, str(Path(__file__).parent))

import api_pages  # noqa: E402
import cli_pages  # noqa: E402
import config_pages  # noqa: E402


def _write(path: str, text: str, source: str) -> None:
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(text)
    mkdocs_gen_files.set_edit_path(path, source)


option_help = cli_pages.pretrain_option_help()
meanings = {key.name: key.meaning for section in config_pages.sections(option_help=option_help) for key in section.keys}
_write("reference/cli.md", cli_pages.render(config_meanings=meanings), "gen/cli_pages.py")
_write("reference/config.md", config_pages.render(option_help=option_help), "gen/config_pages.py")
summary = []
for page, text in api_pages.pages().items():
    _write(page, text, "gen/api_pages.py")
    summary.append(f"* [{Path(page).stem}]({Path(page).name})")
with mkdocs_gen_files.open("reference/api/SUMMARY.md", "w") as f:
    f.write("\n".join(summary) + "\n")
