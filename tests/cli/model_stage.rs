//! The `model` stage kind: GGUF import (a tiny GGUF written here), hf://
//! through a local hub server (pins: a moved branch makes the stage stale),
//! failure paths, and the real SmolLM2-135M-Instruct GGUF when present
//! (`scripts/fetch-test-assets.sh`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::common::*;
use crate::hub_server::HubServer;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A small deterministic generator (no rand dependency).
struct Lcg(u64);

impl Lcg {
    fn f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// GPT-2's byte -> printable char table.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

/// llama.cpp's q/k permutation (convert_hf_to_gguf.py `permute`).
fn permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let dst = (h * hd + 2 * i + j) * cols;
                let src = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTER: usize = 96;
const LAYERS: usize = 2;

/// The tiny vocabulary: 3 control tokens, 256 byte tokens, 6 merges, one user-defined token.
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    let mut types = vec![3, 3, 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    tokens.push("<tool>".into());
    types.push(4);
    (tokens, types, merges.map(String::from).to_vec())
}

/// Expected HF tensors: name -> (shape, values).
type Expected = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Write a tiny llama GGUF (mixed F32 / F16 / Q8_0 / Q4_0 / Q4_1 tensors).
fn write_tiny_gguf(path: &Path, arch: &str, tied: bool) -> Expected {
    let dev = Device::Cpu;
    let mut rng = Lcg(42);
    let (tokens, types, merges) = tiny_vocab();
    let vocab = tokens.len();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut expected = Expected::new();
    let mut add =
        |gname: &str, hf: &str, shape: &[usize], dt: GgmlDType, hf_values: Vec<f32>, gguf_values: Vec<f32>| {
            let t = Tensor::from_vec(gguf_values, shape, &dev).expect("tensor");
            let q = QTensor::quantize(&t, dt).expect("quantize");
            let values = if dt == GgmlDType::F32 {
                hf_values
            } else {
                q.dequantize(&dev).expect("dequantize").flatten_all().expect("flat").to_vec1::<f32>().expect("vec")
            };
            expected.insert(hf.to_string(), (shape.to_vec(), values));
            tensors.push((gname.to_string(), q));
        };
    macro_rules! plain {
        ($g:expr, $hf:expr, $shape:expr, $dt:expr) => {{
            let shape: &[usize] = $shape;
            let v = rng.vec(shape.iter().product());
            add($g, $hf, shape, $dt, v.clone(), v);
        }};
    }
    plain!("token_embd.weight", "model.embed_tokens.weight", &[vocab, HIDDEN], GgmlDType::F32);
    plain!("output_norm.weight", "model.norm.weight", &[HIDDEN], GgmlDType::F32);
    if !tied {
        plain!("output.weight", "lm_head.weight", &[vocab, HIDDEN], GgmlDType::Q8_0);
    }
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        plain!(&b("attn_norm"), &p("input_layernorm"), &[HIDDEN], GgmlDType::F32);
        let q = rng.vec(HIDDEN * HIDDEN);
        let k = rng.vec(KV_HEADS * HEAD_DIM * HIDDEN);
        add(
            &b("attn_q"),
            &p("self_attn.q_proj"),
            &[HIDDEN, HIDDEN],
            GgmlDType::F32,
            q.clone(),
            permute(&q, HIDDEN, HIDDEN, HEADS),
        );
        let kr = KV_HEADS * HEAD_DIM;
        add(
            &b("attn_k"),
            &p("self_attn.k_proj"),
            &[kr, HIDDEN],
            GgmlDType::F32,
            k.clone(),
            permute(&k, kr, HIDDEN, KV_HEADS),
        );
        plain!(&b("attn_v"), &p("self_attn.v_proj"), &[kr, HIDDEN], GgmlDType::Q8_0);
        plain!(&b("attn_output"), &p("self_attn.o_proj"), &[HIDDEN, HIDDEN], GgmlDType::F16);
        plain!(&b("ffn_norm"), &p("post_attention_layernorm"), &[HIDDEN], GgmlDType::F32);
        plain!(&b("ffn_gate"), &p("mlp.gate_proj"), &[INTER, HIDDEN], GgmlDType::Q4_1);
        plain!(&b("ffn_up"), &p("mlp.up_proj"), &[INTER, HIDDEN], GgmlDType::Q4_0);
        plain!(&b("ffn_down"), &p("mlp.down_proj"), &[HIDDEN, INTER], GgmlDType::Q8_0);
    }
    use gguf_file::Value as V;
    let s = |x: &str| V::String(x.to_string());
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", s(arch)),
        ("general.name", s("tiny")),
        ("llama.context_length", V::U32(256)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(INTER as u32)),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(100000.0)),
        ("llama.rope.dimension_count", V::U32(HEAD_DIM as u32)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        ("tokenizer.ggml.tokens", V::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type", V::Array(types.iter().map(|t| V::I32(*t)).collect())),
        ("tokenizer.ggml.merges", V::Array(merges.iter().map(|m| s(m)).collect())),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.padding_token_id", V::U32(2)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        ("tokenizer.chat_template", s(CHATML)),
    ];
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    if let Some(d) = path.parent() {
        fs_err::create_dir_all(d).expect("mkdir");
    }
    let mut f = fs_err::File::create(path).expect("create gguf");
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
    expected
}

/// Read every tensor of a model folder (single file or shards) as f32.
/// Tensor name -> (shape, values as f32, stored dtype).
type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>, String)>;

fn read_weights(dir: &Path) -> (Weights, Vec<String>) {
    let mut files: Vec<String> = fs_err::read_dir(dir)
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    let mut out = BTreeMap::new();
    for f in &files {
        let bytes = fs_err::read(dir.join(f)).expect("read safetensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        for (name, view) in st.tensors() {
            let d = view.data();
            let (vals, dt): (Vec<f32>, &str) = match view.dtype() {
                safetensors::Dtype::F32 => {
                    (d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(), "F32")
                }
                safetensors::Dtype::BF16 => {
                    (d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(), "BF16")
                }
                safetensors::Dtype::F16 => {
                    (d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(), "F16")
                }
                other => panic!("unexpected dtype {other:?}"),
            };
            out.insert(name, (view.shape().to_vec(), vals, dt.to_string()));
        }
    }
    (out, files)
}

fn read_json(p: PathBuf) -> Value {
    serde_json::from_str(&fs_err::read_to_string(p).expect("read json")).expect("json")
}

fn id_of(tokens: &[String], t: &str) -> u32 {
    tokens.iter().position(|x| x == t).unwrap_or_else(|| panic!("no token {t}")) as u32
}

#[test]
fn tiny_gguf_imports_to_an_hf_folder() {
    let ws = Ws::new();
    let expected = write_tiny_gguf(&ws.path().join("models/tiny.gguf"), "llama", false);
    ws.write(
        "p.yaml",
        "stages:\n  base:\n    kind: model\n    source: models/tiny.gguf\n  half:\n    kind: model\n    source: models/tiny.gguf\n    dtype: bf16\n    max_shard_size: 20KB\n",
    );
    let o = ws.ok(&["run", "p.yaml"]);
    assert_eq!(o.ran(), ["base", "half"]);
    let out = ws.out_path("p.yaml", "base");

    // config.json from the GGUF metadata.
    let cfg = read_json(out.join("config.json"));
    let (tokens, _, _) = tiny_vocab();
    for (k, v) in [
        ("architectures", json!(["LlamaForCausalLM"])),
        ("model_type", json!("llama")),
        ("hidden_size", json!(HIDDEN)),
        ("intermediate_size", json!(INTER)),
        ("num_hidden_layers", json!(LAYERS)),
        ("num_attention_heads", json!(HEADS)),
        ("num_key_value_heads", json!(KV_HEADS)),
        ("head_dim", json!(HEAD_DIM)),
        ("rms_norm_eps", json!(1e-5)),
        ("rope_theta", json!(100000.0)),
        ("vocab_size", json!(tokens.len())),
        ("max_position_embeddings", json!(256)),
        ("tie_word_embeddings", json!(false)),
        ("bos_token_id", json!(1)),
        ("eos_token_id", json!(2)),
        ("torch_dtype", json!("float32")),
    ] {
        assert_eq!(cfg[k], v, "config.json {k}");
    }

    // Weights: every tensor, HF names, values as written (q/k un-permuted).
    let (got, files) = read_weights(&out);
    assert_eq!(files, ["model.safetensors"]);
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (name, (shape, vals)) in &expected {
        let (gs, gv, dt) = &got[name];
        assert_eq!((gs, dt.as_str()), (shape, "F32"), "{name}");
        assert!(gv == vals, "{name}: values differ from what the GGUF holds");
    }
    // Permuting back gives exactly the rows llama.cpp stored.
    let (shape, q, _) = &got["model.layers.1.self_attn.q_proj.weight"];
    assert_ne!(permute(q, shape[0], shape[1], HEADS), *q);
    assert_eq!(unpermute_check(&permute(q, shape[0], shape[1], HEADS), shape[0], shape[1], HEADS), *q);

    // The tokenizer loads in `tokenizers` and encodes as the vocab implies.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("tokenizer.json loads");
    let ids = |s: &str| tok.encode(s, false).expect("encode").get_ids().to_vec();
    let t = |s: &str| id_of(&tokens, s);
    assert_eq!(ids("hello the world"), [t("hello"), t("Ġthe"), t("Ġ"), t("w"), t("o"), t("r"), t("l"), t("d")]);
    assert_eq!(
        ids("<|im_start|>user\nhi 42<tool><|im_end|>"),
        [1, t("u"), t("s"), t("e"), t("r"), t("Ċ"), t("h"), t("i"), t("Ġ"), t("4"), t("2"), t("<tool>"), 2]
    );
    assert_eq!(tok.decode(&ids("hello the world 42"), false).expect("decode"), "hello the world 42");

    let tc = read_json(out.join("tokenizer_config.json"));
    assert_eq!(tc["chat_template"], json!(CHATML));
    assert_eq!((tc["bos_token"].as_str(), tc["eos_token"].as_str()), (Some("<|im_start|>"), Some("<|im_end|>")));
    assert_eq!(tc["added_tokens_decoder"]["2"]["special"], json!(true));
    assert_eq!(tc["added_tokens_decoder"][(tokens.len() - 1).to_string()]["special"], json!(false));
    assert_eq!(tc["model_input_names"], json!(["input_ids", "attention_mask"]));
    let gen = read_json(out.join("generation_config.json"));
    assert_eq!((gen["bos_token_id"].clone(), gen["eos_token_id"].clone()), (json!(1), json!(2)));

    let m = read_json(out.join("model.json"));
    let params: usize = expected.values().map(|(s, _)| s.iter().product::<usize>()).sum();
    assert_eq!((m["format"].as_str(), m["dtype"].as_str()), (Some("gguf"), Some("float32")));
    assert_eq!(m["parameters"], json!(params));
    assert_eq!(m["gguf"]["tensor_types"]["Q4_1"], json!(LAYERS));

    // bf16 + shards: an index covering every tensor, values rounded to bf16.
    let half_out = ws.out_path("p.yaml", "half");
    let (got, files) = read_weights(&half_out);
    assert!(files.len() > 1, "expected shards, got {files:?}");
    let index = read_json(half_out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().expect("weight_map");
    assert_eq!(map.len(), expected.len());
    for (name, (_, vals)) in &expected {
        let (_, gv, dt) = &got[name];
        assert_eq!(dt, "BF16");
        assert!(files.contains(&map[name].as_str().expect("shard").to_string()));
        let want: Vec<f32> = vals.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect();
        assert!(*gv == want, "{name}: bf16 values");
    }
    assert_eq!(read_json(half_out.join("config.json"))["torch_dtype"], json!("bfloat16"));

    // Unchanged: cached. Same bytes in a fresh workspace: same output digest.
    let o = ws.ok(&["run", "p.yaml"]);
    assert_eq!(o.cached(), ["base", "half"]);
    let ws2 = Ws::new();
    write_tiny_gguf(&ws2.path().join("models/tiny.gguf"), "llama", false);
    ws2.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: models/tiny.gguf\n");
    ws2.ok(&["run", "p.yaml"]);
    assert_eq!(
        out.file_name().map(|n| n.to_os_string()),
        ws2.out_path("p.yaml", "base").file_name().map(|n| n.to_os_string()),
        "GGUF import is deterministic"
    );
}

fn unpermute_check(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    pipe_stages::model::unpermute(w, rows, cols, heads)
}

#[test]
fn gguf_from_another_stage_tied_embeddings() {
    let ws = Ws::new();
    let expected = write_tiny_gguf(&ws.path().join("src/tiny.gguf"), "llama", true);
    ws.write(
        "p.yaml",
        "stages:\n  fetch:\n    kind: command\n    cmd: mkdir -p $PIPE_OUT/m && cp src/tiny.gguf $PIPE_OUT/m/\n    deps: [src/tiny.gguf]\n  base:\n    kind: model\n    inputs: {dl: fetch}\n    source: input:dl/m/tiny.gguf\n    dtype: f16\n",
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "base");
    let cfg = read_json(out.join("config.json"));
    assert_eq!((cfg["tie_word_embeddings"].clone(), cfg["torch_dtype"].clone()), (json!(true), json!("float16")));
    let (got, _) = read_weights(&out);
    assert!(!got.contains_key("lm_head.weight"));
    let (_, vals) = &expected["model.layers.0.self_attn.k_proj.weight"];
    let want: Vec<f32> = vals.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
    assert!(got["model.layers.0.self_attn.k_proj.weight"].1 == want);

    // A missing path inside the input fails the stage with a clear message.
    ws.write("p.yaml", &ws.read("p.yaml").replace("input:dl/m/tiny.gguf", "input:dl/m/nope.gguf"));
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("`m/nope.gguf` does not exist in input `dl`"), "{o:?}");
}

/// A tiny HF-format repo: config, one safetensors file, a tokenizer.
fn hf_repo_files(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = Lcg(seed);
    let a: Vec<u8> = rng.vec(8 * 4).iter().flat_map(|x| x.to_le_bytes()).collect();
    let b: Vec<u8> = rng.vec(4).iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        (
            "model.embed_tokens.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 4], &a).expect("view"),
        ),
        (
            "model.norm.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &b).expect("view"),
        ),
    ];
    let st = safetensors::serialize(views, None).expect("serialize");
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}
    });
    let config = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4, "vocab_size": 8, "torch_dtype": "float32", "seed": seed});
    vec![
        ("config.json", serde_json::to_vec_pretty(&config).expect("json")),
        ("model.safetensors", st),
        ("tokenizer.json", serde_json::to_vec(&tokenizer).expect("json")),
        (
            "tokenizer_config.json",
            serde_json::to_vec(&json!({"chat_template": CHATML, "eos_token": "b"})).expect("json"),
        ),
        ("generation_config.json", b"{\"eos_token_id\": 1}\n".to_vec()),
        ("README.md", b"# tiny\n".to_vec()),
    ]
}

fn with_hub(ws: &Ws, hub: &HubServer, home: &Path, args: &[&str]) -> Out {
    ws.cmd(args)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("run pipe")
        .into()
}

#[test]
fn hf_hub_source_pins_the_revision() {
    let hub = HubServer::start();
    let home = tempfile::tempdir().expect("tempdir");
    let files1 = hf_repo_files(1);
    let sha1 = hub.commit("models", "acme/tiny", "main", &files1);
    let ws = Ws::new();
    ws.write(
        "p.yaml",
        &format!(
            "stages:\n  base:\n    kind: model\n    source: hf://acme/tiny\n  pinned:\n    kind: model\n    source: hf://acme/tiny@{sha1}\n  half:\n    kind: model\n    source: hf://acme/tiny@main\n    dtype: f16\n"
        ),
    );
    let o = with_hub(&ws, &hub, home.path(), &["run", "p.yaml"]);
    assert_eq!(o.code, 0, "{o:?}");
    let out = ws.out_path("p.yaml", "base");
    for (name, data) in &files1 {
        if *name == "README.md" {
            assert!(!out.join(name).exists(), "only model files are imported");
        } else {
            assert_eq!(&fs_err::read(out.join(name)).expect("imported file"), data, "{name} copied byte for byte");
        }
    }
    let m = read_json(out.join("model.json"));
    assert_eq!((m["format"].as_str(), m["revision"].as_str()), (Some("hf"), Some(sha1.as_str())));
    assert_eq!(m["parameters"], json!(36));
    // Files were fetched at the resolved commit, never through the branch name.
    let reqs = hub.requests();
    assert!(reqs.iter().any(|r| r == &format!("GET /acme/tiny/resolve/{sha1}/model.safetensors")), "{reqs:?}");
    assert!(!reqs.iter().any(|r| r.contains("/resolve/main/")), "{reqs:?}");
    // dtype conversion of HF weights.
    let half_out = ws.out_path("p.yaml", "half");
    assert_eq!(read_json(half_out.join("config.json"))["torch_dtype"], json!("float16"));
    let (w, _) = read_weights(&half_out);
    assert_eq!(w["model.norm.weight"].2, "F16");

    // Fresh while the branch stays put.
    let st: Value =
        serde_json::from_str(&with_hub(&ws, &hub, home.path(), &["status", "p.yaml", "--json"]).stdout).expect("json");
    assert!(st["stages"].as_array().expect("stages").iter().all(|s| s["state"] == "fresh"), "{st}");

    // The branch moves: `base` and `half` are stale with the revision change; `pinned` is not.
    let sha2 = hub.commit("models", "acme/tiny", "main", &hf_repo_files(2));
    let o = with_hub(&ws, &hub, home.path(), &["status", "p.yaml", "--json"]);
    let st: Value = serde_json::from_str(&o.stdout).expect("json");
    let by: HashMap<String, &Value> = st["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or_default().to_string(), s))
        .collect();
    assert_eq!(by["base"]["state"], "stale", "{st}");
    assert_eq!(by["pinned"]["state"], "fresh", "{st}");
    let reasons = by["base"]["reasons"].to_string();
    assert!(reasons.contains(&format!("hf://acme/tiny@main: {sha1} -> {sha2}")), "{reasons}");
    let text = with_hub(&ws, &hub, home.path(), &["status", "p.yaml"]);
    assert!(text.stdout.contains(&sha2) || text.stderr.contains(&sha2), "{text:?}");

    let o = with_hub(&ws, &hub, home.path(), &["run", "p.yaml"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.ran(), ["base", "half"]);
    assert_eq!(read_json(ws.out_path("p.yaml", "base").join("model.json"))["revision"], json!(sha2));
    assert_eq!(read_json(ws.out_path("p.yaml", "pinned").join("model.json"))["revision"], json!(sha1));

    // An unknown repo fails the stage with the hub's answer and a hint.
    ws.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: hf://acme/nope\n");
    let o = with_hub(&ws, &hub, home.path(), &["run", "p.yaml"]);
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("hf://acme/nope@main") && o.stderr.contains("404"), "{o:?}");
}

#[test]
fn model_failures_are_clear() {
    let ws = Ws::new();
    ws.write("models/x.gguf", "this is a text file, not a model\n");
    ws.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: models/x.gguf\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("models/x.gguf: not a GGUF file (it starts with `this is `"), "{o:?}");
    assert!(o.stderr.contains("hint:"), "{o:?}");

    // Missing source file: named, with its location.
    ws.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: models/missing.gguf\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("models/missing.gguf"), "{o:?}");

    // Unknown field: located, with "did you mean".
    ws.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: models/x.gguf\n    dtyp: f32\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("unknown field `dtyp`") && o.stderr.contains("dtype"), "{o:?}");
    assert!(o.stderr.contains("p.yaml:5:"), "{o:?}");

    // Bad values.
    for (bad, what) in [("    dtype: f64\n", "f64"), ("    max_shard_size: lots\n", "max_shard_size")] {
        ws.write("p.yaml", &format!("stages:\n  base:\n    kind: model\n    source: models/x.gguf\n{bad}"));
        let o = ws.pipe(&["run", "p.yaml"]);
        assert_eq!(o.code, 2, "{o:?}");
        assert!(o.stderr.contains(what), "{o:?}");
    }
    for (src, what) in [
        ("hf://just-a-name", "ORG/NAME"),
        ("../outside.gguf", "not a path inside the workspace"),
        ("s3://b/k", "unsupported URL scheme"),
    ] {
        ws.write("p.yaml", &format!("stages:\n  base:\n    kind: model\n    source: {src}\n"));
        let o = ws.pipe(&["run", "p.yaml"]);
        assert_eq!(o.code, 2, "{o:?}");
        assert!(o.stderr.contains(what), "{src}: {o:?}");
    }

    // A GGUF of another architecture.
    write_tiny_gguf(&ws.path().join("models/q.gguf"), "qwen3moe", false);
    ws.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: models/q.gguf\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("models/q.gguf: unsupported architecture `qwen3moe`"), "{o:?}");

    // An HF folder with only PyTorch weights.
    let tokenizer = hf_repo_files(1).into_iter().find(|(n, _)| *n == "tokenizer.json").expect("tokenizer").1;
    ws.write("hf/config.json", "{}");
    ws.write("hf/tokenizer.json", std::str::from_utf8(&tokenizer).expect("utf8"));
    ws.write("hf/pytorch_model.bin", "x");
    ws.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: hf\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("hf: no model.safetensors") && o.stderr.contains("only PyTorch .bin weights"), "{o:?}");
}

// ---- the real model ----------------------------------------------------

/// An independent byte-level BPE over the GGUF's own vocabulary and merges,
/// with the SmolLM pre-tokenizer (llama.cpp: `\p{N}` then GPT-2's regex)
/// written out by hand: what "the GGUF's vocab implies".
struct RefBpe {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    /// Control and user-defined tokens, longest first.
    specials: Vec<(String, u32)>,
    bytes: Vec<char>,
}

impl RefBpe {
    fn from_gguf(path: &Path) -> RefBpe {
        let mut f = fs_err::File::open(path).expect("open gguf");
        let c = gguf_file::Content::read(&mut f).expect("read gguf");
        let strs = |k: &str| -> Vec<String> {
            c.metadata[k].to_vec().expect("array").iter().map(|v| v.to_string().expect("string").clone()).collect()
        };
        let tokens = strs("tokenizer.ggml.tokens");
        let merges = strs("tokenizer.ggml.merges");
        let types: Vec<i32> = c.metadata["tokenizer.ggml.token_type"]
            .to_vec()
            .expect("array")
            .iter()
            .map(|v| v.to_i32().expect("i32"))
            .collect();
        let vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let ranks = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (a, b) = m.split_once(' ').expect("merge");
                ((a.to_string(), b.to_string()), i)
            })
            .collect();
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, t))| **t == 3 || **t == 4)
            .map(|(i, (s, _))| (s.clone(), i as u32))
            .collect();
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        RefBpe { vocab, ranks, specials, bytes: byte_chars() }
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        let mut plain = String::new();
        while !rest.is_empty() {
            if let Some((s, id)) = self.specials.iter().find(|(s, _)| rest.starts_with(s.as_str())) {
                self.encode_plain(&plain, &mut ids);
                plain.clear();
                ids.push(*id);
                rest = &rest[s.len()..];
            } else {
                let c = rest.chars().next().expect("non-empty");
                plain.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        self.encode_plain(&plain, &mut ids);
        ids
    }

    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        // Digits one by one, the runs between them through GPT-2's regex.
        let mut run = String::new();
        for c in text.chars() {
            if c.is_numeric() {
                for p in gpt2_split(&run) {
                    self.bpe(p, ids);
                }
                run.clear();
                self.bpe(&c.to_string(), ids);
            } else {
                run.push(c);
            }
        }
        for p in gpt2_split(&run) {
            self.bpe(p, ids);
        }
    }

    fn bpe(&self, piece: &str, ids: &mut Vec<u32>) {
        let mut syms: Vec<String> = piece.bytes().map(|b| self.bytes[b as usize].to_string()).collect();
        loop {
            let best = (0..syms.len().saturating_sub(1))
                .filter_map(|i| self.ranks.get(&(syms[i].clone(), syms[i + 1].clone())).map(|r| (*r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", syms[i], syms[i + 1]);
            syms.splice(i..i + 2, [merged]);
        }
        for s in syms {
            ids.push(*self.vocab.get(&s).unwrap_or_else(|| panic!("symbol {s:?} not in vocab")));
        }
    }
}

/// GPT-2's pre-tokenizer regex, by hand:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
fn gpt2_split(s: &str) -> Vec<&str> {
    let cs: Vec<(usize, char)> = s.char_indices().collect();
    let n = cs.len();
    let at = |i: usize| if i < n { cs[i].0 } else { s.len() };
    let letter = |c: char| c.is_alphabetic();
    let number = |c: char| c.is_numeric();
    let other = |c: char| !c.is_whitespace() && !letter(c) && !number(c);
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let c = cs[i].1;
        if c == '\'' {
            let tail = &s[at(i + 1)..];
            if let Some(suf) = ["s", "t", "re", "ve", "m", "ll", "d"].iter().find(|x| tail.starts_with(**x)) {
                let j = i + 1 + suf.len();
                out.push(&s[at(i)..at(j)]);
                i = j;
                continue;
            }
        }
        let j = if c == ' ' { i + 1 } else { i };
        if j < n {
            let d = cs[j].1;
            let class: Option<&dyn Fn(char) -> bool> = if letter(d) {
                Some(&letter)
            } else if number(d) {
                Some(&number)
            } else if other(d) {
                Some(&other)
            } else {
                None
            };
            if let Some(class) = class {
                let mut k = j;
                while k < n && class(cs[k].1) {
                    k += 1;
                }
                out.push(&s[at(i)..at(k)]);
                i = k;
                continue;
            }
        }
        // Whitespace: a run, leaving its last char to the next token when one follows.
        let mut k = i;
        while k < n && cs[k].1.is_whitespace() {
            k += 1;
        }
        let end = if k < n && k - i >= 2 { k - 1 } else { k.max(i + 1) };
        out.push(&s[at(i)..at(end)]);
        i = end;
    }
    out
}

/// GSM8K-like text: numbers, money, percentages, contractions, punctuation,
/// newlines and runs of spaces, a little non-ASCII.
fn sample_texts() -> Vec<String> {
    let names =
        ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Randy", "José", "Zoë"];
    let items = ["clips", "dollars", "pages", "eggs", "cupcakes", "marbles", "apples", "books", "hours", "miles"];
    let mut out = Vec::new();
    let mut r = Lcg(7);
    let mut n = |m: u32| ((r.f32() + 1.0) * 0.5 * m as f32) as u32 + 1;
    for i in 0..300 {
        let (a, b, c) = (n(90), n(12), n(2000));
        let who = names[i % names.len()];
        let what = items[(i / 3) % items.len()];
        let s = match i % 10 {
            0 => format!("{who} sold {what} to {a} of her friends in April, and then she sold half as many {what} in May. How many {what} did {who} sell altogether in April and May?"),
            1 => format!("{who} earns ${b} an hour for babysitting. Yesterday, she just did {a} minutes of babysitting. How much did she earn?"),
            2 => format!("{who} is saving money for a new wallet which costs ${c}.{b:02}. She has only 50% of the money she needs; her parents decided to give her $15."),
            3 => format!("Question: {who} can read {a} pages per hour... If {who}'s book has {c} pages, how long (in hours) will it take?\nAnswer: {c} / {a} = {}", c / a),
            4 => format!("{who} doesn't like {what}; she'll trade them — {a}×{b} = {} — for ‘nice’ things 🙂", a * b),
            5 => format!("  Step {b}:\tmultiply {a} by {b}\n\n  then add {c}.   Done!!  "),
            6 => format!("def f(x):\n    return x * {a} + {b}  # {what}\n"),
            7 => format!("{who} has {a} {what}. They've got {b} more than Ken, who'd had 1,{c:03} before; we're told it's 3.5x."),
            8 => format!("#### {}\n    >>> f({a}, -{b})\n    {c}.{b:02} -{a}\n", a + b + c),
            _ => format!("In {} years, {who} will be {a} years old; {}% of {c} is {}.", b, b * 5, c * b * 5 / 100),
        };
        out.push(s);
    }
    out
}

fn chatml(turns: &[(&str, &str)], gen: bool) -> String {
    let mut s = String::new();
    for (role, content) in turns {
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if gen {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

#[test]
fn real_smollm2_gguf_acceptance() {
    let dir = std::env::var("PIPE_TEST_ASSETS").unwrap_or_else(|_| "/var/tmp/pipe-assets".into());
    let src = Path::new(&dir).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !src.exists() {
        eprintln!("note: skipping the real-model test: {} is absent (run scripts/fetch-test-assets.sh)", src.display());
        return;
    }
    let ws = Ws::new();
    let dst = ws.path().join("models/smollm2.gguf");
    fs_err::create_dir_all(dst.parent().expect("dir")).expect("mkdir");
    if std::fs::hard_link(&src, &dst).is_err() {
        fs_err::copy(&src, &dst).expect("copy gguf");
    }
    ws.write("p.yaml", "stages:\n  base:\n    kind: model\n    source: models/smollm2.gguf\n");
    let t = std::time::Instant::now();
    ws.ok(&["run", "p.yaml"]);
    eprintln!("SmolLM2-135M-Instruct Q4_1 import: {:.1}s", t.elapsed().as_secs_f64());
    let out = ws.out_path("p.yaml", "base");

    let cfg = read_json(out.join("config.json"));
    for (k, v) in [
        ("num_hidden_layers", json!(30)),
        ("hidden_size", json!(576)),
        ("intermediate_size", json!(1536)),
        ("num_attention_heads", json!(9)),
        ("num_key_value_heads", json!(3)),
        ("vocab_size", json!(49152)),
        ("tie_word_embeddings", json!(true)),
        ("bos_token_id", json!(1)),
        ("eos_token_id", json!(2)),
    ] {
        assert_eq!(cfg[k], v, "config.json {k}: {cfg}");
    }
    let (w, files) = read_weights(&out);
    assert_eq!(files, ["model.safetensors"]);
    assert_eq!(w.len(), 2 + 30 * 9);
    assert_eq!(w["model.embed_tokens.weight"].0, [49152, 576]);
    let m = read_json(out.join("model.json"));
    let params = m["parameters"].as_u64().expect("parameters");
    assert!((130_000_000..140_000_000).contains(&params), "{m}");

    let tc = read_json(out.join("tokenizer_config.json"));
    let template = tc["chat_template"].as_str().expect("chat_template");
    assert!(template.contains("<|im_start|>"), "{template}");

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("tokenizer.json loads");
    let reference = RefBpe::from_gguf(&src);
    let mut texts = sample_texts();
    let convo = [
        ("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        ("user", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?"),
        ("assistant", "In May she sold 48 / 2 = 24 clips.\nAltogether: 48 + 24 = 72.\n#### 72"),
    ];
    texts.push(chatml(&convo, false));
    texts.push(chatml(&convo[..2], true));
    let mut same = 0;
    let mut first_diff = None;
    for t in &texts {
        let ours = tok.encode(t.as_str(), false).expect("encode").get_ids().to_vec();
        let want = reference.encode(t);
        if ours == want {
            same += 1;
        } else if first_diff.is_none() {
            first_diff = Some(format!("{t:?}\n ours {ours:?}\n want {want:?}"));
        }
        assert_eq!(tok.decode(&ours, false).expect("decode"), *t, "decode round trip");
    }
    eprintln!("tokenizer.json vs the GGUF vocabulary: {same}/{} texts identical", texts.len());
    // `pack`'s fast byte-level BPE takes this tokenizer and gives the same ids.
    let fast = pipe_stages::bpe::Encoder::from_file(&out.join("tokenizer.json")).expect("loads");
    assert_eq!(fast.fallback_reason(), None, "SmolLM2's tokenizer.json takes the fast path");
    for t in &texts {
        let mut ids = Vec::new();
        fast.encode(t, &mut ids, None).expect("encode");
        assert_eq!(ids, tok.encode(t.as_str(), false).expect("encode").get_ids(), "fast path on {t:?}");
    }
    assert_eq!(same, texts.len(), "first difference: {}", first_diff.unwrap_or_default());
    // The rendered conversation starts with <|im_start|> = bos and has its ids.
    let ids = tok.encode(texts[texts.len() - 2].as_str(), false).expect("encode").get_ids().to_vec();
    assert_eq!((ids[0], ids.iter().filter(|i| **i == 2).count()), (1, 3));
}
