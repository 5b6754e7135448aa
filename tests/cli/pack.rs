//! `pack` through the CLI, with a byte-level tokenizer written by the test.

use arrow_array::{Array, Int32Array, ListArray, RecordBatch};

use crate::common::*;
use crate::data::read_parquet;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's byte -> unicode table, as byte-level BPE vocabularies use.
fn byte_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    if printable(b) {
        return char::from_u32(b as u32).unwrap();
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// A model folder: a byte-level BPE tokenizer (one token per byte, ids 0..256,
/// `<|im_start|>` = 256, `<|im_end|>` = 257) and a ChatML template.
pub fn write_byte_model(ws: &Ws, dir: &str) {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..=255u8).map(|b| (byte_char(b).to_string(), serde_json::json!(b))).collect();
    let special = |id: u32, s: &str| serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    ws.write(&format!("{dir}/tokenizer.json"), &tok.to_string());
    ws.write(
        &format!("{dir}/tokenizer_config.json"),
        &serde_json::json!({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": null}).to_string(),
    );
}

fn text_of(ids: &[i32]) -> String {
    let mut bytes = Vec::new();
    for id in ids {
        match id {
            256 => bytes.extend(b"<|im_start|>"),
            257 => bytes.extend(b"<|im_end|>"),
            x => bytes.push(*x as u8),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn col(b: &RecordBatch, name: &str) -> Vec<Vec<i32>> {
    let l = b.column_by_name(name).unwrap().as_any().downcast_ref::<ListArray>().unwrap();
    (0..l.len()).map(|i| l.value(i).as_any().downcast_ref::<Int32Array>().unwrap().values().to_vec()).collect()
}

fn setup(ws: &Ws, rows: &[(&str, &str)], pack: &str) {
    write_byte_model(ws, "model");
    let data: String = rows.iter().map(|(q, a)| format!("{{\"q\": \"{q}\", \"a\": \"{a}\"}}\n")).collect();
    ws.write("data/d.jsonl", &data);
    ws.write(
        "p.yaml",
        &format!(
            "stages:\n  base:\n    kind: command\n    deps: [model]\n    cmd: cp model/* $PIPE_OUT/\n  ds: {{kind: dataset, source: data/d.jsonl}}\n  chat:\n    kind: messages\n    inputs: {{data: ds}}\n    user: \"{{{{ q }}}}\"\n    assistant: \"{{{{ a }}}}\"\n  pack:\n    kind: pack\n    inputs: {{data: chat, model: base}}\n{pack}"
        ),
    );
}

#[test]
fn assistant_only_loss_without_packing() {
    let ws = Ws::new();
    setup(&ws, &[("hi", "yo"), ("2+2?", "4")], "    packing: none\n");
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "pack");
    let b = read_parquet(&out.join("data.parquet"));
    let ids = col(&b[0], "input_ids");
    let labels = col(&b[0], "labels");
    assert_eq!(text_of(&ids[0]), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n");
    let trained: Vec<i32> = labels[0].iter().copied().filter(|l| *l != -100).collect();
    assert_eq!(text_of(&trained), "yo<|im_end|>\n");
    assert_eq!(col(&b[0], "seq_lens")[1], vec![ids[1].len() as i32]);
    let stats: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["data"]["samples"], 2);
    // "yo" <|im_end|> "\n" and "4" <|im_end|> "\n"
    assert_eq!(stats["data"]["trainable_tokens"], 7);
}

#[test]
fn bfd_packing_keeps_sample_boundaries() {
    let ws = Ws::new();
    let rows: Vec<(String, String)> = (0..12).map(|i| (format!("q{i}"), "a".repeat(1 + i * 3))).collect();
    let refs: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    setup(&ws, &refs, "    max_seq_length: 128\n    packing: bfd\n");
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "pack");
    let b = read_parquet(&out.join("data.parquet"));
    let (ids, labels, pos, lens) =
        (col(&b[0], "input_ids"), col(&b[0], "labels"), col(&b[0], "position_ids"), col(&b[0], "seq_lens"));
    let mut samples = 0;
    for r in 0..ids.len() {
        assert!(ids[r].len() <= 128);
        assert_eq!(lens[r].iter().sum::<i32>() as usize, ids[r].len());
        let mut start = 0usize;
        for l in &lens[r] {
            let l = *l as usize;
            assert_eq!(pos[r][start..start + l], (0..l as i32).collect::<Vec<_>>()[..], "positions restart per sample");
            assert_eq!(labels[r][start], -100, "no token predicts across a boundary");
            assert!(text_of(&ids[r][start..start + l]).starts_with("<|im_start|>user\nq"));
            start += l;
            samples += 1;
        }
    }
    assert_eq!(samples, 12);
    assert!(ids.len() < 12, "packing put several samples in a row");
    let stats: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert!(stats["data"]["packing_efficiency"].as_f64().unwrap() > 0.5, "{stats}");
}

#[test]
fn truncation_policies_and_wrapped() {
    let ws = Ws::new();
    setup(&ws, &[("short", "x"), ("long", &"y".repeat(100))], "    max_seq_length: 64\n    truncation: error\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("row 1 (0-based) has 125 tokens, more than max_seq_length 64"), "{o:?}");
    ws.write("p.yaml", &ws.read("p.yaml").replace("truncation: error", "truncation: drop"));
    ws.ok(&["run", "p.yaml"]);
    let stats: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(ws.out_path("p.yaml", "pack").join("stats.json")).unwrap())
            .unwrap();
    assert_eq!(stats["data"]["dropped_too_long"], 1);
    ws.write("p.yaml", &ws.read("p.yaml").replace("truncation: drop", "truncation: truncate\n    packing: wrapped"));
    ws.ok(&["run", "p.yaml"]);
    let b = read_parquet(&ws.out_path("p.yaml", "pack").join("data.parquet"));
    let ids = col(&b[0], "input_ids");
    assert!(ids.iter().all(|r| r.len() <= 64));
    assert_eq!(ids.iter().map(Vec::len).sum::<usize>(), 27 + 64);
    // Missing inputs are explained.
    ws.write("p.yaml", &ws.read("p.yaml").replace("inputs: {data: chat, model: base}", "inputs: {data: chat}"));
    let o = ws.pipe(&["run", "p.yaml"]);
    assert!(o.stderr.contains("`pack` needs an input named `model`"), "{o:?}");
}

/// A tokenizer.json the fast tokenizer path does not support (a normalizer)
/// goes through the `tokenizers` crate, says so, and packs the same rows.
#[test]
fn unsupported_tokenizer_falls_back_to_tokenizers() {
    let ws = Ws::new();
    setup(&ws, &[("héllo 12 it's", "wörld  345 🙂"), ("2+2?", "4")], "    packing: none\n");
    let o = ws.ok(&["run", "p.yaml"]);
    assert!(!o.stderr.contains("tokenizing with the `tokenizers` crate"), "{o:?}");
    let out = ws.out_path("p.yaml", "pack");
    let fast = read_parquet(&out.join("data.parquet"));
    // NFC changes nothing in this NFC text, but the fast path has no normalizers.
    let tok = ws.read("model/tokenizer.json");
    assert!(tok.contains("\"normalizer\":null"), "{tok}");
    ws.write("model/tokenizer.json", &tok.replace("\"normalizer\":null", "\"normalizer\":{\"type\":\"NFC\"}"));
    let o = ws.ok(&["run", "p.yaml"]);
    assert!(
        o.stderr.contains("tokenizing with the `tokenizers` crate (slower)") && o.stderr.contains("normalizer"),
        "{o:?}"
    );
    // The same bytes: the same artifact.
    let out2 = ws.out_path("p.yaml", "pack");
    let slow = read_parquet(&out2.join("data.parquet"));
    for c in ["input_ids", "labels", "position_ids", "seq_lens"] {
        assert_eq!(col(&slow[0], c), col(&fast[0], c), "{c}");
    }
    assert_eq!(
        text_of(&col(&slow[0], "input_ids")[0]),
        "<|im_start|>user\nhéllo 12 it's<|im_end|>\n<|im_start|>assistant\nwörld  345 🙂<|im_end|>\n"
    );
    assert_eq!(fs_err::read(out.join("stats.json")).unwrap(), fs_err::read(out2.join("stats.json")).unwrap());
}
