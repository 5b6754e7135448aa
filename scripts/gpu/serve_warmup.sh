#!/usr/bin/env bash
# `pipe serve`'s warm-up (docs/results.md §5) against an empty driver JIT cache (CUDA_CACHE_PATH):
#   cold0: PIPE_SERVE_WARMUP=0, a fresh cache (what the first server of a
#          fresh machine did while candle's kernels were PTX: ~20 s in its
#          first batch of 8 requests; with them as cubins, nothing);
#   warm1: the warm-up (the default on CUDA), another fresh cache;
#   cold0b: PIPE_SERVE_WARMUP=0 again on cold0's cache (filled, if the
#          build's kernels needed the JIT).
# Each: seconds from start to "serving", then load.py (stream1, then 8, 8,
# 32 concurrent, 128 tokens each). Not a test: it asserts nothing.
# PIPES="pipe pipe_old": the three servers of each build in turn (each
# gpu-serve/NAME, or NAME.xz unpacked), each with caches of its own.
#
# Here: scripts/gpu/serve_bench.sh prepare (gpu-serve/: pipe.xz, src/).
# On the GPU machine (the `device` tool, carry ["gpu-serve"]):
#   bash scripts/gpu/serve_warmup.sh        -> $OUT/warm.txt
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO/scripts/gpu/lib.sh"
cd "$REPO/gpu-serve"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R=$OUT/warm.txt
PIPES=${PIPES:-pipe}
for p in $PIPES; do
  [ -x "$p" ] || { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$p.xz" "$p" && chmod +x "$p"; }
done
cuda_runtime_libs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R"
[ -f smol/model.safetensors ] || python3 "$REPO/scripts/gpu/gen_model.py" src smol > /dev/null 2>&1
one() { # build, name, cache dir, env...
  local b=$1 n=$1-$2 c=$3; shift 3
  local t0; t0=$(date +%s.%N)
  env CUDA_CACHE_PATH=$c PIPE_LOG=info "$@" "./$b" serve smol --device cuda --dtype bf16 --port 0 --max-batch 64 2> "serve_$n.log" &
  local SP=$!
  for _ in $(seq 1 1200); do grep -q "serving" "serve_$n.log" && break; sleep 0.1; done
  local t1; t1=$(date +%s.%N)
  local URL; URL=$(grep -o 'http://[0-9.:]*/v1' "serve_$n.log" | head -1)
  echo "== $n: serving after $(python3 -c "print(round($t1 - $t0, 1))") s; $(grep -o 'loaded.*' "serve_$n.log" | cut -c1-200)" | tee -a "$R"
  timeout 200 python3 "$REPO/benches/serve/load.py" --base-url "$URL" --max-tokens 128 --concurrency 8,8,32 | grep '^{' |
    python3 -c 'import json,sys
for l in sys.stdin:
  d=json.loads(l); print(" ", d["event"], d.get("concurrency", ""), "wall_s", d.get("wall_s", ""), "tok/s", d.get("total_tok_s", d.get("decode_tok_s")), "ttft", d.get("ttft_s", ""))' | tee -a "$R"
  kill -INT $SP; wait $SP
  grep -o 'engine:.*' "serve_$n.log" | sed 's/^/  /' | tee -a "$R"
  du -sh "$c" 2>/dev/null | sed 's/^/  JIT cache /' | tee -a "$R"
}
for p in $PIPES; do
  rm -rf "/tmp/cc0-$p" "/tmp/cc1-$p"
  one "$p" cold0 "/tmp/cc0-$p" PIPE_SERVE_WARMUP=0
  one "$p" warm1 "/tmp/cc1-$p"
  one "$p" cold0b "/tmp/cc0-$p" PIPE_SERVE_WARMUP=0
done
