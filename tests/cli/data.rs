//! `dataset` (and later `messages`) stages through the CLI.

use std::path::Path;

use arrow_array::{Array, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::*;

/// All rows of a Parquet file, as batches concatenated into (column -> strings).
pub fn read_parquet(p: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap().map(|b| b.unwrap()).collect()
}

pub fn strings(batches: &[RecordBatch], col: &str) -> Vec<Option<String>> {
    let mut v = Vec::new();
    for b in batches {
        let c = b.column_by_name(col).unwrap_or_else(|| panic!("no column {col}: {:?}", b.schema()));
        let s = c.as_any().downcast_ref::<StringArray>().expect("string column");
        for i in 0..s.len() {
            v.push(s.is_valid(i).then(|| s.value(i).to_string()));
        }
    }
    v
}

fn gsm_like(n: usize) -> String {
    (0..n)
        .map(|i| {
            let answer = if i % 10 == 3 { "null".to_string() } else { format!("\"{} #### {i}\"", "x".repeat(i % 4)) };
            format!("{{\"question\": \"q{i}\", \"answer\": {answer}, \"extra\": {i}}}\n")
        })
        .collect()
}

#[test]
fn jsonl_columns_rename_filter_select() {
    let ws = Ws::new();
    ws.write("data/train.jsonl", &gsm_like(40));
    ws.write(
        "p.yaml",
        r#"
stages:
  ds:
    kind: dataset
    source: data/train.jsonl
    columns: [question, answer]
    rename: {question: prompt}
    filter: {drop_null: [answer], expr: "answer | length > 8"}
    select: {offset: 2, limit: 10}
"#,
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "ds");
    let b = read_parquet(&out.join("data.parquet"));
    let prompts = strings(&b, "prompt");
    // rows pass when the answer is non-null and longer than 8 chars
    let len = |i: usize| i % 4 + " #### ".len() + i.to_string().len();
    let expect: Vec<usize> = (0..40).filter(|i| i % 10 != 3 && len(*i) > 8).skip(2).take(10).collect();
    assert_eq!(prompts, expect.iter().map(|i| Some(format!("q{i}"))).collect::<Vec<_>>());
    assert!(b[0].column_by_name("extra").is_none());
    let meta: serde_json::Value = serde_json::from_str(&fs_err::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(meta["rows"], 10);
    assert_eq!(meta["rows_read"], 40);
    assert_eq!(meta["columns"][0]["name"], "prompt");
    // Editing the data file reruns the stage; `show` prints the metadata.
    ws.write("data/train.jsonl", &gsm_like(41));
    let s = ws.ok(&["status", "p.yaml"]);
    assert!(s.stdout.contains("file data/train.jsonl changed"), "{s:?}");
}

#[test]
fn shuffle_select_and_split_are_seeded() {
    let ws = Ws::new();
    ws.write("data/train.jsonl", &gsm_like(100));
    let p = |seed: u64| {
        format!(
            "stages:\n  ds:\n    kind: dataset\n    source: data/*.jsonl\n    shuffle: {{seed: {seed}}}\n    select: {{limit: 50}}\n    train_test_split: {{test_size: 0.2, seed: 1}}\n"
        )
    };
    ws.write("p.yaml", &p(42));
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "ds");
    let train = strings(&read_parquet(&out.join("train.parquet")), "question");
    let test = strings(&read_parquet(&out.join("test.parquet")), "question");
    assert_eq!((train.len(), test.len()), (40, 10));
    assert!(train.iter().all(|q| !test.contains(q)));
    let first = out.clone();
    // Same seed again: identical output (cached); another seed: another order.
    ws.ok(&["run", "p.yaml", "--force", "ds"]);
    assert_eq!(ws.out_path("p.yaml", "ds"), first);
    ws.write("p.yaml", &p(7));
    ws.ok(&["run", "p.yaml"]);
    assert_ne!(strings(&read_parquet(&ws.out_path("p.yaml", "ds").join("train.parquet")), "question"), train);
}

#[test]
fn csv_json_and_input_sources() {
    let ws = Ws::new();
    ws.write("d/a.csv", "question,answer\nq1,a1\nq2,a2\n");
    ws.write("d/b.json", r#"[{"question": "q3", "answer": "a3"}, {"question": "q4", "answer": "a4"}]"#);
    ws.write(
        "p.yaml",
        r#"
stages:
  csv: {kind: dataset, source: d/a.csv}
  json: {kind: dataset, source: d/b.json}
  gen:
    kind: command
    cmd: mkdir -p $PIPE_OUT/sub && printf '{"question":"q5"}\n{"question":"q6"}\n' > $PIPE_OUT/sub/x.jsonl
  from-input:
    kind: dataset
    inputs: {raw: gen}
    source: input:raw/sub/*.jsonl
"#,
    );
    ws.ok(&["run", "p.yaml"]);
    let q = |s: &str| strings(&read_parquet(&ws.out_path("p.yaml", s).join("data.parquet")), "question");
    assert_eq!(q("csv"), [Some("q1".into()), Some("q2".into())]);
    assert_eq!(q("json"), [Some("q3".into()), Some("q4".into())]);
    assert_eq!(q("from-input"), [Some("q5".into()), Some("q6".into())]);
}

#[test]
fn bad_rows_and_params_are_reported_precisely() {
    let ws = Ws::new();
    ws.write("d/x.jsonl", "{\"a\": 1}\n{\"a\": 2}\n{\"a\": \n");
    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: d/x.jsonl}\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("d/x.jsonl:3: invalid JSON"), "{o:?}");

    ws.write("d/x.jsonl", "{\"a\": 1}\n");
    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: d/x.jsonl, rename: {b: c}}\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("rename: column `b` is not in"), "{o:?}");
    assert!(o.stderr.contains("hint: columns: a"), "{o:?}");

    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: d/x.jsonl, split: train}\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("`split` selects a hub dataset's files"), "{o:?}");

    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: d/x.jsonl, filter: \"a >\"}\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("invalid filter expression"), "{o:?}");

    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: d/missing.jsonl}\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("file `d/missing.jsonl` does not exist"), "{o:?}");
}
