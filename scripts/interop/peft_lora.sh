#!/usr/bin/env sh
# Interop check for the `train` stage's outputs on the real SmolLM2-135M-Instruct
# (the GGUF imported by a `model` stage to an f32 HF folder):
#   - `peft.PeftModel.from_pretrained` loads pipe's LoRA adapter (r 8,
#     all-linear; once with modules_to_save [lm_head] on this tied-embedding
#     model, once without) with no missing/unexpected-key warnings, and gives
#     the same logits as pipe (`Llama::load_peft`, the `logits` example);
#   - `transformers` loads pipe's full fine-tune folder (method: full) with no
#     missing/unexpected keys, and gives the same logits as pipe.
# Bound: max abs diff < 1e-4 in f32. Each model is trained for 3 steps on a
# handful of chat samples (seq <= 256, batch 2), with a learning rate high
# enough that it clearly moves away from the base.
#
#   scripts/fetch-test-assets.sh && scripts/interop/peft_lora.sh
#
# Needs python3 + pip (PyPI only) and cargo (unless PIPE_BIN and LOGITS_BIN).
# The venv lives in ${PIPE_INTEROP_VENV:-/var/tmp/pipe-interop-peft-venv}: torch
# from PyPI (it pulls the CUDA libraries, several GB; only the CPU is used),
# transformers 4.x, peft, safetensors, numpy. A few minutes of CPU.
# PIPE_INTEROP_WS=DIR keeps the pipe workspace there (reruns hit the cache).
set -eu

. "$(dirname "$0")/lib.sh"
venv="${PIPE_INTEROP_VENV:-/var/tmp/pipe-interop-peft-venv}"
pipe="${PIPE_BIN:-$target/release/pipe}"
logits="${LOGITS_BIN:-$target/release/examples/logits}"
if [ -z "${PIPE_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
fi
if [ -z "${LOGITS_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet -p pipe-stages --example logits)
fi
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import torch, transformers, peft, safetensors, numpy' 2>/dev/null; }; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet torch "transformers>=4.45,<5" peft safetensors numpy
fi

if [ -n "${PIPE_INTEROP_WS:-}" ]; then
    ws=$PIPE_INTEROP_WS  # kept: a rerun reuses pipe's cache
    mkdir -p "$ws"
else
    ws=$(mktemp -d "${TMPDIR:-/tmp}/pipe-interop-peft.XXXXXX")
    trap 'rm -rf "$ws"' EXIT
fi
mkdir -p "$ws/.pipe" "$ws/models" "$ws/data"
[ -f "$ws/models/smollm2.gguf" ] || ln "$gguf" "$ws/models/smollm2.gguf" 2>/dev/null || cp "$gguf" "$ws/models/smollm2.gguf"
cat > "$ws/data/chat.jsonl" <<'JSONL'
{"q": "What is the capital of France?", "a": "The capital of France is Paris."}
{"q": "How many legs does a spider have?", "a": "A spider has eight legs."}
{"q": "Natalia sold 48 clips in April and half as many in May. How many clips did she sell in total?", "a": "In May she sold 48 / 2 = 24 clips, so in total she sold 48 + 24 = 72 clips."}
{"q": "Translate 'good morning' into Spanish.", "a": "'Good morning' in Spanish is 'buenos días'."}
{"q": "Name three primary colors.", "a": "Red, yellow and blue."}
{"q": "What is 12 times 11?", "a": "12 times 11 is 132."}
{"q": "Write a haiku about rain.", "a": "Soft rain on the roof,\nthe garden drinks quietly,\nclouds hum a grey song."}
{"q": "Who wrote 'Pride and Prejudice'?", "a": "Jane Austen wrote 'Pride and Prejudice', published in 1813."}
JSONL
cat > "$ws/pipeline.yaml" <<'YAML'
stages:
  base:
    kind: model
    source: models/smollm2.gguf
  ds:
    kind: dataset
    source: data/chat.jsonl
  chat:
    kind: messages
    inputs: {data: ds}
    user: "{{ q }}"
    assistant: "{{ a }}"
  packed:
    kind: pack
    inputs: {data: chat, model: base}
    max_seq_length: 256
  lora_mts:
    kind: train
    inputs: {model: base, data: packed}
    method: lora
    lora: {r: 8, alpha: 16, target: all-linear, modules_to_save: [lm_head]}
    learning_rate: 5.0e-3
    lr_scheduler: constant
    per_device_batch_size: 2
    max_steps: 3
  lora:
    kind: train
    inputs: {model: base, data: packed}
    method: lora
    lora: {r: 8, alpha: 16, target: all-linear}
    learning_rate: 5.0e-3
    lr_scheduler: constant
    per_device_batch_size: 2
    max_steps: 3
  full:
    kind: train
    inputs: {model: base, data: packed}
    method: full
    learning_rate: 2.0e-4
    lr_scheduler: constant
    per_device_batch_size: 2
    max_steps: 3
  merged:
    kind: merge
    inputs: {model: base, adapter: lora_mts}
YAML
(cd "$ws" && "$pipe" run pipeline.yaml >/dev/null)
path() { (cd "$ws" && "$pipe" show "$1" --path); }
"$venv/bin/python" "$here/peft_lora.py" --logits-bin "$logits" --base "$(path base)" \
    --adapter "lora_mts=$(path lora_mts)" --adapter "lora=$(path lora)" --full "full=$(path full)" \
    --merged "merged=$(path merged)=$(path lora_mts)"
