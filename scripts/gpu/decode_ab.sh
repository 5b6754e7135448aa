#!/usr/bin/env bash
# Decode-step A/B on the GPU machine (issue 7, benchmark 4): this tree's
# fused decode step against a baseline build and against its own switches,
# same card, same call, rounds alternating so that drift hits both.
#
# Here (no GPU):  scripts/gpu/decode_ab.sh build [BASELINE]
#   builds stages/examples/decode_bench.rs and the CUDA lib tests
#   (../shared/cuda/setup.sh, --features nccl, which implies cuda), stripped
#   and gzipped into gpu-bench/ (git-ignored); BASELINE, a decode_bench.gz
#   of an earlier build (keep one: `cp gpu-bench/decode_bench.gz
#   /var/tmp/base_decode_bench.gz` before building the change), becomes
#   gpu-bench/old_decode_bench.gz.
# On the GPU machine (the `device` tool, carry ["gpu-bench"]):
#   bash scripts/gpu/decode_ab.sh run
#   1. TESTS (default "decode_graph cuda"): each a filter of the lib tests
#      (at most TEST_LIMIT seconds, default 300, a filter);
#   2. ROUNDS (default 2) rounds of: the baseline (if carried), then this
#      build, then this build under each of VARIANTS ("name:VAR=value,..."
#      words, e.g. "split:PIPE_DECODE_LA_WHOLE=0", or
#      "greedy:DECODE_BENCH_GREEDY=1": batch 1 through decode_greedy, the
#      next step in flight; add PIPE_DECODE_CHAIN=0 for a step at a
#      time), at BATCHES (default
#      1,2), PROMPT (default 100) and STEPS (default 64);
#   3. PIPE_DECODE_LAY_TIMES=1 (the cluster kernels' phases) and
#      --profile (each kernel's GPU time, and `step_graph`: the whole
#      step's graph replayed back to back, against the ms a step that
#      includes the host's part) at batch 1 for this build, the profile
#      also under each of PROFILE_VARIANTS (as VARIANTS).
#   Results: $OUT/decode_ab.txt. Not a test: it asserts nothing about speed.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO/scripts/gpu/lib.sh"
D=$REPO/gpu-bench

build() {
  export REPO
  unset CARGO_TARGET_DIR
  cuda_build_env nccl
  export PIPE_FEATURES=nccl
  (cd "$REPO" && cargo build --release --features nccl -p pipe-stages --example decode_bench) || exit 1
  local bin
  bin=$(cuda_lib_test_bin) || exit 1
  mkdir -p "$D"
  rm -f "$D"/decode_bench "$D"/stages_test "$D"/*.gz
  strip -o "$D/decode_bench" "$CARGO_TARGET_DIR/release/examples/decode_bench" && gzip -9f "$D/decode_bench"
  strip -o "$D/stages_test" "$bin" && gzip -9f "$D/stages_test"
  if [ -n "${1:-}" ]; then cp "$1" "$D/old_decode_bench.gz"; fi
  ls -la "$D"
}

# One line a run: the label, then decode_bench's JSON reduced to a row.
row() {
  python3 -c 'import json, sys
for l in sys.stdin:
    if l.startswith("{") and "ms_per_step" in l:
        d = json.loads(l)
        print("%-12s batch %2d prompt %5d  %.4f ms  %6.0f tok/s" % (sys.argv[1], d["batch"], d["prompt"], d["ms_per_step"], d["tokens_per_s"]))' "$1"
}

run() {
  local out=${OUT:-/tmp/out}
  mkdir -p "$out"
  local log=$out/decode_ab.txt
  cd "$D" || exit 1
  for f in stages_test decode_bench old_decode_bench; do
    if [ -f "$f.gz" ] && [ ! -x "$f" ]; then gunzip -kf "$f.gz" && chmod +x "$f"; fi
  done
  cuda_runtime_libs
  nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv,noheader | tee -a "$log"
  # Each case's line as it ends (--nocapture, line-buffered), so that a
  # test that hangs shows its last case before TEST_LIMIT runs out.
  local limit=${TEST_LIMIT:-300}
  for t in ${TESTS-decode_graph cuda}; do
    timeout "$limit" ./stages_test --test-threads 1 --nocapture "$t" 2>&1 |
      grep --line-buffered -E "^test |test result|panicked|rel logit" | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 124 ] && echo "TIMEOUT: tests '$t' still running after $limit s" | tee -a "$log"
  done
  local args=(--batches "${BATCHES:-1,2}" --prompt "${PROMPT:-100}" --steps "${STEPS:-64}")
  for i in $(seq "${ROUNDS:-2}"); do
    if [ -x old_decode_bench ]; then timeout 120 ./old_decode_bench "${args[@]}" 2>/dev/null | row old | tee -a "$log"; fi
    timeout 120 ./decode_bench "${args[@]}" 2>/dev/null | row new | tee -a "$log"
    for v in ${VARIANTS:-}; do
      local name=${v%%:*} envs=${v#*:}
      timeout 120 env ${envs//,/ } ./decode_bench "${args[@]}" 2>/dev/null | row "$name" | tee -a "$log"
    done
  done
  PIPE_DECODE_LAY_TIMES=1 timeout 120 ./decode_bench --batches 1 --prompt "${PROMPT:-100}" --steps 32 2>&1 |
    grep "lay times" | tail -1 | tee -a "$log"
  # The profile of this build, then under each of PROFILE_VARIANTS (words
  # as VARIANTS'), e.g. the step's graph on the GPU with a switch on.
  for v in "new:" ${PROFILE_VARIANTS:-}; do
    local name=${v%%:*} envs=${v#*:}
    timeout 120 env ${envs//,/ } ./decode_bench --batches 1 --prompt "${PROMPT:-100}" --steps 16 --profile 2>&1 |
      python3 -c 'import json, sys
for l in sys.stdin:
    if "decode_profile" in l:
        d = json.loads(l)
        print("profile", sys.argv[1], "batch", d["batch"], {k: round(v, 1) for k, v in d["us_per_kernel"].items()})' "$name" |
      tee -a "$log"
  done
}

case "${1:-}" in
build) build "${2:-}" ;;
run) run ;;
*)
  echo "usage: $0 build [BASELINE_decode_bench.gz] | run" >&2
  exit 2
  ;;
esac
