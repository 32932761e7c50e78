"""Decode and prefill by int8-activation mode (off, auto, all), same card, same run.

    python3 bench/ab_int8.py MODEL.gguf [MODEL.gguf ...]

Each model is loaded once per mode through orcd.devkit.bench.run_bench (512-token
prompt, 128 greedy tokens, median of 3) and printed as one table row.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    from orcd.devkit.bench import run_bench
    from orcd.plugins import PluginHost

    host = PluginHost()
    modes = ("off", "auto", "all")
    print("| model | " + " | ".join(f"decode tok/s {m}" for m in modes) + " | "
          + " | ".join(f"prefill tok/s {m}" for m in modes) + " |")
    print("|---" * (1 + 2 * len(modes)) + "|")
    for path in sys.argv[1:]:
        res = [run_bench(path, host=host, device="cuda:0", prompt_tokens=512, gen_tokens=128, repeat=3,
                         int8=mode) for mode in modes]
        print(f"| {Path(path).stem} | " + " | ".join(f"{r.decode_tok_s:.1f}" for r in res) + " | "
              + " | ".join(f"{r.prefill_tok_s:.0f}" for r in res) + " |", flush=True)


if __name__ == "__main__":
    main()
