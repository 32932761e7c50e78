#!/usr/bin/env bash
# Everything the GPU issues ask to show, on the GPU machine, in one go
# (docs/gpu-testing.md):
#   1. the real Qwen file, if its pieces were sent to $QWEN_PIECES (default
#      /tmp/q/p00 … p08, made with `split -b 58m -d -a 2`), is assembled and
#      checked against its sha256;
#   2. the llama.cpp peer build starts, detached (bench/compare.py build-peer),
#      when bench/peer/llama.cpp.tar.gz travelled;
#   3. the full-size synthetic models are made with orcd synth;
#   4. every cuda test runs, the real-Qwen and full-size ones included.
# Arguments go to pytest in place of the default tests/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
PIECES=${QWEN_PIECES:-/tmp/q}
WORK=${ORCD_BENCH_DIR:-/tmp/orcd-bench}
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
mkdir -p "$WORK"

if compgen -G "$PIECES/p*" >/dev/null && [ ! -f "$WORK/qwen.gguf" ]; then
  cat "$PIECES"/p* > "$WORK/qwen.gguf"
  echo "$SHA  $WORK/qwen.gguf" | sha256sum -c - || { rm -f "$WORK/qwen.gguf"; exit 1; }
fi
[ -f "$WORK/qwen.gguf" ] && export ORCD_REAL_QWEN="$WORK/qwen.gguf"

[ -f bench/peer/llama.cpp.tar.gz ] && python3 bench/compare.py build-peer

if [ -f .carry/o200k.json.gz ]; then
  mkdir -p "$WORK/o200k" && gunzip -c .carry/o200k.json.gz > "$WORK/o200k/tokenizer.json"
  export ORCD_O200K_JSON="$WORK/o200k/tokenizer.json"
fi

# install (wheels the machine lacks, the project, its plugins) without running tests
ORCD_GPU_SITE=${ORCD_GPU_SITE:-/tmp/site} bash scripts/gpu-test.sh --collect-only -q >/dev/null
export PYTHONPATH="${ORCD_GPU_SITE:-/tmp/site}${PYTHONPATH:+:$PYTHONPATH}"
for preset in ${FULL_SIZE_PRESETS:-qwen2-0.5b phi3-mini phi3-mini-q4_0 gpt-oss-20b}; do
  [ -f "$WORK/$preset.gguf" ] || python3 -m orcd.cli synth "$preset" -o "$WORK/$preset.gguf"
done
export ORCD_FULL_SIZE_DIR="$WORK"
exec python3 -m pytest -q -m cuda "${@:-tests/cuda}"
