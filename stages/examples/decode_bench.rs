//! Decode-step benchmark of serving's model side (the pipe half of
//! scripts/gpu/serve_bench.sh without HTTP): a random-init model in bf16,
//! B sequences prefilled with PROMPT random tokens, then STEPS greedy decode
//! steps through `Llama::step_next` (what `pipe serve`'s engine calls).
//!
//!   decode_bench [--config smollm2-135m|llama-1b|config.json] [--batches 1,8,32,64]
//!                [--prompt 100] [--steps 64] [--device cuda|cpu] [--profile]
//!
//! PIPE_DECODE_GRAPH picks the path as in serving (unset: the CUDA graph;
//! nograph: the same kernels launched one by one; 0: candle ops). Prints one
//! JSON line per batch size: tokens/s and milliseconds per step (median of
//! the steps), the prefill's time, plus the HBM roofline of batch-1 decode
//! on an H200. `--profile` adds each kernel's GPU time per launch
//! (`Llama::decode_profile`) and their sum over a step. `--greedy` (or
//! DECODE_BENCH_GREEDY=1) times batch 1 through `Llama::decode_greedy`
//! instead (path "greedy": the time from the call to the last of STEPS
//! tokens over STEPS, after a warm-up chain that records the graphs; on
//! CUDA the next step launched before a step's token is read unless
//! PIPE_DECODE_CHAIN=0, PIPE_DECODE_LP_STEPS steps a launch, 4 by default;
//! `ms_between_tokens_after3` the measure before 2026-12-05, the mean
//! interval between tokens after the first 3, which with several steps a
//! launch counts intervals inside bursts and reads low: 59 steps' time
//! over 63 intervals at 64 steps, 8 a launch). `l2_head`: the LM head's
//! L2 window (PIPE_DECODE_L2_HEAD), if on.
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;
use common::{arg, config, median, random_weights};

use candle_core::{DType, Device};
use pipe_stages::nn::infer::KvCache;
use pipe_stages::nn::llama::{Llama, TrainSpec};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cname: String = arg(&args, "--config", "smollm2-135m".to_string());
    let batches: String = arg(&args, "--batches", "1,8,32,64".to_string());
    let (prompt, steps) = (arg(&args, "--prompt", 100usize), arg(&args, "--steps", 64usize));
    let profile = args.iter().any(|a| a == "--profile");
    let greedy = args.iter().any(|a| a == "--greedy") || std::env::var("DECODE_BENCH_GREEDY").is_ok_and(|v| v == "1");
    let device = match arg(&args, "--device", "cuda".to_string()).as_str() {
        "cpu" => Device::Cpu,
        _ => Device::new_cuda(0)?,
    };
    // As the stages do (`PIPE_KEEP_POOL=0`: the driver's default).
    let keep_pool = pipe_stages::nn::gpu::keep_pool_memory(&device);
    let cfg = config(&cname)?;
    let dtype = if device.is_cpu() { DType::F32 } else { DType::BF16 };
    let get = random_weights(&cfg, dtype, &device);
    let model = Llama::build(cfg.clone(), dtype, &device, &TrainSpec::default(), &get, &|_| false)?;
    let (h, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    let params = heads * cfg.vocab_size * h + cfg.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * f + 2 * h) + h;
    let path = match std::env::var("PIPE_DECODE_GRAPH").as_deref() {
        Ok("0") => "candle",
        Ok("nograph") => "nograph",
        _ if model.decode_graph_ok() => "graph",
        _ => "candle",
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for b in batches.split(',').filter_map(|s| s.trim().parse::<usize>().ok()) {
        let mut caches: Vec<KvCache> = (0..b).map(|_| KvCache::new()).collect();
        let prompts: Vec<Vec<u32>> =
            (0..b).map(|_| (0..prompt).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect()).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let t = Instant::now();
        let first = model.step_next(&refs, &mut caches.iter_mut().collect::<Vec<_>>(), &vec![false; b])?;
        let prefill_s = t.elapsed().as_secs_f64();
        let mut feed = first.argmax;
        let mut step_s = Vec::with_capacity(steps);
        let greedy = greedy && b == 1;
        // (Greedy: also the old measure, the mean interval between tokens
        // after the first 3, which tokens in bursts bias low.)
        let mut after3 = None;
        if greedy {
            // A warm-up chain on a second cache of the same prompt records
            // the graphs (one per step count); then the time from the call
            // to the last token over the steps: tokens of launches of
            // several steps (PIPE_DECODE_LP_STEPS) come in bursts, so the
            // intervals between tokens are not the steps' time.
            let mut warm = KvCache::new();
            model.step_next(&refs, &mut [&mut warm], &[false])?;
            model.decode_greedy(&mut warm, feed[0], steps, |_| true)?;
            drop(warm);
            let mut at = Vec::with_capacity(steps);
            let t = Instant::now();
            model.decode_greedy(&mut caches[0], feed[0], steps, |_| {
                at.push(Instant::now());
                true
            })?;
            let last = at.last().copied().unwrap_or_else(Instant::now);
            step_s.push(last.duration_since(t).as_secs_f64() / steps.max(1) as f64);
            if at.len() > 4 {
                after3 = Some(last.duration_since(at[3]).as_secs_f64() / (at.len() - 4) as f64);
            }
        } else {
            for i in 0..steps + 3 {
                let toks: Vec<&[u32]> = feed.iter().map(std::slice::from_ref).collect();
                let t = Instant::now();
                let next = model.step_next(&toks, &mut caches.iter_mut().collect::<Vec<_>>(), &vec![false; b])?;
                if i >= 3 {
                    step_s.push(t.elapsed().as_secs_f64());
                }
                feed = next.argmax;
            }
        }
        let s = median(&step_s);
        if profile && path != "candle" {
            let us = model.decode_profile(b, 20)?;
            let per_layer: f64 = us
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "embed" | "head" | "argmax" | "step_graph"))
                .map(|x| x.1)
                .sum();
            let total = per_layer * cfg.num_hidden_layers as f64
                + us.iter()
                    .filter(|(k, _)| matches!(k.as_str(), "embed" | "head" | "argmax"))
                    .map(|x| x.1)
                    .sum::<f64>();
            println!(
                "{}",
                serde_json::json!({
                    "bench": "decode_profile", "batch": b, "us_per_kernel": us.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                    "us_per_layer": per_layer, "us_kernels_per_step": total, "us_measured_step": s * 1e6,
                })
            );
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "decode", "config": cname, "path": if greedy { "greedy" } else { path }, "batch": b, "prompt": prompt, "steps": steps, "keep_pool": keep_pool,
                "ms_per_step": s * 1e3, "tokens_per_s": b as f64 / s, "ms_between_tokens_after3": after3.map(|a| a * 1e3),
                "prefill_ms": prefill_s * 1e3, "prefill_tokens_per_s": (b * prompt) as f64 / prefill_s,
                "roofline_h200_batch1": 4.8e12 / (2.0 * params as f64),
                "l2_head": model.decode_l2_head().map(|(bytes, set_aside, hit)| serde_json::json!({"window_mib": bytes as f64 / 1048576.0, "set_aside_mib": set_aside as f64 / 1048576.0, "hit_ratio": hit})),
            })
        );
    }
    Ok(())
}
