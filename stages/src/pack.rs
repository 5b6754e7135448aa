//! `pack`: tokenize conversations with the model's tokenizer and chat
//! template, build loss masks, and pack samples into training rows.
//!
//! Inputs: `data` (a `messages` output: a `messages` column, or `prompt` +
//! `completion`) and `model` (a folder with `tokenizer.json` and
//! `tokenizer_config.json`).
//! Params: `max_seq_length` (default 1024); `packing: none|wrapped|bfd`
//! (default `bfd`: best-fit decreasing into rows of `max_seq_length`, each
//! sample keeping its own positions; `wrapped`: concatenate and cut, as TRL's
//! classic packing); `loss_on: assistant|all` (default `assistant`: only
//! assistant turns, including their end-of-turn token); `truncation:
//! truncate|drop|error` for samples longer than `max_seq_length` (default
//! `truncate`); `on_empty: skip|error` for samples with nothing to train on
//! (default `skip`, counted); `chat_template:` a workspace file overriding the
//! model's template.
//! Output: per input file `<name>.parquet` with list<int32> columns
//! `input_ids`, `labels` (-100 = no loss; the first token of every packed
//! sample is -100 so no token predicts across a boundary), `position_ids`
//! (restarting per sample) and `seq_lens`; plus `stats.json`.
//! Key: all params, the template file's digest, the input digests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bpe::Encoder;
use crate::chat::{ChatTemplate, Message};
use crate::table::{self, ParquetOut};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::file::properties::WriterProperties;
use pipe_engine::stage::{parse_params, FileDep, ParamError, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

pub struct PackKind;

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Packing {
    None,
    Wrapped,
    #[default]
    Bfd,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum LossOn {
    #[default]
    Assistant,
    All,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Truncation {
    #[default]
    Truncate,
    Drop,
    Error,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum OnEmpty {
    #[default]
    Skip,
    Error,
}

fn default_len() -> usize {
    1024
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_len")]
    max_seq_length: usize,
    #[serde(default)]
    packing: Packing,
    #[serde(default)]
    loss_on: LossOn,
    #[serde(default)]
    truncation: Truncation,
    #[serde(default)]
    on_empty: OnEmpty,
    #[serde(default)]
    chat_template: Option<String>,
}

struct PackStage {
    p: Params,
}

impl StageKind for PackKind {
    fn name(&self) -> &'static str {
        "pack"
    }
    fn version(&self) -> u32 {
        // 2: row groups of 1024 rows, no dictionary encoding (same values)
        2
    }
    fn summary(&self) -> &'static str {
        "tokenize with the chat template, mask the loss, pack into training rows"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        if p.max_seq_length < 2 {
            return Err(ParamError::new(vec![Seg::Key("max_seq_length".into())], "max_seq_length must be at least 2"));
        }
        Ok(Box::new(PackStage { p }))
    }
}

/// Rows per Parquet row group (and per batch written).
const ROW_GROUP: usize = 1024;

/// Marks a token whose label is kept (token ids stay below 2^31).
const TRAIN: u32 = 1 << 31;

/// One tokenized sample: ids, [`TRAIN`] set on tokens whose label is kept.
type Sample = Vec<u32>;

/// All kept samples, flat in one buffer per input batch (no copying of one
/// huge buffer as it grows): sample `i` is `chunks[c][start..start + len]`
/// for `index[i] = (c, start, len)`.
#[derive(Default)]
struct Samples {
    chunks: Vec<Vec<u32>>,
    index: Vec<(u32, u32, u32)>,
}

impl Samples {
    fn len(&self) -> usize {
        self.index.len()
    }
    fn get(&self, i: usize) -> &[u32] {
        let (c, s, n) = self.index[i];
        &self.chunks[c as usize][s as usize..(s + n) as usize]
    }
    fn new_chunk(&mut self, capacity: usize) {
        self.chunks.push(Vec::with_capacity(capacity));
    }
    fn push(&mut self, s: &[u32]) {
        let n = self.chunks.len() - 1;
        let c = self.chunks.last_mut().expect("new_chunk first");
        self.index.push((n as u32, c.len() as u32, s.len() as u32));
        c.extend_from_slice(s);
    }
    fn tokens(&self) -> impl Iterator<Item = &u32> {
        self.chunks.iter().flatten()
    }
}

#[derive(Default)]
struct Counts {
    samples: usize,
    truncated: usize,
    dropped: usize,
    no_trainable: usize,
}

impl Stage for PackStage {
    fn files(&self) -> Vec<FileDep> {
        self.p
            .chat_template
            .iter()
            .map(|f| FileDep { path: f.clone(), at: vec![Seg::Key("chat_template".into())] })
            .collect()
    }

    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let get = |name: &str| -> Result<&PathBuf, StageFailure> {
            ctx.inputs.get(name).ok_or_else(|| {
                StageFailure::new(format!("`pack` needs an input named `{name}`"))
                    .hint("write `inputs: {data: MESSAGES_STAGE, model: MODEL_STAGE}`")
            })
        };
        let (data, model) = (get("data")?, get("model")?);
        let tokenizer = Encoder::from_file(&model.join("tokenizer.json"))?;
        if tokenizer.max_id() >= TRAIN {
            return Err(StageFailure::new("the tokenizer has token ids of 2^31 and above, which `pack` cannot store"));
        }
        if let Some(why) = tokenizer.fallback_reason() {
            let note = format!("tokenizing with the `tokenizers` crate (slower): the fast path does not support this tokenizer.json ({why})");
            ctx.log_line(&note);
            ctx.progress.message(&note);
        }
        let template_file = self.p.chat_template.as_ref().map(|f| ctx.workspace.join(f));
        let template = ChatTemplate::load(model, template_file.as_deref())?;
        let eos_id = (!template.eos_token.is_empty()).then(|| tokenizer.token_to_id(&template.eos_token)).flatten();
        let files = if data.is_dir() { table::data_files(data) } else { vec![data.clone()] };
        let files: Vec<PathBuf> = files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "parquet")).collect();
        if files.is_empty() {
            return Err(StageFailure::new(format!("no Parquet files in the data input ({})", data.display())));
        }
        let mut stats = serde_json::Map::new();
        for f in &files {
            let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
            let st = self.pack_file(ctx, f, &name, &tokenizer, &template, eos_id)?;
            stats.insert(name, st);
        }
        fs_err::write(
            ctx.out_dir.join("stats.json"),
            serde_json::to_vec_pretty(&stats).map_err(std::io::Error::other)?,
        )?;
        Ok(())
    }
}

enum Rows {
    Messages(Vec<Vec<Message>>),
    Instruction(Vec<(String, String)>),
}

fn read_rows(b: &RecordBatch, file: &Path) -> Result<Rows, StageFailure> {
    let str_col =
        |name: &str| -> Option<&StringArray> { b.column_by_name(name)?.as_any().downcast_ref::<StringArray>() };
    if let Some(l) = b.column_by_name("messages").and_then(|c| c.as_any().downcast_ref::<ListArray>()) {
        let mut out = Vec::with_capacity(l.len());
        for i in 0..l.len() {
            let v = l.value(i);
            let s = v
                .as_any()
                .downcast_ref::<StructArray>()
                .ok_or_else(|| StageFailure::new("`messages` is not a list of structs"))?;
            let field = |n: &str| s.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
            let (Some(role), Some(content)) = (field("role"), field("content")) else {
                return Err(StageFailure::new(format!(
                    "{}: `messages` items need string `role` and `content`",
                    file.display()
                )));
            };
            out.push(
                (0..s.len())
                    .map(|j| Message { role: role.value(j).to_string(), content: content.value(j).to_string() })
                    .collect(),
            );
        }
        return Ok(Rows::Messages(out));
    }
    if let (Some(p), Some(c)) = (str_col("prompt"), str_col("completion")) {
        return Ok(Rows::Instruction((0..p.len()).map(|i| (p.value(i).to_string(), c.value(i).to_string())).collect()));
    }
    Err(StageFailure::new(format!("{}: expected a `messages` column, or `prompt` and `completion`", file.display()))
        .hint("feed `pack` from a `messages` stage"))
}

impl PackStage {
    fn tokenize_conversation(
        &self,
        tk: &Encoder,
        tpl: &ChatTemplate,
        msgs: &[Message],
    ) -> Result<Sample, StageFailure> {
        let mut ids = Vec::new();
        match self.p.loss_on {
            LossOn::Assistant => {
                let (text, spans) = tpl.assistant_spans(msgs)?;
                let mut starts = Vec::new();
                tk.encode(&text, &mut ids, Some(&mut starts))?;
                for (id, s) in ids.iter_mut().zip(starts) {
                    if spans.iter().any(|r| r.contains(&(s as usize))) {
                        *id |= TRAIN;
                    }
                }
            }
            LossOn::All => {
                tk.encode(&tpl.render(msgs, false)?, &mut ids, None)?;
                ids.iter_mut().for_each(|id| *id |= TRAIN);
            }
        }
        Ok(ids)
    }

    fn tokenize_instruction(
        &self,
        tk: &Encoder,
        prompt: &str,
        completion: &str,
        eos: Option<u32>,
    ) -> Result<Sample, StageFailure> {
        let mut ids = Vec::new();
        tk.encode(prompt, &mut ids, None)?;
        if self.p.loss_on == LossOn::All {
            ids.iter_mut().for_each(|id| *id |= TRAIN);
        }
        let n = ids.len();
        tk.encode(completion, &mut ids, None)?;
        ids.extend(eos);
        ids[n..].iter_mut().for_each(|id| *id |= TRAIN);
        Ok(ids)
    }

    fn pack_file(
        &self,
        ctx: &RunCtx,
        file: &Path,
        name: &str,
        tk: &Encoder,
        tpl: &ChatTemplate,
        eos: Option<u32>,
    ) -> Result<Value, StageFailure> {
        let max = self.p.max_seq_length;
        let mut counts = Counts::default();
        let mut samples = Samples::default();
        let mut row_no = 0usize;
        for batch in table::open(&[file.to_path_buf()], None)? {
            if ctx.cancel.is_cancelled() {
                return Err(StageFailure::new("cancelled"));
            }
            let rows = read_rows(&batch?, file)?;
            let toks: Vec<Result<Sample, StageFailure>> = match &rows {
                Rows::Messages(m) => m.par_iter().map(|msgs| self.tokenize_conversation(tk, tpl, msgs)).collect(),
                Rows::Instruction(pc) => pc.par_iter().map(|(p, c)| self.tokenize_instruction(tk, p, c, eos)).collect(),
            };
            samples.new_chunk(toks.iter().map(|t| t.as_ref().map_or(0, Vec::len)).sum());
            for t in toks {
                let mut s = t.map_err(|e| StageFailure {
                    message: format!("{}: row {row_no} (0-based): {}", file.display(), e.message),
                    hint: e.hint,
                })?;
                row_no += 1;
                counts.samples += 1;
                if s.len() > max {
                    match self.p.truncation {
                        Truncation::Error => {
                            return Err(StageFailure::new(format!(
                                "{}: row {} (0-based) has {} tokens, more than max_seq_length {max}",
                                file.display(),
                                row_no - 1,
                                s.len()
                            ))
                            .hint("raise max_seq_length, or set `truncation: truncate` or `drop`"))
                        }
                        Truncation::Drop => {
                            counts.dropped += 1;
                            continue;
                        }
                        Truncation::Truncate => {
                            counts.truncated += 1;
                            s.truncate(max);
                        }
                    }
                }
                // Position 0 of a sample is never predicted within it.
                if let Some(t) = s.first_mut() {
                    *t &= !TRAIN;
                }
                if !s.iter().any(|t| t & TRAIN != 0) {
                    if self.p.on_empty == OnEmpty::Error {
                        return Err(StageFailure::new(format!("{}: row {} (0-based) has no token to train on", file.display(), row_no - 1))
                            .hint("with `loss_on: assistant` every sample needs an assistant turn that survives truncation; or set `on_empty: skip`"));
                    }
                    counts.no_trainable += 1;
                    continue;
                }
                samples.push(&s);
            }
            ctx.progress.message(&format!("{name}: {row_no} samples tokenized"));
        }
        let tokens = samples.tokens().count();
        let trainable = samples.tokens().filter(|t| *t & TRAIN != 0).count();
        let wrapped: Vec<u32>;
        let rows: Vec<Vec<&[u32]>> = match self.p.packing {
            Packing::None => (0..samples.len()).map(|i| vec![samples.get(i)]).collect(),
            Packing::Bfd => {
                let lens: Vec<usize> = (0..samples.len()).map(|i| samples.get(i).len()).collect();
                bfd(&lens, max).into_iter().map(|r| r.into_iter().map(|i| samples.get(i)).collect()).collect()
            }
            Packing::Wrapped => {
                // One flat copy: rows cut across the per-batch buffers.
                wrapped = samples.tokens().copied().collect::<Vec<u32>>();
                wrapped.chunks(max).map(|c| vec![c]).collect()
            }
        };
        let schema = out_schema();
        // Row groups of ROW_GROUP rows keep the writer's buffer small; token
        // ids gain nothing from a dictionary, and interning them is costly.
        let props =
            WriterProperties::builder().set_max_row_group_row_count(Some(ROW_GROUP)).set_dictionary_enabled(false);
        let mut out = ParquetOut::with_props(&ctx.out_dir.join(format!("{name}.parquet")), schema.clone(), props)?;
        for chunk in rows.chunks(ROW_GROUP) {
            out.write(&to_batch(&schema, chunk)?)?;
        }
        let n_rows = rows.len();
        out.finish()?;
        let capacity = n_rows * max;
        Ok(json!({
            "samples": counts.samples,
            "packed_samples": samples.len(),
            "rows": n_rows,
            "tokens": tokens,
            "trainable_tokens": trainable,
            "packing": format!("{:?}", self.p.packing).to_lowercase(),
            "max_seq_length": max,
            "packing_efficiency": if capacity > 0 { tokens as f64 / capacity as f64 } else { 0.0 },
            "truncated": counts.truncated,
            "dropped_too_long": counts.dropped,
            "skipped_no_trainable_tokens": counts.no_trainable,
        }))
    }
}

/// Best-fit decreasing over sample lengths: longest first, each into the
/// fullest row it fits. Rows hold sample indices.
fn bfd(lens: &[usize], max: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(lens[*i]));
    // remaining capacity -> rows with that much room
    let mut room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    for i in order {
        let len = lens[i];
        let fit = room.range(len..).next().map(|(r, _)| *r);
        let row = match fit {
            Some(r) => {
                let list = room.get_mut(&r).expect("present");
                let row = list.pop().expect("non-empty");
                if list.is_empty() {
                    room.remove(&r);
                }
                row
            }
            None => {
                rows.push(Vec::new());
                used.push(0);
                rows.len() - 1
            }
        };
        rows[row].push(i);
        used[row] += len;
        if used[row] < max {
            room.entry(max - used[row]).or_default().push(row);
        }
    }
    rows
}

fn out_schema() -> SchemaRef {
    let list = |n: &str| Field::new(n, DataType::List(Arc::new(Field::new("item", DataType::Int32, true))), false);
    Arc::new(Schema::new(vec![list("input_ids"), list("labels"), list("position_ids"), list("seq_lens")]))
}

/// Rows of samples (each a slice of ids with [`TRAIN`] flags) as a batch.
fn to_batch(schema: &SchemaRef, rows: &[Vec<&[u32]>]) -> Result<RecordBatch, StageFailure> {
    let n: usize = rows.iter().flatten().map(|s| s.len()).sum();
    let mut b: Vec<ListBuilder<Int32Builder>> = (0..4)
        .map(|k| {
            let values = Int32Builder::with_capacity(if k == 3 { rows.len() * 2 } else { n });
            ListBuilder::with_capacity(values, rows.len())
        })
        .collect();
    for row in rows {
        for s in row {
            for (t, id) in s.iter().enumerate() {
                let tok = (id & !TRAIN) as i32;
                b[0].values().append_value(tok);
                b[1].values().append_value(if id & TRAIN != 0 { tok } else { -100 });
                b[2].values().append_value(t as i32);
            }
            b[3].values().append_value(s.len() as i32);
        }
        for x in b.iter_mut() {
            x.append(true);
        }
    }
    let cols = b.iter_mut().map(|x| Arc::new(x.finish()) as Arc<dyn Array>).collect();
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| StageFailure::new(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfd_fills_rows_best_fit() {
        let sizes = [6, 5, 4, 3, 2];
        let rows = bfd(&sizes, 8);
        let lens: Vec<Vec<usize>> = rows.iter().map(|r| r.iter().map(|i| sizes[*i]).collect()).collect();
        // 6 -> row0 (room 2); 5 -> row1 (room 3); 4 -> row2 (room 4); 3 -> row1 (best fit, room 0); 2 -> row0
        assert_eq!(lens, vec![vec![6, 2], vec![5, 3], vec![4]]);
        assert!(rows.iter().all(|r| r.iter().map(|i| sizes[*i]).sum::<usize>() <= 8));
    }
}
