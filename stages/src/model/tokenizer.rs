//! GGUF vocabulary -> `tokenizer.json` + `tokenizer_config.json`.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: GPT-2,
//! SmolLM, Llama 3, Qwen 2, StarCoder, ...) are rebuilt. The pre-tokenizer
//! follows `tokenizer.ggml.pre`, mirroring the regexes llama.cpp uses for each
//! pre-tokenizer name (llama.cpp's `llama-vocab.cpp`), written the way the
//! original Hugging Face `tokenizer.json` files write them.
//!
//! Token types (`tokenizer.ggml.token_type`): 1 normal, 2 unknown, 3 control,
//! 4 user-defined, 5 unused, 6 byte. Control and user-defined tokens become
//! added tokens (control ones `special`); llama.cpp's converter stores them as
//! raw text, the rest of the vocabulary in byte-level form.

use serde_json::{json, Map, Value as Json};

use super::gguf::Meta;
use pipe_engine::stage::StageFailure;

const GPT2_REGEX_NOTE: &str = "ByteLevel(use_regex=true)";

/// Llama 3's split regex (also Falcon 3, ...).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split regex (single digits).
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a GGUF `tokenizer.ggml.pre` maps onto `tokenizers` components.
struct PreTok {
    normalizer: Json,
    pre_tokenizer: Json,
    ignore_merges: bool,
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// Supported `tokenizer.ggml.pre` values, for the error hint.
pub const SUPPORTED_PRE: &str = "gpt2, smollm, starcoder, refact, codeshell, llama3 (llama-bpe), qwen2";

fn pre_tokenizer(pre: &str) -> Option<PreTok> {
    let none = Json::Null;
    Some(match pre {
        // GPT-2's regex, which ByteLevel applies itself.
        "gpt2" | "gpt-2" | "default" => {
            PreTok { normalizer: none, pre_tokenizer: byte_level(true), ignore_merges: false }
        }
        // llama.cpp: "\p{N}" then the GPT-2 regex = HF's Digits(individual) + ByteLevel.
        "smollm" | "starcoder" | "refact" | "codeshell" => PreTok {
            normalizer: none,
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            ignore_merges: false,
        },
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" => PreTok {
            normalizer: none,
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}),
            ignore_merges: true,
        },
        "qwen2" | "deepseek-r1-qwen" => PreTok {
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
            ignore_merges: false,
        },
        _ => return None,
    })
}

const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer files of a GGUF, as JSON values, plus what `config.json`
/// and `generation_config.json` need.
pub struct TokenizerFiles {
    pub tokenizer_json: Json,
    pub tokenizer_config: Json,
    pub bos_id: Option<u64>,
    pub eos_id: Option<u64>,
    pub pad_id: Option<u64>,
    /// eos plus end-of-turn ids, for `generation_config.json`.
    pub eos_ids: Vec<u64>,
    pub vocab_len: usize,
    /// Notes for the stage log (e.g. a missing pre-tokenizer name).
    pub notes: Vec<String>,
}

pub fn build(meta: &Meta, context_length: Option<u64>) -> Result<TokenizerFiles, StageFailure> {
    let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| meta.missing("tokenizer.ggml.model"))?;
    if model != "gpt2" {
        return Err(StageFailure::new(format!(
            "{}: tokenizer type `{model}` (tokenizer.ggml.model) is not supported",
            meta.file
        ))
        .hint("pipe rebuilds byte-level BPE vocabularies (`gpt2`: GPT-2, SmolLM, Llama 3, Qwen 2); for SentencePiece models import the Hugging Face folder or hf:// repo instead"));
    }
    let mut notes = Vec::new();
    let pre_name = match meta.string("tokenizer.ggml.pre")? {
        Some(p) => p,
        None => {
            notes.push(format!(
                "warning: {} has no tokenizer.ggml.pre; assuming GPT-2's pre-tokenizer ({GPT2_REGEX_NOTE})",
                meta.file
            ));
            "default".to_string()
        }
    };
    let pre = pre_tokenizer(&pre_name).ok_or_else(|| {
        StageFailure::new(format!("{}: pre-tokenizer `{pre_name}` (tokenizer.ggml.pre) is not supported", meta.file))
            .hint(format!(
            "supported: {SUPPORTED_PRE}; or import the model's Hugging Face folder, which carries its tokenizer.json"
        ))
    })?;

    let tokens = meta.str_array("tokenizer.ggml.tokens")?.ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
    let merges = meta.str_array("tokenizer.ggml.merges")?.ok_or_else(|| meta.missing("tokenizer.ggml.merges"))?;
    let types = meta.int_array("tokenizer.ggml.token_type")?.unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(StageFailure::new(format!(
            "{}: tokenizer.ggml.token_type has {} entries for {} tokens",
            meta.file,
            types.len(),
            tokens.len()
        ))
        .hint("the GGUF's vocabulary is inconsistent; re-convert it with llama.cpp's convert_hf_to_gguf.py"));
    }
    let id = |key: &str| -> Result<Option<u64>, StageFailure> {
        let v = meta.uint(key)?;
        if let Some(i) = v {
            if i as usize >= tokens.len() {
                return Err(StageFailure::new(format!(
                    "{}: {key} = {i} is outside the vocabulary ({} tokens)",
                    meta.file,
                    tokens.len()
                )));
            }
        }
        Ok(v)
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let pad = id("tokenizer.ggml.padding_token_id")?;
    let eot = id("tokenizer.ggml.eot_token_id")?;
    let eom = id("tokenizer.ggml.eom_token_id")?;
    let add_bos = meta.boolean("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = meta.boolean("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let chat_template = meta.string("tokenizer.chat_template")?;

    let named: Vec<u64> = [bos, eos, unk, pad, eot, eom].into_iter().flatten().collect();
    let mut vocab = Map::new();
    let mut duplicates = 0usize;
    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (i, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.clone(), json!(i)).is_some() {
            duplicates += 1;
        }
        let special = ty == TYPE_CONTROL || named.contains(&(i as u64));
        if ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED || special {
            added.push(json!({
                "id": i, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": special,
            }));
            added_decoder.insert(
                i.to_string(),
                json!({"content": tok, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": special}),
            );
        }
    }
    if duplicates > 0 {
        notes.push(format!("warning: {duplicates} duplicate token strings in the GGUF vocabulary; the first id wins"));
    }
    // Byte-level pieces never hold a space, so the compact "a b" merge form is
    // exact and readable by every `tokenizers` version; fall back to pairs.
    let mut split_merges = Vec::with_capacity(merges.len());
    for (n, m) in merges.iter().enumerate() {
        // As llama.cpp: the separator is the first space after the first character.
        let at = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
        let (a, b) = at.map(|i| (&m[..i], &m[i + 1..])).filter(|(_, b)| !b.is_empty()).ok_or_else(|| {
            StageFailure::new(format!("{}: merge #{n} `{m}` is not two pieces separated by a space", meta.file))
                .hint("the GGUF's tokenizer.ggml.merges is malformed; re-convert the model")
        })?;
        split_merges.push((a, b));
    }
    let pairs = split_merges.iter().any(|(a, b)| a.contains(' ') || b.contains(' '));
    let merge_json: Vec<Json> =
        merges.iter().zip(&split_merges).map(|(m, (a, b))| if pairs { json!([a, b]) } else { json!(m) }).collect();

    let tok = |i: Option<u64>| i.map(|i| tokens[i as usize].clone());
    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Map::new();
        let mut sp = |i: u64, list: &mut Vec<Json>, type_id: u32| {
            let t = &tokens[i as usize];
            list.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
            specials.insert(t.clone(), json!({"id": t, "ids": [i], "tokens": [t]}));
        };
        for (list, seqs) in [(&mut single, vec![("A", 0u32)]), (&mut pair, vec![("A", 0), ("B", 1)])] {
            for (s, type_id) in seqs {
                if let (true, Some(b)) = (add_bos, bos) {
                    sp(b, list, type_id);
                }
                list.push(json!({"Sequence": {"id": s, "type_id": type_id}}));
                if let (true, Some(e)) = (add_eos, eos) {
                    sp(e, list, type_id);
                }
            }
        }
        json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        ]})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": pre.normalizer,
        "pre_tokenizer": pre.pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": tok(unk),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab,
            "merges": merge_json,
        },
    });

    let mut cfg = Map::new();
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("added_tokens_decoder".into(), Json::Object(added_decoder));
    cfg.insert("bos_token".into(), json!(tok(bos)));
    cfg.insert("eos_token".into(), json!(tok(eos)));
    cfg.insert("pad_token".into(), json!(tok(pad)));
    cfg.insert("unk_token".into(), json!(tok(unk)));
    if let Some(t) = chat_template {
        cfg.insert("chat_template".into(), json!(t));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    // Without it `transformers` also returns token_type_ids, which
    // `model.generate(**tokenizer(...))` rejects for Llama models.
    cfg.insert("model_input_names".into(), json!(["input_ids", "attention_mask"]));
    if let Some(n) = context_length {
        cfg.insert("model_max_length".into(), json!(n));
    }
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));

    let mut eos_ids: Vec<u64> = Vec::new();
    for i in [eos, eot, eom].into_iter().flatten() {
        if !eos_ids.contains(&i) {
            eos_ids.push(i);
        }
    }

    let files = TokenizerFiles {
        tokenizer_json,
        tokenizer_config: Json::Object(cfg),
        bos_id: bos,
        eos_id: eos,
        pad_id: pad,
        eos_ids,
        vocab_len: tokens.len(),
        notes,
    };
    // Prove the file loads before we publish it.
    let text = serde_json::to_string(&files.tokenizer_json).map_err(|e| StageFailure::new(e.to_string()))?;
    text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        StageFailure::new(format!("{}: the tokenizer.json rebuilt from the vocabulary does not load: {e}", meta.file))
            .hint("this is a bug in pipe's GGUF import; please report it with the GGUF's tokenizer.ggml.* metadata")
    })?;
    Ok(files)
}
