#!/usr/bin/env sh
# Interop check for `pipe serve` with the real `openai` Python client, on the
# real SmolLM2-135M-Instruct (the GGUF imported by a `model` stage to an f32
# HF folder), served on a free port (--port 0). openai_client.py checks:
#   - /health, /v1/models; a chat completion (content, finish_reason, usage:
#     prompt_tokens = the chat-templated prompt's length per transformers'
#     AutoTokenizer on the same folder, completion_tokens <= max_tokens);
#   - greedy determinism; streaming (chunks concatenate to the greedy text,
#     last chunk's finish_reason, [DONE]); stop strings (string and list);
#     max_tokens 5 -> "length" and 5 tokens; seed + temperature 0.8
#     reproducible; /v1/completions;
#   - errors, OpenAI-shaped: unknown model 404, bad fields / missing messages /
#     malformed JSON 400, prompt over max_position_embeddings 413;
#   - the greedy answer (32 tokens, f32) equals transformers' generate
#     (do_sample=False); on a divergence prints both, the first differing
#     token and transformers' top-2 logit gap there.
# Then SIGTERM must stop the server, exit status 0, within 30 s.
#
#   scripts/fetch-test-assets.sh && scripts/interop/openai_client.sh
#
# Needs python3 + pip (PyPI only) and cargo (unless PIPE_BIN). The venv lives
# in ${PIPE_INTEROP_VENV:-/var/tmp/pipe-interop-venv}: torch from PyPI (it
# pulls the CUDA libraries, several GB; only the CPU is used), transformers
# 4.x, openai, safetensors, numpy. About a minute of CPU after the build.
# PIPE_INTEROP_WS=DIR keeps the pipe workspace there (reruns hit the cache).
set -eu

. "$(dirname "$0")/lib.sh"
venv="${PIPE_INTEROP_VENV:-/var/tmp/pipe-interop-venv}"
pipe="${PIPE_BIN:-$target/release/pipe}"
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
if [ -z "${PIPE_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
fi
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import torch, transformers, openai, safetensors, numpy' 2>/dev/null; }; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet torch "transformers>=4.45,<5" openai safetensors numpy
fi

server=
if [ -n "${PIPE_INTEROP_WS:-}" ]; then
    ws=$PIPE_INTEROP_WS  # kept: a rerun reuses pipe's cache
    mkdir -p "$ws"
    trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true' EXIT
else
    ws=$(mktemp -d "${TMPDIR:-/tmp}/pipe-interop-serve.XXXXXX")
    trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true; rm -rf "$ws"' EXIT
fi
mkdir -p "$ws/.pipe" "$ws/models"
[ -f "$ws/models/smollm2.gguf" ] || ln "$gguf" "$ws/models/smollm2.gguf" 2>/dev/null || cp "$gguf" "$ws/models/smollm2.gguf"
printf 'stages:\n  base:\n    kind: model\n    source: models/smollm2.gguf\n' > "$ws/pipeline.yaml"
(cd "$ws" && "$pipe" run pipeline.yaml >/dev/null)
model_dir=$(cd "$ws" && "$pipe" show base --path)

"$pipe" serve "$model_dir" --port 0 --model-name smollm2 2> "$ws/serve.log" &
server=$!
url=
i=0
while [ -z "$url" ]; do
    kill -0 "$server" 2>/dev/null || { cat "$ws/serve.log" >&2; echo "error: pipe serve exited" >&2; exit 1; }
    i=$((i + 1))
    [ "$i" -le 600 ] || { cat "$ws/serve.log" >&2; echo "error: no 'serving ... on http://' line" >&2; exit 1; }
    sleep 0.5
    url=$(sed -n 's|.*serving .* on \(http://[^ ]*\).*|\1|p' "$ws/serve.log" | head -n 1)
done

rc=0
"$venv/bin/python" "$here/openai_client.py" --base-url "$url" --model-dir "$model_dir" --model-name smollm2 || rc=1

kill -TERM "$server"
i=0
while kill -0 "$server" 2>/dev/null && [ "$i" -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
if kill -0 "$server" 2>/dev/null; then
    echo "FAIL SIGTERM: pipe serve still running after 30 s"; rc=1
elif wait "$server"; then
    echo "PASS SIGTERM: graceful shutdown, exit status 0"
else
    echo "FAIL SIGTERM: exit status $?"; rc=1
fi
server=
exit $rc
