//! Inference with a KV cache: [`Llama::step`] runs any mix of prompt
//! prefills and single-token decodes as one flat token stream (the linears
//! see every token of every sequence at once; attention runs per sequence
//! against that sequence's cache). This is what continuous batching needs:
//! new requests join a running batch at a token boundary, in the same step
//! as the others' next token.

use candle_core::{DType, Device, Tensor};

use crate::nn::llama::{Fwd, Llama};
use crate::nn::ops::{causal_softmax, rms_norm, rope, softmax};
use crate::nn::{NnError, Result};

/// Keys and values of one sequence, per layer: (capacity, kv_heads, head_dim),
/// the first `len` positions filled (token-major, so a step appends one
/// contiguous block). Grows by doubling.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    cap: usize,
}

const CACHE_ROUND: usize = 64;

impl KvCache {
    pub fn new() -> Self {
        KvCache { k: Vec::new(), v: Vec::new(), len: 0, cap: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache tensors.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// A new cache holding the first `n` positions of this one (room for
    /// `extra` more).
    pub fn prefix_copy(&self, m: &Llama, n: usize, extra: usize) -> Result<KvCache> {
        let n = n.min(self.len);
        let mut c = KvCache::new();
        c.reserve(m, n + extra)?;
        if n > 0 {
            for (dst, src) in c.k.iter().zip(&self.k).chain(c.v.iter().zip(&self.v)) {
                dst.slice_set(&src.narrow(0, 0, n)?, 0, 0)?;
            }
        }
        c.len = n;
        Ok(c)
    }

    fn reserve(&mut self, m: &Llama, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need <= self.cap && !self.k.is_empty() {
            return Ok(());
        }
        let cap = need.max(self.cap * 2).div_ceil(CACHE_ROUND) * CACHE_ROUND;
        let (kv, hd) = (m.cfg.kv_heads(), m.cfg.head_dim());
        let grow = |old: Option<&Tensor>| -> Result<Tensor> {
            let t = Tensor::zeros((cap, kv, hd), m.dtype, &m.device)?;
            if let Some(o) = old {
                if self.len > 0 {
                    t.slice_set(&o.narrow(0, 0, self.len)?, 0, 0)?;
                }
            }
            Ok(t)
        };
        let layers = m.layers.len();
        let k: Vec<Tensor> = (0..layers).map(|i| grow(self.k.get(i))).collect::<Result<_>>()?;
        let v: Vec<Tensor> = (0..layers).map(|i| grow(self.v.get(i))).collect::<Result<_>>()?;
        self.k = k;
        self.v = v;
        self.cap = cap;
        Ok(())
    }
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new()
    }
}

impl Llama {
    /// Feed `tokens[i]` to sequence `i` (a whole prompt, or the one token
    /// sampled last), appending to `caches[i]`, and return the f32 logits
    /// after each sequence's last token, (sequences, vocab).
    pub fn step(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(NnError::Other("step: one token list per cache, at least one".into()));
        }
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut spans = Vec::with_capacity(tokens.len());
        for (t, c) in tokens.iter().zip(caches.iter_mut()) {
            if t.is_empty() {
                return Err(NnError::Other("step: a sequence was given no tokens".into()));
            }
            if let Some(bad) = t.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
                return Err(NnError::Other(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.cfg.vocab_size
                )));
            }
            c.reserve(self, t.len())?;
            spans.push((ids.len(), t.len(), c.len));
            ids.extend_from_slice(t);
            pos.extend((c.len..c.len + t.len()).map(|p| p as u32));
        }
        let n = ids.len();
        let (cos, sin) = self.rotary(&pos)?;
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let mut x = self.embed.tensor()?.index_select(&ids, 0)?;
        let c = &self.cfg;
        let (h, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &l.input_layernorm.tensor()?, c.rms_norm_eps)?;
            let q = l.q.forward(&hn, Fwd::EVAL)?.reshape((n, h, hd))?;
            let k = l.k.forward(&hn, Fwd::EVAL)?.reshape((n, kv, hd))?;
            let v = l.v.forward(&hn, Fwd::EVAL)?.reshape((n, kv, hd))?;
            let q = rope(&q, &cos, &sin)?;
            let k = rope(&k, &cos, &sin)?;
            for (&(off, len, past), cache) in spans.iter().zip(caches.iter()) {
                cache.k[li].slice_set(&k.narrow(0, off, len)?, 0, past)?;
                cache.v[li].slice_set(&v.narrow(0, off, len)?, 0, past)?;
            }
            // Decode rows (one new token) of an f32 CPU step go through the
            // fused op in one call; prompts (many rows) through gemm.
            let fused = self.device.is_cpu() && self.dtype == DType::F32;
            let dec: Vec<usize> = (0..spans.len()).filter(|&i| fused && spans[i].1 == 1).collect();
            let dec_out = if dec.is_empty() {
                None
            } else {
                let op = CachedAttention {
                    seqs: dec
                        .iter()
                        .map(|&i| {
                            let (off, len, past) = spans[i];
                            (off, len, past, caches[i].k[li].clone(), caches[i].v[li].clone())
                        })
                        .collect(),
                    kv,
                    scale: scale as f32,
                };
                Some(q.contiguous()?.apply_op1_no_bwd(&op)?.reshape((dec.len(), h * hd))?)
            };
            let mut pieces: Vec<Tensor> = Vec::new();
            let (mut run_start, mut run_len, mut next_dec) = (0usize, 0usize, 0usize);
            for (i, (&(off, len, past), cache)) in spans.iter().zip(caches.iter()).enumerate() {
                if next_dec < dec.len() && dec[next_dec] == i {
                    if run_len == 0 {
                        run_start = next_dec;
                    }
                    run_len += 1;
                    next_dec += 1;
                    continue;
                }
                if run_len > 0 {
                    pieces.push(dec_out.as_ref().expect("decode rows").narrow(0, run_start, run_len)?);
                    run_len = 0;
                }
                let total = past + len;
                let ki = cache.k[li].narrow(0, 0, total)?.transpose(0, 1)?.contiguous()?;
                let vi = cache.v[li].narrow(0, 0, total)?.transpose(0, 1)?.contiguous()?;
                pieces.push(self.seq_attention(&q.narrow(0, off, len)?, &ki, &vi, past)?);
            }
            if run_len > 0 {
                pieces.push(dec_out.as_ref().expect("decode rows").narrow(0, run_start, run_len)?);
            }
            let attn = if pieces.len() == 1 {
                pieces.pop().unwrap_or_else(|| unreachable!())
            } else {
                Tensor::cat(&pieces, 0)?
            };
            x = self.block_tail(l, &x, &attn, Fwd::EVAL)?;
        }
        for (c, &(_, len, _)) in caches.iter_mut().zip(&spans) {
            c.len += len;
        }
        let last: Vec<u32> = spans.iter().map(|&(off, len, _)| (off + len - 1) as u32).collect();
        let last = Tensor::from_vec(last, spans.len(), &self.device)?;
        let hs = self.final_norm(&x.index_select(&last, 0)?)?;
        Ok(self.head(&hs, Fwd::EVAL)?.to_dtype(DType::F32)?)
    }
}

impl Llama {
    /// Attention of one sequence: queries `q` (len, heads, head_dim) at
    /// positions `past..` against keys and values (kv_heads, past + len,
    /// head_dim), causal; returns (len, heads * head_dim). The training
    /// forward calls it with `past` 0.
    pub(crate) fn seq_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
        let (len, h, hd) = q.dims3()?;
        let kv = k.dim(0)?;
        let rep = h / kv;
        // Query heads g*rep..(g+1)*rep share kv head g (repeat_interleave):
        // fold them into the row dimension instead of copying k and v.
        let qi = q.transpose(0, 1)?.contiguous()?.reshape((kv, rep * len, hd))?;
        // Scale q (len x hd) rather than the scores (len x total).
        let s = qi.affine(1.0 / (hd as f64).sqrt(), 0.0)?.matmul(&k.t()?)?;
        let s = if matches!(self.dtype, DType::F64 | DType::F32) { s } else { s.to_dtype(DType::F32)? };
        let p = if past == 0 {
            causal_softmax(&s)?
        } else if len == 1 {
            softmax(&s)?
        } else {
            softmax(&s.broadcast_add(&offset_mask(len, past, rep, &self.device)?.to_dtype(s.dtype())?)?)?
        };
        let o = p.to_dtype(self.dtype)?.matmul(v)?;
        Ok(o.reshape((h, len, hd))?.transpose(0, 1)?.reshape((len, h * hd))?)
    }
}

/// Attention of sequences of a step against their own KV caches, fused for
/// the CPU (f32; used for decode rows): `q` is (N, heads, head_dim) for the
/// step's tokens; sequence i's queries are rows `off..off+len`, at positions
/// `past..`, and see cached keys `0..=position`. The output holds only these
/// sequences' rows, one after another. Parallel over (sequence, head); no
/// score matrix is materialised beyond one row.
struct CachedAttention {
    /// (offset in q, new tokens, cached before them, K cache, V cache)
    seqs: Vec<(usize, usize, usize, Tensor, Tensor)>,
    kv: usize,
    scale: f32,
}

impl candle_core::CustomOp1 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (n, h, hd) = l.shape().dims3()?;
        let q = match s {
            candle_core::CpuStorage::F32(v) => &v[l.start_offset()..l.start_offset() + n * h * hd],
            _ => candle_core::bail!("cached-attention: f32 only"),
        };
        let (kv, rep) = (self.kv, h / self.kv);
        // Borrow every cache's storage for the duration of the op.
        let guards: Vec<_> =
            self.seqs.iter().map(|(.., k, v)| (k.storage_and_layout(), v.storage_and_layout())).collect();
        let mut caches: Vec<(&[f32], &[f32])> = Vec::with_capacity(guards.len());
        for ((ks, kl), (vs, vl)) in &guards {
            match (&**ks, &**vs) {
                (
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F32(k)),
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)),
                ) => caches.push((&k[kl.start_offset()..], &v[vl.start_offset()..])),
                _ => candle_core::bail!("cached-attention: the cache is not f32 on the CPU"),
            }
        }
        // Output rows are compact: sequence after sequence, in `seqs` order.
        let rows_out: usize = self.seqs.iter().map(|s| s.1).sum();
        let mut out = vec![0f32; rows_out * h * hd];
        let starts: Vec<usize> = self
            .seqs
            .iter()
            .scan(0, |acc, s| {
                let st = *acc;
                *acc += s.1;
                Some(st)
            })
            .collect();
        // One task per (sequence, query head), writing its rows of `out`.
        let tasks: Vec<(usize, usize)> = (0..self.seqs.len()).flat_map(|i| (0..h).map(move |hh| (i, hh))).collect();
        let results: Vec<(usize, usize, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(i, hh)| {
                let (off, len, past, ..) = self.seqs[i];
                let (kc, vc) = caches[i];
                let g = hh / rep;
                let stride = kv * hd;
                let mut rows = vec![0f32; len * hd];
                let mut scores = vec![0f32; past + len];
                for j in 0..len {
                    let qrow = &q[((off + j) * h + hh) * hd..][..hd];
                    let o = &mut rows[j * hd..][..hd];
                    attend(
                        qrow,
                        HeadRows { k: kc, v: vc, stride, at: g * hd },
                        past + j + 1,
                        self.scale,
                        &mut scores,
                        o,
                    );
                }
                (i, hh, rows)
            })
            .collect();
        for (i, hh, rows) in results {
            let len = self.seqs[i].1;
            for j in 0..len {
                out[((starts[i] + j) * h + hh) * hd..][..hd].copy_from_slice(&rows[j * hd..][..hd]);
            }
        }
        Ok((candle_core::CpuStorage::F32(out), candle_core::Shape::from((rows_out, h, hd))))
    }
}

/// One kv head's rows of a cache: row t is `k[t * stride + at..][..head_dim]`.
#[derive(Clone, Copy)]
struct HeadRows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
    at: usize,
}

/// One query row against the first `visible` cached rows: softmax(q.K^T *
/// scale) @ V into `o` (`s` is scratch). With AVX2 + FMA where the CPU has them.
fn attend(q: &[f32], c: HeadRows, visible: usize, scale: f32, s: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { attend_avx2(q, c, visible, scale, s, o) };
        }
    }
    attend_body(q, c, visible, scale, s, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(q: &[f32], c: HeadRows, visible: usize, scale: f32, s: &mut [f32], o: &mut [f32]) {
    attend_body(q, c, visible, scale, s, o)
}

#[inline(always)]
fn attend_body(q: &[f32], c: HeadRows, visible: usize, scale: f32, s: &mut [f32], o: &mut [f32]) {
    let HeadRows { k, v, stride, at } = c;
    let hd = q.len();
    let mut m = f32::NEG_INFINITY;
    for (t, sc) in s[..visible].iter_mut().enumerate() {
        let kr = &k[t * stride + at..][..hd];
        // Eight partial sums: a reduction the compiler can vectorise.
        let mut acc = [0f32; 8];
        let (qc, kc) = (q.chunks_exact(8), kr.chunks_exact(8));
        let mut tail = 0f32;
        for (a, b) in qc.remainder().iter().zip(kc.remainder()) {
            tail += a * b;
        }
        for (a, b) in qc.zip(kc) {
            for i in 0..8 {
                acc[i] += a[i] * b[i];
            }
        }
        let d = (acc.iter().sum::<f32>() + tail) * scale;
        *sc = d;
        m = m.max(d);
    }
    let mut sum = 0f32;
    for sc in s[..visible].iter_mut() {
        *sc = (*sc - m).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    for (t, p) in s[..visible].iter().enumerate() {
        let w = p * inv;
        for (a, b) in o.iter_mut().zip(&v[t * stride + at..][..hd]) {
            *a += w * b;
        }
    }
}

/// Additive mask for `len` new queries after `past` cached positions, heads
/// folded into rows (rep * len, past + len): query j sees keys <= past + j.
fn offset_mask(len: usize, past: usize, rep: usize, dev: &Device) -> Result<Tensor> {
    let total = past + len;
    let v: Vec<f32> = (0..rep * len)
        .flat_map(|r| (0..total).map(move |c| if c > past + r % len { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (rep * len, total), dev)?)
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in xs.iter().enumerate() {
        if v > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits rows as host vectors.
pub fn rows_f32(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::llama::{Row, TrainSpec};
    use crate::nn::tests::{tiny_config, tiny_model};

    /// Logits of every position of `ids` from the training forward (no cache).
    fn full_logits(m: &Llama, ids: &[u32]) -> Result<Vec<Vec<f64>>> {
        let row = Row {
            input_ids: ids.to_vec(),
            labels: vec![-100; ids.len()],
            position_ids: (0..ids.len() as u32).collect(),
            seq_lens: vec![ids.len()],
        };
        Ok(m.logits(&m.batch(&[row])?)?.to_dtype(DType::F64)?.to_vec2::<f64>()?)
    }

    fn close(a: &[f32], b: &[f64]) {
        let d = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max);
        assert!(d < 1e-4, "max abs diff {d}");
    }

    #[test]
    fn cached_prefill_decode_and_mixed_batches_match_the_full_forward() -> Result<()> {
        // f64: the per-sequence composition; f32 on the CPU: the fused op.
        for (arch, tied, dtype) in [
            ("llama", true, DType::F64),
            ("qwen2", false, DType::F64),
            ("llama", true, DType::F32),
            ("qwen2", false, DType::F32),
        ] {
            let m = tiny_model(&tiny_config(arch, tied), &TrainSpec::default(), dtype)?;
            let a: Vec<u32> = vec![1, 5, 9, 3, 2, 7, 30, 4, 11];
            let b: Vec<u32> = vec![6, 8, 10, 12, 14, 16];
            let (fa, fb) = (full_logits(&m, &a)?, full_logits(&m, &b)?);
            let (mut ca, mut cb) = (KvCache::new(), KvCache::new());
            // Prefill a alone (fresh cache: causal), then a chunk of 2 after a
            // cached prefix (offset mask), then decode a and prefill b together.
            let l = rows_f32(&m.step(&[&a[..4]], &mut [&mut ca])?)?;
            close(&l[0], &fa[3]);
            let l = rows_f32(&m.step(&[&a[4..6]], &mut [&mut ca])?)?;
            close(&l[0], &fa[5]);
            let l = rows_f32(&m.step(&[&a[6..7], &b[..3]], &mut [&mut ca, &mut cb])?)?;
            close(&l[0], &fa[6]);
            close(&l[1], &fb[2]);
            for t in 7..a.len() {
                let l = rows_f32(&m.step(&[&a[t..t + 1], &b[t - 4..t - 3]], &mut [&mut ca, &mut cb])?)?;
                close(&l[0], &fa[t]);
                close(&l[1], &fb[t - 4]);
            }
            assert_eq!((ca.len(), cb.len()), (a.len(), 5));
            // Growing past the first allocation keeps what was cached.
            let long: Vec<u32> = (0..70).map(|i| (i * 7 % 31) as u32).collect();
            let fl = full_logits(&m, &long)?;
            let mut cl = KvCache::new();
            m.step(&[&long[..60]], &mut [&mut cl])?;
            for t in 60..70 {
                let l = rows_f32(&m.step(&[&long[t..t + 1]], &mut [&mut cl])?)?;
                close(&l[0], &fl[t]);
            }
        }
        Ok(())
    }

    #[test]
    fn bad_steps_are_rejected() -> Result<()> {
        let m = tiny_model(&tiny_config("llama", true), &TrainSpec::default(), DType::F32)?;
        let mut c = KvCache::new();
        assert!(m.step(&[&[40]], &mut [&mut c]).is_err(), "token outside the vocabulary");
        assert!(m.step(&[&[]], &mut [&mut c]).is_err(), "no tokens");
        assert!(c.is_empty());
        Ok(())
    }
}
