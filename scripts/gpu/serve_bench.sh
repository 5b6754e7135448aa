#!/usr/bin/env bash
# GPU serve benchmark (issue 7, benchmark 4): `pipe serve` on CUDA vs
# transformers `generate`, same card, same call, SmolLM2-135M shape (random
# init, bf16).
#
# Here (no GPU):  scripts/gpu/serve_bench.sh prepare
#   builds the CUDA binary and the CUDA lib tests (../shared/cuda/setup.sh;
#   CARGO_TARGET_DIR default /var/tmp/pipe-cuda-target), stripped and
#   xz-compressed into gpu-serve/ (git-ignored) with SmolLM2's config and
#   tokenizer (from gpu-smoke/src or $SMOL_DIR, a `model` stage output).
# On the GPU machine (the `device` tool, carry ["gpu-serve"]):
#   bash scripts/gpu/serve_bench.sh run
#   1. the CUDA tests matching TEST_FILTER (default "decode"; TESTS=0 skips);
#   2. random-init weights (f32 on disk, served in bf16 by both);
#   3. stages/examples/decode_bench.rs per variant: decode steps of the
#      model alone (no HTTP, no prefills), tok/s and ms per step at the
#      BATCHES (default CONC) for CONFIG (default src/config.json, or a
#      built-in shape: smollm2-135m, llama-1b); BENCH_ARGS=--profile adds
#      per-kernel GPU times. Without the pipe binary or src/ it stops here;
#   4. for each of SERVE_VARIANTS (default VARIANTS, default "graph candle"): benches/serve/load.py
#      against `pipe serve --device cuda` (batch-1 streamed decode tok/s;
#      total tok/s at CONC concurrent requests). graph: the fused decode
#      step replayed as a CUDA graph, projections on tensor cores (the
#      default); dot: the same with warp-per-row dot products
#      (PIPE_DECODE_TC=0); mega: steps of up to 8 rows as one persistent
#      kernel (PIPE_DECODE_MEGA=1); stream: the same with each block's
#      weights streamed through shared memory (PIPE_DECODE_STREAM=1); nocoop: the same launched without the
#      cooperative attribute; tile: the five-launch step with the older
#      attention (PIPE_DECODE_ATTN=tile: a thread per position of a tile);
#      nograph: the same kernels launched one by one; lph: the batch-1
#      persistent step with the LM head inside, one step a launch
#      (PIPE_DECODE_LP_HEAD=1, PIPE_DECODE_LP_STEPS=1); lpk: the head
#      inside every step, and a lone greedy sequence's chain LP_STEPS
#      (default 8) steps a launch; k1: one step a launch (the head a
#      kernel of its own, as by default; PIPE_DECODE_LP_STEPS=1, the
#      default before 2026-12-05's twenty-ninth session: 4 a launch);
#      candle: PIPE_DECODE_GRAPH=0, decode
#      through candle ops (the path before the fused step);
#   5. benches/serve/hf_generate.py (cuda, bf16, sdpa) at the same batch
#      sizes, and the HBM roofline for batch-1 decode (bf16 weight bytes /
#      bandwidth).
#   Results: $OUT/serve_bench.txt. Not a test: it asserts nothing about speed.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO/scripts/gpu/lib.sh"
D=$REPO/gpu-serve
case "${1:-}" in
prepare)
  cuda_build_env
  cargo build --release --features cuda
  cargo build --release --features cuda -p pipe-stages --example decode_bench
  bin=$(cuda_lib_test_bin)
  src=${SMOL_DIR:-$REPO/gpu-smoke/src}
  rm -rf "$D" && mkdir -p "$D/src"
  cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} "$D/src/"
  # The tree that travels is at most 64 MiB: binaries go stripped and xz'd.
  strip -o "$D/pipe" "$CARGO_TARGET_DIR/release/pipe"
  strip -o "$D/stages_test" "$bin"
  strip -o "$D/decode_bench" "$CARGO_TARGET_DIR/release/examples/decode_bench"
  xz -T0 -9 "$D/pipe" "$D/stages_test" "$D/decode_bench"
  du -sh "$D"
  ;;
run)
  # A variant's switches: graph (the default: the fused step in a CUDA
  # graph, projections on tensor cores), dot (the same with warp-per-row
  # dot products, PIPE_DECODE_TC=0), nopdl (no programmatic dependent
  # launches, PIPE_DECODE_PDL=0), nograph (kernels launched one by one),
  # candle (PIPE_DECODE_GRAPH=0: candle ops), mega, nocoop, tile, lph and lpk (above).
  variant_env() {
    # (lph, lps empty: the switches' defaults, a lone greedy sequence's
    # chain 4 steps a launch, each step's LM head a kernel of its own.)
    tc=1 pdl=1 mega=0 coop=1 attn=chunk stream=0 lph= lps=
    case $1 in
    lph) sw=1 lph=1 lps=1 ;; lpk) sw=1 lph=1 lps=${LP_STEPS:-8} ;; k1) sw=1 lph=0 lps=1 ;;
    candle) sw=0 ;; nograph) sw=nograph ;; dot) sw=1 tc=0 ;; nopdl) sw=1 pdl=0 ;; mega) sw=1 mega=1 ;;
    stream) sw=1 stream=1 ;;
    nocoop) sw=1 mega=1 coop=0 ;; tile) sw=1 attn=tile ;; *) sw=1 ;;
    esac
  }
  M=${M:-128}
  CONC=${CONC:-1,8,32,64}
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  R=$OUT/serve_bench.txt
  cd "$D"
  for f in pipe stages_test decode_bench; do
    [ -x $f ] || [ ! -f $f.xz ] || { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' $f.xz $f && chmod +x $f; }
  done
  cuda_runtime_libs
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader | tee "$R"
  if [ "${TESTS:-1}" = 1 ]; then
    (timeout 300 ./stages_test --test-threads 1 --nocapture ${TEST_FILTER:-decode} 2>&1 || echo "TESTS FAILED") |
      grep -v "^$" | tail -40 | tee -a "$R"
  fi
  # The model side alone (no HTTP, no prefill in the timing), per path.
  for v in ${VARIANTS:-graph candle}; do
    variant_env "$v"
    PIPE_DECODE_GRAPH=$sw PIPE_DECODE_TC=$tc PIPE_DECODE_PDL=$pdl PIPE_DECODE_MEGA=$mega PIPE_DECODE_COOP=$coop PIPE_DECODE_ATTN=$attn \
      PIPE_DECODE_STREAM=$stream PIPE_DECODE_LP_HEAD=$lph PIPE_DECODE_LP_STEPS=$lps timeout 120 ./decode_bench \
      --config "${CONFIG:-src/config.json}" --batches "${BATCHES:-$CONC}" --prompt 100 --steps 64 ${BENCH_ARGS:-} |
      sed "s/^{/{\"variant\": \"$v\", /" | tee -a "$R" || true
  done
  # Without the binary and SmolLM2's files (a model-side run): no serving.
  [ -x pipe ] && [ -f src/config.json ] || exit 0
  [ -f smol/model.safetensors ] || python3 "$REPO/scripts/gpu/gen_model.py" src smol | tee -a "$R"
  for v in ${SERVE_VARIANTS:-${VARIANTS:-graph candle}}; do
    variant_env "$v"
    PIPE_LOG=info PIPE_DECODE_GRAPH=$sw PIPE_DECODE_TC=$tc PIPE_DECODE_PDL=$pdl PIPE_DECODE_MEGA=$mega PIPE_DECODE_COOP=$coop \
      PIPE_DECODE_ATTN=$attn PIPE_DECODE_STREAM=$stream PIPE_DECODE_LP_HEAD=$lph PIPE_DECODE_LP_STEPS=$lps \
      ./pipe serve smol --device cuda --dtype bf16 --port 0 --max-batch 64 2> "serve_$v.log" &
    SP=$!
    for _ in $(seq 1 300); do grep -q "serving" "serve_$v.log" && break; sleep 0.2; done
    URL=$(grep -o 'http://[0-9.:]*/v1' "serve_$v.log" | head -1)
    echo "== pipe serve $v (cuda, bf16) at $URL, M=$M" | tee -a "$R"
    python3 "$REPO/benches/serve/load.py" --base-url "$URL" --max-tokens "$M" --concurrency "$CONC" |
      python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); d["variant"]=sys.argv[1]; print(json.dumps(d), flush=True)
    else: print(l, end="")' "$v" | tee -a "$R"
    kill -INT $SP; wait $SP || true
    grep "engine:" "serve_$v.log" | tee -a "$R" || true
  done

  echo "== transformers generate (cuda, bf16, sdpa), M=$M" | tee -a "$R"
  python3 "$REPO/benches/serve/hf_generate.py" --model smol --device cuda --dtype bfloat16 \
    --max-new-tokens "$M" --batches "$CONC" | tee -a "$R"

  python3 - "$R" <<'PY' | tee -a "$R"
import json, subprocess, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
h = {l["batch"]: l for l in lines if l.get("bench") == "hf_generate" and "batch" in l}
name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
bw = 4.8e12 if "H200" in name else 3.35e12  # HBM3e H200 / HBM3 H100 SXM, bytes/s
params = 134_515_008  # SmolLM2-135M (tied embeddings)
roof = bw / (2 * params)
print(f"card: {name}; HBM roofline for batch-1 decode {roof:.0f} tok/s")
print(f"transformers generate batch 1: {h[1]['decode_tok_s']:.1f} tok/s")
for v in dict.fromkeys(l["variant"] for l in lines if "variant" in l):
    mine = [l for l in lines if l.get("variant") == v]
    p = {l["concurrency"]: l["total_tok_s"] for l in mine if l.get("event") == "concurrency"}
    s1 = next((l["decode_tok_s"] for l in mine if l.get("event") == "stream1"), None)
    if s1 is not None:
        print(f"pipe {v}: batch-1 decode {s1:.1f} tok/s (x{s1 / h[1]['decode_tok_s']:.1f} generate; "
              f"{100 * s1 / roof:.1f}% of the roofline)")
    for c in sorted(p):
        if c in h:
            print(f"pipe {v}: concurrency {c}: {p[c]:.0f} tok/s vs generate batch {c} "
                  f"{h[c]['total_tok_s']:.0f} tok/s (x{p[c] / h[c]['total_tok_s']:.2f})")
PY
  ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
