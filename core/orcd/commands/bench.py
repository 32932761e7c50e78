"""``orcd bench``: the orcd side of the benchmark for one model (bench/ runs
both engines in one go and prints ratios against llama.cpp)."""

from __future__ import annotations

import json

from orcd.commands._options import add_device_argument, device_from_args

NAME = "bench"
HELP = "measure load time, prefill and decode tokens/s and time to first token"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="PATH|NAME", help="GGUF file or pulled model name")
    add_device_argument(p)
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prompt length")
    p.add_argument("--gen-tokens", type=int, default=128, metavar="N", help="tokens generated per run")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="runs; the median is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from tqdm import tqdm

    from orcd.devkit.bench import run_bench
    from orcd.errors import InvalidRequest
    from orcd.plugins import PluginHost
    from orcd.pull import resolve_model

    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repeat < 1:
        raise InvalidRequest("--prompt-tokens >= 1, --gen-tokens >= 2 and --repeat >= 1 are required")
    device = device_from_args(args, "orcd bench")
    path = resolve_model(args.model)
    with tqdm(total=args.repeat + 1, desc="bench", disable=args.json) as bar:
        def step(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(0 if label == "warm-up" else 1)
        res = run_bench(path, host=PluginHost(), device=device, prompt_tokens=args.prompt_tokens,
                        gen_tokens=args.gen_tokens, repeat=args.repeat, progress=step)
        bar.update(1)
    if args.json:
        print(json.dumps(res.as_dict()))
        return 0
    print(f"model     {res.model}\ndevice    {res.device}")
    print(f"load      {res.load_s:.2f} s")
    print(f"prefill   {res.prefill_tok_s:,.1f} tok/s ({res.prompt_tokens} tokens)")
    print(f"decode    {res.decode_tok_s:,.1f} tok/s ({res.gen_tokens} tokens)")
    print(f"ttft      {res.ttft_ms:,.1f} ms")
    print(f"vram      {res.vram_bytes / 2**20:,.1f} MiB")
    return 0
