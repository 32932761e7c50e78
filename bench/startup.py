"""Start-up benchmark (issue 15): seconds from launching ``orcd serve`` to a healthy
/health, and the phases the worker narrated, over several starts.

    python3 bench/startup.py --model M.gguf [--device cuda:0] [--runs 4]
        [--base OTHER/core] [--peer PATH/llama-server] [--max-batch 16]

Each run is a fresh process: the interpreter, the imports, the device, the model (the
page cache and the kernel cache stay warm after the first start, which is left out of
the medians and reported apart as the cold start). ``--base`` alternates each run
with another tree's ``core`` (e.g. a ``git archive`` of an earlier commit), so the two
are timed on the same machine in the same minutes; ``--peer`` times llama-server on
the same model (``-ngl 999``). The phases are the narration's: ``startup``'s (before
the load), ``model_load_complete``'s (the load's parts) and ``ready``'s
(``since_process_start_s``: the worker's own clock, from the process's start).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from load import free_port, serving   # bench/load.py (a script's own folder is on its path)


def start_once(cmd: list[str], env: dict, port: int, log: Path, timeout_s: float) -> tuple[float, list]:
    """One start: (seconds to a healthy /health, polled every 10 ms; the narrated events),
    the server stopped after. RuntimeError if it exits or stays unhealthy."""
    with serving(cmd, port, log, timeout_s, env=env, poll_s=0.01) as served:
        took = served.healthy_s
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return took, events


def phases_of(events: list) -> dict:
    """The narrated phases of one start, flat: before (startup's), load (model_load_complete's),
    ready (since_process_start_s)."""
    out = {}
    for e in events:
        if e.get("event") == "startup":
            out.update({f"startup.{k}": v for k, v in (e.get("phases") or {}).items()})
        elif e.get("event") == "model_load_complete":
            out["load"] = e.get("seconds")
            out.update({f"load.{k}": v for k, v in (e.get("phases") or {}).items()})
        elif e.get("event") == "ready":
            out["ready.since_process_start_s"] = e.get("since_process_start_s")
            out.update({f"ready.{k}": v for k, v in (e.get("phases") or {}).items()})
    return out


def orcd_cmd(args, port: int) -> list[str]:
    return [sys.executable, "-m", "orcd.cli", "serve", "--model", args.model, "--device", args.device,
            "--port", str(port), "--max-batch", str(args.max_batch)]


def peer_cmd(args, port: int) -> list[str]:
    return [args.peer, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
            "-ngl", "999" if args.device != "cpu" else "0"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--runs", type=int, default=4, help="warm starts of each (after one cold start)")
    ap.add_argument("--base", help="another tree's core directory, started in turn with this one")
    ap.add_argument("--peer", help="a llama-server binary, started as many times")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--logs", default=os.environ.get("ORCD_BENCH_DIR", "/tmp/orcd-bench"))
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be positive")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    trees = {"this": str(Path(__file__).resolve().parent.parent / "core")}
    if args.base:
        trees["base"] = str(Path(args.base).resolve())
    servers = [(name, orcd_cmd, core) for name, core in trees.items()]
    if args.peer:
        servers.append(("llama-server", peer_cmd, None))
    took: dict[str, list] = {name: [] for name, _, _ in servers}
    phases: dict[str, list] = {name: [] for name, _, _ in servers}
    for run in range(args.runs + 1):   # run 0: the cold start (kernel and page caches filling)
        for name, cmd_of, core in servers:
            env = dict(os.environ)
            if core is not None:
                env["PYTHONPATH"] = core + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            port = free_port()
            try:
                t, events = start_once(cmd_of(args, port), env, port, logs / f"startup-{name}-{run}.log",
                                       args.timeout)
            except RuntimeError as e:   # it exited or never became healthy: the log's tail
                print(f"{name}: run {run}: {e}", file=sys.stderr)
                return 1
            took[name].append(t)
            phases[name].append(phases_of(events))
            print(f"{name} run {run}: healthy after {t:.2f} s {json.dumps(phases[name][-1])}", file=sys.stderr)
    print(table(took, phases))
    return 0


def table(took: dict, phases: dict) -> str:
    keys = sorted({k for runs in phases.values() for p in runs[1:] for k in p})
    head = ["server", "cold start s", "warm start s (median)", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, times in took.items():
        warm = phases[name][1:]
        cells = [name, f"{times[0]:.2f}", f"{statistics.median(times[1:]):.2f}"]
        for k in keys:
            vals = [p[k] for p in warm if isinstance(p.get(k), (int, float))]
            cells.append(f"{statistics.median(vals):.3f}" if vals else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
