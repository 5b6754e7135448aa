//! `dataset`: load tabular data into Parquet.
//!
//! Inputs: `source:` a workspace file or glob (`data/*.jsonl`), a file or glob
//! inside an input stage's output (`input:NAME` or `input:NAME/sub/*.parquet`,
//! with `inputs: {NAME: stage}`), or `hf://datasets/ORG/NAME[@REV]` (the
//! hub's files, honouring `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`).
//! Formats: JSONL, JSON (array of records), CSV, Parquet (by extension, or `format:`).
//! Steps, in order: `columns` (keep), `rename`, `filter` (a Jinja expression
//! per row, e.g. `answer is not none and answer | length > 0`, and/or
//! `drop_null: [cols]`), `shuffle: {seed}`, `select: {offset, limit}`,
//! `train_test_split: {test_size, seed}`.
//! Output: `data.parquet` (or `train.parquet` + `test.parquet`) and
//! `dataset.json` (rows, schema, source, resolved revision).
//! Without shuffle or split it streams: memory is bounded by a batch.
//! Key: all params, the content digest of local source files, the input
//! digests, and for the hub the resolved commit sha (a moving branch reruns).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch, UInt32Array};
use arrow_schema::{Field, Schema, SchemaRef};
use pipe_engine::stage::{parse_params, FileDep, ParamError, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::hub::{Hub, HubRef, RepoKind};
use crate::table::{self, Format, ParquetOut};

pub struct DatasetKind;

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a Jinja expression (string) or {expr, drop_null}")]
enum Filter {
    Expr(String),
    Full {
        #[serde(default)]
        expr: Option<String>,
        #[serde(default)]
        drop_null: Vec<String>,
    },
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Shuffle {
    seed: u64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Select {
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct SplitSpec {
    /// A fraction (0 < x < 1) or a row count (>= 1).
    test_size: f64,
    #[serde(default)]
    seed: u64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    source: String,
    /// For hub datasets: which config (subset) and split to read.
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    config: Option<String>,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    columns: Option<Vec<String>>,
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    shuffle: Option<Shuffle>,
    #[serde(default)]
    select: Option<Select>,
    #[serde(default)]
    train_test_split: Option<SplitSpec>,
}

enum Source {
    Hub(HubRef),
    Local(String),
    Input { name: String, pattern: String },
}

struct DatasetStage {
    p: Params,
    source: Source,
}

fn at(k: &str) -> Vec<Seg> {
    vec![Seg::Key(k.into())]
}

impl StageKind for DatasetKind {
    fn name(&self) -> &'static str {
        "dataset"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "load JSONL/JSON/CSV/Parquet (local, another stage's output, or the HF hub) into Parquet"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        let source = if p.source.starts_with("hf://") {
            let r = HubRef::parse(&p.source).map_err(|e| {
                let hint = e.hint().unwrap_or_default();
                ParamError::new(at("source"), e.to_string()).hint(hint)
            })?;
            if r.kind != RepoKind::Dataset {
                return Err(ParamError::new(at("source"), format!("`{}` names a model repository", p.source))
                    .hint("datasets are `hf://datasets/ORG/NAME[@REVISION]`"));
            }
            Source::Hub(r)
        } else if let Some(rest) = p.source.strip_prefix("input:") {
            let (name, pattern) = rest.split_once('/').unwrap_or((rest, ""));
            Source::Input { name: name.to_string(), pattern: pattern.to_string() }
        } else {
            if p.source.split('/').any(|c| c == "..") || p.source.starts_with('/') {
                return Err(ParamError::new(
                    at("source"),
                    format!("`{}` is not a path inside the workspace", p.source),
                )
                .hint("use a path relative to the workspace root, `input:NAME`, or `hf://datasets/ORG/NAME`"));
            }
            Source::Local(p.source.clone())
        };
        if !matches!(source, Source::Hub(_)) {
            for (k, v) in [("config", &p.config), ("split", &p.split)] {
                if v.is_some() {
                    return Err(ParamError::new(
                        at(k),
                        format!("`{k}` selects a hub dataset's files and needs an `hf://datasets/...` source"),
                    )
                    .hint("for local files, point `source` at the file or glob you want"));
                }
            }
        }
        if let Some(s) = &p.train_test_split {
            if s.test_size.is_nan() || s.test_size <= 0.0 {
                return Err(ParamError::new(
                    vec![Seg::Key("train_test_split".into()), Seg::Key("test_size".into())],
                    "test_size must be > 0",
                )
                .hint("a fraction like 0.1, or a number of rows like 500"));
            }
        }
        if let Some(Filter::Expr(e) | Filter::Full { expr: Some(e), .. }) = &p.filter {
            let env = crate::jinja::environment();
            if let Err(err) = env.compile_expression(e) {
                return Err(ParamError::new(at("filter"), format!("invalid filter expression: {err}")).hint(
                    "a Jinja expression over the row's columns, e.g. `answer is not none and answer | length > 0`",
                ));
            }
        }
        Ok(Box::new(DatasetStage { p, source }))
    }
}

impl DatasetStage {
    fn local_files(&self, root: &Path) -> Vec<PathBuf> {
        let Source::Local(pat) = &self.source else { return Vec::new() };
        expand(root, pat)
    }
}

/// Files matching a glob (or one path) under `base`, sorted; directories expand to their data files.
fn expand(base: &Path, pattern: &str) -> Vec<PathBuf> {
    let full = base.join(pattern);
    let mut out: Vec<PathBuf> = if pattern.contains(['*', '?', '[']) {
        glob::glob(&full.to_string_lossy()).map(|g| g.flatten().collect()).unwrap_or_default()
    } else {
        vec![full]
    };
    out = out
        .into_iter()
        .flat_map(|p| {
            if p.is_dir() {
                table::data_files(&p)
            } else if p.exists() {
                vec![p]
            } else {
                vec![]
            }
        })
        .collect();
    out.sort();
    out
}

impl Stage for DatasetStage {
    fn files(&self) -> Vec<FileDep> {
        let Source::Local(pat) = &self.source else { return Vec::new() };
        // Globs are expanded against the workspace root at key time by the
        // engine's file hashing of the directory part; a plain path is one dep.
        if pat.contains(['*', '?', '[']) {
            let dir = pat.rsplit_once('/').map(|(d, _)| d).unwrap_or(".");
            vec![FileDep { path: dir.to_string(), at: at("source") }]
        } else {
            vec![FileDep { path: pat.clone(), at: at("source") }]
        }
    }

    fn pins(&self) -> Result<BTreeMap<String, String>, StageFailure> {
        match &self.source {
            Source::Hub(r) => {
                let sha = Hub::from_env().and_then(|h| h.resolve_sha(r)).map_err(hub_failure)?;
                Ok(BTreeMap::from([(r.to_string(), sha)]))
            }
            _ => Ok(BTreeMap::new()),
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let (files, revision) = match &self.source {
            Source::Local(_) => (self.local_files(ctx.workspace), None::<String>),
            Source::Hub(r) => {
                let hub = Hub::from_env().map_err(hub_failure)?;
                let res = hub.resolve(r).map_err(hub_failure)?;
                let chosen = hub_data_files(&res.files, self.p.config.as_deref(), self.p.split.as_deref());
                if chosen.is_empty() {
                    return Err(StageFailure::new(format!(
                        "{r}: no data files for config {:?} and split {:?}",
                        self.p.config.as_deref().unwrap_or("(any)"),
                        self.p.split.as_deref().unwrap_or("(any)")
                    ))
                    .hint(format!("files at {}: {}", &res.sha[..12], res.files.join(", "))));
                }
                ctx.log_line(&format!("# {r} -> {} (endpoint {})", res.sha, hub.endpoint()));
                let mut local = Vec::new();
                for f in &chosen {
                    ctx.progress.message(&format!("downloading {f}"));
                    local.push(hub.download(r, &res.sha, f).map_err(hub_failure)?);
                }
                (local, Some(res.sha))
            }
            Source::Input { name, pattern } => {
                let dir = ctx.inputs.get(name).ok_or_else(|| {
                    StageFailure::new(format!("`source: input:{name}` but the stage has no input `{name}`"))
                        .hint(format!("add `inputs: {{{name}: OTHER_STAGE}}`"))
                })?;
                let files = if pattern.is_empty() {
                    if dir.is_dir() {
                        table::data_files(dir)
                    } else {
                        vec![dir.clone()]
                    }
                } else {
                    expand(dir, pattern)
                };
                (files, None)
            }
        };
        if files.is_empty() {
            return Err(StageFailure::new(format!("`{}` matches no data files", self.p.source))
                .hint("data files end in .jsonl, .json, .csv or .parquet"));
        }
        ctx.log_line(&format!(
            "# reading {} file(s): {}",
            files.len(),
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
        let reader = table::open(&files, self.p.format)?;
        let in_schema = reader.schema.clone();
        let (indices, out_schema) = project(&in_schema, &self.p, &files[0])?;
        let filter = Filter::compile(&self.p.filter)?;
        let needs_all = self.p.shuffle.is_some() || self.p.train_test_split.is_some();
        let (offset, limit) = self.p.select.as_ref().map(|s| (s.offset, s.limit)).unwrap_or((0, None));

        let mut kept: Vec<RecordBatch> = Vec::new();
        let mut out = if needs_all {
            None
        } else {
            Some(ParquetOut::create(&ctx.out_dir.join("data.parquet"), out_schema.clone())?)
        };
        let (mut seen, mut skip, mut rows_in) = (0usize, offset, 0usize);
        for batch in reader {
            if ctx.cancel.is_cancelled() {
                return Err(StageFailure::new("cancelled"));
            }
            let batch = batch?;
            rows_in += batch.num_rows();
            let batch =
                RecordBatch::try_new(out_schema.clone(), indices.iter().map(|i| batch.column(*i).clone()).collect())
                    .map_err(|e| StageFailure::new(e.to_string()))?;
            let mut batch = filter.apply(&batch, rows_in - batch.num_rows())?;
            if needs_all {
                kept.push(batch);
                continue;
            }
            // Streaming select.
            if skip > 0 {
                let n = skip.min(batch.num_rows());
                batch = batch.slice(n, batch.num_rows() - n);
                skip -= n;
            }
            if let Some(l) = limit {
                let room = l.saturating_sub(seen);
                if batch.num_rows() > room {
                    batch = batch.slice(0, room);
                }
            }
            seen += batch.num_rows();
            if batch.num_rows() > 0 {
                out.as_mut().expect("streaming writer").write(&batch)?;
            }
            if limit.is_some_and(|l| seen >= l) {
                break;
            }
            ctx.progress.message(&format!("{rows_in} rows read"));
        }
        let mut splits = BTreeMap::new();
        if let Some(o) = out {
            splits.insert("data".to_string(), o.finish()?);
        } else {
            let all = arrow_select::concat::concat_batches(&out_schema, &kept)
                .map_err(|e| StageFailure::new(e.to_string()))?;
            drop(kept);
            let mut idx: Vec<u32> = (0..all.num_rows() as u32).collect();
            if let Some(s) = &self.p.shuffle {
                idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(s.seed));
            }
            let end = limit.map(|l| (offset + l).min(idx.len())).unwrap_or(idx.len());
            let idx = idx[offset.min(idx.len())..end].to_vec();
            match &self.p.train_test_split {
                None => {
                    splits.insert("data".into(), write_rows(&ctx.out_dir.join("data.parquet"), &all, idx)?);
                }
                Some(sp) => {
                    let mut idx = idx;
                    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(sp.seed));
                    let n_test = if sp.test_size < 1.0 {
                        (sp.test_size * idx.len() as f64).ceil() as usize
                    } else {
                        sp.test_size as usize
                    };
                    if n_test >= idx.len() {
                        return Err(StageFailure::new(format!(
                            "train_test_split: test_size {} leaves no training rows out of {}",
                            sp.test_size,
                            idx.len()
                        )));
                    }
                    let train = idx[n_test..].to_vec();
                    let test = idx[..n_test].to_vec();
                    splits.insert("train".into(), write_rows(&ctx.out_dir.join("train.parquet"), &all, train)?);
                    splits.insert("test".into(), write_rows(&ctx.out_dir.join("test.parquet"), &all, test)?);
                }
            }
        }
        let meta = json!({
            "rows": splits.values().sum::<usize>(),
            "rows_read": rows_in,
            "splits": splits,
            "columns": out_schema.fields().iter().map(|f| json!({"name": f.name(), "type": f.data_type().to_string()})).collect::<Vec<_>>(),
            "source": self.p.source,
            "revision": revision,
            "files": files.iter().map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())).collect::<Vec<_>>(),
        });
        fs_err::write(
            ctx.out_dir.join("dataset.json"),
            serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?,
        )?;
        Ok(())
    }
}

fn hub_failure(e: crate::hub::HubError) -> StageFailure {
    let hint = e.hint();
    let f = StageFailure::new(e.to_string());
    match hint {
        Some(h) => f.hint(h),
        None => f,
    }
}

/// The repo's data files for a config and split, by the hub's naming
/// conventions: `CONFIG/...` folders, and split names as a path component or
/// a word of the file name (`train-00000-of-00002.parquet`, `test.jsonl`).
/// Parquet files win over other formats when both exist (the hub's conversion).
fn hub_data_files(files: &[String], config: Option<&str>, split: Option<&str>) -> Vec<String> {
    let words = |f: &str| -> Vec<String> { f.split(['/', '-', '_', '.']).map(str::to_string).collect() };
    let mut chosen: Vec<String> = files
        .iter()
        .filter(|f| table::Format::from_path(Path::new(f.as_str())).is_some())
        .filter(|f| config.is_none_or(|c| f.split('/').any(|part| part == c)))
        .filter(|f| split.is_none_or(|s| words(f).iter().any(|w| w == s)))
        .cloned()
        .collect();
    if chosen.iter().any(|f| f.ends_with(".parquet")) {
        chosen.retain(|f| f.ends_with(".parquet"));
    }
    chosen.sort();
    chosen
}

fn write_rows(path: &Path, all: &RecordBatch, idx: Vec<u32>) -> Result<usize, StageFailure> {
    let mut out = ParquetOut::create(path, all.schema())?;
    for chunk in idx.chunks(table::BATCH_ROWS) {
        let take = UInt32Array::from(chunk.to_vec());
        let cols = all
            .columns()
            .iter()
            .map(|c| arrow_select::take::take(c.as_ref(), &take, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StageFailure::new(e.to_string()))?;
        out.write(&RecordBatch::try_new(all.schema(), cols).map_err(|e| StageFailure::new(e.to_string()))?)?;
    }
    out.finish()
}

/// Column indices to keep and the output schema (after `columns` and `rename`).
fn project(schema: &SchemaRef, p: &Params, first: &Path) -> Result<(Vec<usize>, SchemaRef), StageFailure> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let missing = |c: &str, what: &str| {
        StageFailure::new(format!("{what}: column `{c}` is not in {}", first.display()))
            .hint(format!("columns: {}", names.join(", ")))
    };
    let indices: Vec<usize> = match &p.columns {
        Some(cols) => {
            cols.iter().map(|c| schema.index_of(c).map_err(|_| missing(c, "columns"))).collect::<Result<_, _>>()?
        }
        None => (0..names.len()).collect(),
    };
    for k in p.rename.keys() {
        if !indices.iter().any(|i| names[*i] == k) {
            return Err(missing(k, "rename"));
        }
    }
    let fields: Vec<Field> = indices
        .iter()
        .map(|i| {
            let f = schema.field(*i);
            match p.rename.get(f.name()) {
                Some(n) => f.clone().with_name(n),
                None => f.clone(),
            }
        })
        .collect();
    Ok((indices, Arc::new(Schema::new(fields))))
}

struct CompiledFilter {
    env: minijinja::Environment<'static>,
    expr: Option<String>,
    drop_null: Vec<String>,
}

impl Filter {
    fn compile(f: &Option<Filter>) -> Result<CompiledFilter, StageFailure> {
        let (expr, drop_null) = match f {
            None => (None, vec![]),
            Some(Filter::Expr(e)) => (Some(e.clone()), vec![]),
            Some(Filter::Full { expr, drop_null }) => (expr.clone(), drop_null.clone()),
        };
        Ok(CompiledFilter { env: crate::jinja::environment(), expr, drop_null })
    }
}

impl CompiledFilter {
    /// Keep the rows that pass; `first_row` numbers rows in errors (0-based).
    fn apply(&self, b: &RecordBatch, first_row: usize) -> Result<RecordBatch, StageFailure> {
        if self.expr.is_none() && self.drop_null.is_empty() {
            return Ok(b.clone());
        }
        let mut keep = vec![true; b.num_rows()];
        for c in &self.drop_null {
            let col = b.column_by_name(c).ok_or_else(|| {
                StageFailure::new(format!("filter.drop_null: no column `{c}`")).hint(format!(
                    "columns: {}",
                    b.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            for (i, k) in keep.iter_mut().enumerate() {
                *k &= col.is_valid(i);
            }
        }
        if let Some(e) = &self.expr {
            let expr = self.env.compile_expression(e).map_err(|err| StageFailure::new(format!("filter: {err}")))?;
            for (i, row) in table::batch_rows(b)?.into_iter().enumerate() {
                if !keep[i] {
                    continue;
                }
                let v = expr.eval(minijinja::Value::from(minijinja::value::Serde(&row))).map_err(|err| {
                    StageFailure::new(format!("row {} (0-based): filter `{e}`: {err}", first_row + i))
                        .hint("columns are variables; test for missing values with `x is not none`")
                })?;
                keep[i] = v.is_true();
            }
        }
        arrow_select::filter::filter_record_batch(b, &BooleanArray::from(keep))
            .map_err(|e| StageFailure::new(e.to_string()))
    }
}
