//! With the `cuda` feature: compiles `kernels/*.cu` to PTX with nvcc (found
//! as $NVCC, $CUDA_ROOT/bin/nvcc or on PATH; ../shared/cuda/setup.sh sets
//! this up) for compute capability $CUDA_COMPUTE_CAP (default 90, Hopper).
//! The PTX is embedded with `include_str!` (src/nn/flash.rs) and loaded by
//! the driver at run time. Without the feature this does nothing.

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
    for name in ["attn", "attn_tc", "fused", "optim", "nf4", "decode"] {
        let src = PathBuf::from("kernels").join(format!("{name}.cu"));
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("{}: cannot run nvcc ({e}); source ../shared/cuda/setup.sh or set NVCC", nvcc.display())
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
