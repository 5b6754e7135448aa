#!/usr/bin/env sh
# Interop check for the `dataset` and `messages` stages against Hugging Face
# `datasets` (+ pandas, pyarrow) and TRL's data utilities:
#
#   - every output Parquet loads with pyarrow, Dataset.from_parquet and
#     load_dataset("parquet"); `messages` is a list of {role, content} strings;
#   - rows hold exactly the source values / template renderings (unicode, emoji,
#     slashes, quotes, backslashes, newlines, tabs, control chars, long text,
#     multi-turn sources, a system prompt file);
#   - `export: jsonl` is byte-identical to `Dataset.to_json()` of the same Parquet;
#   - trl.data_utils.is_conversational / maybe_apply_chat_template accept the
#     conversations, and the instruction output is TRL's prompt-completion type.
#
#   scripts/interop/datasets_messages.sh        (from the repository root or anywhere)
#
# Env: PIPE_BIN (default ${CARGO_TARGET_DIR:-target}/debug/pipe, built with
# `cargo build` if missing), INTEROP_VENV (default
# /var/tmp/pipe-interop-datasets-venv: not the model_tokenizer.sh venv, whose
# transformers 4.x pins huggingface_hub<1 while current `datasets` needs >=1),
# KEEP=1 keeps the temporary workspace.
# Needs python3 + pip (PyPI only). torch is NOT installed: TRL goes in with
# --no-deps; transformers (no torch) and jinja2 are added because
# trl.data_utils imports transformers at module level.
# Exit status 0 when every check passes, 1 otherwise.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv="${INTEROP_VENV:-/var/tmp/pipe-interop-datasets-venv}"

if [ -n "${PIPE_BIN:-}" ]; then
    case "$PIPE_BIN" in /*) pipe="$PIPE_BIN" ;; *) pipe="$root/$PIPE_BIN" ;; esac
else
    target="${CARGO_TARGET_DIR:-target}"
    case "$target" in /*) ;; *) target="$root/$target" ;; esac
    pipe="$target/debug/pipe"
fi
if [ ! -x "$pipe" ]; then
    echo "pipe binary $pipe is missing: cargo build" >&2
    (cd "$root" && cargo build --quiet)
fi
[ -x "$pipe" ] || { echo "error: no pipe binary at $pipe" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
fi
if ! "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ["datasets", "pyarrow", "pandas", "trl", "transformers", "jinja2", "tokenizers"]))'; then
    # trl.data_utils does `from transformers import PreTrainedTokenizerBase, ProcessorMixin`;
    # transformers works without torch for tokenizers and chat templates.
    "$venv/bin/pip" install --quiet datasets pyarrow pandas transformers jinja2
    "$venv/bin/pip" install --quiet --no-deps trl
fi
if "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)'; then
    echo "warning: torch is installed in $venv; this check is meant to run without it" >&2
fi

ws=$(mktemp -d "${TMPDIR:-/tmp}/pipe-interop-datasets.XXXXXX")
if [ "${KEEP:-}" = 1 ]; then
    echo "workspace: $ws (kept)"
else
    trap 'rm -rf "$ws"' EXIT
fi
mkdir -p "$ws/.pipe"
export HF_DATASETS_CACHE="$ws/hf-cache" HF_HOME="$ws/hf-home" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
"$venv/bin/python" "$here/datasets_messages.py" gen --ws "$ws"

echo "pipe: $pipe (repo at $(git -C "$root" log -1 --format='%h %s' 2>/dev/null | cut -c1-80))"
if ! (cd "$ws" && "$pipe" run pipeline.yaml); then
    echo "FAIL: pipe run failed" >&2
    for s in ds chat multi inst; do (cd "$ws" && "$pipe" show "$s" --log 2>/dev/null | tail -20) || true; done
    exit 1
fi
set --
for s in ds chat multi inst; do
    set -- "$@" --out "$s=$(cd "$ws" && "$pipe" show "$s" --path)"
done
"$venv/bin/python" "$here/datasets_messages.py" check --ws "$ws" "$@"
