//! Training-step benchmark on a random-init Llama-shaped model (the pipe
//! side of benches/gpu/train.sh): what the `train` stage runs per step
//! (forward, backward, global-norm clipping, AdamW with f32 master weights),
//! on synthetic packed rows, without data loading or logging.
//!
//!   train_bench --config smollm2-135m|llama-1b --method lora|full|qlora
//!               [--dtype bf16|f32] [--batch 8] [--seq 1024] [--docs 1]
//!               [--steps 10] [--warmup 2] [--ckpt] [--device cuda|cpu]
//!               [--no-events] [--profile]
//!
//! `--docs N` packs N sequences of seq/N tokens in each row (attention
//! stays within a sequence). Prints one JSON line: tokens/s (median step),
//! the forward+backward and optimizer split, peak GPU memory of the pool
//! (live tensors; `torch.cuda.max_memory_allocated`'s counterpart), and the
//! first and last losses. `--no-events` turns off cudarc's per-tensor CUDA
//! events (safe with one thread on one stream), to measure what they cost.
//! `--profile` prints instead the time of each part of one decoder block
//! (forward, and forward + backward) and of the head's loss.

use std::time::Instant;

#[path = "common/mod.rs"]
mod common;
use common::{arg, config, median, random_weights};

use candle_core::{DType, Device, Tensor};
use pipe_stages::nn::llama::{Fwd, Llama, LoraSpec, Row, TrainSpec, ALL_LINEAR};
use pipe_stages::nn::optim::{AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cname: String = arg(&args, "--config", "smollm2-135m".to_string());
    let method: String = arg(&args, "--method", "lora".to_string());
    let dtype = match arg(&args, "--dtype", "bf16".to_string()).as_str() {
        "f32" => DType::F32,
        _ => DType::BF16,
    };
    let (batch, seq, docs) =
        (arg(&args, "--batch", 8usize), arg(&args, "--seq", 1024usize), arg(&args, "--docs", 1usize));
    let (steps, warmup) = (arg(&args, "--steps", 10usize), arg(&args, "--warmup", 2usize));
    let ckpt = args.iter().any(|a| a == "--ckpt");
    let device = match arg(&args, "--device", "cuda".to_string()).as_str() {
        "cpu" => Device::Cpu,
        _ => Device::new_cuda(0)?,
    };
    // As the stages do (`PIPE_KEEP_POOL=0`: the driver's default).
    let keep_pool = pipe_stages::nn::gpu::keep_pool_memory(&device);
    let no_events = args.iter().any(|a| a == "--no-events");
    #[cfg(feature = "cuda")]
    if let (true, Device::Cuda(c)) = (no_events, &device) {
        // SAFETY: one thread, one stream: nothing needs the per-tensor events.
        unsafe { c.disable_event_tracking() };
    }
    let cfg = config(&cname)?;
    let mut spec = TrainSpec { seed: 42, ..Default::default() };
    match method.as_str() {
        "full" => spec.full = true,
        "lora" | "qlora" => {
            spec.lora = Some(LoraSpec {
                r: 16,
                alpha: 16.0,
                dropout: 0.0,
                targets: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
                rslora: false,
                init_b_zero: true,
            });
            spec.nf4_base = method == "qlora";
        }
        m => return Err(format!("--method {m}: lora, full or qlora").into()),
    }
    pipe_stages::nn::gpu::reset_peak(&device);
    let get = random_weights(&cfg, dtype, &device);
    let model = Llama::build(cfg.clone(), dtype, &device, &spec, &get, &|_| false)?;
    let trainable = model.trainable();
    let n_train: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
    let vars: Vec<_> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(trainable, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let doc = seq / docs.max(1);
    let row = |rng: &mut rand_chacha::ChaCha8Rng| -> Row {
        let ids: Vec<u32> = (0..doc * docs).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
        Row {
            labels: ids.iter().map(|&i| i as i64).collect(),
            position_ids: (0..ids.len()).map(|i| (i % doc) as u32).collect(),
            seq_lens: vec![doc; docs],
            input_ids: ids,
        }
    };
    let sync = |d: &Device| d.synchronize();
    if args.iter().any(|a| a == "--profile") {
        let rows: Vec<Row> = (0..batch).map(|_| row(&mut rng)).collect();
        println!("{}", profile(&model, &rows, &device)?);
        return Ok(());
    }
    let (mut step_s, mut fb_s, mut opt_s, mut losses) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0;
    for step in 0..warmup + steps {
        let rows: Vec<Row> = (0..batch).map(|_| row(&mut rng)).collect();
        sync(&device)?;
        let t0 = Instant::now();
        let b = model.batch(&rows)?;
        let fx = Fwd { train: true, seed: step as u64 };
        let (loss, grads) = model.loss_and_grads(&b, fx, 1.0 / b.n_targets as f64, &vars, ckpt)?;
        sync(&device)?;
        let t1 = Instant::now();
        opt.clip_and_step(grads, 1.0, 1e-4)?;
        sync(&device)?;
        let t2 = Instant::now();
        losses.push(loss);
        if step >= warmup {
            tokens = b.n_tokens;
            step_s.push((t2 - t0).as_secs_f64());
            fb_s.push((t1 - t0).as_secs_f64());
            opt_s.push((t2 - t1).as_secs_f64());
        }
    }
    let peak = pipe_stages::nn::gpu::peak_bytes(&device).map(|b| b as f64 / (1 << 20) as f64);
    // Every other switch set for this run (the A/Bs of VARS= in benches/gpu/train.sh).
    let named = ["PIPE_ATTENTION_TC", "PIPE_HEAD_LOGITS", "PIPE_ATTN_BWD", "PIPE_KEEP_POOL"];
    let switches: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("PIPE_") && !named.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let out = serde_json::json!({
        "impl": "pipe",
        "config": cname, "method": method, "dtype": format!("{dtype:?}").to_lowercase(),
        "batch": batch, "seq": seq, "docs": docs, "ckpt": ckpt, "no_events": no_events, "keep_pool": keep_pool,
        "fused_attention": pipe_stages::nn::flash::usable(&Tensor::zeros((1, 1, cfg.head_dim()), dtype, &device)?),
        "tensor_cores": std::env::var("PIPE_ATTENTION_TC").map_or(true, |v| v != "0"),
        "head_logits": std::env::var("PIPE_HEAD_LOGITS").ok(),
        "attn_bwd": std::env::var("PIPE_ATTN_BWD").ok(),
        "switches": switches,
        "trainable": n_train,
        "tokens_per_s": tokens as f64 / median(&step_s),
        "step_s": median(&step_s), "fwd_bwd_s": median(&fb_s), "optimizer_s": median(&opt_s),
        "peak_mib": peak,
        "loss_first": losses.first(), "loss_last": losses.last(),
    });
    println!("{out}");
    Ok(())
}

/// Milliseconds per call of `f` (after one warm-up call), the device synchronised.
fn time_ms<T>(
    device: &Device,
    reps: usize,
    mut f: impl FnMut() -> pipe_stages::nn::Result<T>,
) -> pipe_stages::nn::Result<f64> {
    f()?;
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

/// Where a step's time goes: the parts of one decoder block, forward and
/// backward, timed alone (`--profile`).
fn profile(model: &Llama, rows: &[Row], device: &Device) -> pipe_stages::nn::Result<serde_json::Value> {
    use candle_core::Var;
    use pipe_stages::nn::ops;
    let b = model.batch(rows)?;
    let fx = Fwd { train: true, seed: 1 };
    let x = Var::from_tensor(&model.embed(&b)?)?;
    let l = &model.layers[0];
    let c = &model.cfg;
    let (n, h, kv, hd) = (b.n_tokens, c.num_attention_heads, c.kv_heads(), c.head_dim());
    let w_ln = l.input_layernorm.tensor()?;
    let reps = 20;
    let mut out = serde_json::Map::new();
    let mut put = |k: &str, v: f64| {
        out.insert(k.to_string(), serde_json::json!((v * 1000.0).round() / 1000.0));
    };
    // Backward passes are seeded with random gradients (`backward_from`),
    // not through a sum of every element (one block on CUDA: slow).
    let rand_like = |t: &Tensor| -> pipe_stages::nn::Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, t.shape(), device)?.to_dtype(t.dtype())?)
    };
    let dx = rand_like(x.as_tensor())?;
    put("add_ms", time_ms(device, reps, || Ok((x.as_tensor() + x.as_tensor())?))?);
    put("fused_add_ms", time_ms(device, reps, || Ok(pipe_stages::nn::fused::add(x.as_tensor(), x.as_tensor())?))?);
    let norm_fwd_bwd = |w: &Tensor| -> pipe_stages::nn::Result<_> {
        let y = ops::rms_norm(x.as_tensor(), w, 1e-5)?;
        Ok(ops::backward_from(&y, &dx)?)
    };
    put("rms_norm_fwd_bwd_ms", time_ms(device, reps, || norm_fwd_bwd(&w_ln))?);
    put("rms_norm_fwd_ms", time_ms(device, reps, || Ok(ops::rms_norm(x.as_tensor(), &w_ln, 1e-5)?))?);
    // Without the weight's gradient (the difference is the dw kernel and its sum).
    let w_frozen = w_ln.detach();
    put("rms_norm_fwd_bwd_no_dw_ms", time_ms(device, reps, || norm_fwd_bwd(&w_frozen))?);
    let hn = ops::rms_norm(x.as_tensor(), &w_ln, 1e-5)?.detach();
    let hv = Var::from_tensor(&hn)?;
    put("lora_gate_fwd_ms", time_ms(device, reps, || l.gate.forward(hv.as_tensor(), fx))?);
    let dg = rand_like(&l.gate.forward(hv.as_tensor(), fx)?)?;
    put(
        "lora_gate_fwd_bwd_ms",
        time_ms(device, reps, || Ok(ops::backward_from(&l.gate.forward(hv.as_tensor(), fx)?, &dg)?))?,
    );
    let wg = l.gate.w.tensor()?;
    put("frozen_matmul_fwd_ms", time_ms(device, reps, || Ok(ops::frozen_matmul(hv.as_tensor(), &wg)?))?);
    put("plain_matmul_fwd_ms", time_ms(device, reps, || Ok(hn.matmul(&wg.t()?)?))?);
    // The gate's two backward products alone: dx = dy @ w, dw = dy.T @ x.
    put("gate_dx_mm_ms", time_ms(device, reps, || Ok(dg.matmul(&wg)?))?);
    put("gate_dw_mm_ms", time_ms(device, reps, || Ok(dg.t()?.matmul(&hn)?))?);
    // The gate adapter's products alone (x @ a.T, the update, and the
    // backward's skinny ones), and the weight-gradient products split over
    // 16 slices of the rows (a batched product, then a sum).
    if let Some(lo) = &l.gate.lora {
        let (a, bm) = (lo.a.as_tensor().to_dtype(hn.dtype())?, lo.b.as_tensor().to_dtype(hn.dtype())?);
        let xa = hn.matmul(&a.t()?)?;
        let (m, k, r, nn) = (hn.dim(0)?, hn.dim(1)?, a.dim(0)?, bm.dim(0)?);
        put("lora_xa_mm_ms", time_ms(device, reps, || Ok(hn.matmul(&a.t()?)?))?);
        put("lora_up_mm_ms", time_ms(device, reps, || Ok(xa.matmul(&bm.t()?)?))?);
        put("lora_dxa_mm_ms", time_ms(device, reps, || Ok(dg.matmul(&bm)?))?);
        put("lora_da_mm_ms", time_ms(device, reps, || Ok(xa.t()?.matmul(&hn)?))?);
        put("lora_db_mm_ms", time_ms(device, reps, || Ok(dg.t()?.matmul(&xa)?))?);
        if m % 16 == 0 {
            let c = 16;
            let split = |p: &Tensor, q: &Tensor, pc: usize, qc: usize| -> pipe_stages::nn::Result<Tensor> {
                let pp = p.reshape((c, m / c, pc))?.transpose(1, 2)?;
                Ok(pp.matmul(&q.reshape((c, m / c, qc))?)?.sum(0)?)
            };
            put("lora_da_split_ms", time_ms(device, reps, || split(&xa, &hn, r, k))?);
            put("lora_db_split_ms", time_ms(device, reps, || split(&dg, &xa, nn, r))?);
        }
    }
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h, hd), device)?.to_dtype(model.dtype)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, kv, hd), device)?.to_dtype(model.dtype)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, kv, hd), device)?.to_dtype(model.dtype)?)?;
    let tiles = pipe_stages::nn::flash::tiles(&b.seqs, hd, model.dtype);
    let tl = tiles.len();
    let tiles = Tensor::from_vec(tiles, tl, device)?;
    let dq = rand_like(q.as_tensor())?;
    if pipe_stages::nn::flash::usable(q.as_tensor()) {
        let s = 1.0 / (hd as f64).sqrt();
        put(
            "attn_fwd_ms",
            time_ms(device, reps, || {
                Ok(pipe_stages::nn::flash::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &tiles, s)?)
            })?,
        );
        for (name, split) in [("attn_fwd_bwd_ms", false), ("attn_fwd_bwd_split_ms", true)] {
            let attn = || {
                pipe_stages::nn::flash::attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &tiles, s, split)
            };
            put(name, time_ms(device, reps, || Ok(ops::backward_from(&attn()?, &dq)?))?);
        }
    }
    put("block_fwd_ms", time_ms(device, reps, || model.block(0, x.as_tensor(), &b, fx))?);
    put(
        "block_fwd_bwd_ms",
        time_ms(device, reps, || Ok(ops::backward_from(&model.block(0, x.as_tensor(), &b, fx)?, &dx)?))?,
    );
    let hf = Var::from_tensor(&model.final_norm(x.as_tensor())?.detach())?;
    put(
        "head_loss_fwd_bwd_ms",
        time_ms(device, 5, || Ok(model.loss_sum_from_hidden(hf.as_tensor(), &b, fx)?.backward()?))?,
    );
    // The parts of the LM head's loss, one chunk of rows (as the model
    // chunks them) timed alone; x head_chunks a step.
    let w = match &model.lm_head {
        Some(l) => l.w.tensor()?,
        None => model.embed.tensor()?,
    };
    let vocab = w.dim(0)?;
    let rows = model.head_chunk_rows().min(n);
    let hc = hf.as_tensor().narrow(0, 0, rows)?.detach();
    let t = Tensor::from_vec((0..rows as u32).map(|i| i % vocab as u32).collect::<Vec<_>>(), rows, device)?;
    put("head_chunks", n.div_ceil(rows) as f64);
    put("head_logits_mm_ms", time_ms(device, reps, || Ok(hc.matmul(&w.t()?)?))?);
    let p = hc.matmul(&w.t()?)?;
    if pipe_stages::nn::fused::usable(&p) {
        put(
            "head_ce_ms",
            time_ms(device, reps, || Ok(pipe_stages::nn::fused::cross_entropy_grad_in_place(&p, &t, 1.0)?))?,
        );
    }
    put("head_dh_mm_ms", time_ms(device, reps, || Ok(p.matmul(&w)?))?);
    put("head_dw_mm_ms", time_ms(device, reps, || Ok(p.t()?.matmul(&hc)?))?);
    let dw = p.t()?.matmul(&hc)?;
    put("head_dw_add_ms", time_ms(device, reps, || Ok((&dw + &dw)?))?);
    // The embedding lookup's forward and backward: pipe's gather (a block
    // per distinct token in the backward) and candle's index_select (its
    // index_add backward: a thread per column walks every token).
    let table = model.embed.tensor()?;
    let dy_e = rand_like(&model.embed(&b)?)?;
    put("embed_fwd_bwd_ms", time_ms(device, reps, || Ok(ops::backward_from(&b.ids.gather(&table)?, &dy_e)?))?);
    put(
        "embed_index_select_fwd_bwd_ms",
        time_ms(device, reps, || Ok(ops::backward_from(&table.index_select(&b.ids.ids, 0)?, &dy_e)?))?,
    );
    let big = l.gate.forward(hv.as_tensor(), Fwd::EVAL)?;
    put("sum_all_gate_out_ms", time_ms(device, reps, || Ok(big.sum_all()?))?);
    put("layers", model.layers.len() as f64);
    Ok(serde_json::Value::Object(out))
}
