//! GGUF -> Hugging Face folder: config.json from the `llama.*` metadata,
//! dequantised safetensors in HF tensor names, the tokenizer files.
//!
//! Tensors are read, dequantised (candle), fixed up and written one at a time,
//! so memory stays around twice the largest tensor in f32.
//!
//! llama.cpp's `convert_hf_to_gguf.py` permutes the rows of q_proj / k_proj
//! so that rotary pairs are adjacent (`reshape(heads, 2, hd/2, cols)
//! .swapaxes(1, 2)`); [`unpermute`] is its exact inverse.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;
use pipe_engine::stage::{RunCtx, StageFailure};
use serde_json::{json, Value as Json};

use super::st::{self, DType, Planned};
use super::tokenizer;

/// Typed access to GGUF metadata, with errors naming the file and key.
pub struct Meta<'a> {
    pub md: &'a HashMap<String, Value>,
    pub file: String,
}

impl Meta<'_> {
    pub fn missing(&self, key: &str) -> StageFailure {
        StageFailure::new(format!("{}: missing metadata key `{key}`", self.file))
            .hint("the GGUF is incomplete or from an old converter; re-convert it with a current llama.cpp convert_hf_to_gguf.py")
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> StageFailure {
        StageFailure::new(format!("{}: metadata `{key}` should be {want}, found {:?}", self.file, v.value_type()))
    }

    pub fn uint(&self, key: &str) -> Result<Option<u64>, StageFailure> {
        let Some(v) = self.md.get(key) else { return Ok(None) };
        let n: Option<u64> = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    pub fn req_uint(&self, key: &str) -> Result<u64, StageFailure> {
        self.uint(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float, as the shortest decimal of its stored precision (an f32
    /// `1e-5` becomes `1e-05`, not `9.999999747378752e-06`).
    pub fn float(&self, key: &str) -> Result<Option<f64>, StageFailure> {
        let Some(v) = self.md.get(key) else { return Ok(None) };
        match v {
            Value::F32(x) => Ok(format!("{x}").parse::<f64>().ok()),
            Value::F64(x) => Ok(Some(*x)),
            _ => self.uint(key).map(|u| u.map(|u| u as f64)),
        }
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, StageFailure> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>, StageFailure> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }

    pub fn str_array(&self, key: &str) -> Result<Option<Vec<String>>, StageFailure> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.wrong(key, "an array of strings", v)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.wrong(key, "an array of strings", v)),
        }
    }

    pub fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>, StageFailure> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I8(x) => Ok(i64::from(*x)),
                    Value::U8(x) => Ok(i64::from(*x)),
                    Value::I16(x) => Ok(i64::from(*x)),
                    Value::U16(x) => Ok(i64::from(*x)),
                    Value::I32(x) => Ok(i64::from(*x)),
                    Value::U32(x) => Ok(i64::from(*x)),
                    Value::I64(x) => Ok(*x),
                    v => Err(self.wrong(key, "an array of integers", v)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.wrong(key, "an array of integers", v)),
        }
    }
}

/// What the import produced, for `model.json`.
pub struct Imported {
    pub files: Vec<String>,
    pub parameters: u64,
    pub architecture: String,
    /// ggml type -> number of tensors stored in it.
    pub quantization: BTreeMap<String, usize>,
    pub name: Option<String>,
}

/// How an output tensor is derived from its GGUF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fix {
    None,
    /// Undo llama.cpp's rotary permutation with this many heads.
    Unpermute(usize),
}

/// The HF name of a llama GGUF tensor.
fn hf_name(name: &str, n_head: usize, n_kv: usize) -> Option<(String, Fix)> {
    let plain = |s: &str| Some((s.to_string(), Fix::None));
    match name {
        "token_embd.weight" => return plain("model.embed_tokens.weight"),
        "output_norm.weight" => return plain("model.norm.weight"),
        "output.weight" => return plain("lm_head.weight"),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, fix) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", Fix::None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Fix::Unpermute(n_head)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Fix::Unpermute(n_kv)),
        "attn_v.weight" => ("self_attn.v_proj.weight", Fix::None),
        "attn_output.weight" => ("self_attn.o_proj.weight", Fix::None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", Fix::None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", Fix::None),
        "ffn_up.weight" => ("mlp.up_proj.weight", Fix::None),
        "ffn_down.weight" => ("mlp.down_proj.weight", Fix::None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), fix))
}

/// Invert llama.cpp's q/k permutation of a `[heads * hd, cols]` matrix:
/// GGUF row `h*hd + 2*i + j` is HF row `h*hd + j*hd/2 + i`.
pub fn unpermute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

fn not_gguf(shown: &str, head: &[u8]) -> StageFailure {
    let seen: String = head.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
    StageFailure::new(format!("{shown}: not a GGUF file (it starts with `{seen}`, a GGUF starts with `GGUF`)")).hint(
        "`source:` takes a .gguf file, a Hugging Face model folder (config.json + *.safetensors), or hf://ORG/NAME",
    )
}

pub fn import(
    path: &Path,
    shown: &str,
    out: &Path,
    dtype: DType,
    max_shard: u64,
    ctx: &RunCtx,
) -> Result<Imported, StageFailure> {
    let mut r = BufReader::with_capacity(1 << 20, fs_err::File::open(path)?);
    let mut head = [0u8; 8];
    let n = r.read(&mut head)?;
    if n < 4 || &head[..4] != b"GGUF" {
        return Err(not_gguf(shown, &head[..n]));
    }
    std::io::Seek::rewind(&mut r)?;
    let content = Content::read(&mut r).map_err(|e| {
        let msg = e.to_string();
        if let Some(t) = msg.strip_prefix("unknown dtype for tensor ") {
            StageFailure::new(format!("{shown}: unsupported quantisation type (ggml type {t})"))
                .hint(format!("pipe dequantises {SUPPORTED_TYPES}; re-quantise the model to one of them with llama.cpp's llama-quantize, or import the original Hugging Face weights"))
        } else {
            StageFailure::new(format!("{shown}: cannot read the GGUF header: {msg}"))
                .hint("the file may be truncated or corrupt; download it again")
        }
    })?;
    let meta = Meta { md: &content.metadata, file: shown.to_string() };

    let arch = meta.string("general.architecture")?.ok_or_else(|| meta.missing("general.architecture"))?;
    if arch != "llama" {
        return Err(StageFailure::new(format!("{shown}: unsupported architecture `{arch}` (general.architecture)"))
            .hint("pipe imports GGUFs of the `llama` architecture (Llama 2/3, SmolLM, Mistral, TinyLlama, ...); for other models import the Hugging Face folder or hf://ORG/NAME"));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta.req_uint(&k("embedding_length"))? as usize;
    let inter = meta.req_uint(&k("feed_forward_length"))? as usize;
    let layers = meta.req_uint(&k("block_count"))? as usize;
    let n_head = meta.req_uint(&k("attention.head_count"))? as usize;
    let n_kv = meta.uint(&k("attention.head_count_kv"))?.map_or(n_head, |v| v as usize);
    let eps = meta
        .float(&k("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| meta.missing(&k("attention.layer_norm_rms_epsilon")))?;
    let theta = meta.float(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let ctx_len = meta.req_uint(&k("context_length"))?;
    if n_head == 0 || n_kv == 0 || !hidden.is_multiple_of(n_head) || !n_head.is_multiple_of(n_kv) {
        return Err(StageFailure::new(format!(
            "{shown}: inconsistent attention shape: {hidden} hidden, {n_head} heads, {n_kv} kv heads"
        )));
    }
    let head_dim = meta.uint(&k("attention.key_length"))?.map_or(hidden / n_head, |v| v as usize);
    if let Some(rd) = meta.uint(&k("rope.dimension_count"))? {
        if rd as usize != head_dim {
            return Err(StageFailure::new(format!(
                "{shown}: partial rotary embeddings ({rd} of {head_dim} dims) are not supported"
            ))
            .hint("import the model's Hugging Face folder instead"));
        }
    }
    let rope_scaling = match meta.string(&k("rope.scaling.type"))?.as_deref() {
        None | Some("none") => Json::Null,
        Some("linear") => {
            let f = meta.float(&k("rope.scaling.factor"))?.ok_or_else(|| meta.missing(&k("rope.scaling.factor")))?;
            json!({"rope_type": "linear", "type": "linear", "factor": f})
        }
        Some(other) => {
            return Err(StageFailure::new(format!("{shown}: rope scaling `{other}` is not supported"))
                .hint("import the model's Hugging Face folder instead"))
        }
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(StageFailure::new(format!(
            "{shown}: carries `rope_freqs.weight` (Llama 3.1-style rope scaling), which has no exact config.json equivalent"
        ))
        .hint("import the model's Hugging Face folder or hf:// repo instead"));
    }

    // Plan every output tensor before writing any.
    let mut plan: Vec<Planned> = Vec::new();
    let mut sources: Vec<(String, Fix)> = Vec::new();
    let mut quantization = BTreeMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut parameters = 0u64;
    for gname in names {
        let info = &content.tensor_infos[gname];
        let (hf, fix) = hf_name(gname, n_head, n_kv).ok_or_else(|| {
            StageFailure::new(format!("{shown}: unexpected tensor `{gname}` for a llama model")).hint(
                "the GGUF may be a different architecture labelled `llama`, or hold extra tensors pipe does not know",
            )
        })?;
        if let Some(layer) = hf.strip_prefix("model.layers.").and_then(|r| r.split('.').next()) {
            if !layer.parse::<usize>().is_ok_and(|l| l < layers) {
                return Err(StageFailure::new(format!("{shown}: tensor `{gname}` is beyond block_count {layers}")));
            }
        }
        let shape = info.shape.dims().to_vec();
        let elems: usize = shape.iter().product();
        if let Fix::Unpermute(h) = fix {
            if shape.len() != 2 || shape[0] != h * head_dim || !head_dim.is_multiple_of(2) {
                return Err(StageFailure::new(format!(
                    "{shown}: `{gname}` has shape {shape:?}, expected [{} x {hidden}] ({h} heads of {head_dim})",
                    h * head_dim
                )));
            }
        }
        *quantization.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
        parameters += elems as u64;
        plan.push(Planned { name: hf.clone(), dtype: dtype.st().into(), shape, nbytes: elems as u64 * dtype.size() });
        sources.push((gname.clone(), fix));
    }
    let mut required = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    for l in 0..layers {
        for p in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            required.push(format!("model.layers.{l}.{p}.weight"));
        }
    }
    for want in &required {
        if !plan.iter().any(|p| &p.name == want) {
            return Err(StageFailure::new(format!("{shown}: no tensor for `{want}`"))
                .hint("the GGUF is incomplete; download or convert it again"));
        }
    }
    let embed =
        plan.iter().find(|p| p.name == "model.embed_tokens.weight").map(|p| p.shape.clone()).unwrap_or_default();
    if embed.len() != 2 || embed[1] != hidden {
        return Err(StageFailure::new(format!(
            "{shown}: token_embd.weight has shape {embed:?}, expected [vocab x {hidden}]"
        )));
    }
    let vocab_size = embed[0];
    let tied = !plan.iter().any(|p| p.name == "lm_head.weight");

    let tok = tokenizer::build(&meta, Some(ctx_len))?;
    for n in &tok.notes {
        ctx.log_line(n);
    }
    if tok.vocab_len != vocab_size {
        ctx.log_line(&format!("note: the vocabulary has {} tokens, the embedding {vocab_size} rows", tok.vocab_len));
    }

    let n = plan.len();
    ctx.progress.message(&format!("dequantising {n} tensors to {}", dtype.torch()));
    let mut last = Instant::now();
    let mut done = 0usize;
    let dev = Device::Cpu;
    let mut files = st::write_model(out, &plan, max_shard, |i, w| {
        if ctx.cancel.is_cancelled() {
            return Err(StageFailure::new("cancelled"));
        }
        done += 1;
        if last.elapsed().as_secs() >= 2 {
            ctx.progress.message(&format!("dequantising tensor {done}/{n}"));
            last = Instant::now();
        }
        let (gname, fix) = &sources[i];
        let info = &content.tensor_infos[gname];
        let fail = |e: candle_core::Error| {
            StageFailure::new(format!("{shown}: tensor `{gname}` ({:?}): {e}", info.ggml_dtype))
                .hint("the file may be truncated or corrupt; download it again")
        };
        let q = info.read(&mut r, content.tensor_data_offset, &dev).map_err(fail)?;
        let t = q.dequantize(&dev).map_err(fail)?;
        let mut v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(fail)?;
        drop(t);
        if let Fix::Unpermute(h) = fix {
            let shape = &plan[i].shape;
            v = unpermute(&v, shape[0], shape[1], *h);
        }
        let mut buf = Vec::with_capacity(1 << 20);
        for chunk in v.chunks(1 << 18) {
            buf.clear();
            dtype.encode(chunk, &mut buf);
            w.write_all(&buf)?;
        }
        Ok(())
    })?;

    let mut config = serde_json::Map::new();
    let mut put = |k: &str, v: Json| {
        config.insert(k.to_string(), v);
    };
    put("architectures", json!(["LlamaForCausalLM"]));
    put("attention_bias", json!(false));
    put("attention_dropout", json!(0.0));
    put("bos_token_id", json!(tok.bos_id));
    put("eos_token_id", json!(tok.eos_id));
    put("head_dim", json!(head_dim));
    put("hidden_act", json!("silu"));
    put("hidden_size", json!(hidden));
    put("initializer_range", json!(0.02));
    put("intermediate_size", json!(inter));
    put("max_position_embeddings", json!(ctx_len));
    put("mlp_bias", json!(false));
    put("model_type", json!("llama"));
    put("num_attention_heads", json!(n_head));
    put("num_hidden_layers", json!(layers));
    put("num_key_value_heads", json!(n_kv));
    if let Some(p) = tok.pad_id {
        put("pad_token_id", json!(p));
    }
    put("pretraining_tp", json!(1));
    put("rms_norm_eps", json!(eps));
    put("rope_scaling", rope_scaling);
    put("rope_theta", json!(theta));
    put("tie_word_embeddings", json!(tied));
    put("torch_dtype", json!(dtype.torch()));
    put("use_cache", json!(true));
    put("vocab_size", json!(vocab_size));
    write_json(out, "config.json", &Json::Object(config))?;

    let mut gen = serde_json::Map::new();
    if let Some(b) = tok.bos_id {
        gen.insert("bos_token_id".into(), json!(b));
    }
    match tok.eos_ids.as_slice() {
        [] => {}
        [one] => {
            gen.insert("eos_token_id".into(), json!(one));
        }
        many => {
            gen.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(p) = tok.pad_id {
        gen.insert("pad_token_id".into(), json!(p));
    }
    write_json(out, "generation_config.json", &Json::Object(gen))?;
    write_json(out, "tokenizer.json", &tok.tokenizer_json)?;
    write_json(out, "tokenizer_config.json", &tok.tokenizer_config)?;
    files
        .extend(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"].map(String::from));
    files.sort();
    Ok(Imported {
        files,
        parameters,
        architecture: "LlamaForCausalLM".into(),
        quantization,
        name: meta.string("general.name")?,
    })
}

/// Pretty JSON with a trailing newline (as `save_pretrained` writes).
pub fn write_json(dir: &Path, name: &str, v: &Json) -> Result<(), StageFailure> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| StageFailure::new(e.to_string()))?;
    text.push('\n');
    let mut f = fs_err::File::create(dir.join(name))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permute, as in convert_hf_to_gguf.py.
    fn permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let hd = rows / heads;
        let half = hd / 2;
        let mut out = vec![0f32; w.len()];
        // reshape(heads, 2, half, cols).swapaxes(1, 2): out[h][i][j] = in[h][j][i]
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    let dst = (h * hd + 2 * i + j) * cols;
                    let src = (h * hd + j * half + i) * cols;
                    out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        assert_eq!(unpermute(&permute(&w, rows, cols, heads), rows, cols, heads), w);
        assert_ne!(permute(&w, rows, cols, heads), w);
    }
}
