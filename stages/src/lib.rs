//! pipe-stages: the built-in stage kinds, one file each, listed in
//! [`registry`]. Adding a kind = one file here + one line in `registry.rs`.

pub mod bpe;
pub mod chat;
pub mod command;
pub mod dataset;
pub mod evaluate;
pub mod hub;
mod jinja;
pub mod merge;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod pack;
mod registry;
pub mod serve;
mod table;
pub mod train;

pub use registry::registry;

/// GPUs this build can use: the CUDA device count, 0 without the `cuda`
/// feature or when the driver reports none.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        result::init().ok().and_then(|_| result::device::get_count().ok()).map(|n| n.max(0) as usize).unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}
