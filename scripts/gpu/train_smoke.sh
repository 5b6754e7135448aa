#!/usr/bin/env bash
# GPU smoke test of `train` (issue 4: "the code runs with --features cuda").
#
# Here (no GPU):  scripts/gpu/train_smoke.sh prepare
#   builds the CUDA binary (../shared/cuda/setup.sh; CARGO_TARGET_DIR default
#   /var/tmp/pipe-cuda-target), strips a copy into gpu-smoke/ (git-ignored),
#   with SmolLM2-135M's config and tokenizer (from a `model` stage output
#   given as $SMOL_DIR), a little chat data and this pipeline.
# On the GPU machine (the `device` tool, carry ["gpu-smoke"]):
#   bash scripts/gpu/train_smoke.sh run
#   makes a random-init model of that shape with torch, runs the pipeline
#   (LoRA bf16/f32, QLoRA, full on CUDA; one LoRA step on the CPU), and
#   prints each stage's losses, tokens/s and peak GPU memory to $OUT/smoke.txt.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO/scripts/gpu/lib.sh"
SMOKE=$REPO/gpu-smoke
case "${1:-}" in
prepare)
  : "${SMOL_DIR:?set SMOL_DIR to a model stage output of SmolLM2-135M-Instruct}"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/pipe-cuda-target}
  (cuda_build_env && cargo build --release --features cuda)
  rm -rf "$SMOKE" && mkdir -p "$SMOKE/src"
  # The tree that travels is at most 64 MiB: the stripped CUDA binary (~80 MB) goes gzipped.
  strip -o "$SMOKE/pipe" "$CARGO_TARGET_DIR/release/pipe" && gzip -9 "$SMOKE/pipe"
  cp "$SMOL_DIR"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} "$SMOKE/src/"
  cp "$REPO/scripts/gpu/train_smoke.yaml" "$SMOKE/p.yaml"
  python3 - "$SMOKE/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(256):
        q = f"Tom has {i+3} apples and buys {i*2+5} more. How many apples does he have now?"
        a = f"Tom starts with {i+3} apples. He buys {i*2+5} more, so {i+3} + {i*2+5} = {3*i+8}. The answer is {3*i+8}."
        f.write(json.dumps({"q": q, "a": a}) + "\n")
PY
  du -sh "$SMOKE"
  ;;
run)
  cd "$SMOKE"
  [ -x pipe ] || { gunzip -kf pipe.gz && chmod +x pipe; }
  cuda_runtime_libs
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/smoke.txt"
  python3 "$REPO/scripts/gpu/gen_model.py" src smol | tee -a "$OUT/smoke.txt"
  mkdir -p .pipe
  ./pipe run p.yaml 2>&1 | tee "$OUT/run.log" | grep -v "step " || true
  for s in lora_bf16 lora_f32 lora_cpu qlora_bf16 full_bf16; do
    d=$(./pipe show p.yaml "$s" --path 2>/dev/null || true)
    echo "== $s ($d)" >> "$OUT/smoke.txt"
    if [ -n "$d" ] && [ -f "$d/metrics.jsonl" ]; then
      python3 - "$d" >> "$OUT/smoke.txt" <<'PY'
import json, sys
d = sys.argv[1]
m = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
t = json.load(open(f"{d}/train.json"))
print("loss", [round(r["loss"], 3) for r in m])
tps = sorted(r["tokens_per_s"] for r in m[1:]) or [m[0]["tokens_per_s"]]
print("tokens/s (median after step 1)", round(tps[len(tps)//2]), "device", t["device"], "precision", t["precision"],
      "peak_gpu_mib", t.get("peak_gpu_mib"))
PY
    fi
  done
  cat "$OUT/smoke.txt"
  ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
