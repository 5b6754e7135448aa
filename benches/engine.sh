#!/usr/bin/env bash
# Engine benchmark: pipe vs DVC on a 50-stage pipeline of `command` stages
# over ~1 GB of generated data, plus process start-up and BLAKE3 hashing
# throughput (pipe hash vs b3sum vs sha256sum on a 1 GiB file).
#
# Not a test: it asserts nothing about timings, it prints them (and writes
# them to $BENCH_DIR/results.txt).
#
# Usage:
#   benches/engine.sh
# Environment:
#   BENCH_DIR         work dir, outside the repo (default /var/tmp/pipe-bench);
#                     data, the DVC venv and b3sum are kept there and reused
#   PIPE_BIN          a built pipe binary (skips `cargo build --release`)
#   PIPE_REV          build this git revision (exported with `git archive` to
#                     $BENCH_DIR/src-REV) instead of the working tree
#   CARGO_TARGET_DIR  target dir for the build (default /var/tmp/pipe-target)
#   RUNS              timed runs of each no-op command (default 10)
#   STARTUP_RUNS      timed runs of `pipe --version` (default 200)
#   HASH_RUNS         timed runs of each hasher (default 5)
#   DVC_SPEC          pip requirement for DVC (default "dvc")
#   DVC_VENV          venv holding dvc (default $BENCH_DIR/dvc-venv)
#   FILE_MIB, HASH_MIB  data file sizes (default 20 and 1024; for smoke tests)
#
# Needs: bash, python3 (with venv), cargo (unless PIPE_BIN), git, openssl or
# /dev/urandom, sha256sum. Uses hyperfine when installed (apt-get install
# hyperfine), else a date +%s%N loop.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/pipe-bench}
RUNS=${RUNS:-10}
STARTUP_RUNS=${STARTUP_RUNS:-200}
HASH_RUNS=${HASH_RUNS:-5}
DVC_SPEC=${DVC_SPEC:-dvc}
NSTAGES=50
FILE_MIB=${FILE_MIB:-20}          # 50 x 20 MiB = 1000 MiB of stage data
HASH_MIB=${HASH_MIB:-1024}        # the hashing benchmark's file: 1 GiB

export DVC_NO_ANALYTICS=1 NO_COLOR=1 GIT_CONFIG_NOSYSTEM=1
unset CUDA_VISIBLE_DEVICES || true

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
case "$BENCH_DIR/" in "$REPO"/*) echo "BENCH_DIR must be outside the repo ($REPO)" >&2; exit 2 ;; esac

DATA=$BENCH_DIR/data
PIPE_WS=$BENCH_DIR/pipe-ws
DVC_WS=$BENCH_DIR/dvc-ws
VENV=${DVC_VENV:-$BENCH_DIR/dvc-venv}
DVC=$VENV/bin/dvc
TIMES=$BENCH_DIR/times
RESULTS=$BENCH_DIR/results.txt

log() { printf '\n== %s\n' "$*" >&2; }

# ---------------------------------------------------------------- tools
if [[ -n "${PIPE_BIN:-}" ]]; then
  PIPE=$(realpath "$PIPE_BIN")
  PIPE_SRC="PIPE_BIN"
else
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/pipe-target}
  SRC=$REPO
  if [[ -n "${PIPE_REV:-}" ]]; then
    # Build a committed revision from a clean export, not the working tree.
    REV=$(git -C "$REPO" rev-parse --short "$PIPE_REV^{commit}")
    SRC=$BENCH_DIR/src-$REV
    if [[ ! -f "$SRC/Cargo.toml" ]]; then
      rm -rf "$SRC" && mkdir -p "$SRC"
      git -C "$REPO" archive "$REV" | tar -x -C "$SRC"
    fi
    PIPE_SRC="built from $REV"
  else
    PIPE_SRC="built from $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  fi
  log "cargo build --release in $SRC (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd "$SRC" && cargo build --release --quiet -p pipe)
  PIPE=$CARGO_TARGET_DIR/release/pipe
fi
[[ -x "$PIPE" ]] || { echo "no pipe binary at $PIPE" >&2; exit 1; }

if [[ ! -x "$DVC" ]]; then
  log "installing DVC into $VENV (pip install $DVC_SPEC)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$DVC_SPEC"
fi

B3SUM=$(command -v b3sum || true)
if [[ -z "$B3SUM" ]]; then
  B3SUM=$BENCH_DIR/cargo/bin/b3sum
  if [[ ! -x "$B3SUM" ]]; then
    log "cargo install b3sum --root $BENCH_DIR/cargo"
    CARGO_TARGET_DIR=$BENCH_DIR/cargo-target cargo install --quiet b3sum --root "$BENCH_DIR/cargo"
  fi
fi

HYPERFINE=$(command -v hyperfine || true)

# ---------------------------------------------------------------- data
# Deterministic bytes: AES-CTR keystream of a per-file passphrase (fast,
# incompressible, the same on every machine); /dev/urandom without openssl.
gen_file() { # PATH MIB SEED
  local tmp=$1.tmp
  if command -v openssl >/dev/null; then
    openssl enc -aes-128-ctr -pbkdf2 -nosalt -pass "pass:pipe-bench-$3" </dev/zero 2>/dev/null | head -c "$(($2 << 20))" >"$tmp" || true
  else
    head -c "$(($2 << 20))" /dev/urandom >"$tmp"
  fi
  [[ $(stat -c %s "$tmp") -eq $(($2 << 20)) ]] || { echo "short file $tmp" >&2; exit 1; }
  mv "$tmp" "$1"
}

mkdir -p "$DATA"
if [[ ! -f "$DATA/.complete-$FILE_MIB-$HASH_MIB" ]]; then
  rm -f "$DATA"/f*.bin "$DATA"/hash-1g.bin "$DATA"/.complete-*
  log "generating $NSTAGES x $FILE_MIB MiB + one $HASH_MIB MiB file in $DATA"
  for i in $(seq -w 1 $NSTAGES); do gen_file "$DATA/f$i.bin" $FILE_MIB "$i"; done
  gen_file "$DATA/hash-1g.bin" $HASH_MIB hash
  touch "$DATA/.complete-$FILE_MIB-$HASH_MIB"
fi

# ---------------------------------------------------------------- pipelines
# Stages s01..s30: independent, each over its own data file.
# Stages s31..s50: four chains of five (s31->s32->..->s35, s36->..->s40, ...);
# each chained stage also depends on its own data file.
# Every command reads 1 MB of its file, so a run's cost is the engine's.
is_chain_head() { (( $1 > 30 && ($1 - 31) % 5 == 0 )); }
in_chain() { (( $1 > 30 )); }

write_pipe_yaml() {
  echo "# generated by benches/engine.sh"
  echo "stages:"
  local i n p
  for n in $(seq 1 $NSTAGES); do
    i=$(printf %02d "$n"); p=$(printf %02d $((n - 1)))
    echo "  s$i:"
    echo "    kind: command"
    echo "    deps: [data/f$i.bin]"
    if in_chain "$n" && ! is_chain_head "$n"; then
      echo "    inputs: {prev: s$p}"
      echo "    cmd: '{ cat \$PIPE_IN_PREV/out.txt; head -c 1000000 data/f$i.bin | cksum; } > \$PIPE_OUT/out.txt'"
    else
      echo "    cmd: head -c 1000000 data/f$i.bin | cksum > \$PIPE_OUT/out.txt"
    fi
    echo "    outs: [out.txt]"
  done
}

write_dvc_yaml() {
  echo "# generated by benches/engine.sh"
  echo "stages:"
  local i n p
  for n in $(seq 1 $NSTAGES); do
    i=$(printf %02d "$n"); p=$(printf %02d $((n - 1)))
    echo "  s$i:"
    if in_chain "$n" && ! is_chain_head "$n"; then
      echo "    cmd: '{ cat out/s$p.txt; head -c 1000000 data/f$i.bin | cksum; } > out/s$i.txt'"
      echo "    deps: [data/f$i.bin, out/s$p.txt]"
    else
      echo "    cmd: head -c 1000000 data/f$i.bin | cksum > out/s$i.txt"
      echo "    deps: [data/f$i.bin]"
    fi
    echo "    outs: [out/s$i.txt]"
  done
}

# Fresh workspaces every time (so "first run" is a real first run); the data
# files are hard links to the same inodes, so both tools hash the same bytes.
log "setting up $PIPE_WS and $DVC_WS"
rm -rf "$PIPE_WS" "$DVC_WS" "$BENCH_DIR/dvc-site-cache"
mkdir -p "$PIPE_WS/.pipe" "$PIPE_WS/data" "$DVC_WS/data" "$DVC_WS/out"
for i in $(seq -w 1 $NSTAGES); do
  ln "$DATA/f$i.bin" "$PIPE_WS/data/f$i.bin"
  ln "$DATA/f$i.bin" "$DVC_WS/data/f$i.bin"
done
write_pipe_yaml >"$PIPE_WS/pipeline.yaml"
write_dvc_yaml >"$DVC_WS/dvc.yaml"
(
  cd "$DVC_WS"
  git init -q
  git config user.email bench@example.invalid
  git config user.name bench
  printf 'data/\n' >.gitignore
  "$DVC" init -q
  "$DVC" config core.analytics false
  # Keep DVC's hash/state database inside the bench dir, so it is reset too.
  "$DVC" config core.site_cache_dir "$BENCH_DIR/dvc-site-cache"
  git add -A >/dev/null
  git commit -qm init
)

# ---------------------------------------------------------------- timing
# measure NAME RUNS WARMUP CMD... -> prints "MEDIAN MIN MAX" wall time in
# seconds (raw data in $TIMES/NAME.*). Runs in the current directory.
mkdir -p "$TIMES"
measure() {
  local name=$1 runs=$2 warmup=$3; shift 3
  if [[ -n "$HYPERFINE" ]]; then
    "$HYPERFINE" --style none -N --warmup "$warmup" --runs "$runs" \
      --export-json "$TIMES/$name.json" -- "$(printf '%q ' "$@")" >"$TIMES/$name.log" 2>&1 \
      || { cat "$TIMES/$name.log" >&2; return 1; }
    python3 - "$TIMES/$name.json" <<'EOF'
import json, statistics, sys
t = json.load(open(sys.argv[1]))["results"][0]["times"]
print(f"{statistics.median(t):.6f} {min(t):.6f} {max(t):.6f}")
EOF
  else
    local k s e
    for ((k = 0; k < warmup; k++)); do "$@" >/dev/null 2>&1; done
    : >"$TIMES/$name.raw"
    for ((k = 0; k < runs; k++)); do
      s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N)
      echo "$(( e - s ))" >>"$TIMES/$name.raw"
    done
    python3 - "$TIMES/$name.raw" <<'EOF'
import statistics, sys
t = [int(x) / 1e9 for x in open(sys.argv[1])]
print(f"{statistics.median(t):.6f} {min(t):.6f} {max(t):.6f}")
EOF
  fi
}

once() { # NAME CMD... -> seconds for one run (output kept in $TIMES/NAME.out)
  local name=$1 s e; shift
  s=$(date +%s%N)
  "$@" >"$TIMES/$name.out" 2>&1 || { echo "FAILED: $* (see $TIMES/$name.out)" >&2; cat "$TIMES/$name.out" >&2; return 1; }
  e=$(date +%s%N)
  python3 -c "print(f'{($e - $s) / 1e9:.6f}')"
}

# ---------------------------------------------------------------- first runs
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# Page cache: read the data once so neither tool pays for the disk.
cat "$DATA"/f*.bin >/dev/null

log "first run: pipe run"
cd "$PIPE_WS"
PIPE_FIRST=$(once pipe-first "$PIPE" run pipeline.yaml)
log "first run: dvc repro"
cd "$DVC_WS"
DVC_FIRST=$(once dvc-first "$DVC" repro -q)

# Sanity checks (reported, not asserted): everything should now be up to date.
cd "$PIPE_WS"
PIPE_FRESH=$("$PIPE" status pipeline.yaml | awk 'NR > 1 && $2 == "fresh"' | wc -l)
PIPE_NOOP_RUN_OUT=$("$PIPE" run pipeline.yaml 2>&1 | tail -n 1)
cd "$DVC_WS"
DVC_STATUS_OUT=$("$DVC" status 2>&1 | tail -n 1)
NOTES=()
[[ $PIPE_FRESH -eq $NSTAGES ]] || NOTES+=("pipe status: only $PIPE_FRESH of $NSTAGES stages fresh after the first run")
[[ $PIPE_NOOP_RUN_OUT == *" 0 ran, $NSTAGES cached"* ]] || NOTES+=("pipe no-op run said: $PIPE_NOOP_RUN_OUT")
[[ $DVC_STATUS_OUT == *"up to date"* ]] || NOTES+=("dvc status after repro said: $DVC_STATUS_OUT")

# ---------------------------------------------------------------- no-op runs
log "no-op pipe status / pipe run ($RUNS runs each)"
cd "$PIPE_WS"
PIPE_STATUS=$(measure pipe-status "$RUNS" 2 "$PIPE" status pipeline.yaml)
PIPE_RUN=$(measure pipe-run "$RUNS" 2 "$PIPE" run pipeline.yaml)
PIPE_STATUS_JSON=$(measure pipe-status-json "$RUNS" 2 "$PIPE" status --json pipeline.yaml)

log "no-op dvc status / dvc repro ($RUNS runs each)"
cd "$DVC_WS"
DVC_STATUS=$(measure dvc-status "$RUNS" 1 "$DVC" status)
DVC_REPRO=$(measure dvc-repro "$RUNS" 1 "$DVC" repro)

# ---------------------------------------------------------------- start-up
log "start-up: pipe --version ($STARTUP_RUNS runs), dvc --version"
cd "$BENCH_DIR"
PIPE_START=$(measure pipe-version "$STARTUP_RUNS" 10 "$PIPE" --version)
DVC_START=$(measure dvc-version 5 1 "$DVC" --version)

# ---------------------------------------------------------------- hashing
HF=$DATA/hash-1g.bin
HBYTES=$(stat -c %s "$HF")
log "hashing $HF ($HBYTES bytes, warm page cache, $HASH_RUNS runs each)"
cat "$HF" >/dev/null
H_PIPE=$(measure hash-pipe "$HASH_RUNS" 1 "$PIPE" hash "$HF")
H_B3=$(measure hash-b3sum "$HASH_RUNS" 1 "$B3SUM" "$HF")
H_SHA=$(measure hash-sha256sum "$HASH_RUNS" 1 sha256sum "$HF")
D_PIPE=$("$PIPE" hash "$HF" | awk '{print $1}')
D_B3=$("$B3SUM" "$HF" | awk '{print $1}')
[[ "$D_PIPE" == "$D_B3" ]] || NOTES+=("pipe hash and b3sum disagree: $D_PIPE vs $D_B3")

# ---------------------------------------------------------------- report
DVC_VERSION=$("$DVC" --version 2>/dev/null | tail -n 1)
B3_VERSION=$("$B3SUM" --version 2>/dev/null | head -n 1)
PIPE_VERSION=$("$PIPE" --version)
DATA_BYTES=$(( NSTAGES * (FILE_MIB << 20) ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD_START%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  NOTES+=("the machine was busy (1-min load average ${LOAD_START%% *} on $(nproc) CPUs at the start): timings are noisy, compare ratios, rerun on a quiet machine")
fi

printf '%s\n' "${NOTES[@]+"${NOTES[@]}"}" >"$TIMES/notes.txt"
TIMER=${HYPERFINE:+hyperfine -N}
TIMER=${TIMER:-date +%s%N loop}

python3 - "$TIMES/notes.txt" >"$RESULTS" <<EOF
import datetime, os, platform, sys
def t3(s):  # "MEDIAN MIN MAX" or, for single runs, "SECONDS"
    v = [float(x) for x in s.split()]
    return v * 3 if len(v) == 1 else v
ps, pr, psj = t3("$PIPE_STATUS"), t3("$PIPE_RUN"), t3("$PIPE_STATUS_JSON")
ds, dr = t3("$DVC_STATUS"), t3("$DVC_REPRO")
pf, df = t3("$PIPE_FIRST"), t3("$DVC_FIRST")
pst, dst = t3("$PIPE_START"), t3("$DVC_START")
hp, hb, hs = t3("$H_PIPE"), t3("$H_B3"), t3("$H_SHA")
nb = $HBYTES
gbs = lambda t: nb / 1e9 / t[0]
ms = lambda t: f"{t[0] * 1e3:10.1f} ms"
rng = lambda t: f"[{t[1] * 1e3:.1f}-{t[2] * 1e3:.1f}]"
print("pipe engine benchmark, {}".format(datetime.datetime.now().strftime("%Y-%m-%d %H:%M")))
print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; load average $LOAD_START at start, $LOAD_END at end")
print("tools:   $PIPE_VERSION ($PIPE_SRC: $PIPE), dvc $DVC_VERSION, $B3_VERSION, sha256sum (coreutils)")
print("timing:  $TIMER; medians of $RUNS runs (no-op), $STARTUP_RUNS (pipe --version), $HASH_RUNS (hashing); [min-max] in ms")
print("data:    $NSTAGES stages over $NSTAGES files x $FILE_MIB MiB = {:.2f} GB; 30 independent stages + 4 chains of 5".format($DATA_BYTES / 1e9))
print("         pipe run uses -j {} (its default), dvc repro runs stages one at a time".format(os.cpu_count()))
print()
w = 30
print(f"{'$NSTAGES-stage pipeline':{w}} {'pipe':>13} {'dvc':>13} {'dvc/pipe':>9}")
def row(label, p, d, goal=""):
    print(f"{label:{w}} {ms(p)} {ms(d)} {d[0] / p[0]:8.1f}x  {goal}")
row("first run (run / repro)", pf, df)
row("no-op status", ps, ds, "goal >= 20x")
row("no-op run / repro", pr, dr, "goal >= 20x")
print(f"{'no-op status --json':{w}} {ms(psj)}")
print(f"{'':{w}} ranges: pipe status {rng(ps)}, run {rng(pr)}; dvc status {rng(ds)}, repro {rng(dr)}")
print()
print(f"{'start-up (--version)':{w}} {'median':>13} {'range':>17}")
print(f"{'pipe':{w}} {ms(pst)} {rng(pst):>17}  goal < 20 ms")
print(f"{'dvc':{w}} {ms(dst)} {rng(dst):>17}")
print()
import json
def cpu(name):  # mean user+sys CPU seconds per run, from hyperfine's JSON
    try:
        r = json.load(open(f"$TIMES/{name}.json"))["results"][0]
        return f"{r['user'] + r['system']:8.3f} s"
    except (OSError, KeyError, ValueError):
        return f"{'-':>10}"
print(f"{'hashing 1 file, %.2f GB' % (nb / 1e9):{w}} {'median':>13} {'GB/s':>8} {'pipe is':>9} {'CPU time':>10}")
def hrow(label, t, name, ref=None):
    x = f"{t[0] / hp[0]:8.2f}x" if ref else f"{'':9}"
    print(f"{label:{w}} {t[0]:11.3f} s {gbs(t):8.2f} {x} {cpu(name)}")
hrow("pipe hash (BLAKE3)", hp, "hash-pipe")
hrow("b3sum", hb, "hash-b3sum", 1)
hrow("sha256sum", hs, "hash-sha256sum", 1)
print(f"{'':{w}} page cache warm; 'pipe is' = the other tool's wall time / pipe's;")
print(f"{'':{w}} CPU time = user + sys per run (steadier than wall time on a busy machine)")
notes = [n.rstrip("\\n") for n in open(sys.argv[1]) if n.strip()]
if notes:
    print()
    print("notes:")
    for n in notes:
        print("  - " + n)
print()
print("summary")
print(f"  dvc_status / pipe_status   {ds[0] / ps[0]:8.1f}x   ({ds[0] * 1e3:.0f} ms / {ps[0] * 1e3:.1f} ms)")
print(f"  dvc_repro / pipe_run       {dr[0] / pr[0]:8.1f}x   ({dr[0] * 1e3:.0f} ms / {pr[0] * 1e3:.1f} ms)")
print(f"  pipe start-up              {pst[0] * 1e3:8.1f} ms")
print(f"  hashing GB/s               pipe {gbs(hp):.2f}, b3sum {gbs(hb):.2f}, sha256sum {gbs(hs):.2f}")
print(f"  pipe vs b3sum              {hb[0] / hp[0]:8.2f}x")
print(f"  pipe vs sha256sum          {hs[0] / hp[0]:8.2f}x")
EOF
echo
cat "$RESULTS"
echo
echo "(also in $RESULTS; raw timings in $TIMES)"
