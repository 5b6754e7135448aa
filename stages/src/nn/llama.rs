//! The Llama family (Llama 2/3, SmolLM2, Qwen2/2.5) for training and
//! inference, written from differentiable ops (see [`crate::nn::ops`]).
//!
//! Every weight is a [`Weight`]: frozen (a plain tensor: no gradient is ever
//! computed for it) or trainable (a `Var`). LoRA adapters hang off
//! [`Linear`]s. A [`Batch`] is a flat token stream (no padding): rows of a
//! `pack` artifact laid end to end, with the sequence boundaries inside
//! them; attention runs per sequence, so packed samples never see each
//! other, and position ids come from the pack (restarting per sequence).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::nn::config::LlamaConfig;
use crate::nn::fused::RowGather;
use crate::nn::nf4::Nf4Tensor;
use crate::nn::ops::{
    cross_entropy_sum, dropout_keep, dropout_mask, dropout_values, frozen_product, lm_head_cross_entropy,
    lora_dropout_fits, lora_linear, rms_norm, rope, FrozenWeight, LoraDropout,
};
use crate::nn::{NnError, Result};

/// Rows per chunk of the fused LM head + cross-entropy.
const HEAD_CHUNK: usize = 128;

/// Logits per chunk of the LM head's loss on a GPU: `PIPE_HEAD_LOGITS`
/// (a count; read once), 2^28 unless set.
fn head_logits_per_chunk() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("PIPE_HEAD_LOGITS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(1 << 28)
    })
}

thread_local! {
    /// Tests: this thread's `PIPE_PACKED_QKV` (None: the environment's).
    pub(crate) static PACKED_QKV: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: layers this thread has run through [`Llama::packed_attention`].
    pub(crate) static PACKED_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether full fine-tuning's attention takes q, k and v from one product
/// ([`Llama::packed_attention`]; `PIPE_PACKED_QKV=0` turns it off).
fn packed_qkv_on() -> bool {
    PACKED_QKV.with(|c| c.get()).unwrap_or_else(|| env_once!("PIPE_PACKED_QKV").is_none_or(|v| v != "0"))
}

/// One parameter tensor.
#[derive(Clone)]
pub enum Weight {
    Frozen(Tensor),
    Train(Var),
    /// A frozen linear weight stored as NF4 (QLoRA), dequantised to `DType`
    /// on `Device` for each use.
    Nf4(Arc<Nf4Tensor>, DType, Device),
}

impl Weight {
    /// The weight as a tensor (a cheap handle; NF4 is dequantised).
    pub fn tensor(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Frozen(t) => t.clone(),
            Weight::Train(v) => v.as_tensor().clone(),
            Weight::Nf4(q, dt, dev) => q.dequantize(dev, *dt)?,
        })
    }

    pub fn is_trainable(&self) -> bool {
        matches!(self, Weight::Train(_))
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::Nf4(q, _, _) => q.shape(),
            w => w.tensor()?.dims2()?,
        })
    }

    /// The weight for the frozen products, unless it trains.
    fn frozen(&self) -> Option<FrozenWeight> {
        match self {
            Weight::Frozen(w) => Some(FrozenWeight::Dense(w.clone())),
            Weight::Nf4(q, _, _) => Some(FrozenWeight::Nf4(q.clone())),
            Weight::Train(_) => None,
        }
    }

    /// `x @ w.T`, skipping the weight's gradient when it is frozen.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.frozen() {
            Some(w) => frozen_product(x, w)?,
            None => {
                let w = self.tensor()?;
                if x.rank() == 2 && w.rank() == 2 && x.dtype() == w.dtype() && (x.track_op() || w.track_op()) {
                    crate::nn::ops::trained_matmul(x, &w)?
                } else {
                    x.matmul(&w.t()?)?
                }
            }
        })
    }
}

/// A LoRA adapter on a linear: `y += scale * dropout(x) @ A.T @ B.T`.
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

pub struct Linear {
    /// Module path in `transformers` naming, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub w: Weight,
    pub b: Option<Weight>,
    pub lora: Option<Lora>,
}

/// Per-forward settings: dropout on (training) and its seed.
#[derive(Debug, Clone, Copy)]
pub struct Fwd {
    pub train: bool,
    pub seed: u64,
}

impl Fwd {
    pub const EVAL: Fwd = Fwd { train: false, seed: 0 };
}

impl Linear {
    /// The weight with the LoRA update folded in: `W + scale * B @ A`
    /// (what `merge` writes, and what PEFT's `merge_and_unload` computes).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.w.tensor()?;
        match &self.lora {
            Some(l) => {
                let d = l.b.as_tensor().matmul(l.a.as_tensor())?.affine(l.scale, 0.0)?;
                Ok((w + d.to_dtype(self.w.tensor()?.dtype())?)?)
            }
            None => Ok(w),
        }
    }

    pub fn forward(&self, x: &Tensor, fx: Fwd) -> Result<Tensor> {
        if let Some(y) = self.fused_lora(x, fx)? {
            return Ok(y);
        }
        let mut y = self.w.matmul_t(x)?;
        if let Some(b) = &self.b {
            y = y.broadcast_add(&b.tensor()?)?;
        }
        if let Some(l) = &self.lora {
            let xd = if fx.train && l.dropout > 0.0 {
                dropout(x, l.dropout, fx.seed ^ name_hash(&self.name))?
            } else {
                x.clone()
            };
            let d = xd.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + d.affine(l.scale, 0.0)?)?;
        }
        Ok(y)
    }
}

impl Linear {
    /// The LoRA linear as one op ([`lora_linear`]) when it can be: a frozen
    /// or NF4 base, a 2-D input, the adapter in the input's dtype, and no
    /// dropout in this pass unless on the CPU in f32 or f64;
    /// `PIPE_FUSED_LORA=0` turns it off. Same values as the composition (to
    /// rounding; the same dropout mask), a quarter of its saved (m, n)
    /// activations and, with dropout, none of its two saved (m, k) ones.
    fn fused_lora(&self, x: &Tensor, fx: Fwd) -> Result<Option<Tensor>> {
        let Some(l) = &self.lora else { return Ok(None) };
        if env_once!("PIPE_FUSED_LORA").is_some_and(|v| v == "0") {
            return Ok(None);
        }
        let Some(w) = self.w.frozen() else { return Ok(None) };
        let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
        if x.rank() != 2 || a.dtype() != x.dtype() || b.dtype() != x.dtype() {
            return Ok(None);
        }
        // Dropout inside the op where it takes one (elsewhere the
        // composition, with the mask made on the GPU: `dropout`).
        let drop =
            (fx.train && l.dropout > 0.0).then(|| LoraDropout { p: l.dropout, seed: fx.seed ^ name_hash(&self.name) });
        if drop.is_some() && !lora_dropout_fits(x) {
            return Ok(None);
        }
        let mut y = lora_linear(x, w, a, b, l.scale, drop)?;
        if let Some(bias) = &self.b {
            y = y.broadcast_add(&bias.tensor()?)?;
        }
        Ok(Some(y))
    }
}

fn name_hash(s: &str) -> u64 {
    let h = blake3::hash(s.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}

/// Inverted dropout with the mask [`dropout_mask`] draws (a seeded ChaCha8
/// stream), so a recomputation (gradient checkpointing, resume) draws the
/// same mask, and [`lora_linear`]'s dropout the same one. On a GPU (f32 or
/// bf16) the mask is made there, from a hash of the seed and each index
/// ([`crate::nn::fused::dropout_values_cuda`]; seeded as well).
fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let mask = if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        crate::nn::fused::dropout_values_cuda(x.shape(), x.dtype(), x.device(), p, seed)?
    } else {
        let bits = dropout_mask(p, seed, x.elem_count());
        dropout_values(&bits, dropout_keep(p), x.shape(), x.dtype(), x.device())?
    };
    Ok(x.mul(&mask)?)
}

pub struct Block {
    pub input_layernorm: Weight,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_attention_layernorm: Weight,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Block {
    pub fn linears(&self) -> [&Linear; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }
    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }
}

/// A batch as a flat token stream; see the module docs.
pub struct Batch {
    /// The tokens (an embedding lookup each).
    pub ids: RowGather,
    /// cos/sin of each token's rotary angles, (N, head_dim/2).
    pub cos: Tensor,
    pub sin: Tensor,
    /// (offset, length) of every sequence in the stream.
    pub seqs: Vec<(usize, usize)>,
    /// Stream positions whose next token is a label, and those labels.
    pub pred_idx: RowGather,
    pub targets: Tensor,
    pub n_tokens: usize,
    pub n_targets: usize,
    /// The fused attention's work split (see [`crate::nn::flash::tiles`]),
    /// made on first use and shared by every layer.
    pub attn_tiles: std::sync::OnceLock<Tensor>,
}

impl Batch {
    /// The row gathers' segments on the device (see [`RowGather::prefetch`]):
    /// called once a training step's forward pass is queued.
    fn prefetch_segments(&self) -> Result<()> {
        self.ids.prefetch()?;
        Ok(self.pred_idx.prefetch()?)
    }

    fn attn_tiles(&self, hd: usize, dt: DType) -> Result<&Tensor> {
        if let Some(t) = self.attn_tiles.get() {
            return Ok(t);
        }
        let t = crate::nn::flash::tiles(&self.seqs, hd, dt);
        let n = t.len();
        let t = Tensor::from_vec(t, n, self.ids.ids.device())?;
        Ok(self.attn_tiles.get_or_init(|| t))
    }
}

/// One row of a `pack` artifact.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; -100 = not trained on. Unshifted, as in
    /// `transformers`: the token at t+1 is predicted from position t.
    pub labels: Vec<i64>,
    pub position_ids: Vec<u32>,
    pub seq_lens: Vec<usize>,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Weight,
    pub layers: Vec<Block>,
    pub norm: Weight,
    /// `None`: tied to the embedding.
    pub lm_head: Option<Linear>,
    pub dtype: DType,
    pub device: Device,
    inv_freq: Vec<f64>,
    /// cos/sin of every position below their length, in the model's dtype
    /// (see [`Self::rotary`]): built on first use, grown when a position is
    /// past them; a batch's tables are their rows.
    rope: std::sync::Mutex<Option<(Tensor, Tensor)>>,
    /// The paged KV store of inference (created on first use).
    pub(crate) kv_pool: std::sync::OnceLock<std::sync::Arc<crate::nn::infer::KvPool>>,
    /// The decode graphs of serving on CUDA (created on first use).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) decode: crate::nn::decode::Slot,
}

/// Which parameters train, and how.
#[derive(Debug, Clone, Default)]
pub struct TrainSpec {
    /// Every base parameter trains (full fine-tuning).
    pub full: bool,
    /// Base parameters (by `transformers` name) that train (Spectrum).
    pub unfrozen: Option<Vec<String>>,
    pub lora: Option<LoraSpec>,
    /// Modules that get a trainable copy of their own (PEFT's
    /// `modules_to_save`): `lm_head`, `embed_tokens`.
    pub modules_to_save: Vec<String>,
    /// Seed for LoRA initialisation.
    pub seed: u64,
    /// Store the frozen decoder linears as NF4 (QLoRA).
    pub nf4_base: bool,
}

#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (`q_proj`, ...); `all-linear` is expanded by the caller.
    pub targets: Vec<String>,
    pub rslora: bool,
    /// PEFT's default: B = 0, so the adapter starts as a no-op. Tests turn it
    /// off to check gradients through both factors.
    pub init_b_zero: bool,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

pub const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl Llama {
    /// Load an HF-format folder (config.json + model.safetensors or shards).
    pub fn load(dir: &Path, dtype: DType, device: &Device, spec: &TrainSpec) -> Result<Self> {
        let cfg = LlamaConfig::load(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        // SAFETY: the files are store artifacts (read-only) or user folders that
        // nothing else writes while we read them.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
        let get = |name: &str| -> Result<Tensor> {
            st.load(name, device)
                .map_err(|e| NnError::Config(format!("{}: tensor `{name}`: {e}", dir.display())))?
                .to_dtype(dtype)
                .map_err(Into::into)
        };
        let has = |name: &str| st.get(name).is_ok();
        Self::build(cfg, dtype, device, spec, &get, &has)
    }

    /// A base HF folder plus a PEFT LoRA adapter folder (ours or PEFT's:
    /// `adapter_config.json` + `adapter_model.safetensors`).
    pub fn load_peft(base: &Path, adapter: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let spec = peft_spec(adapter)?;
        let model = Self::load(base, dtype, device, &spec)?;
        let file = adapter.join("adapter_model.safetensors");
        let t = candle_core::safetensors::load(&file, device)?;
        for (name, var) in model.trainable() {
            let key = format!("base_model.model.{name}");
            let w =
                t.get(&key).ok_or_else(|| NnError::Config(format!("{}: tensor `{key}` is missing", file.display())))?;
            if w.dims() != var.dims() {
                return Err(NnError::Config(format!(
                    "{}: `{key}` has shape {:?}, the model needs {:?}",
                    file.display(),
                    w.dims(),
                    var.dims()
                )));
            }
            var.set(&w.to_dtype(dtype)?)?;
        }
        Ok(model)
    }

    /// Build from any tensor source (`get` by `transformers` name).
    pub fn build(
        cfg: LlamaConfig,
        dtype: DType,
        device: &Device,
        spec: &TrainSpec,
        get: &dyn Fn(&str) -> Result<Tensor>,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        cfg.validate().map_err(NnError::Config)?;
        let trains =
            |name: &str| -> bool { spec.full || spec.unfrozen.as_ref().is_some_and(|u| u.iter().any(|n| n == name)) };
        let weight = |name: &str| -> Result<Weight> {
            let t = get(name)?;
            Ok(if trains(name) { Weight::Train(Var::from_tensor(&t)?) } else { Weight::Frozen(t) })
        };
        let mut lora_rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut linear = |module: &str, bias: bool| -> Result<Linear> {
            let w = match weight(&format!("{module}.weight"))? {
                Weight::Frozen(t) if spec.nf4_base => {
                    Weight::Nf4(Arc::new(Nf4Tensor::quantize(&t)?), dtype, device.clone())
                }
                w => w,
            };
            let b = if bias { Some(weight(&format!("{module}.bias"))?) } else { None };
            let short = module.rsplit('.').next().unwrap_or(module);
            let lora = match &spec.lora {
                Some(l) if l.targets.iter().any(|t| t == short) => {
                    let (out, inp) = w.dims2()?;
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f64> = (0..l.r * inp).map(|_| lora_rng.random_range(-bound..bound)).collect();
                    let a = Tensor::from_vec(a, (l.r, inp), device)?.to_dtype(dtype)?;
                    let b = if l.init_b_zero {
                        Tensor::zeros((out, l.r), dtype, device)?
                    } else {
                        let b: Vec<f64> = (0..out * l.r).map(|_| lora_rng.random_range(-bound..bound)).collect();
                        Tensor::from_vec(b, (out, l.r), device)?.to_dtype(dtype)?
                    };
                    Some(Lora {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                        scale: l.scale(),
                        dropout: l.dropout,
                    })
                }
                _ => None,
            };
            Ok(Linear { name: module.to_string(), w, b, lora })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Block {
                input_layernorm: weight(&format!("{p}.input_layernorm.weight"))?,
                q: linear(&format!("{p}.self_attn.q_proj"), cfg.qkv_bias())?,
                k: linear(&format!("{p}.self_attn.k_proj"), cfg.qkv_bias())?,
                v: linear(&format!("{p}.self_attn.v_proj"), cfg.qkv_bias())?,
                o: linear(&format!("{p}.self_attn.o_proj"), cfg.o_bias())?,
                post_attention_layernorm: weight(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
                up: linear(&format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
                down: linear(&format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
            });
        }
        let save = |m: &str| spec.modules_to_save.iter().any(|s| s == m);
        let embed_name = "model.embed_tokens.weight";
        let embed_t = get(embed_name)?;
        let tied = cfg.tie_word_embeddings || !has("lm_head.weight");
        let embed = if save("embed_tokens") || trains(embed_name) {
            Weight::Train(Var::from_tensor(&embed_t)?)
        } else {
            Weight::Frozen(embed_t.clone())
        };
        // PEFT's modules_to_save gives lm_head a trainable copy of its own,
        // which unties it from the embedding.
        let lm_head = if tied && !save("lm_head") {
            None
        } else {
            let t = if tied { embed_t.copy()? } else { get("lm_head.weight")? };
            let w = if save("lm_head") || trains("lm_head.weight") {
                Weight::Train(Var::from_tensor(&t)?)
            } else {
                Weight::Frozen(t)
            };
            Some(Linear { name: "lm_head".into(), w, b: None, lora: None })
        };
        let norm = weight("model.norm.weight")?;
        let inv_freq = cfg.inv_freq();
        Ok(Llama {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
            inv_freq,
            rope: Default::default(),
            kv_pool: Default::default(),
            decode: Default::default(),
        })
    }

    /// Every parameter, by the name it is saved under: `transformers` names
    /// for base weights, `<module>.lora_A.weight` / `lora_B` for adapters.
    /// (Handles: tensors and vars share storage with the model.)
    pub fn named_weights(&self) -> Vec<(String, Weight)> {
        let mut out: Vec<(String, Weight)> = vec![("model.embed_tokens.weight".into(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm.weight"), l.input_layernorm.clone()));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), l.post_attention_layernorm.clone()));
        }
        out.push(("model.norm.weight".into(), self.norm.clone()));
        let mut lin: Vec<&Linear> = self.layers.iter().flat_map(|l| l.linears()).collect();
        lin.extend(self.lm_head.as_ref());
        for l in lin {
            out.push((format!("{}.weight", l.name), l.w.clone()));
            if let Some(b) = &l.b {
                out.push((format!("{}.bias", l.name), b.clone()));
            }
            if let Some(lo) = &l.lora {
                out.push((format!("{}.lora_A.weight", l.name), Weight::Train(lo.a.clone())));
                out.push((format!("{}.lora_B.weight", l.name), Weight::Train(lo.b.clone())));
            }
        }
        out
    }

    /// The trainable parameters, by saved name (see [`Self::named_weights`]).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.named_weights()
            .into_iter()
            .filter_map(|(n, w)| match w {
                Weight::Train(v) => Some((n, v)),
                Weight::Frozen(_) | Weight::Nf4(..) => None,
            })
            .collect()
    }

    /// Mutable access to every linear (for tests that perturb weights).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self.layers.iter_mut().flat_map(|l| l.linears_mut()).collect();
        v.extend(self.lm_head.as_mut());
        v
    }

    /// Lay rows end to end into a [`Batch`].
    pub fn batch<R: std::borrow::Borrow<Row>>(&self, rows: &[R]) -> Result<Batch> {
        let mut ids: Vec<u32> = Vec::new();
        let mut pos: Vec<u32> = Vec::new();
        let mut seqs = Vec::new();
        let mut pred = Vec::new();
        let mut targets = Vec::new();
        for r in rows {
            let r: &Row = r.borrow();
            let base = ids.len();
            if r.labels.len() != r.input_ids.len() || r.position_ids.len() != r.input_ids.len() {
                return Err(NnError::Other(
                    "a packed row's input_ids, labels and position_ids differ in length".into(),
                ));
            }
            if r.seq_lens.iter().sum::<usize>() != r.input_ids.len() {
                return Err(NnError::Other("a packed row's seq_lens do not add up to its length".into()));
            }
            let mut off = base;
            for &l in &r.seq_lens {
                seqs.push((off, l));
                off += l;
            }
            for t in 0..r.input_ids.len().saturating_sub(1) {
                let y = r.labels[t + 1];
                if y >= 0 {
                    if y as usize >= self.cfg.vocab_size {
                        return Err(NnError::Other(format!(
                            "label {y} is outside the vocabulary ({})",
                            self.cfg.vocab_size
                        )));
                    }
                    pred.push((base + t) as u32);
                    targets.push(y as u32);
                }
            }
            ids.extend(&r.input_ids);
            pos.extend(&r.position_ids);
        }
        self.check_tokens(&ids)?;
        let (cos, sin) = self.rotary(&pos)?;
        let (n_tokens, n_targets) = (ids.len(), targets.len());
        Ok(Batch {
            ids: RowGather::new(ids, &self.device)?,
            cos,
            sin,
            seqs,
            pred_idx: RowGather::new(pred, &self.device)?,
            targets: Tensor::from_vec(targets, n_targets, &self.device)?,
            n_tokens,
            n_targets,
            attn_tiles: Default::default(),
        })
    }

    /// The rotary frequencies (rope scaling applied).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// cos/sin tables (N, head_dim / 2) for the given positions, computed
    /// as `transformers` does (f32 angles) unless the model runs in f64:
    /// rows of tables of every position up to the largest seen, which are
    /// computed once (on the host, a position at a time: a batch of 8,192
    /// tokens took ~4 ms of host time a step, with the GPU idle) and grown
    /// (to the next power of two) when a position is past them.
    pub(crate) fn rotary(&self, pos: &[u32]) -> Result<(Tensor, Tensor)> {
        let need = pos.iter().max().map_or(0, |&m| m as usize + 1);
        let (cos, sin) = {
            let mut cache = self.rope.lock().unwrap_or_else(|e| e.into_inner());
            let have = cache.as_ref().map_or(0, |(c, _)| c.dims()[0]);
            if have < need {
                *cache = Some(self.rotary_tables(need.next_power_of_two().max(256))?);
            }
            cache.clone().expect("built above")
        };
        let idx = Tensor::from_vec(pos.to_vec(), pos.len(), &self.device)?;
        Ok((cos.index_select(&idx, 0)?, sin.index_select(&idx, 0)?))
    }

    /// cos/sin of positions 0..len (see [`Self::rotary`]).
    fn rotary_tables(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let table = |f: fn(f64) -> f64, g: fn(f32) -> f32| -> Result<Tensor> {
            Ok(if self.dtype == DType::F64 {
                let v: Vec<f64> = (0..len).flat_map(|p| self.inv_freq.iter().map(move |fr| f(p as f64 * fr))).collect();
                Tensor::from_vec(v, (len, half), &self.device)?
            } else {
                let v: Vec<f32> =
                    (0..len).flat_map(|p| self.inv_freq.iter().map(move |fr| g(p as f32 * *fr as f32))).collect();
                Tensor::from_vec(v, (len, half), &self.device)?.to_dtype(self.dtype)?
            })
        };
        Ok((table(f64::cos, f32::cos)?, table(f64::sin, f32::sin)?))
    }

    pub fn embed(&self, b: &Batch) -> Result<Tensor> {
        Ok(b.ids.gather(&self.embed.tensor()?)?)
    }

    /// One decoder block on the stream `x` (N, hidden).
    pub fn block(&self, i: usize, x: &Tensor, b: &Batch, fx: Fwd) -> Result<Tensor> {
        let l = &self.layers[i];
        let c = &self.cfg;
        let (h, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let n = x.dim(0)?;
        let fx_i = Fwd { seed: fx.seed.wrapping_add(i as u64 * 0x9E37_79B9), ..fx };
        let hn = rms_norm(x, &l.input_layernorm.tensor()?, c.rms_norm_eps)?;
        if let Some(attn) = self.packed_attention(l, &hn, b)? {
            return self.block_tail(l, x, &attn, fx_i);
        }
        let q = l.q.forward(&hn, fx_i)?.reshape((n, h, hd))?;
        let k = l.k.forward(&hn, fx_i)?.reshape((n, kv, hd))?;
        let v = l.v.forward(&hn, fx_i)?.reshape((n, kv, hd))?;
        let q = rope(&q, &b.cos, &b.sin)?;
        let k = rope(&k, &b.cos, &b.sin)?;
        let attn = if crate::nn::flash::usable(&q) {
            let scale = 1.0 / (hd as f64).sqrt();
            crate::nn::flash::attention(&q, &k, &v, b.attn_tiles(hd, q.dtype())?, scale)?.reshape((n, h * hd))?
        } else {
            let mut outs = Vec::with_capacity(b.seqs.len());
            for &(off, len) in &b.seqs {
                let ki = k.narrow(0, off, len)?.transpose(0, 1)?.contiguous()?;
                let vi = v.narrow(0, off, len)?.transpose(0, 1)?.contiguous()?;
                outs.push(self.seq_attention(&q.narrow(0, off, len)?, &ki, &vi, 0, None)?);
            }
            if outs.len() == 1 {
                outs.pop().unwrap_or_else(|| unreachable!())
            } else {
                Tensor::cat(&outs, 0)?
            }
        };
        self.block_tail(l, x, &attn, fx_i)
    }

    /// Attention with q, k and v from one product, when the three weights
    /// train as they are (full fine-tuning: no LoRA, no bias) and the fused
    /// kernels take them (bf16 on CUDA, see [`crate::nn::flash::packed_usable`];
    /// `PIPE_PACKED_QKV=0` turns it off, to compare): `hn` times the three
    /// weights stacked (N, (h + 2 kv) hd), rotary embedding on the q and k
    /// heads of it, then attention reading q, k and v in place. The
    /// backward pass gets the packed gradient from attention: one product
    /// for `hn`'s gradient and one for the stacked weights' (the three
    /// gradients are views of it), instead of three of each, two adds and
    /// two rotary launches. Same values as the three products (each output
    /// column is the same dot product). None where it does not apply.
    fn packed_attention(&self, l: &Block, hn: &Tensor, b: &Batch) -> Result<Option<Tensor>> {
        let c = &self.cfg;
        let (h, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let (Weight::Train(wq), Weight::Train(wk), Weight::Train(wv)) = (&l.q.w, &l.k.w, &l.v.w) else {
            return Ok(None);
        };
        if [&l.q, &l.k, &l.v].iter().any(|x| x.lora.is_some() || x.b.is_some())
            || hn.rank() != 2
            || !crate::nn::flash::packed_usable(hn, hd)
            || !crate::nn::fused::usable(hn)
            || !packed_qkv_on()
        {
            return Ok(None);
        }
        let n = hn.dim(0)?;
        let w = Tensor::cat(&[wq.as_tensor(), wk.as_tensor(), wv.as_tensor()], 0)?;
        let qkv = crate::nn::ops::trained_matmul(hn, &w)?.reshape((n, h + 2 * kv, hd))?;
        let qkv = crate::nn::fused::rope_heads(&qkv, &b.cos, &b.sin, h + kv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let attn = crate::nn::flash::attention_packed(&qkv, h, kv, b.attn_tiles(hd, qkv.dtype())?, scale)?;
        PACKED_RUNS.with(|c| c.set(c.get() + 1));
        Ok(Some(attn.reshape((n, h * hd))?))
    }

    /// The rest of a decoder block after attention: output projection and
    /// residual, then the SwiGLU MLP and its residual.
    pub(crate) fn block_tail(&self, l: &Block, x: &Tensor, attn: &Tensor, fx: Fwd) -> Result<Tensor> {
        let x = crate::nn::fused::add(x, &l.o.forward(attn, fx)?)?;
        let hn = rms_norm(&x, &l.post_attention_layernorm.tensor()?, self.cfg.rms_norm_eps)?;
        let g = l.gate.forward(&hn, fx)?;
        let u = l.up.forward(&hn, fx)?;
        let gu = if crate::nn::fused::usable_or_cpu(&g) { crate::nn::fused::swiglu(&g, &u)? } else { (g.silu()? * u)? };
        let m = l.down.forward(&gu, fx)?;
        Ok(crate::nn::fused::add(&x, &m)?)
    }

    /// Final norm of the stream.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.norm.tensor()?, self.cfg.rms_norm_eps)?)
    }

    /// Logits for hidden states `h` (M, hidden) -> (M, vocab).
    pub fn head(&self, h: &Tensor, fx: Fwd) -> Result<Tensor> {
        match &self.lm_head {
            Some(l) => l.forward(h, fx),
            None => self.embed.matmul_t(h),
        }
    }

    /// Hidden states after the final norm, (N, hidden).
    pub fn hidden(&self, b: &Batch, fx: Fwd) -> Result<Tensor> {
        let mut x = self.embed(b)?;
        for i in 0..self.layers.len() {
            x = self.block(i, &x, b, fx)?;
        }
        self.final_norm(&x)
    }

    /// Logits of every token of the stream (N, vocab).
    pub fn logits(&self, b: &Batch) -> Result<Tensor> {
        let h = self.hidden(b, Fwd::EVAL)?;
        self.head(&h, Fwd::EVAL)
    }

    /// Summed cross-entropy over the batch's targets, from the final hidden
    /// states (only the rows that predict a label go through the head).
    pub fn loss_sum_from_hidden(&self, h: &Tensor, b: &Batch, fx: Fwd) -> Result<Tensor> {
        self.head_loss(h, b, fx, 1.0)
    }

    /// `scale * loss_sum_from_hidden`, whose backward pass does not scale
    /// the head's gradients a second time (the fused head makes them for
    /// `scale`).
    fn scaled_loss_from_hidden(&self, h: &Tensor, b: &Batch, fx: Fwd, scale: f64) -> Result<Tensor> {
        Ok((self.head_loss(h, b, fx, scale)? * scale)?)
    }

    /// The summed loss, its gradients made for `grad_scale` where the head
    /// is fused (see [`lm_head_cross_entropy`]).
    fn head_loss(&self, h: &Tensor, b: &Batch, fx: Fwd, grad_scale: f64) -> Result<Tensor> {
        if b.n_targets == 0 {
            return Ok(Tensor::zeros((), DType::F32, &self.device)?);
        }
        let hs = b.pred_idx.gather(h)?;
        // A plain head (tied, or lm_head without LoRA or bias): fused and chunked.
        let plain = match &self.lm_head {
            None => Some(&self.embed),
            Some(l) if l.lora.is_none() && l.b.is_none() => Some(&l.w),
            Some(_) => None,
        };
        match plain {
            Some(w @ (Weight::Frozen(_) | Weight::Train(_))) => {
                Ok(lm_head_cross_entropy(&hs, &w.tensor()?, &b.targets, self.head_chunk_rows(), grad_scale)?)
            }
            _ => Ok(cross_entropy_sum(&self.head(&hs, fx)?, &b.targets)?),
        }
    }

    /// Rows per chunk of the fused LM head's loss. A GPU wants bigger
    /// chunks: up to 2^28 logits (512 MiB in bf16) unless PIPE_HEAD_LOGITS
    /// says how many (to measure).
    pub fn head_chunk_rows(&self) -> usize {
        if self.device.is_cuda() {
            (head_logits_per_chunk() / self.cfg.vocab_size).max(HEAD_CHUNK)
        } else {
            HEAD_CHUNK
        }
    }

    pub fn loss_sum(&self, b: &Batch, fx: Fwd) -> Result<Tensor> {
        let h = self.hidden(b, fx)?;
        self.loss_sum_from_hidden(&h, b, fx)
    }
}

impl Llama {
    /// `scale * loss_sum` and its gradient for each of `vars` (None: the
    /// batch did not reach it). With `checkpoint`, only each block's input
    /// is kept during the forward pass; the backward pass recomputes one
    /// block at a time (same dropout masks: they are seeded) and pushes the
    /// gradient through it, so activation memory is one block, not all.
    pub fn loss_and_grads(
        &self,
        b: &Batch,
        fx: Fwd,
        scale: f64,
        vars: &[Var],
        checkpoint: bool,
    ) -> Result<(f64, Vec<Option<Tensor>>)> {
        let mut out: Vec<Option<Tensor>> = vec![None; vars.len()];
        let loss = self.loss_and_grads_into(b, fx, scale, vars, checkpoint, &mut out, None)?;
        Ok((loss, out))
    }

    /// [`Self::loss_and_grads`] with the gradients added into `acc`
    /// (gradient accumulation), and `layer_done(i, acc)` called once the
    /// backward pass has finished decoder layer `i` (last layer first):
    /// from then on this batch adds nothing to that layer's variables, so
    /// data parallelism can start reducing them while the earlier layers'
    /// gradients are computed. With `layer_done` and without `checkpoint`,
    /// the forward pass keeps every block's graph as one backward pass
    /// would, and the backward pass runs a block at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads_into(
        &self,
        b: &Batch,
        fx: Fwd,
        scale: f64,
        vars: &[Var],
        checkpoint: bool,
        acc: &mut [Option<Tensor>],
        mut layer_done: Option<LayerDone<'_>>,
    ) -> Result<f64> {
        fn collect(acc: &mut [Option<Tensor>], vars: &[Var], g: &candle_core::backprop::GradStore) -> Result<()> {
            for (o, v) in acc.iter_mut().zip(vars) {
                if let Some(t) = g.get(v.as_tensor()) {
                    // Detached: a gradient built by ops on tracked tensors
                    // would otherwise keep this step's graph (activations)
                    // alive in the optimizer's moments, step after step.
                    add_into(o, t.detach())?;
                }
            }
            Ok(())
        }
        crate::nn::fused::install_grad_add();
        let waiting = layer_done.is_some();
        let mut done = |i: usize, acc: &mut [Option<Tensor>]| -> Result<()> {
            match layer_done.as_mut() {
                Some(f) => f(i, acc),
                None => Ok(()),
            }
        };
        if !checkpoint && !waiting {
            let loss = self.scaled_loss_from_hidden(&self.hidden(b, fx)?, b, fx, scale)?;
            b.prefetch_segments()?;
            // The loss is read once the backward pass is launched: reading
            // it first left the GPU idle while the host sorted the graph.
            let value = loss.detach().to_dtype(DType::F64)?;
            collect(acc, vars, &loss.backward()?)?;
            // The graph's tensors go back to the pool while the GPU still
            // runs the backward pass (reading the loss waits for it).
            drop(loss);
            return Ok(value.to_scalar::<f64>()?);
        }
        // One backward pass per layer, last first: with `checkpoint` each
        // block is recomputed from its kept input; otherwise (a caller
        // waiting for layers) each block's graph is kept from the forward
        // pass, cut at its input, and only the backward pass is split.
        let emb = self.embed(b)?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut kept: Vec<Option<(Var, Tensor)>> = Vec::with_capacity(self.layers.len());
        let mut x = emb.detach();
        for i in 0..self.layers.len() {
            if checkpoint {
                inputs.push(x.clone());
                x = self.block(i, &x, b, fx)?.detach();
            } else {
                let xin = Var::from_tensor(&x)?;
                let y = self.block(i, xin.as_tensor(), b, fx)?;
                x = y.detach();
                kept.push(Some((xin, y)));
            }
        }
        let xv = Var::from_tensor(&x)?;
        let h = self.final_norm(xv.as_tensor())?;
        let loss = self.scaled_loss_from_hidden(&h, b, fx, scale)?;
        b.prefetch_segments()?;
        let value = loss.detach().to_dtype(DType::F64)?; // read at the end (see above)
        let g = loss.backward()?;
        // The head's gradients (and, tied, the embedding's two parts) are
        // summed apart and added to `acc` at the end: the same order of
        // additions as one backward pass over the whole batch.
        let mut head: Vec<Option<Tensor>> = vec![None; vars.len()];
        collect(&mut head, vars, &g)?;
        let mut dx = g.get(xv.as_tensor()).cloned();
        drop(g);
        for i in (0..self.layers.len()).rev() {
            let Some(d) = dx.take() else {
                // Nothing flows further down: the remaining layers are done.
                for j in (0..=i).rev() {
                    done(j, acc)?;
                }
                break;
            };
            let (xv, y) = match kept.get_mut(i).and_then(Option::take) {
                Some(k) => k,
                None => {
                    let xv = Var::from_tensor(&inputs[i])?;
                    let y = self.block(i, xv.as_tensor(), b, fx)?;
                    (xv, y)
                }
            };
            let g = crate::nn::ops::backward_from(&y, &d)?;
            collect(acc, vars, &g)?;
            dx = g.get(xv.as_tensor()).cloned();
            drop(g);
            done(i, acc)?;
        }
        if let (Some(d), true) = (dx, emb.track_op()) {
            collect(&mut head, vars, &crate::nn::ops::backward_from(&emb, &d)?)?;
        }
        for (a, h) in acc.iter_mut().zip(head) {
            if let Some(h) = h {
                add_into(a, h)?;
            }
        }
        drop((loss, kept, inputs, emb)); // as above
        Ok(value.to_scalar::<f64>()?)
    }
}

/// `acc += t` for an accumulated gradient (None: nothing yet).
fn add_into(acc: &mut Option<Tensor>, t: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(prev) => (prev + t)?,
        None => t,
    });
    Ok(())
}

/// The callback of [`Llama::loss_and_grads_into`]: decoder layer `i`'s
/// gradients are final for this batch.
pub type LayerDone<'a> = &'a mut dyn FnMut(usize, &mut [Option<Tensor>]) -> Result<()>;

/// The [`TrainSpec`] (LoRA settings, `modules_to_save`) of a PEFT LoRA
/// adapter folder's `adapter_config.json`.
pub fn peft_spec(adapter: &Path) -> Result<TrainSpec> {
    let cfg_path = adapter.join("adapter_config.json");
    let text = fs_err::read_to_string(&cfg_path)?;
    let c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| NnError::Config(format!("{}: {e}", cfg_path.display())))?;
    let bad = |what: &str| NnError::Config(format!("{}: {what}", cfg_path.display()));
    if c["peft_type"] != "LORA" {
        return Err(bad("only LORA adapters are supported (`peft_type`)"));
    }
    let targets: Vec<String> = match &c["target_modules"] {
        serde_json::Value::String(s) if s == "all-linear" => ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        _ => return Err(bad("`target_modules` must be a list of module names or \"all-linear\"")),
    };
    let r = c["r"].as_u64().filter(|r| *r > 0).ok_or_else(|| bad("`r` is missing"))? as usize;
    Ok(TrainSpec {
        lora: Some(LoraSpec {
            r,
            alpha: c["lora_alpha"].as_f64().unwrap_or(8.0),
            dropout: 0.0,
            targets,
            rslora: c["use_rslora"].as_bool().unwrap_or(false),
            init_b_zero: true,
        }),
        modules_to_save: c["modules_to_save"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default(),
        ..Default::default()
    })
}

/// The safetensors files of an HF folder: the index's shards, or model.safetensors.
pub fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value = serde_json::from_str(&fs_err::read_to_string(&index)?)
            .map_err(|e| NnError::Config(format!("{}: {e}", index.display())))?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| NnError::Config(format!("{}: no `weight_map`", index.display())))?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(NnError::Config(format!("{}: no model.safetensors or model.safetensors.index.json", dir.display())))
}
