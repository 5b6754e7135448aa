#!/usr/bin/env bash
# GPU serve benchmark (issue 5): `pipe serve` on CUDA vs transformers
# `generate`, same card, same call, SmolLM2-135M shape (random init, bf16).
#
# Here (no GPU):  SMOL_DIR=<model stage output> scripts/gpu/train_smoke.sh prepare
#   (builds the CUDA binary into gpu-smoke/ with SmolLM2's config + tokenizer).
# On the GPU machine (the `device` tool; gpu-smoke/ is carried):
#   bash scripts/gpu/serve_bench.sh
#   random-init weights (f32 on disk, served in bf16 by both), then
#   benches/serve/load.py against `pipe serve --device cuda` (batch-1 streamed
#   decode tok/s; total tok/s at CONC concurrent requests), then
#   benches/serve/hf_generate.py (cuda, bf16, sdpa) at the same batch sizes,
#   and the HBM roofline for batch-1 decode (bf16 weight bytes / bandwidth).
#   Results: $OUT/serve_bench.txt.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SMOKE=$REPO/gpu-smoke
M=${M:-128}
CONC=${CONC:-1,8,32,64}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=$OUT/serve_bench.txt
cd "$SMOKE"
[ -x pipe ] || { gunzip -kf pipe.gz && chmod +x pipe; }
S=$(python3 -c 'import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))')
export LD_LIBRARY_PATH=$(find "$S/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader | tee "$R"
[ -f smol/model.safetensors ] || python3 "$REPO/scripts/gpu/gen_model.py" src smol | tee -a "$R"

./pipe serve smol --device cuda --dtype bf16 --port 0 --max-batch 64 2> serve.log &
SP=$!
for _ in $(seq 1 300); do grep -q "serving" serve.log && break; sleep 0.2; done
URL=$(grep -o 'http://[0-9.:]*/v1' serve.log | head -1)
echo "== pipe serve (cuda, bf16) at $URL, M=$M" | tee -a "$R"
python3 "$REPO/benches/serve/load.py" --base-url "$URL" --max-tokens "$M" --concurrency "$CONC" | tee -a "$R"
kill -INT $SP; wait $SP || true
tail -3 serve.log >> "$R"

echo "== transformers generate (cuda, bf16, sdpa), M=$M" | tee -a "$R"
python3 "$REPO/benches/serve/hf_generate.py" --model smol --device cuda --dtype bfloat16 \
  --max-new-tokens "$M" --batches "$CONC" | tee -a "$R"

python3 - "$R" <<'PY' | tee -a "$R"
import json, subprocess, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
p = {l["concurrency"]: l["total_tok_s"] for l in lines if l.get("event") == "concurrency"}
s1 = next(l["decode_tok_s"] for l in lines if l.get("event") == "stream1")
h = {l["batch"]: l for l in lines if l.get("bench") == "hf_generate" and "batch" in l}
name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
bw = 4.8e12 if "H200" in name else 3.35e12  # HBM3e H200 / HBM3 H100 SXM, bytes/s
params = 134_515_008  # SmolLM2-135M (tied embeddings)
roof = bw / (2 * params)
print(f"card: {name}")
print(f"batch-1 decode: pipe {s1:.1f} tok/s, transformers {h[1]['decode_tok_s']:.1f} tok/s "
      f"(x{s1 / h[1]['decode_tok_s']:.2f}); HBM roofline {roof:.0f} tok/s (pipe at {100 * s1 / roof:.1f}%)")
for c in sorted(p):
    if c in h:
        print(f"concurrency {c}: pipe {p[c]:.0f} tok/s, transformers generate batch {c} "
              f"{h[c]['total_tok_s']:.0f} tok/s (x{p[c] / h[c]['total_tok_s']:.2f})")
PY
