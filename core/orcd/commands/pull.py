"""``orcd pull [NAME]``: download a known model into the cache, verified by sha256."""

from __future__ import annotations

from orcd import pull as registry

NAME = "pull"
HELP = "download a known model into the local cache (verified by sha256)"


def add_arguments(p) -> None:
    p.add_argument("name", nargs="?", default=registry.DEFAULT, metavar="NAME",
                   help=f"model to pull (default {registry.DEFAULT}); see --list")
    p.add_argument("--list", action="store_true", help="list pullable models and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    if args.list:
        for name, s in sorted(registry.REGISTRY.items()):
            cached = registry.cached_path(name)
            default = " (default)" if name == registry.DEFAULT else ""
            where = str(cached) if cached is not None else "not downloaded"
            print(f"{name}{default}: {s.description}, {s.size / 2**20:.1f} MiB, {where}")
        return 0
    print(registry.pull(args.name, progress=not args.quiet))
    return 0
