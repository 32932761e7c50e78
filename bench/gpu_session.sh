#!/usr/bin/env bash
# One measurement session on a lent GPU machine, in two calls of under 10 minutes
# that follow each other while the machine is warm (docs/gpu-testing.md):
#
#   bash bench/gpu_session.sh one   # install; start the llama.cpp build (niced) and the
#                                   # synthetic models in the background; the GPU kernel
#                                   # tests; orcd's rows of the small models
#   bash bench/gpu_session.sh two   # orcd's GPT-OSS row, then llama.cpp's four rows: the table
#   bash bench/gpu_session.sh load [NAME=VALUE...]  # (one call on its own) the batching tests,
#                                   # bench/load.py of orcd as it is, then of orcd with those
#                                   # --cuda-options (e.g. fold_prompts=on) against
#                                   # llama-server -np 16, qwen2-0.5b, --max-batch 16, then
#                                   # long prompts (--prompt-repeat 8) at 1 and 16 clients
#   bash bench/gpu_session.sh tree BASE [MODELS [NAME=VALUE...]]  # (one call on its own) this
#                                   # tree against another checkout BASE (carried, e.g. a `git
#                                   # worktree add .carry/base REV`) on the same machine: the GPU
#                                   # tests of the kernels and the batch, then for MODELS (default
#                                   # qwen2-0.5b) decode_profile --bench of both trees, and
#                                   # batch_decode (BASE with its own bench scripts: a checkout of
#                                   # another layout still runs); with NAME=VALUE --cuda-options, this tree a
#                                   # third time with them (e.g. pdl=on self_quantize=on),
#                                   # then this tree's decode timeline (decode_timeline.py)
#                                   # and its upload of MXFP4 rows, planes made by
#                                   # the host and by the card; SKIP_TESTS=1 leaves the GPU tests out
#   bash bench/gpu_session.sh opts MODELS NAME=VALUE...  # (one call on its own) decode_profile
#                                   # --bench of each of MODELS (comma-separated) with the
#                                   # defaults, then with each NAME=VALUE alone (one option a
#                                   # run: two options timed together cannot be told apart)
#   bash bench/gpu_session.sh startup [BASE]   # (one call on its own) bench/startup.py: four
#                                   # warm starts of `orcd serve` on qwen2-0.5b after a cold one,
#                                   # alternating with BASE's core (a checkout, e.g. .carry/base)
#   bash bench/gpu_session.sh ab MODELS NAME=VALUE...  # (after one) the prefill/tc/grouped
#                                   # GPU tests, then orcd's rows of MODELS ('' for the small
#                                   # ones) as it is and with those --cuda-options, e.g.
#                                   # ab gpt-oss-20b moe_tc=off
#
# carrying .whl, bench/peer and (if built) core/orcd/backends/cuda/aot. Every step is bounded by
# `timeout`, waits poll files (never a process list that can match itself), and logs
# go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WORK=${ORCD_BENCH_DIR:-/tmp/orcd-bench}
OUT=${OUT:-$WORK/out}
SMALL=qwen2-0.5b,phi3-mini,phi3-mini-q4_0
mkdir -p "$WORK" "$OUT"
export PYTHONPATH=${ORCD_GPU_SITE:-/tmp/site}${PYTHONPATH:+:$PYTHONPATH}

synth_all() {   # each model written under another name first: compare.py must not see half a file
  for preset in qwen2-0.5b phi3-mini phi3-mini-q4_0 gpt-oss-20b; do
    [ -f "$WORK/$preset.gguf" ] || { python3 -m orcd.cli synth "$preset" -o "$WORK/$preset.part.gguf" \
        && mv "$WORK/$preset.part.gguf" "$WORK/$preset.gguf"; }
  done
  touch "$WORK/synth.done"
}

wait_for() {   # wait_for FILE SECONDS
  for _ in $(seq 1 "$2"); do [ -f "$1" ] && return 0; sleep 1; done
  echo "timed out waiting for $1"; return 1
}

case "${1:-}" in
one)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 120 bash scripts/gpu-test.sh --collect-only -q >/dev/null || exit 1
  nice -n 19 python3 bench/compare.py build-peer
  (setsid bash -c "$(declare -f synth_all); WORK=$WORK synth_all" > "$OUT/synth.log" 2>&1 &)
  timeout 240 python3 -m pytest -q -m cuda -p no:randomly tests/cuda/test_matmul.py tests/cuda/test_int8.py \
      tests/cuda/test_fused.py tests/cuda/test_moe.py tests/cuda/test_ops_cuda.py tests/cuda/test_backend.py \
      tests/cuda/test_sampling_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -8
  wait_for "$WORK/phi3-mini-q4_0.gguf" 180 || exit 1
  timeout 300 python3 bench/compare.py run --engines orcd --models $SMALL --out "$OUT" 2>&1 \
      | tee "$OUT/orcd-small.log" | grep -v '^{' | tail -20
  ;;
two)
  wait_for "$WORK/synth.done" 240 || exit 1
  timeout 200 python3 bench/compare.py run --engines orcd --models gpt-oss-20b --out "$OUT" 2>&1 \
      | tee "$OUT/orcd-gptoss.log" | grep -v '^{' | tail -6
  timeout 330 python3 bench/compare.py run --engines peer --out "$OUT" 2>&1 | tee "$OUT/peer.log" | tail -32
  cp "$WORK/rows.json" "$OUT/" 2>/dev/null
  ;;
load)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nice -n 19 python3 bench/compare.py build-peer
  [ -f "$WORK/qwen2-0.5b.gguf" ] || python3 -m orcd.cli synth qwen2-0.5b -o "$WORK/qwen2-0.5b.gguf"
  timeout 200 python3 -m pytest -q -m cuda -p no:randomly tests/engine/test_scheduler.py tests/server/test_server_batch.py \
      tests/engine/test_batch_forward.py tests/cuda/test_sampling_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -4
  opts=(); for o in "${@:2}"; do opts+=(--orcd-option "$o"); done
  timeout 150 python3 bench/load.py --model "$WORK/qwen2-0.5b.gguf" 2>&1 | tee "$OUT/load-orcd.log" | tail -8
  for _ in $(seq 1 240); do grep -q BUILD_OK "$WORK/peer-build.log" 2>/dev/null && break; sleep 1; done
  timeout 200 python3 bench/load.py --model "$WORK/qwen2-0.5b.gguf" "${opts[@]}" \
      --peer "$WORK/llama.cpp/build/bin/llama-server" 2>&1 | tee "$OUT/load.log" | tail -8
  # long prompts (~250-1,800 tokens): TTFT alone and under a burst of 16
  timeout 120 python3 bench/load.py --model "$WORK/qwen2-0.5b.gguf" "${opts[@]}" --prompt-repeat 8 \
      --concurrency 1,16 --rounds 1 --peer "$WORK/llama.cpp/build/bin/llama-server" 2>&1 \
      | tee "$OUT/load-long.log" | tail -5
  ;;
tree)
  base=$(cd "${2:?usage: bench/gpu_session.sh tree BASE [MODELS [NAME=VALUE...]]}" && pwd)
  opts=(); for o in "${@:4}"; do opts+=(--cuda-option "$o"); done
  runs="base this"; [ ${#opts[@]} -gt 0 ] && runs="base this opts"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 120 bash scripts/gpu-test.sh --collect-only -q >/dev/null || exit 1
  if [ -z "${SKIP_TESTS:-}" ]; then   # SKIP_TESTS=1: the timings only (a second call on a warm machine)
    timeout 240 python3 -m pytest -q -m cuda -p no:randomly tests/cuda/test_ops_cuda.py tests/cuda/test_int8.py tests/cuda/test_moe.py \
        tests/cuda/test_fused.py tests/cuda/test_mma.py tests/cuda/test_rows_layer.py tests/cuda/test_runtime.py \
        tests/engine/test_batch_forward.py tests/engine/test_scheduler.py 2>&1 \
        | tee "$OUT/tests.log" | tail -3
    timeout 150 python3 -m pytest -q -m cuda -p no:randomly tests/cuda/test_backend.py -k "early or graph" 2>&1 \
        | tee "$OUT/tests-backend.log" | tail -2
  fi
  for m in ${3:-qwen2-0.5b}; do
    [ -f "$WORK/$m.gguf" ] || python3 -m orcd.cli synth "$m" -o "$WORK/$m.gguf"
    for t in $runs; do   # the same card; the base with its own core and its own bench scripts
      p=$PYTHONPATH; b=bench; [ $t = base ] && p=$base/core:$PYTHONPATH && b=$base/bench
      PYTHONPATH=$p timeout 120 python3 $b/decode_profile.py "$WORK/$m.gguf" --positions 100,600,1000 \
          --bench $([ $t = opts ] && echo "${opts[@]}") > "$OUT/profile-$m-$t.log" 2>&1
      echo "$m ($t): $(grep -h 'graph step' "$OUT/profile-$m-$t.log")"; grep -h "pos \|tok/s" "$OUT/profile-$m-$t.log"
    done
  done
  for t in $runs; do
    p=$PYTHONPATH; b=bench; [ $t = base ] && p=$base/core:$PYTHONPATH && b=$base/bench
    PYTHONPATH=$p timeout 90 python3 $b/batch_decode.py --model "$WORK/qwen2-0.5b.gguf" \
        $([ $t = opts ] && echo "${opts[@]}") 2>&1 | tee "$OUT/batch-$t.log" | tail -6
  done
  # this tree's pipelined decode as a timeline (the GPU's wait between steps)
  timeout 90 python3 bench/decode_timeline.py "$WORK/qwen2-0.5b.gguf" 2>&1 | tee "$OUT/timeline.log" | tail -2
  # the planar layouts, made by the copy threads (numpy) and by the card (ops/layout.cu)
  (cd bench && timeout 90 python3 cuda_upload.py --format MXFP4 --mib 1024 --chunks 1,4 --threads 4 \
      --repeat 2 2>&1 | tee "$OUT/upload.log" | tail -5)
  ;;
opts)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 120 bash scripts/gpu-test.sh --collect-only -q >/dev/null || exit 1
  for m in ${2//,/ }; do
    [ -f "$WORK/$m.gguf" ] || python3 -m orcd.cli synth "$m" -o "$WORK/$m.gguf"
    for o in "" "${@:3}"; do
      timeout 120 python3 bench/decode_profile.py "$WORK/$m.gguf" --positions 600 --bench \
          ${o:+--cuda-option "$o"} > "$OUT/opts-$m-${o:-defaults}.log" 2>&1
      echo "$m ${o:-defaults}: $(grep -h 'graph step' "$OUT/opts-$m-${o:-defaults}.log" | sed 's/.*: //')" \
           "$(grep -h 'engine' "$OUT/opts-$m-${o:-defaults}.log")"
    done
  done
  ;;
startup)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 120 bash scripts/gpu-test.sh --collect-only -q >/dev/null || exit 1
  [ -f "$WORK/qwen2-0.5b.gguf" ] || python3 -m orcd.cli synth qwen2-0.5b -o "$WORK/qwen2-0.5b.gguf"
  base=(); [ -n "${2:-}" ] && base=(--base "$(cd "$2" && pwd)/core")
  timeout 240 python3 bench/startup.py --model "$WORK/qwen2-0.5b.gguf" --runs 4 "${base[@]}" \
      2> "$OUT/startup.log" | tee "$OUT/startup.md"
  ;;
ab)
  models=${2:-$SMALL}
  opts=(); for o in "${@:3}"; do opts+=(--orcd-option "$o"); done
  timeout 200 python3 -m pytest -q -m cuda -p no:randomly tests/cuda/test_backend.py tests/cuda/test_moe.py \
      tests/cuda/test_matmul.py -k "prefill or tc or grouped" 2>&1 | tee "$OUT/tests-ab.log" | tail -4
  for run in a b; do   # a: the defaults, b: with the options
    timeout 180 python3 bench/compare.py run --engines orcd --models "$models" --out "$WORK/ab-$run" \
        $([ $run = b ] && echo "${opts[@]}") 2>&1 | tee "$OUT/orcd-ab-$run.log" | grep -v '^{' | tail -16
    cp "$WORK/ab-$run/results.md" "$OUT/ab-$run.md" 2>/dev/null
  done
  ;;
*)
  echo "usage: bench/gpu_session.sh one|two|load|tree|opts|startup|ab"; exit 2 ;;
esac
