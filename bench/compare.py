"""orcd against llama.cpp (CUDA) on the same GPU, same GGUF shapes, in one run.

On the GPU machine (after scripts/gpu-test.sh has installed the project):

    python3 bench/compare.py build-peer      # start the llama.cpp build, detached (~5 min)
    python3 bench/compare.py run [--models qwen2-0.5b,phi3-mini] [--engines orcd,peer] [--out DIR]

``run`` waits for the peer build, synthesizes the models with orcd synth,
measures the card's copy bandwidth, then for each model both engines, batch 1:
decode tokens/s (128 after a 512-token prompt), prefill tokens/s (512),
time to first token (128-token prompt), load time and peak VRAM. It prints one
table (orcd, llama.cpp, orcd/llama.cpp, fraction of the bandwidth floor) and
writes it as markdown to DIR/results.md for bench/RESULTS.md. Rows are kept in
$ORCD_BENCH_DIR/rows.json, so one run may be split over calls (``--engines orcd``,
then ``--engines peer``) on the same card; a different card starts afresh.

The peer source is the llama.cpp tree vendored in the llama-cpp-python sdist,
pruned to bench/peer/llama.cpp.tar.gz (not in git; see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("ORCD_BENCH_DIR", "/tmp/orcd-bench"))
PEER_SRC = ROOT / "bench" / "peer" / "llama.cpp.tar.gz"
PEER_BIN = WORK / "llama.cpp" / "build" / "bin" / "llama-bench"
PEER_SERVER = WORK / "llama.cpp" / "build" / "bin" / "llama-server"   # bench/load.py's --peer
BUILD_LOG = WORK / "peer-build.log"
ROWS = WORK / "rows.json"        # measurements so far in this run, by model
MODELS = ("qwen2-0.5b", "phi3-mini", "phi3-mini-q4_0", "gpt-oss-20b")
CMAKE_FLAGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON",
               "-DCMAKE_CUDA_ARCHITECTURES=90", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
               # llama-server without its web UI: no npm, no download (the GPU machine is offline)
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DGGML_NATIVE=OFF", "-DGGML_CCACHE=OFF"]


def build_peer() -> None:
    """Unpack and build llama-bench and llama-server in a detached session
    (outlives this call)."""
    WORK.mkdir(parents=True, exist_ok=True)
    if PEER_BIN.exists() and PEER_SERVER.exists():
        print(f"peer already built: {PEER_BIN}")
        return
    marker = WORK / "peer-build.started"
    if marker.exists():  # a second build in the same tree would race the first
        print(f"peer build already under way; log: {BUILD_LOG}")
        return
    marker.touch()
    script = (f"set -e; cd {WORK}; tar xzf {PEER_SRC}; cd llama.cpp; "
              f"cmake -B build {' '.join(CMAKE_FLAGS)} >/dev/null; "
              f"ninja -C build -j{os.cpu_count()} llama-bench llama-server && echo BUILD_OK || echo BUILD_FAILED")
    with open(BUILD_LOG, "w") as log:
        subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    print(f"peer build started; log: {BUILD_LOG}")


def wait_for_peer(timeout_s: float = 420) -> bool:
    """Until the build has made both binaries (llama-bench is linked before
    llama-server, so its file alone does not say the build is over)."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if PEER_BIN.exists() and PEER_SERVER.exists():
            return True
        tail = BUILD_LOG.read_text()[-4000:] if BUILD_LOG.exists() else ""
        if "FAILED:" in tail or "BUILD_FAILED" in tail:   # ninja's and the script's failure marks
            print(tail)
            return False
        time.sleep(5)
    return PEER_BIN.exists() and PEER_SERVER.exists()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (torch, events)."""
    import torch
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def bytes_per_token(path: Path, host) -> int:
    """Weight bytes one decoded token reads: all but the token embedding; of
    expert tensors only n_used / n_expert."""
    from orcd.gguf_file import ModelFile
    mf = ModelFile.open(path)
    arch = mf.arch
    used = mf.metadata.get(f"{arch}.expert_used_count")
    total = mf.metadata.get(f"{arch}.expert_count")
    out = 0
    for name, t in mf.tensors.items():
        if name == "token_embd.weight":
            continue
        frac = used / total if (used and "_exps." in name) else 1
        out += int(t.n_bytes * frac)
    return out


class VramSampler:
    """Peak device memory used while a peer command runs (nvidia-smi)."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self.base = self._read()
        self._t = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _read() -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                             capture_output=True, text=True).stdout.strip()
        return int(out.splitlines()[0]) << 20 if out else 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read() - self.base)
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def peer_bench(path: Path) -> dict:
    def run(args: list[str]) -> list[dict]:
        cmd = [str(PEER_BIN), "-m", str(path), "-ngl", "99", "-fa", "1", "-o", "json", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode:
            raise RuntimeError(f"llama-bench failed: {res.stderr[-2000:]}")
        return json.loads(res.stdout)

    def median_ts(rec: dict) -> float:
        return statistics.median(rec.get("samples_ts") or [rec["avg_ts"]])

    t0 = time.perf_counter()
    with VramSampler() as vram:
        run(["-p", "0", "-n", "1", "-r", "1"])
    load_s = time.perf_counter() - t0   # process start + load + one token
    recs = run(["-p", "512", "-n", "128", "-r", "10"])
    pp = next(r for r in recs if r["n_prompt"] == 512 and r["n_gen"] == 0)
    tg = next(r for r in recs if r["n_gen"] == 128)
    ttft = run(["-p", "128", "-n", "0", "-r", "10"])[0]
    return {"decode_tok_s": median_ts(tg), "prefill_tok_s": median_ts(pp),
            "ttft_ms": 128 / median_ts(ttft) * 1000, "load_s": load_s, "vram_bytes": vram.peak}


def orcd_bench(path: Path, host, **options) -> dict:
    from orcd.devkit.bench import run_bench
    big = run_bench(path, host=host, device="cuda:0", prompt_tokens=512, gen_tokens=128, repeat=3, **options)
    small = run_bench(path, host=host, device="cuda:0", prompt_tokens=128, gen_tokens=2, repeat=3, **options)
    return {"decode_tok_s": big.decode_tok_s, "prefill_tok_s": big.prefill_tok_s,
            "ttft_ms": small.ttft_ms, "load_s": big.load_s, "vram_bytes": big.vram_bytes,
            "phases": big.phases}


METRICS = (("decode_tok_s", "decode tok/s (tg128 after 512)", True),
           ("prefill_tok_s", "prefill tok/s (pp512)", True),
           ("ttft_ms", "TTFT ms (128-token prompt)", False),
           ("load_s", "load s", False),
           ("vram_bytes", "peak VRAM MiB", False))


def table(rows: list[dict], card: str, bw: float, options: dict) -> str:
    how = f", orcd with {options}" if options else ""
    lines = [f"### {time.strftime('%Y-%m-%d')} — {card}, copy bandwidth {bw / 1e9:,.0f} GB/s{how}",
             "", "| model | metric | orcd | llama.cpp | orcd/llama.cpp | floor reached (orcd) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for key, label, _ in METRICS:
            o, p = r["orcd"].get(key), r["peer"].get(key)
            scale = 1 / 2**20 if key == "vram_bytes" else 1
            fmt = (lambda v: "n/a" if v is None else f"{v * scale:,.1f}")
            ratio = f"{o / p:.2f}" if o and p else "n/a"
            floor = ""
            if key == "decode_tok_s" and o:
                floor = f"{o / (bw / r['bytes_per_token']):.0%} of {bw / r['bytes_per_token']:,.0f}"
            lines.append(f"| {r['model']} | {label} | {fmt(o)} | {fmt(p)} | {ratio} | {floor} |")
    return "\n".join(lines) + "\n"


def load_rows(card: str) -> dict:
    """Rows measured earlier in this run on this card (a run may span several
    calls of the GPU machine: orcd in one, llama.cpp in the next)."""
    saved = json.loads(ROWS.read_text()) if ROWS.exists() else {}
    return saved.get("rows", {}) if saved.get("card") == card else {}


def save_rows(card: str, bw: float, rows: dict) -> None:
    ROWS.write_text(json.dumps({"card": card, "bandwidth": bw, "rows": rows}))


def run_all(models: list[str], engines: list[str], out: Path, options: dict) -> None:
    import torch

    from orcd.devkit.synth import synthesize
    from orcd.plugins import PluginHost

    host = PluginHost()
    card = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    print(f"{card}: copy bandwidth {bw / 1e9:,.0f} GB/s", flush=True)
    rows = load_rows(card)
    for name in models:
        path = WORK / f"{name}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            synthesize(host, name, path, seed=0)
            print(f"synthesized {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        rows.setdefault(name, {"model": name, "bytes_per_token": bytes_per_token(path, host),
                               "orcd": {}, "peer": {}})
    if "orcd" in engines:  # orcd first: the peer may still be building meanwhile
        for name in models:
            try:
                rows[name]["orcd"] = orcd_bench(WORK / f"{name}.gguf", host, **options)
            except Exception as e:  # one failing engine must not hide the other's numbers
                print(f"orcd failed on {name}: {type(e).__name__}: {e}", flush=True)
            save_rows(card, bw, rows)
            print(json.dumps(rows[name]), flush=True)
    if "peer" in engines and wait_for_peer():
        for name in models:
            try:
                rows[name]["peer"] = peer_bench(WORK / f"{name}.gguf")
            except Exception as e:
                print(f"llama.cpp failed on {name}: {e}", flush=True)
            save_rows(card, bw, rows)
            print(json.dumps(rows[name]), flush=True)
    md = table([rows[m] for m in models], card, bw, options)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"card": card, "bandwidth": bw, "rows": rows}))
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["build-peer", "run"])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--engines", default="orcd,peer",
                    help="measure these now; rows measured earlier on this card are kept")
    ap.add_argument("--orcd-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an orcd --cuda-option for this run (repeatable), e.g. prefill_graphs=off, "
                         "int8=all: the measured defaults against the others")
    ap.add_argument("--out", default=os.environ.get("OUT", str(WORK / "out")))
    args = ap.parse_args()
    from orcd.commands._options import cuda_options_of
    options = cuda_options_of(ap, args.orcd_option)
    if args.action == "build-peer":
        build_peer()
    else:
        run_all([m for m in args.models.split(",") if m], args.engines.split(","), Path(args.out), options)


if __name__ == "__main__":
    sys.exit(main())
