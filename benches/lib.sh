# Shared by the bench scripts (sourced). Needs REPO and BENCH_DIR.

log() { printf '\n== %s\n' "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# init_bench_dir: create $BENCH_DIR, make it absolute; it must lie outside the repo.
init_bench_dir() {
  mkdir -p "$BENCH_DIR"
  BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
  case "$BENCH_DIR/" in "$REPO"/*) echo "BENCH_DIR must be outside the repo ($REPO)" >&2; exit 2 ;; esac
}

# need_gnu_time: GNU time at $TIME (peak RSS via -v), or exit with a hint.
need_gnu_time() {
  [[ -x $TIME ]] && "$TIME" -v true 2>/dev/null \
    || die "GNU time is needed at $TIME for peak RSS (apt-get install -y time)"
}

# private_pipe: build_pipe, then PIPE = a private copy under $BENCH_DIR/bin (a
# concurrent build into the shared target dir must not swap the binary under
# the benchmark).
private_pipe() {
  build_pipe
  [[ -x "$PIPE_BUILT" ]] || die "no pipe binary at $PIPE_BUILT"
  mkdir -p "$BENCH_DIR/bin"
  cp "$PIPE_BUILT" "$BENCH_DIR/bin/pipe.tmp" && mv "$BENCH_DIR/bin/pipe.tmp" "$BENCH_DIR/bin/pipe"
  PIPE=$BENCH_DIR/bin/pipe
}

# ensure_gguf: the SmolLM2 GGUF at $GGUF, fetched into $ASSETS if missing.
ensure_gguf() {
  if [[ ! -f "$GGUF" ]]; then
    log "fetching $GGUF (scripts/fetch-test-assets.sh)"
    PIPE_TEST_ASSETS=$ASSETS sh "$REPO/scripts/fetch-test-assets.sh"
  fi
  [[ -f "$GGUF" ]] || die "$GGUF is missing (scripts/fetch-test-assets.sh)"
}
#
# build_pipe: sets PIPE_BUILT (a release binary) and PIPE_SRC (what it was
# built from). PIPE_BIN uses a given binary; PIPE_REV builds a committed
# revision from a clean `git archive`; otherwise the working tree is built.
# CARGO_TARGET_DIR defaults to /var/tmp/pipe-target.
build_pipe() {
  if [[ -n "${PIPE_BIN:-}" ]]; then
    PIPE_BUILT=$(realpath "$PIPE_BIN")
    PIPE_SRC="PIPE_BIN"
    return
  fi
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/pipe-target}
  local src=$REPO rev
  if [[ -n "${PIPE_REV:-}" ]]; then
    rev=$(git -C "$REPO" rev-parse --short "$PIPE_REV^{commit}")
    src=$BENCH_DIR/src-$rev
    if [[ ! -f "$src/Cargo.toml" ]]; then
      rm -rf "$src" && mkdir -p "$src"
      git -C "$REPO" archive "$rev" | tar -x -C "$src"
    fi
    PIPE_SRC="built from $rev"
  else
    PIPE_SRC="built from $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  fi
  log "cargo build --release in $src (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd "$src" && cargo build --release --quiet -p pipe) || {
    echo "error: cargo build failed in $src (someone editing the tree? try PIPE_REV=HEAD or PIPE_BIN=...)" >&2
    exit 1
  }
  PIPE_BUILT=$CARGO_TARGET_DIR/release/pipe
}
