#!/usr/bin/env bash
# Multi-GPU data-parallel scaling of the `train` stage (issue 7 "Multi-GPU",
# issue 8): tokens/s per GPU for 1, 2, 4, 8 GPUs in one call, peak memory per
# GPU with and without the sharded optimizer state (`zero_stage`), NCCL
# against the host-memory transport.
#
# Here (no GPU):  scripts/gpu/train_scale.sh prepare
#   builds `pipe` with `--features nccl` (../shared/cuda/setup.sh with
#   PIPE_CUDA_NCCL=$GPU_NCCL; CARGO_TARGET_DIR default /var/tmp/pipe-cuda-target),
#   strips and gzips it into gpu-scale/ (git-ignored) with SmolLM2-135M's
#   config and tokenizer (converted from the GGUF test asset by a `model`
#   stage), a Llama-3.2-1B-shaped config using the same tokenizer, and
#   synthetic chat data.
# On the GPU machine (the `device` tool, kind nvidia-h200-x2/x4/x8, carry
# ["gpu-scale"]):
#   bash scripts/gpu/train_scale.sh run
#   random-init models of both shapes (torch), then for each case of CASES
#   ("shape:method:ckpt", default "smol:lora:0,llama1b:full:0") and each GPU
#   count of GPUS (default 1 2 4 8, those the machine has) a `pipe run` of one
#   train stage (per-device batch BATCH x 1,024, STEPS steps, bf16, CUDA);
#   ZERO="0 2" adds zero_stage 2 rows, HOST=1 adds the host transport at the
#   largest count; EQUIV=1 (default, 2+ GPUs) first compares the losses of
#   the same global batch on 1 GPU (accumulating 2) and on 2. Table in
#   $OUT/scale.txt: tokens/s (median of the steps after the first 2), per
#   GPU, scaling efficiency against 1 GPU, peak MiB per GPU, optimizer state
#   per GPU. QS=1 (default) first times the
#   quickstart's math training at the seed's size (10,000 problems) on 1 GPU
#   and on all of them (QS_GPUS), QS_STEPS caps its steps (default: the epoch).
#   Not a test: it asserts nothing.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO/scripts/gpu/lib.sh"
S=$REPO/gpu-scale
case "${1:-}" in
prepare)
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/pipe-cuda-target}
  cd "$REPO"
  # PIPE_BIN=path: that binary instead (e.g. a CPU build, to try the script here).
  bin=${PIPE_BIN:-$CARGO_TARGET_DIR/release/pipe}
  if [ -z "${PIPE_BIN:-}" ]; then
    (cuda_build_env nccl && cargo build --release --features nccl)
  fi
  rm -rf "$S" && mkdir -p "$S"
  strip -o "$S/pipe" "$bin" && gzip -9 "$S/pipe"
  # SmolLM2's config and tokenizer: the GGUF test asset through a model stage.
  sh scripts/fetch-test-assets.sh >/dev/null
  W=$(mktemp -d)
  ln -s "${PIPE_TEST_ASSETS:-/var/tmp/pipe-assets}/SmolLM2-135M-Instruct.Q4_1.gguf" "$W/smol.gguf"
  printf 'stages:\n  base: {kind: model, source: smol.gguf}\n' > "$W/p.yaml"
  cpu=${PIPE_CPU_BIN:-}
  if [ -z "$cpu" ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=/var/tmp/pipe-target cargo build -q) && cpu=/var/tmp/pipe-target/debug/pipe
  fi
  (cd "$W" && "$cpu" run p.yaml >/dev/null)
  base=$(cd "$W" && "$cpu" show p.yaml base --path)
  mkdir -p "$S/smol" "$S/llama1b"
  for f in config.json tokenizer.json tokenizer_config.json generation_config.json; do
    cp "$base/$f" "$S/smol/"; cp "$base/$f" "$S/llama1b/"
  done
  rm -rf "$W"
  # Llama-3.2-1B's shape (random init there; the tokenizer only feeds ids).
  python3 - "$S/llama1b/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c.update({"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
          "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": True,
          "max_position_embeddings": 131072})
json.dump(c, open(p, "w"), indent=2)
PY
  python3 - "$S/data.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "apples pears boxes trains miles hours coins books cards shells".split()
with open(sys.argv[1], "w") as f:
    for i in range(12000):
        a, b, c = random.randint(2, 99), random.randint(2, 99), random.randint(2, 9)
        w = random.choice(words)
        q = f"Sam has {a} {w}. He gets {b} more, then gives away a {c}th of them, rounded down. How many {w} does Sam keep?"
        t = a + b
        steps = " ".join(f"Step {k}: we check the count again, it is still {t} {w} before the split." for k in range(8))
        r = f"Sam starts with {a} {w} and gets {b}, so {a} + {b} = {t}. {steps} He gives away {t // c}, keeping {t - t // c}. The answer is {t - t // c}."
        f.write(json.dumps({"q": q, "a": r}) + "\n")
PY
  # The quickstart's training data at the seed's size (QS=1 on the device):
  # 10,000 gsm_symbolic problems (reasoning-gym needs PyPI, so made here) and
  # the quickstart's system prompt.
  if [ "${QS:-1}" = 1 ]; then
    python3 "$REPO/pipelines/quickstart/gsm_symbolic.py" --seed 42 --n 10000 --out "$S/qs.jsonl"
    cp "$REPO/pipelines/prompts/math_system.txt" "$S/math_system.txt"
  fi
  du -sh "$S"/*
  ;;
run)
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  R=$OUT/scale.txt
  cd "$S"
  [ -x pipe ] || { gunzip -kf pipe.gz && chmod +x pipe; }
  [ "${DEVICE:-cuda}" = cpu ] || cuda_runtime_libs
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  # DEVICE=cpu NGPU=2 runs the same flow with CPU replicas (to try the script).
  DEVICE=${DEVICE:-cuda}
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R"
    NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
  else
    echo "no nvidia-smi: DEVICE=$DEVICE" | tee "$R"
    NGPU=${NGPU:-1}
  fi
  # The workspace of the runs: sources must live inside it.
  mkdir -p ws/.pipe && cp data.jsonl ws/
  if [ -f qs.jsonl ]; then cp qs.jsonl math_system.txt ws/; fi
  IFS=, read -ra cases <<< "${CASES:-smol:lora:0,llama1b:full:0}"
  for m in $(printf '%s\n' "${cases[@]}" | cut -d: -f1 | sort -u); do
    [ -f "ws/$m-model/model.safetensors" ] || [ -f "ws/$m-model/model.safetensors.index.json" ] ||
      python3 "$REPO/scripts/gpu/gen_model.py" "$m" "ws/$m-model" | tee -a "$R"
  done
  BATCH=${BATCH:-8}; STEPS=${STEPS:-12}
  read -ra counts <<< "${GPUS:-1 2 4 8}"
  read -ra zeros <<< "${ZERO:-0}"
  J=$OUT/scale.jsonl; : > "$J"
  runone() { # shape method ckpt n zero transport [accumulation]
    local shape=$1 method=$2 ckpt=$3 n=$4 zero=$5 tr=$6 accum=${7:-1}
    local name="${shape}_${method}_${n}gpu_z${zero}_${tr}_a${accum}"
    local lora=""; [ "$method" = lora ] && lora="    lora: {r: 16, alpha: 16, target: all-linear}"
    cd ws
    cat > "$name.yaml" <<EOF
stages:
  base: {kind: model, source: $shape-model}
  ds: {kind: dataset, source: data.jsonl}
  chat: {kind: messages, inputs: {data: ds}, user: "{{ q }}", assistant: "{{ a }}"}
  pack: {kind: pack, inputs: {data: chat, model: base}, max_seq_length: ${SEQ:-1024}}
  sft:
    kind: train
    inputs: {model: base, data: pack}
    method: $method
$lora
    device: $DEVICE
    devices: $n
    zero_stage: $zero
    precision: ${PRECISION:-bf16}
    gradient_checkpointing: $([ "$ckpt" = 1 ] && echo true || echo false)
    per_device_batch_size: $BATCH
    gradient_accumulation_steps: $accum
    max_steps: $STEPS
    logging_steps: 1
    learning_rate: 1.0e-4
    lr_scheduler: constant
EOF
    local env=(); [ "$tr" = host ] && env=(PIPE_DDP=host)
    if env "${env[@]}" ../pipe run --jobs 1 --force sft "$name.yaml" > "$OUT/$name.log" 2>&1; then
      local d; d=$(../pipe show "$name.yaml" sft --path)
      python3 - "$d" "$name" "$shape" "$method" "$n" "$zero" "$tr" >> "$J" <<'PY'
import json, sys
d, name, shape, method, n, zero, tr = sys.argv[1:]
m = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"tokens_per_s"' in l]
t = json.load(open(f"{d}/train.json"))
tps = sorted(r["tokens_per_s"] for r in m[2:]) or [m[-1]["tokens_per_s"]]
tr = (t.get("all_reduce") or {}).get("transport", "-")
print(json.dumps({"name": name, "shape": shape, "method": method, "gpus": int(n), "zero": int(zero), "transport": tr,
                  "tokens_per_s": tps[len(tps) // 2], "peak_mib": t.get("peak_gpu_mib_per_device"),
                  "opt_state_bytes": t.get("optimizer_state_bytes"), "loss": [round(r["loss"], 4) for r in m]}))
PY
      # The stage's own log of this run (the newest), its data-parallel lines.
      grep -h "data parallel" "$(ls -t .pipe/logs/sft/* | head -1)" 2>/dev/null | sed "s/^/$name: /" >> "$R" || true
    else
      echo "$name failed: $(tail -3 "$OUT/$name.log")" | tee -a "$R"
    fi
    cd ..
  }
  # The quickstart's math training at the seed's size (10,000 problems,
  # sequences of 1,024, LoRA r16, batch 8 x 2 per GPU, bf16, checkpointing,
  # one epoch) on a random-init SmolLM2: the wall time of the train stage.
  runqs() { # n
    local n=$1 name="qs_${1}gpu"
    cd ws
    cat > "$name.yaml" <<EOF
stages:
  base: {kind: model, source: smol-model}
  ds: {kind: dataset, source: qs.jsonl}
  chat:
    kind: messages
    inputs: {data: ds}
    system_file: math_system.txt
    user: "{{ question }}"
    assistant: "{{ answer.split('####')[0].rstrip() }}\nThe answer is {{ answer_value }}."
  pack: {kind: pack, inputs: {data: chat, model: base}, max_seq_length: 1024}
  sft:
    kind: train
    inputs: {model: base, data: pack}
    method: lora
    lora: {r: 16, alpha: 16, target: all-linear}
    device: $DEVICE
    devices: $n
    precision: ${PRECISION:-bf16}
    gradient_checkpointing: true
    per_device_batch_size: ${QS_BATCH:-8}
    gradient_accumulation_steps: 2
    num_epochs: 1
    learning_rate: 2.0e-4
    lr_scheduler: constant
$([ -n "${QS_STEPS:-}" ] && echo "    max_steps: $QS_STEPS")
EOF
    if ../pipe run --jobs 1 --force sft "$name.yaml" > "$OUT/$name.log" 2>&1; then
      local d; d=$(../pipe show "$name.yaml" sft --path)
      python3 "$REPO/scripts/gpu/train_scale_qs.py" "$d" "$n" | tee -a "$R"
    else
      echo "$name failed: $(tail -3 "$OUT/$name.log")" | tee -a "$R"
    fi
    cd ..
  }
  if [ -f ws/qs.jsonl ] && [ "${QS:-1}" = 1 ]; then
    [ -f ws/smol-model/model.safetensors ] || python3 "$REPO/scripts/gpu/gen_model.py" smol ws/smol-model
    for n in ${QS_GPUS:-1 $NGPU}; do
      if [ "$n" -le "$NGPU" ]; then runqs "$n"; fi
    done
  fi
  # The same global batch on 1 GPU (accumulating 2) and on 2 (EQUIV=1,
  # default): the losses should agree to bf16 rounding.
  if [ "${EQUIV:-1}" = 1 ] && [ "$NGPU" -ge 2 ]; then
    IFS=: read -r shape method ckpt <<< "${cases[0]}"
    runone "$shape" "$method" "$ckpt" 1 0 nccl 2
    runone "$shape" "$method" "$ckpt" 2 0 nccl 1
    python3 - "$J" <<'PY' | tee -a "$R"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
a = [r for r in rows if r["name"].endswith("_a2") and r["gpus"] == 1]
b = [r for r in rows if r["name"].endswith("_a1") and r["gpus"] == 2]
if a and b:
    la, lb = a[-1]["loss"], b[-1]["loss"]
    rel = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(la, lb))
    print(f"same global batch, 1 GPU x accumulation 2 vs 2 GPUs: losses {la} vs {lb}, max relative difference {rel:.2e}")
PY
    # Not scaling rows: keep them out of the table.
    mv "$J" "$OUT/equiv.jsonl"; : > "$J"
  fi
  for c in "${cases[@]}"; do
    IFS=: read -r shape method ckpt <<< "$c"
    for n in "${counts[@]}"; do
      [ "$n" -le "$NGPU" ] || continue
      for z in "${zeros[@]}"; do
        [ "$n" = 1 ] && [ "$z" != 0 ] && continue
        runone "$shape" "$method" "$ckpt" "$n" "$z" nccl
      done
    done
    if [ "${HOST:-0}" = 1 ]; then
      top=1; for n in "${counts[@]}"; do [ "$n" -le "$NGPU" ] && top=$n; done
      [ "$top" -gt 1 ] && runone "$shape" "$method" "$ckpt" "$top" 0 host
    fi
  done
  python3 - "$J" <<'PY' | tee -a "$R"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = {(r["shape"], r["method"]): r["tokens_per_s"] for r in rows if r["gpus"] == 1}
print("| case | GPUs | zero | transport | tok/s | tok/s per GPU | scaling efficiency | peak MiB per GPU | optimizer state MB per GPU |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    b = base.get((r["shape"], r["method"]))
    per = r["tokens_per_s"] / r["gpus"]
    eff = f"{per / b:.2f}" if b else "?"
    peak = "/".join(f"{p:.0f}" for p in (r["peak_mib"] or []) if p is not None)
    st = "/".join(f"{s / 1e6:.0f}" for s in (r["opt_state_bytes"] or []))
    print(f"| {r['shape']} {r['method']} | {r['gpus']} | {r['zero']} | {r['transport']} | {r['tokens_per_s']:,.0f} | {per:,.0f} | {eff} | {peak} | {st} |")
PY
  ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
