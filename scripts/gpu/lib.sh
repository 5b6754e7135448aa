# Shared by the GPU scripts (sourced): scripts/gpu/*.sh and benches/gpu/*.sh.

# The NCCL of the GPU machines (PyTorch's), that `--features nccl` builds link.
GPU_NCCL=2.28.9

# cuda_build_env [nccl]: for a `prepare` step here (no GPU): CARGO_TARGET_DIR
# (default /var/tmp/pipe-cuda-target), the repository ($REPO) as the working
# directory, and the build environment of ../shared/cuda/setup.sh; with
# `nccl`, for the GPU machines' NCCL.
cuda_build_env() {
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/pipe-cuda-target}
  cd "$REPO"
  if [ "${1:-}" = nccl ]; then
    PIPE_CUDA_NCCL=$GPU_NCCL source ../shared/cuda/setup.sh >/dev/null
  else
    source ../shared/cuda/setup.sh >/dev/null
  fi
}

# cuda_lib_test_bin: build pipe-stages' lib tests with --features
# ${PIPE_FEATURES:-cuda} (no run; `nccl` adds the multi-GPU tests and needs
# PIPE_CUDA_NCCL at setup) and print the test binary's path. Needs CARGO_TARGET_DIR and the
# environment of ../shared/cuda/setup.sh.
cuda_lib_test_bin() {
  cargo test --release --features "${PIPE_FEATURES:-cuda}" -p pipe-stages --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["lib"]: print(m["executable"])' | tail -1
}

# cuda_runtime_libs: on the GPU machine, put the CUDA runtime libraries of
# the nvidia-* wheels (cuBLAS and friends, installed with PyTorch) on
# LD_LIBRARY_PATH.
cuda_runtime_libs() {
  local s
  s=$(python3 -c 'import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))')
  LD_LIBRARY_PATH=$(find "$s/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}
  export LD_LIBRARY_PATH
}
