//! Tabular I/O shared by the data stages: read JSONL / JSON / CSV / Parquet
//! into Arrow record batches (streaming where the format allows), write
//! Parquet, and turn batches into JSON rows for per-row logic.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use pipe_engine::stage::StageFailure;

pub const BATCH_ROWS: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Json,
    Csv,
    Parquet,
}

impl Format {
    pub fn from_path(p: &Path) -> Option<Format> {
        let name = p.file_name()?.to_string_lossy().to_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            Some(Format::Jsonl)
        } else if name.ends_with(".json") {
            Some(Format::Json)
        } else if name.ends_with(".csv") {
            Some(Format::Csv)
        } else if name.ends_with(".parquet") {
            Some(Format::Parquet)
        } else {
            None
        }
    }
}

/// A std `File` (Arrow and Parquet readers need one); errors name the path.
fn open_file(p: &Path) -> Result<File, StageFailure> {
    Ok(fs_err::File::open(p)?.into_parts().0)
}

fn fail(path: &Path, e: impl std::fmt::Display) -> StageFailure {
    StageFailure::new(format!("{}: {e}", path.display()))
}

/// A streaming reader over one or more files of one format with one schema.
pub struct TableReader {
    pub schema: SchemaRef,
    iters: Vec<Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>> + Send>>,
    paths: Vec<PathBuf>,
    current: usize,
}

impl Iterator for TableReader {
    type Item = Result<RecordBatch, StageFailure>;
    fn next(&mut self) -> Option<Self::Item> {
        while self.current < self.iters.len() {
            match self.iters[self.current].next() {
                Some(Ok(b)) => return Some(Ok(b)),
                Some(Err(e)) => {
                    let p = &self.paths[self.current];
                    return Some(Err(explain_read_error(p, e)));
                }
                None => self.current += 1,
            }
        }
        None
    }
}

/// Arrow's JSON errors carry no line number: find the first bad line ourselves.
fn explain_read_error(p: &Path, e: ArrowError) -> StageFailure {
    if Format::from_path(p) == Some(Format::Jsonl) {
        if let Ok(f) = open_file(p) {
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                if let Err(je) = serde_json::from_str::<serde_json::Value>(&line) {
                    return StageFailure::new(format!("{}:{}: invalid JSON: {je}", p.display(), i + 1))
                        .hint("each line of a .jsonl file must be one JSON object");
                }
            }
        }
    }
    fail(p, e).hint("every record must give each field the same type (e.g. always a string)")
}

pub fn open(paths: &[PathBuf], format: Option<Format>) -> Result<TableReader, StageFailure> {
    let Some(first) = paths.first() else {
        return Err(StageFailure::new("no data files to read"));
    };
    let fmt = match format.or_else(|| Format::from_path(first)) {
        Some(f) => f,
        None => {
            return Err(StageFailure::new(format!("{}: cannot tell the file format from its name", first.display()))
                .hint("set `format: jsonl|json|csv|parquet`"))
        }
    };
    let schema: SchemaRef = match fmt {
        Format::Jsonl => {
            // One schema over all files (a full pass; bounded memory).
            let mut merged: Option<Schema> = None;
            for p in paths {
                let f = open_file(p)?;
                let (s, _) = arrow_json::reader::infer_json_schema(BufReader::new(f), None)
                    .map_err(|e| explain_read_error(p, e))?;
                merged = Some(match merged {
                    None => s,
                    Some(m) => Schema::try_merge([m, s]).map_err(|e| fail(p, e))?,
                });
            }
            Arc::new(merged.unwrap_or_else(Schema::empty))
        }
        Format::Json => {
            let mut values = Vec::new();
            for p in paths {
                values.extend(read_json_records(p)?);
            }
            let schema = arrow_json::reader::infer_json_schema_from_iterator(values.iter().map(Ok))
                .map_err(|e| fail(first, e))?;
            let schema = Arc::new(schema);
            let mut dec = arrow_json::ReaderBuilder::new(schema.clone())
                .with_batch_size(BATCH_ROWS)
                .build_decoder()
                .map_err(|e| fail(first, e))?;
            let mut batches = Vec::new();
            for chunk in values.chunks(BATCH_ROWS) {
                dec.serialize(chunk).map_err(|e| fail(first, e))?;
                if let Some(b) = dec.flush().map_err(|e| fail(first, e))? {
                    batches.push(Ok(b));
                }
            }
            return Ok(TableReader {
                schema,
                iters: vec![Box::new(batches.into_iter())],
                paths: vec![first.clone()],
                current: 0,
            });
        }
        Format::Csv => {
            let f = open_file(first)?;
            let (s, _) = arrow_csv::reader::Format::default()
                .with_header(true)
                .infer_schema(f, None)
                .map_err(|e| fail(first, e))?;
            Arc::new(s)
        }
        Format::Parquet => {
            let f = open_file(first)?;
            ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| fail(first, e))?.schema().clone()
        }
    };
    let mut iters: Vec<Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>> + Send>> = Vec::new();
    for p in paths {
        let f = open_file(p)?;
        let it: Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>> + Send> = match fmt {
            Format::Jsonl => Box::new(
                arrow_json::ReaderBuilder::new(schema.clone())
                    .with_batch_size(BATCH_ROWS)
                    .build(BufReader::new(f))
                    .map_err(|e| fail(p, e))?,
            ),
            Format::Csv => Box::new(
                arrow_csv::ReaderBuilder::new(schema.clone())
                    .with_header(true)
                    .with_batch_size(BATCH_ROWS)
                    .build(f)
                    .map_err(|e| fail(p, e))?,
            ),
            Format::Parquet => {
                let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| fail(p, e))?;
                if b.schema().fields() != schema.fields() {
                    return Err(StageFailure::new(format!(
                        "{}: its columns differ from those of {}",
                        p.display(),
                        first.display()
                    )));
                }
                Box::new(b.with_batch_size(BATCH_ROWS).build().map_err(|e| fail(p, e))?)
            }
            Format::Json => unreachable!("handled above"),
        };
        iters.push(it);
    }
    Ok(TableReader { schema, iters, paths: paths.to_vec(), current: 0 })
}

/// A `.json` file: an array of records, or `{"data": [...]}`-style records
/// under one key, or JSON lines mislabelled as `.json`.
fn read_json_records(p: &Path) -> Result<Vec<serde_json::Value>, StageFailure> {
    let text = fs_err::read_to_string(p)?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(a)) => Ok(a),
        Ok(serde_json::Value::Object(o)) => {
            let lists: Vec<_> = o.into_iter().filter(|(_, v)| v.is_array()).collect();
            match lists.as_slice() {
                [(_, serde_json::Value::Array(a))] => Ok(a.clone()),
                _ => Err(fail(p, "expected a JSON array of records (or an object with one list of records)")),
            }
        }
        Ok(_) => Err(fail(p, "expected a JSON array of records")),
        Err(e) => {
            // Perhaps JSON lines.
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                out.push(serde_json::from_str(line).map_err(|_| {
                    StageFailure::new(format!("{}:{}:{}: invalid JSON: {e}", p.display(), e.line(), e.column()))
                        .hint(if i == 0 { "a .json file must hold an array of records" } else { "" })
                })?);
            }
            Ok(out)
        }
    }
}

/// Parquet writer with the settings `datasets`/pandas read by default (snappy).
pub struct ParquetOut {
    w: ArrowWriter<File>,
    path: PathBuf,
    pub rows: usize,
}

impl ParquetOut {
    pub fn create(path: &Path, schema: SchemaRef) -> Result<ParquetOut, StageFailure> {
        Self::with_props(path, schema, WriterProperties::builder())
    }

    /// With more writer settings (snappy is set here).
    pub fn with_props(
        path: &Path,
        schema: SchemaRef,
        props: parquet::file::properties::WriterPropertiesBuilder,
    ) -> Result<ParquetOut, StageFailure> {
        let f = fs_err::File::create(path)?.into_parts().0;
        let props = props.set_compression(Compression::SNAPPY).build();
        let w = ArrowWriter::try_new(f, schema, Some(props)).map_err(|e| fail(path, e))?;
        Ok(ParquetOut { w, path: path.to_path_buf(), rows: 0 })
    }

    pub fn write(&mut self, b: &RecordBatch) -> Result<(), StageFailure> {
        self.rows += b.num_rows();
        self.w.write(b).map_err(|e| fail(&self.path, e))
    }

    pub fn finish(self) -> Result<usize, StageFailure> {
        let rows = self.rows;
        self.w.close().map_err(|e| fail(&self.path, e))?;
        Ok(rows)
    }
}

/// A batch as JSON objects (one per row), for per-row templates and filters.
pub fn batch_rows(b: &RecordBatch) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, StageFailure> {
    let mut buf = Vec::new();
    {
        let mut w = arrow_json::writer::LineDelimitedWriter::new(&mut buf);
        w.write(b).map_err(|e| StageFailure::new(e.to_string()))?;
        w.finish().map_err(|e| StageFailure::new(e.to_string()))?;
    }
    let mut rows = Vec::with_capacity(b.num_rows());
    for line in buf.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice(line).map_err(|e| StageFailure::new(e.to_string()))? {
            serde_json::Value::Object(o) => rows.push(o),
            _ => return Err(StageFailure::new("internal: a row is not an object")),
        }
    }
    Ok(rows)
}

/// Data files under a folder (an upstream stage's output), sorted.
pub fn data_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir).into_iter().filter(|p| Format::from_path(p).is_some() && !is_metadata(p)).collect()
}

/// Every file under `dir`, recursively (following symlinks), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs_err::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.exists() {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// Our own metadata files, never data.
fn is_metadata(p: &Path) -> bool {
    matches!(
        p.file_name().and_then(|n| n.to_str()),
        Some("dataset.json" | "stats.json" | "metrics.json" | "results.json" | "model.json")
    )
}
