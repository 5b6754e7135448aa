//! `merge`: fold a LoRA adapter into its base model, giving an HF folder.
//!
//! ```yaml
//! merged:
//!   kind: merge
//!   inputs: {model: base, adapter: sft}
//!   dtype: bf16              # optional: f32 | bf16 | f16 (default: each tensor's own)
//!   max_shard_size: 5GB      # optional, with a safetensors index when sharded
//! ```
//!
//! Inputs: `model`, an HF-format folder (a `model` stage); `adapter`, a PEFT
//! LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`):
//! a `train` stage's, or any PEFT LoRA adapter.
//!
//! Output: an HF folder: every base tensor, with `W + scale * B @ A` for the
//! adapter's target modules (scale = alpha / r, or alpha / sqrt(r) with
//! rslora), `modules_to_save` copied in (`lm_head` of a tied model becomes
//! its own tensor and `tie_word_embeddings` turns false), config.json,
//! tokenizer files, and `merge.json` (what was merged).
//!
//! Streams tensor by tensor: memory is bounded by the largest tensor, not the
//! model. Key: params + the two input digests.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use pipe_engine::stage::{parse_params, ParamError, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::st::{self, DType, Entry, Planned};
use crate::nn::llama::{peft_spec, weight_files};
use crate::train::fail;

pub struct MergeKind;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    dtype: Option<DType>,
    #[serde(default)]
    max_shard_size: Option<String>,
}

struct MergeStage {
    p: Params,
    max_shard: u64,
}

impl StageKind for MergeKind {
    fn name(&self) -> &'static str {
        "merge"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "fold a LoRA adapter into its base model (an HF folder)"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        let max_shard = match &p.max_shard_size {
            None => 5_000_000_000,
            Some(t) => st::parse_size(t).ok_or_else(|| {
                ParamError::new(vec![Seg::Key("max_shard_size".into())], format!("`{t}` is not a size"))
                    .hint("write e.g. 5GB, 500MB or 2GiB")
            })?,
        };
        Ok(Box::new(MergeStage { p, max_shard }))
    }
}

impl Stage for MergeStage {
    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let get = |name: &str| -> Result<&PathBuf, StageFailure> {
            ctx.inputs.get(name).ok_or_else(|| {
                StageFailure::new(format!("`merge` needs an input named `{name}`"))
                    .hint("write `inputs: {model: MODEL_STAGE, adapter: TRAIN_STAGE}`")
            })
        };
        let (base, adapter) = (get("model")?, get("adapter")?);
        if !adapter.join("adapter_config.json").exists() {
            return Err(StageFailure::new(format!("{}: no adapter_config.json", adapter.display()))
                .hint("the `adapter` input must be a LoRA adapter (a `train` stage with method lora or qlora)"));
        }
        let spec = peft_spec(adapter).map_err(fail)?;
        let lora = spec.lora.as_ref().expect("peft_spec gives a LoRA spec");
        let scale = lora.scale();
        let a_file = adapter.join("adapter_model.safetensors");
        let ad: HashMap<String, Tensor> = candle_core::safetensors::load(&a_file, &Device::Cpu)
            .map_err(|e| fail(format!("{}: {e}", a_file.display())))?;

        // Every base tensor: (file, entry).
        let mut src: BTreeMap<String, (PathBuf, Entry)> = BTreeMap::new();
        for f in weight_files(base).map_err(fail)? {
            for (name, e) in st::read_header(&f)?.tensors {
                src.insert(name, (f.clone(), e));
            }
        }
        let mut cfg: Value = serde_json::from_str(&fs_err::read_to_string(base.join("config.json"))?).map_err(fail)?;
        let tied = cfg["tie_word_embeddings"].as_bool().unwrap_or(false) || !src.contains_key("lm_head.weight");
        let saved = |m: &str| ad.get(&format!("base_model.model.{m}"));
        // What each output tensor is made of.
        enum Make {
            Copy(String),
            Lora(String, Tensor, Tensor),
            Saved(Tensor),
        }
        let mut plan: Vec<(Planned, Make)> = Vec::new();
        let mut merged_modules = 0usize;
        let out_dtype = |e: &Entry| -> Result<DType, StageFailure> {
            DType::from_st(&e.dtype)
                .map(|d| self.p.dtype.unwrap_or(d))
                .ok_or_else(|| fail(format!("tensor dtype {} is not supported (f32, bf16, f16)", e.dtype)))
        };
        for (name, (_, e)) in &src {
            let dt = out_dtype(e)?;
            let numel: usize = e.shape.iter().product();
            let planned = Planned {
                name: name.clone(),
                dtype: dt.st().into(),
                shape: e.shape.clone(),
                nbytes: numel as u64 * dt.size(),
            };
            let module = name.strip_suffix(".weight").unwrap_or(name);
            let short = module.rsplit('.').next().unwrap_or(module);
            let make = if let Some(t) = saved(name) {
                Make::Saved(t.clone())
            } else if name.ends_with(".weight") && lora.targets.iter().any(|t| t == short) {
                let key = |ab: &str| format!("base_model.model.{module}.lora_{ab}.weight");
                match (ad.get(&key("A")), ad.get(&key("B"))) {
                    (Some(a), Some(b)) => {
                        merged_modules += 1;
                        Make::Lora(name.clone(), a.clone(), b.clone())
                    }
                    _ => {
                        return Err(StageFailure::new(format!("{}: `{}` is missing", a_file.display(), key("A")))
                            .hint("the adapter does not match this base model"))
                    }
                }
            } else {
                Make::Copy(name.clone())
            };
            plan.push((planned, make));
        }
        // modules_to_save of a tied head: the head becomes its own tensor.
        let mut untied = false;
        if let (Some(t), true) = (saved("lm_head.weight"), tied) {
            let e =
                &src.get("model.embed_tokens.weight").ok_or_else(|| fail("base has no model.embed_tokens.weight"))?.1;
            let dt = out_dtype(e)?;
            let shape = t.dims().to_vec();
            let numel: usize = shape.iter().product();
            plan.push((
                Planned {
                    name: "lm_head.weight".into(),
                    dtype: dt.st().into(),
                    shape,
                    nbytes: numel as u64 * dt.size(),
                },
                Make::Saved(t.clone()),
            ));
            untied = true;
        }
        let planned: Vec<Planned> = plan.iter().map(|(p, _)| p.clone()).collect();
        let mut open: HashMap<PathBuf, fs_err::File> = HashMap::new();
        let total = plan.len();
        st::write_model(ctx.out_dir, &planned, self.max_shard, |i, w| {
            if ctx.cancel.is_cancelled() {
                return Err(StageFailure::new("cancelled"));
            }
            let (p, make) = &plan[i];
            let dt = DType::from_st(&p.dtype).expect("planned dtype");
            let read = |name: &str, open: &mut HashMap<PathBuf, fs_err::File>| -> Result<Vec<f32>, StageFailure> {
                let (f, e) = &src[name];
                if !open.contains_key(f) {
                    open.insert(f.clone(), fs_err::File::open(f)?);
                }
                let bytes = st::read_bytes(open.get_mut(f).expect("opened"), e)?;
                let mut xs = Vec::with_capacity(bytes.len() / 2);
                DType::from_st(&e.dtype).expect("checked").decode(&bytes, &mut xs);
                Ok(xs)
            };
            let xs: Vec<f32> = match make {
                Make::Copy(n) => read(n, &mut open)?,
                Make::Saved(t) => t
                    .flatten_all()
                    .and_then(|t| t.to_dtype(candle_core::DType::F32))
                    .and_then(|t| t.to_vec1())
                    .map_err(fail)?,
                Make::Lora(n, a, b) => {
                    let w = read(n, &mut open)?;
                    let f32 = candle_core::DType::F32;
                    let d = (|| {
                        let a = a.to_dtype(f32)?;
                        let b = b.to_dtype(f32)?;
                        let w = Tensor::from_vec(w, p.shape.as_slice(), &Device::Cpu)?;
                        (w + b.matmul(&a)?.affine(scale, 0.0)?)?.flatten_all()?.to_vec1::<f32>()
                    })()
                    .map_err(|e| fail(format!("{n}: {e}")))?;
                    d
                }
            };
            let mut out = Vec::with_capacity(xs.len() * dt.size() as usize);
            dt.encode(&xs, &mut out);
            w.write_all(&out)?;
            ctx.progress.message(&format!("{}/{total} tensors", i + 1));
            Ok(())
        })?;
        if untied {
            cfg["tie_word_embeddings"] = json!(false);
        }
        if let Some(dt) = self.p.dtype {
            cfg["torch_dtype"] = json!(dt.torch());
        }
        fs_err::write(ctx.out_dir.join("config.json"), serde_json::to_string_pretty(&cfg).map_err(fail)? + "\n")?;
        crate::model::copy_tokenizer_files(base, ctx.out_dir)?;
        let summary = json!({
            "schema": 1,
            "r": lora.r,
            "alpha": lora.alpha,
            "rslora": lora.rslora,
            "scale": scale,
            "target_modules": lora.targets,
            "merged_modules": merged_modules,
            "modules_to_save": spec.modules_to_save,
            "untied_lm_head": untied,
            "tensors": total,
        });
        fs_err::write(ctx.out_dir.join("merge.json"), serde_json::to_vec_pretty(&summary).map_err(fail)?)?;
        ctx.log_line(&format!("merged {merged_modules} LoRA modules (scale {scale})"));
        Ok(())
    }
}
