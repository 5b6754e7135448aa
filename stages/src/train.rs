//! `train`: supervised fine-tuning of a Llama-family model on a `pack`
//! artifact, natively on candle: full fine-tuning, LoRA, QLoRA, Spectrum.
//!
//! ```yaml
//! sft:
//!   kind: train
//!   inputs: {model: base, data: packed}
//!   method: lora                 # full | lora | qlora | spectrum
//!   lora: {r: 16, alpha: 16, dropout: 0.05, target: all-linear,
//!          modules_to_save: [lm_head, embed_tokens], rslora: false}
//!   learning_rate: 2.0e-4
//!   lr_scheduler: constant       # constant | constant_with_warmup | linear | cosine
//!   warmup_ratio: 0.1            # or warmup_steps: N
//!   per_device_batch_size: 8     # packed rows per micro-batch
//!   gradient_accumulation_steps: 2
//!   devices: 1                   # data-parallel replicas (one per GPU)
//!   zero_stage: 0                # 1: optimizer state sharded over the replicas; 2: gradients too
//!   num_epochs: 1                # or max_steps: N
//!   max_grad_norm: 1.0
//!   weight_decay: 0.0
//!   seed: 42
//!   precision: f32               # f32 | bf16
//!   gradient_checkpointing: false
//!   logging_steps: 1
//!   checkpoint_every: 50         # steps; 0 = never
//!   eval_steps: 0                # with an `eval` input: also every N steps
//! ```
//!
//! Inputs: `model` (an HF-format folder, e.g. a `model` stage) and `data` (a
//! `pack` artifact; `split:` picks `<split>.parquet`, default `train`, or
//! the only Parquet file there is). Optional `eval`: another `pack` artifact
//! (`eval_split:` as `split:`) whose mean loss over its trained tokens (no
//! dropout) is measured before the first step, every `eval_steps` and after
//! the last: `eval/loss` in the metrics (TRL's `eval_loss`), and the before
//! and after values in `train.json` and `summary.txt`.
//!
//! Outputs: LoRA/QLoRA: `adapter_config.json` + `adapter_model.safetensors`
//! as PEFT writes them (`base_model.model.<module>.lora_A.weight`, ...;
//! `modules_to_save` as `base_model.model.lm_head.weight`). Full/Spectrum:
//! an HF folder (`config.json`, `model.safetensors`). Both: the tokenizer
//! files, `metrics.jsonl` (one line per logged step), `train.json` (summary),
//! `summary.txt` (what `pipe run` prints), `loss.png`, `tensorboard/`.
//!
//! Resuming: with `checkpoint_every`, trainable weights, optimizer state and
//! the step are saved under `.pipe/resume/<key>/`; a rerun of the same key
//! (after Ctrl-C, a crash or a kill) continues from there. The data order and
//! dropout masks derive from `seed` and the step, so a resumed CPU run ends
//! with the same weights, bit for bit, as an uninterrupted one.
//!
//! Data parallelism (`devices: N`): N replicas of the model, one per GPU the
//! engine grants the stage (with `device: cpu`, N replicas on the CPU: for
//! testing). Each optimizer step takes `per_device_batch_size x devices x
//! gradient_accumulation_steps` rows, as `accelerate`/`torchrun` count
//! them; micro-batch m runs on replica m mod N (threads), the replicas'
//! gradients are summed (all-reduce) and every replica takes the same
//! AdamW step, so N devices train like one device with N times the
//! accumulation. The all-reduce runs in buckets of ~25 MB as the backward
//! pass of the step's last micro-batch finishes each layer (see
//! [`crate::nn::dist`]): over NCCL on GPUs when built with the `nccl`
//! feature, through host memory otherwise (CPU replicas, or CUDA without
//! NCCL). The replicas' optimizer steps run in parallel too.
//!
//! `zero_stage: 1` or `2` (DeepSpeed's ZeRO names) shards the optimizer
//! over the replicas: each trainable tensor has one owner replica (tensors
//! dealt out by size), whose AdamW alone holds its f32 master copy and
//! moments, so optimizer memory per device falls with the device count.
//! Stage 1: every replica gets the summed gradients (an all-reduce) and
//! their global norm. Stage 2 shards the gradients too: each gradient
//! bucket has an owner (buckets dealt out by size), the bucket's sum goes
//! to its owner only (a reduce), the others free their share once it is
//! sent, and the global norm is the sum of the owners' parts. Each owner
//! clips and updates its tensors, and the new values are broadcast to the
//! other replicas (NCCL broadcasts, or copies between devices). Same
//! results as `zero_stage: 0` up to summation order.
//!
//! Key: all params, plus the model and data digests. Not marked
//! deterministic: `metrics.jsonl` records wall-clock times.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow_array::{Array, Int32Array, ListArray};
use candle_core::{DType, Device, Tensor, Var};
use pipe_engine::stage::{parse_params, ParamError, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::metrics::{plot_loss, series, EventWriter, Metrics, MetricsLog, METRICS_FILE, TB_DIR};
use crate::nn::dist::GradSync;
use crate::nn::llama::{Batch, Fwd, Llama, LoraSpec, Row, TrainSpec, ALL_LINEAR};
use crate::nn::optim::{lr_at, AdamW, AdamWConfig, Schedule};
use crate::nn::{spectrum, NnError};
use crate::table;

pub struct TrainKind;

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Method {
    Full,
    Lora,
    Qlora,
    Spectrum,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Precision {
    #[default]
    F32,
    Bf16,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DevicePref {
    /// CUDA when this build has it and a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
enum Target {
    Named(String),
    List(Vec<String>),
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct LoraParams {
    #[serde(default = "d_r")]
    r: usize,
    #[serde(default = "d_alpha", alias = "lora_alpha")]
    alpha: f64,
    #[serde(default, alias = "lora_dropout")]
    dropout: f64,
    #[serde(default = "d_target", alias = "target_modules")]
    target: Target,
    #[serde(default)]
    modules_to_save: Vec<String>,
    #[serde(default, alias = "use_rslora")]
    rslora: bool,
}

fn d_r() -> usize {
    16
}
fn d_alpha() -> f64 {
    16.0
}
fn d_target() -> Target {
    Target::Named("all-linear".into())
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct SpectrumParams {
    #[serde(default = "d_top")]
    top_percent: f64,
}

fn d_top() -> f64 {
    30.0
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    method: Method,
    #[serde(default)]
    lora: Option<LoraParams>,
    #[serde(default)]
    spectrum: Option<SpectrumParams>,
    #[serde(default)]
    unfrozen_parameters: Option<Vec<String>>,
    #[serde(default = "d_lr")]
    learning_rate: f64,
    #[serde(default = "d_sched", alias = "lr_scheduler_type")]
    lr_scheduler: Schedule,
    #[serde(default)]
    warmup_ratio: f64,
    #[serde(default)]
    warmup_steps: Option<usize>,
    #[serde(default = "one", alias = "per_device_train_batch_size")]
    per_device_batch_size: usize,
    #[serde(default = "one")]
    gradient_accumulation_steps: usize,
    #[serde(default = "one")]
    devices: usize,
    #[serde(default)]
    zero_stage: u8,
    #[serde(default = "d_epochs", alias = "num_train_epochs")]
    num_epochs: f64,
    #[serde(default)]
    max_steps: Option<usize>,
    #[serde(default = "d_clip")]
    max_grad_norm: f64,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default = "d_b1", alias = "adam_beta1")]
    beta1: f64,
    #[serde(default = "d_b2", alias = "adam_beta2")]
    beta2: f64,
    #[serde(default = "d_eps", alias = "adam_epsilon")]
    eps: f64,
    #[serde(default = "d_seed")]
    seed: u64,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    device: DevicePref,
    #[serde(default)]
    gradient_checkpointing: bool,
    #[serde(default = "one")]
    logging_steps: usize,
    #[serde(default, alias = "save_steps")]
    checkpoint_every: usize,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    eval_split: Option<String>,
    #[serde(default)]
    eval_steps: usize,
}

fn d_lr() -> f64 {
    2e-4
}
fn d_sched() -> Schedule {
    Schedule::Linear
}
fn one() -> usize {
    1
}
fn d_epochs() -> f64 {
    1.0
}
fn d_clip() -> f64 {
    1.0
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_seed() -> u64 {
    42
}

struct TrainStage {
    p: Params,
}

/// A param error at `key`, or at `key.sub` given "key.sub".
fn perr(key: &str, msg: impl Into<String>) -> ParamError {
    ParamError::new(key.split('.').map(|k| Seg::Key(k.into())).collect(), msg.into())
}

impl StageKind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 3: fused CUDA kernels (attention, RMSNorm, RoPE, SwiGLU) change
        // GPU results at rounding level; the gradient norm is summed on the
        // device. 4: on CUDA the LM head's cross-entropy and AdamW run as
        // kernels (f32 clipping of bf16 gradients). 5: a LoRA linear is one
        // op (base + scaled update summed in another order: rounding). 6:
        // RMSNorm and SwiGLU are one op each on the CPU too (f32; their
        // backward passes round differently). 7: on the CPU in f32 the LoRA
        // update is accumulated into the base product by one gemm. 8: on
        // the CPU the LoRA dropout runs inside that op (the same masks; the
        // update summed in the op's order: rounding); on CUDA its masks are
        // made on the device (other draws than the host's).
        8
    }
    fn summary(&self) -> &'static str {
        "fine-tune a model on packed data: full, LoRA, QLoRA or Spectrum"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        let lora_like = matches!(p.method, Method::Lora | Method::Qlora);
        if lora_like && p.lora.as_ref().is_some_and(|l| l.r == 0) {
            return Err(perr("lora.r", "lora.r must be at least 1"));
        }
        if !lora_like && p.lora.is_some() {
            return Err(perr("lora", "`lora:` settings need `method: lora` or `method: qlora`"));
        }
        if p.method != Method::Spectrum && (p.spectrum.is_some() || p.unfrozen_parameters.is_some()) {
            let k = if p.spectrum.is_some() { "spectrum" } else { "unfrozen_parameters" };
            return Err(perr(k, format!("`{k}:` needs `method: spectrum`")));
        }
        if let Some(l) = &p.lora {
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(perr("lora", "lora.dropout must be in [0, 1)"));
            }
            for m in &l.modules_to_save {
                if m != "lm_head" && m != "embed_tokens" {
                    return Err(perr(
                        "lora.modules_to_save",
                        format!("unknown module `{m}`: modules_to_save takes lm_head and embed_tokens"),
                    ));
                }
            }
            if let Target::List(names) = &l.target {
                for n in names {
                    if !ALL_LINEAR.contains(&n.as_str()) {
                        return Err(perr(
                            "lora.target",
                            format!("unknown module `{n}`: targets are {} or `all-linear`", ALL_LINEAR.join(", ")),
                        ));
                    }
                }
            }
            if let Target::Named(n) = &l.target {
                if n != "all-linear" && !ALL_LINEAR.contains(&n.as_str()) {
                    return Err(perr(
                        "lora.target",
                        format!("unknown target `{n}`: write `all-linear` or a list of module names"),
                    ));
                }
            }
        }
        if let Some(u) = &p.unfrozen_parameters {
            if let Err(e) = spectrum::matches(u, "") {
                return Err(perr("unfrozen_parameters", e.to_string()));
            }
            if u.is_empty() {
                return Err(perr("unfrozen_parameters", "unfrozen_parameters is empty: nothing would train"));
            }
        }
        if let Some(s) = &p.spectrum {
            if !(s.top_percent > 0.0 && s.top_percent <= 100.0) {
                return Err(perr("spectrum", "spectrum.top_percent must be in (0, 100]"));
            }
        }
        for (k, v) in [
            ("per_device_batch_size", p.per_device_batch_size),
            ("gradient_accumulation_steps", p.gradient_accumulation_steps),
            ("devices", p.devices),
            ("logging_steps", p.logging_steps),
        ] {
            if v == 0 {
                return Err(perr(k, format!("{k} must be at least 1")));
            }
        }
        if p.zero_stage > 2 {
            return Err(perr(
                "zero_stage",
                format!(
                    "zero_stage {} is not supported: 0 (replicated), 1 or 2 (optimizer state sharded)",
                    p.zero_stage
                ),
            ));
        }
        if !(p.learning_rate > 0.0 && p.learning_rate.is_finite()) {
            return Err(perr("learning_rate", "learning_rate must be a positive number"));
        }
        if !(0.0..1.0).contains(&p.warmup_ratio) {
            return Err(perr("warmup_ratio", "warmup_ratio must be in [0, 1)"));
        }
        if p.max_steps.is_none() && p.num_epochs <= 0.0 {
            return Err(perr("num_epochs", "num_epochs must be positive (or set max_steps)"));
        }
        if p.max_steps == Some(0) {
            return Err(perr("max_steps", "max_steps must be at least 1"));
        }
        Ok(Box::new(TrainStage { p }))
    }
}

pub(crate) fn fail(e: impl std::fmt::Display) -> StageFailure {
    StageFailure::new(e.to_string())
}

impl From<NnError> for StageFailure {
    fn from(e: NnError) -> Self {
        StageFailure::new(e.to_string())
    }
}

/// Read the rows of a pack artifact's Parquet file.
pub fn read_pack(file: &Path) -> Result<Vec<Row>, StageFailure> {
    let mut rows = Vec::new();
    for batch in table::open(&[file.to_path_buf()], None)? {
        let b = batch?;
        let col = |name: &str| -> Result<&ListArray, StageFailure> {
            b.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<ListArray>()).ok_or_else(|| {
                StageFailure::new(format!("{}: no list column `{name}`", file.display()))
                    .hint("the `data` input must be a `pack` artifact")
            })
        };
        let (ids, labels, pos, lens) = (col("input_ids")?, col("labels")?, col("position_ids")?, col("seq_lens")?);
        let ints = |l: &ListArray, i: usize| -> Result<Vec<i32>, StageFailure> {
            let v = l.value(i);
            let a = v
                .as_any()
                .downcast_ref::<Int32Array>()
                .ok_or_else(|| StageFailure::new(format!("{}: list items must be int32", file.display())))?;
            Ok(a.values().to_vec())
        };
        for i in 0..b.num_rows() {
            let row_no = rows.len();
            let bad = |what: &str| StageFailure::new(format!("{}: row {row_no} (0-based): {what}", file.display()));
            let input_ids = ints(ids, i)?;
            if input_ids.iter().any(|x| *x < 0) {
                return Err(bad("negative token id in `input_ids`"));
            }
            let seq_lens = ints(lens, i)?;
            if seq_lens.iter().any(|x| *x <= 0) {
                return Err(bad("`seq_lens` must be positive"));
            }
            let r = Row {
                input_ids: input_ids.iter().map(|x| *x as u32).collect(),
                labels: ints(labels, i)?.iter().map(|x| *x as i64).collect(),
                position_ids: ints(pos, i)?.iter().map(|x| (*x).max(0) as u32).collect(),
                seq_lens: seq_lens.iter().map(|x| *x as usize).collect(),
            };
            if r.labels.len() != r.input_ids.len() || r.position_ids.len() != r.input_ids.len() {
                return Err(bad("`input_ids`, `labels` and `position_ids` differ in length"));
            }
            if r.seq_lens.iter().sum::<usize>() != r.input_ids.len() {
                return Err(bad("`seq_lens` do not add up to the row length"));
            }
            rows.push(r);
        }
    }
    Ok(rows)
}

/// The step schedule derived from the data and the params.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rows: usize,
    micro_per_epoch: usize,
    steps_per_epoch: usize,
    total: usize,
    warmup: usize,
}

impl Params {
    fn plan(&self, rows: usize) -> Plan {
        let micro_per_epoch = rows.div_ceil(self.per_device_batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(self.micro_per_step()).max(1);
        let total =
            self.max_steps.unwrap_or_else(|| ((steps_per_epoch as f64) * self.num_epochs).ceil() as usize).max(1);
        let warmup = self.warmup_steps.unwrap_or_else(|| (total as f64 * self.warmup_ratio).ceil() as usize);
        Plan { rows, micro_per_epoch, steps_per_epoch, total, warmup }
    }

    /// Micro-batches per optimizer step, over all replicas.
    fn micro_per_step(&self) -> usize {
        self.gradient_accumulation_steps * self.devices
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
    }
}

impl Plan {
    /// Row indices of each micro-batch of optimizer step `step`.
    fn micro_batches(&self, p: &Params, step: usize, orders: &mut HashMap<usize, Vec<usize>>) -> Vec<Vec<usize>> {
        let epoch = step / self.steps_per_epoch;
        let within = step % self.steps_per_epoch;
        let order = orders.entry(epoch).or_insert_with(|| {
            let mut o: Vec<usize> = (0..self.rows).collect();
            o.shuffle(&mut ChaCha8Rng::seed_from_u64(p.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            o
        });
        let first = within * p.micro_per_step();
        let last = ((within + 1) * p.micro_per_step()).min(self.micro_per_epoch);
        (first..last)
            .map(|m| order[m * p.per_device_batch_size..((m + 1) * p.per_device_batch_size).min(self.rows)].to_vec())
            .collect()
    }
}

impl Stage for TrainStage {
    fn deterministic(&self) -> bool {
        false
    }

    fn key_env(&self) -> std::collections::BTreeMap<String, String> {
        // Different devices give different floating-point results.
        [("device".to_string(), if self.on_cuda() { "cuda" } else { "cpu" }.to_string())].into()
    }

    fn resources(&self) -> pipe_engine::stage::Resources {
        // Without CUDA in this build, `run` explains that instead of waiting for a GPU slot.
        let gpu = self.on_cuda() && candle_core::utils::cuda_is_available();
        pipe_engine::stage::Resources { gpus: if gpu { self.p.devices as u32 } else { 0 } }
    }

    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let p = &self.p;
        let get = |name: &str| -> Result<&PathBuf, StageFailure> {
            ctx.inputs.get(name).ok_or_else(|| {
                StageFailure::new(format!("`train` needs an input named `{name}`"))
                    .hint("write `inputs: {model: MODEL_STAGE, data: PACK_STAGE}`")
            })
        };
        let (model_dir, data) = (get("model")?, get("data")?);
        let file = pack_file(data, p.split.as_deref())?;
        let rows = read_pack(&file)?;
        if rows.is_empty() {
            return Err(StageFailure::new(format!("{}: no rows to train on", file.display())));
        }
        let eval_rows = match ctx.inputs.get("eval") {
            Some(dir) => {
                let file = pack_file(dir, p.eval_split.as_deref())?;
                let rows = read_pack(&file)?;
                if !rows.iter().any(|r| r.labels.iter().any(|&l| l >= 0)) {
                    return Err(StageFailure::new(format!("{}: no trained tokens to evaluate", file.display()))
                        .hint("the `eval` input must be a `pack` artifact with assistant tokens"));
                }
                Some(rows)
            }
            None if p.eval_split.is_some() || p.eval_steps > 0 => {
                return Err(StageFailure::new("`eval_split`/`eval_steps` are set but there is no `eval` input")
                    .hint("add `eval: PACK_STAGE` to `inputs`"));
            }
            None => None,
        };
        let devices = self.p.device.devices(&ctx.gpus, p.devices)?;
        let device = devices[0].clone();
        let dtype = match p.precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        };
        let spec = self.spec(model_dir, Some(ctx.out_dir))?;
        ctx.progress.message("loading the model");
        let model = Llama::load(model_dir, dtype, &device, &spec)
            .map_err(|e| fail(e).hint("the `model` input must be an HF-format Llama/Qwen2 folder"))?;
        let named = model.trainable();
        if named.is_empty() {
            return Err(StageFailure::new("no parameter is trainable")
                .hint("check `unfrozen_parameters` / `lora.target` against the model's parameter names"));
        }
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let n_trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
        // ZeRO: the replica that owns each trainable tensor's optimizer state.
        // (Stage 2: the owner of each gradient bucket, which alone receives its sum.)
        let owner = (p.zero_stage > 0 && devices.len() > 1).then(|| match p.zero_stage {
            2 => crate::nn::dist::zero2_owners(&named, devices.len()),
            _ => shard_owners(&vars, devices.len()),
        });
        let mine = |r: usize, named: Vec<(String, Var)>| -> Vec<(String, Var)> {
            match &owner {
                Some(o) => named.into_iter().enumerate().filter(|(i, _)| o[*i] == r).map(|(_, x)| x).collect(),
                None => named,
            }
        };
        let mut opt = AdamW::new(mine(0, named.clone()), p.adamw())?;
        // Replicas 1.. (data parallelism): the same weights and LoRA init
        // (seeded), each with its own optimizer taking the same steps (or,
        // sharded, the steps of the tensors it owns).
        let mut replicas = Vec::new();
        for (r, d) in devices.iter().enumerate().skip(1) {
            ctx.progress.message(&format!("loading replica {r} on {}", device_name(d)));
            let m = Llama::load(model_dir, dtype, d, &spec).map_err(fail)?;
            let named = m.trainable();
            let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
            let opt = AdamW::new(mine(r, named), p.adamw())?;
            replicas.push(Replica { model: m, vars, opt });
        }
        let plan = p.plan(rows.len());

        fs_err::create_dir_all(ctx.resume_dir)?;
        let ckpt = ctx.resume_dir.join("checkpoint");
        let metrics_dir = ctx.resume_dir.join("metrics");
        let mut start = 0;
        let mut metrics = if ckpt.join("state.json").exists() {
            start = load_checkpoint(&ckpt, &mut opt)?;
            for r in replicas.iter_mut() {
                load_checkpoint(&ckpt, &mut r.opt)?;
            }
            if let Some(o) = &owner {
                // Each optimizer restored the tensors it owns.
                broadcast_owned(&vars, &replicas, o)?;
            }
            ctx.log_line(&format!("resumed from the checkpoint at step {start}"));
            ctx.progress.message(&format!("resumed at step {start}/{}", plan.total));
            Metrics::resume(&metrics_dir, start as u64)?
        } else {
            if metrics_dir.exists() {
                fs_err::remove_dir_all(&metrics_dir)?;
            }
            Metrics::create(&metrics_dir)?
        };
        ctx.log_line(&format!(
            "train: {} rows, {} steps ({} per epoch), warmup {}, {} trainable parameters on {}",
            plan.rows,
            plan.total,
            plan.steps_per_epoch,
            plan.warmup,
            n_trainable,
            devices_name(&devices)
        ));

        let eval = |metrics: &mut Metrics, step: usize| -> Result<Option<f64>, StageFailure> {
            let Some(rows) = &eval_rows else { return Ok(None) };
            ctx.progress.message(&format!("eval loss at step {step} ({} rows)", rows.len()));
            let loss = eval_loss(&model, rows, p.per_device_batch_size, ctx)?;
            metrics.log(step as u64, &[("eval/loss", loss)])?;
            ctx.log_line(&format!("step {step}: eval loss {loss:.4}"));
            Ok(Some(loss))
        };
        let eval_before = if start == 0 {
            eval(&mut metrics, 0)?
        } else {
            // Measured by the run that was interrupted: it is in the kept metrics.
            MetricsLog::read(&metrics_dir.join(METRICS_FILE))?
                .iter()
                .find(|r| r["step"] == 0)
                .and_then(|r| r["eval/loss"].as_f64())
        };
        let mut orders = HashMap::new();
        // PIPE_TRAIN_PROFILE=1: where the time of the steps goes (the device
        // is synchronised at every phase boundary, which costs a little).
        let mut prof = Profile::new(std::env::var_os("PIPE_TRAIN_PROFILE").is_some_and(|v| v == "1"));
        let mut eval_s = 0.0;
        let t0 = Instant::now();
        let (mut window_tokens, mut window_t) = (0usize, Instant::now());
        let mut last_loss = f64::NAN;
        let mut total_tokens = 0usize;
        // Device memory in use, the most seen, per device (CUDA only).
        let mut peak_gpu: Vec<Option<u64>> = devices.iter().map(gpu_used_bytes).collect();
        // Data parallelism: each replica's gradient all-reduce (see nn::dist).
        let mut syncs = if devices.len() > 1 { GradSync::group(&devices, &named).map_err(fail)? } else { Vec::new() };
        if owner.is_some() && p.zero_stage == 2 {
            syncs.iter_mut().for_each(GradSync::shard_gradients);
        }
        if let Some(s) = syncs.first() {
            ctx.log_line(&format!(
                "data parallel: {} replicas, gradients all-reduced over {} in {} buckets",
                devices.len(),
                s.transport(),
                s.n_buckets()
            ));
        }
        let mut dp_wait_s = 0.0;
        for step in start..plan.total {
            if ctx.cancel.is_cancelled() {
                return Err(StageFailure::new("cancelled"));
            }
            prof.lap(&device, Phase::Other);
            let micro = plan.micro_batches(p, step, &mut orders);
            let n_rep = devices.len();
            // Micro-batch m runs on replica m mod n_rep.
            let models: Vec<&Llama> = std::iter::once(&model).chain(replicas.iter().map(|r| &r.model)).collect();
            let batches: Vec<_> = micro
                .iter()
                .enumerate()
                .map(|(m, idx)| models[m % n_rep].batch(&idx.iter().map(|&i| &rows[i]).collect::<Vec<_>>()))
                .collect::<Result<_, _>>()?;
            let n_targets: usize = batches.iter().map(|b| b.n_targets).sum();
            let n_tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
            prof.lap(&device, Phase::Batch);
            if n_targets == 0 {
                ctx.log_line(&format!("step {}: no trainable tokens, skipped", step + 1));
                continue;
            }
            let recompute = p.gradient_checkpointing;
            // One replica's micro-batches: forward and backward passes, the
            // gradients accumulated and (data parallelism) all-reduced, the
            // last micro-batch's buckets while its backward pass goes on.
            let run_replica = |r: usize, sync: Option<&mut GradSync>| -> Result<(f64, Grads, f64), StageFailure> {
                let vars_r = if r == 0 { &vars } else { &replicas[r - 1].vars };
                let mut grads: Grads = vec![None; vars_r.len()];
                let mine: Vec<(usize, &Batch)> = batches.iter().enumerate().skip(r).step_by(n_rep).collect();
                let scale = 1.0 / n_targets as f64;
                let mut sync = sync;
                // A failed or panicking replica releases the others.
                let release = sync.as_deref().map(GradSync::abort_handle);
                let mut body = || -> Result<(f64, f64), StageFailure> {
                    let mut loss = 0.0;
                    for (k, &(m, b)) in mine.iter().enumerate() {
                        // A replica leaving mid-step releases (host) or drains
                        // (NCCL) the step's exchanges: see the error path.
                        if ctx.cancel.is_cancelled() {
                            return Err(StageFailure::new("cancelled"));
                        }
                        let fx = Fwd { train: true, seed: p.seed ^ ((step as u64) << 20) ^ m as u64 };
                        let model = models[r];
                        loss += match sync.as_deref_mut() {
                            Some(s) if k + 1 == mine.len() => {
                                let mut hook = |i: usize, g: &mut [Option<Tensor>]| s.layer_done(i, g);
                                model.loss_and_grads_into(
                                    b,
                                    fx,
                                    scale,
                                    vars_r,
                                    recompute,
                                    &mut grads,
                                    Some(&mut hook),
                                )?
                            }
                            _ => model.loss_and_grads_into(b, fx, scale, vars_r, recompute, &mut grads, None)?,
                        };
                    }
                    let waited = match sync.as_deref_mut() {
                        Some(s) => s.finish(&mut grads)?,
                        None => 0.0,
                    };
                    Ok((loss, waited))
                };
                match body() {
                    Ok((loss, waited)) => Ok((loss, grads, waited)),
                    Err(e) => {
                        // Over NCCL the others may be inside a collective:
                        // finish the step's exchanges with zeros so they
                        // can stop; host exchanges are simply released.
                        match sync {
                            Some(s) if s.transport() == "nccl" => s.drain(),
                            _ => {
                                if let Some(r) = &release {
                                    r.abort();
                                }
                            }
                        }
                        Err(e)
                    }
                }
            };
            let results: Vec<Result<_, StageFailure>> = if n_rep == 1 {
                vec![run_replica(0, None)]
            } else {
                std::thread::scope(|sc| {
                    let run = &run_replica;
                    let hs: Vec<_> =
                        syncs.iter_mut().enumerate().map(|(r, s)| sc.spawn(move || run(r, Some(s)))).collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| Err(StageFailure::new("a training replica panicked"))))
                        .collect()
                })
            };
            let mut loss = 0.0;
            let mut per_replica = Vec::with_capacity(n_rep);
            for r in results {
                let (l, g, w) = r?;
                loss += l;
                dp_wait_s += w;
                per_replica.push(g);
            }
            prof.lap(&device, Phase::ForwardBackward);
            for (p, d) in peak_gpu.iter_mut().zip(&devices) {
                *p = (*p).max(gpu_used_bytes(d));
            }
            if !loss.is_finite() {
                return Err(StageFailure::new(format!("step {}: the loss is {loss}", step + 1))
                    .hint("lower learning_rate, or use precision: f32"));
            }
            let lr = lr_at(p.lr_scheduler, p.learning_rate, step, plan.warmup, plan.total);
            // Every replica holds the summed gradients: each steps its
            // optimizer (sharded: clipped by the global norm, the tensors
            // it owns), all at once.
            let step_one =
                |r: usize, opt: &mut AdamW, grads: Grads, sync: Option<&mut GradSync>| -> Result<f64, StageFailure> {
                    let Some(o) = &owner else { return Ok(opt.clip_and_step(grads, p.max_grad_norm, lr)?) };
                    let present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
                    let norm = crate::nn::optim::global_norm(&present).map_err(fail)?;
                    drop(present);
                    // Stage 2: this replica holds only its buckets' sums.
                    let norm = match sync {
                        Some(s) if p.zero_stage == 2 => s.sum_scalar(norm * norm).map_err(fail)?.max(0.0).sqrt(),
                        _ => norm,
                    };
                    let owned: Grads = grads.into_iter().zip(o).filter(|(_, &w)| w == r).map(|(g, _)| g).collect();
                    // Clipped by the norm of all the replicas' gradients.
                    opt.step_with_norm(owned, norm, p.max_grad_norm, lr)?;
                    Ok(norm)
                };
            let (mut opts, vars_of): (Vec<&mut AdamW>, Vec<&[Var]>) = std::iter::once((&mut opt, &vars[..]))
                .chain(replicas.iter_mut().map(|r| (&mut r.opt, &r.vars[..])))
                .unzip();
            let norms: Vec<Result<f64, StageFailure>> = if n_rep == 1 {
                let g = per_replica.pop().expect("one replica");
                vec![step_one(0, opts.pop().expect("one optimizer"), g, None)]
            } else {
                let owner = owner.as_deref();
                std::thread::scope(|sc| {
                    let step_one = &step_one;
                    let hs: Vec<_> = opts
                        .into_iter()
                        .zip(per_replica)
                        .zip(syncs.iter_mut().zip(vars_of))
                        .enumerate()
                        .map(|(r, ((o, g), (s, v)))| {
                            sc.spawn(move || {
                                let norm = step_one(r, o, g, Some(&mut *s))?;
                                // ZeRO over NCCL: each tensor from its owner to the others.
                                if let (Some(owner), "nccl") = (owner, s.transport()) {
                                    s.broadcast_owned(v, owner).map_err(fail)?;
                                }
                                Ok(norm)
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| Err(StageFailure::new("an optimizer step panicked"))))
                        .collect()
                })
            };
            let mut norm = f64::NAN;
            for (r, n) in norms.into_iter().enumerate() {
                let n = n?;
                if r == 0 {
                    norm = n;
                }
            }
            if let (Some(o), Some("host")) = (&owner, syncs.first().map(GradSync::transport)) {
                broadcast_owned(&vars, &replicas, o)?;
            }
            prof.lap(&device, Phase::Optimizer);
            last_loss = loss;
            total_tokens += n_tokens;
            window_tokens += n_tokens;
            let done = step + 1;
            if done % p.logging_steps == 0 || done == plan.total {
                let tps = window_tokens as f64 / window_t.elapsed().as_secs_f64().max(1e-9);
                metrics.log(
                    done as u64,
                    &[
                        ("epoch", done as f64 / plan.steps_per_epoch as f64),
                        ("loss", loss),
                        ("lr", lr),
                        ("grad_norm", norm),
                        ("tokens_per_s", tps),
                        ("elapsed_s", t0.elapsed().as_secs_f64()),
                    ],
                )?;
                let eta = t0.elapsed().as_secs_f64() / (done - start) as f64 * (plan.total - done) as f64;
                ctx.progress.message(&format!(
                    "step {done}/{} · loss {loss:.4} · {tps:.0} tok/s · ETA {}",
                    plan.total,
                    fmt_secs(eta)
                ));
                (window_tokens, window_t) = (0, Instant::now());
            }
            if p.eval_steps > 0 && done % p.eval_steps == 0 && done < plan.total {
                let te = Instant::now();
                eval(&mut metrics, done)?;
                eval_s += te.elapsed().as_secs_f64();
                window_t = Instant::now();
            }
            if p.checkpoint_every > 0 && done % p.checkpoint_every == 0 && done < plan.total {
                let opts: Vec<&AdamW> = match &owner {
                    Some(_) => std::iter::once(&opt).chain(replicas.iter().map(|r| &r.opt)).collect(),
                    None => vec![&opt],
                };
                save_checkpoint(&ckpt, &opts, done)?;
                ctx.log_line(&format!("checkpoint at step {done}"));
            }
        }
        let train_s = t0.elapsed().as_secs_f64() - eval_s;
        if syncs.first().is_some_and(|s| s.transport() == "host") {
            ctx.log_line(&format!(
                "data parallel: the replicas waited {dp_wait_s:.2} s in all, summed over replicas, for each other's gradients"
            ));
        }
        if let Some(line) = prof.report() {
            ctx.log_line(&line);
        }
        let eval_after = eval(&mut metrics, plan.total)?;
        drop(metrics);
        self.save_output(ctx, &model, model_dir)?;
        write_metrics_outputs(&metrics_dir, ctx.out_dir, &format!("{}: training loss", ctx.stage))?;
        let (nf4_bytes, bf16_bytes) = model
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .filter_map(|l| match &l.w {
                crate::nn::llama::Weight::Nf4(q, _, _) => Some((q.nbytes(), q.shape().0 * q.shape().1 * 2)),
                _ => None,
            })
            .fold((0usize, 0usize), |a, b| (a.0 + b.0, a.1 + b.1));
        if nf4_bytes > 0 {
            ctx.log_line(&format!(
                "qlora: frozen decoder linears take {:.1} MB as NF4 vs {:.1} MB in bf16 ({:.2}x)",
                nf4_bytes as f64 / 1e6,
                bf16_bytes as f64 / 1e6,
                nf4_bytes as f64 / bf16_bytes as f64
            ));
        }
        let summary = json!({
            "schema": 1,
            "base_linear_bytes_nf4": if nf4_bytes > 0 { json!(nf4_bytes) } else { Value::Null },
            "base_linear_bytes_bf16": if nf4_bytes > 0 { json!(bf16_bytes) } else { Value::Null },
            "method": format!("{:?}", p.method).to_lowercase(),
            "rows": plan.rows,
            "steps": plan.total,
            "resumed_at_step": start,
            "trainable_parameters": n_trainable,
            "tokens": total_tokens,
            "final_loss": last_loss,
            "device": devices_name(&devices),
            "devices": devices.len(),
            "zero_stage": if owner.is_some() { p.zero_stage } else { 0 },
            "all_reduce": syncs.first().map(|s| json!({"transport": s.transport(), "buckets": s.n_buckets()})),
            "gradient_bytes_per_replica": (!syncs.is_empty()).then(|| syncs.iter().map(GradSync::held_bytes).collect::<Vec<_>>()),
            "optimizer_state_bytes": std::iter::once(&opt).chain(replicas.iter().map(|r| &r.opt)).map(|o| o.state_bytes()).collect::<Vec<_>>(),
            "precision": format!("{:?}", p.precision).to_lowercase(),
            "seconds": train_s,
            "tokens_per_s": total_tokens as f64 / train_s.max(1e-9),
            "eval_loss_before": eval_before,
            "eval_loss_after": eval_after,
            "eval_rows": eval_rows.as_ref().map(Vec::len),
            "peak_gpu_mib": peak_gpu[0].map(|b| b as f64 / 1048576.0),
            "peak_gpu_mib_per_device": peak_gpu.iter().map(|p| p.map(|b| b as f64 / 1048576.0)).collect::<Vec<_>>(),
        });
        fs_err::write(ctx.out_dir.join("train.json"), serde_json::to_vec_pretty(&summary).map_err(fail)?)?;
        fs_err::write(ctx.out_dir.join("summary.txt"), summary_text(&summary))?;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Phase {
    Batch,
    ForwardBackward,
    Optimizer,
    Other,
}

/// Wall time per phase of the training steps, when enabled.
struct Profile {
    on: bool,
    last: Instant,
    secs: [f64; 4],
}

impl Profile {
    fn new(on: bool) -> Self {
        Profile { on, last: Instant::now(), secs: [0.0; 4] }
    }

    /// Charge the time since the last lap to `phase` (after the device has
    /// finished the work queued so far).
    fn lap(&mut self, device: &Device, phase: Phase) {
        if !self.on {
            return;
        }
        let _ = device.synchronize();
        let now = Instant::now();
        self.secs[phase as usize] += (now - self.last).as_secs_f64();
        self.last = now;
    }

    fn report(&self) -> Option<String> {
        let [b, fb, o, x] = self.secs;
        self.on.then(|| {
            format!(
                "profile: batches {b:.2} s, forward+backward {fb:.2} s, optimizer {o:.2} s, other {x:.2} s (of {:.2} s)",
                b + fb + o + x
            )
        })
    }
}

/// Mean cross-entropy over the trained tokens of `rows`, without dropout,
/// `batch` rows at a time, one block at a time (activation memory of one
/// block, as with gradient checkpointing).
fn eval_loss(model: &Llama, rows: &[Row], batch: usize, ctx: &RunCtx) -> Result<f64, StageFailure> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for chunk in rows.chunks(batch) {
        if ctx.cancel.is_cancelled() {
            return Err(StageFailure::new("cancelled"));
        }
        let b = model.batch(chunk)?;
        if b.n_targets == 0 {
            continue;
        }
        let mut x = model.embed(&b).map_err(fail)?.detach();
        for i in 0..model.layers.len() {
            x = model.block(i, &x, &b, Fwd::EVAL).map_err(fail)?.detach();
        }
        let h = model.final_norm(&x).map_err(fail)?;
        let l = model.loss_sum_from_hidden(&h, &b, Fwd::EVAL).map_err(fail)?;
        sum += l.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(fail)?;
        n += b.n_targets;
    }
    Ok(sum / n.max(1) as f64)
}

/// The lines `pipe run` prints for a finished `train` stage.
fn summary_text(s: &Value) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let resumed = s["resumed_at_step"].as_u64().unwrap_or(0);
    let mut out = format!(
        "{} on {} ({}): {} steps, {} rows; {} tokens in {} ({:.0} tok/s){}\ntrain loss (last step) {:.4}",
        s["method"].as_str().unwrap_or("?"),
        s["device"].as_str().unwrap_or("?"),
        s["precision"].as_str().unwrap_or("?"),
        s["steps"],
        s["rows"],
        s["tokens"],
        fmt_secs(f("seconds")),
        f("tokens_per_s"),
        if resumed > 0 { format!(", resumed at step {resumed}: the figures are this run's") } else { String::new() },
        f("final_loss"),
    );
    if let (Some(a), Some(b)) = (s["eval_loss_before"].as_f64(), s["eval_loss_after"].as_f64()) {
        out += &format!("\neval loss {a:.4} -> {b:.4} ({} rows, before -> after training)", s["eval_rows"]);
    }
    if let Some(m) = s["peak_gpu_mib"].as_f64() {
        out += &format!("\npeak GPU memory {m:.0} MiB");
    }
    out.push('\n');
    out
}

fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Device memory in use now (cuMemGetInfo: total - free), CUDA only.
#[cfg(feature = "cuda")]
fn gpu_used_bytes(d: &Device) -> Option<u64> {
    let Device::Cuda(c) = d else { return None };
    let (free, total) = c.cuda_stream().context().mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

#[cfg(not(feature = "cuda"))]
fn gpu_used_bytes(_: &Device) -> Option<u64> {
    None
}

/// A data-parallel replica after the first: its model, trainable
/// variables (in the order of replica 0's) and optimizer.
struct Replica {
    model: Llama,
    vars: Vec<Var>,
    opt: AdamW,
}

/// One replica's gradients, in the order of its trainable variables (None:
/// the step did not reach the variable).
type Grads = Vec<Option<Tensor>>;

/// ZeRO's sharding: the owner replica of each trainable tensor, dealt out
/// largest first to the replica owning the fewest elements so far (ties to
/// the lower index), so each holds about 1/n of the optimizer state.
fn shard_owners(vars: &[Var], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..vars.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(vars[i].elem_count()), i));
    let mut load = vec![0usize; n];
    let mut owner = vec![0usize; vars.len()];
    for i in order {
        let r = (0..n).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owner[i] = r;
        load[r] += vars[i].elem_count();
    }
    owner
}

/// ZeRO's broadcast: each tensor's new value, from its owner to every other
/// replica (replica 0's variables are `vars`).
fn broadcast_owned(vars: &[Var], replicas: &[Replica], owner: &[usize]) -> Result<(), StageFailure> {
    let var_of = |r: usize, i: usize| if r == 0 { &vars[i] } else { &replicas[r - 1].vars[i] };
    for (i, &o) in owner.iter().enumerate() {
        let src = var_of(o, i).as_tensor();
        for r in (0..=replicas.len()).filter(|&r| r != o) {
            let dst = var_of(r, i);
            dst.set(&src.to_device(dst.device()).map_err(fail)?).map_err(fail)?;
        }
    }
    Ok(())
}

/// `cuda`, or `cuda x2` for two replicas.
fn devices_name(ds: &[Device]) -> String {
    match ds.len() {
        1 => device_name(&ds[0]),
        n => format!("{} x{n}", device_name(&ds[0])),
    }
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// `<split>.parquet` in a pack artifact (or the only Parquet file).
fn pack_file(dir: &Path, split: Option<&str>) -> Result<PathBuf, StageFailure> {
    if dir.is_file() {
        return Ok(dir.to_path_buf());
    }
    let files: Vec<PathBuf> =
        table::data_files(dir).into_iter().filter(|f| f.extension().is_some_and(|e| e == "parquet")).collect();
    let names: Vec<String> =
        files.iter().filter_map(|f| f.file_stem().map(|s| s.to_string_lossy().into_owned())).collect();
    let want = split.unwrap_or("train");
    if let Some(i) = names.iter().position(|n| n == want) {
        return Ok(files[i].clone());
    }
    if split.is_none() && files.len() == 1 {
        return Ok(files[0].clone());
    }
    Err(StageFailure::new(format!("{}: no `{want}.parquet` in the data input", dir.display())).hint(
        if names.is_empty() {
            "the `data` input must be a `pack` artifact".to_string()
        } else {
            format!("set `split:` to one of: {}", names.join(", "))
        },
    ))
}

impl DevicePref {
    pub fn on_cuda(self) -> bool {
        match self {
            DevicePref::Cpu => false,
            DevicePref::Cuda => true,
            DevicePref::Auto => candle_core::utils::cuda_is_available(),
        }
    }

    /// The device for a stage given GPU slots `gpus` (ids; with
    /// CUDA_VISIBLE_DEVICES this process numbers the visible ones from 0).
    pub fn device(self, gpus: &[u32]) -> Result<Device, StageFailure> {
        if !self.on_cuda() {
            return Ok(Device::Cpu);
        }
        if !candle_core::utils::cuda_is_available() {
            return Err(StageFailure::new("`device: cuda`, but this pipe was built without CUDA")
                .hint("build with `cargo build --release --features cuda`, or set `device: cpu`"));
        }
        let id = gpus.first().copied().unwrap_or(0);
        let ordinal = std::env::var("CUDA_VISIBLE_DEVICES")
            .ok()
            .and_then(|v| v.split(',').position(|x| x.trim().parse() == Ok(id)))
            .unwrap_or(id as usize);
        let d = Device::new_cuda(ordinal).map_err(|e| fail(format!("CUDA device {ordinal}: {e}")))?;
        #[cfg(feature = "cuda")]
        crate::nn::gpu::check_capability(&d).map_err(|m| {
            StageFailure::new(format!("CUDA device {ordinal}: {m}")).hint(format!(
                "run it on a GPU of compute capability {} (90: H100, H200), rebuild with CUDA_COMPUTE_CAP \
                 set to this GPU's (pipe's decode kernels need 90 or later), or set `device: cpu`",
                crate::nn::gpu::BUILT_FOR
            ))
        })?;
        crate::nn::gpu::keep_pool_memory(&d);
        Ok(d)
    }
}

impl DevicePref {
    /// One device per data-parallel replica: the GPUs granted to the stage
    /// (`gpus`), or `n` times the CPU.
    pub fn devices(self, gpus: &[u32], n: usize) -> Result<Vec<Device>, StageFailure> {
        (0..n).map(|i| self.device(gpus.get(i..).unwrap_or(&[]))).collect()
    }
}

impl TrainStage {
    fn on_cuda(&self) -> bool {
        self.p.device.on_cuda()
    }

    /// Which parameters train. For Spectrum without `unfrozen_parameters`,
    /// this runs the SNR scan and, given `out`, writes `snr.json` and
    /// `unfrozen_parameters.yaml` there.
    fn spec(&self, model_dir: &Path, out: Option<&Path>) -> Result<TrainSpec, StageFailure> {
        let p = &self.p;
        let mut spec = TrainSpec { seed: p.seed, ..Default::default() };
        match p.method {
            Method::Full => spec.full = true,
            Method::Lora | Method::Qlora => {
                let l = p.lora.clone().unwrap_or(LoraParams {
                    r: d_r(),
                    alpha: d_alpha(),
                    dropout: 0.0,
                    target: d_target(),
                    modules_to_save: Vec::new(),
                    rslora: false,
                });
                let targets = match &l.target {
                    Target::Named(n) if n == "all-linear" => ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
                    Target::Named(n) => vec![n.clone()],
                    Target::List(v) => v.clone(),
                };
                spec.lora = Some(LoraSpec {
                    r: l.r,
                    alpha: l.alpha,
                    dropout: l.dropout,
                    targets,
                    rslora: l.rslora,
                    init_b_zero: true,
                });
                spec.modules_to_save = l.modules_to_save.clone();
                spec.nf4_base = p.method == Method::Qlora;
            }
            Method::Spectrum => {
                let names = tensor_names(model_dir)?;
                let patterns = match &p.unfrozen_parameters {
                    Some(given) => given.clone(),
                    None => {
                        let top = p.spectrum.as_ref().map_or(d_top(), |s| s.top_percent);
                        let scan = spectrum_scan(model_dir, &names)?;
                        let patterns = spectrum::select(&scan, top);
                        if let Some(out) = out {
                            spectrum::write_snr_json(&scan, &out.join("snr.json")).map_err(fail)?;
                            spectrum::write_unfrozen_yaml(&patterns, &out.join("unfrozen_parameters.yaml"))
                                .map_err(fail)?;
                        }
                        patterns
                    }
                };
                let mut unfrozen = Vec::new();
                for n in &names {
                    if spectrum::matches(&patterns, n).map_err(fail)? {
                        unfrozen.push(n.clone());
                    }
                }
                spec.unfrozen = Some(unfrozen);
            }
        }
        Ok(spec)
    }

    fn save_output(&self, ctx: &RunCtx, model: &Llama, model_dir: &Path) -> Result<(), StageFailure> {
        let out = ctx.out_dir;
        crate::model::copy_tokenizer_files(model_dir, out)?;
        match self.p.method {
            Method::Lora | Method::Qlora => self.save_adapter(out, model, model_dir),
            Method::Full | Method::Spectrum => save_full(out, model, model_dir),
        }
    }

    fn save_adapter(&self, out: &Path, model: &Llama, model_dir: &Path) -> Result<(), StageFailure> {
        let spec = self.spec(model_dir, None)?;
        let l = spec.lora.as_ref().expect("lora method");
        let tensors: Vec<(String, Tensor)> = model
            .trainable()
            .into_iter()
            .map(|(n, v)| (format!("base_model.model.{n}"), v.as_tensor().clone()))
            .collect();
        save_safetensors(&out.join("adapter_model.safetensors"), &tensors)?;
        let base = fs_err::read_to_string(model_dir.join("model.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v.get("source").and_then(|s| s.as_str()).map(String::from))
            .unwrap_or_default();
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": l.r,
            "lora_alpha": l.alpha,
            "lora_dropout": l.dropout,
            "target_modules": l.targets,
            "modules_to_save": if spec.modules_to_save.is_empty() { Value::Null } else { json!(spec.modules_to_save) },
            "use_rslora": l.rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        fs_err::write(out.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).map_err(fail)? + "\n")?;
        Ok(())
    }
}

/// An HF folder with every weight of the model (untied if training untied it).
fn save_full(out: &Path, model: &Llama, model_dir: &Path) -> Result<(), StageFailure> {
    let tensors: Vec<(String, Tensor)> =
        model.named_weights().into_iter().map(|(n, w)| Ok((n, w.tensor()?))).collect::<Result<_, NnError>>()?;
    save_safetensors(&out.join("model.safetensors"), &tensors)?;
    let mut cfg: Value = serde_json::from_str(&fs_err::read_to_string(model_dir.join("config.json"))?).map_err(fail)?;
    cfg["tie_word_embeddings"] = json!(model.lm_head.is_none());
    cfg["torch_dtype"] = json!(match model.dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    fs_err::write(out.join("config.json"), serde_json::to_string_pretty(&cfg).map_err(fail)? + "\n")?;
    Ok(())
}

/// Every tensor name of an HF folder's weights.
fn tensor_names(dir: &Path) -> Result<Vec<String>, StageFailure> {
    let files = crate::nn::llama::weight_files(dir)?;
    let mut names = Vec::new();
    for f in &files {
        // SAFETY: read-only store artifact or user folder (see Llama::load).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(fail)?;
        names.extend(st.tensors().into_iter().map(|(n, _)| n));
    }
    names.sort();
    Ok(names)
}

/// Spectrum's SNR of every 2-D decoder weight (the embedding and the head
/// are always unfrozen, so they are not scanned).
fn spectrum_scan(dir: &Path, names: &[String]) -> Result<spectrum::Scan, StageFailure> {
    let files = crate::nn::llama::weight_files(dir)?;
    // SAFETY: as above.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(fail)?;
    let mut weights = Vec::new();
    for n in names {
        if !n.starts_with("model.layers.") || !n.ends_with(".weight") {
            continue;
        }
        let t = st.load(n, &Device::Cpu).map_err(fail)?;
        if t.rank() == 2 {
            weights.push((n.clone(), t.to_dtype(DType::F32).map_err(fail)?));
        }
    }
    spectrum::scan(weights).map_err(fail)
}

/// safetensors with `{"format": "pt"}` metadata, as `transformers` expects.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), StageFailure> {
    let ts: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()
        .map_err(fail)?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(ts.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), &tmp)
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    fs_err::rename(&tmp, path)?;
    Ok(())
}

/// Checkpoint: trainable weights (and f32 masters), AdamW moments, step.
/// Written to a fresh dir, then renamed over the previous one.
/// The optimizer state of every optimizer in `opts` (one, or the shards of
/// ZeRO, whose parameter names are disjoint) and the step.
fn save_checkpoint(dir: &Path, opts: &[&AdamW], step: usize) -> Result<(), StageFailure> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp)?;
    }
    fs_err::create_dir_all(&tmp)?;
    let mut t = Vec::new();
    for p in opts.iter().flat_map(|o| &o.params) {
        t.push((format!("param.{}", p.name), p.var.as_tensor().clone()));
        t.push((format!("m.{}", p.name), p.m.clone()));
        t.push((format!("v.{}", p.name), p.v.clone()));
        if let Some(m) = &p.master {
            t.push((format!("master.{}", p.name), m.clone()));
        }
    }
    save_safetensors(&tmp.join("state.safetensors"), &t)?;
    let state = json!({"schema": 1, "step": step, "adam_t": opts.first().map_or(0, |o| o.t)});
    fs_err::write(tmp.join("state.json"), serde_json::to_vec(&state).map_err(fail)?)?;
    let old = dir.with_extension("old");
    if dir.exists() {
        fs_err::rename(dir, &old)?;
    }
    fs_err::rename(&tmp, dir)?;
    if old.exists() {
        fs_err::remove_dir_all(&old)?;
    }
    Ok(())
}

fn load_checkpoint(dir: &Path, opt: &mut AdamW) -> Result<usize, StageFailure> {
    let state: Value = serde_json::from_str(&fs_err::read_to_string(dir.join("state.json"))?).map_err(fail)?;
    let bad = || StageFailure::new(format!("{}: unreadable checkpoint", dir.display())).hint("delete it to start over");
    let step = state["step"].as_u64().ok_or_else(bad)? as usize;
    opt.t = state["adam_t"].as_u64().ok_or_else(bad)? as usize;
    let dev = opt.params.first().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu);
    let t = candle_core::safetensors::load(dir.join("state.safetensors"), &dev).map_err(fail)?;
    let take = |k: String| -> Result<Tensor, StageFailure> {
        t.get(&k).cloned().ok_or_else(|| bad().hint(format!("`{k}` is missing; delete the checkpoint to start over")))
    };
    for p in opt.params.iter_mut() {
        p.var.set(&take(format!("param.{}", p.name))?).map_err(fail)?;
        p.m = take(format!("m.{}", p.name))?;
        p.v = take(format!("v.{}", p.name))?;
        if p.master.is_some() {
            p.master = Some(take(format!("master.{}", p.name))?);
        }
    }
    Ok(step)
}

/// `metrics.jsonl` into the output, with a clean TensorBoard event file
/// rebuilt from it (one value per step even after a resume) and `loss.png`.
fn write_metrics_outputs(live: &Path, out: &Path, title: &str) -> Result<(), StageFailure> {
    let path = live.join(METRICS_FILE);
    let records = MetricsLog::read(&path)?;
    fs_err::copy(&path, out.join(METRICS_FILE))?;
    let mut tb = EventWriter::create(&out.join(TB_DIR))?;
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
        - records.iter().rev().find_map(|r| r["elapsed_s"].as_f64()).unwrap_or(0.0);
    let mut elapsed = 0.0;
    for r in &records {
        let (Some(step), Some(obj)) = (r["step"].as_u64(), r.as_object()) else { continue };
        // Eval lines carry no time of their own: they follow the step they measure.
        elapsed = r["elapsed_s"].as_f64().unwrap_or(elapsed);
        let wall = t0 + elapsed;
        for (k, v) in obj {
            if let (true, Some(v)) = (k != "step", v.as_f64()) {
                let tag = if k.contains('/') { k.clone() } else { format!("train/{k}") };
                tb.scalar_at(wall, &tag, step, v as f32)?;
            }
        }
    }
    tb.flush()?;
    plot_loss(&out.join("loss.png"), &series(&records, "loss"), title)?;
    Ok(())
}
