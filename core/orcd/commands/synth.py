"""``orcd synth PRESET -o FILE``: write a shape-accurate synthetic GGUF;
``orcd synth --list``: the presets the installed plugins offer."""

from __future__ import annotations

from orcd.errors import InvalidRequest
from orcd.plugins import PluginHost

NAME = "synth"
HELP = "write a synthetic GGUF with a real model's shapes, quant types and vocabulary size"


def add_arguments(p) -> None:
    p.add_argument("preset", nargs="?", help="preset name (see --list)")
    p.add_argument("-o", "--output", help="GGUF file to write (no default: required with a preset)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")


def run(args) -> int:
    from orcd.devkit.synth import get_preset, planned_file_bytes, synthesize

    host = PluginHost()
    if args.list:
        for name in sorted(host.synth_presets):
            preset = host.synth_presets[name]
            print(f"{name:18} {preset.arch:8} {preset.description}")
        return 0
    if not args.preset:
        raise InvalidRequest("name a preset (orcd synth --list shows them)", field="preset")
    if not args.output:
        raise InvalidRequest("name the output file with -o FILE", field="output")
    preset = get_preset(host, args.preset)
    size = planned_file_bytes(host, preset)
    print(f"writing {preset.name} ({preset.arch}, {size / 1e6:,.1f} MB) to {args.output}")
    path = synthesize(host, preset.name, args.output, seed=args.seed, progress=True)
    print(f"wrote {path}")
    return 0
