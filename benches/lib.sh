# Shared by the bench scripts (sourced). Needs REPO, BENCH_DIR and log().
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
