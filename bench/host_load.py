"""The worker's host side under load, with a simulated GPU (runs on the CPU machine).

    python3 bench/host_load.py [--model tiny.gguf] [--step-ms 2.5] [--prompt-ms 1.5]
        [--concurrency 1,16] [--rounds 2] [--max-tokens 64] [--prompt-repeat 1] [--prompt-step 256]

``orcd serve``'s whole path -- HTTP, tokenizing, the inference thread, the
scheduler with pipelined steps and prompt chunks of their own, detokenizing,
SSE -- over the reference backend of a tiny model whose compute is replaced by
a simulated GPU: a batched step takes ``--step-ms`` and a prompt chunk
``--prompt-ms`` of "device time", queued as the real backend queues them
(``launch_rows`` returns at once; its ids arrive when the device would have
finished, and the wait releases the GIL as the real copy does). Every draw is
one fixed single-letter token, so each token streams text at once.

The clients are bench/load.py's (another process, so their GIL is not the
server's). The table gives load.py's numbers per concurrency and the ratio of the
aggregate rate to the simulated device's ceiling (clients x 1000 / step-ms: every
step full, no host time in between). What falls short of it is the host's share
-- or the benchmark's own, as the client set-up this found (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


class SimulatedGpu:
    """The device side of a CPU backend replaced by a clock: each forward adds its
    time to the device's queue; a draw's ids are ready when the queue drains."""

    def __init__(self, step_s: float, prompt_s: float, token: int, prompt_step: int = 256) -> None:
        self.step_s, self.prompt_s, self.token = step_s, prompt_s, token
        self.prompt_step = prompt_step
        self.free_at = 0.0

    def run(self, seconds: float) -> None:
        self.free_at = max(time.perf_counter(), self.free_at) + seconds

    def forward_batch(self, model, pool, tables, seq, ids, pos, n_ctx, batched, last_only, follow=None):
        self.run(self.step_s if batched else self.prompt_s)
        return np.zeros((len(ids) if batched else 1, 1), np.float32)

    def launch_rows(self, logits, draws) -> "Pending":
        return Pending(len(draws), self.free_at, self.token)

    def sample_rows(self, logits, draws) -> list:
        return self.launch_rows(logits, draws).result()

    def install(self, backend) -> None:
        backend.forward_batch, backend.launch_rows = self.forward_batch, self.launch_rows
        backend.sample_rows, backend.release_rows = self.sample_rows, lambda keys: None
        # the GPU's scheduling: pipelined steps, prompt chunks of their own, the
        # prompt's last token a decode row
        backend.pipelined_rows = backend.prompt_last_in_batch = True
        backend.batch_prefill_chunk = 256
        backend.batch_prompt_tokens = self.prompt_step     # --cuda-option prompt_step


class Pending:
    def __init__(self, n: int, ready_at: float, token: int) -> None:
        self.n, self.ready_at, self.token = n, ready_at, token

    def result(self) -> list:
        from orcd.sampling import Sampled

        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return [Sampled(self.token)] * self.n


def serve_simulated(args, model: str):
    """A running worker (orcd.devkit.server_testing) on ``model`` with the simulated GPU."""
    from orcd.devkit.server_testing import running_server
    from orcd.server.app import load_for_serving
    from orcd.server.state import ServerConfig

    def loader(cfg, progress):
        lm = load_for_serving(cfg, progress)
        SimulatedGpu(args.step_ms / 1e3, args.prompt_ms / 1e3, lm.tokenizer.encode("a")[-1],
                     args.prompt_step).install(lm.backend)
        return lm
    cfg = ServerConfig(model_path=model, model_ref="host-load", worker_id=str(uuid.uuid4()), device="cpu",
                       ctx_size=args.ctx_size, max_batch=max(args.levels), queue_size=max(args.levels),
                       inference_timeout_s=3600)
    return running_server(cfg, loader=loader)


def drive(url: str, args) -> dict[int, dict]:
    """bench/load.py's clients in a process of their own: {clients: Row fields}."""
    code = (f"import sys, json, dataclasses; sys.path.insert(0, {str(BENCH)!r}); import load\n"
            f"prompts = [p * {args.prompt_repeat} for p in load.PROMPTS]\n"
            f"rows = load.measure({url!r}, {args.levels!r}, {args.rounds}, {args.max_tokens}, prompts)\n"
            f"print(json.dumps({{c: dataclasses.asdict(r) for c, r in rows.items()}}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the clients failed:\n{done.stderr[-2000:]}")
    sys.stderr.write(done.stderr)
    return {int(c): row for c, row in json.loads(done.stdout.splitlines()[-1]).items()}


def table(rows: dict[int, dict], step_ms: float) -> str:
    lines = ["| clients | tok/s | ITL p50 ms | ITL p99 ms | TTFT p50 ms | simulated ceiling tok/s | of the ceiling |",
             "|---|---|---|---|---|---|---|"]
    for c, r in rows.items():
        ceiling = c * 1000.0 / step_ms
        lines.append(f"| {c} | {r['tok_s']:.1f} | {r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | "
                     f"{r['ttft_p50_ms']:.1f} | {ceiling:.0f} | {r['tok_s'] / ceiling:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a GGUF for the tokenizer and shapes (default: orcd synth qwen2-tiny)")
    ap.add_argument("--step-ms", type=float, default=2.5, help="device time of a batched step")
    ap.add_argument("--prompt-ms", type=float, default=1.5, help="device time of one prompt chunk")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx-size", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=600, help="seconds the clients may take")
    ap.add_argument("--prompt-repeat", type=int, default=1, help="each of load.py's prompts this many times")
    ap.add_argument("--prompt-step", type=int, default=256,
                    help="prompt tokens a step may run in all (the GPU's --cuda-option prompt_step)")
    args = ap.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if min(args.levels) < 1 or args.step_ms <= 0 or args.prompt_ms < 0 or args.rounds < 1 or args.max_tokens < 1 \
            or args.prompt_repeat < 1 or args.prompt_step < 1:
        ap.error("--concurrency, --step-ms, --rounds, --max-tokens, --prompt-repeat and --prompt-step "
                 "must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "qwen2-tiny.gguf")
            subprocess.run([sys.executable, "-m", "orcd.cli", "synth", "qwen2-tiny", "-o", model],
                           check=True, capture_output=True)
        with serve_simulated(args, model) as srv:
            rows = drive(srv.url, args)
    print(f"simulated GPU: {args.step_ms} ms a batched step, {args.prompt_ms} ms a prompt chunk, "
          f"{args.prompt_step} prompt tokens a step; {args.max_tokens} tokens x {args.rounds} requests per "
          f"client, prompts x{args.prompt_repeat}")
    print(table(rows, args.step_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
