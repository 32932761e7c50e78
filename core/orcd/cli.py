"""The ``orcd`` command line. Each subcommand is a module in ``orcd.commands``
with ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.

One exit-code rule for every subcommand: 0 on success; 1 on any error — a bad
argument (argparse's own checks and ours alike), an unusable device, or a
failure while running — always as one line on stderr; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from orcd import __version__
from orcd.errors import OrcdError

COMMANDS = ("inspect", "pull", "synth", "plugins", "generate", "serve", "bench", "new-plugin")
EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
EPILOG = "exit status: 0 success, 1 any error (one line on stderr), 130 interrupted"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's exit-code rule: a usage error exits 1, not 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("epilog", EPILOG)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="orcd", description="Serve one GGUF model from one GPU.")
    parser.add_argument("--version", action="version", version=f"orcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMANDS:
        mod = importlib.import_module(f"orcd.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from orcd.commands._options import UsageError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or EXIT_OK)
    except UsageError as e:
        print(f"orcd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OrcdError as e:
        print(f"orcd: error [{e.code}]: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("orcd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
