//! `pipe_stages::bpe::Encoder` (the fast byte-level BPE path of `pack`)
//! against `tokenizers::Tokenizer::encode`: identical ids and token starts on
//! random and adversarial text, for several tokenizer configurations; and the
//! fallback to `tokenizers` for configurations the fast path does not handle.

use std::collections::HashMap;

use pipe_stages::bpe::Encoder;
use proptest::prelude::*;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// GPT-2's byte -> unicode table.
fn byte_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).expect("valid")
}

fn corpus() -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..200u32 {
        out.push(format!(
            "Natalia sold {i} clips to her friends in April, and then she sold half as many clips in May. \
             How many clips did she sell altogether? She'll say it's {}: they've done the math, we're sure.\n\n",
            i * 3
        ));
        out.push(format!("    return x * {i} + y  # the answer   is\t{}\n", i % 7));
    }
    out.push("Zoë and José ate crème brûlée — 🙂🙂 — 中文字符 تجربة ١٢٣".into());
    out
}

/// A byte-level BPE: greedy most-frequent-pair merges over `corpus()` split at spaces.
fn train(n_merges: usize) -> (Vec<String>, Vec<(String, String)>) {
    let mut vocab: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut words: Vec<Vec<String>> = corpus()
        .iter()
        .flat_map(|t| t.split_inclusive(' ').map(|w| w.bytes().map(|b| byte_char(b).to_string()).collect()))
        .collect::<Vec<Vec<String>>>();
    let mut merges = Vec::new();
    for _ in 0..n_merges {
        let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((&p[0], &p[1])).or_default() += 1;
            }
        }
        let Some(((a, b), _)) = counts.into_iter().max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0))) else { break };
        let (a, b) = (a.to_string(), b.to_string());
        let ab = format!("{a}{b}");
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = ab.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        if !vocab.contains(&ab) {
            vocab.push(ab);
        }
        merges.push((a, b));
    }
    (vocab, merges)
}

fn added(id: usize, s: &str, normalized: bool) -> Value {
    json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": normalized, "special": !normalized})
}

/// A tokenizer.json with a trained vocabulary, the given pre-tokenizer and
/// `<|im_start|>`, `<|im_end|>` (special) and `<|im` (normalized) added tokens.
fn tokenizer_json(pre: Value, merges_as_pairs: bool) -> Value {
    let (mut vocab, merges) = train(400);
    // Like SmolLM2, lack a few bytes: they become the unknown token.
    let missing: Vec<String> = [0x04u8, 0x13, 0xF1].iter().map(|b| byte_char(*b).to_string()).collect();
    vocab.push("<|endoftext|>".into());
    let n = vocab.len();
    let vocab: serde_json::Map<String, Value> =
        vocab.into_iter().enumerate().filter(|(_, t)| !missing.contains(t)).map(|(i, t)| (t, json!(i))).collect();
    let merges: Vec<Value> = merges
        .into_iter()
        .map(|(a, b)| if merges_as_pairs { json!([a, b]) } else { json!(format!("{a} {b}")) })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(n, "<|im_start|>", false), added(n + 1, "<|im_end|>", false), added(n + 2, "<|im", true)],
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// SmolLM2's pre-tokenizer; GPT-2's; digit runs + GPT-2; no regex at all.
fn configs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "digits+bytelevel",
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        ("bytelevel", byte_level(true)),
        (
            "digit-runs+bytelevel",
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": false}, byte_level(true)]}),
        ),
        ("bytelevel-no-regex", byte_level(false)),
    ]
}

struct Pair {
    name: &'static str,
    fast: Encoder,
    hf: Tokenizer,
}

fn pairs() -> Vec<Pair> {
    configs()
        .into_iter()
        .enumerate()
        .map(|(i, (name, pre))| {
            let bytes = tokenizer_json(pre, i % 2 == 1).to_string().into_bytes();
            let fast = Encoder::from_bytes(&bytes).expect("loads");
            assert_eq!(fast.fallback_reason(), None, "{name} takes the fast path");
            Pair { name, fast, hf: Tokenizer::from_bytes(&bytes).expect("tokenizers loads it") }
        })
        .collect()
}

/// Same ids; same token starts, where a token starting inside a multi-byte
/// character counts as starting at the character (as tokenizers reports it).
fn assert_same(name: &str, fast: &Encoder, hf: &Tokenizer, text: &str) {
    let want = hf.encode(text, false).expect("encode");
    let (mut ids, mut starts) = (Vec::new(), Vec::new());
    fast.encode(text, &mut ids, Some(&mut starts)).expect("encode");
    assert_eq!(ids, want.get_ids(), "{name}: ids of {text:?}");
    let floor = |mut s: usize| {
        while !text.is_char_boundary(s) {
            s -= 1;
        }
        s
    };
    let got: Vec<usize> = starts.iter().map(|s| floor(*s as usize)).collect();
    let want: Vec<usize> = want.get_offsets().iter().map(|o| o.0).collect();
    assert_eq!(got, want, "{name}: token starts of {text:?}");
    // A second time: through the word and segment caches.
    let mut again = Vec::new();
    fast.encode(text, &mut again, None).expect("encode");
    assert_eq!(again, ids, "{name}: cached ids of {text:?}");
}

const FRAGMENTS: &[&str] = &[
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    " \n ",
    "\u{a0}",
    "\u{3000}",
    "\u{2028}",
    "\u{85}",
    "'s",
    "'S",
    "'ll",
    "'re",
    "'ve",
    "'d",
    "'m",
    "'t",
    "'",
    "''",
    "don't",
    "1",
    "23",
    "456",
    " 7",
    "٣",
    "½",
    "Ⅻ",
    "x²",
    "é",
    "e\u{301}",
    "ß",
    "İ",
    "😀",
    "👩‍👩‍👧",
    "中文",
    "한국어",
    "ﷺ",
    "<|im_start|>",
    "<|im_end|>",
    "<|im",
    "<|",
    "|>",
    "<",
    "abc",
    "Hello",
    "hello",
    " world",
    "clips",
    " sold",
    "!!",
    "...",
    "—",
    "$",
    "#### ",
    "(x)",
    "=",
    "\u{0}",
    "\u{7f}",
    "\u{200b}",
    "\u{feff}",
    "\u{4}",
    "\u{13}\u{14}",
    "\u{50000}",
    "a",
    "b",
    "the",
    " the",
    "Natalia",
    "’",
    "“",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(proptest::sample::select(FRAGMENTS), 0..40).prop_map(|v| v.concat()),
        2 => "\\PC{0,80}",
        1 => any::<String>(),
        // Long words (the heap BPE path) with merges in them.
        1 => proptest::collection::vec(proptest::sample::select(&["clips", "th", "e", "a", "ll", "0", "  "][..]), 10..120)
            .prop_map(|v| v.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn fast_bpe_matches_tokenizers(t in text()) {
        thread_local! { static PAIRS: Vec<Pair> = pairs(); }
        PAIRS.with(|ps| for p in ps { assert_same(p.name, &p.fast, &p.hf, &t) });
    }
}

#[test]
fn fast_bpe_matches_tokenizers_on_the_corpus() {
    for p in pairs() {
        for t in corpus() {
            assert_same(p.name, &p.fast, &p.hf, &t);
        }
        let long = "clips".repeat(300) + &" ".repeat(200) + &"9".repeat(100) + &"é".repeat(100);
        assert_same(p.name, &p.fast, &p.hf, &long);
        assert_same(p.name, &p.fast, &p.hf, "");
        assert_same(p.name, &p.fast, &p.hf, "<|im_start|><|im_end|><|im<|im_startx");
    }
}

/// Configurations the fast path does not reproduce exactly take the
/// `tokenizers` path, and give its results.
#[test]
fn unsupported_tokenizers_fall_back() {
    let base = tokenizer_json(configs()[0].1.clone(), false);
    type Edit = Box<dyn Fn(&mut Value)>;
    let variants: Vec<(&str, Edit)> = vec![
        ("normalizer", Box::new(|v: &mut Value| v["normalizer"] = json!({"type": "NFC"}))),
        ("lstrip", Box::new(|v: &mut Value| v["added_tokens"][1]["lstrip"] = json!(true))),
        ("single_word", Box::new(|v: &mut Value| v["added_tokens"][0]["single_word"] = json!(true))),
        (
            "prefix space",
            Box::new(|v: &mut Value| {
                v["pre_tokenizer"] =
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
            }),
        ),
        (
            "split regex",
            Box::new(|v: &mut Value| {
                v["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false}, byte_level(false)]})
            }),
        ),
        ("trim offsets", Box::new(|v: &mut Value| v["post_processor"]["trim_offsets"] = json!(true))),
        ("ignore_merges", Box::new(|v: &mut Value| v["model"]["ignore_merges"] = json!(true))),
    ];
    for (name, edit) in variants {
        let mut v = base.clone();
        edit(&mut v);
        let bytes = v.to_string().into_bytes();
        let fast = Encoder::from_bytes(&bytes).expect("loads");
        assert!(fast.fallback_reason().is_some(), "{name}: falls back");
        let hf = Tokenizer::from_bytes(&bytes).expect("tokenizers loads it");
        for t in corpus().iter().take(20).map(String::as_str).chain(["<|im_start|>user\n hi <|im_end|>\n", " 12345 é"])
        {
            assert_same(name, &fast, &hf, t);
        }
    }
}
