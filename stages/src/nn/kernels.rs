//! Loading and launching pipe's own CUDA kernels (kernels/*.cu, compiled by
//! build.rs to fatbins of the target's machine code and PTX): the helpers [`crate::nn::flash`] and
//! [`crate::nn::fused`], [`crate::nn::optim`] and [`crate::nn::nf4`] share.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaFunction, CudaView, LaunchConfig};
use candle_core::cuda::{CudaDevice, CudaStorage};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Shape, Storage, Tensor};

pub const ATTN_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attn.fatbin"));
pub const ATTN_TC_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attn_tc.fatbin"));
pub const FUSED_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));
pub const OPTIM_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/optim.fatbin"));
pub const DECODE_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/decode.fatbin"));
pub const NF4_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nf4.fatbin"));

/// A contiguous storage as a typed device view.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("a fused kernel got a non-contiguous input") };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

pub fn cuda_of(st: &Storage) -> Result<&CudaStorage> {
    match st {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("a fused kernel got a tensor that is not on CUDA"),
    }
}

/// A kernel's output buffer as a tensor (no graph).
pub fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// `{name}_{f32|bf16}` from the module of `image` (one of the `*_BIN`).
pub fn func(dev: &CudaDevice, module: &str, image: &'static [u8], name: &str, dt: DType) -> Result<CudaFunction> {
    let t = match dt {
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        _ => candle_core::bail!("{name}: {dt:?} is not supported (f32, bf16)"),
    };
    Ok(dev.get_or_load_custom_image(&format!("{name}_{t}"), module, image)?.into_cuda_function())
}

/// Run `f` with the CUDA storages of `ts` (read-locked for the call).
pub fn with<R>(ts: &[&Tensor], f: impl FnOnce(&[(&CudaStorage, &Layout)]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let st: Vec<(&CudaStorage, &Layout)> = guards.iter().map(|(s, l)| Ok((cuda_of(s)?, *l))).collect::<Result<_>>()?;
    f(&st)
}

/// `f::<bf16>(args)` or `f::<f32>(args)` by `dt` (the storage types the
/// kernels are compiled for).
macro_rules! by_dtype {
    ($dt:expr, $f:ident, $($a:expr),*) => {
        match $dt {
            candle_core::DType::BF16 => $f::<half::bf16>($($a),*),
            candle_core::DType::F32 => $f::<f32>($($a),*),
            dt => candle_core::bail!("fused kernel: {dt:?} is not supported (f32, bf16)"),
        }
    };
}
pub(crate) use by_dtype;

/// Blocks of 256 threads for a grid-stride loop over `n` items.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(256).min(65_535)
}

/// A grid of `blocks` x `y` blocks of `threads`.
pub fn grid(blocks: usize, y: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1) as u32, y as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// The device of a storage.
pub fn device(s: &CudaStorage) -> CudaDevice {
    s.device().clone()
}

/// The device's multiprocessor count (asked once a process).
pub fn sm_count(dev: &CudaDevice) -> Result<usize> {
    use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute;
    use candle_core::cuda::WrapErr;
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(&n) = N.get() {
        return Ok(n);
    }
    let n = dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?;
    Ok(*N.get_or_init(|| n.max(1) as usize))
}
