"""The ``meshpar`` command: ``args`` (the parser), ``train``, ``inspect``; ``command.main`` runs
it."""

from meshpar.cli.args import DEFAULT_MESH, build_parser
from meshpar.cli.command import main
from meshpar.errors import UsageError

__all__ = ["DEFAULT_MESH", "UsageError", "build_parser", "main"]
