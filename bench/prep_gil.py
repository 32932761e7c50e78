"""What a large chat request's preparation holds the GIL for, stage by stage.

    python bench/prep_gil.py [--chars 250000] [--ctx-size 32768]

The worker prepares requests on prep threads (server/state.py ``off_loop``);
whatever a stage does in one C call while holding the GIL, the event loop
waits for. Each stage of a chat request (the path of ``_prepare_chat``) runs
on this thread while a ticker thread sleeps 0.5 ms in a loop; the ticker's
longest lateness is the longest the stage kept it from running. The first
row (a sleep, which holds nothing) is the machine's own noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_flood import tiny_model  # noqa: E402


def longest_wait(fn, reps: int = 5) -> tuple[float, float, object]:
    """(median wall s, median longest ticker lateness s, fn's result) over ``reps`` runs."""
    walls, waits, out = [], [], None
    for _ in range(reps):
        stop, late = threading.Event(), [0.0]

        def ticker():
            while not stop.is_set():
                t0 = time.perf_counter()
                time.sleep(0.0005)
                late[0] = max(late[0], time.perf_counter() - t0 - 0.0005)

        t = threading.Thread(target=ticker)
        t.start()
        time.sleep(0.01)
        try:
            t0 = time.perf_counter()
            out = fn()
            walls.append(time.perf_counter() - t0)
            time.sleep(0.005)
        finally:
            stop.set()
            t.join()
        waits.append(late[0])
    return statistics.median(walls), statistics.median(waits), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=250_000, help="message characters")
    p.add_argument("--ctx-size", type=int, default=32768)
    a = p.parse_args()

    from orcd.chat import ChatTemplate, normalize_messages
    from orcd.load import load_model
    from orcd.plugins import PluginHost
    from orcd.server.schemas import ChatCompletionRequest, parse

    with tempfile.TemporaryDirectory() as d:
        lm = load_model(str(tiny_model(Path(d))), host=PluginHost(), device="cpu",
                        n_ctx=a.ctx_size)
    tok = lm.tokenizer
    tmpl = ChatTemplate.for_tokenizer(tok)
    guard = tmpl.guard(tok)
    body = json.dumps({"messages": [{"role": "user", "content": "hello world " * (a.chars // 12)}],
                       "max_tokens": 4}).encode()
    out: dict = {}   # each stage's result, by key, for the next stage
    stages = [
        ("noise", "sleep 20 ms (holds nothing)", lambda: time.sleep(0.02)),
        ("req", "parse (JSON + pydantic)", lambda: parse(ChatCompletionRequest, body)),
        ("messages", "normalize_messages", lambda: normalize_messages(out["req"].messages)),
        ("masked", "SpecialTextGuard.mask", lambda: guard.mask(out["messages"])),
        ("text", "render", lambda: tmpl.render(out["masked"][0])),
        ("ids", "tokenize (guard.encode)", lambda: guard.encode(out["text"], out["masked"][1])),
    ]
    print(f"chat body {len(body) / 1e6:.2f} MB, tiny qwen2 tokenizer")
    for key, name, fn in stages:
        wall, wait, out[key] = longest_wait(fn)
        print(f"  {name:28s} wall {wall * 1e3:7.2f} ms   longest ticker wait {wait * 1e3:6.2f} ms")
    print(f"  ({len(out['ids'])} tokens)")
    lm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
