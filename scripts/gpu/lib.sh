# Shared by the GPU scripts (sourced): scripts/gpu/*.sh and benches/gpu/*.sh.

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
