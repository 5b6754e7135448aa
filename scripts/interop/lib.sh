# Sourced by the interop scripts that use the real SmolLM2 GGUF: paths, and a
# check that the asset is there (scripts/fetch-test-assets.sh fetches it).
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
assets="${PIPE_TEST_ASSETS:-/var/tmp/pipe-assets}"
gguf="$assets/SmolLM2-135M-Instruct.Q4_1.gguf"
target="${CARGO_TARGET_DIR:-$root/target}"
[ -f "$gguf" ] || { echo "error: $gguf is missing" >&2; echo "hint: run scripts/fetch-test-assets.sh" >&2; exit 1; }
