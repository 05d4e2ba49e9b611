"""The papers' experiments as commands: ``selfsup analyze <study>``.

``STUDIES`` maps a study name to its module (imported only when the study runs, so the command line
starts fast). Every study module has ``build_parser(prog)`` and ``run(args) -> dict`` and writes
PNG figures, CSV/JSON numbers and a ``summary.md`` into its ``--out`` folder.
"""
from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass
from types import ModuleType

from selfsup.errors import ConfigError


@dataclass(frozen=True)
class Study:
    module: str
    help: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


STUDIES: dict[str, Study] = {
    "augment-pairs": Study("selfsup.analyze.augment_pairs",
                           "SimCLR Fig. 5: linear eval after training with each augmentation and pair (heatmap)"),
    "head": Study("selfsup.analyze.head", "SimCLR Fig. 8: none / linear / nonlinear projection head x output dim, h vs z"),
    "transform-probe": Study("selfsup.analyze.transform_probe",
                             "SimCLR Tab. 3: predict the applied transformation from h and from z"),
    "tsne": Study("selfsup.analyze.tsne", "t-SNE of h and of z, coloured by class, side by side"),
    "batch-size": Study("selfsup.analyze.batch_size", "SimCLR Tab. B.1 / BYOL Tab. 16: batch size at a fixed image budget"),
    "temperature": Study("selfsup.analyze.temperature", "SimCLR Tab. 5: NT-Xent temperature (BYOL as reference)"),
    "views": Study("selfsup.analyze.views", "grids of augmented views of real images for any view config"),
}


def run_study(name: str, argv: list[str]) -> dict:
    """Parse ``argv`` with the study's own parser and run it; returns the study's result dict."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    module = STUDIES[name].load()
    args = module.build_parser(prog=f"selfsup analyze {name}").parse_args(argv)
    return module.run(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` to the ``selfsup`` command line (``subparsers`` from ``add_subparsers``)."""
    lines = "\n".join(f"  {n:<16} {s.help}" for n, s in STUDIES.items())
    p = subparsers.add_parser(
        "analyze", help="rerun the papers' experiments (augment-pairs, head, transform-probe, tsne, ...)",
        description=f"Studies (each takes its own flags; see selfsup analyze STUDY --help):\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=list(STUDIES), metavar="STUDY", help="one of: " + ", ".join(STUDIES))
    p.add_argument("study_args", nargs=argparse.REMAINDER, help="the study's flags")
    p.set_defaults(func=cmd_analyze)
    return p


def cmd_analyze(args) -> int:
    result = run_study(args.study, list(args.study_args))
    print(json.dumps(result))
    return 0


__all__ = ["STUDIES", "Study", "run_study", "add_parser", "cmd_analyze"]
