//! With the `cuda` feature: compiles `kernels/*.cu` with nvcc (found as
//! $NVCC, $CUDA_ROOT/bin/nvcc or on PATH; ../shared/cuda/setup.sh sets this
//! up) for compute capability $CUDA_COMPUTE_CAP (default 90, Hopper), each
//! into a fatbin of that capability's machine code and its PTX, embedded
//! with `include_bytes!` (src/nn/kernels.rs). On a GPU of that capability
//! the driver loads the machine code as is; on a newer one it compiles the
//! PTX (once per machine, kept in its compute cache). Before 2026-12-05
//! only the PTX was embedded: every fresh machine compiled decode.cu's 21
//! MB of it before the first decode step, more than a minute on an H200.
//! The files compile in parallel. Without the feature this does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").ok().map(PathBuf::from).unwrap_or_else(|| {
        std::env::var("CUDA_ROOT")
            .map(|r| PathBuf::from(r).join("bin/nvcc"))
            .ok()
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let gencode = format!("arch=compute_{cap},code=[sm_{cap},compute_{cap}]");
    // For src/nn/gpu.rs's check of the GPU against what the kernels are built for.
    println!("cargo:rustc-env=PIPE_CUDA_COMPUTE_CAP={cap}");
    std::thread::scope(|s| {
        for name in ["attn", "attn_tc", "fused", "optim", "nf4", "decode"] {
            let (nvcc, out, gencode) = (&nvcc, &out, &gencode);
            s.spawn(move || {
                let src = PathBuf::from("kernels").join(format!("{name}.cu"));
                let bin = out.join(format!("{name}.fatbin"));
                let status = Command::new(nvcc)
                    .args(["--fatbin", "-O3", "-std=c++17", "-gencode", gencode, "-o"])
                    .arg(&bin)
                    .arg(&src)
                    .status()
                    .unwrap_or_else(|e| {
                        panic!("{}: cannot run nvcc ({e}); source ../shared/cuda/setup.sh or set NVCC", nvcc.display())
                    });
                assert!(status.success(), "nvcc failed on {}", src.display());
            });
        }
    });
}
