//! GPU memory: the device's CUDA memory pool. candle allocates from it
//! (stream-ordered allocation), so the pool's high-water mark of memory in
//! use is the peak of live tensors (PyTorch's `max_memory_allocated`
//! counterpart), unaffected by when the pool hands memory back.

use candle_core::Device;

/// Let `d`'s memory pool keep the memory tensors free, as torch's caching
/// allocator does, instead of handing it back to the driver at every
/// synchronisation (the pool's release threshold is 0 by default, so each
/// step's read of its loss emptied the pool and the next allocations were
/// mapped afresh). The process then holds its peak until it exits.
/// `PIPE_KEEP_POOL=0` leaves the driver's default. Whether the threshold
/// was set (false off CUDA).
#[cfg(feature = "cuda")]
pub fn keep_pool_memory(d: &Device) -> bool {
    if std::env::var_os("PIPE_KEEP_POOL").is_some_and(|v| v == "0") {
        return false;
    }
    set_attr(d, RELEASE_THRESHOLD, u64::MAX)
}

/// The pool's release threshold (bytes it keeps at a synchronisation).
#[cfg(feature = "cuda")]
pub fn pool_release_threshold(d: &Device) -> Option<u64> {
    get_attr(d, RELEASE_THRESHOLD)
}

#[cfg(not(feature = "cuda"))]
pub fn keep_pool_memory(_: &Device) -> bool {
    false
}

/// Peak bytes in use in `d`'s memory pool since the last [`reset_peak`]
/// (None off CUDA, or when the driver does not say).
#[cfg(feature = "cuda")]
pub fn peak_bytes(d: &Device) -> Option<u64> {
    get_attr(d, USED_HIGH)
}

/// Start a new peak measurement.
#[cfg(feature = "cuda")]
pub fn reset_peak(d: &Device) {
    set_attr(d, USED_HIGH, 0);
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
const RELEASE_THRESHOLD: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;

/// A u64 attribute of `d`'s memory pool (None off CUDA or on a driver error).
#[cfg(feature = "cuda")]
fn get_attr(d: &Device, attr: sys::CUmemPool_attribute) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: a valid pool handle and a u64 for the cuuint64_t attributes this module uses.
    let r = unsafe { sys::cuMemPoolGetAttribute(pool(d)?, attr, (&mut v as *mut u64).cast()) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// Set a u64 attribute of `d`'s memory pool; whether it was set.
#[cfg(feature = "cuda")]
fn set_attr(d: &Device, attr: sys::CUmemPool_attribute, mut v: u64) -> bool {
    let Some(pool) = pool(d) else { return false };
    // SAFETY: a valid pool handle and a u64 for the cuuint64_t attributes this module uses.
    let r = unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut v as *mut u64).cast()) };
    r == sys::CUresult::CUDA_SUCCESS
}

#[cfg(feature = "cuda")]
fn pool(d: &Device) -> Option<sys::CUmemoryPool> {
    let Device::Cuda(c) = d else { return None };
    let ctx = c.cuda_stream().context().clone();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out pointer; the device handle comes from a live context.
    let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
    (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// The pool keeps its memory once asked, and the switch leaves it be.
    #[test]
    fn the_pool_keeps_freed_memory_on_cuda() -> candle_core::Result<()> {
        let Some(d) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        assert!(keep_pool_memory(&d));
        assert_eq!(pool_release_threshold(&d), Some(u64::MAX));
        let t = candle_core::Tensor::zeros((1 << 20,), candle_core::DType::F32, &d)?;
        drop(t);
        d.synchronize()?;
        assert_eq!(pool_release_threshold(&d), Some(u64::MAX));
        assert!(!keep_pool_memory(&Device::Cpu));
        Ok(())
    }
}
