//! What the benchmark examples share: model shapes by name, arguments,
//! medians.

use candle_core::{DType, Device, Tensor};
use pipe_stages::nn::config::LlamaConfig;

/// `smollm2-135m`, `llama-1b` (random-init shapes), or a config.json path.
pub fn config(name: &str) -> Result<LlamaConfig, Box<dyn std::error::Error>> {
    let v = match name {
        "smollm2-135m" => serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true, "max_position_embeddings": 8192
        }),
        "llama-1b" => serde_json::json!({
            "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": true, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }),
        path => serde_json::from_str(&fs_err::read_to_string(path)?)?,
    };
    Ok(serde_json::from_value(v)?)
}

pub fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Random-init parameters by name for `Llama::build`: norms 1, the rest
/// N(0, 0.02), in `dtype` on `device`.
pub fn random_weights<'a>(
    cfg: &'a LlamaConfig,
    dtype: DType,
    device: &'a Device,
) -> impl Fn(&str) -> pipe_stages::nn::Result<Tensor> + 'a {
    move |name: &str| {
        let s = cfg.param_shape(name);
        let t = if name.contains("norm") {
            Tensor::ones(s, DType::F32, device)?
        } else {
            Tensor::randn(0f32, 0.02, s, device)?
        };
        Ok(t.to_dtype(dtype)?)
    }
}
