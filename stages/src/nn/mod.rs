//! The ML code the stages share: the Llama-family model written from
//! differentiable candle ops ([`llama`]), LoRA ([`llama::Lora`]), the
//! optimiser and schedules ([`optim`]), NF4 storage for QLoRA ([`nf4`]), the Spectrum
//! SNR scan ([`spectrum`]), inference with a KV cache ([`infer`]) and the CPU's
//! decode kernels ([`cpu_decode`]).

/// The environment variable `$name` (an `Option<&'static OsStr>`), read
/// once per process: the training step's hot paths ask for their switches
/// on every op (a few thousand times a step), and each `std::env::var_os`
/// takes the environment's lock and copies the value.
macro_rules! env_once {
    ($name:literal) => {{
        static V: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
        V.get_or_init(|| std::env::var_os($name)).as_deref()
    }};
}

pub mod config;
pub(crate) mod cpu_decode;
pub mod decode;
pub mod dist;
pub mod flash;
pub mod fused;
pub mod gpu;
pub mod infer;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod llama;
pub mod nf4;
pub mod ops;
pub mod optim;
pub mod spectrum;

#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = NnError> = std::result::Result<T, E>;

/// Whether candle's element-wise ops (with `CANDLE_NUM_THREADS=1`, pipe's
/// default on small machines) run on rayon's pool, the matmuls' threads,
/// instead of the calling thread alone (vendor/candle-core/PIPE-PATCH.md).
pub fn set_elementwise_on_rayon(on: bool) {
    candle_core::utils::set_elementwise_on_rayon(on)
}

#[cfg(test)]
pub(crate) mod tests;
