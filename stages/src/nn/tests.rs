//! Model tests: gradients against finite differences (f64), packing
//! isolation, and the LoRA forward.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::nn::config::LlamaConfig;
use crate::nn::llama::{Fwd, Llama, LoraSpec, Row, TrainSpec, Weight, ALL_LINEAR};
use crate::nn::Result;

pub fn tiny_config(model_type: &str, tied: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": model_type,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 64,
        "rope_scaling": if model_type == "llama" {
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
        } else { serde_json::Value::Null },
    }))
    .expect("valid config")
}

/// The first CUDA device, or None (with a note) where there is none: the
/// CUDA tests run on the GPU machine and pass elsewhere.
pub fn cuda_device() -> candle_core::Result<Option<Device>> {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("no CUDA device: skipped");
        return Ok(None);
    }
    Ok(Some(Device::new_cuda(0)?))
}

/// max |a - b| / max |b|, both moved to the CPU in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12))
}

/// Random weights for `cfg` under `transformers` names.
pub fn tiny_weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut w = HashMap::new();
    let mut put = |name: String, scale: f64, center: f64| {
        let shape = cfg.param_shape(&name);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| center + rng.random_range(-scale..scale)).collect();
        w.insert(name, Tensor::from_vec(v, shape, &dev).expect("tensor"));
    };
    put("model.embed_tokens.weight".into(), 0.5, 0.0);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), 0.3, 0.0);
    }
    put("model.norm.weight".into(), 0.2, 1.0);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), 0.2, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), 0.2, 1.0);
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            put(format!("{p}.self_attn.{m}.weight"), 0.3, 0.0);
            if cfg.qkv_bias() && m != "o_proj" {
                put(format!("{p}.self_attn.{m}.bias"), 0.1, 0.0);
            }
        }
        for m in ["gate_proj", "up_proj", "down_proj"] {
            put(format!("{p}.mlp.{m}.weight"), 0.3, 0.0);
        }
    }
    w
}

pub fn tiny_model(cfg: &LlamaConfig, spec: &TrainSpec, dtype: DType) -> Result<Llama> {
    tiny_model_on(cfg, spec, dtype, &Device::Cpu)
}

pub fn tiny_model_on(cfg: &LlamaConfig, spec: &TrainSpec, dtype: DType, device: &Device) -> Result<Llama> {
    let w = tiny_weights(cfg, 7);
    let get = |n: &str| -> Result<Tensor> {
        Ok(w.get(n)
            .ok_or_else(|| crate::nn::NnError::Other(format!("missing {n}")))?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    let has = |n: &str| w.contains_key(n);
    Llama::build(cfg.clone(), dtype, device, spec, &get, &has)
}

/// Two packed rows: the first holds two sequences.
pub fn rows() -> Vec<Row> {
    vec![
        Row {
            input_ids: vec![1, 5, 9, 3, 2, 7, 30, 4],
            labels: vec![-100, -100, 9, 3, -100, 7, 30, 4],
            position_ids: vec![0, 1, 2, 3, 0, 1, 2, 3],
            seq_lens: vec![4, 4],
        },
        Row {
            input_ids: vec![6, 8, 10, 12, 14],
            labels: vec![6, 8, 10, 12, 14],
            position_ids: vec![0, 1, 2, 3, 4],
            seq_lens: vec![5],
        },
    ]
}

fn loss(m: &Llama, rows: &[Row]) -> Result<f64> {
    let b = m.batch(rows)?;
    Ok(m.loss_sum(&b, Fwd::EVAL)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Compare the analytic gradient of every trainable parameter with central
/// differences at a few coordinates; every parameter must get a non-zero
/// gradient.
fn check_grads(m: &Llama) -> Result<()> {
    let rows = rows();
    let b = m.batch(&rows)?;
    let l = m.loss_sum(&b, Fwd::EVAL)?;
    let grads = l.backward()?;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let params = m.trainable();
    assert!(!params.is_empty());
    for (name, var) in &params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let g = g.flatten_all()?.to_vec1::<f64>()?;
        assert!(g.iter().any(|x| *x != 0.0), "{name}: gradient is all zeros");
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for _ in 0..3 {
            let i = rng.random_range(0..base.len());
            let eps = 1e-5;
            let mut plus = base.clone();
            plus[i] += eps;
            var.set(&Tensor::from_vec(plus, var.shape(), &Device::Cpu)?)?;
            let lp = loss(m, &rows)?;
            let mut minus = base.clone();
            minus[i] -= eps;
            var.set(&Tensor::from_vec(minus, var.shape(), &Device::Cpu)?)?;
            let lm = loss(m, &rows)?;
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
            let fd = (lp - lm) / (2.0 * eps);
            let tol = 1e-6 + 1e-5 * fd.abs().max(g[i].abs());
            assert!((fd - g[i]).abs() < tol, "{name}[{i}]: analytic {} vs finite difference {fd}", g[i]);
        }
    }
    Ok(())
}

#[test]
fn full_finetune_gradients_match_finite_differences() -> Result<()> {
    for (ty, tied) in [("llama", true), ("llama", false), ("qwen2", false)] {
        let m = tiny_model(&tiny_config(ty, tied), &TrainSpec { full: true, ..Default::default() }, DType::F64)?;
        let n = m.trainable().len();
        let expect = 2 + 2 * 2 + 7 * 2 + usize::from(!tied) + if ty == "qwen2" { 3 * 2 } else { 0 };
        assert_eq!(n, expect, "{ty}: trainable parameter count");
        check_grads(&m)?;
    }
    Ok(())
}

fn lora(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        rslora: false,
        init_b_zero: false,
    }
}

#[test]
fn lora_gradients_match_finite_differences_and_base_stays_frozen() -> Result<()> {
    let spec = TrainSpec {
        lora: Some(lora(&ALL_LINEAR)),
        modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
        ..Default::default()
    };
    let m = tiny_model(&tiny_config("llama", true), &spec, DType::F64)?;
    let names: Vec<String> = m.trainable().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 7 * 2 + 2, "{names:?}");
    assert!(names.contains(&"model.layers.1.mlp.down_proj.lora_B.weight".to_string()));
    assert!(names.contains(&"lm_head.weight".to_string()) && names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(!names.iter().any(|n| n.ends_with("q_proj.weight")));
    check_grads(&m)
}

#[test]
fn lora_with_zero_b_is_the_base_model() -> Result<()> {
    let cfg = tiny_config("qwen2", false);
    let base = tiny_model(&cfg, &TrainSpec::default(), DType::F64)?;
    let mut spec = TrainSpec { lora: Some(lora(&["q_proj", "v_proj"])), ..Default::default() };
    if let Some(l) = spec.lora.as_mut() {
        l.init_b_zero = true;
    }
    let mut with = tiny_model(&cfg, &spec, DType::F64)?;
    let b = base.batch(&rows())?;
    let d = (base.logits(&b)? - with.logits(&b)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert_eq!(d, 0.0);
    // B != 0: logits = base + scale * x A^T B^T on q and v only.
    let l = with
        .linears_mut()
        .into_iter()
        .find(|l| l.name.ends_with("layers.0.self_attn.q_proj"))
        .map(|l| l.lora.is_some());
    assert_eq!(l, Some(true));
    Ok(())
}

#[test]
fn packed_sequences_do_not_see_each_other() -> Result<()> {
    let m = tiny_model(&tiny_config("llama", true), &TrainSpec::default(), DType::F64)?;
    let packed = rows();
    let lp = m.logits(&m.batch(&packed[..1])?)?;
    let r = &packed[0];
    let split = |a: usize, l: usize| Row {
        input_ids: r.input_ids[a..a + l].to_vec(),
        labels: r.labels[a..a + l].to_vec(),
        position_ids: r.position_ids[a..a + l].to_vec(),
        seq_lens: vec![l],
    };
    let l1 = m.logits(&m.batch(&[split(0, 4)])?)?;
    let l2 = m.logits(&m.batch(&[split(4, 4)])?)?;
    let alone = Tensor::cat(&[l1, l2], 0)?;
    let d = (lp - alone)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d < 1e-12, "packed vs alone differ by {d}");
    // And the second sequence does depend on its own prefix.
    let mut other = split(4, 4);
    other.input_ids[0] = 11;
    let l3 = m.logits(&m.batch(&[other])?)?;
    let l2 = m.logits(&m.batch(&[split(4, 4)])?)?;
    assert!((l3 - l2)?.abs()?.max_all()?.to_scalar::<f64>()? > 1e-6);
    Ok(())
}

#[test]
fn frozen_weights_get_no_gradient() -> Result<()> {
    let spec = TrainSpec { lora: Some(lora(&["q_proj"])), ..Default::default() };
    let m = tiny_model(&tiny_config("llama", false), &spec, DType::F64)?;
    let b = m.batch(&rows())?;
    let g = m.loss_sum(&b, Fwd::EVAL)?.backward()?;
    for (name, w) in m.named_weights() {
        match w {
            Weight::Frozen(t) => assert!(g.get(&t).is_none(), "{name} is frozen but got a gradient"),
            Weight::Train(v) => assert!(g.get(v.as_tensor()).is_some(), "{name}"),
            Weight::Nf4(..) => {}
        }
    }
    Ok(())
}

/// A batch's rotary tables are rows of the cached ones, which grow past
/// the largest position seen: the same values as computing each position's
/// angles directly (f32 angles as `transformers`, f64 in f64), in order.
#[test]
fn rotary_tables_are_cached_rows_of_the_direct_formula() -> Result<()> {
    for dt in [DType::F32, DType::BF16, DType::F64] {
        let m = tiny_model(&tiny_config("llama", true), &TrainSpec::default(), dt)?;
        let freqs = m.inv_freq().to_vec();
        // Small positions first (the tables start at 256), then past them.
        for pos in [vec![3u32, 0, 7, 3], vec![5, 1000, 2, 999, 0], vec![]] {
            let (cos, sin) = m.rotary(&pos)?;
            assert_eq!(cos.dims(), &[pos.len(), freqs.len()]);
            assert_eq!(cos.dtype(), dt);
            let direct = |f: fn(f64) -> f64, g: fn(f32) -> f32| -> Result<Tensor> {
                let v: Vec<f64> = pos
                    .iter()
                    .flat_map(|&p| {
                        freqs.iter().map(move |&fr| {
                            if dt == DType::F64 {
                                f(p as f64 * fr)
                            } else {
                                g(p as f32 * fr as f32) as f64
                            }
                        })
                    })
                    .collect();
                let t = Tensor::from_vec(v, (pos.len(), freqs.len()), &Device::Cpu)?;
                Ok(if dt == DType::F64 { t } else { t.to_dtype(DType::F32)?.to_dtype(dt)? })
            };
            for (got, want) in [(&cos, direct(f64::cos, f32::cos)?), (&sin, direct(f64::sin, f32::sin)?)] {
                let (a, b) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
                let diff = (a - b)?.abs()?.flatten_all()?.max(0).map_or(0.0, |t| t.to_scalar::<f64>().unwrap_or(1.0));
                assert_eq!(diff, 0.0, "{dt:?} positions {pos:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn bad_rows_are_rejected() -> Result<()> {
    let m = tiny_model(&tiny_config("llama", true), &TrainSpec::default(), DType::F32)?;
    let mut r = rows();
    r[0].seq_lens = vec![3, 4];
    assert!(m.batch(&r).is_err());
    let mut r = rows();
    r[1].input_ids[0] = 99;
    assert!(m.batch(&r).is_err());
    Ok(())
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() -> Result<()> {
    for spec in [
        TrainSpec { full: true, ..Default::default() },
        TrainSpec { lora: Some(LoraSpec { dropout: 0.3, ..lora(&ALL_LINEAR) }), ..Default::default() },
    ] {
        let m = tiny_model(&tiny_config("llama", true), &spec, DType::F64)?;
        let b = m.batch(&rows())?;
        let vars: Vec<_> = m.trainable().into_iter().map(|(_, v)| v).collect();
        let fx = Fwd { train: true, seed: 5 };
        let (l1, g1) = m.loss_and_grads(&b, fx, 0.5, &vars, false)?;
        let (l2, g2) = m.loss_and_grads(&b, fx, 0.5, &vars, true)?;
        assert!((l1 - l2).abs() < 1e-12, "{l1} vs {l2}");
        for (a, c) in g1.iter().zip(&g2) {
            let (a, c) = (a.as_ref().expect("grad"), c.as_ref().expect("grad"));
            let d = (a - c)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-10, "checkpointed gradient differs by {d}");
        }
        // A backward pass a layer at a time (data parallelism's), with and
        // without checkpointing: the same gradients, and each layer
        // reported once, last first, with its gradients in place by then.
        let names: Vec<String> = m.trainable().into_iter().map(|(n, _)| n).collect();
        for ckpt in [false, true] {
            let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
            let mut seen = Vec::new();
            let mut hook = |i: usize, g: &mut [Option<Tensor>]| -> crate::nn::Result<()> {
                for (n, g) in names.iter().zip(g.iter()) {
                    if crate::nn::dist::layer_of(n) == Some(i) {
                        assert!(g.is_some(), "{n}: no gradient when layer {i} is reported");
                    }
                }
                seen.push(i);
                Ok(())
            };
            let l3 = m.loss_and_grads_into(&b, fx, 0.5, &vars, ckpt, &mut acc, Some(&mut hook))?;
            assert_eq!(seen, (0..m.layers.len()).rev().collect::<Vec<_>>());
            assert!((l1 - l3).abs() < 1e-12, "{l1} vs {l3}");
            for (a, c) in acc.iter().zip(&g1) {
                let (a, c) = (a.as_ref().expect("grad"), c.as_ref().expect("grad"));
                let d = (a - c)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(d < 1e-10, "layer-by-layer gradient (checkpointing {ckpt}) differs by {d}");
            }
        }
    }
    Ok(())
}

#[test]
fn merging_lora_into_the_weights_gives_the_same_logits() -> Result<()> {
    let cfg = tiny_config("qwen2", false);
    let spec = TrainSpec { lora: Some(LoraSpec { rslora: true, ..lora(&ALL_LINEAR) }), ..Default::default() };
    let mut m = tiny_model(&cfg, &spec, DType::F64)?;
    let b = m.batch(&rows())?;
    let with_lora = m.logits(&b)?;
    for l in m.linears_mut() {
        if l.lora.is_some() {
            assert!(
                (l.lora.as_ref().map(|x| x.scale).unwrap_or(0.0) - 8.0 / 2.0).abs() < 1e-12,
                "rslora: alpha/sqrt(r)"
            );
            l.w = Weight::Frozen(l.merged_weight()?);
            l.lora = None;
        }
    }
    let merged = m.logits(&b)?;
    let d = (with_lora - merged)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d < 1e-12, "merged differs by {d}");
    Ok(())
}

/// `AddMatmul` (acc += alpha * op(p) @ op(q) in place, cuBLAS with beta
/// one) against the product on the CPU in f64, for each pair of
/// transposes, in f32 and bf16; a misfit is an error. On the GPU machine;
/// skipped elsewhere.
#[test]
fn add_matmul_matches_the_product_on_cuda() -> Result<()> {
    // (And `scaled_matmul`, the same product into a new tensor.)
    use crate::nn::ops::AddMatmul;
    let Some(dev) = cuda_device()? else { return Ok(()) };
    let (m, n, k, alpha) = (37, 21, 13, 0.37);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let p = Tensor::randn(0f64, 1.0, if ta { (k, m) } else { (m, k) }, &Device::Cpu)?;
        let q = Tensor::randn(0f64, 1.0, if tb { (n, k) } else { (k, n) }, &Device::Cpu)?;
        let acc = Tensor::randn(0f64, 1.0, (m, n), &Device::Cpu)?;
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let on = |t: &Tensor| t.to_dtype(dt)?.to_device(&dev);
            let (pg, qg, ag) = (on(&p)?, on(&q)?, on(&acc)?);
            ag.inplace_op3(&pg, &qg, &AddMatmul { ta, tb, alpha })?;
            // The reference from the same (rounded) inputs.
            let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
            let (pr, qr) = (back(&pg)?, back(&qg)?);
            let (pr, qr) = (if ta { pr.t()? } else { pr }, if tb { qr.t()? } else { qr });
            let want = (back(&on(&acc)?)? + (pr.matmul(&qr)? * alpha)?)?;
            let e = rel_err(&ag, &want)?;
            assert!(e < tol, "ta {ta} tb {tb} {dt:?}: off by {e}");
            // The scaled product alone (cuBLAS's alpha, a fresh output),
            // against the same reference; also from a transposed view.
            let got = crate::nn::ops::scaled_matmul(&pg, ta, &qg, tb, alpha)?;
            let e = rel_err(&got, &(pr.matmul(&qr)? * alpha)?)?;
            assert!(e < tol, "scaled: ta {ta} tb {tb} {dt:?}: off by {e}");
            let got = crate::nn::ops::scaled_matmul(&pg.t()?, !ta, &qg, tb, alpha)?;
            let e = rel_err(&got, &(pr.matmul(&qr)? * alpha)?)?;
            assert!(e < tol, "scaled, a view: ta {ta} tb {tb} {dt:?}: off by {e}");
        }
    }
    let p = Tensor::zeros((3, 5), DType::F32, &dev)?;
    assert!(crate::nn::ops::scaled_matmul(&p, false, &p, false, 2.0).is_err(), "(3, 5) @ (3, 5) does not fit");
    let a = Tensor::zeros((3, 4), DType::F32, &dev)?;
    let p = Tensor::zeros((3, 5), DType::F32, &dev)?;
    let bad = a.inplace_op3(&p, &p, &AddMatmul { ta: false, tb: false, alpha: 1.0 });
    assert!(bad.is_err(), "(3, 5) @ (3, 5) does not fit");
    Ok(())
}

/// The trained matmul's backward pass adds `dy @ w` into x's gradient so
/// far when nothing else shares it (two products of one input: the second
/// finds the first's), and adds as before when something does (a residual
/// around the product: the add's gradient is shared); in both the
/// gradients match the composition's in f64. On the GPU machine; skipped
/// elsewhere.
#[test]
fn trained_matmul_adds_into_the_gradient_so_far_on_cuda() -> Result<()> {
    use crate::nn::ops::trained_matmul;
    use candle_core::Var;
    let Some(dev) = cuda_device()? else { return Ok(()) };
    let cpu = Device::Cpu;
    let (m, k, n) = (37, 24, 16);
    let x = Tensor::randn(0f64, 1.0, (m, k), &cpu)?;
    let w1 = Tensor::randn(0f64, 1.0, (n, k), &cpu)?;
    let w2 = Tensor::randn(0f64, 1.0, (n, k), &cpu)?;
    let w3 = Tensor::randn(0f64, 1.0, (k, k), &cpu)?;
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let on = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(dt)?.to_device(&dev)?)?) };
        let back = |t: &Var| -> Result<Var> { Ok(Var::from_tensor(&t.to_device(&cpu)?.to_dtype(DType::F64)?)?) };
        let [xg, w1g, w2g, w3g] = [&x, &w1, &w2, &w3].map(on);
        let (xg, w1g, w2g, w3g) = (xg?, w1g?, w2g?, w3g?);
        let (xr, w1r, w2r, w3r) = (back(&xg)?, back(&w1g)?, back(&w2g)?, back(&w3g)?);
        let two = |x: &Tensor, a: &Tensor, b: &Tensor| -> Result<Tensor> {
            Ok((trained_matmul(x, a)? + trained_matmul(x, b)?)?)
        };
        // (what, pipe's, the composition's, (GPU var, CPU var) pairs)
        type Case<'a> = (&'a str, Tensor, Tensor, Vec<(&'a Var, &'a Var)>);
        let cases: [Case; 2] = [
            (
                "two products",
                two(&xg, &w1g, &w2g)?,
                (xr.matmul(&w1r.t()?)? + xr.matmul(&w2r.t()?)?)?,
                vec![(&xg, &xr), (&w1g, &w1r), (&w2g, &w2r)],
            ),
            (
                "x plus a product",
                (xg.as_tensor() + trained_matmul(&xg, &w3g)?)?,
                (xr.as_tensor() + xr.matmul(&w3r.t()?)?)?,
                vec![(&xg, &xr), (&w3g, &w3r)],
            ),
        ];
        for (what, got, want, vars) in cases {
            let dy = Tensor::randn(0f64, 1.0, want.dims(), &cpu)?;
            let gg = (got.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?.to_device(&dev)?)?.sum_all()?.backward()?;
            let gw = (&want * &dy)?.sum_all()?.backward()?;
            for (i, (a, b)) in vars.into_iter().enumerate() {
                let e = rel_err(gg.get(a).expect("grad"), gw.get(b).expect("grad"))?;
                assert!(e < tol, "{what}, {dt:?}: gradient {i} off by {e}");
            }
        }
    }
    Ok(())
}

#[test]
fn fused_chunked_head_cross_entropy_matches_the_plain_composition() -> Result<()> {
    use crate::nn::ops::{cross_entropy_sum, lm_head_cross_entropy};
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rnd = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let (m, d, v) = (10, 6, 13);
    let h0 = candle_core::Var::from_tensor(&Tensor::from_vec(rnd(m * d), (m, d), &dev)?)?;
    let w0 = candle_core::Var::from_tensor(&Tensor::from_vec(rnd(v * d), (v, d), &dev)?)?;
    let t = Tensor::from_vec((0..m as u32).map(|i| (i * 7) % v as u32).collect::<Vec<_>>(), m, &dev)?;
    let plain = (cross_entropy_sum(&h0.matmul(&w0.t()?)?, &t)? * 0.3)?;
    let gp = plain.backward()?;
    // Told the loss's scale (the gradients made for it), or not (scaled
    // again in the backward pass), or told a wrong one: the same gradients.
    for (chunk, gs) in [(1, 0.3), (3, 0.3), (10, 1.0), (64, 0.3), (3, 2.0), (4, 0.0)] {
        let fused = (lm_head_cross_entropy(h0.as_tensor(), w0.as_tensor(), &t, chunk, gs)? * 0.3)?;
        let d0 = (fused.to_scalar::<f64>()? - plain.to_scalar::<f64>()?).abs();
        assert!(d0 < 1e-12, "chunk {chunk}: loss differs by {d0}");
        let gf = fused.backward()?;
        for var in [&h0, &w0] {
            let a = gp.get(var.as_tensor()).expect("plain grad");
            let b = gf.get(var.as_tensor()).expect("fused grad");
            let dd = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(dd < 1e-12, "chunk {chunk}, grad_scale {gs}: gradient differs by {dd}");
        }
    }
    // A frozen head gets no gradient.
    let w1 = w0.as_tensor().detach();
    let g = lm_head_cross_entropy(h0.as_tensor(), &w1, &t, 4, 1.0)?.backward()?;
    assert!(g.get(&w1).is_none() && g.get(h0.as_tensor()).is_some());
    // On CUDA (f32, bf16): the CE kernel, and the head's gradient summed
    // over the chunks in place (cuBLAS, beta 1).
    if let Some(cd) = cuda_device()? {
        for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
            let h = candle_core::Var::from_tensor(&h0.as_tensor().to_dtype(dt)?.to_device(&cd)?)?;
            let w = candle_core::Var::from_tensor(&w0.as_tensor().to_dtype(dt)?.to_device(&cd)?)?;
            let tc = t.to_device(&cd)?;
            for (chunk, gs) in [(1, 0.3), (3, 1.0), (10, 0.3)] {
                let fused = (lm_head_cross_entropy(h.as_tensor(), w.as_tensor(), &tc, chunk, gs)? * 0.3)?;
                let loss = fused.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let want = plain.to_scalar::<f64>()?;
                assert!((loss - want).abs() < tol * want.abs(), "{dt:?} chunk {chunk}: loss {loss} vs {want}");
                let gf = fused.backward()?;
                for (var, var0) in [(&h, &h0), (&w, &w0)] {
                    let b = gf.get(var.as_tensor()).expect("cuda grad").to_device(&dev)?.to_dtype(DType::F64)?;
                    let e = rel_err(&b, gp.get(var0.as_tensor()).expect("plain grad"))?;
                    assert!(e < tol, "{dt:?} chunk {chunk}: gradient off by {e}");
                }
            }
        }
    }
    Ok(())
}

/// `backward_from(y, d)` gives the gradients of `sum(y * d)` exactly, and
/// refuses a gradient of another shape.
#[test]
fn backward_from_a_seed_matches_the_summed_product() -> Result<()> {
    use crate::nn::ops::backward_from;
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &dev)?)?;
    let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 3), &dev)?)?;
    let y = x.as_tensor().matmul(w.as_tensor())?.tanh()?;
    let d = Tensor::randn(0f32, 1.0, (7, 3), &dev)?;
    let want = (&y * &d)?.sum_all()?.backward()?;
    let got = backward_from(&y, &d)?;
    for v in [&x, &w] {
        let (a, b) = (got.get(v.as_tensor()).expect("grad"), want.get(v.as_tensor()).expect("grad"));
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    }
    let err = backward_from(&y, &Tensor::zeros((3, 7), DType::F32, &dev)?).unwrap_err().to_string();
    assert!(err.contains("[3, 7]") && err.contains("[7, 3]"), "{err}");
    Ok(())
}

/// The data pointer of a CPU f32 tensor's storage (which buffer it is).
fn f32_buffer(t: &Tensor) -> *const f32 {
    let (s, _) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.as_ptr(),
        _ => panic!("not a CPU f32 tensor"),
    }
}

/// The backward pass stores a tensor's first gradient as is (the patch in
/// vendor/candle-core/PIPE-PATCH.md: candle added it to a new tensor of
/// zeros), sums later ones, and still refuses a gradient of the wrong
/// shape or dtype from an op's backward.
#[test]
fn backward_stores_a_first_gradient_as_is() -> Result<()> {
    use crate::nn::ops::backward_from;
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3), &dev)?)?;
    let d = Tensor::randn(0f32, 1.0, 6, &dev)?;
    // reshape's backward is a view of `d`: the same buffer, not a sum with zeros.
    let g = backward_from(&x.as_tensor().reshape(6)?, &d)?;
    let gx = g.get(x.as_tensor()).expect("grad");
    assert_eq!(f32_buffer(gx), f32_buffer(&d), "the gradient was copied");
    assert_eq!(gx.flatten_all()?.to_vec1::<f32>()?, d.to_vec1::<f32>()?);
    // A transpose's backward is a strided view: stored contiguous, as the
    // sum with zeros was (scatter_add and index_add need that).
    let dt = Tensor::randn(0f32, 1.0, (3, 2), &dev)?;
    let g = backward_from(&x.as_tensor().t()?, &dt)?;
    let gx = g.get(x.as_tensor()).expect("grad");
    assert!(gx.is_contiguous());
    assert_eq!(gx.to_vec2::<f32>()?, dt.t()?.to_vec2::<f32>()?);
    // Two uses: the second gradient is added to the first.
    let y = (x.as_tensor() + x.as_tensor().affine(2.0, 0.0)?)?.reshape(6)?;
    let g = backward_from(&y, &d)?;
    let want = (&d * 3.0)?.to_vec1::<f32>()?;
    assert_eq!(g.get(x.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f32>()?, want);

    // An op whose backward returns a gradient that does not fit its input.
    struct Bad(Tensor);
    impl candle_core::CustomOp1 for Bad {
        fn name(&self) -> &'static str {
            "bad-grad"
        }
        fn cpu_fwd(
            &self,
            s: &candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            Ok((s.clone(), l.shape().clone()))
        }
        fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
            Ok(Some(self.0.clone()))
        }
    }
    for (bad, want) in [
        (Tensor::zeros(3, DType::F32, &dev)?, "shape mismatch"),
        (Tensor::zeros((2, 3), DType::F64, &dev)?, "dtype mismatch"),
    ] {
        let y = x.as_tensor().apply_op1(Bad(bad))?;
        let err = backward_from(&y, &Tensor::zeros((2, 3), DType::F32, &dev)?).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    Ok(())
}

#[test]
fn fused_causal_softmax_matches_the_masked_composition() -> Result<()> {
    use crate::nn::ops::{causal_softmax, softmax};
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (g, rep, l) = (2, 3, 5);
    let v: Vec<f64> = (0..g * rep * l * l).map(|_| rng.random_range(-3.0..3.0)).collect();
    let x = candle_core::Var::from_tensor(&Tensor::from_vec(v, (g, rep * l, l), &dev)?)?;
    let mask: Vec<f64> = (0..rep * l * l).map(|i| if i % l > (i / l) % l { f64::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (rep * l, l), &dev)?;
    let w = Tensor::from_vec(
        (0..g * rep * l * l).map(|i| (i % 7) as f64 - 3.0).collect::<Vec<_>>(),
        (g, rep * l, l),
        &dev,
    )?;
    let plain = softmax(&x.broadcast_add(&mask)?)?;
    let fused = causal_softmax(x.as_tensor())?;
    assert!((&plain - &fused)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-14);
    let gp = (plain * &w)?.sum_all()?.backward()?;
    let gf = (fused * &w)?.sum_all()?.backward()?;
    let d = (gp.get(x.as_tensor()).expect("g") - gf.get(x.as_tensor()).expect("g"))?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(d < 1e-12, "gradients differ by {d}");
    // The composition used off the CPU (its mask made on the device): same
    // values and gradients.
    let composed = crate::nn::ops::causal_softmax_composed(x.as_tensor())?;
    let fused = causal_softmax(x.as_tensor())?;
    assert!((&composed - &fused)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-14);
    let gc = (composed * &w)?.sum_all()?.backward()?;
    let d = (gc.get(x.as_tensor()).expect("g") - gf.get(x.as_tensor()).expect("g"))?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(d < 1e-12, "gradients differ by {d}");
    let m = crate::nn::ops::causal_mask(2, 3, DType::F32, &dev)?.to_vec2::<f32>()?;
    assert_eq!(m, [[0.0, 0.0, 0.0, 0.0, -1e30], [0.0; 5]]);
    Ok(())
}

/// Training on CUDA (the fused attention: head dim 64; the fused norm,
/// rotary and SwiGLU kernels) gives the loss and gradients of the CPU
/// composition in f64, LoRA and full fine-tuning, with and without
/// gradient checkpointing. Run on the GPU machine; skipped elsewhere.
#[test]
fn cuda_training_step_matches_the_cpu() -> Result<()> {
    let Some(dev) = cuda_device()? else { return Ok(()) };
    let mut cfg = tiny_config("llama", true);
    (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) = (192, 3, Some(1));
    for spec in [
        TrainSpec { lora: Some(lora(&ALL_LINEAR)), ..Default::default() },
        TrainSpec { full: true, ..Default::default() },
    ] {
        let r = tiny_model(&cfg, &spec, DType::F64)?;
        let m = tiny_model_on(&cfg, &spec, DType::F32, &dev)?;
        let fx = Fwd { train: true, seed: 5 };
        let vars = |m: &Llama| m.trainable().into_iter().map(|(_, v)| v).collect::<Vec<_>>();
        let (lr, gr) = r.loss_and_grads(&r.batch(&rows())?, fx, 0.5, &vars(&r), false)?;
        for ckpt in [false, true] {
            let b = m.batch(&rows())?;
            assert!(crate::nn::flash::usable(&Tensor::zeros((1, 3, 64), DType::F32, &dev)?));
            let added = || crate::nn::fused::ROWS_ADDED_IN_PLACE.with(|c| c.get());
            let before = added();
            let (l, g) = m.loss_and_grads(&b, fx, 0.5, &vars(&m), ckpt)?;
            // Full fine-tuning trains the tied table: in one backward pass
            // (no checkpointing) the embedding's rows go into the head's
            // gradient in place; checkpointing's pass for the embedding
            // alone has no gradient so far to add to.
            let in_place = spec.full && !ckpt;
            assert_eq!(added() - before, usize::from(in_place), "full {}, checkpointing {ckpt}", spec.full);
            assert!((l - lr).abs() < 1e-4 * lr.abs().max(1.0), "checkpointing {ckpt}: loss {l} vs {lr}");
            for (a, c) in g.iter().zip(&gr) {
                let (a, c) = (
                    a.as_ref().expect("grad").to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
                    c.as_ref().expect("grad"),
                );
                let d = (&a - c)?.abs()?.max_all()?.to_scalar::<f64>()?;
                let s = c.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-6);
                assert!(d / s < 1e-3, "full {}, checkpointing {ckpt}: gradient off by {d} (max {s})", spec.full);
            }
        }
    }
    Ok(())
}

/// Full fine-tuning in bf16 on CUDA takes q, k and v from one product
/// (`Llama::packed_attention`): the loss and every gradient match the
/// three products' path, with and without checkpointing, and the loss the
/// f64 CPU reference's.
#[test]
fn packed_qkv_training_matches_the_three_products_on_cuda() -> Result<()> {
    let Some(dev) = cuda_device()? else { return Ok(()) };
    let mut cfg = tiny_config("llama", true);
    (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) = (192, 3, Some(1));
    let spec = TrainSpec { full: true, ..Default::default() };
    let r = tiny_model(&cfg, &spec, DType::F64)?;
    let m = tiny_model_on(&cfg, &spec, DType::BF16, &dev)?;
    assert!(crate::nn::flash::packed_usable(&Tensor::zeros(1, DType::BF16, &dev)?, 64));
    let fx = Fwd { train: true, seed: 5 };
    let vars = |m: &Llama| m.trainable().into_iter().map(|(_, v)| v).collect::<Vec<_>>();
    let (lr, _) = r.loss_and_grads(&r.batch(&rows())?, fx, 0.5, &vars(&r), false)?;
    for ckpt in [false, true] {
        let run = |packed: bool| {
            crate::nn::llama::PACKED_QKV.with(|c| c.set(Some(packed)));
            let out = m.loss_and_grads(&m.batch(&rows())?, fx, 0.5, &vars(&m), ckpt);
            crate::nn::llama::PACKED_QKV.with(|c| c.set(None));
            out
        };
        let before = crate::nn::llama::PACKED_RUNS.with(|c| c.get());
        let (lp, gp) = run(true)?;
        let after = crate::nn::llama::PACKED_RUNS.with(|c| c.get());
        assert!(after > before, "checkpointing {ckpt}: the packed path did not run");
        let (l3, g3) = run(false)?;
        assert_eq!(crate::nn::llama::PACKED_RUNS.with(|c| c.get()), after, "PACKED_QKV off still packed");
        assert!((lp - lr).abs() < 2e-2 * lr.abs(), "checkpointing {ckpt}: packed loss {lp} vs f64 {lr}");
        assert!((lp - l3).abs() < 1e-2 * l3.abs(), "checkpointing {ckpt}: packed loss {lp} vs {l3}");
        for ((name, _), (a, b)) in m.trainable().iter().zip(gp.iter().zip(&g3)) {
            let (a, b) =
                (a.as_ref().expect("grad").to_dtype(DType::F32)?, b.as_ref().expect("grad").to_dtype(DType::F32)?);
            let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            assert!(d / s < 2e-2, "checkpointing {ckpt}: {name}: packed gradient off by {d} (max {s})");
        }
    }
    Ok(())
}

/// `frozen_matmul` and `nf4_matmul` (on the storages, no copies) give the
/// plain product and its input gradient; the NF4 one equals the product
/// with the dequantised weight; shapes that do not fit are refused.
#[test]
fn frozen_and_nf4_matmuls_match_the_plain_product() -> Result<()> {
    use crate::nn::nf4::Nf4Tensor;
    use crate::nn::ops::{frozen_matmul, nf4_matmul};
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 128), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (3, 128), &dev)?;
    let dy = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
    let want = x.matmul(&w.t()?)?;
    let want_dx = (&want * &dy)?.sum_all()?.backward()?.remove(x.as_tensor()).expect("dx");
    let got = frozen_matmul(x.as_tensor(), &w)?;
    assert!(rel_err(&got, &want)? < 1e-6);
    let dx = (&got * &dy)?.sum_all()?.backward()?.remove(x.as_tensor()).expect("dx");
    assert!(rel_err(&dx, &want_dx)? < 1e-6);
    let q = std::sync::Arc::new(Nf4Tensor::quantize(&w)?);
    let wq = q.dequantize(&dev, DType::F32)?;
    let want = x.matmul(&wq.t()?)?;
    let want_dx = (&want * &dy)?.sum_all()?.backward()?.remove(x.as_tensor()).expect("dx");
    let got = nf4_matmul(x.as_tensor(), &q)?;
    assert!(rel_err(&got, &want)? < 1e-6);
    let dx = (&got * &dy)?.sum_all()?.backward()?.remove(x.as_tensor()).expect("dx");
    assert!(rel_err(&dx, &want_dx)? < 1e-6);
    let bad = Tensor::zeros((3, 64), DType::F32, &dev)?;
    assert!(frozen_matmul(x.as_tensor(), &bad).is_err(), "k 128 vs 64");
    Ok(())
}

/// The CPU's small-batch product equals candle's matmul (odd widths, rows
/// 1..16, a row count past one task, widths taken in blocks with and
/// without a tail) and steps aside where it does not apply (more rows,
/// f64, a tracked input).
#[test]
fn cpu_small_matmul_matches_the_plain_product() -> Result<()> {
    use crate::nn::ops::cpu_small_matmul;
    let dev = Device::Cpu;
    for (m, k, n) in [
        (1, 576, 1536),
        (2, 64, 40),
        (3, 37, 70),
        (4, 1000, 17),
        (6, 1100, 33),
        (7, 64, 9),
        (8, 100, 33),
        (8, 1536, 40),
        (5, 16, 1),
        (12, 576, 70),
        (16, 1536, 9),
        (32, 576, 40),
        (25, 100, 7),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let got = cpu_small_matmul(&x, &w)?.expect("applies");
        assert_eq!(got.dims(), [m, n]);
        assert!(rel_err(&got, &x.matmul(&w.t()?)?)? < 1e-5, "{m}x{k} @ {n}x{k}");
        // A strided view of x (every other column) is not taken.
        let wide = Tensor::randn(0f32, 1.0, (m, 2 * k), &dev)?;
        assert!(cpu_small_matmul(&wide.narrow(1, 0, k)?, &w)?.is_none() || m == 1);
    }
    let w = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
    assert!(cpu_small_matmul(&Tensor::zeros((33, 8), DType::F32, &dev)?, &w)?.is_none(), "33 rows");
    assert!(cpu_small_matmul(&Tensor::zeros((2, 8), DType::F64, &dev)?, &w)?.is_none(), "f64");
    let v = candle_core::Var::from_tensor(&Tensor::zeros((2, 8), DType::F32, &dev)?)?;
    assert!(cpu_small_matmul(v.as_tensor(), &w)?.is_none(), "tracked input");
    Ok(())
}

/// `trained_matmul` gives the composition's product and both gradients
/// (the weight's in its own layout), on the CPU in f32 and on CUDA in f32
/// and bf16 where there is a GPU; bad shapes and dtypes are refused.
#[test]
fn trained_matmul_matches_the_composition() -> Result<()> {
    use crate::nn::ops::trained_matmul;
    let mut cases = vec![(Device::Cpu, DType::F32, 1e-5)];
    if let Some(d) = cuda_device()? {
        cases.extend([(d.clone(), DType::F32, 1e-4), (d, DType::BF16, 2e-2)]);
    }
    for (dev, dt, tol) in cases {
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 64), &dev)?.to_dtype(dt)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (24, 64), &dev)?.to_dtype(dt)?)?;
        let dy = Tensor::randn(0f32, 1.0, (37, 24), &dev)?.to_dtype(dt)?;
        let want = x.matmul(&w.t()?)?;
        let mut g = (&want * &dy)?.sum_all()?.backward()?;
        let (want_dx, want_dw) = (g.remove(x.as_tensor()).expect("dx"), g.remove(w.as_tensor()).expect("dw"));
        let got = trained_matmul(x.as_tensor(), w.as_tensor())?;
        assert!(rel_err(&got, &want)? < tol, "{dt:?} product");
        let mut g = (&got * &dy)?.sum_all()?.backward()?;
        let (dx, dw) = (g.remove(x.as_tensor()).expect("dx"), g.remove(w.as_tensor()).expect("dw"));
        assert!(rel_err(&dx, &want_dx)? < tol, "{dt:?} dx");
        assert_eq!(dw.dims(), w.dims());
        assert!(rel_err(&dw, &want_dw)? < tol, "{dt:?} dw");
        // Held in the gradient store for the whole backward pass: no graph.
        assert!(!dx.track_op() && !dw.track_op(), "{dt:?} gradients keep a graph");
        // Only the gradients asked for: a frozen input gets none.
        let xc = x.as_tensor().detach();
        let g = trained_matmul(&xc, w.as_tensor())?.sum_all()?.backward()?;
        assert!(g.get(&xc).is_none() && g.get(w.as_tensor()).is_some());
    }
    let x = Tensor::zeros((5, 64), DType::F32, &Device::Cpu)?;
    assert!(trained_matmul(&x, &Tensor::zeros((3, 32), DType::F32, &Device::Cpu)?).is_err(), "k 64 vs 32");
    assert!(trained_matmul(&x, &Tensor::zeros((3, 64), DType::F64, &Device::Cpu)?).is_err(), "dtypes");
    Ok(())
}

/// `lora_linear` (one op) gives the composition's output and gradients for
/// x, A and B, with a dense and an NF4 base, and refuses shapes that do
/// not fit.
#[test]
fn fused_lora_linear_matches_the_composition() -> Result<()> {
    use crate::nn::nf4::Nf4Tensor;
    use crate::nn::ops::{lora_linear, FrozenWeight};
    let dev = Device::Cpu;
    let (m, k, n, r, scale) = (7, 64, 5, 3, 2.5);
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (m, k), &dev)?)?;
    let a = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (r, k), &dev)?)?;
    let b = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, r), &dev)?)?;
    let dy = Tensor::randn(0f64, 1.0, (m, n), &dev)?;
    let w = Tensor::randn(0f64, 1.0, (n, k), &dev)?;
    let q = std::sync::Arc::new(Nf4Tensor::quantize(&w)?);
    for (what, base, frozen) in [
        ("dense", w.clone(), FrozenWeight::Dense(w.clone())),
        ("nf4", q.dequantize(&dev, DType::F64)?, FrozenWeight::Nf4(q.clone())),
    ] {
        let want = (x.matmul(&base.t()?)? + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?)?;
        let gw = (&want * &dy)?.sum_all()?.backward()?;
        let got = lora_linear(x.as_tensor(), frozen, a.as_tensor(), b.as_tensor(), scale, None)?;
        assert!(rel_err(&got, &want)? < 1e-12, "{what}: output");
        let gg = (&got * &dy)?.sum_all()?.backward()?;
        for (name, v) in [("dx", &x), ("da", &a), ("db", &b)] {
            let (Some(g1), Some(g2)) = (gg.get(v.as_tensor()), gw.get(v.as_tensor())) else {
                panic!("{what}: no {name}")
            };
            assert!(rel_err(g1, g2)? < 1e-12, "{what}: {name}");
            // Held in the gradient store for the whole backward pass: no graph.
            assert!(!g1.track_op(), "{what}: {name} keeps a graph");
        }
    }
    // A frozen input gets no gradient, the adapter still does.
    let xd = x.as_tensor().detach();
    let g = (lora_linear(&xd, FrozenWeight::Dense(w.clone()), a.as_tensor(), b.as_tensor(), scale, None)? * &dy)?
        .sum_all()?
        .backward()?;
    assert!(g.get(&xd).is_none() && g.get(a.as_tensor()).is_some() && g.get(b.as_tensor()).is_some());
    let bad = Tensor::zeros((n, r + 1), DType::F64, &dev)?;
    assert!(
        lora_linear(x.as_tensor(), FrozenWeight::Dense(w.clone()), a.as_tensor(), &bad, scale, None).is_err(),
        "r 3 vs 4"
    );
    // f32 on the CPU accumulates the update into the base product with one
    // gemm: the same values (to f32 rounding) at a small and a larger size.
    for (m, k, n, r) in [(7, 64, 5, 3), (300, 96, 72, 8)] {
        let t = |shape: (usize, usize)| Tensor::randn(0f64, 1.0, shape, &dev);
        let (x, a, b, w, dy) = (t((m, k))?, t((r, k))?, t((n, r))?, t((n, k))?, t((m, n))?);
        let want = (x.matmul(&w.t()?)? + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (xv, av, bv) = (
            candle_core::Var::from_tensor(&f(&x)?)?,
            candle_core::Var::from_tensor(&f(&a)?)?,
            candle_core::Var::from_tensor(&f(&b)?)?,
        );
        let got =
            lora_linear(xv.as_tensor(), FrozenWeight::Dense(f(&w)?), av.as_tensor(), bv.as_tensor(), scale, None)?;
        assert!(rel_err(&got, &want)? < 1e-5, "f32 {m}x{n}: output");
        let gg = (&got * &f(&dy)?)?.sum_all()?.backward()?;
        let (xw, aw, bw) = (
            candle_core::Var::from_tensor(&x)?,
            candle_core::Var::from_tensor(&a)?,
            candle_core::Var::from_tensor(&b)?,
        );
        let want = (xw.matmul(&w.t()?)? + (xw.matmul(&aw.t()?)?.matmul(&bw.t()?)? * scale)?)?;
        let gw = (&want * &dy)?.sum_all()?.backward()?;
        for (name, v32, v64) in [("dx", &xv, &xw), ("da", &av, &aw), ("db", &bv, &bw)] {
            let (Some(g1), Some(g2)) = (gg.get(v32.as_tensor()), gw.get(v64.as_tensor())) else {
                panic!("f32: no {name}")
            };
            assert!(rel_err(g1, g2)? < 1e-5, "f32 {m}x{n}: {name}");
        }
    }
    Ok(())
}

#[test]
fn causal_attention_probs_are_the_composition_to_the_bit() -> Result<()> {
    use crate::nn::ops::{causal_attention_probs, causal_softmax};
    let dev = Device::Cpu;
    // Two query heads a kv head folded into the rows (R = 2 L), f32 and f64.
    let (g, l, d) = (3, 7, 8);
    for dt in [DType::F32, DType::F64] {
        let q = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (g, 2 * l, d), &dev)?.to_dtype(dt)?)?;
        let k = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (g, l, d), &dev)?.to_dtype(dt)?)?;
        let dp = Tensor::randn(0f64, 1.0, (g, 2 * l, l), &dev)?.to_dtype(dt)?;
        let fused = causal_attention_probs(q.as_tensor(), &k.t()?)?;
        let plain = causal_softmax(&q.matmul(&k.t()?)?)?;
        let bits = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
        assert_eq!(bits(&fused)?, bits(&plain)?, "{dt:?}: probabilities");
        let gf = (&fused * &dp)?.sum_all()?.backward()?;
        let gp = (&plain * &dp)?.sum_all()?.backward()?;
        for (name, v) in [("dq", &q), ("dk", &k)] {
            let (Some(a), Some(b)) = (gf.get(v.as_tensor()), gp.get(v.as_tensor())) else {
                panic!("{dt:?}: no {name}")
            };
            assert_eq!(bits(a)?, bits(b)?, "{dt:?}: {name}");
        }
        // Row r is query position r % L: nothing after it.
        let p = fused.to_dtype(DType::F64)?.to_vec3::<f64>()?;
        assert!(p.iter().all(|h| h.iter().enumerate().all(|(r, row)| row[r % l + 1..].iter().all(|&x| x == 0.0))));
    }
    // One query head a kv head (R = L): the first row sees only key 0.
    let q = Tensor::randn(0f32, 1.0, (1, 5, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, 5, d), &dev)?;
    let p = causal_attention_probs(&q, &k.t()?)?.to_vec3::<f32>()?;
    assert_eq!(p[0][0], [1.0, 0.0, 0.0, 0.0, 0.0]);
    Ok(())
}

/// On the GPU machine: dropout masks made on the device (what LoRA's
/// dropout multiplies by there) are seeded, hold only 0 and the kept
/// factor, and drop about p of the elements, in f32 and bf16.
#[test]
fn cuda_dropout_masks_are_seeded_and_drop_about_p() -> Result<()> {
    use crate::nn::fused::dropout_values_cuda;
    let Some(dev) = cuda_device()? else { return Ok(()) };
    let shape = candle_core::Shape::from((1000, 1000));
    for dt in [DType::F32, DType::BF16] {
        let get = |seed: u64| -> Result<Vec<f32>> {
            Ok(dropout_values_cuda(&shape, dt, &dev, 0.3, seed)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let v = get(11)?;
        // The kept factor as stored in dt.
        let keep = Tensor::new(&[crate::nn::ops::dropout_keep(0.3) as f32], &Device::Cpu)?
            .to_dtype(dt)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?[0];
        assert!(v.iter().all(|&x| x == 0.0 || x == keep), "{dt:?}: values other than 0 and {keep}");
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((0.295..0.305).contains(&dropped), "{dt:?}: {dropped} dropped");
        assert_eq!(v, get(11)?, "{dt:?}: the same seed, the same mask");
        assert_ne!(v, get(12)?, "{dt:?}: another seed, another mask");
    }
    // Not on the CPU (its masks are drawn there: ops::dropout_mask).
    assert!(dropout_values_cuda(&shape, DType::F32, &Device::Cpu, 0.3, 11).is_err());
    Ok(())
}

#[test]
fn fused_lora_linear_with_dropout_matches_the_composition() -> Result<()> {
    use crate::nn::nf4::Nf4Tensor;
    use crate::nn::ops::{dropout_keep, dropout_mask, dropout_values, lora_linear, FrozenWeight, LoraDropout};
    let dev = Device::Cpu;
    let (p, seed, scale) = (0.3, 7u64, 2.5);
    let drop = Some(LoraDropout { p, seed });
    let t = |shape: (usize, usize)| Tensor::randn(0f64, 1.0, shape, &dev);
    for (m, k, n, r) in [(7, 64, 5, 3), (300, 96, 72, 8)] {
        let (x, a, b, w, dy) = (t((m, k))?, t((r, k))?, t((n, r))?, t((n, k))?, t((m, n))?);
        let bits = dropout_mask(p, seed, m * k);
        let kept = bits.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        assert!(kept > 0 && kept < m * k, "{m}x{k}: {kept} kept");
        let mask = dropout_values(&bits, dropout_keep(p), &candle_core::Shape::from((m, k)), DType::F64, &dev)?;
        // The composition, in f64, with the same mask.
        let (xw, aw, bw) = (
            candle_core::Var::from_tensor(&x)?,
            candle_core::Var::from_tensor(&a)?,
            candle_core::Var::from_tensor(&b)?,
        );
        let q = std::sync::Arc::new(Nf4Tensor::quantize(&w)?);
        for (what, base, frozen) in [
            ("dense", w.clone(), FrozenWeight::Dense(w.clone())),
            ("nf4", q.dequantize(&dev, DType::F64)?, FrozenWeight::Nf4(q.clone())),
        ] {
            let want = (xw.matmul(&base.t()?)? + (xw.mul(&mask)?.matmul(&aw.t()?)?.matmul(&bw.t()?)? * scale)?)?;
            let gw = (&want * &dy)?.sum_all()?.backward()?;
            // f64: the same values to rounding; f32: to f32 rounding.
            for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                let v = |t: &Tensor| candle_core::Var::from_tensor(&t.to_dtype(dt)?);
                let (xv, av, bv) = (v(&x)?, v(&a)?, v(&b)?);
                let fw = match &frozen {
                    FrozenWeight::Dense(w) => FrozenWeight::Dense(w.to_dtype(dt)?),
                    FrozenWeight::Nf4(q) => FrozenWeight::Nf4(q.clone()),
                };
                let got = lora_linear(xv.as_tensor(), fw, av.as_tensor(), bv.as_tensor(), scale, drop)?;
                let what = format!("{what} {dt:?} {m}x{n}");
                assert!(rel_err(&got.to_dtype(DType::F64)?, &want)? < tol, "{what}: output");
                let gg = (&got * &dy.to_dtype(dt)?)?.sum_all()?.backward()?;
                for (name, v, v64) in [("dx", &xv, &xw), ("da", &av, &aw), ("db", &bv, &bw)] {
                    let (Some(g1), Some(g2)) = (gg.get(v.as_tensor()), gw.get(v64.as_tensor())) else {
                        panic!("{what}: no {name}")
                    };
                    assert!(rel_err(&g1.to_dtype(DType::F64)?, g2)? < tol, "{what}: {name}");
                    assert!(!g1.track_op(), "{what}: {name} keeps a graph");
                }
            }
        }
    }
    // The mask: seeded (the same bits again, others for another seed),
    // about p of the elements dropped.
    let n = 100_000;
    let bits = dropout_mask(p, seed, n);
    assert_eq!(bits, dropout_mask(p, seed, n));
    assert_ne!(bits, dropout_mask(p, seed + 1, n));
    let dropped = n - bits.iter().map(|w| w.count_ones() as usize).sum::<usize>();
    assert!((0.29..0.31).contains(&(dropped as f64 / n as f64)), "{dropped} of {n} dropped");
    // Drawn in parallel chunks of the stream: the bits of one draw in
    // order (a ChaCha8 f64 an element), none past n.
    let n = 3 * 4096 + 37;
    for p in [p, 0.05, 0.1, 1.0 / 3.0, 0.0, 1.0] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let want: Vec<bool> = (0..n).map(|_| rng.random::<f64>() >= p).collect();
        let got = dropout_mask(p, seed, n);
        assert_eq!(got.len(), n.div_ceil(64));
        let same = want.iter().enumerate().all(|(i, &k)| (got[i / 64] >> (i % 64) & 1 == 1) == k);
        assert!(same, "parallel draw, p = {p}");
        assert_eq!(got[n / 64] >> (n % 64), 0, "bits past n");
        // The integer threshold keeps what the f64 comparison keeps, at
        // its edge too (draws there are too rare to meet above).
        let t = crate::nn::ops::dropout_keep_from(p);
        for v in [t.saturating_sub(2), t.saturating_sub(1), t, t + 1, (1 << 53) - 1] {
            assert_eq!(v >= t, v as f64 * (1.0 / (1u64 << 53) as f64) >= p, "draw {v}, p = {p}");
        }
    }
    // Dropout inside the op only in f32 or f64 (bf16: the caller composes it).
    let h = |shape: (usize, usize)| Tensor::zeros(shape, DType::BF16, &dev);
    let e = lora_linear(&h((2, 8))?, FrozenWeight::Dense(h((4, 8))?), &h((2, 8))?, &h((4, 2))?, scale, drop)
        .expect_err("bf16 with dropout")
        .to_string();
    assert!(e.contains("f32 or f64"), "{e}");
    Ok(())
}

#[test]
fn elementwise_ops_on_rayon_give_every_element() -> Result<()> {
    // candle's parallel element-wise ops (64k elements and more) through
    // rayon's pool (pipe's default, main.rs) instead of candle's barrier
    // pool: every chunk written, with the values of the element-wise
    // formula (a strided and a broadcast operand as well as dense ones).
    let n = 300_007;
    let a: Vec<f32> = (0..n).map(|i| (i % 1_000) as f32 * 0.01 - 3.0).collect();
    let b: Vec<f32> = (0..n).map(|i| (i % 77) as f32 * 0.5 + 1.0).collect();
    let (ta, tb) = (Tensor::from_vec(a.clone(), n, &Device::Cpu)?, Tensor::from_vec(b.clone(), n, &Device::Cpu)?);
    let m = Tensor::from_vec(a[..600 * 500].to_vec(), (600, 500), &Device::Cpu)?;
    let row = Tensor::from_vec(b[..500].to_vec(), 500, &Device::Cpu)?;
    super::set_elementwise_on_rayon(true);
    let sum = (&ta + &tb)?.to_vec1::<f32>()?;
    let exp = ta.exp()?.to_vec1::<f32>()?;
    let mt = m.t()?.mul(&m.t()?)?.t()?.flatten_all()?.to_vec1::<f32>()?;
    let bc = m.broadcast_mul(&row)?.flatten_all()?.to_vec1::<f32>()?;
    super::set_elementwise_on_rayon(false);
    for i in 0..n {
        assert_eq!(sum[i], a[i] + b[i], "sum at {i}");
        assert_eq!(exp[i], a[i].exp(), "exp at {i}");
    }
    for (i, (&x, (&sq, &p))) in a[..600 * 500].iter().zip(mt.iter().zip(&bc)).enumerate() {
        assert_eq!(sq, x * x, "strided product at {i}");
        assert_eq!(p, x * b[i % 500], "broadcast product at {i}");
    }
    Ok(())
}

/// On the GPU machine: candle's 2-D copies (`cat`, `contiguous` of a
/// narrowed view) give the CPU's values, whether they go through one
/// device-to-device memcpy (no gaps between rows: vendor/candle-core's
/// PIPE-PATCH.md) or through the copy2d kernel (gaps on a side).
#[test]
fn cuda_copies_with_and_without_gaps_match_the_cpu() -> Result<()> {
    let Some(dev) = cuda_device()? else { return Ok(()) };
    for dt in [DType::F32, DType::BF16, DType::U32] {
        let part = |rows: usize, seed: f64| -> Result<Tensor> {
            Ok(Tensor::arange(0f64, (rows * 7) as f64, &Device::Cpu)?
                .affine(1.0, seed)?
                .reshape((rows, 7))?
                .to_dtype(dt)?)
        };
        let (a, b, c) = (part(5, 0.0)?, part(3, 100.0)?, part(2, 200.0)?);
        let on = |t: &Tensor| t.to_device(&dev);
        let (ga, gb, gc) = (on(&a)?, on(&b)?, on(&c)?);
        let cases = [
            // rows packed on both sides: one memcpy each
            (Tensor::cat(&[&a, &b, &c], 0)?, Tensor::cat(&[&ga, &gb, &gc], 0)?),
            // a row each (one memcpy), then gaps on the destination's side
            (Tensor::cat(&[&a.narrow(0, 0, 2)?, &c], 1)?, Tensor::cat(&[&ga.narrow(0, 0, 2)?, &gc], 1)?),
            // gaps on the source's side
            (a.narrow(1, 2, 3)?.contiguous()?, ga.narrow(1, 2, 3)?.contiguous()?),
            // packed rows at an offset
            (a.narrow(0, 1, 3)?.narrow(1, 0, 7)?.copy()?, ga.narrow(0, 1, 3)?.narrow(1, 0, 7)?.copy()?),
        ];
        for (i, (want, got)) in cases.iter().enumerate() {
            let (w, g) = (want.to_dtype(DType::F64)?, got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?);
            assert_eq!(w.to_vec2::<f64>()?, g.to_vec2::<f64>()?, "{dt:?} case {i}");
        }
    }
    Ok(())
}

/// On the GPU machine: every module of candle's own kernels loads from the
/// machine code its build made (vendor/candle-kernels: a fresh machine's
/// driver no longer compiles their PTX on first use), a module whose
/// machine code the driver refuses loads from its PTX instead, and candle's
/// ops run through it.
#[cfg(feature = "cuda")]
#[test]
fn candle_kernels_load_as_machine_code_or_fall_back_to_ptx() -> Result<()> {
    use candle_core::cuda_backend::kernels;
    let Some(dev) = cuda_device()? else { return Ok(()) };
    let Device::Cuda(cuda) = &dev else { unreachable!("cuda_device gives a CUDA device") };
    let modules = [
        ("affine", &kernels::AFFINE),
        ("binary", &kernels::BINARY),
        ("cast", &kernels::CAST),
        ("conv", &kernels::CONV),
        ("fill", &kernels::FILL),
        ("indexing", &kernels::INDEXING),
        ("quantized", &kernels::QUANTIZED),
        ("reduce", &kernels::REDUCE),
        ("sort", &kernels::SORT),
        ("ternary", &kernels::TERNARY),
        ("unary", &kernels::UNARY),
    ];
    for (name, m) in modules {
        assert!(m.cubin().starts_with(b"\x7fELF"), "{name}: no machine code in the build");
        let (_, from_cubin) = cuda.load_module_cubin_or_ptx(m.cubin(), m.ptx())?;
        assert!(from_cubin, "{name}: the driver refused the build's machine code");
    }
    // An image the driver refuses (an ELF header and nothing else).
    let mut refused = vec![0u8; 4096];
    refused[..4].copy_from_slice(b"\x7fELF");
    let (module, from_cubin) = cuda.load_module_cubin_or_ptx(&refused, kernels::AFFINE.ptx())?;
    assert!(!from_cubin, "a refused image must fall back to the PTX");
    module.load_function("affine_f32").map_err(candle_core::Error::wrap)?;
    // candle's ops, each from its module's machine code.
    let x = Tensor::new(&[1f32, -2., 3.], &dev)?;
    let y = x.affine(2.0, 1.0)?.abs()?.to_dtype(DType::BF16)?.sum_all()?.to_dtype(DType::F32)?;
    assert_eq!(y.to_scalar::<f32>()?, 3. + 3. + 7.);
    Ok(())
}
