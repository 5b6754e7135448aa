#!/usr/bin/env bash
# Pack benchmark (issue 3): tokenize + chat template + assistant-only loss mask +
# BFD packing of N synthetic Orca-Math-like chat samples (~550 tokens each:
# the seed's system prompt, a math word problem, a step-by-step answer) with the
# SmolLM2-135M-Instruct tokenizer, 1024-token rows:
#
#   pipe:   model (the real GGUF) -> dataset (JSONL) -> messages -> pack
#           (max_seq_length 1024, packing bfd, loss_on assistant); only the
#           `pack` stage is timed: `pipe run --force pack` after a first run.
#           SmolLM2's tokenizer.json takes pack's own exact byte-level BPE
#           (stages/src/bpe.rs); pipe's log would say if it fell back to the
#           `tokenizers` crate (see "pipe also printed" in the report).
#   Python: transformers `apply_chat_template` (fast tokenizer, assistant masks)
#           + datasets `map(batched=True, num_proc=NUM_PROC)` + TRL's
#           `pack_dataset(strategy="bfd")`, over pipe's `messages` Parquet, with
#           the tokenizer pipe's `model` stage wrote (benches/pack/trl_pack.py).
#
# Prints tokens/s of both, the ratio (goal >= 10x), peak RSS of both, and sanity
# checks (token counts, trainable tokens, rows, a sample-by-sample comparison
# of the two outputs). Not a test: it asserts nothing about speed.
# Results go to $BENCH_DIR/results.txt.
#
# Usage:
#   benches/pack.sh                 # N=100000
#   N=2000 benches/pack.sh          # quick check
# Environment:
#   N                 samples (default 100000)
#   BENCH_DIR         work dir, outside the repo (default /var/tmp/pipe-bench-pack);
#                     generated data is kept there and reused
#   PIPE_BIN          a built pipe binary (skips `cargo build --release`)
#   PIPE_REV          build this git revision (exported with `git archive` to
#                     $BENCH_DIR/src-REV) instead of the working tree
#   CARGO_TARGET_DIR  target dir for the build (default /var/tmp/pipe-target)
#   PIPE_TEST_ASSETS  where SmolLM2-135M-Instruct.Q4_1.gguf is (default
#                     /var/tmp/pipe-assets; fetched with scripts/fetch-test-assets.sh if missing)
#   BENCH_VENV        venv for transformers/datasets/TRL (default /var/tmp/pipe-bench-pack-venv)
#   NUM_PROC          datasets `num_proc` on the Python side (default 2, the CPU count here)
#   PIPE_RUNS         timed `pipe run --force pack` runs, median reported (default 3)
#   PY_RUNS           timed Python runs, median reported (default 1)
#   CHECK=0           skip the sample-by-sample output comparison
#
# Needs: bash, python3 (with venv; PyPI reachable the first time), cargo (unless
# PIPE_BIN), GNU time at /usr/bin/time (apt-get install -y time).
# torch is NOT installed: transformers and datasets work without it, and TRL
# goes in with --no-deps (trl.data_utils needs only transformers, datasets,
# pyarrow, numpy); jinja2 is added for apply_chat_template.
set -euo pipefail

# The knobs this run was given, for the report's "command:" line.
CMDLINE_ENV=()
for v in N BENCH_DIR PIPE_BIN PIPE_REV CARGO_TARGET_DIR PIPE_TEST_ASSETS BENCH_VENV NUM_PROC PIPE_RUNS PY_RUNS CHECK; do
  if [[ -n "${!v:-}" ]]; then CMDLINE_ENV+=("$v=${!v}"); fi
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$REPO/benches/pack
BENCH_DIR=${BENCH_DIR:-/var/tmp/pipe-bench-pack}
N=${N:-100000}
NUM_PROC=${NUM_PROC:-2}
PIPE_RUNS=${PIPE_RUNS:-3}
PY_RUNS=${PY_RUNS:-1}
CHECK=${CHECK:-1}
SEQ=1024
SEED=0
ASSETS=${PIPE_TEST_ASSETS:-/var/tmp/pipe-assets}
GGUF=$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf
VENV=${BENCH_VENV:-/var/tmp/pipe-bench-pack-venv}
PY=$VENV/bin/python
TIME=/usr/bin/time

export NO_COLOR=1 TRANSFORMERS_VERBOSITY=error \
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
unset CUDA_VISIBLE_DEVICES || true

# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
init_bench_dir
RESULTS=$BENCH_DIR/results.txt
RUN_DIR=$BENCH_DIR/run-$N
need_gnu_time

# ---------------------------------------------------------------- pipe
private_pipe

# ---------------------------------------------------------------- model, venv
ensure_gguf

if ! { [[ -x "$PY" ]] && "$PY" -c 'import transformers, datasets, trl.data_utils, jinja2' 2>/dev/null; }; then
  log "installing transformers, datasets, jinja2 and trl (--no-deps) into $VENV (no torch)"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet transformers datasets jinja2
  "$VENV/bin/pip" install --quiet --no-deps trl
fi
if "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)'; then
  echo "warning: torch is installed in $VENV; this benchmark is meant to run without it" >&2
fi
"$PY" -c 'import sys; from trl.data_utils import pack_dataset; sys.exit("torch" in sys.modules)' 2>/dev/null \
  || die "trl.data_utils.pack_dataset does not import without torch in $VENV"

# ---------------------------------------------------------------- data
DATA=$BENCH_DIR/data/train-$N-seed$SEED.jsonl
mkdir -p "$BENCH_DIR/data"
if [[ ! -f "$DATA" || "$HERE/gen_data.py" -nt "$DATA" ]]; then
  log "generating $N samples into $DATA"
  python3 "$HERE/gen_data.py" --n "$N" --seed "$SEED" --out "$DATA"
fi

# ---------------------------------------------------------------- workspace
# A fresh workspace each time; the GGUF and the data are hard links (copies
# across file systems).
WS=$RUN_DIR/ws
TIMES=$RUN_DIR/times
rm -rf "$RUN_DIR"
mkdir -p "$WS/.pipe" "$WS/models" "$WS/data" "$WS/prompts" "$TIMES"
ln "$GGUF" "$WS/models/smollm2.gguf" 2>/dev/null || cp "$GGUF" "$WS/models/smollm2.gguf"
ln "$DATA" "$WS/data/train.jsonl" 2>/dev/null || cp "$DATA" "$WS/data/train.jsonl"
cp "$HERE/system.txt" "$WS/prompts/system.txt"
cat >"$WS/pipeline.yaml" <<YAML
# generated by benches/pack.sh
stages:
  model:
    kind: model
    source: models/smollm2.gguf
  data:
    kind: dataset
    source: data/train.jsonl
  chat:
    kind: messages
    inputs: {data: data}
    system_file: prompts/system.txt
    user: "{{ question }}"
    assistant: "{{ answer }}"
  pack:
    kind: pack
    inputs: {data: chat, model: model}
    max_seq_length: $SEQ
    packing: bfd
    loss_on: assistant
YAML

# tv NAME CMD... : run under GNU time -v in $WS; stdout+stderr -> $TIMES/NAME.out,
# time's report -> $TIMES/NAME.time. Prints "WALL_S MAXRSS_KB CPU_S OTHERS":
# wall from date +%s%N (time -v rounds to 10 ms), CPU = user + system of the
# command and its children, OTHERS = CPUs kept busy by everything else on the
# machine meanwhile (busy time from /proc/stat minus the command's CPU, over
# the wall time): other engineers' builds show up there.
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
tv() {
  local name=$1 s e b0 b1; shift
  b0=$(busy); s=$(date +%s%N)
  (cd "$WS" && "$TIME" -v -o "$TIMES/$name.time" "$@") >"$TIMES/$name.out" 2>&1 \
    || { echo "FAILED: $* (see $TIMES/$name.out)" >&2; tail -n 30 "$TIMES/$name.out" >&2; return 1; }
  e=$(date +%s%N); b1=$(busy)
  awk -F': ' -v ns=$((e - s)) -v busy=$((b1 - b0)) -v hz="$(getconf CLK_TCK)" '
    /Maximum resident set size/ { r = $2 }
    /User time \(seconds\)/ { u = $2 }
    /System time \(seconds\)/ { y = $2 }
    END { w = ns / 1e9; o = (busy / hz - u - y) / w; if (o < 0) o = 0
          printf "%.3f %d %.2f %.2f\n", w, r, u + y, o }' "$TIMES/$name.time"
}
took() { # STAGE -> seconds the stage's last run took (`pipe show STAGE --json`: duration_ms)
  (cd "$WS" && "$PIPE" show "$1" --json) | python3 -c '
import json, sys
d = json.load(sys.stdin).get("duration_ms")
print("nan" if d is None else f"{d / 1000:.3f}")'
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
cat "$DATA" "$GGUF" >/dev/null   # page cache

log "first run: pipe run (model, dataset, messages, pack)"
FIRST=$(tv pipe-first "$PIPE" run pipeline.yaml)
T_MODEL=$(took model); T_DATA=$(took data); T_CHAT=$(took chat); T_PACK_FIRST=$(took pack)
MODEL_DIR=$(cd "$WS" && "$PIPE" show model --path)
CHAT_DIR=$(cd "$WS" && "$PIPE" show chat --path)
CHAT_PQ=$(ls "$CHAT_DIR"/*.parquet | head -n 1)
[[ -f "$CHAT_PQ" ]] || die "no Parquet in the messages output $CHAT_DIR"

log "pipe run --force pack ($PIPE_RUNS runs)"
: >"$TIMES/pipe-runs.txt"
for ((k = 1; k <= PIPE_RUNS; k++)); do
  L=$(cut -d' ' -f1 /proc/loadavg)
  read -r W M C O < <(tv "pipe-pack-$k" "$PIPE" run --force pack pipeline.yaml pack)
  echo "$W $M $C $(took pack) $L $O" >>"$TIMES/pipe-runs.txt"   # wall maxrss_kb cpu took load1 others
  echo "  run $k: wall $W s, CPU $C s, peak RSS $((M / 1024)) MiB, took $(took pack) s (load $L, other processes busy $O CPUs)" >&2
done
PACK_DIR=$(cd "$WS" && "$PIPE" show pack --path)
PIPE_PQ=$(ls "$PACK_DIR"/*.parquet | head -n 1)
cp "$PACK_DIR/stats.json" "$TIMES/pipe-stats.json"
# Anything pipe said beyond its usual progress lines (warnings, notes).
cat "$TIMES"/pipe-first.out "$TIMES"/pipe-pack-*.out \
  | grep -v -E ': (running|cached) \(|: done in |stage\(s\):|samples tokenized$|rows read$|: [^ ]+\.parquet: [0-9]+ rows$|dequantising' \
  | sort -u >"$TIMES/pipe-messages.txt" || true

log "Python: transformers apply_chat_template + datasets map (num_proc=$NUM_PROC) + TRL pack_dataset bfd ($PY_RUNS runs)"
: >"$TIMES/py-runs.txt"
for ((k = 1; k <= PY_RUNS; k++)); do
  L=$(cut -d' ' -f1 /proc/loadavg)
  PYTMP=$RUN_DIR/py-tmp-$k
  rm -rf "$PYTMP" && mkdir -p "$PYTMP"
  # A fresh datasets cache per run: nothing is reused between runs.
  read -r W M C O < <(HF_DATASETS_CACHE=$PYTMP/hf-cache HF_HOME=$PYTMP/hf-home TMPDIR=$PYTMP \
    tv "py-$k" "$PY" "$HERE/trl_pack.py" run --model "$MODEL_DIR" --data "$CHAT_PQ" \
      --out "$RUN_DIR/py-out" --result "$TIMES/py-$k.json" --seq-len $SEQ --num-proc "$NUM_PROC")
  echo "$W $M $C $L $O" >>"$TIMES/py-runs.txt"   # wall maxrss_kb cpu load1 others
  echo "  run $k: timed part $(python3 -c "import json; print(round(json.load(open('$TIMES/py-$k.json'))['total_s'], 2))") s, whole process $W s, peak RSS $((M / 1024)) MiB (largest process), load $L, other processes busy $O CPUs" >&2
  [[ $k -eq $PY_RUNS ]] || rm -rf "$PYTMP"
done
PY_PQ=$RUN_DIR/py-out/train.parquet
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

log "counting the Python output$([[ $CHECK == 1 ]] && echo ', comparing it with pipe'"'"'s sample by sample')"
"$PY" "$HERE/trl_pack.py" stats --python "$PY_PQ" $([[ $CHECK == 1 ]] && printf -- '--pipe %q' "$PIPE_PQ") \
  --model "$MODEL_DIR" --seq-len $SEQ --result "$TIMES/stats.json" >"$TIMES/stats.out" 2>&1 \
  || { cat "$TIMES/stats.out" >&2; die "trl_pack.py stats failed"; }
rm -rf "$RUN_DIR"/py-tmp-*

# ---------------------------------------------------------------- report
read -r FW FM FC FO <<<"$FIRST"
CMDLINE=benches/pack.sh
if ((${#CMDLINE_ENV[@]})); then CMDLINE="$(printf '%q ' "${CMDLINE_ENV[@]}")$CMDLINE"; fi
META_COMMAND=$CMDLINE \
META_PIPE_VERSION="$("$PIPE" --version)" META_PIPE_SRC="$PIPE_SRC" \
META_LOAD_START="$LOAD_START" META_LOAD_END="$LOAD_END" \
python3 - "$TIMES/meta.json" "$N" "$SEED" "$SEQ" "$FW" "$FM" "$T_MODEL" "$T_DATA" "$T_CHAT" "$T_PACK_FIRST" <<'EOF'
import json, os, sys
out, n, seed, seq, fw, fm, tm, td, tc, tp = sys.argv[1:]
e = os.environ
json.dump({
    "command": e["META_COMMAND"].strip(), "pipe_version": e["META_PIPE_VERSION"], "pipe_src": e["META_PIPE_SRC"],
    "load_start": e["META_LOAD_START"], "load_end": e["META_LOAD_END"],
    "n": int(n), "seed": int(seed), "seq_len": int(seq),
    "first": {"wall": float(fw), "rss_kb": int(fm), "model": tm, "data": td, "chat": tc, "pack": tp},
}, open(out, "w"), indent=2)
EOF
python3 "$HERE/report.py" "$TIMES" >"$RESULTS"
echo
cat "$RESULTS"
echo
echo "(also in $RESULTS; logs, time -v reports and JSON in $TIMES)"
