//! Inference with a KV cache: [`Llama::step`] runs any mix of prompt
//! prefills and single-token decodes as one flat token stream (the linears
//! see every token of every sequence at once; attention runs per sequence
//! against that sequence's cache, except that on CUDA the prompts without
//! a cached prefix attend in one packed-sequence launch per layer). This is what continuous batching needs:
//! new requests join a running batch at a token boundary, in the same step
//! as the others' next token.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use crate::nn::cpu_decode::{CachedAttention, DecodeRow};
use crate::nn::decode::Next;
use crate::nn::llama::{Fwd, Llama};
use crate::nn::ops::{causal_mask, causal_softmax, rms_norm, rope, softmax};
use crate::nn::{NnError, Result};

/// Keys and values of one sequence. On the CPU in f32 (where the fused
/// decode op runs) each layer has its own (capacity, kv_heads, head_dim)
/// tensor, token-major, growing by doubling. Elsewhere (CUDA, other dtypes)
/// the sequence owns blocks of [`KvPool`], the model's shared paged store,
/// so that a step's decode rows attend in one batched gather + matmul per
/// layer instead of a handful of kernels per sequence.
pub struct KvCache {
    store: Store,
    len: usize,
}

enum Store {
    Empty,
    /// Positions `base.len..` at rows `0..` of `k` and `v` (room for `cap`);
    /// the first `base.len` positions in `base`'s tensors, shared with the
    /// prefix cache's entry and every sequence copied from it.
    Dense {
        k: Vec<Tensor>,
        v: Vec<Tensor>,
        cap: usize,
        base: Option<Base>,
    },
    Paged {
        pool: Arc<KvPool>,
        blocks: Vec<u32>,
    },
}

/// A shared, never written, run of positions `0..len` of a dense cache:
/// per layer (capacity, kv_heads, head_dim).
#[derive(Clone)]
pub(crate) struct Base {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    pub(crate) len: usize,
}

const CACHE_ROUND: usize = 64;
/// Positions per block of the paged store.
pub const KV_BLOCK: usize = 32;

/// The paged KV store of one model: per layer, keys and values as
/// (blocks, KV_BLOCK, kv_heads, head_dim) (token-major within a block, so a
/// token's keys are one row to write), grown by doubling; a free list of
/// block ids. Caches return their blocks when dropped.
pub struct KvPool {
    inner: Mutex<PoolInner>,
}

struct PoolInner {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    blocks: usize,
    free: Vec<u32>,
    /// Bumped when the store is reallocated (the decode graphs hold its
    /// addresses).
    generation: u64,
}

impl KvPool {
    fn new() -> Self {
        KvPool {
            inner: Mutex::new(PoolInner { k: Vec::new(), v: Vec::new(), blocks: 0, free: Vec::new(), generation: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` free block ids, growing the store when needed.
    pub(crate) fn alloc(&self, m: &Llama, n: usize) -> Result<Vec<u32>> {
        let mut p = self.lock();
        if p.free.len() < n {
            let want = (p.blocks - p.free.len() + n).max(p.blocks * 2).max(if cfg!(test) { 4 } else { 256 });
            let (kv, hd) = (m.cfg.kv_heads(), m.cfg.head_dim());
            let old = p.blocks;
            let grow = |t: Option<&Tensor>| -> Result<Tensor> {
                let new = Tensor::zeros((want, KV_BLOCK, kv, hd), m.dtype, &m.device)?;
                if let Some(t) = t {
                    new.slice_set(t, 0, 0)?;
                }
                Ok(new)
            };
            let layers = m.layers.len();
            p.k = (0..layers).map(|i| grow(p.k.get(i))).collect::<Result<_>>()?;
            p.v = (0..layers).map(|i| grow(p.v.get(i))).collect::<Result<_>>()?;
            p.blocks = want;
            p.generation += 1;
            p.free.extend((old as u32..want as u32).rev());
        }
        let at = p.free.len() - n;
        Ok(p.free.split_off(at))
    }

    fn release(&self, blocks: &mut Vec<u32>) {
        self.lock().free.append(blocks);
    }

    /// The per-layer store tensors (shared storage: writes land in the pool).
    fn tensors(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let (_, k, v) = self.snapshot();
        (k, v)
    }

    /// The store's generation (bumped when it is reallocated).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// [`Self::tensors`] with the store's generation.
    pub(crate) fn snapshot(&self) -> (u64, Vec<Tensor>, Vec<Tensor>) {
        let p = self.lock();
        (p.generation, p.k.clone(), p.v.clone())
    }
}

impl KvCache {
    pub fn new() -> Self {
        KvCache { store: Store::Empty, len: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions read from a shared base (0 without one).
    fn base_len(&self) -> usize {
        match &self.store {
            Store::Dense { base: Some(b), .. } => b.len,
            _ => 0,
        }
    }

    /// Layer `li`'s keys and values of positions `0..n` of a dense cache,
    /// (n, kv_heads, head_dim) each.
    fn dense_rows(&self, li: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let Store::Dense { k, v, base, .. } = &self.store else {
            return Err(NnError::Other("dense_rows: not a dense cache".into()));
        };
        let b = base.as_ref().map_or(0, |b| b.len).min(n);
        let own = |t: &Tensor| t.narrow(0, 0, n - b);
        match base {
            Some(base) if b > 0 => {
                let joined = |bt: &Tensor, t: &Tensor| -> Result<Tensor> {
                    let head = bt.narrow(0, 0, b)?;
                    Ok(if n > b { Tensor::cat(&[&head, &own(t)?], 0)? } else { head })
                };
                Ok((joined(&base.k[li], &k[li])?, joined(&base.v[li], &v[li])?))
            }
            _ => Ok((own(&k[li])?, own(&v[li])?)),
        }
    }

    /// Bytes held by the cache (its tensors, or its blocks of the pool;
    /// not a shared base's).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Empty => 0,
            Store::Dense { k, v, .. } => k.iter().chain(v).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum(),
            Store::Paged { pool, blocks } => {
                let p = pool.lock();
                let per_block: usize =
                    p.k.first()
                        .map_or(0, |t| t.elem_count() / p.blocks.max(1) * t.dtype().size_in_bytes() * 2 * p.k.len());
                per_block * blocks.len()
            }
        }
    }

    /// A new cache holding the first `n` positions of this one (room for
    /// `extra` more). A dense cache is not copied where it can be shared:
    /// the new cache reads positions `0..n` from this one's tensors (or from
    /// the base this one reads them from), which are never written again at
    /// those positions (a cache only appends). Only a prefix reaching past
    /// this one's base is copied (`PIPE_KV_SHARE=0`: always copied).
    pub fn prefix_copy(&self, m: &Llama, n: usize, extra: usize) -> Result<KvCache> {
        let n = n.min(self.len);
        if let Store::Dense { k, v, base, .. } = &self.store {
            let shared = match base {
                None => Some(Base { k: k.clone(), v: v.clone(), len: n }),
                Some(b) if n <= b.len => Some(Base { len: n, ..b.clone() }),
                Some(_) => None,
            };
            if let Some(base) = shared.filter(|_| n > 0 && std::env::var_os("PIPE_KV_SHARE").is_none_or(|v| v != "0")) {
                let mut c =
                    KvCache { store: Store::Dense { k: Vec::new(), v: Vec::new(), cap: 0, base: Some(base) }, len: n };
                c.reserve(m, extra)?;
                return Ok(c);
            }
        }
        let mut c = KvCache::new();
        c.reserve(m, n + extra)?;
        if n > 0 {
            match (&self.store, &c.store) {
                (Store::Dense { .. }, Store::Dense { k, v, .. }) => {
                    for li in 0..k.len() {
                        let (sk, sv) = self.dense_rows(li, n)?;
                        k[li].slice_set(&sk, 0, 0)?;
                        v[li].slice_set(&sv, 0, 0)?;
                    }
                }
                (Store::Paged { pool, blocks: src }, Store::Paged { blocks: dst, .. }) => {
                    let nb = n.div_ceil(KV_BLOCK);
                    let (ks, vs) = pool.tensors();
                    let src = Tensor::from_vec(src[..nb].to_vec(), nb, &m.device)?;
                    let per = ks.first().map_or(0, |t| t.elem_count() / t.dim(0).unwrap_or(1));
                    let rows: Vec<u32> = dst[..nb].iter().flat_map(|&b| std::iter::repeat_n(b, per)).collect();
                    let rows = Tensor::from_vec(rows, (nb, per), &m.device)?;
                    for t in ks.iter().chain(&vs) {
                        let flat = t.reshape((t.dim(0)?, per))?;
                        flat.scatter_set(&rows, &t.index_select(&src, 0)?.reshape((nb, per))?, 0)?;
                    }
                }
                _ => return Err(NnError::Other("prefix_copy: caches of different layouts".into())),
            }
        }
        c.len = n;
        Ok(c)
    }

    /// Room for `extra` more positions.
    fn reserve(&mut self, m: &Llama, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if matches!(self.store, Store::Empty) {
            self.store = if m.dense_kv() {
                Store::Dense { k: Vec::new(), v: Vec::new(), cap: 0, base: None }
            } else {
                Store::Paged { pool: m.kv_pool(), blocks: Vec::new() }
            };
        }
        match &mut self.store {
            Store::Empty => unreachable!("set above"),
            Store::Dense { k, v, cap, base } => {
                // Own rows: positions past the base.
                let b = base.as_ref().map_or(0, |b| b.len);
                let need = need - b;
                if need <= *cap && !k.is_empty() {
                    return Ok(());
                }
                let new_cap = need.max(*cap * 2).div_ceil(CACHE_ROUND) * CACHE_ROUND;
                let (kv, hd) = (m.cfg.kv_heads(), m.cfg.head_dim());
                let len = self.len - b;
                let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                    let t = Tensor::zeros((new_cap, kv, hd), m.dtype, &m.device)?;
                    if let Some(o) = old {
                        if len > 0 {
                            t.slice_set(&o.narrow(0, 0, len)?, 0, 0)?;
                        }
                    }
                    Ok(t)
                };
                let layers = m.layers.len();
                *k = (0..layers).map(|i| grow(k.get(i))).collect::<Result<_>>()?;
                *v = (0..layers).map(|i| grow(v.get(i))).collect::<Result<_>>()?;
                *cap = new_cap;
            }
            Store::Paged { pool, blocks } => {
                let want = need.div_ceil(KV_BLOCK);
                if want > blocks.len() {
                    let more = pool.alloc(m, want - blocks.len())?;
                    blocks.extend(more);
                }
            }
        }
        Ok(())
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let Store::Paged { pool, blocks } = &mut self.store {
            pool.release(blocks);
        }
    }
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new()
    }
}

impl Llama {
    /// Whether inference keeps per-sequence dense caches (the CPU in f32,
    /// where the fused decode op reads them) rather than the paged pool.
    pub(crate) fn dense_kv(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    pub(crate) fn kv_pool(&self) -> Arc<KvPool> {
        self.kv_pool.get_or_init(|| Arc::new(KvPool::new())).clone()
    }

    /// [`Self::step`], returning each sequence's most likely next token and
    /// the f32 logits of the sequences `logits_for` marks (those that
    /// sample). Steps where every sequence feeds one token run through the
    /// decode graph where the model allows it ([`Llama::decode_graph_ok`]),
    /// with the argmax taken on the device.
    pub fn step_next(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache], logits_for: &[bool]) -> Result<Next> {
        if logits_for.len() != tokens.len() {
            return Err(NnError::Other("step: one logits flag per sequence".into()));
        }
        let paged = caches.iter().all(|c| matches!(c.store, Store::Paged { .. } | Store::Empty));
        if !tokens.is_empty()
            && tokens.len() == caches.len()
            && tokens.iter().all(|t| t.len() == 1)
            && paged
            && self.decode_graph_ok()
        {
            let toks: Vec<u32> = tokens.iter().map(|t| t[0]).collect();
            self.check_tokens(&toks)?;
            let mut pos = Vec::with_capacity(toks.len());
            for c in caches.iter_mut() {
                if c.len + 1 > self.cfg.max_position_embeddings {
                    return Err(NnError::Other(format!(
                        "a sequence would pass the model's {} positions",
                        self.cfg.max_position_embeddings
                    )));
                }
                c.reserve(self, 1)?;
                pos.push(c.len as u32);
            }
            let tables: Vec<&[u32]> = caches
                .iter()
                .map(|c| match &c.store {
                    Store::Paged { blocks, .. } => blocks.as_slice(),
                    _ => &[],
                })
                .collect();
            let next = self.graph_decode(&toks, &pos, &tables, logits_for)?;
            for c in caches.iter_mut() {
                c.len += 1;
            }
            return Ok(next);
        }
        let logits = self.step(tokens, caches)?;
        let rows = rows_f32(&logits)?;
        let argmax = rows.iter().map(|r| argmax(r)).collect();
        let logits = rows.into_iter().zip(logits_for).map(|(r, &w)| w.then_some(r)).collect();
        Ok(Next { argmax, logits })
    }

    /// An error naming the first token id outside the vocabulary, if any.
    pub(crate) fn check_tokens(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            Some(bad) => {
                Err(NnError::Other(format!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size)))
            }
            None => Ok(()),
        }
    }

    /// Greedy decoding of one sequence: feed `first` (the token sampled
    /// last) at the end of `cache`, then each step's argmax, for at most
    /// `steps` steps; `on_token` gets each step's argmax and returns
    /// whether to go on. Each step's fed token stays in the cache (the
    /// last argmax is not fed); the number of steps. The same tokens as
    /// [`Self::step_next`] a step at a time, which it does on the CPU;
    /// through the decode graph (CUDA; unless `PIPE_DECODE_CHAIN=0`) the next
    /// step is launched before the host reads a step's token.
    pub fn decode_greedy(
        &self,
        cache: &mut KvCache,
        first: u32,
        steps: usize,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<usize> {
        self.check_tokens(&[first])?;
        if cache.len + steps > self.cfg.max_position_embeddings {
            return Err(NnError::Other(format!(
                "{steps} steps after {} positions would pass the model's {} positions",
                cache.len, self.cfg.max_position_embeddings
            )));
        }
        if steps == 0 {
            return Ok(0);
        }
        let paged = matches!(cache.store, Store::Paged { .. } | Store::Empty);
        if paged && self.decode_graph_ok() {
            cache.reserve(self, steps)?;
            let table = match &cache.store {
                Store::Paged { blocks, .. } => blocks.clone(),
                _ => Vec::new(),
            };
            if let Some(n) = self.graph_chain(&table, cache.len, first, steps, &mut on_token)? {
                cache.len += n;
                return Ok(n);
            }
        }
        let (mut feed, mut n) = (first, 0);
        loop {
            let next = self.step_next(&[&[feed]], &mut [&mut *cache], &[false])?;
            n += 1;
            let t = next.argmax[0];
            if !on_token(t) || n == steps {
                return Ok(n);
            }
            feed = t;
        }
    }

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
            self.check_tokens(t)?;
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
        // Decode rows (one new token) attend together: through the fused
        // CPU op (dense caches) or one batched gather + matmul (paged);
        // prompts (many rows) one sequence at a time through gemm.
        let dec: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].1 == 1).collect();
        let paged = if self.dense_kv() { None } else { Some(Paged::plan(self, &spans, caches, &dec)?) };
        // Prompts after a cached prefix attend through a mask: built once for
        // all layers (each is two uploads from the host and a few ops).
        let mdt = if self.dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let masks: Vec<Option<Tensor>> = spans
            .iter()
            .map(|&(_, len, past)| (len > 1 && past > 0).then(|| causal_mask(len, past, mdt, &self.device)).transpose())
            .collect::<candle_core::Result<_>>()?;
        // Prompts without a cached prefix attend through the fused
        // packed-sequence kernel where it runs (CUDA): one launch per layer
        // for all of them instead of a dozen ops per prompt.
        let fresh: Vec<(usize, usize)> =
            spans.iter().filter(|&&(_, len, past)| len > 1 && past == 0).map(|&(off, len, _)| (off, len)).collect();
        let fresh_tiles = if fresh.is_empty() || !self.device.is_cuda() {
            None
        } else {
            let t = crate::nn::flash::tiles(&fresh, hd, self.dtype);
            let n = t.len();
            Some(Tensor::from_vec(t, n, &self.device)?)
        };
        for (li, l) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &l.input_layernorm.tensor()?, c.rms_norm_eps)?;
            let q = l.q.forward(&hn, Fwd::EVAL)?.reshape((n, h, hd))?;
            let k = l.k.forward(&hn, Fwd::EVAL)?.reshape((n, kv, hd))?;
            let v = l.v.forward(&hn, Fwd::EVAL)?.reshape((n, kv, hd))?;
            let q = rope(&q, &cos, &sin)?;
            let k = rope(&k, &cos, &sin)?;
            match &paged {
                Some(p) => p.write(li, &k, &v)?,
                None => {
                    for (&(off, len, past), cache) in spans.iter().zip(caches.iter()) {
                        let Store::Dense { k: ck, v: cv, .. } = &cache.store else { unreachable!("dense") };
                        let at = past - cache.base_len();
                        ck[li].slice_set(&k.narrow(0, off, len)?, 0, at)?;
                        cv[li].slice_set(&v.narrow(0, off, len)?, 0, at)?;
                    }
                }
            }
            let dec_out = if dec.is_empty() {
                None
            } else if let Some(p) = &paged {
                Some(p.decode(li, &q, h, scale)?)
            } else {
                let op = CachedAttention {
                    seqs: dec
                        .iter()
                        .map(|&i| {
                            let (off, _, past) = spans[i];
                            let Store::Dense { k, v, base, .. } = &caches[i].store else { unreachable!("dense") };
                            let base = base.as_ref().map(|b| (b.k[li].clone(), b.v[li].clone(), b.len));
                            DecodeRow { row: off, past, k: k[li].clone(), v: v[li].clone(), base }
                        })
                        .collect(),
                    kv,
                    scale: scale as f32,
                };
                Some(q.contiguous()?.apply_op1_no_bwd(&op)?.reshape((dec.len(), h * hd))?)
            };
            let packed = match &fresh_tiles {
                Some(t) if crate::nn::flash::usable(&q) => Some(crate::nn::flash::attention(&q, &k, &v, t, scale)?),
                _ => None,
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
                if let (Some(o), 0) = (&packed, past) {
                    pieces.push(o.narrow(0, off, len)?.reshape((len, h * hd))?);
                    continue;
                }
                let total = past + len;
                let (ki, vi) = match (&paged, &cache.store) {
                    (Some(p), _) => p.sequence(li, i, total)?,
                    (None, Store::Dense { .. }) => {
                        let (k, v) = cache.dense_rows(li, total)?;
                        (k.transpose(0, 1)?.contiguous()?, v.transpose(0, 1)?.contiguous()?)
                    }
                    _ => unreachable!("dense"),
                };
                pieces.push(self.seq_attention(&q.narrow(0, off, len)?, &ki, &vi, past, masks[i].as_ref())?);
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

/// What a step over paged caches needs, computed once for all layers.
struct Paged {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    kv: usize,
    /// (n, kv * head_dim) destination rows of the new keys/values in the
    /// store viewed as (blocks * KV_BLOCK, kv * head_dim).
    rows: Tensor,
    /// Decode rows: their q rows, their sequences' blocks (padded to the
    /// longest, B * m), the additive visibility mask (B, 1, 1, m * KV_BLOCK).
    dec_q: Option<Tensor>,
    dec_blocks: Option<Tensor>,
    dec_mask: Option<Tensor>,
    /// Per sequence: its blocks.
    seq_blocks: Vec<Tensor>,
}

impl Paged {
    fn plan(m: &Llama, spans: &[(usize, usize, usize)], caches: &[&mut KvCache], dec: &[usize]) -> Result<Self> {
        let (kv, hd) = (m.cfg.kv_heads(), m.cfg.head_dim());
        let blocks_of = |i: usize| -> Result<&Vec<u32>> {
            match &caches[i].store {
                Store::Paged { blocks, .. } => Ok(blocks),
                _ => Err(NnError::Other("step: a dense cache in a paged step".into())),
            }
        };
        let pool = match &caches[0].store {
            Store::Paged { pool, .. } => pool.clone(),
            _ => return Err(NnError::Other("step: a dense cache in a paged step".into())),
        };
        let (k, v) = pool.tensors();
        let n: usize = spans.iter().map(|s| s.1).sum();
        let mut rows = Vec::with_capacity(n * kv * hd);
        for (i, &(_, len, past)) in spans.iter().enumerate() {
            let bl = blocks_of(i)?;
            for p in past..past + len {
                let row = bl[p / KV_BLOCK] as usize * KV_BLOCK + p % KV_BLOCK;
                rows.extend(std::iter::repeat_n(row as u32, kv * hd));
            }
        }
        let rows = Tensor::from_vec(rows, (n, kv * hd), &m.device)?;
        let seq_blocks = (0..spans.len())
            .map(|i| {
                let (_, len, past) = spans[i];
                let bl = blocks_of(i)?;
                let nb = (past + len).div_ceil(KV_BLOCK);
                Ok(Tensor::from_vec(bl[..nb].to_vec(), nb, &m.device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut dec_q, mut dec_blocks, mut dec_mask) = (None, None, None);
        if !dec.is_empty() {
            let mm = dec.iter().map(|&i| (spans[i].2 + 1).div_ceil(KV_BLOCK)).max().unwrap_or(1);
            let t = mm * KV_BLOCK;
            let mut bidx = Vec::with_capacity(dec.len() * mm);
            let mut mask = Vec::with_capacity(dec.len() * t);
            for &i in dec {
                let bl = blocks_of(i)?;
                let visible = spans[i].2 + 1;
                let nb = visible.div_ceil(KV_BLOCK);
                bidx.extend((0..mm).map(|j| bl[j.min(nb - 1)]));
                mask.extend((0..t).map(|p| if p < visible { 0f32 } else { f32::NEG_INFINITY }));
            }
            let qrows: Vec<u32> = dec.iter().map(|&i| spans[i].0 as u32).collect();
            dec_q = Some(Tensor::from_vec(qrows, dec.len(), &m.device)?);
            dec_blocks = Some(Tensor::from_vec(bidx, dec.len() * mm, &m.device)?);
            let mdt = if matches!(m.dtype, DType::F64) { DType::F64 } else { DType::F32 };
            dec_mask = Some(Tensor::from_vec(mask, (dec.len(), 1, 1, t), &m.device)?.to_dtype(mdt)?);
        }
        Ok(Paged { k, v, kv, rows, dec_q, dec_blocks, dec_mask, seq_blocks })
    }

    /// Store layer `li`'s new keys and values (n, kv, head_dim).
    fn write(&self, li: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        for (store, new) in [(&self.k[li], k), (&self.v[li], v)] {
            let (blocks, bs, kv, hd) = store.dims4()?;
            let flat = store.reshape((blocks * bs, kv * hd))?;
            let (n, _, _) = new.dims3()?;
            flat.scatter_set(&self.rows, &new.contiguous()?.reshape((n, kv * hd))?, 0)?;
        }
        Ok(())
    }

    /// (kv, len, head_dim) keys and values of layer `li` for the given blocks.
    fn gather(&self, li: usize, blocks: &Tensor, seqs: usize) -> Result<(Tensor, Tensor)> {
        let g = |store: &Tensor| -> Result<Tensor> {
            let (_, bs, kv, hd) = store.dims4()?;
            let nb = blocks.dim(0)? / seqs;
            Ok(store.index_select(blocks, 0)?.reshape((seqs, nb * bs, kv, hd))?.transpose(1, 2)?.contiguous()?)
        };
        Ok((g(&self.k[li])?, g(&self.v[li])?))
    }

    /// Sequence `i`'s first `total` keys and values, (kv, total, head_dim).
    fn sequence(&self, li: usize, i: usize, total: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.gather(li, &self.seq_blocks[i], 1)?;
        let cut = |t: Tensor| -> Result<Tensor> { Ok(t.squeeze(0)?.narrow(1, 0, total)?.contiguous()?) };
        Ok((cut(k)?, cut(v)?))
    }

    /// Attention of every decode row at once: (B, heads * head_dim).
    fn decode(&self, li: usize, q: &Tensor, h: usize, scale: f64) -> Result<Tensor> {
        let (Some(rows), Some(blocks), Some(mask)) = (&self.dec_q, &self.dec_blocks, &self.dec_mask) else {
            return Err(NnError::Other("step: no decode rows".into()));
        };
        let b = rows.dim(0)?;
        let hd = q.dim(2)?;
        let (k, v) = self.gather(li, blocks, b)?;
        let qd = q.index_select(rows, 0)?.reshape((b, self.kv, h / self.kv, hd))?.affine(scale, 0.0)?;
        let s = qd.matmul(&k.transpose(2, 3)?)?;
        let s = s.to_dtype(mask.dtype())?.broadcast_add(mask)?;
        let p = softmax(&s)?.to_dtype(q.dtype())?;
        Ok(p.matmul(&v)?.reshape((b, h * hd))?)
    }
}

impl Llama {
    /// Attention of one sequence: queries `q` (len, heads, head_dim) at
    /// positions `past..` against keys and values (kv_heads, past + len,
    /// head_dim), causal; returns (len, heads * head_dim). `mask`: the
    /// step's [`causal_mask`] for (len, past) when past > 0 and len > 1
    /// (built here when not given). The training forward calls it with
    /// `past` 0.
    pub(crate) fn seq_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        past: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (len, h, hd) = q.dims3()?;
        let kv = k.dim(0)?;
        let rep = h / kv;
        // Query heads g*rep..(g+1)*rep share kv head g (repeat_interleave):
        // fold them into the row dimension instead of copying k and v.
        let qi = q.transpose(0, 1)?.contiguous()?.reshape((kv, rep * len, hd))?;
        // Scale q (len x hd) rather than the scores (len x total).
        let qa = qi.affine(1.0 / (hd as f64).sqrt(), 0.0)?;
        let f32_or_f64 = matches!(self.dtype, DType::F64 | DType::F32);
        if past == 0 && f32_or_f64 {
            // (Scores and softmax as one op: its graph keeps no scores.)
            let p = crate::nn::ops::causal_attention_probs(&qa, &k.t()?)?;
            let o = p.matmul(v)?;
            return Ok(o.reshape((h, len, hd))?.transpose(0, 1)?.reshape((len, h * hd))?);
        }
        let s = qa.matmul(&k.t()?)?;
        let s = if f32_or_f64 { s } else { s.to_dtype(DType::F32)? };
        let p = if past == 0 {
            causal_softmax(&s)?
        } else if len == 1 {
            softmax(&s)?
        } else {
            let (g, r, total) = s.dims3()?;
            let mask = match mask {
                Some(m) => m.clone(),
                None => causal_mask(len, past, s.dtype(), &self.device)?,
            };
            softmax(&s.contiguous()?.reshape((g, r / len, len, total))?.broadcast_add(&mask)?.reshape((g, r, total))?)?
        };
        let o = p.to_dtype(self.dtype)?.matmul(v)?;
        Ok(o.reshape((h, len, hd))?.transpose(0, 1)?.reshape((len, h * hd))?)
    }
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

    fn close_tol(a: &[f32], b: &[f64], tol: f64) {
        let d = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max);
        if tol > 0.1 {
            eprintln!("  max abs diff {d:.4} (largest logit {:.2})", b.iter().fold(0f64, |m, v| m.max(v.abs())));
        }
        assert!(d < tol, "max abs diff {d}");
    }

    /// Prefill, chunked prefill after a cached prefix, decode and prefill in
    /// one step, decode pairs, and a cache that grows: the logits of `m`'s
    /// steps against the full forward of `r` (the same weights).
    fn check_cached_steps(m: &Llama, r: &Llama, tol: f64) -> Result<()> {
        let close = |a: &[f32], b: &[f64]| close_tol(a, b, tol);
        let a: Vec<u32> = vec![1, 5, 9, 3, 2, 7, 30, 4, 11];
        let b: Vec<u32> = vec![6, 8, 10, 12, 14, 16];
        let (fa, fb) = (full_logits(r, &a)?, full_logits(r, &b)?);
        let (mut ca, mut cb) = (KvCache::new(), KvCache::new());
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
        // Several fresh prompts in one step, then one continues after its
        // prefix with another fresh one (the packed path on CUDA).
        let c: Vec<u32> = (0..13).map(|i| (i * 5 % 29) as u32).collect();
        let d: Vec<u32> = (0..40).map(|i| (i * 3 % 31) as u32).collect();
        let (fc, fd) = (full_logits(r, &c)?, full_logits(r, &d)?);
        let (mut cc, mut cd, mut cc2) = (KvCache::new(), KvCache::new(), KvCache::new());
        let l = rows_f32(&m.step(&[&c, &d[..30]], &mut [&mut cc, &mut cd])?)?;
        close(&l[0], &fc[12]);
        close(&l[1], &fd[29]);
        let l = rows_f32(&m.step(&[&d[30..], &c[..7]], &mut [&mut cd, &mut cc2])?)?;
        close(&l[0], &fd[39]);
        close(&l[1], &fc[6]);
        // f32 on the CPU keeps dense caches; everything else is paged.
        assert_eq!(matches!(ca.store, Store::Paged { .. }), !m.dense_kv());
        // Growing past the first allocation keeps what was cached.
        let long: Vec<u32> = (0..70).map(|i| (i * 7 % 31) as u32).collect();
        let fl = full_logits(r, &long)?;
        let mut cl = KvCache::new();
        m.step(&[&long[..60]], &mut [&mut cl])?;
        for t in 60..70 {
            let l = rows_f32(&m.step(&[&long[t..t + 1]], &mut [&mut cl])?)?;
            close(&l[0], &fl[t]);
        }
        Ok(())
    }

    #[test]
    fn cached_prefill_decode_and_mixed_batches_match_the_full_forward() -> Result<()> {
        // f64: the paged store and batched decode; f32 on the CPU: dense caches and the fused op.
        for (arch, tied, dtype) in [
            ("llama", true, DType::F64),
            ("qwen2", false, DType::F64),
            ("llama", true, DType::F32),
            ("qwen2", false, DType::F32),
        ] {
            let m = tiny_model(&tiny_config(arch, tied), &TrainSpec::default(), dtype)?;
            check_cached_steps(&m, &m, 1e-4)?;
        }
        Ok(())
    }

    /// The paged path on the GPU (run on the GPU machine; skipped elsewhere).
    #[test]
    fn cached_steps_on_cuda_match_the_cpu_full_forward() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        // The tiny configs (head dim 4) take the per-sequence attention;
        // head dim 64 the fused packed-prompt kernel.
        let wide = |arch: &str, tied: bool| {
            let mut c = tiny_config(arch, tied);
            (c.hidden_size, c.num_attention_heads, c.num_key_value_heads) = (128, 2, Some(1));
            c
        };
        for cfg in [tiny_config("llama", true), tiny_config("qwen2", false), wide("llama", true), wide("qwen2", false)]
        {
            let r = tiny_model(&cfg, &TrainSpec::default(), DType::F64)?;
            // bf16's own error grows with the width (the CPU's bf16 path
            // is off by 0.156 on the wide llama config).
            let bf16_tol = if cfg.hidden_size > 16 { 0.5 } else { 0.15 };
            for (dtype, tol) in [(DType::F32, 1e-3), (DType::BF16, bf16_tol)] {
                eprintln!("{} hidden {} {dtype:?}", cfg.model_type, cfg.hidden_size);
                let m = crate::nn::tests::tiny_model_on(&cfg, &TrainSpec::default(), dtype, &dev)?;
                check_cached_steps(&m, &r, tol)?;
                check_prefix_copy(&m, &r, tol)?;
            }
        }
        Ok(())
    }

    /// A prefix copy of a cache continues like the full forward of `r`.
    fn check_prefix_copy(m: &Llama, r: &Llama, tol: f64) -> Result<(KvCache, KvCache)> {
        let close = |a: &[f32], b: &[f64]| close_tol(a, b, tol);
        let ids: Vec<u32> = (0..45).map(|i| (i * 11 % 31) as u32).collect();
        let full = full_logits(r, &ids)?;
        let mut src = KvCache::new();
        m.step(&[&ids[..40]], &mut [&mut src])?;
        // 37 positions: one full block and part of a second.
        let mut copy = src.prefix_copy(m, 37, 8)?;
        assert_eq!(copy.len(), 37);
        let l = rows_f32(&m.step(&[&ids[37..41]], &mut [&mut copy])?)?;
        close(&l[0], &full[40]);
        for t in 41..45 {
            let mut both = [&mut copy, &mut src];
            let l = rows_f32(&m.step(&[&ids[t..t + 1], &ids[t - 1..t]], &mut both)?)?;
            close(&l[0], &full[t]);
            close(&l[1], &full[t - 1]);
        }
        Ok((src, copy))
    }

    #[test]
    fn prefix_copies_continue_like_the_original_and_blocks_are_reused() -> Result<()> {
        for dtype in [DType::F64, DType::F32] {
            let m = tiny_model(&tiny_config("llama", true), &TrainSpec::default(), dtype)?;
            let (src, copy) = check_prefix_copy(&m, &m, 1e-4)?;
            if dtype == DType::F64 {
                let pool = m.kv_pool();
                let total = pool.lock().blocks;
                let held = |c: &KvCache| match &c.store {
                    Store::Paged { blocks, .. } => blocks.len(),
                    _ => 0,
                };
                assert_eq!(pool.lock().free.len() + held(&src) + held(&copy), total);
                drop((src, copy));
                assert_eq!(pool.lock().free.len(), total, "dropped caches give their blocks back");
                // A new sequence reuses them: the pool does not grow.
                let mut again = KvCache::new();
                m.step(&[&[1, 2, 3]], &mut [&mut again])?;
                assert_eq!(pool.lock().blocks, total);
            }
        }
        Ok(())
    }

    /// Dense caches copied from one prefix-cache entry at different
    /// lengths share its rows (no copy) and decode together, with the entry
    /// and a sequence of their own, like the full forward; a copy of such a
    /// cache (the next entry) owns its rows. On the tiny config (head dim
    /// 4) and a wider one (head dim 64: the vector kernels).
    #[test]
    fn shared_prefix_copies_decode_together_like_the_full_forward() -> Result<()> {
        let mut wide = tiny_config("llama", true);
        (wide.hidden_size, wide.num_attention_heads, wide.num_key_value_heads) = (128, 2, Some(1));
        for cfg in [tiny_config("llama", true), wide] {
            let m = tiny_model(&cfg, &TrainSpec::default(), DType::F32)?;
            let close = |a: &[f32], b: &[f64]| close_tol(a, b, 1e-4);
            let ids: Vec<u32> = (0..160).map(|i| (i * 7 % 29) as u32).collect();
            let other: Vec<u32> = (0..50).map(|i| (i * 5 % 23) as u32).collect();
            let (full, full_other) = (full_logits(&m, &ids)?, full_logits(&m, &other)?);
            let mut entry = KvCache::new();
            m.step(&[&ids[..140]], &mut [&mut entry])?;
            let mut copies: Vec<KvCache> =
                [137, 133, 137].iter().map(|&n| entry.prefix_copy(&m, n, 8)).collect::<Result<_>>()?;
            for c in &copies {
                assert_eq!(c.base_len(), c.len(), "shared, not copied");
                assert!(c.bytes() < entry.bytes(), "{} >= {}", c.bytes(), entry.bytes());
            }
            // Prompts after the shared part, then decode steps all together.
            let mut alone = KvCache::new();
            {
                let mut all: Vec<&mut KvCache> = copies.iter_mut().collect();
                all.push(&mut alone);
                let l = rows_f32(&m.step(&[&ids[137..144], &ids[133..144], &ids[137..144], &other[..44]], &mut all)?)?;
                for r in &l[..3] {
                    close(r, &full[143]);
                }
                close(&l[3], &full_other[43]);
            }
            for t in 144..150 {
                let mut all: Vec<&mut KvCache> = copies.iter_mut().collect();
                all.push(&mut alone);
                let l = rows_f32(
                    &m.step(&[&ids[t..t + 1], &ids[t..t + 1], &ids[t..t + 1], &other[t - 100..t - 99]], &mut all)?,
                )?;
                for r in &l[..3] {
                    close(r, &full[t]);
                }
                close(&l[3], &full_other[t - 100]);
            }
            // A copy of a copy within its base shares that base.
            let again = copies[1].prefix_copy(&m, 120, 4)?;
            assert_eq!((again.base_len(), again.len()), (120, 120));
            // A copy past a sequence's base owns its rows and continues like
            // the full forward.
            let mut next = copies[1].prefix_copy(&m, 148, 0)?;
            assert_eq!((next.base_len(), next.len()), (0, 148));
            let l = rows_f32(&m.step(&[&ids[148..150]], &mut [&mut next])?)?;
            close(&l[0], &full[149]);
            for t in 150..160 {
                let l = rows_f32(&m.step(&[&ids[t..t + 1]], &mut [&mut next])?)?;
                close(&l[0], &full[t]);
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
