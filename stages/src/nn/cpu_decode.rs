//! The CPU's decode kernels (f32): the products of a few rows (one per
//! sequence) by the weights, and attention of every sequence's new query
//! row against its cached keys and values.
//!
//! Products: each weight row is read once from memory and dotted with every
//! row of x, the weight rows split over rayon's threads. With AVX2 + FMA a
//! weight row's 8-wide chunk is loaded once for eight x rows (one load of
//! the weights for up to eight multiply-adds), with AVX-512 (from 9 rows)
//! a 16-wide chunk for all of them, and k is taken in blocks whose x rows
//! stay in L1 (`PIPE_CPU_ISA=avx2` or `plain` caps the instructions used,
//! for comparisons; the attention's too). Up to 32 rows: beyond, candle's
//! packing gemm is as fast (decode_bench, 2 cores, 900-token prompts, gemm
//! with AVX-512: 17 rows 88 against 124-130 ms a SmolLM2 step through
//! gemm, 32 rows 161 against 170 at 33).
//!
//! Attention:
//! The work is split into tasks of (sequence, kv head, range of positions).
//! A task takes all the query heads that share its kv head at once, so each
//! cached key and value row is read from memory once per kv head instead of
//! once per query head (3x less traffic for SmolLM2's 9 heads over 3), and
//! long sequences are cut into ranges so that a lone sequence still keeps
//! every thread busy (flash-decoding's split over positions). A task returns
//! its range's softmax pieces (max, sum of exponentials, unnormalised
//! output), merged per head at the end. With AVX2 + FMA the scores of eight
//! positions come out of one transposed horizontal sum, the exponentials
//! are computed eight at a time, and the values are accumulated in registers.

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows of x per product at most (decoding: one per sequence; see above).
pub(crate) const SMALL_ROWS: usize = 32;

/// (m, n) = x (m, k) @ w (n, k).T, m <= [`SMALL_ROWS`].
pub(crate) fn small_matmul_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(m <= SMALL_ROWS && x.len() == m * k && w.len() == n * k);
    // Weight rows per task: enough to amortise the task, enough tasks for the threads.
    const ROWS: usize = 32;
    let mut t = vec![0f32; n * m]; // (n, m): each task writes its rows' outputs
    t.par_chunks_mut(ROWS * m).enumerate().for_each(|(c, out)| {
        let r0 = c * ROWS;
        let rows = out.len() / m;
        let wr = &w[r0 * k..(r0 + rows) * k];
        // (AVX-512 from 9 rows: up to 8 its loop was slower than AVX2's on
        // the Zen 5 measured, 43.5 against 38.8 ms a SmolLM2 step at 8
        // rows, while at 12 and 16 it was 58.5 against 63 and 81 against
        // 87.5.)
        let isa = match Isa::detect() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if m <= 8 => Isa::Avx2,
            isa => isa,
        };
        rows_dot_isa(isa, wr, x, m, k, out);
    });
    let mut y = vec![0f32; m * n];
    for (r, o) in t.chunks_exact(m).enumerate() {
        for (j, v) in o.iter().enumerate() {
            y[j * n + r] = *v;
        }
    }
    y
}

/// The vector instructions a kernel uses: the widest the CPU has.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Isa {
    Plain,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The widest the CPU has, no wider than `PIPE_CPU_ISA` (plain, avx2
    /// or avx512: for comparisons) says.
    fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = std::env::var("PIPE_CPU_ISA").unwrap_or_default();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") && !matches!(cap.as_str(), "avx2" | "plain") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && cap != "plain"
                {
                    return Isa::Avx2;
                }
            }
            let _ = cap;
            Isa::Plain
        })
    }

    /// This one and every narrower one the CPU has (the tests take each).
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        let top = Isa::detect();
        let all = [
            Isa::Plain,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512,
        ];
        let n = all.iter().position(|i| *i == top).expect("listed") + 1;
        all[..n].to_vec()
    }
}

/// [`rows_dot`] with `isa`'s instructions (`isa` no wider than
/// [`Isa::detect`]'s).
fn rows_dot_isa(isa: Isa, w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    assert!(m <= SMALL_ROWS && x.len() == m * k && w.len().is_multiple_of(k) && out.len() == w.len() / k * m);
    match isa {
        // SAFETY: the CPU has the instructions (`isa` came from
        // `Isa::detect` or a narrower one); the lengths were asserted above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::rows_dot(w, x, m, k, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::rows_dot(w, x, m, k, out) },
        Isa::Plain => rows_dot(w, x, m, k, out),
    }
}

/// Bytes of x's rows that a vector product takes at once (half of L1):
/// wider products go over k in blocks, the weight rows read a block at a
/// time.
const X_BLOCK_BYTES: usize = 24 << 10;

/// The loop of the vector products: k in blocks (multiples of `lanes`)
/// whose x rows fit [`X_BLOCK_BYTES`], then each of the `rows` weight
/// rows, then x's m rows `group` at a time; `f(weight row, first x row,
/// x rows, c0, c1)` takes one such piece.
#[inline(always)]
fn blocked_rows(
    rows: usize,
    m: usize,
    k: usize,
    lanes: usize,
    group: usize,
    mut f: impl FnMut(usize, usize, usize, usize, usize),
) {
    let kb = if m * k * 4 <= X_BLOCK_BYTES { k } else { (X_BLOCK_BYTES / (4 * m)) / lanes * lanes };
    for c0 in (0..k).step_by(kb) {
        let c1 = (c0 + kb).min(k);
        for r in 0..rows {
            for g in (0..m).step_by(group) {
                f(r, g, (m - g).min(group), c0, c1);
            }
        }
    }
}

/// out[r * m + j] = w row r . x row j, without vector intrinsics.
fn rows_dot(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    for (r, wrow) in w.chunks_exact(k).enumerate() {
        for j in 0..m {
            out[r * m + j] = dot(wrow, &x[j * k..(j + 1) * k]);
        }
    }
}

/// One sequence's decode row: row `row` of q, at position `past`, against
/// its cache: positions `base.len..=past` at rows `0..` of `k` and `v`
/// ((capacity, kv_heads, head_dim)), the ones before in `base`'s tensors
/// (shared by the sequences copied from one prefix-cache entry).
pub(crate) struct DecodeRow {
    pub(crate) row: usize,
    pub(crate) past: usize,
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) base: Option<(Tensor, Tensor, usize)>,
}

/// The decode rows of a step (see the module's doc).
pub(crate) struct CachedAttention {
    pub(crate) seqs: Vec<DecodeRow>,
    pub(crate) kv: usize,
    pub(crate) scale: f32,
}

/// Positions a task takes at least (below this, a task's fixed costs show).
const MIN_CHUNK: usize = 128;
/// Tasks per thread aimed at, for balance between uneven sequences.
const TASKS_PER_THREAD: usize = 4;

/// Positions per task, given the positions to read per kv head (each
/// shared run once): whole runs when there is enough of them to go round
/// the threads, else ranges of at least [`MIN_CHUNK`].
fn chunk_len(positions: usize, kv: usize, threads: usize) -> usize {
    (positions * kv).div_ceil(TASKS_PER_THREAD * threads.max(1)).max(MIN_CHUNK)
}

/// One kv head's cached rows: position t's key is `k[t * stride + at..][..head_dim]`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
    at: usize,
}

/// A range's softmax pieces for the query vectors of a task.
struct Part {
    /// Largest score per query vector.
    m: Vec<f32>,
    /// Sum of exp(score - m) per query vector.
    l: Vec<f32>,
    /// Sum of exp(score - m) * value per query vector: (vectors, head_dim).
    o: Vec<f32>,
}

/// A sequence's view of its cache for [`attend_all`]: row of q, positions
/// visible, own rows (positions `base_len..`), shared base (positions
/// `0..base_len`) and its identity (sequences with the same one attend to
/// their common part of it together).
#[derive(Clone, Copy)]
struct SeqView<'a> {
    row: usize,
    visible: usize,
    own: (&'a [f32], &'a [f32]),
    base: Option<(&'a [f32], &'a [f32], usize)>,
}

fn f32_slice<'a>(s: &'a candle_core::Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(CpuStorage::F32(x)) => Ok(&x[l.start_offset()..]),
        _ => candle_core::bail!("cached-attention: the cache is not f32 on the CPU"),
    }
}

impl candle_core::CustomOp1 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h, hd) = l.shape().dims3()?;
        let q = match s {
            CpuStorage::F32(v) => &v[l.start_offset()..l.start_offset() + n * h * hd],
            _ => candle_core::bail!("cached-attention: f32 only"),
        };
        let kv = self.kv;
        if kv == 0 || h % kv != 0 {
            candle_core::bail!("cached-attention: {h} heads do not share {kv} kv heads evenly");
        }
        // Borrow every cache's storage for the duration of the op.
        let own: Vec<_> = self.seqs.iter().map(|r| (r.k.storage_and_layout(), r.v.storage_and_layout())).collect();
        let base: Vec<_> = self
            .seqs
            .iter()
            .map(|r| r.base.as_ref().map(|(k, v, _)| (k.storage_and_layout(), v.storage_and_layout())))
            .collect();
        let mut seqs = Vec::with_capacity(self.seqs.len());
        for ((r, (ok, ov)), b) in self.seqs.iter().zip(&own).zip(&base) {
            let visible = r.past + 1;
            let base_len = r.base.as_ref().map_or(0, |b| b.2);
            if r.row >= n || base_len > r.past {
                candle_core::bail!("cached-attention: row {} of {n} at {} past a base of {base_len}", r.row, r.past);
            }
            let view = SeqView {
                row: r.row,
                visible,
                own: (f32_slice(&ok.0, ok.1)?, f32_slice(&ov.0, ov.1)?),
                base: match b {
                    Some((bk, bv)) => Some((f32_slice(&bk.0, bk.1)?, f32_slice(&bv.0, bv.1)?, base_len)),
                    None => None,
                },
            };
            let short = |c: &[f32], rows: usize| c.len() < rows * kv * hd;
            if short(view.own.0, visible - base_len)
                || short(view.own.1, visible - base_len)
                || view.base.is_some_and(|(k, v, len)| short(k, len) || short(v, len))
            {
                candle_core::bail!("cached-attention: a cache holds fewer than {visible} positions");
            }
            seqs.push(view);
        }
        let out = attend_all(q, h, hd, kv, &seqs, self.scale, None);
        Ok((CpuStorage::F32(out), Shape::from((seqs.len(), h, hd))))
    }
}

/// A task: the query vectors of `members` (sequences) for one kv head over
/// rows `r0..r1` of `k`/`v`.
struct Task<'a> {
    members: Vec<usize>,
    g: usize,
    k: &'a [f32],
    v: &'a [f32],
    r0: usize,
    r1: usize,
}

/// Every sequence's row of `q` (n, h, hd) against its cache: (sequences,
/// h, hd), sequence after sequence. Sequences on the same base attend to
/// the part of it they all see together (each base row read once for all
/// of them), the rest of the base and their own rows alone; ranges of
/// `chunk` positions (default: [`chunk_len`]).
fn attend_all<'a>(
    q: &[f32],
    h: usize,
    hd: usize,
    kv: usize,
    seqs: &[SeqView<'a>],
    scale: f32,
    chunk: Option<usize>,
) -> Vec<f32> {
    let rep = h / kv;
    // Groups of sequences on one base (by address), in order of first member.
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        if let Some((k, ..)) = s.base {
            let id = k.as_ptr() as usize;
            match groups.iter_mut().find(|g| g.0 == id) {
                Some(g) => g.1.push(i),
                None => groups.push((id, vec![i])),
            }
        }
    }
    // (members, shared rows of the base) per group of two or more.
    let shared: Vec<(Vec<usize>, usize)> = groups
        .into_iter()
        .filter(|g| g.1.len() > 1)
        .map(|(_, m)| {
            let len = m.iter().map(|&i| seqs[i].base.map_or(0, |b| b.2)).min().unwrap_or(0);
            (m, len)
        })
        .collect();
    let mut alone_from = vec![0usize; seqs.len()];
    for (m, len) in &shared {
        m.iter().for_each(|&i| alone_from[i] = *len);
    }
    let positions: usize = shared.iter().map(|s| s.1).sum::<usize>()
        + seqs.iter().zip(&alone_from).map(|(s, a)| s.visible - a).sum::<usize>();
    let chunk = chunk.unwrap_or_else(|| chunk_len(positions, kv, rayon::current_num_threads()));
    let mut tasks: Vec<Task> = Vec::new();
    let mut ranges = |members: &[usize], g: usize, (k, v): (&'a [f32], &'a [f32]), rows: std::ops::Range<usize>| {
        for r0 in rows.clone().step_by(chunk) {
            tasks.push(Task { members: members.to_vec(), g, k, v, r0, r1: (r0 + chunk).min(rows.end) });
        }
    };
    for (members, len) in &shared {
        let (k, v, _) = seqs[members[0]].base.expect("grouped by base");
        (0..kv).for_each(|g| ranges(members, g, (k, v), 0..*len));
    }
    for (i, s) in seqs.iter().enumerate() {
        let base_len = s.base.map_or(0, |b| b.2);
        for g in 0..kv {
            if let Some((k, v, len)) = s.base {
                ranges(&[i], g, (k, v), alone_from[i]..len);
            }
            ranges(&[i], g, s.own, 0..s.visible - base_len);
        }
    }
    let parts: Vec<Part> = tasks
        .par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(scores, qs): &mut (Vec<f32>, Vec<f32>), t| {
                qs.clear();
                for &i in &t.members {
                    qs.extend_from_slice(&q[(seqs[i].row * h + t.g * rep) * hd..][..rep * hd]);
                }
                let rows = Rows { k: t.k, v: t.v, stride: kv * hd, at: t.g * hd };
                attend_range(qs, t.members.len() * rep, rows, t.r0, t.r1, scale, scores)
            },
        )
        .collect();
    // Merge every (sequence, head)'s pieces, in task order.
    let mut m = vec![f32::NEG_INFINITY; seqs.len() * h];
    let mut l = vec![0f32; seqs.len() * h];
    let mut out = vec![0f32; seqs.len() * h * hd];
    for (t, p) in tasks.iter().zip(&parts) {
        for (j, &i) in t.members.iter().enumerate() {
            for r in 0..rep {
                let (at, pv) = (i * h + t.g * rep + r, j * rep + r);
                let mx = m[at].max(p.m[pv]);
                let (wa, wp) = ((m[at] - mx).exp(), (p.m[pv] - mx).exp());
                l[at] = l[at] * wa + p.l[pv] * wp;
                for (a, b) in out[at * hd..][..hd].iter_mut().zip(&p.o[pv * hd..][..hd]) {
                    *a = *a * wa + b * wp;
                }
                m[at] = mx;
            }
        }
    }
    for (o, l) in out.chunks_exact_mut(hd).zip(&l) {
        let inv = 1.0 / l;
        o.iter_mut().for_each(|a| *a *= inv);
    }
    out
}

/// The softmax pieces of `q`'s `rep` heads (rep, head_dim) over positions
/// `t0..t1` of `c` (`scores` is scratch).
fn attend_range(q: &[f32], rep: usize, c: Rows, t0: usize, t1: usize, scale: f32, scores: &mut Vec<f32>) -> Part {
    let hd = q.len() / rep;
    let n = t1 - t0;
    let mut part = Part { m: vec![f32::NEG_INFINITY; rep], l: vec![0.0; rep], o: vec![0.0; rep * hd] };
    scores.clear();
    scores.resize(rep * n, 0.0);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && Isa::detect() != Isa::Plain {
        // SAFETY: the CPU has AVX2 and FMA (Isa::detect); the head
        // dim is a multiple of 8 and the callers checked the caches' lengths.
        unsafe { avx2::attend_range(q, rep, c, t0, n, scale, scores, &mut part) };
        return part;
    }
    attend_range_plain(q, rep, c, t0, n, scale, scores, &mut part);
    part
}

/// [`attend_range`] without vector intrinsics.
#[allow(clippy::too_many_arguments)]
fn attend_range_plain(q: &[f32], rep: usize, c: Rows, t0: usize, n: usize, scale: f32, s: &mut [f32], part: &mut Part) {
    let hd = q.len() / rep;
    for r in 0..rep {
        let (qr, sr) = (&q[r * hd..][..hd], &mut s[r * n..][..n]);
        let mut m = f32::NEG_INFINITY;
        for (j, sc) in sr.iter_mut().enumerate() {
            *sc = dot(qr, &c.k[(t0 + j) * c.stride + c.at..][..hd]) * scale;
            m = m.max(*sc);
        }
        let mut l = 0f32;
        for sc in sr.iter_mut() {
            *sc = (*sc - m).exp();
            l += *sc;
        }
        let o = &mut part.o[r * hd..][..hd];
        for (j, p) in sr.iter().enumerate() {
            for (a, b) in o.iter_mut().zip(&c.v[(t0 + j) * c.stride + c.at..][..hd]) {
                *a += p * b;
            }
        }
        (part.m[r], part.l[r]) = (m, l);
    }
}

/// A dot product with eight partial sums (a reduction the compiler can
/// vectorise without reordering one running sum).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        tail += x * y;
    }
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Part, Rows};

    /// Positions whose values stay in L1 while every head takes them.
    const VALUE_BLOCK: usize = 64;

    /// [`super::rows_dot`] with AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w` holds whole rows of k, `x` m rows of
    /// k, `out` m values a row of `w`; m <= SMALL_ROWS.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_dot(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
        // SAFETY: the caller's contract (AVX2 + FMA present, pointers in bounds).
        unsafe {
            out.fill(0.0);
            let (wp, xp, op) = (w.as_ptr(), x.as_ptr(), out.as_mut_ptr());
            // x's rows eight at a time (the registers hold eight sums).
            super::blocked_rows(w.len() / k, m, k, 8, 8, |r, g, rows, c0, c1| {
                let (wr, xg, o) = (wp.add(r * k), xp.add(g * k), op.add(r * m + g));
                match rows {
                    1 => row_block::<1, 8>(wr, xg, k, c0, c1, o),
                    2 => row_block::<2, 4>(wr, xg, k, c0, c1, o),
                    3 => row_block::<3, 3>(wr, xg, k, c0, c1, o),
                    4 => row_block::<4, 2>(wr, xg, k, c0, c1, o),
                    5 => row_block::<5, 2>(wr, xg, k, c0, c1, o),
                    6 => row_block::<6, 2>(wr, xg, k, c0, c1, o),
                    7 => row_block::<7, 1>(wr, xg, k, c0, c1, o),
                    _ => row_block::<8, 1>(wr, xg, k, c0, c1, o),
                }
            });
        }
    }

    /// o[j] += w[c0..c1] . x row j [c0..c1] for the J rows of x (row
    /// stride k): each 8-wide chunk of w loaded once for all of them, U
    /// chunks in flight per row (J * U >= 8 independent sums hide the
    /// multiply-add's latency).
    #[inline(always)]
    unsafe fn row_block<const J: usize, const U: usize>(
        w: *const f32,
        x: *const f32,
        k: usize,
        c0: usize,
        c1: usize,
        o: *mut f32,
    ) {
        // SAFETY: the caller's contract (AVX2 + FMA present, pointers in bounds).
        unsafe {
            let mut a = [[_mm256_setzero_ps(); U]; J];
            let mut c = c0;
            while c + 8 * U <= c1 {
                for u in 0..U {
                    let wv = _mm256_loadu_ps(w.add(c + 8 * u));
                    for (j, aj) in a.iter_mut().enumerate() {
                        aj[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(j * k + c + 8 * u)), aj[u]);
                    }
                }
                c += 8 * U;
            }
            while c + 8 <= c1 {
                let wv = _mm256_loadu_ps(w.add(c));
                for (j, aj) in a.iter_mut().enumerate() {
                    aj[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(j * k + c)), aj[0]);
                }
                c += 8;
            }
            let mut v = [_mm256_setzero_ps(); J];
            for (vj, aj) in v.iter_mut().zip(&a) {
                *vj = aj.iter().fold(_mm256_setzero_ps(), |acc, x| _mm256_add_ps(acc, *x));
            }
            let mut s = [0f32; J];
            if let Ok(v8) = <[__m256; 8]>::try_from(&v[..]) {
                _mm256_storeu_ps(s.as_mut_ptr(), sums8(v8));
            } else {
                for (sj, vj) in s.iter_mut().zip(&v) {
                    *sj = hsum(*vj);
                }
            }
            for t in c..c1 {
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj += *w.add(t) * *x.add(j * k + t);
                }
            }
            for (j, sj) in s.iter().enumerate() {
                *o.add(j) += *sj;
            }
        }
    }

    /// [`super::attend_range`] with AVX2 + FMA; head dim a multiple of 8.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `c` holds positions `t0..t0 + n`; `s`
    /// holds rep * n scores.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_range(
        q: &[f32],
        rep: usize,
        c: Rows,
        t0: usize,
        n: usize,
        scale: f32,
        s: &mut [f32],
        part: &mut Part,
    ) {
        // SAFETY: the caller's contract (AVX2 + FMA present, pointers in bounds).
        unsafe {
            let hd = q.len() / rep;
            let cols = hd / 8;
            let (k, v) = (c.k.as_ptr().add(t0 * c.stride + c.at), c.v.as_ptr().add(t0 * c.stride + c.at));
            let sp = s.as_mut_ptr();
            let scale8 = _mm256_set1_ps(scale);
            // Scores, eight positions at a time: their keys stay in L1 while
            // every head takes them.
            let full = n / 8 * 8;
            for t in (0..full).step_by(8) {
                let kt = k.add(t * c.stride);
                for r in 0..rep {
                    let qr = q.as_ptr().add(r * hd);
                    let mut a = [_mm256_setzero_ps(); 8];
                    for cc in 0..cols {
                        let qv = _mm256_loadu_ps(qr.add(cc * 8));
                        for (p, ap) in a.iter_mut().enumerate() {
                            *ap = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kt.add(p * c.stride + cc * 8)), *ap);
                        }
                    }
                    _mm256_storeu_ps(sp.add(r * n + t), _mm256_mul_ps(sums8(a), scale8));
                }
            }
            for t in full..n {
                let kt = std::slice::from_raw_parts(k.add(t * c.stride), hd);
                for r in 0..rep {
                    *sp.add(r * n + t) = super::dot(&q[r * hd..][..hd], kt) * scale;
                }
            }
            // Softmax pieces per head.
            for r in 0..rep {
                let sr = sp.add(r * n);
                let mut m8 = _mm256_set1_ps(f32::NEG_INFINITY);
                for t in (0..full).step_by(8) {
                    m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sr.add(t)));
                }
                let mut m = hmax(m8);
                for t in full..n {
                    m = m.max(*sr.add(t));
                }
                let mv = _mm256_set1_ps(m);
                let mut l8 = _mm256_setzero_ps();
                for t in (0..full).step_by(8) {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr.add(t)), mv));
                    _mm256_storeu_ps(sr.add(t), e);
                    l8 = _mm256_add_ps(l8, e);
                }
                let mut l = hsum(l8);
                for t in full..n {
                    let e = (*sr.add(t) - m).exp();
                    *sr.add(t) = e;
                    l += e;
                }
                (part.m[r], part.l[r]) = (m, l);
            }
            // Values, in blocks of positions that stay in L1 while every head
            // takes them; each head's output accumulated in registers.
            let o = part.o.as_mut_ptr();
            for tb in (0..n).step_by(VALUE_BLOCK) {
                let cnt = VALUE_BLOCK.min(n - tb);
                let vt = v.add(tb * c.stride);
                for r in 0..rep {
                    let (p, orow) = (sp.add(r * n + tb), o.add(r * hd));
                    let mut col = 0;
                    while col + 64 <= hd {
                        axpy::<8>(orow.add(col), p, vt.add(col), c.stride, cnt);
                        col += 64;
                    }
                    while col + 32 <= hd {
                        axpy::<4>(orow.add(col), p, vt.add(col), c.stride, cnt);
                        col += 32;
                    }
                    while col < hd {
                        axpy::<1>(orow.add(col), p, vt.add(col), c.stride, cnt);
                        col += 8;
                    }
                }
            }
        }
    }

    /// acc[..8W] += sum over t < cnt of p[t] * v[t * stride..][..8W].
    #[inline(always)]
    unsafe fn axpy<const W: usize>(acc: *mut f32, p: *const f32, v: *const f32, stride: usize, cnt: usize) {
        // SAFETY: the caller's contract (AVX2 + FMA present, pointers in bounds).
        unsafe {
            let mut a = [_mm256_setzero_ps(); W];
            for (j, aj) in a.iter_mut().enumerate() {
                *aj = _mm256_loadu_ps(acc.add(j * 8));
            }
            for t in 0..cnt {
                let (pb, vr) = (_mm256_set1_ps(*p.add(t)), v.add(t * stride));
                for (j, aj) in a.iter_mut().enumerate() {
                    *aj = _mm256_fmadd_ps(pb, _mm256_loadu_ps(vr.add(j * 8)), *aj);
                }
            }
            for (j, aj) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(j * 8), *aj);
            }
        }
    }

    /// The eight vectors' own sums, as one vector (lane p: the sum of a[p]).
    #[inline(always)]
    pub(super) unsafe fn sums8(a: [__m256; 8]) -> __m256 {
        // SAFETY: the caller's contract (AVX2 + FMA present, pointers in bounds).
        unsafe {
            // hadd(x, y) = [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7].
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let t2 = _mm256_hadd_ps(a[4], a[5]);
            let t3 = _mm256_hadd_ps(a[6], a[7]);
            // Lane p of the low halves: a[p]'s first four lanes summed (p < 4,
            // then a[p]'s for p >= 4 from u1); the high halves: the last four.
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let lo = _mm256_permute2f128_ps(u0, u1, 0x20);
            let hi = _mm256_permute2f128_ps(u0, u1, 0x31);
            _mm256_add_ps(lo, hi)
        }
    }

    /// The eight lanes of `x` folded by `f` (lane-wise, on halves) into one.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fold8(x: __m256, f: impl Fn(__m128, __m128) -> __m128) -> f32 {
        let s = f(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let s = f(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(f(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn hsum(x: __m256) -> f32 {
        fold8(x, |a, b| _mm_add_ps(a, b))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(x: __m256) -> f32 {
        fold8(x, |a, b| _mm_max_ps(a, b))
    }

    /// e^x for x <= 0, eight at a time (range reduction by ln 2 in two
    /// parts and a degree-6 polynomial, as Cephes' expf: within 2 ulp of
    /// `f32::exp` down to e^-87, where it stops; below, ~1e-38 instead of 0).
    #[inline(always)]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: the caller's contract (AVX2 + FMA present, pointers in bounds).
        unsafe {
            let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.336_55)), _mm256_set1_ps(88.376_26));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut y = _mm256_set1_ps(1.987_569_1e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
                y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
            }
            let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            ));
            _mm256_mul_ps(y, pow2)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::rows_dot`] with AVX-512: a weight row's 16-wide chunk loaded
    /// once for up to 16 rows of x, k's tail under a mask.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `w` holds whole rows of k, `x` m rows of k,
    /// `out` m values a row of `w`; m <= SMALL_ROWS.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rows_dot(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
        // SAFETY: the caller's contract (AVX-512F present, pointers in bounds).
        unsafe {
            out.fill(0.0);
            let (wp, xp, op) = (w.as_ptr(), x.as_ptr(), out.as_mut_ptr());
            // x's rows sixteen at a time.
            super::blocked_rows(w.len() / k, m, k, 16, 16, |r, g, rows, c0, c1| {
                let (wr, xp, o) = (wp.add(r * k), xp.add(g * k), op.add(r * m + g));
                match rows {
                    1 => row_block::<1, 8>(wr, xp, k, c0, c1, o),
                    2 => row_block::<2, 4>(wr, xp, k, c0, c1, o),
                    3 => row_block::<3, 3>(wr, xp, k, c0, c1, o),
                    4 => row_block::<4, 2>(wr, xp, k, c0, c1, o),
                    5 => row_block::<5, 2>(wr, xp, k, c0, c1, o),
                    6 => row_block::<6, 2>(wr, xp, k, c0, c1, o),
                    7 => row_block::<7, 2>(wr, xp, k, c0, c1, o),
                    8 => row_block::<8, 2>(wr, xp, k, c0, c1, o),
                    9 => row_block::<9, 1>(wr, xp, k, c0, c1, o),
                    10 => row_block::<10, 1>(wr, xp, k, c0, c1, o),
                    11 => row_block::<11, 1>(wr, xp, k, c0, c1, o),
                    12 => row_block::<12, 1>(wr, xp, k, c0, c1, o),
                    13 => row_block::<13, 1>(wr, xp, k, c0, c1, o),
                    14 => row_block::<14, 1>(wr, xp, k, c0, c1, o),
                    15 => row_block::<15, 1>(wr, xp, k, c0, c1, o),
                    _ => row_block::<16, 1>(wr, xp, k, c0, c1, o),
                }
            });
        }
    }

    /// o[j] += w[c0..c1] . x row j [c0..c1] for the J rows of x (row
    /// stride k), U chunks in flight per row.
    #[inline(always)]
    unsafe fn row_block<const J: usize, const U: usize>(
        w: *const f32,
        x: *const f32,
        k: usize,
        c0: usize,
        c1: usize,
        o: *mut f32,
    ) {
        // SAFETY: the caller's contract (AVX-512F present, pointers in
        // bounds; the masked loads touch only c..c1).
        unsafe {
            let mut a = [[_mm512_setzero_ps(); U]; J];
            let mut c = c0;
            while c + 16 * U <= c1 {
                for u in 0..U {
                    let wv = _mm512_loadu_ps(w.add(c + 16 * u));
                    for (j, aj) in a.iter_mut().enumerate() {
                        aj[u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(j * k + c + 16 * u)), aj[u]);
                    }
                }
                c += 16 * U;
            }
            while c < c1 {
                let mask: __mmask16 = if c1 - c >= 16 { 0xffff } else { (1u16 << (c1 - c)) - 1 };
                let wv = _mm512_maskz_loadu_ps(mask, w.add(c));
                for (j, aj) in a.iter_mut().enumerate() {
                    aj[0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x.add(j * k + c)), aj[0]);
                }
                c += 16;
            }
            // Each row's sum folded to 8 lanes, then eight rows' sums at once.
            let mut v = [_mm256_setzero_ps(); J];
            for (vj, aj) in v.iter_mut().zip(&a) {
                let z = aj.iter().fold(_mm512_setzero_ps(), |acc, x| _mm512_add_ps(acc, *x));
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1));
                *vj = _mm256_add_ps(_mm512_castps512_ps256(z), hi);
            }
            let mut g = 0;
            while g + 8 <= J {
                let s = super::avx2::sums8(v[g..g + 8].try_into().expect("eight"));
                _mm256_storeu_ps(o.add(g), _mm256_add_ps(_mm256_loadu_ps(o.add(g)), s));
                g += 8;
            }
            for (j, vj) in v.iter().enumerate().skip(g) {
                *o.add(j) += super::avx2::hsum(*vj);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every instruction set this CPU has gives the f64 product, for every
    /// row count, widths with and without a tail, blocked over k or not.
    #[test]
    fn every_isa_products_match_the_f64_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let isas = Isa::available();
        for (m, k, n) in (1..=SMALL_ROWS).flat_map(|m| [(m, 576, 5), (m, 37, 3), (m, 1540, 2), (m, 16, 1)]) {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            for &isa in &isas {
                let mut out = vec![f32::NAN; n * m];
                rows_dot_isa(isa, &w, &x, m, k, &mut out);
                for r in 0..n {
                    for j in 0..m {
                        let want: f64 = (0..k).map(|t| w[r * k + t] as f64 * x[j * k + t] as f64).sum();
                        let got = out[r * m + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (k as f64).sqrt(),
                            "{isa:?} {m}x{k} row {r} x {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        eprintln!("instruction sets checked: {isas:?}");
    }

    /// Plain f64 attention of one row over `visible` positions.
    fn reference(q: &[f32], rows: Rows, hd: usize, visible: usize, scale: f32) -> Vec<f64> {
        let s: Vec<f64> = (0..visible)
            .map(|t| {
                let k = &rows.k[t * rows.stride + rows.at..][..hd];
                q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..hd)
            .map(|d| (0..visible).map(|t| e[t] * rows.v[t * rows.stride + rows.at + d] as f64).sum::<f64>() / z)
            .collect()
    }

    /// Head dims on both paths (multiples of 64, of 32, of 8, and not of 8),
    /// GQA and plain heads, sequences of 1 to 300 positions, whole and cut
    /// into ranges (ranges of 7 and 128 positions: tails of every length);
    /// sequences alone, and on two shared bases (three of them on one, at
    /// different lengths of it; one alone on the other).
    #[test]
    fn decode_attention_matches_plain_softmax_over_every_split() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (hd, h, kv) in [(64, 9, 3), (128, 4, 2), (32, 2, 2), (24, 6, 1), (12, 3, 3)] {
            let cap = 310;
            let mut fill =
                |rows: usize| (0..rows * kv * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<_>>();
            let bases = [(fill(cap), fill(cap)), (fill(cap), fill(cap))];
            // (visible, base: (which, len))
            let specs: [(usize, Option<(usize, usize)>); 8] = [
                (1, None),
                (5, None),
                (130, None),
                (300, None),
                (200, Some((0, 150))),
                (180, Some((0, 131))),
                (140, Some((0, 139))),
                (60, Some((1, 40))),
            ];
            let owns: Vec<(Vec<f32>, Vec<f32>)> = specs.iter().map(|_| (fill(cap), fill(cap))).collect();
            let n = specs.len() + 2;
            let q = fill(n * h / kv);
            let seqs: Vec<SeqView> = specs
                .iter()
                .zip(&owns)
                .enumerate()
                .map(|(i, (&(visible, base), (k, v)))| SeqView {
                    row: (i * 3 + 1) % n, // out of order, a row unused
                    visible,
                    own: (&k[..], &v[..]),
                    base: base.map(|(b, len)| (&bases[b].0[..], &bases[b].1[..], len)),
                })
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            for chunk in [7, 128, 1 << 20] {
                let out = attend_all(&q, h, hd, kv, &seqs, scale, Some(chunk));
                for (i, s) in seqs.iter().enumerate() {
                    // The sequence's positions in one buffer.
                    let base_len = s.base.map_or(0, |b| b.2);
                    let whole = |b: Option<&[f32]>, own: &[f32]| -> Vec<f32> {
                        let mut x = b.map_or(Vec::new(), |b| b[..base_len * kv * hd].to_vec());
                        x.extend_from_slice(&own[..(s.visible - base_len) * kv * hd]);
                        x
                    };
                    let (k, v) = (whole(s.base.map(|b| b.0), s.own.0), whole(s.base.map(|b| b.1), s.own.1));
                    for head in 0..h {
                        let rows = Rows { k: &k, v: &v, stride: kv * hd, at: head / (h / kv) * hd };
                        let want = reference(&q[(s.row * h + head) * hd..][..hd], rows, hd, s.visible, scale);
                        let got = &out[(i * h + head) * hd..][..hd];
                        for (d, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                                "hd {hd} seq {i} ({} positions) head {head} dim {d} chunk {chunk}: {g} vs {w}",
                                s.visible
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_split_long_sequences_only_when_threads_would_idle() {
        // Eight sequences of 900 positions and 3 kv heads: 24 tasks whole.
        assert_eq!(chunk_len(8 * 900, 3, 2), 2700);
        // One: ranges of 338 positions, 9 tasks for 2 threads.
        assert_eq!(chunk_len(900, 3, 2), 338);
        // Short sequences are never cut below MIN_CHUNK.
        assert_eq!(chunk_len(20, 3, 16), MIN_CHUNK);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp_of_exp() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return;
        }
        use std::arch::x86_64::*;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let xs = [x, x * 0.5, x * 0.25, x * 0.1, x * 0.01, x * 1e-3, x * 1e-5, 0.0];
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            for (g, x) in got.iter().zip(xs) {
                let want = (x as f64).exp();
                assert!(((*g as f64) - want).abs() <= 2.5 * f32::EPSILON as f64 * want, "exp({x}) = {g}, not {want}");
            }
            x += 0.173;
        }
    }
}
