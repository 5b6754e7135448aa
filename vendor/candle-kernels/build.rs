use cudaforge::{CudaToolkit, Error, KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

const CUTILE_FEATURE: &str = "CARGO_FEATURE_CUTILE";

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    // Build for PTX
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let ptx_path = out_dir.join("ptx.rs");
    let bindings = KernelBuilder::new()
        .source_dir("src") // Scan src/ for .cu files
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"]) // Exclude statically compiled kernels from ptx build
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;

    bindings.write(&ptx_path)?;

    // pipe's patch (PIPE-PATCH.md): the same modules as machine code too.
    build_cubins(&out_dir)?;

    let mut moe_sources = vec![
        "src/moe/moe_gguf.cu",
        "src/moe/moe_wmma.cu",
        "src/moe/moe_wmma_gguf.cu",
        "src/mmvq_gguf.cu",
        "src/mmq_gguf/mmq_quantize.cu",
        "src/mmq_gguf/mmq_instance_q4_0.cu",
        "src/mmq_gguf/mmq_instance_q4_1.cu",
        "src/mmq_gguf/mmq_instance_q5_0.cu",
        "src/mmq_gguf/mmq_instance_q5_1.cu",
        "src/mmq_gguf/mmq_instance_q8_0.cu",
        "src/mmq_gguf/mmq_instance_q2_k.cu",
        "src/mmq_gguf/mmq_instance_q3_k.cu",
        "src/mmq_gguf/mmq_instance_q4_k.cu",
        "src/mmq_gguf/mmq_instance_q5_k.cu",
        "src/mmq_gguf/mmq_instance_q6_k.cu",
    ];
    if env::var_os(CUTILE_FEATURE).is_some() {
        moe_sources.push("src/moe/moe_align.cu");
    }

    let mut moe_builder = KernelBuilder::default()
        .source_files(moe_sources)
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    if compute_cap < 80 {
        moe_builder = moe_builder.arg("-DNO_BF16_KERNEL");
    }

    let mut is_target_msvc = false;
    if let Ok(target) = std::env::var("TARGET") {
        if target.contains("msvc") {
            is_target_msvc = true;
            moe_builder = moe_builder.arg("-D_USE_MATH_DEFINES");
        }
    }

    if !is_target_msvc {
        moe_builder = moe_builder.arg("-Xcompiler").arg("-fPIC");
    }

    moe_builder.build_lib(out_dir.join("libmoe.a"))?;
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    println!("cargo:rustc-link-lib=dylib=cudart");
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=stdc++");
    }
    Ok(())
}

// pipe's patch: the PTX modules above (one per `src/*.cu` file, except the
// statically linked ones) assembled by ptxas, for the architecture they
// target, into cubins of machine code (`cubin.rs`: `pub const AFFINE:
// &[u8]`, ...), so that a GPU of that architecture loads them as they are.
// From PTX alone the driver compiles every module on its first use on each
// machine (10-22 s of a fresh H100's first training step or server
// warm-up). The files assemble in parallel, as many at once as there are
// cores.
const MODULES: [&str; 11] = [
    "affine", "binary", "cast", "conv", "fill", "indexing", "quantized", "reduce", "sort",
    "ternary", "unary",
];

fn build_cubins(out_dir: &std::path::Path) -> Result<()> {
    // ptxas sits beside nvcc in every CUDA toolkit.
    let ptxas = CudaToolkit::detect()?.nvcc_path.with_file_name("ptxas");
    let arch = format!("-arch={}", cudaforge::detect_compute_cap()?.to_nvcc_arch());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let assemble = |name: &str| -> Result<()> {
        let ptx = out_dir.join(format!("{name}.ptx"));
        let out = std::process::Command::new(&ptxas)
            .arg(&arch)
            .arg(&ptx)
            .arg("-o")
            .arg(out_dir.join(format!("{name}.cubin")))
            .output()
            .map_err(|e| Error::NvccNotFound(format!("{}: {e}", ptxas.display())))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::CompilationFailed { path: ptx, message: String::from_utf8_lossy(&out.stderr).into_owned() })
        }
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs.min(MODULES.len()))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        match MODULES.get(i) {
                            Some(name) => assemble(name)?,
                            None => return Ok(()),
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a ptxas thread panicked"))
    })?;
    let consts: String = MODULES
        .iter()
        .map(|m| {
            format!(
                "pub const {}: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{m}.cubin\"));\n",
                m.to_uppercase()
            )
        })
        .collect();
    std::fs::write(out_dir.join("cubin.rs"), consts)?;
    Ok(())
}
