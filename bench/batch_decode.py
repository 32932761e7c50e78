"""A batch of decodes on the GPU (backend.forward_batch): is each row's greedy
token the one it gets alone, and how do the step time and the aggregate rate
grow with the batch? Against the single-request graph step of the same model.

    python3 bench/batch_decode.py --model M.gguf [--batches 1,2,4,8,16,32] [--prompt 64]
                                  [--mma on|off] [--cuda-option NAME=VALUE ...]

Prints, per batch size B: the graph-replayed step (CUDA events, median of 50), the
aggregate tokens/s (B / step) and its ratio to the single-request step's rate.
The first column checks correctness first: B sequences, 8 greedy steps batched,
each compared with the same sequence stepped alone in a batch of one.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from bench_gemv import Timer
from kernel_times import print_kernel_times

from orcd.commands._options import add_cuda_option_argument, cuda_options_of
from orcd.kvcache import blocks_for
from orcd.load import load_model
from orcd.plugins import PluginHost

CHECK_STEPS = 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--profile", type=int, default=0, metavar="B",
                    help="also list the kernels of one batch-of-B step by GPU time (torch.profiler)")
    ap.add_argument("--mma", choices=("on", "off"), default="off",
                    help="on: the batch GEMVs on the int8 tensor cores, not dp4a (--cuda-option mma)")
    add_cuda_option_argument(ap)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    options = {**cuda_options_of(ap, args.cuda_option, args.device), "mma": args.mma == "on"}
    lm = load_model(args.model, host=PluginHost(), device=args.device, n_ctx=1024, **options)
    b, hp = lm.backend, lm.hp
    width = blocks_for(args.prompt + CHECK_STEPS + 64)
    n = max(batches)
    pool = b.new_kv_pool(hp.n_layer, n * width, hp.n_head_kv, hp.head_dim, hp.get("head_dim_v"))
    tables = np.arange(n * width, dtype=np.int32).reshape(n, width)
    rng = np.random.default_rng(0)
    first = []
    for s in range(n):   # each sequence's prompt into its own blocks
        prompt = rng.integers(0, hp.n_vocab, args.prompt).tolist()
        logits = b.forward_batch(lm.model, pool, tables[s:s + 1], [0] * len(prompt), prompt,
                                 list(range(len(prompt))), width * 64, batched=False, last_only=True)
        first.append(int(np.argmax(b.to_host(logits).reshape(-1))))
    timer = Timer(b.device)
    single = _single_step_ms(lm, timer)
    print(f"{lm.path.name} on {b.device.info.name} ({' '.join(args.cuda_option) or 'default options'}, mma {args.mma}); single-request graph step {single:.3f} ms "
          f"({1e3 / single:.0f} tok/s)")
    print(f"{'B':>4} {'same as alone':>14} {'step ms':>8} {'tok/s':>8} {'x single':>9}")
    for B in batches:
        same = _check(b, lm, pool, tables[:B], first[:B], args.prompt)
        step = lambda: b.forward_batch(lm.model, pool, tables[:B], list(range(B)), first[:B],  # noqa: E731
                                       [args.prompt] * B, width * 64, batched=True, last_only=False)
        step()
        ms = statistics.median(timer.ms(step) for _ in range(50))
        print(f"{B:>4} {str(same):>14} {ms:>8.3f} {B * 1e3 / ms:>8.0f} {B * single / ms:>9.2f}")
    if args.profile:
        B = args.profile
        print_kernel_times(lambda: b.forward_batch(lm.model, pool, tables[:B], list(range(B)), first[:B],
                                                   [args.prompt] * B, width * 64, batched=True,
                                                   last_only=False), f"batch of {B}")
    b.free_kv_pool(pool)
    lm.close()
    return 0


def _check(b, lm, pool, tables, first, n_prompt) -> bool:
    """CHECK_STEPS greedy steps of all rows together, then of each alone: same ids?"""
    B, width = tables.shape

    def run(rows, ids, pos):
        logits = b.forward_batch(lm.model, pool, tables[rows], list(range(len(rows))), ids, pos,
                                 width * 64, batched=True, last_only=False)
        return np.argmax(b.to_host(logits).reshape(len(rows), -1), axis=1).tolist()

    together, ids = [], list(first)
    for k in range(CHECK_STEPS):
        ids = run(list(range(B)), ids, [n_prompt + k] * B)
        together.append(ids)
    for s in range(B):
        tok = first[s]
        for k in range(CHECK_STEPS):
            tok = run([s], [tok], [n_prompt + k])[0]
            if tok != together[k][s]:
                return False
    return True


def _single_step_ms(lm, timer) -> float:
    from orcd.engine import Engine

    runner = Engine(lm).new_runner(256)
    runner.forward([1] * 16, 0)
    runner.forward([1], 16)
    return statistics.median(timer.ms(lambda: runner.forward([1], 16)) for _ in range(50))


if __name__ == "__main__":
    sys.exit(main())
