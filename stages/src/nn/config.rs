//! `config.json` of the Llama family as `transformers` writes it: Llama 2/3
//! (GQA, llama3 RoPE scaling), SmolLM2 (tied embeddings), Qwen2/2.5 (q/k/v
//! biases).

use std::path::Path;

use serde::Deserialize;

use crate::nn::NnError;

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "llama")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn llama() -> String {
    "llama".into()
}
fn eps() -> f64 {
    1e-6
}
fn theta() -> f64 {
    10000.0
}
fn max_pos() -> usize {
    2048
}

impl LlamaConfig {
    pub fn load(path: &Path) -> Result<Self, NnError> {
        let text = fs_err::read_to_string(path)?;
        let cfg: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| NnError::Config(format!("{}: line {}: {e}", path.display(), e.line())))?;
        cfg.validate().map_err(|e| NnError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        match self.model_type.as_str() {
            "llama" | "qwen2" | "mistral" => {}
            other => {
                return Err(format!(
                    "model_type `{other}` is not supported for training (supported: llama, qwen2, mistral)"
                ))
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act `{act}` is not supported (only silu)"));
            }
        }
        if self.num_attention_heads == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim()));
        }
        if let Some(s) = &self.rope_scaling {
            if !matches!(s.rope_type.as_str(), "llama3" | "default" | "linear") {
                return Err(format!("rope_scaling type `{}` is not supported (llama3, linear)", s.rope_type));
            }
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// q/k/v carry biases (Qwen2, or Llama with `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// o_proj carries a bias (Llama with `attention_bias` only).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// The shape of a parameter, by `transformers` name (`...weight` or
    /// `...bias`).
    pub fn param_shape(&self, name: &str) -> Vec<usize> {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        let m = |s: &str| name.contains(s);
        let (out, inp) = if m("embed_tokens") || m("lm_head") {
            (self.vocab_size, d)
        } else if m("norm") {
            return vec![d];
        } else if m("q_proj") {
            (q, d)
        } else if m("k_proj") || m("v_proj") {
            (kv, d)
        } else if m("o_proj") {
            (d, q)
        } else if m("gate_proj") || m("up_proj") {
            (f, d)
        } else {
            (d, f)
        };
        if name.ends_with(".bias") {
            vec![out]
        } else {
            vec![out, inp]
        }
    }

    /// RoPE inverse frequencies, with llama3 / linear scaling as `transformers`
    /// computes them (`_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64)).collect();
        let Some(s) = &self.rope_scaling else { return base };
        match s.rope_type.as_str() {
            "linear" => base.iter().map(|f| f / s.factor).collect(),
            "llama3" => {
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / s.low_freq_factor;
                let high_wavelen = old / s.high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }
}
