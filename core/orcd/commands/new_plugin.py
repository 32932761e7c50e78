"""``orcd new-plugin NAME [-o DIR]``: write a model-plugin skeleton that passes
its own tests (orcd.devkit.scaffold)."""

from __future__ import annotations

NAME = "new-plugin"
HELP = "write a working model-plugin skeleton (pyproject, hooks, weight table, forward, tests)"


def add_arguments(p) -> None:
    p.add_argument("name", help="architecture name, e.g. mistral (the GGUF general.architecture)")
    p.add_argument("-o", "--output", default=".", help="folder to create the plugin in")


def run(args) -> int:
    from orcd.devkit.scaffold import write_plugin

    root = write_plugin(args.name, args.output)
    print(f"wrote {root}\nnext: pip install -e {root} && pytest {root}/tests")
    return 0
