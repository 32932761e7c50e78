"""``orcd pull [SOURCE]``: a known model into the local cache (verified by
sha256), or a local GGUF file or a Hugging Face Hub file made servable by name."""

from __future__ import annotations

from orcd import pull as registry

NAME = "pull"
HELP = ("download a known model into the local cache (verified by sha256), or register a "
        "local GGUF file or a Hugging Face Hub file by name")


def add_arguments(p) -> None:
    p.add_argument("source", nargs="?", default=registry.DEFAULT, metavar="SOURCE",
                   help=f"a known model (see --list), a GGUF path, hf://OWNER/REPO/FILE.gguf or "
                        f"OWNER/REPO (default: {registry.DEFAULT})")
    p.add_argument("--list", action="store_true", help="list pullable models and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    if args.list:
        served = _served_architectures()
        for name, s in sorted(registry.REGISTRY.items()):
            cached = registry.cached_path(name)
            default = " (default)" if name == registry.DEFAULT else ""
            where = str(cached) if cached is not None else "not downloaded"
            needs = ""
            if s.arch and served is not None and s.arch not in served:
                needs = (f" [no installed plugin serves {s.arch}: "
                         f"pip install orcd-plugin-{s.arch} (from a checkout: -e plugins/{s.arch})]")
            print(f"{name}{default}: {s.description}, {s.size / 2**20:.1f} MiB, {where}{needs}")
        return 0
    print(registry.pull_source(args.source, progress=not args.quiet))
    return 0


def _served_architectures() -> set[str] | None:
    from orcd.plugins import PluginHost
    try:
        return set(PluginHost().architectures)
    except Exception:  # noqa: BLE001 - a broken plugin: list the models all the same
        return None
