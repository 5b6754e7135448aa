#!/usr/bin/env sh
# Interop check for stages/src/evaluate/gsm8k.rs against the real lm-evaluation-harness
# (lm_eval, `--model local-chat-completions --apply_chat_template`) on its gsm8k_cot and gsm8k tasks:
#   - lm_eval_gsm8k_logic.py runs lm_eval (its own task yamls, dataset swapped for 30 made-up test and
#     40 train docs in a temp dir) against a mock OpenAI chat server on 127.0.0.1 that records every
#     request and serves canned responses exercising the filters; both tasks, with and without
#     fewshot_as_multiturn, with and without --system_instruction, default and custom num_fewshot;
#     it also calls lm_eval's regex filters / exact_match / mean_stderr and CPython's
#     random.Random(1234).sample on extra tricky inputs, and writes everything to a JSON fixture;
#   - the Rust test `gsm8k::tests::lm_eval_fixture` (cargo test -p pipe-stages) then checks that the
#     module gives the same request bodies (messages, stop, max_tokens, temperature, seed), targets,
#     filtered responses, per-doc exact_match, mean and stderr (bit for bit), and few-shot draws.
#
#   scripts/interop/lm_eval_gsm8k_logic.sh        (from the repository root or anywhere)
#
# Env: PIPE_LMEVAL_VENV (default /var/tmp/pipe-lmeval-venv), PIPE_LMEVAL_SPEC (default
# "lm_eval[api]==0.4.13", the version the module was checked against), FIXTURE (default: a temp file;
# set it to keep the dump), SKIP_RUST=1 only writes the fixture.
# Needs python3 + pip (PyPI only; lm_eval[api] pulls datasets, evaluate, scikit-learn... but not torch,
# ~1 GB) and cargo. No network beyond PyPI: no tokenizer or dataset is downloaded. About a minute.
# Exit status 0 when everything matches, 1 otherwise.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv="${PIPE_LMEVAL_VENV:-/var/tmp/pipe-lmeval-venv}"
spec="${PIPE_LMEVAL_SPEC:-lm_eval[api]==0.4.13}"

if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import lm_eval.models.openai_completions, yaml' 2>/dev/null; }; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "$spec"
fi

ws=$(mktemp -d "${TMPDIR:-/tmp}/pipe-lmeval-gsm8k.XXXXXX")
trap 'rm -rf "$ws"' EXIT
fixture="${FIXTURE:-$ws/fixture.json}"
export HF_HOME="$ws/hf" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
# From the repository root: lm_eval records `git describe` of the working directory.
if ! (cd "$root" && "$venv/bin/python" "$here/lm_eval_gsm8k_logic.py" --out "$fixture"); then
    echo "FAIL: lm_eval run (see above)" >&2
    exit 1
fi
[ "${SKIP_RUST:-}" = 1 ] && { echo "fixture written: $fixture"; exit 0; }

log=$(mktemp "${TMPDIR:-/tmp}/gsm8k-lmeval-cargo.XXXXXX")
status=0
(cd "$root" && PIPE_LMEVAL_GSM8K_FIXTURE="$fixture" \
    cargo test --quiet -p pipe-stages --lib gsm8k::tests::lm_eval_fixture -- --nocapture) >"$log" 2>&1 || status=$?
if [ "$status" = 0 ] && grep -q '^PASS: ' "$log"; then
    grep '^PASS: ' "$log"
    rm -f "$log"
    echo "PASS: stages/src/evaluate/gsm8k.rs matches lm_eval"
else
    grep -E '^MISMATCH|mismatches|error|panicked' "$log" | head -60 >&2 || true
    if grep -q 'running 0 tests' "$log" && ! grep -q '^PASS: ' "$log"; then
        echo "hint: the test did not run; is evaluate::gsm8k declared in stages/src (mod evaluate; mod gsm8k;)?" >&2
    fi
    echo "FAIL: see $log" >&2
    exit 1
fi
