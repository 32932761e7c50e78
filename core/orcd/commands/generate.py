"""``orcd generate``: one generation, streamed to the terminal.

The prompt is raw text (special-token text is parsed as the special token),
or with ``--chat`` a user message rendered through the model's chat template
exactly as the server's /v1/chat/completions renders it. A sampling flag left
unset takes the model file's recommendation, else llama-server's default, as
the server does.
"""

from __future__ import annotations

import sys
import time

from orcd.commands._options import add_device_argument, device_from_args
from orcd.sampling import LLAMA_SERVER_DEFAULTS as D

UNSET = "(default: the model file's general.sampling.{key}, else {value})"

NAME = "generate"
HELP = "generate text from a prompt and stream it to the terminal"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="PATH|NAME", help="GGUF file or pulled model name")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt as a user message and apply the model's chat template")
    p.add_argument("--system", help="system message (with --chat; default: none)")
    add_device_argument(p)
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="0 = greedy " + UNSET.format(key="temp", value=D["temperature"]))
    p.add_argument("--top-k", type=int, metavar="K",
                   help="0 = off " + UNSET.format(key="top_k", value=D["top_k"]))
    p.add_argument("--top-p", type=float, metavar="P",
                   help="1 = off " + UNSET.format(key="top_p", value=D["top_p"]))
    p.add_argument("--min-p", type=float, metavar="P",
                   help="0 = off " + UNSET.format(key="min_p", value=D["min_p"]))
    p.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="1 = off " + UNSET.format(key="penalty_repeat",
                                                  value=D["repetition_penalty"]))
    p.add_argument("--seed", type=int, help="sampling seed (default: random, printed)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable; default: none)")
    p.add_argument("--ctx-size", type=int, metavar="N", help="context length (default: prompt + max tokens)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json to use instead of the GGUF vocabulary (default: the GGUF's)")
    p.add_argument("--quiet", action="store_true", help="no statistics on stderr")


def _within(value, lo, hi) -> bool:
    return value is None or lo <= value <= hi


def check_args(args) -> None:
    from orcd.errors import InvalidRequest
    from orcd.sampling import MIN_REPETITION_PENALTY
    checks = [(args.max_tokens >= 1, "--max-tokens must be at least 1"),
              (_within(args.temperature, 0.0, 2.0), "--temperature must be within 0-2"),
              (_within(args.top_k, 0, float("inf")), "--top-k must be 0 or more"),
              (_within(args.top_p, 0.0, 1.0), "--top-p must be within 0-1"),
              (_within(args.min_p, 0.0, 1.0), "--min-p must be within 0-1"),
              (_within(args.repetition_penalty, MIN_REPETITION_PENALTY, 2.0),
               "--repetition-penalty must be within 0-2 and above 0"),
              (args.seed is None or 0 <= args.seed < 2**64, "--seed must be a uint64"),
              (args.ctx_size is None or args.ctx_size > 0, "--ctx-size must be positive")]
    for ok, message in checks:
        if not ok:
            raise InvalidRequest(message)


def prompt_ids(lm, args) -> list[int]:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.chat:
        return lm.tokenizer.encode(text, add_special=True, parse_special=True)
    from orcd.chat import ChatTemplate
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": text})
    return ChatTemplate.for_tokenizer(lm.tokenizer).prompt_ids(lm.tokenizer, messages)


def run(args) -> int:
    from orcd.engine import Engine, GenerateRequest
    from orcd.errors import InvalidRequest
    from orcd.sampling import SamplingParams, request_defaults
    check_args(args)
    lm = _load(args, device_from_args(args, "orcd generate"))
    try:
        ids = prompt_ids(lm, args)
        if not ids:
            raise InvalidRequest("the prompt is empty", field="prompt")
        if args.ctx_size is None:   # a KV cache just big enough for this run
            lm.n_ctx = min(lm.n_ctx, len(ids) + args.max_tokens)
        # no --seed: the engine draws one and reports it (result.seed), printed below
        sampling = SamplingParams.resolve(
            request_defaults(lm.file.metadata), seed=args.seed, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty)
        req = GenerateRequest(ids, args.max_tokens, sampling, args.stop)
        out = sys.stdout
        result = Engine(lm).generate(req, lambda ev: (out.write(ev.text), out.flush()))
        out.write("\n")
        out.flush()
    finally:
        lm.close()
    if not args.quiet:
        rate = (result.tokens_out - 1) / (result.decode_time_ms / 1000) if result.decode_time_ms else 0
        print(f"[{result.prompt_tokens} prompt tokens, {result.tokens_out} generated, "
              f"stop: {result.stop_reason}, seed {result.seed}, "
              f"first token {result.ttft_ms:.0f} ms, {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def _load(args, device: str):
    from orcd.load import load_model
    from orcd.plugins import PluginHost
    from orcd.pull import resolve_model
    path = resolve_model(args.model)
    t0 = time.monotonic()
    if not args.quiet:
        print(f"[loading {path.name} on {device}…]", file=sys.stderr, flush=True)
    lm = load_model(path, host=PluginHost(), device=device, n_ctx=args.ctx_size,
                    tokenizer_path=args.tokenizer)
    if not args.quiet:
        print(f"[loaded in {time.monotonic() - t0:.1f} s: {lm.arch.name} {lm.quant_kind}, "
              f"context {lm.n_ctx}]", file=sys.stderr, flush=True)
    return lm
