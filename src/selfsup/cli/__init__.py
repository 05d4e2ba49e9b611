"""The command line, one module per command group; ``selfsup.cli:main`` is the console entry point."""
from selfsup.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
