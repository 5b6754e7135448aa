#!/usr/bin/env bash
# Serve benchmark, CPU: generation throughput of `pipe serve` vs transformers
# `model.generate` on SmolLM2-135M-Instruct (the real GGUF, imported by a
# `model` stage to an f32 HF folder), in one run on this machine:
#
#   pipe:          `pipe serve MODEL --port 0`, then benches/serve/load.py: one
#                  streamed request (batch-1 decode tok/s = (tokens - 1) / (last
#                  chunk - first chunk)), then C concurrent chat completions for
#                  each C in LEVELS (max_tokens M, temperature 0, ignore_eos:
#                  exactly M tokens each), total tok/s = tokens / wall.
#   transformers:  benches/serve/hf_generate.py on the same folder, after the
#                  server is stopped: greedy generate, min = max_new_tokens = M,
#                  batch-1 decode tok/s (same definition, from per-step time
#                  stamps), and one generate call over B prompts for each B in
#                  LEVELS, total tok/s = B * M / wall.
#
# Same prompts on both sides (benches/serve/prompts.py, chat template applied).
# Prints a table of both and the ratios pipe / transformers. Not a test: it
# asserts nothing about speed. Results go to $BENCH_DIR/results.txt.
#
# Usage:
#   benches/serve.sh
#   QUICK=1 benches/serve.sh            # M=16, LEVELS=1,8
#   M=128 LEVELS=1,16 benches/serve.sh
#   FEWSHOT=8 LEVELS=1,8 benches/serve.sh   # the evaluate stage's ~800-token 8-shot prompts
# Environment:
#   M          tokens generated per request (default 64; QUICK: 16)
#   LEVELS     concurrency / batch sizes (default 1,8,32,64; QUICK: 1,8)
#   FEWSHOT    gsm8k_cot exemplars before each question, 0-8 (default 0; benches/serve/prompts.py)
#   BENCH_DIR  work dir, outside the repo (default /var/tmp/pipe-bench-serve)
#   PIPE_BIN / PIPE_REV / CARGO_TARGET_DIR   as in benches/lib.sh
#   PIPE_TEST_ASSETS  where SmolLM2-135M-Instruct.Q4_1.gguf is (default /var/tmp/pipe-assets)
#   BENCH_VENV  venv with torch, transformers<5, openai (default
#               /var/tmp/pipe-interop-venv, shared with scripts/interop/openai_client.sh;
#               created if missing: torch from PyPI pulls the CUDA libraries, several GB)
#
# Needs: bash, python3, cargo (unless PIPE_BIN). ~10 minutes on 2 cores.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$REPO/benches/serve
BENCH_DIR=${BENCH_DIR:-/var/tmp/pipe-bench-serve}
if [[ -n "${QUICK:-}" ]]; then M=${M:-16}; LEVELS=${LEVELS:-1,8}; fi
M=${M:-64}
LEVELS=${LEVELS:-1,8,32,64}
export FEWSHOT=${FEWSHOT:-0}
ASSETS=${PIPE_TEST_ASSETS:-/var/tmp/pipe-assets}
GGUF=$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf
VENV=${BENCH_VENV:-/var/tmp/pipe-interop-venv}
PY=$VENV/bin/python

export NO_COLOR=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=

# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
init_bench_dir
RESULTS=$BENCH_DIR/results.txt

private_pipe
ensure_gguf
if ! { [[ -x "$PY" ]] && "$PY" -c 'import torch, transformers, openai, safetensors, numpy' 2>/dev/null; }; then
  log "installing torch, transformers<5, openai into $VENV"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet torch "transformers>=4.45,<5" openai safetensors numpy
fi

# ---------------------------------------------------------------- model folder (kept: reruns hit the cache)
WS=$BENCH_DIR/ws
OUT=$BENCH_DIR/out
rm -rf "$OUT" && mkdir -p "$WS/.pipe" "$WS/models" "$OUT"
[[ -f "$WS/models/smollm2.gguf" ]] || ln "$GGUF" "$WS/models/smollm2.gguf" 2>/dev/null || cp "$GGUF" "$WS/models/smollm2.gguf"
printf 'stages:\n  base:\n    kind: model\n    source: models/smollm2.gguf\n' >"$WS/pipeline.yaml"
(cd "$WS" && "$PIPE" run pipeline.yaml) >"$OUT/pipe-run.out" 2>&1 || { tail -n 30 "$OUT/pipe-run.out" >&2; die "pipe run failed"; }
MODEL_DIR=$(cd "$WS" && "$PIPE" show base --path)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- pipe serve + load.py
log "pipe serve, load.py (M $M, concurrency $LEVELS)"
"$PIPE" serve "$MODEL_DIR" --port 0 --model-name smollm2 2>"$OUT/serve.log" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
URL=
for _ in $(seq 600); do
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/serve.log" >&2; die "pipe serve exited"; }
  URL=$(sed -n 's|.*serving .* on \(http://[^ ]*\).*|\1|p' "$OUT/serve.log" | head -n 1)
  [[ -n $URL ]] && break
  sleep 0.5
done
[[ -n $URL ]] || die "pipe serve did not print 'serving ... on http://...' (see $OUT/serve.log)"
"$PY" "$HERE/load.py" --base-url "$URL/v1" --model smollm2 --max-tokens "$M" --concurrency "$LEVELS" --server-pid "$SERVER" | tee "$OUT/pipe.jsonl"
kill -TERM "$SERVER"
wait "$SERVER" || echo "warning: pipe serve exited with $? on SIGTERM" >&2
trap - EXIT

# ---------------------------------------------------------------- transformers
log "transformers generate (M $M, batches $LEVELS)"
"$PY" "$HERE/hf_generate.py" --model "$MODEL_DIR" --max-new-tokens "$M" --batches "$LEVELS" | tee "$OUT/hf.jsonl"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
"$PY" - "$OUT" "M=$M LEVELS=$LEVELS FEWSHOT=$FEWSHOT benches/serve.sh" "$("$PIPE" --version) ($PIPE_SRC)" "$LOAD_START" "$LOAD_END" >"$RESULTS" <<'EOF'
import json, os, sys
out, cmd, ver, l0, l1 = sys.argv[1:]
rd = lambda f: [json.loads(l) for l in open(os.path.join(out, f)) if l.startswith("{")]
p, h = rd("pipe.jsonl"), rd("hf.jsonl")
s1 = next(x for x in p if x.get("event") == "stream1")
hb = {x["batch"]: x for x in h if "batch" in x}
rows = [("decode tok/s, batch 1 (per sequence)", s1["decode_tok_s"], hb.get(1, {}).get("decode_tok_s"))]
rows.append(("first token s, batch 1 (lower is better)", s1["ttft_s"], hb.get(1, {}).get("prefill_s")))
for x in p:
    if x.get("event") == "concurrency":
        c = x["concurrency"]
        rows.append((f"total tok/s, {c} concurrent / batch {c}" + ("" if x["exact"] else " (pipe: not all M!)"),
                     x["total_tok_s"], hb.get(c, {}).get("total_tok_s")))
print(f"# {cmd}\n# pipe {ver}; transformers {h[0].get('transformers')}, torch {h[0].get('torch')}, "
      f"{h[0].get('threads')} threads; load avg {l0} -> {l1}")
oth = lambda xs: max([x.get("others_cpus") or 0 for x in xs] or [0])
print(f"# CPUs kept busy by other processes (max over levels): pipe side {oth([x for x in p if 'concurrency' in x]):.2f}, "
      f"transformers side {oth(hb.values()):.2f} (> ~0.2: disturbed, rerun on a quiet machine)")
print(f"{'':44} {'pipe':>10} {'transformers':>13} {'pipe/tf':>8}")
for name, a, b in rows:
    r = f"{a / b:.2f}" if a and b else "-"
    print(f"{name:44} {a if a is not None else '-':>10} {b if b is not None else '-':>13} {r:>8}")
EOF
echo
cat "$RESULTS"
echo
echo "(also in $RESULTS; JSON lines and logs in $OUT)"
