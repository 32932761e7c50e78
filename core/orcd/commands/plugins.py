"""``orcd plugins``: installed plugins, their versions and what each provides."""

from __future__ import annotations

import json

from orcd import PLUGIN_API_VERSION
from orcd.plugins import BLOCK_ENV, PluginHost

NAME = "plugins"
HELP = "list installed plugins, their versions and what each provides"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    host = PluginHost()
    infos = host.plugins()
    if args.json:
        print(json.dumps([vars(i) for i in infos], indent=2))
        return 0
    print(f"orcd plugin API {PLUGIN_API_VERSION}")
    for info in infos:
        kind = "built-in" if info.builtin else "plugin"
        print(f"{info.name} {info.version} ({kind}, {info.module})")
        for what, items in sorted(info.provides.items()):
            print(f"  {what}: {', '.join(items)}")
    if host.skipped:
        print(f"blocked by {BLOCK_ENV}: {', '.join(host.skipped)}")
    return 0
