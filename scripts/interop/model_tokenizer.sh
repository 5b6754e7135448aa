#!/usr/bin/env sh
# Interop check for the `model` stage's GGUF import: the tokenizer.json pipe
# rebuilds from SmolLM2-135M-Instruct's GGUF vocabulary must give the same ids
# as `transformers` (PreTrainedTokenizerFast over our file, and transformers'
# own GGUF tokenizer loader), on a few hundred lines of text and on chat
# template renderings.
#
#   scripts/fetch-test-assets.sh && scripts/interop/model_tokenizer.sh
#
# Needs python3 + pip (PyPI only). torch is NOT installed: transformers 4.x builds
# tokenizers (also from a GGUF) without it; transformers 5 imports torch for GGUF.
# The venv lives in ${PIPE_INTEROP_VENV:-/var/tmp/pipe-interop-venv}.
set -eu

. "$(dirname "$0")/lib.sh"
venv="${PIPE_INTEROP_VENV:-/var/tmp/pipe-interop-venv}"
pipe="${PIPE_BIN:-$target/release/pipe}"
if [ ! -x "$pipe" ]; then
    (cd "$root" && cargo build --release --quiet)
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "transformers>=4.45,<5" tokenizers gguf jinja2 sentencepiece protobuf
fi

ws=$(mktemp -d "${TMPDIR:-/tmp}/pipe-interop.XXXXXX")
trap 'rm -rf "$ws"' EXIT
mkdir -p "$ws/.pipe" "$ws/models"
ln "$gguf" "$ws/models/smollm2.gguf" 2>/dev/null || cp "$gguf" "$ws/models/smollm2.gguf"
cat > "$ws/pipeline.yaml" <<'YAML'
stages:
  base:
    kind: model
    source: models/smollm2.gguf
YAML
(cd "$ws" && "$pipe" run pipeline.yaml >/dev/null)
out=$(cd "$ws" && "$pipe" show base --path)
"$venv/bin/python" "$here/model_tokenizer.py" --ours "$out" --gguf "$gguf"
