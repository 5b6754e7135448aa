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

/// The compute capability the CUDA kernels are built for: stages/build.rs's
/// `CUDA_COMPUTE_CAP` (90 unless set; candle's kernels are built by
/// cudaforge for the same one), as "90".
pub const BUILT_FOR: &str = match option_env!("PIPE_CUDA_COMPUTE_CAP") {
    Some(c) => c,
    None => "90",
};

/// Whether a GPU of compute capability `major`.`minor` runs kernels built
/// for `built` ("90", "90a", "100"); Err: a sentence saying why not. From
/// 9.0 on the kernels are specific to the capability built for (candle's
/// PTX is `sm_90a`, pipe's use Hopper's thread-block clusters), so only a
/// GPU of exactly that one runs them; below it, a GPU of that major version
/// and at least that minor one.
pub fn capability_fits(built: &str, major: i32, minor: i32) -> Result<(), String> {
    let digits = built.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let parsed = digits.parse::<i32>().ok().filter(|&v| v >= 10).map(|v| (v / 10, v % 10));
    let Some((bmaj, bmin)) = parsed else {
        return Err(format!("this pipe was built for compute capability `{built}`, which is not a capability"));
    };
    let exact = bmaj >= 9;
    if (major, minor) == (bmaj, bmin) || (!exact && major == bmaj && minor >= bmin) {
        return Ok(());
    }
    let only = if exact { " only" } else { "" };
    Err(format!(
        "it has compute capability {major}.{minor}, and this pipe's CUDA kernels are built for {bmaj}.{bmin}{only}"
    ))
}

/// [`capability_fits`] for the GPU of `d` and [`BUILT_FOR`], the error
/// naming the GPU (Ok off CUDA).
#[cfg(feature = "cuda")]
pub fn check_capability(d: &Device) -> Result<(), String> {
    let Device::Cuda(c) = d else { return Ok(()) };
    let stream = c.cuda_stream();
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("cannot read its compute capability: {e}"))?;
    capability_fits(BUILT_FOR, major, minor).map_err(|m| format!("{} {m}", ctx.name().unwrap_or_default()))
}

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

#[cfg(test)]
mod capability_tests {
    use super::*;

    /// Hopper builds run on their capability only; older ones on later minor
    /// versions of their major one; a bad build setting is said as such.
    #[test]
    fn gpus_fit_the_capability_the_kernels_are_built_for() {
        assert_eq!(capability_fits("90", 9, 0), Ok(()));
        assert_eq!(capability_fits("90a", 9, 0), Ok(()));
        let a100 = capability_fits("90", 8, 0).unwrap_err();
        assert_eq!(a100, "it has compute capability 8.0, and this pipe's CUDA kernels are built for 9.0 only");
        assert!(capability_fits("90", 10, 0).unwrap_err().contains("10.0"), "Blackwell cannot run sm_90a code");
        assert!(capability_fits("90", 12, 0).is_err());
        assert_eq!(capability_fits("100", 10, 0), Ok(()));
        assert_eq!(capability_fits("80", 8, 6), Ok(()));
        assert_eq!(
            capability_fits("86", 8, 0).unwrap_err(),
            "it has compute capability 8.0, and this pipe's CUDA kernels are built for 8.6"
        );
        assert!(capability_fits("80", 9, 0).is_err());
        assert!(capability_fits("sm", 9, 0).unwrap_err().contains("`sm`, which is not a capability"));
        assert!(capability_fits("9", 9, 0).is_err());
        // What the tests' build is for.
        assert!(BUILT_FOR.starts_with(char::is_numeric), "{BUILT_FOR}");
    }

    /// On the GPU machine: its GPU fits this build (an H100 or H200 for the
    /// default 90).
    #[cfg(feature = "cuda")]
    #[test]
    fn the_cuda_device_fits_the_build() -> candle_core::Result<()> {
        let Some(d) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        assert_eq!(check_capability(&d), Ok(()));
        assert_eq!(check_capability(&Device::Cpu), Ok(()));
        Ok(())
    }
}
