#!/usr/bin/env bash
# GPU training benchmark (issue 7, benchmarks 1-3): pipe vs transformers (+ peft)
# on the same card in the same call: tokens/s, peak memory, and the ratios.
#
# Here (no GPU):  benches/gpu/train.sh prepare
#   builds the CUDA bench binary (stages/examples/train_bench.rs) and the CUDA
#   lib tests with ../shared/cuda/setup.sh (CARGO_TARGET_DIR default
#   /var/tmp/pipe-cuda-target), gzipped into gpu-bench/ (git-ignored; the
#   tree that travels is at most 64 MiB).
# On the GPU machine (the `device` tool, carry ["gpu-bench"]):
#   benches/gpu/train.sh run
#   1. the CUDA tests of the fused kernels (TESTS=0 skips them);
#   2. for each case of CASES ("config:method:ckpt:docs", comma-separated),
#      pipe (fused attention), then (unless TORCH=0) transformers eager and,
#      with COMPILE=1, torch.compile; with NOTC=1 also pipe with PIPE_ATTENTION_TC=0 (bf16
#      attention on CUDA cores); with HEADS="N ..." also pipe with
#      PIPE_HEAD_LOGITS=N (logits per chunk of the LM head); with VARS="K=V ..."
#      also pipe with each assignment (e.g. PIPE_ATTN_BWD=split; "+" joins
#      several: PIPE_ATTN_BWD=split+PIPE_HEAD_LOGITS=67108864); with UNFUSED=1 also pipe with PIPE_FUSED_ATTENTION=0 and
#      PIPE_FUSED_KERNELS=0; with NOEVENTS=1 also pipe --no-events; with
#      NOPOOL=1 also pipe with PIPE_KEEP_POOL=0 (the CUDA memory pool hands
#      freed memory back at each synchronisation, the driver's default); when
#      gpu-bench/old_train_bench.gz is there (an earlier build, put there
#      by hand), also that build, as "pipe-old" (an A/B in one call);
#   3. with PROFILE="config:method ...", train_bench --profile for each.
#   Random-init weights, bf16, batch BATCH x SEQ (default 8 x 1024).
#   Prints one JSON line per run and a table with pipe / torch ratios to
#   $OUT/train_bench.txt. Not a test: it asserts nothing about speed.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO/scripts/gpu/lib.sh"
B=$REPO/gpu-bench
case "${1:-}" in
prepare)
  # With NCCL: the test binary holds the multi-GPU tests too (one GPU is enough to run them).
  cuda_build_env nccl
  export PIPE_FEATURES=${PIPE_FEATURES:-nccl}
  cargo build --release --features "$PIPE_FEATURES" -p pipe-stages --example train_bench
  bin=$(cuda_lib_test_bin)
  rm -rf "$B" && mkdir -p "$B"
  strip -o "$B/train_bench" "$CARGO_TARGET_DIR/release/examples/train_bench" && gzip -9 "$B/train_bench"
  strip -o "$B/stages_test" "$bin" && gzip -9 "$B/stages_test"
  du -sh "$B"/*
  ;;
run)
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  R=$OUT/train_bench.txt
  cd "$B"
  for f in train_bench stages_test old_train_bench; do
    [ -x $f ] || [ ! -f $f.gz ] || { gunzip -kf $f.gz && chmod +x $f; }
  done
  cuda_runtime_libs
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R"
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' | tee -a "$R"
  if [ "${TESTS:-1}" = 1 ]; then
    # A failing test is reported, and the benches still run.
    ./stages_test --test-threads 1 ${TEST_FILTER:-cuda nccl} 2>&1 | tee "$OUT/tests.txt" | tail -25 | tee -a "$R" || echo "TESTS FAILED" | tee -a "$R"
  fi
  BATCH=${BATCH:-8}; SEQ=${SEQ:-1024}; STEPS=${STEPS:-10}
  J=$OUT/train_bench.jsonl; : > "$J"
  IFS=, read -ra cases <<< "${CASES:-smollm2-135m:lora:0:1}"
  for c in "${cases[@]}"; do
    IFS=: read -r cfg method ckpt docs <<< "$c"
    ck=(); [ "$ckpt" = 1 ] && ck=(--ckpt)
    common=(--config "$cfg" --method "$method" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" "${ck[@]}")
    ./train_bench "${common[@]}" --docs "${docs:-1}" 2>>"$OUT/stderr.txt" | tee -a "$J" || echo "pipe $c failed" | tee -a "$R"
    if [ -x old_train_bench ]; then
      ./old_train_bench "${common[@]}" --docs "${docs:-1}" 2>>"$OUT/stderr.txt" | sed 's/"impl":"pipe"/"impl":"pipe-old"/' | tee -a "$J" || true
    fi
    if [ "${NOPOOL:-0}" = 1 ]; then
      PIPE_KEEP_POOL=0 ./train_bench "${common[@]}" --docs "${docs:-1}" 2>>"$OUT/stderr.txt" | tee -a "$J" || true
    fi
    if [ "${NOEVENTS:-0}" = 1 ]; then
      ./train_bench "${common[@]}" --docs "${docs:-1}" --no-events | tee -a "$J" || true
    fi
    if [ "${NOTC:-0}" = 1 ]; then
      PIPE_ATTENTION_TC=0 ./train_bench "${common[@]}" --docs "${docs:-1}" 2>>"$OUT/stderr.txt" | tee -a "$J" || true
    fi
    # VARS="PIPE_ATTN_BWD=split A=1+B=2 ...": pipe again with each environment assignment ("+" joins several).
    for kv in ${VARS:-}; do
      env ${kv//+/ } ./train_bench "${common[@]}" --docs "${docs:-1}" 2>>"$OUT/stderr.txt" | tee -a "$J" || true
    done
    # HEADS="268435456 ...": pipe again with PIPE_HEAD_LOGITS (logits per chunk of the LM head's loss).
    for hl in ${HEADS:-}; do
      PIPE_HEAD_LOGITS=$hl ./train_bench "${common[@]}" --docs "${docs:-1}" 2>>"$OUT/stderr.txt" | tee -a "$J" || true
    done
    if [ "${UNFUSED:-0}" = 1 ]; then
      PIPE_FUSED_ATTENTION=0 PIPE_FUSED_KERNELS=0 ./train_bench "${common[@]}" --docs "${docs:-1}" --steps 3 2>>"$OUT/stderr.txt" | tee -a "$J" || true
    fi
    [ "$method" = qlora ] || [ "${TORCH:-1}" = 0 ] && continue
    python3 "$REPO/benches/gpu/torch_train.py" "${common[@]}" | tee -a "$J" || echo "torch $c failed" | tee -a "$R"
    if [ "${COMPILE:-0}" = 1 ]; then
      python3 "$REPO/benches/gpu/torch_train.py" "${common[@]}" --compile 2>/dev/null | tee -a "$J" || echo "torch.compile $c failed" | tee -a "$R"
    fi
  done
  python3 "$REPO/benches/gpu/report.py" "$J" | tee -a "$R"
  # PROFILE="llama-1b:full smollm2-135m:lora": train_bench --profile per
  # config:method (each part of a block and of the LM head, timed alone).
  for pc in ${PROFILE:-}; do
    IFS=: read -r cfg method <<< "$pc"
    ./train_bench --config "$cfg" --method "$method" --batch "$BATCH" --seq "$SEQ" --profile 2>>"$OUT/stderr.txt" \
      | sed "s/^{/{\"config\": \"$cfg\", \"method\": \"$method\", /" | tee -a "$R" || echo "profile $pc failed" | tee -a "$R"
    if [ -x old_train_bench ]; then
      ./old_train_bench --config "$cfg" --method "$method" --batch "$BATCH" --seq "$SEQ" --profile 2>>"$OUT/stderr.txt" \
        | sed "s/^{/{\"build\": \"old\", \"config\": \"$cfg\", \"method\": \"$method\", /" | tee -a "$R" || true
    fi
  done
  ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
