//! `model`: bring a base model into the store as a Hugging Face-format folder.
//!
//! ```yaml
//! base:
//!   kind: model
//!   source: hf://HuggingFaceTB/SmolLM2-135M-Instruct@main
//!   dtype: f32                    # optional: f32 | bf16 | f16
//!   max_shard_size: 5GB           # optional, for the weights pipe writes
//! local:
//!   kind: model
//!   source: models/smollm2.Q4_1.gguf    # a GGUF file, or an HF folder, in the workspace
//! fetched:
//!   kind: model
//!   inputs: {dl: fetch}                 # another stage's output...
//!   source: input:dl/model.gguf         # ...a file or folder inside it (`input:dl` = all of it)
//! ```
//!
//! Inputs (`source:`):
//! - `hf://ORG/NAME[@REV]`: a hub repo (`REV`: branch, tag or sha; default
//!   `main`) through [`crate::hub`] (`HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`,
//!   `HF_HUB_OFFLINE`). Reads config.json, tokenizer.json,
//!   model.safetensors or the shards + index, and the optional
//!   tokenizer_config.json (chat template), generation_config.json, ....
//! - a workspace path: a `.gguf` file, or an HF-format folder.
//! - `input:NAME[/PATH]`: the output of the stage named in `inputs: {NAME:
//!   STAGE}`, or a file or folder inside it; GGUF or HF folder as above.
//!
//! Outputs: an HF-format folder that `transformers` loads: `config.json`,
//! `model.safetensors` (or `model-0000K-of-0000N.safetensors` +
//! `model.safetensors.index.json`), `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`, and `model.json`
//! (`{"schema": 1, "source", "format": "gguf"|"hf", "revision", "architecture",
//! "parameters", "dtype", ...}`).
//!
//! A GGUF (architecture `llama`; F32/F16/BF16, Q4_0..Q8_1 and K-quants) is
//! dequantised tensor by tensor into HF names, q/k rows un-permuted, its
//! vocabulary rebuilt as a byte-level BPE `tokenizer.json` (see
//! `model/tokenizer.rs`) and its chat template put in tokenizer_config.json.
//! `dtype` defaults to `f32` for a GGUF (dequantised values are exact in
//! f32; f32 is also what CPU training wants) and to the stored dtype for HF
//! folders (weights copied byte for byte); given, float tensors are converted.
//!
//! Key: `source`, `dtype`, `max_shard_size`; the content digest of a
//! workspace source (file or folder); the input's digest for `input:`; for
//! `hf://`, the commit sha the revision resolves to now (a pin: a moved
//! branch shows in `pipe status` and reruns the stage).

mod gguf;
mod hf;
pub(crate) mod st;
mod tokenizer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use pipe_engine::stage::{parse_params, FileDep, ParamError, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::hub::{Hub, HubError, HubRef, Resolved};
pub use gguf::unpermute;
pub use st::DType;

pub struct ModelKind;

/// The tokenizer and generation files of an HF folder that travel with its
/// weights (copied, when present, into a fine-tune or merge output).
pub(crate) fn copy_tokenizer_files(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
        let src = from.join(f);
        if src.exists() {
            fs_err::copy(&src, to.join(f))?;
        }
    }
    Ok(())
}

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a size like `5GB` or `500MB`, or a number of bytes")]
enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    source: String,
    #[serde(default)]
    dtype: Option<DType>,
    #[serde(default)]
    max_shard_size: Option<Size>,
}

#[derive(Debug)]
enum Source {
    /// A workspace file or folder.
    Path(String),
    /// `input:NAME[/SUB]`.
    Input {
        name: String,
        sub: String,
    },
    Hub(HubRef),
}

struct ModelStage {
    p: Params,
    source: Source,
    max_shard: u64,
    /// The hub revision the latest key was computed with; `run` reads
    /// exactly that commit.
    pinned: Mutex<Option<Resolved>>,
}

const DEFAULT_SHARD: u64 = 5_000_000_000;

fn at_source() -> Vec<Seg> {
    vec![Seg::Key("source".into())]
}

fn parse_source(s: &str) -> Result<Source, ParamError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(ParamError::new(at_source(), "`source` is empty")
            .hint("give hf://ORG/NAME[@REV], a workspace path to a .gguf file or HF folder, or input:NAME"));
    }
    if HubRef::is_hub(s) {
        return HubRef::parse(s).map(Source::Hub).map_err(|e| {
            let mut pe = ParamError::new(at_source(), e.to_string());
            pe.hint = e.hint();
            pe
        });
    }
    if let Some(rest) = s.strip_prefix("input:") {
        let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
        let name_ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(ParamError::new(at_source(), format!("`{s}`: `{name}` is not an input name"))
                .hint("write `input:NAME` or `input:NAME/path/inside`, with `inputs: {NAME: STAGE}` on the stage"));
        }
        if sub.split('/').any(|c| c == "..") || sub.starts_with('/') {
            return Err(ParamError::new(at_source(), format!("`{s}`: the path must stay inside the input"))
                .hint("write a relative path without `..`"));
        }
        return Ok(Source::Input { name: name.to_string(), sub: sub.trim_end_matches('/').to_string() });
    }
    if s.contains("://") {
        return Err(ParamError::new(at_source(), format!("`{s}`: unsupported URL scheme")).hint(
            "hub repos are written hf://ORG/NAME[@REV]; other downloads can be a `command` stage feeding `input:NAME`",
        ));
    }
    if s.starts_with('/') || s.split('/').any(|c| c == "..") {
        return Err(ParamError::new(at_source(), format!("`{s}` is not a path inside the workspace"))
            .hint("sources are hashed into the key, so they live in the workspace: copy or link the file there and give its relative path"));
    }
    Ok(Source::Path(s.trim_end_matches('/').to_string()))
}

impl StageKind for ModelKind {
    fn name(&self) -> &'static str {
        "model"
    }
    fn version(&self) -> u32 {
        // 2: GGUF imports write `model_input_names` in tokenizer_config.json.
        2
    }
    fn summary(&self) -> &'static str {
        "a base model (hf://, HF folder or GGUF) as an HF-format folder"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        let source = parse_source(&p.source)?;
        let max_shard = match &p.max_shard_size {
            None => DEFAULT_SHARD,
            Some(Size::Bytes(n)) => *n,
            Some(Size::Text(t)) => st::parse_size(t).unwrap_or(0),
        };
        if max_shard == 0 {
            return Err(ParamError::new(vec![Seg::Key("max_shard_size".into())], "not a positive size")
                .hint("write e.g. `5GB`, `500MB`, `2GiB` or a number of bytes"));
        }
        Ok(Box::new(ModelStage { p, source, max_shard, pinned: Mutex::new(None) }))
    }
}

fn hub_failure(e: HubError) -> StageFailure {
    let hint = e.hint();
    let mut f = StageFailure::new(e.to_string());
    f.hint = hint;
    f
}

impl ModelStage {
    fn resolve(&self, r: &HubRef) -> Result<Resolved, StageFailure> {
        let res = Hub::from_env().and_then(|h| h.resolve(r)).map_err(hub_failure)?;
        if let Ok(mut p) = self.pinned.lock() {
            *p = Some(res.clone());
        }
        Ok(res)
    }

    /// The local path of a workspace or input source.
    fn local_path(&self, ctx: &RunCtx) -> Result<PathBuf, StageFailure> {
        match &self.source {
            Source::Path(p) => Ok(ctx.workspace.join(p)),
            Source::Input { name, sub } => {
                let base = ctx.inputs.get(name).ok_or_else(|| {
                    StageFailure::new(format!(
                        "`source: {}` names input `{name}`, but the stage has no such input",
                        self.p.source
                    ))
                    .hint(format!("add `inputs: {{{name}: STAGE}}` (or STAGE/path) to the stage"))
                })?;
                let p = if sub.is_empty() { base.clone() } else { base.join(sub) };
                if !p.exists() {
                    return Err(StageFailure::new(format!(
                        "`{sub}` does not exist in input `{name}` ({})",
                        base.display()
                    ))
                    .hint("list the upstream output with `pipe show STAGE --path`"));
                }
                Ok(p)
            }
            Source::Hub(_) => unreachable!("hub sources are not local"),
        }
    }
}

impl Stage for ModelStage {
    fn files(&self) -> Vec<FileDep> {
        match &self.source {
            Source::Path(p) => vec![FileDep { path: p.clone(), at: at_source() }],
            _ => Vec::new(),
        }
    }

    fn pins(&self) -> Result<BTreeMap<String, String>, StageFailure> {
        match &self.source {
            Source::Hub(r) => {
                let res = self.resolve(r)?;
                Ok(BTreeMap::from([(r.to_string(), res.sha)]))
            }
            _ => Ok(BTreeMap::new()),
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let out = ctx.out_dir;
        let (imported, format, revision, dtype) = match &self.source {
            Source::Hub(r) => {
                let pinned = self.pinned.lock().ok().and_then(|p| p.clone());
                let res = match pinned {
                    Some(p) => p,
                    None => self.resolve(r)?,
                };
                let hub = Hub::from_env().map_err(hub_failure)?;
                ctx.log_line(&format!("# {r} -> {} (endpoint {})", res.sha, hub.endpoint()));
                ctx.progress.message(&format!("downloading {}@{}", r.repo, &res.sha[..12]));
                let sha = res.sha.clone();
                let folder = hf::Folder {
                    shown: format!("hf://{}@{}", r.repo, &sha[..12]),
                    files: res.files.iter().filter(|f| !f.contains('/')).cloned().collect(),
                    fetch: Box::new(move |f: &str| {
                        ctx.log_line(&format!("# fetch {f}"));
                        hub.download(r, &sha, f).map_err(hub_failure)
                    }),
                };
                let (imp, dt) = hf::import(&folder, out, self.p.dtype, self.max_shard, ctx)?;
                (imp, "hf", Some(res.sha), dt)
            }
            _ => {
                let path = self.local_path(ctx)?;
                let shown = self.p.source.clone();
                if path.is_dir() {
                    let files: BTreeSet<String> = fs_err::read_dir(&path)?
                        .flatten()
                        .filter(|e| e.path().is_file())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    let dir = path.clone();
                    let folder = hf::Folder { shown, files, fetch: Box::new(move |f: &str| Ok(dir.join(f))) };
                    let (imp, dt) = hf::import(&folder, out, self.p.dtype, self.max_shard, ctx)?;
                    (imp, "hf", None, dt)
                } else if path.is_file() {
                    let dt = self.p.dtype.unwrap_or(DType::F32);
                    let imp = gguf::import(&path, &shown, out, dt, self.max_shard, ctx)?;
                    (imp, "gguf", None, dt.torch().to_string())
                } else {
                    return Err(StageFailure::new(format!("{shown}: no such file or folder"))
                        .hint("give a .gguf file or an HF model folder"));
                }
            }
        };
        let mut summary = serde_json::Map::new();
        summary.insert("schema".into(), json!(1));
        summary.insert("source".into(), json!(self.p.source));
        summary.insert("format".into(), json!(format));
        summary.insert("revision".into(), json!(revision));
        summary.insert("architecture".into(), json!(imported.architecture));
        summary.insert("parameters".into(), json!(imported.parameters));
        summary.insert("dtype".into(), json!(dtype));
        if format == "gguf" {
            summary.insert("gguf".into(), json!({"name": imported.name, "tensor_types": imported.quantization}));
        }
        let mut files = imported.files.clone();
        files.push("model.json".into());
        files.sort();
        summary.insert("files".into(), json!(files));
        gguf::write_json(out, "model.json", &Value::Object(summary))?;
        ctx.log_line(&format!("# {} parameters, {dtype}, {} files", imported.parameters, imported.files.len() + 1));
        Ok(())
    }
}
