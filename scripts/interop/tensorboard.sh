#!/usr/bin/env sh
# Interop check for the `train` stage's TensorBoard event files against
# TensorBoard's own reader:
#
#   - an #[ignore]d test (`metrics::tests::interop_write_tensorboard_events`
#     in stages/src/metrics/mod.rs) writes metrics.jsonl, tensorboard/ and
#     loss.png through `pipe_stages::metrics::Metrics` into a temporary dir;
#   - tensorboard.py loads the event directory with
#     tensorboard.backend.event_processing.event_accumulator.EventAccumulator
#     and checks the file name, tags, steps and values against the values the
#     test wrote and against metrics.jsonl.
#
#   scripts/interop/tensorboard.sh          (from the repository root or anywhere)
#
# Env: INTEROP_VENV (default /var/tmp/pipe-interop-tb-venv), KEEP=1 keeps the
# temporary directory. Needs cargo, python3 + pip (PyPI only; `tensorboard`
# alone, no torch or tensorflow).
# Exit status 0 when every check passes, 1 otherwise.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv="${INTEROP_VENV:-/var/tmp/pipe-interop-tb-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
fi
if ! "$venv/bin/python" -c 'import tensorboard' 2>/dev/null; then
    "$venv/bin/pip" install --quiet tensorboard
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/pipe-interop-tb.XXXXXX")
if [ "${KEEP:-}" = 1 ]; then
    echo "output: $dir (kept)"
else
    trap 'rm -rf "$dir"' EXIT
fi

echo "pipe: repo at $(git -C "$root" log -1 --format='%h %s' 2>/dev/null | cut -c1-80)"
if ! (cd "$root" && PIPE_TB_INTEROP_DIR="$dir" cargo test --quiet -p pipe-stages --lib \
    metrics::tests::interop_write_tensorboard_events -- --ignored --exact >"$dir/cargo.log" 2>&1); then
    cat "$dir/cargo.log" >&2
    echo "FAIL: writing the event file failed" >&2
    exit 1
fi
"$venv/bin/python" "$here/tensorboard.py" "$dir"
