"""The ``orcd`` command line. Each subcommand is a module in ``orcd.commands``
with ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

from orcd import __version__
from orcd.errors import OrcdError

COMMANDS = ("inspect", "pull", "synth", "plugins", "generate", "serve", "bench", "new-plugin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orcd", description="Serve one GGUF model from one GPU.")
    parser.add_argument("--version", action="version", version=f"orcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        mod = importlib.import_module(f"orcd.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except OrcdError as e:
        print(f"orcd: error [{e.code}]: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("orcd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
