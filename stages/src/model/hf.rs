//! Hugging Face-format folders (local, or a hub repo at a pinned commit) ->
//! the output folder. Weights are copied byte for byte unless `dtype:` asks
//! for another float type, in which case they are converted tensor by tensor
//! and resharded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use pipe_engine::stage::{RunCtx, StageFailure};
use serde_json::{json, Value as Json};

use super::gguf::{write_json, Imported};
use super::st::{self, DType, Planned};

/// Files copied when present (the tokenizer's other forms, chat templates).
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Local path of a file of the folder.
pub type Fetch<'a> = Box<dyn Fn(&str) -> Result<PathBuf, StageFailure> + 'a>;

/// A folder-shaped source: its file list and how to get a file's local path
/// (a plain join for a local folder, a download for the hub).
pub struct Folder<'a> {
    /// For messages: the folder path or `hf://ORG/NAME@sha`.
    pub shown: String,
    pub files: BTreeSet<String>,
    pub fetch: Fetch<'a>,
}

impl Folder<'_> {
    fn get(&self, name: &str) -> Result<PathBuf, StageFailure> {
        (self.fetch)(name)
    }

    fn read_json(&self, name: &str) -> Result<Json, StageFailure> {
        let p = self.get(name)?;
        let text = fs_err::read_to_string(&p)?;
        serde_json::from_str(&text)
            .map_err(|e| StageFailure::new(format!("{}/{name}: not valid JSON: {e}", self.shown)))
    }
}

/// The weight files of the folder: the index (if any) and the shards.
fn weight_files(src: &Folder) -> Result<(Option<Json>, Vec<String>), StageFailure> {
    if src.files.contains("model.safetensors.index.json") {
        let index = src.read_json("model.safetensors.index.json")?;
        let map = index.get("weight_map").and_then(Json::as_object).ok_or_else(|| {
            StageFailure::new(format!("{}/model.safetensors.index.json: no `weight_map` object", src.shown))
        })?;
        let shards: BTreeSet<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
        for s in &shards {
            if !src.files.contains(s) {
                return Err(StageFailure::new(format!(
                    "{}: model.safetensors.index.json names `{s}`, which is not there",
                    src.shown
                ))
                .hint("the folder is incomplete; copy or download every shard"));
            }
        }
        return Ok((Some(index), shards.into_iter().collect()));
    }
    if src.files.contains("model.safetensors") {
        return Ok((None, vec!["model.safetensors".into()]));
    }
    let bins = src.files.iter().any(|f| f.starts_with("pytorch_model") && f.ends_with(".bin"));
    let err = StageFailure::new(format!("{}: no model.safetensors or model.safetensors.index.json", src.shown));
    Err(if bins {
        err.hint("only PyTorch .bin weights are there; pipe reads safetensors: in Python, `AutoModelForCausalLM.from_pretrained(p).save_pretrained(out, safe_serialization=True)`")
    } else {
        err.hint("a Hugging Face model folder holds config.json, tokenizer.json and model.safetensors (or shards + model.safetensors.index.json)")
    })
}

pub fn import(
    src: &Folder,
    out: &std::path::Path,
    dtype: Option<DType>,
    max_shard: u64,
    ctx: &RunCtx,
) -> Result<(Imported, String), StageFailure> {
    if !src.files.contains("config.json") {
        return Err(StageFailure::new(format!("{}: no config.json", src.shown))
            .hint("a Hugging Face model folder holds config.json, tokenizer.json and model.safetensors"));
    }
    let mut config = src.read_json("config.json")?;
    if !config.is_object() {
        return Err(StageFailure::new(format!("{}/config.json: not a JSON object", src.shown)));
    }
    if !src.files.contains("tokenizer.json") {
        return Err(StageFailure::new(format!("{}: no tokenizer.json (a fast tokenizer)", src.shown)).hint(
            "save one with `AutoTokenizer.from_pretrained(p).save_pretrained(p)` (transformers writes tokenizer.json for fast tokenizers)",
        ));
    }
    let tok_path = src.get("tokenizer.json")?;
    let tok_text = fs_err::read_to_string(&tok_path)?;
    tok_text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        StageFailure::new(format!("{}/tokenizer.json: does not load: {e}", src.shown))
            .hint("the file may be truncated, or written by a newer `tokenizers` than pipe's")
    })?;

    let (index, shards) = weight_files(src)?;
    let mut headers = Vec::new();
    for s in &shards {
        headers.push(st::read_header(&src.get(s)?)?);
    }
    let mut parameters = 0u64;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for h in &headers {
        for e in h.tensors.values() {
            parameters += e.shape.iter().product::<usize>() as u64;
            *dtypes.entry(e.dtype.clone()).or_insert(0) += 1;
        }
    }
    if let Some(map) = index.as_ref().and_then(|i| i.get("weight_map")).and_then(Json::as_object) {
        for (name, shard) in map {
            let found = shards
                .iter()
                .zip(&headers)
                .any(|(s, h)| Some(s.as_str()) == shard.as_str() && h.tensors.contains_key(name));
            if !found {
                return Err(StageFailure::new(format!(
                    "{}: model.safetensors.index.json puts `{name}` in {shard}, which does not hold it",
                    src.shown
                )));
            }
        }
    }
    let float_dtypes: Vec<DType> = dtypes.keys().filter_map(|d| DType::from_st(d)).collect();
    let convert = match dtype {
        Some(t) => float_dtypes.iter().any(|d| *d != t),
        None => false,
    };
    let mut files = Vec::new();
    let shown_dtype;
    if convert {
        let target = dtype.expect("convert implies a dtype");
        shown_dtype = target.torch().to_string();
        let mut plan = Vec::new();
        let mut from = Vec::new();
        for (k, h) in headers.iter().enumerate() {
            for (name, e) in &h.tensors {
                let elems = e.shape.iter().product::<usize>() as u64;
                let (dt, nbytes) = match DType::from_st(&e.dtype) {
                    Some(_) => (target.st().to_string(), elems * target.size()),
                    None => (e.dtype.clone(), e.end - e.start),
                };
                plan.push(Planned { name: name.clone(), dtype: dt, shape: e.shape.clone(), nbytes });
                from.push((k, e.clone()));
            }
        }
        let mut open: Vec<Option<fs_err::File>> = headers.iter().map(|_| None).collect();
        let n = plan.len();
        let mut done = 0usize;
        files = st::write_model(out, &plan, max_shard, |i, w| {
            if ctx.cancel.is_cancelled() {
                return Err(StageFailure::new("cancelled"));
            }
            done += 1;
            if done.is_multiple_of(64) {
                ctx.progress.message(&format!("converting tensor {done}/{n} to {}", target.torch()));
            }
            let (k, e) = &from[i];
            if open[*k].is_none() {
                open[*k] = Some(fs_err::File::open(&headers[*k].path)?);
            }
            let f = open[*k].as_mut().expect("opened above");
            let bytes = st::read_bytes(f, e)?;
            match DType::from_st(&e.dtype) {
                Some(d) => {
                    let mut xs = Vec::with_capacity(bytes.len() / d.size() as usize);
                    d.decode(&bytes, &mut xs);
                    drop(bytes);
                    let mut buf = Vec::with_capacity(1 << 20);
                    for c in xs.chunks(1 << 18) {
                        buf.clear();
                        target.encode(c, &mut buf);
                        w.write_all(&buf)?;
                    }
                }
                None => w.write_all(&bytes)?,
            }
            Ok(())
        })?;
        let obj = config.as_object_mut().expect("checked object");
        let key = if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") { "dtype" } else { "torch_dtype" };
        obj.insert(key.into(), json!(target.torch()));
        write_json(out, "config.json", &config)?;
    } else {
        shown_dtype = config
            .get("torch_dtype")
            .or_else(|| config.get("dtype"))
            .and_then(Json::as_str)
            .map(str::to_string)
            .or_else(|| float_dtypes.first().map(|d| d.torch().to_string()))
            .unwrap_or_else(|| "unknown".into());
        for s in shards.iter().chain(index.as_ref().map(|_| "model.safetensors.index.json".to_string()).iter()) {
            fs_err::copy(src.get(s)?, out.join(s))?;
            files.push(s.clone());
        }
        fs_err::copy(src.get("config.json")?, out.join("config.json"))?;
    }
    fs_err::copy(&tok_path, out.join("tokenizer.json"))?;
    files.extend(["config.json".to_string(), "tokenizer.json".to_string()]);
    for name in OPTIONAL {
        if src.files.contains(*name) {
            fs_err::copy(src.get(name)?, out.join(name))?;
            files.push(name.to_string());
        }
    }
    files.sort();
    let architecture = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .or_else(|| config.get("model_type").and_then(Json::as_str))
        .unwrap_or("unknown")
        .to_string();
    let quantization = BTreeMap::new();
    Ok((Imported { files, parameters, architecture, quantization, name: None }, shown_dtype))
}
