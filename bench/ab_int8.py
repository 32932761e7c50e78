"""Decode and prefill with and without int8 activations, same card, same run.

    python3 bench/ab_int8.py MODEL.gguf [MODEL.gguf ...]

Each model is loaded twice (int8 off, on) through orcd.bench.run_bench
(512-token prompt, 128 greedy tokens, median of 3) and printed as one table row.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    from orcd.bench import run_bench
    from orcd.plugins import PluginHost

    host = PluginHost()
    print("| model | decode tok/s fp32 x | decode tok/s int8 x | int8 / fp32 | prefill fp32 | prefill int8 |")
    print("|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        res = [run_bench(path, host=host, device="cuda:0", prompt_tokens=512, gen_tokens=128, repeat=3,
                         int8=flag) for flag in (False, True)]
        print(f"| {Path(path).stem} | {res[0].decode_tok_s:.1f} | {res[1].decode_tok_s:.1f} | "
              f"{res[1].decode_tok_s / res[0].decode_tok_s:.2f} | {res[0].prefill_tok_s:.0f} | "
              f"{res[1].prefill_tok_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
