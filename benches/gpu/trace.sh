#!/usr/bin/env bash
# Where a training step leaves the GPU idle (issue 7): a CUPTI trace of
# train_bench on the GPU machine, which has ncu but no Nsight Systems.
#
# Here (no GPU):  benches/gpu/trace.sh prepare
#   after benches/gpu/train.sh prepare: downloads CUPTI 13.0 (the GPU
#   machines' PyTorch ships that libcupti; its headers come with the wheel)
#   and builds trace/trace.c into gpu-bench/libtrace.so.
# On the GPU machine (the `device` tool, carry ["gpu-bench"]):
#   benches/gpu/trace.sh run   (CASE="llama-1b full" by default)
#   train_bench for 4 steps with the library injected, then gaps.py's
#   summary to $OUT/gaps.txt (the trace itself gzipped next to it).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO/scripts/gpu/lib.sh"
B=$REPO/gpu-bench
case "${1:-}" in
prepare)
  cuda_build_env
  W=${TMPDIR:-/tmp}/pipe-cupti
  mkdir -p "$W" "$B"
  [ -f "$W/nvidia/cu13/include/cupti.h" ] || {
    pip download --no-deps -d "$W" "nvidia-cuda-cupti==13.0.85"
    (cd "$W" && python3 -m zipfile -e nvidia_cuda_cupti-13.0.85-*.whl .)
  }
  # cuda.h: the toolkit of ../shared/cuda/setup.sh (the same 13.0 headers).
  inc=$(dirname "$(command -v nvcc)")/../include
  gcc -shared -fPIC -O2 -o "$B/libtrace.so" "$REPO/benches/gpu/trace/trace.c" \
    -I "$W/nvidia/cu13/include" -I "$inc" -L "$W/nvidia/cu13/lib" -l:libcupti.so.13
  ls -la "$B/libtrace.so"
  ;;
run)
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  cd "$B"
  [ -x train_bench ] || { gunzip -kf train_bench.gz && chmod +x train_bench; }
  cuda_runtime_libs
  read -r cfg method <<< "${CASE:-llama-1b full}"
  TRACE_OUT=$OUT/trace.tsv CUDA_INJECTION64_PATH=$B/libtrace.so \
    ./train_bench --config "$cfg" --method "$method" --batch "${BATCH:-8}" --seq "${SEQ:-1024}" --steps 4 | tee "$OUT/gaps.txt"
  python3 "$REPO/benches/gpu/trace/gaps.py" "$OUT/trace.tsv" | tee -a "$OUT/gaps.txt"
  gzip -f "$OUT/trace.tsv"
  ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
