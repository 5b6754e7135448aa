//! `train`: LoRA / full fine-tuning of a tiny random Llama through the CLI,
//! PEFT adapter layout, resume after a kill, parameter errors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pipe_stages::nn::llama::{Fwd, Llama, TrainSpec};

use crate::common::{wait_for, Out, Ws};
use crate::pack::write_byte_model;

/// A tiny random Llama (byte-level vocab of `write_byte_model`: 258 tokens).
pub fn write_tiny_llama(ws: &Ws, dir: &str, tied: bool) {
    write_byte_model(ws, dir);
    let (d, f, layers, heads, kv, vocab) = (32usize, 64usize, 2usize, 4usize, 2usize, 258usize);
    let hd = d / heads;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied,
        "max_position_embeddings": 512, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": null, "eos_token_id": 257
    });
    ws.write(&format!("{dir}/config.json"), &cfg.to_string());
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |shape: &[usize], scale: f32, center: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                center + scale * ((state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0)
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rnd(&[vocab, d], 0.5, 0.0));
    if !tied {
        t.insert("lm_head.weight".into(), rnd(&[vocab, d], 0.2, 0.0));
    }
    t.insert("model.norm.weight".into(), rnd(&[d], 0.1, 1.0));
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), rnd(&[d], 0.1, 1.0));
        t.insert(format!("{p}.post_attention_layernorm.weight"), rnd(&[d], 0.1, 1.0));
        for (m, o, i_) in [("q_proj", heads * hd, d), ("k_proj", kv * hd, d), ("v_proj", kv * hd, d), ("o_proj", d, d)]
        {
            t.insert(format!("{p}.self_attn.{m}.weight"), rnd(&[o, i_], 0.2, 0.0));
        }
        for (m, o, i_) in [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)] {
            t.insert(format!("{p}.mlp.{m}.weight"), rnd(&[o, i_], 0.2, 0.0));
        }
    }
    candle_core::safetensors::save(&t, ws.path().join(dir).join("model.safetensors")).unwrap();
}

fn pipeline(train: &str) -> String {
    format!(
        "stages:\n  base:\n    kind: command\n    deps: [model]\n    cmd: cp model/* $PIPE_OUT/\n  ds: {{kind: dataset, source: data/d.jsonl}}\n  chat:\n    kind: messages\n    inputs: {{data: ds}}\n    user: \"{{{{ q }}}}\"\n    assistant: \"{{{{ a }}}}\"\n  pack:\n    kind: pack\n    inputs: {{data: chat, model: base}}\n    max_seq_length: 64\n  sft:\n    kind: train\n    inputs: {{model: base, data: pack}}\n{train}"
    )
}

fn setup(ws: &Ws, tied: bool, train: &str) {
    write_tiny_llama(ws, "model", tied);
    let rows = [("2+2?", "4"), ("3*3?", "9"), ("10-7?", "3"), ("1+5?", "6")];
    let data: String = rows.iter().map(|(q, a)| format!("{{\"q\": \"{q}\", \"a\": \"{a}\"}}\n")).collect();
    ws.write("data/d.jsonl", &data);
    ws.write("p.yaml", &pipeline(train));
}

/// `train.json` of a train stage output.
fn train_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&fs_err::read_to_string(dir.join("train.json")).unwrap()).unwrap()
}

/// Every log of the `sft` stage, concatenated.
fn sft_logs(ws: &Ws) -> String {
    let logs = ws.path().join(".pipe/logs/sft");
    fs_err::read_dir(&logs).unwrap().flatten().map(|e| fs_err::read_to_string(e.path()).unwrap()).collect()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    fs_err::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn lora_overfits_and_writes_a_peft_adapter() {
    let ws = Ws::new();
    setup(
        &ws,
        true,
        "    method: lora\n    lora: {r: 8, alpha: 16, target: all-linear, modules_to_save: [lm_head]}\n    learning_rate: 0.01\n    lr_scheduler: constant\n    per_device_batch_size: 4\n    max_steps: 60\n    logging_steps: 5\n",
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "sft");
    let m = metrics(&out);
    assert_eq!(m.len(), 12);
    assert_eq!(m.last().unwrap()["step"], 60);
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), m.last().unwrap()["loss"].as_f64().unwrap());
    assert!(last < 0.1 * first && last < 0.3, "loss {first} -> {last}");
    let cfg: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["lm_head"]));
    let t = tensors(&out.join("adapter_model.safetensors"));
    assert_eq!(t.len(), 2 * 7 * 2 + 1, "{:?}", t.keys());
    assert_eq!(t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dims(), &[8, 32]);
    assert_eq!(t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].dims(), &[32, 8]);
    assert_eq!(t["base_model.model.lm_head.weight"].dims(), &[258, 32]);
    assert!(out.join("tokenizer.json").exists() && out.join("train.json").exists());
    assert!(fs_err::read(out.join("loss.png")).unwrap().starts_with(b"\x89PNG"));
    let events: Vec<_> = fs_err::read_dir(out.join("tensorboard")).unwrap().flatten().collect();
    assert_eq!(events.len(), 1);
    assert!(events[0].file_name().to_string_lossy().starts_with("events.out.tfevents."));
    // The adapter loads back on the base (as PEFT would) and carries the fit.
    let base_dir = ws.out_path("p.yaml", "base");
    let rows = pipe_stages::train::read_pack(&ws.out_path("p.yaml", "pack").join("data.parquet")).unwrap();
    let loss = |m: &Llama| -> f64 {
        let b = m.batch(&rows).unwrap();
        let l = m.loss_sum(&b, Fwd::EVAL).unwrap().to_scalar::<f32>().unwrap() as f64;
        l / b.n_targets as f64
    };
    let tuned = Llama::load_peft(&base_dir, &out, DType::F32, &Device::Cpu).unwrap();
    let base = Llama::load(&base_dir, DType::F32, &Device::Cpu, &TrainSpec::default()).unwrap();
    let (lt, lb) = (loss(&tuned), loss(&base));
    assert!((lt - last).abs() < 0.05 && lb > 5.0 * lt, "tuned {lt} (train {last}), base {lb}");
    let shown = ws.ok(&["show", "p.yaml", "sft"]);
    assert!(shown.stdout.contains("\"final_loss\"") && shown.stdout.contains("\"trainable_parameters\""), "{shown:?}");
    // Nothing changed: cached.
    let again = ws.ok(&["run", "p.yaml"]);
    assert!(again.ran().is_empty(), "{again:?}");
}

#[test]
fn eval_input_measures_loss_before_during_and_after() {
    let ws = Ws::new();
    let train = "    method: lora\n    lora: {r: 8, alpha: 16}\n    learning_rate: 0.01\n    lr_scheduler: constant\n    per_device_batch_size: 4\n    max_steps: 40\n    logging_steps: 10\n    eval_steps: 20\n";
    setup(&ws, true, train);
    ws.write("p.yaml", &pipeline(train).replace("{model: base, data: pack}", "{model: base, data: pack, eval: pack}"));
    let run = ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "sft");
    let m = metrics(&out);
    let evals: Vec<(u64, f64)> =
        m.iter().filter_map(|r| Some((r["step"].as_u64()?, r.get("eval/loss")?.as_f64()?))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 20, 40], "{m:?}");
    let info: serde_json::Value = train_json(&out);
    assert_eq!(info["eval_loss_before"].as_f64(), Some(evals[0].1));
    assert_eq!(info["eval_loss_after"].as_f64(), Some(evals[2].1));
    // The eval loss is the adapter's real loss on those rows, before and after.
    let base_dir = ws.out_path("p.yaml", "base");
    let rows = pipe_stages::train::read_pack(&ws.out_path("p.yaml", "pack").join("data.parquet")).unwrap();
    assert_eq!(info["eval_rows"], rows.len());
    let loss = |m: &Llama| -> f64 {
        let b = m.batch(&rows).unwrap();
        m.loss_sum(&b, Fwd::EVAL).unwrap().to_scalar::<f32>().unwrap() as f64 / b.n_targets as f64
    };
    let tuned = Llama::load_peft(&base_dir, &out, DType::F32, &Device::Cpu).unwrap();
    let base = Llama::load(&base_dir, DType::F32, &Device::Cpu, &TrainSpec::default()).unwrap();
    assert!((loss(&base) - evals[0].1).abs() < 1e-3, "{} vs {}", loss(&base), evals[0].1);
    assert!((loss(&tuned) - evals[2].1).abs() < 1e-3, "{} vs {}", loss(&tuned), evals[2].1);
    assert!(evals[2].1 < 0.5 * evals[0].1, "{evals:?}");
    // `pipe run` prints the summary; `pipe show` too.
    assert!(run.stdout.contains("eval loss") && run.stdout.contains("tok/s"), "{run:?}");
    let shown = ws.ok(&["show", "p.yaml", "sft"]);
    assert!(shown.stdout.contains("before -> after training"), "{shown:?}");

    // eval_steps without an eval input.
    ws.write("p.yaml", &pipeline(train));
    let bad = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("no `eval` input") && bad.stderr.contains("eval: PACK_STAGE"), "{bad:?}");
}

#[test]
fn train_profile_logs_where_the_step_time_goes() {
    let ws = Ws::new();
    setup(&ws, true, "    method: lora\n    max_steps: 3\n    per_device_batch_size: 2\n");
    let out = ws.cmd(&["run", "p.yaml"]).env("PIPE_TRAIN_PROFILE", "1").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = sft_logs(&ws);
    assert!(log.contains("profile: batches ") && log.contains("forward+backward "), "{log}");
}

#[test]
fn full_finetune_writes_an_hf_folder() {
    let ws = Ws::new();
    setup(
        &ws,
        false,
        "    method: full\n    learning_rate: 0.003\n    lr_scheduler: cosine\n    warmup_ratio: 0.1\n    per_device_batch_size: 2\n    gradient_accumulation_steps: 2\n    num_epochs: 40\n    gradient_checkpointing: true\n    weight_decay: 0.01\n",
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "sft");
    let m = metrics(&out);
    assert_eq!(m.len(), 40, "4 rows / (2 x 2) = 1 step per epoch");
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), m.last().unwrap()["loss"].as_f64().unwrap());
    assert!(last < 0.2 * first, "loss {first} -> {last}");
    assert!(m[0]["lr"].as_f64().unwrap() == 0.0 && m[4]["lr"].as_f64().unwrap() > 0.0029, "warmup then cosine");
    let t = tensors(&out.join("model.safetensors"));
    let base = tensors(&ws.out_path("p.yaml", "base").join("model.safetensors"));
    assert_eq!(t.len(), base.len());
    for (name, w) in &base {
        let d = (&t[name] - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0, "{name} did not change");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["hidden_size"], 32);
}

/// Starts `pipe run PIPELINE`, kills it once a training checkpoint exists,
/// and returns the resume folder.
fn kill_after_first_checkpoint(ws: &Ws, pipeline: &str) -> std::path::PathBuf {
    let mut child = ws.cmd(&["run", pipeline]).spawn().unwrap();
    let resume = ws.path().join(".pipe/resume");
    wait_for(120, "a checkpoint", || {
        fs_err::read_dir(&resume)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("checkpoint/state.json").exists())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    resume
}

#[test]
fn a_killed_run_resumes_to_identical_weights() {
    let train = "    method: lora\n    lora: {r: 4, alpha: 8, dropout: 0.1}\n    learning_rate: 0.005\n    per_device_batch_size: 1\n    gradient_accumulation_steps: 2\n    max_steps: 300\n    checkpoint_every: 10\n";
    let ws = Ws::new();
    let with_eval = pipeline(train).replace("{model: base, data: pack}", "{model: base, data: pack, eval: pack}");
    setup(&ws, true, train);
    ws.write("p.yaml", &with_eval);
    let resume = kill_after_first_checkpoint(&ws, "p.yaml");
    let st = ws.status_json("p.yaml");
    let sft = st["stages"].as_array().unwrap().iter().find(|s| s["name"] == "sft").unwrap().clone();
    assert_ne!(sft["state"], "fresh");
    assert!(sft["reasons"].to_string().contains("left a checkpoint (step "), "{sft}");
    let resumed = ws.ok(&["run", "p.yaml"]);
    assert_eq!(resumed.ran(), vec!["sft".to_string()], "{resumed:?}");
    assert!(resumed.stdout.contains("resumed at step") && resumed.stdout.contains("eval loss"), "{resumed:?}");
    let log = sft_logs(&ws);
    assert!(log.contains("resumed from the checkpoint at step"), "{log}");
    assert!(
        !resume.exists() || fs_err::read_dir(&resume).unwrap().next().is_none(),
        "resume state is removed once published"
    );

    let fresh = Ws::new();
    setup(&fresh, true, train);
    fresh.write("p.yaml", &with_eval);
    fresh.ok(&["run", "p.yaml"]);
    let a = fs_err::read(ws.out_path("p.yaml", "sft").join("adapter_model.safetensors")).unwrap();
    let b = fs_err::read(fresh.out_path("p.yaml", "sft").join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed and uninterrupted runs differ");
    let m = metrics(&ws.out_path("p.yaml", "sft"));
    assert_eq!(m.iter().filter(|r| r.get("loss").is_some()).count(), 300);
    assert_eq!(m.iter().filter(|r| r.get("eval/loss").is_some()).count(), 2);
    // The eval loss before training was measured by the interrupted run.
    let info = |w: &Ws| -> serde_json::Value { train_json(&w.out_path("p.yaml", "sft")) };
    let (r, f) = (info(&ws), info(&fresh));
    assert!(r["eval_loss_before"].is_f64() && r["resumed_at_step"].as_u64() > Some(0), "{r}");
    assert_eq!(r["eval_loss_before"], f["eval_loss_before"]);
    assert_eq!(r["eval_loss_after"], f["eval_loss_after"]);
}

#[test]
fn bad_train_params_and_inputs_are_reported() {
    let ws = Ws::new();
    setup(&ws, true, "    method: lora\n    lora: {r: 4, target: [q_proj, qq_proj]}\n");
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("unknown module `qq_proj`") && out.stderr.contains("p.yaml:"), "{out:?}");

    ws.write("p.yaml", &pipeline("    method: full\n    spectrum: {top_percent: 30}\n"));
    let out = ws.pipe(&["run", "p.yaml"]);
    assert!(out.stderr.contains("`spectrum:` needs `method: spectrum`"), "{out:?}");

    // The data input is not a pack artifact.
    ws.write(
        "p.yaml",
        &pipeline("    method: full\n").replace("{model: base, data: pack}", "{model: base, data: chat}"),
    );
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no list column `input_ids`") && out.stderr.contains("pack"), "{out:?}");
}

#[test]
fn bf16_training_keeps_f32_master_weights() {
    let ws = Ws::new();
    setup(
        &ws,
        true,
        "    method: lora\n    lora: {r: 8, alpha: 16}\n    precision: bf16\n    device: cpu\n    learning_rate: 0.01\n    lr_scheduler: constant\n    per_device_batch_size: 4\n    max_steps: 40\n    logging_steps: 10\n",
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "sft");
    let m = metrics(&out);
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), m.last().unwrap()["loss"].as_f64().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let t = tensors(&out.join("adapter_model.safetensors"));
    assert!(t.values().all(|x| x.dtype() == DType::BF16));
    let train: serde_json::Value = train_json(&out);
    assert_eq!(train["precision"], "bf16");
    assert_eq!(train["device"], "cpu");

    if !cfg!(feature = "cuda") {
        ws.write("p.yaml", &pipeline("    method: full\n    device: cuda\n"));
        let out = ws.pipe(&["run", "p.yaml"]);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains("built without CUDA") && out.stderr.contains("--features cuda"), "{out:?}");
    }
}

#[test]
fn qlora_trains_on_an_nf4_base() {
    let ws = Ws::new();
    setup(
        &ws,
        true,
        "    method: qlora\n    lora: {r: 8, alpha: 16}\n    learning_rate: 0.01\n    lr_scheduler: constant\n    per_device_batch_size: 4\n    max_steps: 40\n    logging_steps: 10\n    gradient_checkpointing: true\n",
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "sft");
    let m = metrics(&out);
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), m.last().unwrap()["loss"].as_f64().unwrap());
    assert!(last < 0.3 * first, "loss {first} -> {last}");
    let t = tensors(&out.join("adapter_model.safetensors"));
    assert_eq!(t.len(), 2 * 7 * 2);
    let train: serde_json::Value = train_json(&out);
    let (nf4, bf16) =
        (train["base_linear_bytes_nf4"].as_f64().unwrap(), train["base_linear_bytes_bf16"].as_f64().unwrap());
    assert!(nf4 < 0.27 * bf16 && nf4 > 0.25 * bf16, "{nf4} vs {bf16}");
}

#[test]
fn spectrum_scans_selects_and_trains_only_the_selection() {
    let ws = Ws::new();
    setup(
        &ws,
        false,
        "    method: spectrum\n    spectrum: {top_percent: 50}\n    learning_rate: 0.003\n    lr_scheduler: constant\n    per_device_batch_size: 4\n    max_steps: 30\n    logging_steps: 10\n",
    );
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "sft");
    let m = metrics(&out);
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), m.last().unwrap()["loss"].as_f64().unwrap());
    assert!(last < 0.3 * first, "loss {first} -> {last}");
    let snr: serde_json::Value = serde_json::from_str(&fs_err::read_to_string(out.join("snr.json")).unwrap()).unwrap();
    assert_eq!(snr.as_object().unwrap().len(), 2 * 7, "every decoder linear of 2 layers is scanned");
    assert!(snr["model.layers.0.self_attn.q_proj"]["snr"].is_number());
    let yaml = fs_err::read_to_string(out.join("unfrozen_parameters.yaml")).unwrap();
    assert!(yaml.starts_with("unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.embed_tokens.weight$\n"), "{yaml}");
    // 50% of the 2 modules of each type: one per type.
    let selected: Vec<&str> = yaml.lines().filter(|l| l.starts_with("- model.layers.")).map(|l| &l[2..]).collect();
    assert_eq!(selected.len(), 7, "{yaml}");
    let t = tensors(&out.join("model.safetensors"));
    let base = tensors(&ws.out_path("p.yaml", "base").join("model.safetensors"));
    for (name, w) in &base {
        let changed = (&t[name] - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0;
        let module = name.trim_end_matches(".weight");
        let want = name == "lm_head.weight" || name == "model.embed_tokens.weight" || selected.contains(&module);
        assert_eq!(changed, want, "{name}");
    }

    // By hand, anchored like re.match; a bad regex is a located error.
    ws.write("p.yaml", &pipeline("    method: spectrum\n    unfrozen_parameters: ['model\\.layers\\.1\\.mlp\\.', '.*norm']\n    max_steps: 2\n    learning_rate: 0.003\n"));
    ws.ok(&["run", "p.yaml"]);
    let out = ws.out_path("p.yaml", "sft");
    let t = tensors(&out.join("model.safetensors"));
    for (name, w) in &base {
        let changed = (&t[name] - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0;
        assert_eq!(changed, name.starts_with("model.layers.1.mlp.") || name.contains("norm"), "{name}");
    }
    ws.write("p.yaml", &pipeline("    method: spectrum\n    unfrozen_parameters: ['model(']\n"));
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not a valid regular expression") && out.stderr.contains("p.yaml:"), "{out:?}");
}

#[test]
fn merge_folds_the_adapter_into_the_base() {
    let ws = Ws::new();
    setup(
        &ws,
        true,
        "    method: lora\n    lora: {r: 4, alpha: 8, rslora: true, modules_to_save: [lm_head]}\n    learning_rate: 0.01\n    per_device_batch_size: 4\n    max_steps: 10\n  merged:\n    kind: merge\n    inputs: {model: base, adapter: sft}\n    max_shard_size: 100KB\n  merged16:\n    kind: merge\n    inputs: {model: base, adapter: sft}\n    dtype: bf16\n",
    );
    ws.ok(&["run", "p.yaml"]);
    let (base_dir, out, adapter) =
        (ws.out_path("p.yaml", "base"), ws.out_path("p.yaml", "merged"), ws.out_path("p.yaml", "sft"));
    assert!(out.join("model.safetensors.index.json").exists(), "sharded at 100KB");
    let cfg: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false, "lm_head from modules_to_save is its own tensor");
    let summary: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("merge.json")).unwrap()).unwrap();
    assert_eq!(summary["merged_modules"], 2 * 7);
    assert!(out.join("tokenizer.json").exists());
    // The merged folder gives the adapter's logits.
    let rows = pipe_stages::train::read_pack(&ws.out_path("p.yaml", "pack").join("data.parquet")).unwrap();
    let with = Llama::load_peft(&base_dir, &adapter, DType::F32, &Device::Cpu).unwrap();
    let merged = Llama::load(&out, DType::F32, &Device::Cpu, &TrainSpec::default()).unwrap();
    assert!(merged.lm_head.is_some());
    let b = with.batch(&rows).unwrap();
    let d = (with.logits(&b).unwrap() - merged.logits(&b).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "merged logits differ by {d}");

    let m16 = ws.out_path("p.yaml", "merged16");
    assert!(tensors(&m16.join("model.safetensors")).values().all(|t| t.dtype() == DType::BF16));
    let cfg16: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(m16.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg16["torch_dtype"], "bfloat16");
    // An input that is not an adapter.
    ws.write(
        "p.yaml",
        &pipeline(
            "    method: full\n    max_steps: 1\n  merged:\n    kind: merge\n    inputs: {model: base, adapter: sft}\n",
        ),
    );
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no adapter_config.json") && out.stderr.contains("method lora"), "{out:?}");
}

/// Two-replica (`devices: 2`, on the CPU) training data and pipelines:
/// `yaml(devices, accumulation, zero_stage)`.
fn replica_pipelines(ws: &Ws) -> impl Fn(usize, usize, u8) -> String {
    write_tiny_llama(ws, "model", true);
    let data: String = (0..16).map(|i| format!("{{\"q\": \"{i}+{i}?\", \"a\": \"{}\"}}\n", 2 * i)).collect();
    ws.write("data/d.jsonl", &data);
    |devices: usize, accum: usize, zero: u8| {
        pipeline(&format!(
            "    method: lora\n    lora: {{r: 4, alpha: 8}}\n    learning_rate: 0.01\n    lr_scheduler: constant\n    \
             per_device_batch_size: 2\n    gradient_accumulation_steps: {accum}\n    devices: {devices}\n    \
             zero_stage: {zero}\n    device: cpu\n    max_grad_norm: 0.5\n"
        ))
        .replace("max_seq_length: 64\n", "max_seq_length: 64\n    packing: none\n")
    }
}

/// `devices: 2` (two replicas, here on the CPU) trains like one device with
/// twice the gradient accumulation: the same global batch and steps, the
/// same losses and adapter weights up to the order the gradients are
/// summed in; with `zero_stage: 2` too, each replica holding about half of
/// the optimizer state. `devices: 0` and `zero_stage: 3` are refused.
#[test]
fn two_replicas_train_like_one_device_with_twice_the_accumulation() {
    let ws = Ws::new();
    let yaml = replica_pipelines(&ws);
    ws.write("one.yaml", &yaml(1, 4, 0));
    ws.write("two.yaml", &yaml(2, 2, 0));
    ws.write("zero.yaml", &yaml(2, 2, 2));
    ws.ok(&["run", "one.yaml"]);
    let out = ws.ok(&["run", "two.yaml"]);
    assert!(out.stderr.contains("sft: running"), "the replicas are a different job: {out:?}");
    // Buckets of ~200 bytes: the tiny model's gradients fill several, dealt
    // out to the two replicas (stage 2 shards by bucket).
    let out: Out = ws.cmd(&["run", "zero.yaml"]).env("PIPE_DDP_BUCKET_MB", "0.0002").output().unwrap().into();
    assert_eq!(out.code, 0, "{out:?}");
    let a = ws.out_path("one.yaml", "sft");
    let ja = train_json(&a);
    assert_eq!((ja["steps"].as_u64(), ja["devices"].as_u64()), (Some(2), Some(1)), "{ja}");
    let state = |j: &serde_json::Value| -> Vec<u64> {
        j["optimizer_state_bytes"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
    };
    let total = state(&ja)[0];
    for (name, zero) in [("two.yaml", 0), ("zero.yaml", 2)] {
        let b = ws.out_path(name, "sft");
        let jb = train_json(&b);
        assert_eq!((jb["steps"].as_u64(), jb["devices"].as_u64()), (Some(2), Some(2)), "{jb}");
        assert_eq!(ja["tokens"], jb["tokens"]);
        assert_eq!(jb["device"], "cpu x2");
        assert_eq!(jb["zero_stage"], zero);
        let per = state(&jb);
        let grads: Vec<u64> =
            jb["gradient_bytes_per_replica"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        if zero == 0 {
            assert_eq!(per, vec![total, total], "replicated optimizer state");
            assert!(grads[0] > 0 && grads[0] == grads[1], "every replica holds every summed gradient: {grads:?}");
        } else {
            assert_eq!(per.iter().sum::<u64>(), total, "the shards cover the state once");
            assert!(per.iter().all(|&b| b > 0 && b <= total * 6 / 10), "about half each: {per:?} of {total}");
            let all = train_json(&ws.out_path("two.yaml", "sft"))["gradient_bytes_per_replica"][0].as_u64().unwrap();
            assert_eq!(grads.iter().sum::<u64>(), all, "stage 2: each bucket's sum on one replica: {grads:?} of {all}");
            assert!(grads.iter().all(|&b| b > 0 && b <= all * 6 / 10), "about half each: {grads:?} of {all}");
        }
        same_training(&a, &b);
    }
    ws.write("zero3.yaml", &yaml(2, 2, 3));
    let out = ws.pipe(&["run", "zero3.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("zero_stage 3 is not supported"), "{out:?}");
    ws.write("none.yaml", &yaml(0, 2, 0));
    let out = ws.pipe(&["run", "none.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("devices must be at least 1"), "{out:?}");
}

/// Data parallelism's bucketed all-reduce overlapping the backward pass:
/// two replicas doing full fine-tuning with gradient checkpointing (the
/// backward pass one layer at a time, each layer's buckets reduced as soon
/// as it is done) in buckets of ~500 bytes (several per layer) train like
/// one device with twice the accumulation.
#[test]
fn bucketed_all_reduce_during_the_backward_pass_trains_like_one_device() {
    let ws = Ws::new();
    let yaml = replica_pipelines(&ws);
    let full = |y: String| {
        y.replace(
            "    method: lora\n    lora: {r: 4, alpha: 8}\n",
            "    method: full\n    gradient_checkpointing: true\n",
        )
    };
    ws.write("one.yaml", &full(yaml(1, 4, 0)));
    ws.write("two.yaml", &full(yaml(2, 2, 0)));
    ws.ok(&["run", "one.yaml"]);
    let out: Out = ws.cmd(&["run", "two.yaml"]).env("PIPE_DDP_BUCKET_MB", "0.0005").output().unwrap().into();
    assert_eq!(out.code, 0, "{out:?}");
    let logs = sft_logs(&ws);
    let line = logs.lines().find(|l| l.contains("gradients all-reduced over host in")).expect("the data-parallel line");
    let buckets: usize = line.split(" in ").last().unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(buckets >= 8, "{line}");
    assert!(logs.contains("for each other's gradients"), "{logs}");
    let (a, b) = (ws.out_path("one.yaml", "sft"), ws.out_path("two.yaml", "sft"));
    assert_eq!(train_json(&b)["devices"].as_u64(), Some(2));
    same_training_in(&a, &b, "model.safetensors");
}

/// Two training outputs with the same losses, gradient norms and adapter
/// weights, up to summation order.
fn same_training(a: &Path, b: &Path) {
    same_training_in(a, b, "adapter_model.safetensors")
}

/// [`same_training`] comparing the weights of `file`.
fn same_training_in(a: &Path, b: &Path, file: &str) {
    for (ma, mb) in metrics(a).iter().zip(metrics(b)) {
        let (la, lb) = (ma["loss"].as_f64().unwrap(), mb["loss"].as_f64().unwrap());
        assert!((la - lb).abs() < 1e-5 * la.abs(), "step {}: loss {la} vs {lb}", ma["step"]);
        let (ga, gb) = (ma["grad_norm"].as_f64().unwrap(), mb["grad_norm"].as_f64().unwrap());
        assert!((ga - gb).abs() < 1e-4 * ga.abs(), "step {}: grad norm {ga} vs {gb}", ma["step"]);
    }
    let (ta, tb) = (tensors(&a.join(file)), tensors(&b.join(file)));
    assert_eq!(ta.len(), tb.len());
    for (k, x) in &ta {
        let y = &tb[k];
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4 * m.max(1e-3), "{k}: differs by {d} (max |w| {m})");
    }
}

/// A sharded (`zero_stage: 1`) two-replica run killed after a checkpoint
/// resumes to the weights of an uninterrupted one, bit for bit: the
/// checkpoint holds every shard's optimizer state, and each replica gets
/// back the tensors it does not own.
#[test]
fn a_killed_sharded_run_resumes_to_identical_weights() {
    let ws = Ws::new();
    let yaml = replica_pipelines(&ws);
    let long =
        |y: String| y.replace("    device: cpu\n", "    device: cpu\n    max_steps: 120\n    checkpoint_every: 5\n");
    ws.write("p.yaml", &long(yaml(2, 1, 1)));
    kill_after_first_checkpoint(&ws, "p.yaml");
    let resumed = ws.ok(&["run", "p.yaml"]);
    assert_eq!(resumed.ran(), vec!["sft".to_string()], "{resumed:?}");
    assert!(sft_logs(&ws).contains("resumed from the checkpoint at step"));
    let fresh = Ws::new();
    let yaml = replica_pipelines(&fresh);
    fresh.write("p.yaml", &long(yaml(2, 1, 1)));
    fresh.ok(&["run", "p.yaml"]);
    let (a, b) = (ws.out_path("p.yaml", "sft"), fresh.out_path("p.yaml", "sft"));
    assert!(train_json(&a)["resumed_at_step"].as_u64() > Some(0));
    let read = |d: &Path| fs_err::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(read(&a) == read(&b), "resumed and uninterrupted sharded runs differ");
}

/// Ctrl-C while two replicas train: both stop (the host exchange releases
/// the replica still waiting for the other), `pipe` exits 130 without
/// publishing the stage, and a rerun trains from the start.
#[test]
fn ctrl_c_stops_data_parallel_training() {
    let ws = Ws::new();
    let yaml = replica_pipelines(&ws);
    ws.write("p.yaml", &yaml(2, 1, 0).replace("    device: cpu\n", "    device: cpu\n    max_steps: 100000\n"));
    let child = ws
        .cmd(&["run", "p.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics_written = || {
        fs_err::read_dir(ws.path().join(".pipe/resume")).ok().into_iter().flatten().flatten().any(|e| {
            fs_err::read_to_string(e.path().join("metrics/metrics.jsonl")).is_ok_and(|m| m.lines().count() >= 3)
        })
    };
    wait_for(120, "a few training steps", metrics_written);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o: Out = child.wait_with_output().unwrap().into();
    assert_eq!(o.code, 130, "{o:?}");
    assert!(o.stderr.contains("sft (cancelled)"), "{o:?}");
    let st = ws.status_json("p.yaml");
    let sft = st["stages"].as_array().unwrap().iter().find(|s| s["name"] == "sft").unwrap().clone();
    assert_ne!(sft["state"], "fresh", "{sft}");
    ws.write("p.yaml", &yaml(2, 1, 0).replace("    device: cpu\n", "    device: cpu\n    max_steps: 2\n"));
    let again = ws.ok(&["run", "p.yaml"]);
    assert_eq!(again.ran(), vec!["sft".to_string()], "{again:?}");
}
