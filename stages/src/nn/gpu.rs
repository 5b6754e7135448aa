//! GPU memory accounting. candle allocates from the device's CUDA memory
//! pool (stream-ordered allocation), so the pool's high-water mark of memory
//! in use is the peak of live tensors (PyTorch's `max_memory_allocated`
//! counterpart), unaffected by when the pool hands memory back.

use candle_core::Device;

/// Peak bytes in use in `d`'s memory pool since the last [`reset_peak`]
/// (None off CUDA, or when the driver does not say).
#[cfg(feature = "cuda")]
pub fn peak_bytes(d: &Device) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: a valid pool handle and a u64 for a cuuint64_t attribute.
    let r = unsafe { sys::cuMemPoolGetAttribute(pool(d)?, USED_HIGH, (&mut v as *mut u64).cast()) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// Start a new peak measurement.
#[cfg(feature = "cuda")]
pub fn reset_peak(d: &Device) {
    let Some(pool) = pool(d) else { return };
    let mut zero: u64 = 0;
    // SAFETY: a valid pool handle and a u64 for a cuuint64_t attribute.
    unsafe { sys::cuMemPoolSetAttribute(pool, USED_HIGH, (&mut zero as *mut u64).cast()) };
}

#[cfg(not(feature = "cuda"))]
pub fn peak_bytes(_: &Device) -> Option<u64> {
    None
}

#[cfg(not(feature = "cuda"))]
pub fn reset_peak(_: &Device) {}

#[cfg(feature = "cuda")]
use candle_core::cuda::cudarc::driver::sys;

#[cfg(feature = "cuda")]
const USED_HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

#[cfg(feature = "cuda")]
fn pool(d: &Device) -> Option<sys::CUmemoryPool> {
    let Device::Cuda(c) = d else { return None };
    let ctx = c.cuda_stream().context().clone();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out pointer; the device handle comes from a live context.
    let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
    (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
}
