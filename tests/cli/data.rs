//! `dataset` (and later `messages`) stages through the CLI.

use std::path::Path;

use arrow_array::{Array, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::*;

/// All rows of a Parquet file, as batches concatenated into (column -> strings).
pub fn read_parquet(p: &Path) -> Vec<RecordBatch> {
    let f = fs_err::File::open(p).expect("open parquet").into_parts().0;
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
    let meta: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
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

fn messages_of(batches: &[RecordBatch]) -> Vec<Vec<(String, String)>> {
    use arrow_array::{ListArray, StructArray};
    let mut out = Vec::new();
    for b in batches {
        let l = b.column_by_name("messages").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
        for i in 0..l.len() {
            let v = l.value(i);
            let s = v.as_any().downcast_ref::<StructArray>().unwrap();
            let role = s.column_by_name("role").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            let content = s.column_by_name("content").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            out.push((0..s.len()).map(|j| (role.value(j).to_string(), content.value(j).to_string())).collect());
        }
    }
    out
}

#[test]
fn messages_from_templates_with_system_file_and_splits() {
    let ws = Ws::new();
    ws.write("data/d.jsonl", "{\"q\": \"What is 2/3 of 9?\", \"a\": \"6\"}\n{\"q\": \"Café?\", \"a\": \"oui\"}\n{\"q\": \"x\", \"a\": \"y\"}\n{\"q\": \"z\", \"a\": \"w\"}\n");
    ws.write("prompts/system.txt", "You are a math tutor.\n");
    ws.write(
        "p.yaml",
        r#"
stages:
  ds:
    kind: dataset
    source: data/d.jsonl
    train_test_split: {test_size: 1, seed: 3}
  chat:
    kind: messages
    inputs: {data: ds}
    system_file: prompts/system.txt
    user: "Question: {{ q }}"
    assistant: "{{ a }}"
    export: jsonl
"#,
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "chat");
    let train = messages_of(&read_parquet(&out.join("train.parquet")));
    let test = messages_of(&read_parquet(&out.join("test.parquet")));
    assert_eq!((train.len(), test.len()), (3, 1));
    let all: Vec<_> = train.iter().chain(&test).collect();
    let first = all.iter().find(|m| m[1].1 == "Question: What is 2/3 of 9?").expect("row mapped");
    assert_eq!(first[0], ("system".to_string(), "You are a math tutor.".to_string()));
    assert_eq!(first[2], ("assistant".to_string(), "6".to_string()));
    // The JSONL export is what `datasets`' to_json() writes (pandas escaping).
    let jsonl = fs_err::read_to_string(out.join("train.jsonl")).unwrap()
        + &fs_err::read_to_string(out.join("test.jsonl")).unwrap();
    assert!(
        jsonl.contains(r#"{"messages":[{"role":"system","content":"You are a math tutor."},{"role":"user","content":"Question: What is 2\/3 of 9?"},{"role":"assistant","content":"6"}]}"#),
        "{jsonl}"
    );
    assert!(jsonl.contains(r#""content":"Question: Caf\u00e9?""#), "{jsonl}");
    // Changing the system prompt file reruns `chat` only, and status says why.
    ws.write("prompts/system.txt", "You are terse.\n");
    let s = ws.ok(&["status", "p.yaml"]);
    assert!(s.stdout.contains("chat   stale      file prompts/system.txt changed"), "{s:?}");
    assert_eq!(ws.ok(&["run", "p.yaml"]).ran(), ["chat"]);
}

#[test]
fn multi_turn_sources_and_instruction_format() {
    let ws = Ws::new();
    ws.write(
        "data/c.jsonl",
        r#"{"conv": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "q": "a", "a": "b"}
"#,
    );
    ws.write(
        "p.yaml",
        r#"
stages:
  ds: {kind: dataset, source: data/c.jsonl}
  chat:
    kind: messages
    inputs: {data: ds}
    turns: {field: conv, role: from, content: value, roles: {human: user, gpt: assistant}}
  inst:
    kind: messages
    inputs: {data: ds}
    format: instruction
    prompt: "{{ q }}"
    completion: " {{ a }}"
"#,
    );
    ws.ok(&["run", "p.yaml"]);
    let m = messages_of(&read_parquet(&ws.out_path("p.yaml", "chat").join("data.parquet")));
    let roles: Vec<&str> = m[0].iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(m[0][3].1, "4");
    let b = read_parquet(&ws.out_path("p.yaml", "inst").join("data.parquet"));
    assert_eq!(strings(&b, "prompt"), [Some("a".to_string())]);
    assert_eq!(strings(&b, "completion"), [Some(" b".to_string())]);
}

#[test]
fn messages_validation_fail_and_skip() {
    let ws = Ws::new();
    ws.write(
        "data/c.jsonl",
        r#"{"conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
{"conv": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
{"conv": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "c"}]}
{"conv": [{"role": "bot", "content": "x"}]}
"#,
    );
    let p = |policy: &str| {
        format!("stages:\n  ds: {{kind: dataset, source: data/c.jsonl}}\n  chat:\n    kind: messages\n    inputs: {{data: ds}}\n    turns: {{field: conv}}\n    on_error: {policy}\n")
    };
    ws.write("p.yaml", &p("fail"));
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("data.parquet: row 1 (0-based): wrong role order: assistant, user"), "{o:?}");
    assert!(o.stderr.contains("on_error: skip"), "{o:?}");
    ws.write("p.yaml", &p("skip"));
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "chat");
    assert_eq!(messages_of(&read_parquet(&out.join("data.parquet"))).len(), 1);
    let stats: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["data"]["rows_in"], 4);
    assert_eq!(stats["data"]["rows_out"], 1);
    assert_eq!(
        stats["data"]["skipped"],
        serde_json::json!({"empty_content": 1, "unknown_role": 1, "wrong_role_order": 1})
    );
    let show = ws.ok(&["show", "p.yaml", "chat"]);
    assert!(show.stdout.contains("\"skipped\""), "pipe show prints the stats: {show:?}");

    // Content of the wrong type (a numeric column).
    ws.write(
        "data/n.jsonl",
        "{\"conv\": [{\"role\": \"user\", \"content\": 3}, {\"role\": \"assistant\", \"content\": 4}]}\n",
    );
    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: data/n.jsonl}\n  chat:\n    kind: messages\n    inputs: {data: ds}\n    turns: {field: conv}\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert!(o.stderr.contains("row 0 (0-based): turn 0: `content` is not a string (found a number)"), "{o:?}");
    // A template naming a missing field.
    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: data/c.jsonl}\n  chat:\n    kind: messages\n    inputs: {data: ds}\n    user: \"{{ question }}\"\n    assistant: x\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("row 0 (0-based): field `question` is missing (used by `user`)"), "{o:?}");
    // Param errors are spec errors.
    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: data/c.jsonl}\n  chat:\n    kind: messages\n    inputs: {data: ds}\n    user: \"{{ q\"\n    assistant: x\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("invalid template"), "{o:?}");
}

#[test]
fn hub_dataset_split_selection_and_pinned_revision() {
    use crate::hub_server::HubServer;
    let hub = HubServer::start();
    let home = tempfile::tempdir().unwrap();
    let rows = |split: &str, n: usize| -> Vec<u8> {
        (0..n).map(|i| format!("{{\"question\": \"{split}{i}\"}}\n")).collect::<String>().into_bytes()
    };
    let sha1 = hub.commit(
        "datasets",
        "acme/gsm",
        "main",
        &[
            ("data/train-00000-of-00001.jsonl", rows("train", 5)),
            ("data/test-00000-of-00001.jsonl", rows("test", 2)),
            ("README.md", b"# gsm\n".to_vec()),
        ],
    );
    let ws = Ws::new();
    ws.write("p.yaml", "stages:\n  ds:\n    kind: dataset\n    source: hf://datasets/acme/gsm\n    split: train\n    select: {limit: 3}\n");
    let run = |args: &[&str]| -> Out {
        ws.cmd(args)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", home.path())
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap()
            .into()
    };
    let o = run(&["run", "p.yaml"]);
    assert_eq!(o.code, 0, "{o:?}");
    let out = ws.out_path("p.yaml", "ds");
    assert_eq!(
        strings(&read_parquet(&out.join("data.parquet")), "question"),
        ["train0", "train1", "train2"].map(|s| Some(s.to_string()))
    );
    let meta: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(meta["revision"], sha1.as_str());
    // The branch moves: status names the revision change.
    let sha2 = hub.commit("datasets", "acme/gsm", "main", &[("data/train-00000-of-00001.jsonl", rows("train", 6))]);
    let o = run(&["status", "p.yaml"]);
    assert!(o.stdout.contains(&format!("hf://datasets/acme/gsm@main: {sha1} -> {sha2}")), "{o:?}");
    // Offline (unreachable endpoint): status explains, run fails the stage.
    let o: Out = ws
        .cmd(&["status", "p.yaml"])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", home.path())
        .output()
        .unwrap()
        .into();
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("cannot resolve its source"), "{o:?}");
    // A model repo is not a dataset.
    ws.write("p.yaml", "stages:\n  ds: {kind: dataset, source: hf://acme/gsm}\n");
    let o = run(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("names a model repository"), "{o:?}");
}

/// More rows than one read batch (8,192): all are kept, and the plain log's
/// last progress line (held back by the 10 s throttle) gives the final count.
#[test]
fn rows_beyond_one_batch_are_all_read_and_the_log_shows_the_final_count() {
    let ws = Ws::new();
    ws.write("data/train.jsonl", &gsm_like(10_000));
    ws.write("p.yaml", "stages:\n  ds:\n    kind: dataset\n    source: data/train.jsonl\n");
    let o = ws.ok(&["run", "p.yaml"]);
    let rows: usize =
        read_parquet(&ws.out_path("p.yaml", "ds").join("data.parquet")).iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 10_000);
    let progress: Vec<&str> = o.stderr.lines().filter(|l| l.contains("rows read")).collect();
    assert_eq!(progress.last(), Some(&"pipe: ds: 10000 rows read"), "{}", o.stderr);
    let done = o.stderr.lines().position(|l| l.starts_with("pipe: ds: done")).expect("done line");
    let last = o.stderr.lines().position(|l| l == "pipe: ds: 10000 rows read").unwrap();
    assert!(last < done, "{}", o.stderr);
}
