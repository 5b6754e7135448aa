//! Differentiable building blocks. candle 0.11's fused `softmax_last_dim`,
//! `rms_norm`, `rope*` and `QMatMul` have no backward pass, so everything
//! here is composed from ops that do (checked against finite differences in
//! the tests), plus [`frozen_matmul`]: `x @ w.T` whose backward only
//! computes the gradient for `x`. candle's own matmul backward also computes
//! the (discarded) gradient of a frozen weight: a third matmul per linear.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

use crate::nn::nf4::Nf4Tensor;

/// RMSNorm in f32 (or f64 when the input is f64), scaled by `w`. On CUDA:
/// the fused kernel ([`crate::nn::fused`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::nn::fused::usable_or_cpu(x) && w.dtype() == x.dtype() {
        return crate::nn::fused::rms_norm(x, w, eps);
    }
    let dt = x.dtype();
    let xf = if dt == DType::F64 { x.clone() } else { x.to_dtype(DType::F32)? };
    let inv = rms_inv(&xf, eps)?;
    xf.broadcast_mul(&inv)?.to_dtype(dt)?.broadcast_mul(w)
}

/// `1 / sqrt(mean(x^2) + eps)` over the last dim (kept as a dim of 1).
pub(crate) fn rms_inv(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?.recip()
}

/// Softmax over the last dim. The max is detached: softmax does not depend
/// on it, and its gradient path would only add zeros.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dim.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Rotary embedding, `transformers`' non-interleaved layout (rotate_half):
/// `x` is (N, heads, head_dim); `cos`/`sin` are (N, head_dim/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::nn::fused::usable(x) && x.rank() == 3 {
        return crate::nn::fused::rope(x, cos, sin);
    }
    let half = x.dim(D::Minus1)? / 2;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = x1.broadcast_mul(&cos)?.sub(&x2.broadcast_mul(&sin)?)?;
    let b = x2.broadcast_mul(&cos)?.add(&x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// `x` contiguous from any offset (what code that takes a tensor's address
/// with its offset reads, as the fused optimizer does: a view of rows of a
/// larger gradient, such as k's and v's in the stacked q/k/v gradient, is
/// not copied), copied only when it is not already.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        Ok(x.clone())
    } else {
        x.force_contiguous()
    }
}

/// Whether a backward pass's gradient so far, handed to an op's `bwd_acc`,
/// may be added into in place as a dense (`dims`, `dtype`) tensor: nothing
/// else holds its storage (vendor/candle-core's `Tensor::is_sole_handle`)
/// and it is contiguous.
pub(crate) fn writable_in_place(a: &Tensor, dims: &[usize], dtype: DType) -> bool {
    a.is_sole_handle() && a.is_contiguous() && a.dims() == dims && a.dtype() == dtype
}

/// `x` contiguous from offset 0 (what the custom ops below read), copied
/// only when it is not already.
pub(crate) fn dense(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset() == 0 {
        Ok(x.clone())
    } else {
        x.force_contiguous()
    }
}

/// A custom op's input storage as a tensor (no graph), to compute with
/// tensor ops inside `cpu_fwd`.
pub(crate) fn cpu_tensor(s: &CpuStorage, l: &Layout) -> Tensor {
    Tensor::from_storage(Storage::Cpu(s.clone()), l.shape().clone(), BackpropOp::none(), false)
}

/// A result tensor back as a custom op's output storage.
pub(crate) fn cpu_storage(y: &Tensor, op: &str) -> Result<(CpuStorage, Shape)> {
    let (st, _) = y.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => Ok((c.clone(), y.shape().clone())),
        _ => candle_core::bail!("{op}: the weight is not on the CPU"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_tensor(s: &candle_core::CudaStorage, l: &Layout) -> Result<Tensor> {
    use candle_core::backend::BackendStorage;
    Ok(Tensor::from_storage(Storage::Cuda(s.try_clone(l)?), l.shape().clone(), BackpropOp::none(), false))
}

#[cfg(feature = "cuda")]
fn cuda_storage(y: &Tensor, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (st, yl) = y.storage_and_layout();
    match &*st {
        Storage::Cuda(c) => Ok((c.try_clone(yl)?, y.shape().clone())),
        _ => candle_core::bail!("{op}: the weight is not on the GPU"),
    }
}

/// `x @ w.T` for a weight that never trains: backward returns only dx.
/// `x` is (m, k), `w` (n, k).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_product(x, FrozenWeight::Dense(w.clone()))
}

/// [`frozen_matmul`] with an NF4 weight (QLoRA): dequantised for the
/// forward product and again for the backward one, so no dequantised copy
/// lives between them (bitsandbytes' scheme).
pub fn nf4_matmul(x: &Tensor, q: &Arc<Nf4Tensor>) -> Result<Tensor> {
    frozen_product(x, FrozenWeight::Nf4(q.clone()))
}

/// `x @ w.T` for either kind of frozen weight (see [`frozen_matmul`]).
pub fn frozen_product(x: &Tensor, w: FrozenWeight) -> Result<Tensor> {
    if !x.track_op() {
        if let FrozenWeight::Dense(wd) = &w {
            if let Some(y) = cpu_small_matmul(x, wd)? {
                return Ok(y);
            }
        }
        return x.matmul(&w.get(x.device(), x.dtype())?.t()?);
    }
    // The op reads the storage from offset 0 with contiguous strides.
    dense(x)?.apply_op1(FrozenMatmul { w })
}

/// `x @ w.T` for a few rows of x (decoding: one per sequence) on the CPU in
/// f32, outside any graph: each weight row is read once and dotted with
/// every row of x, the weight rows split over rayon's threads
/// ([`crate::nn::cpu_decode`]). At these sizes the weights are nearly all the
/// bytes, and the general gemm (which packs its operands) runs well below
/// memory bandwidth. None when it does not apply (another device or dtype,
/// more rows, strided operands, `PIPE_CPU_GEMV=0`).
pub fn cpu_small_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || x.rank() != 2
        || w.rank() != 2
        || x.dim(0)? > crate::nn::cpu_decode::SMALL_ROWS
        || x.track_op()
        || w.track_op()
        || std::env::var_os("PIPE_CPU_GEMV").is_some_and(|v| v == "0")
    {
        return Ok(None);
    }
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    if k != k2 || m == 0 {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xc), Storage::Cpu(wc)) = (&*xs, &*ws) else { return Ok(None) };
    let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
        return Ok(None);
    };
    let (xv, wv) = (&xc.as_slice::<f32>()?[xa..xb], &wc.as_slice::<f32>()?[wa..wb]);
    Ok(Some(Tensor::from_vec(crate::nn::cpu_decode::small_matmul_f32(xv, m, k, wv, n), (m, n), x.device())?))
}

struct FrozenMatmul {
    w: FrozenWeight,
}

impl FrozenMatmul {
    /// `x @ w.T` on the storages (no copy of the input or the output): x
    /// (m, k) contiguous, w (n, k).
    fn product<S: BackendStorage>(
        s: &S,
        l: &Layout,
        w: &Tensor,
        pick: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (n, k2) = w.dims2()?;
        if k != k2 || m == 0 || n == 0 || k == 0 {
            candle_core::bail!("frozen-matmul: x {:?} and weight {:?} do not fit", l.dims(), w.dims());
        }
        let (ws, wl) = w.storage_and_layout();
        let Some(ws) = pick(&ws) else { candle_core::bail!("frozen-matmul: the weight is on another device") };
        let y = s.matmul(ws, (1, m, n, k), l, &wl.transpose(0, 1)?)?;
        Ok((y, Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.w.get(&candle_core::Device::Cpu, s.dtype())?;
        Self::product(s, l, &w, cpu_of)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let w = self.w.get(&candle_core::Device::Cuda(s.device().clone()), s.dtype())?;
        Self::product(s, l, &w, cuda_of)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w.get(dy.device(), dy.dtype())?)?))
    }
}

/// `x @ w.T` for a weight that trains (full fine-tuning), as one op whose
/// backward writes `dw = dy.T @ x` in the weight's own (n, k) layout: the
/// composition `x.matmul(&w.t())` hands back the transposed product and
/// candle then adds it to the weight's gradient through a strided
/// (transposed) pass over every weight, each step. x (m, k), w (n, k).
pub fn trained_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    if k != k2 || m == 0 || n == 0 || x.dtype() != w.dtype() {
        candle_core::bail!(
            "trained-matmul: x {:?} {:?} and weight {:?} {:?} do not fit",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype()
        );
    }
    dense(x)?.apply_op2(&dense(w)?, TrainedMatmul)
}

struct TrainedMatmul;

/// A tensor a custom op's forward pass keeps for its backward pass (log-sum-
/// exps, 1 / rms, x @ A.T).
#[derive(Default)]
pub(crate) struct Saved(std::sync::Mutex<Option<Tensor>>);

impl Saved {
    pub fn keep(&self, t: Tensor) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(t);
        }
    }

    /// What the forward pass kept; an error naming `op` before it ran.
    pub fn get(&self, op: &str) -> Result<Tensor> {
        match self.0.lock().ok().and_then(|g| g.clone()) {
            Some(t) => Ok(t),
            None => candle_core::bail!("{op}: backward before forward"),
        }
    }
}

impl TrainedMatmul {
    fn product<S: BackendStorage>(s: &S, l: &Layout, ws: &S, wl: &Layout) -> Result<(S, Shape)> {
        let ((m, k), (n, _)) = (l.shape().dims2()?, wl.shape().dims2()?);
        Ok((s.matmul(ws, (1, m, n, k), l, &wl.transpose(0, 1)?)?, Shape::from((m, n))))
    }
}

impl candle_core::CustomOp2 for TrainedMatmul {
    fn name(&self) -> &'static str {
        "trained-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        Self::product(s, l, ws, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Self::product(s, l, ws, wl)
    }

    /// On CUDA, where x's gradient so far is a dense tensor nothing else
    /// shares (two projections of one input: the second finds the first's
    /// gradient), dy @ w is added into it by the product itself (cuBLAS,
    /// beta = 1), instead of into a new tensor and then by an add pass.
    fn bwd_acc(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
        acc: &mut Option<Tensor>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, bool)> {
        // From detached inputs: a weight's gradient that kept this graph
        // (`x`, `dy`) would hold it until the whole backward pass is over.
        let dy = dense(dy)?.detach();
        let dw = if w.track_op() { Some(dy.t()?.matmul(&x.detach())?) } else { None };
        if !x.track_op() {
            return Ok((None, dw, false));
        }
        let fits = |a: &Tensor| {
            a.device().is_cuda()
                && writable_in_place(a, x.dims(), dy.dtype())
                && env_once!("PIPE_MATMUL_ACC").is_none_or(|v| v != "0")
        };
        if let Some(a) = acc.take_if(|a| fits(a)) {
            a.inplace_op3(&dy, &dense(w)?.detach(), &AddMatmul { ta: false, tb: false, alpha: 1.0 })?;
            return Ok((Some(a), dw, true));
        }
        Ok((Some(dy.matmul(&w.detach())?), dw, false))
    }
}

/// The backward pass of `y` seeded with the gradient `d` (same shape): the
/// gradients of `sum(y * d)`, without that product and sum (candle's sum
/// of every element runs in a single block on CUDA: 3.4 ms for 67M bf16
/// values on an H200). The values are those of the composition: its
/// gradient for `y` is `d * 1`.
pub fn backward_from(y: &Tensor, d: &Tensor) -> Result<candle_core::backprop::GradStore> {
    if y.dims() != d.dims() {
        candle_core::bail!("backward_from: gradient {:?} for a tensor {:?}", d.dims(), y.dims());
    }
    crate::nn::fused::install_grad_add();
    y.apply_op1(Seed { d: d.detach() })?.backward()
}

/// A scalar (zero) whose gradient, sent back to its input, is `d`.
struct Seed {
    d: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "seed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_storage(&Tensor::zeros((), s.dtype(), &candle_core::Device::Cpu)?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_storage(&Tensor::zeros((), s.dtype(), &candle_core::Device::Cuda(s.device().clone()))?, self.name())
    }

    /// `d` itself: the seed is only ever the root of `backward_from`, whose
    /// gradient is 1 (a broadcast product by it was a pass over `d`).
    fn bwd(&self, x: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.d.to_dtype(x.dtype())?))
    }
}

/// The dropout of a LoRA adapter's input: each element kept (times
/// 1 / (1 - p)) or zeroed, as drawn by [`dropout_mask`] from `seed`.
#[derive(Clone, Copy, Debug)]
pub struct LoraDropout {
    pub p: f64,
    pub seed: u64,
}

/// Which of `n` elements a dropout of probability `p` keeps, a bit each
/// (bit i % 64 of word i / 64): a ChaCha8 stream seeded with `seed`, one
/// f64 an element in order, dropped where it is below p. The one draw of
/// every LoRA dropout mask (composed or inside [`lora_linear`]), so a
/// recomputation (gradient checkpointing, resume) draws the same mask.
/// (Drawn in parallel: chunks of the stream, each from its own word
/// position, two 32-bit words an f64: the same bits as drawing in order.)
pub fn dropout_mask(p: f64, seed: u64, n: usize) -> Vec<u64> {
    use rand::{RngCore, SeedableRng};
    use rayon::prelude::*;
    // Words of bits a chunk (4,096 elements).
    const CW: usize = 64;
    let keep_from = dropout_keep_from(p);
    let mut bits = vec![0u64; n.div_ceil(64)];
    bits.par_chunks_mut(CW).enumerate().for_each(|(c, out)| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let start = c * CW * 64;
        rng.set_word_pos(2 * start as u128);
        for (w, word) in out.iter_mut().enumerate() {
            let base = start + w * 64;
            for j in 0..(n - base).min(64) {
                *word |= u64::from(rng.next_u64() >> 11 >= keep_from) << j;
            }
        }
    });
    bits
}

/// `t` (contiguous, on the CPU, f32 or f64) times the dropout mask `bits`
/// (`keep` where kept, 0 where dropped; `keep` rounded to f32 first, as
/// [`dropout_values`] makes it), in one pass.
fn masked(t: &Tensor, bits: &[u64], keep: f64) -> Result<Tensor> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*st else { candle_core::bail!("lora-linear: the dropout's product on the CPU only") };
    let out = masked_cpu(c, l, bits, keep)?;
    Ok(Tensor::from_storage(Storage::Cpu(out), t.shape().clone(), BackpropOp::none(), false))
}

/// [`masked`] of a contiguous CPU storage (f32 or f64): x * keep where
/// kept and x * 0 where dropped, as the composition's product by the mask.
fn masked_cpu(c: &CpuStorage, l: &Layout, bits: &[u64], keep: f64) -> Result<CpuStorage> {
    let Some((o, e)) = l.contiguous_offsets() else { candle_core::bail!("lora-linear: the input is not contiguous") };
    let on = |i: usize| kept(bits, i);
    let k32 = keep as f32;
    Ok(match c {
        CpuStorage::F32(v) => {
            CpuStorage::F32(v[o..e].iter().enumerate().map(|(i, x)| x * if on(i) { k32 } else { 0.0 }).collect())
        }
        CpuStorage::F64(v) => {
            let k = k32 as f64;
            CpuStorage::F64(v[o..e].iter().enumerate().map(|(i, x)| x * if on(i) { k } else { 0.0 }).collect())
        }
        _ => candle_core::bail!("lora-linear: dropout in f32 or f64 only"),
    })
}

/// The least 53-bit draw (a ChaCha8 `next_u64 >> 11`) that keeps its
/// element: rand's f64 is that draw times 2^-53, so `f64 >= p` is
/// `draw >= p * 2^53` (exact: a power-of-two scaling), rounded up.
pub(crate) fn dropout_keep_from(p: f64) -> u64 {
    (p * (1u64 << 53) as f64).ceil().max(0.0) as u64
}

/// Whether bit i of a dropout mask ([`dropout_mask`]) keeps element i.
fn kept(bits: &[u64], i: usize) -> bool {
    bits[i / 64] >> (i % 64) & 1 == 1
}

/// The kept elements' factor of a dropout of probability `p`.
pub fn dropout_keep(p: f64) -> f64 {
    1.0 / (1.0 - p)
}

/// The dropout mask as values (`keep` or 0) of `shape` in `dtype`.
pub fn dropout_values(
    bits: &[u64],
    keep: f64,
    shape: &Shape,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.elem_count()).map(|i| if kept(bits, i) { keep as f32 } else { 0.0 }).collect();
    Tensor::from_vec(v, shape.clone(), dev)?.to_dtype(dtype)
}

/// Whether [`lora_linear`] takes a dropout for input `x`: on the CPU in
/// f32 or f64.
pub fn lora_dropout_fits(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// A LoRA linear in one op: `x @ w.T + scale * (dropout(x) @ a.T) @ b.T`
/// for a frozen (or NF4) `w` (n, k), `a` (r, k), `b` (n, r), `x` (m, k),
/// `drop` the adapter's dropout (None: none). Keeps for the backward pass
/// only `dropout(x) @ a.T` (m, r) and the dropout's mask (a bit an
/// element) besides its inputs, where the composition's graph holds three
/// more (m, n) tensors (the base product, the update and its scaled copy)
/// and, with dropout, two more (m, k) ones (the mask and the dropped
/// input) per linear until the backward pass ends. Differentiable in x, a
/// and b. Dropout on the CPU in f32 or f64 only.
pub fn lora_linear(
    x: &Tensor,
    w: FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    drop: Option<LoraDropout>,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (r, ka) = a.dims2()?;
    let (n, rb) = b.dims2()?;
    let (nw, kw) = w.dims2()?;
    if ka != k || rb != r || nw != n || kw != k || a.dtype() != x.dtype() || b.dtype() != x.dtype() || m == 0 {
        candle_core::bail!(
            "lora-linear: x {:?}, w ({nw}, {kw}), a {:?}, b {:?} do not fit (dtypes {:?}/{:?}/{:?})",
            x.dims(),
            a.dims(),
            b.dims(),
            x.dtype(),
            a.dtype(),
            b.dtype()
        );
    }
    if drop.is_some() && !lora_dropout_fits(x) {
        candle_core::bail!("lora-linear: dropout inside the op on the CPU in f32 or f64 only, not {:?}", x.dtype());
    }
    // (Drawn here, before the op: the forward pass and the backward pass
    // read the same bits.)
    let mask = drop.map(|d| (dropout_mask(d.p, d.seed, m * k), dropout_keep(d.p)));
    dense(x)?.apply_op3(&dense(a)?, &dense(b)?, LoraLinear { w, scale, xa: Saved::default(), mask })
}

/// A frozen weight for [`frozen_matmul`]-style products: dense, or NF4
/// (dequantised for each use).
pub enum FrozenWeight {
    Dense(Tensor),
    Nf4(Arc<Nf4Tensor>),
}

impl FrozenWeight {
    /// The (n, k) weight in `dtype` on `device`.
    fn get(&self, device: &candle_core::Device, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Nf4(q) => q.dequantize(device, dtype),
        }
    }

    fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) => w.dims2(),
            FrozenWeight::Nf4(q) => Ok(q.shape()),
        }
    }
}

fn cpu_of(st: &Storage) -> Option<&CpuStorage> {
    match st {
        Storage::Cpu(c) => Some(c),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_of(st: &Storage) -> Option<&candle_core::CudaStorage> {
    match st {
        Storage::Cuda(c) => Some(c),
        _ => None,
    }
}

struct LoraLinear {
    w: FrozenWeight,
    scale: f64,
    /// `dropout(x) @ a.T` (unscaled) from the forward pass.
    xa: Saved,
    /// The adapter's dropout: the kept elements of x (a bit each) and
    /// their factor.
    mask: Option<(Vec<u64>, f64)>,
}

impl LoraLinear {
    #[allow(clippy::too_many_arguments)]
    fn run<S: BackendStorage>(
        &self,
        (x, xl): (&S, &Layout),
        (a, al): (&S, &Layout),
        (b, bl): (&S, &Layout),
        device: &candle_core::Device,
        pick: fn(&Storage) -> Option<&S>,
        wrap: impl Fn(S) -> Storage,
        xd: Option<S>,
    ) -> Result<(S, Shape)> {
        let (m, _) = xl.shape().dims2()?;
        let (r, _) = al.shape().dims2()?;
        let (n, _) = bl.shape().dims2()?;
        let (base, _) = FrozenMatmul::product(x, xl, &self.w.get(device, x.dtype())?, pick)?;
        let mr = Layout::contiguous((m, r));
        let xa = Self::times_a((x, xl), xd.as_ref(), (a, al))?;
        let xas = xa.affine(&mr, self.scale, 0.0)?;
        let up = xas.matmul(b, (1, m, n, r), &mr, &bl.transpose(0, 1)?)?;
        let mn = Layout::contiguous((m, n));
        let y = base.binary_impl::<candle_core::op::Add>(&up, &mn, &mn)?;
        self.keep_xa(wrap(xa), m, r);
        Ok((y, Shape::from((m, n))))
    }

    fn keep_xa(&self, xa: Storage, m: usize, r: usize) {
        self.xa.keep(Tensor::from_storage(xa, (m, r), BackpropOp::none(), false));
    }

    /// `x @ a.T`, or `xd @ a.T` for x's dropped copy `xd` (contiguous) when
    /// there is one: (m, r).
    fn times_a<S: BackendStorage>((x, xl): (&S, &Layout), xd: Option<&S>, (a, al): (&S, &Layout)) -> Result<S> {
        let ((m, k), (r, _)) = (xl.shape().dims2()?, al.shape().dims2()?);
        match xd {
            Some(xd) => xd.matmul(a, (1, m, r, k), &Layout::contiguous((m, k)), &al.transpose(0, 1)?),
            None => x.matmul(a, (1, m, r, k), xl, &al.transpose(0, 1)?),
        }
    }

    /// x (contiguous) times the dropout's mask, as a new storage (f32 or
    /// f64: `lora_linear` checked); None without dropout.
    fn dropped_cpu(&self, x: &CpuStorage, xl: &Layout) -> Result<Option<CpuStorage>> {
        match &self.mask {
            Some((bits, keep)) => Ok(Some(masked_cpu(x, xl, bits, *keep)?)),
            None => Ok(None),
        }
    }
}

impl LoraLinear {
    /// [`Self::run`] on the CPU in f32, with the update accumulated into
    /// the base product by one gemm (`y += s (x a.T) @ b.T`) instead of a
    /// separate (m, n) product and an add pass over both.
    fn cpu_f32(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (a, al): (&CpuStorage, &Layout),
        b: &[f32],
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, _) = xl.shape().dims2()?;
        let (r, _) = al.shape().dims2()?;
        let (n, _) = bl.shape().dims2()?;
        let (base, _) = FrozenMatmul::product(x, xl, &self.w.get(&candle_core::Device::Cpu, DType::F32)?, cpu_of)?;
        let CpuStorage::F32(mut y) = base else { candle_core::bail!("lora-linear: the base product is not f32") };
        let xa_st = Self::times_a((x, xl), self.dropped_cpu(x, xl)?.as_ref(), (a, al))?;
        let CpuStorage::F32(xa) = &xa_st else { candle_core::bail!("lora-linear: x @ a.T is not f32") };
        let threads = candle_core::utils::get_num_threads();
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // SAFETY: y is (m, n) row-major, xa (m, r) row-major, b (n, r)
        // row-major read as b.T (r, n); the strides below stay inside them.
        unsafe {
            gemm::gemm(
                m,
                n,
                r,
                y.as_mut_ptr(),
                1,
                n as isize,
                true,
                xa.as_ptr(),
                1,
                r as isize,
                b.as_ptr(),
                r as isize,
                1,
                1.0f32,
                self.scale as f32,
                false,
                false,
                false,
                par,
            )
        }
        self.keep_xa(Storage::Cpu(xa_st), m, r);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if let (CpuStorage::F32(_), CpuStorage::F32(bv), Some((b0, _))) = (x, b, bl.contiguous_offsets()) {
            return self.cpu_f32((x, xl), (a, al), &bv[b0..], bl);
        }
        let xd = self.dropped_cpu(x, xl)?;
        self.run((x, xl), (a, al), (b, bl), &candle_core::Device::Cpu, cpu_of, Storage::Cpu, xd)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // As the CPU's f32 path: the update accumulated into the base
        // product by one cuBLAS product with beta = 1.
        let dev = candle_core::Device::Cuda(x.device().clone());
        if !matches!(x.dtype(), DType::F32 | DType::BF16) {
            return self.run((x, xl), (a, al), (b, bl), &dev, cuda_of, Storage::Cuda, None);
        }
        let (m, k) = xl.shape().dims2()?;
        let (r, _) = al.shape().dims2()?;
        let (n, _) = bl.shape().dims2()?;
        let (mut y, _) = FrozenMatmul::product(x, xl, &self.w.get(&dev, x.dtype())?, cuda_of)?;
        let xa = x.matmul(a, (1, m, r, k), xl, &al.transpose(0, 1)?)?;
        let (mn, mr) = (Layout::contiguous((m, n)), Layout::contiguous((m, r)));
        gemm_cuda(&mut y, &mn, (&xa, &mr, false), (b, bl, true), self.scale, 1.0)?;
        self.keep_xa(Storage::Cuda(xa), m, r);
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xa = self.xa.get("lora-linear")?;
        // The gradients are computed from detached inputs: a gradient that
        // keeps a graph (of `x`, `dy`, the adapter) would hold those tensors
        // in the gradient store until the whole backward pass is over.
        let (xd, ad, bd) = (x.detach(), a.detach(), b.detach());
        let dy = dy.detach().to_dtype(x.dtype())?;
        // d(x @ a.T) = scale * dy @ b
        let dxa = scaled_matmul(&dy, false, &bd, false, self.scale)?;
        // With dropout: a's gradient from the dropped x (made again here),
        // x's share of the update's gradient times the mask.
        let da = match (a.track_op(), &self.mask) {
            (false, _) => None,
            (true, Some((bits, keep))) => Some(dxa.t()?.matmul(&masked(&xd, bits, *keep)?)?),
            (true, None) => Some(dxa.t()?.matmul(&xd)?),
        };
        let db = if b.track_op() { Some(scaled_matmul(&dy, true, &xa, false, self.scale)?) } else { None };
        let dx = if x.track_op() {
            let dx = dy.matmul(&self.w.get(dy.device(), dy.dtype())?)?;
            if let Some((bits, keep)) = &self.mask {
                return Ok((Some((dx + masked(&dxa.matmul(&ad)?, bits, *keep)?)?), da, db));
            }
            // On CUDA, dx += dxa @ a in place (no (m, k) product and add pass).
            if dx.device().is_cuda() && matches!(dx.dtype(), DType::F32 | DType::BF16) && dx.is_contiguous() {
                dx.inplace_op3(&dense(&dxa)?, &dense(&ad)?, &AddMatmul { ta: false, tb: false, alpha: 1.0 })?;
                Some(dx)
            } else {
                Some((dx + dxa.matmul(&ad)?)?)
            }
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// Cross-entropy in f32 (f64 for f64 logits), summed over rows:
/// `logits` (M, V), `targets` (M) u32.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lf = if logits.dtype() == DType::F64 { logits.clone() } else { logits.to_dtype(DType::F32)? };
    let lp = log_softmax(&lf)?;
    lp.gather(&targets.unsqueeze(1)?, 1)?.sum_all()?.neg()
}

/// Summed cross-entropy of `h @ w.T` against `targets`, without ever
/// holding the (rows x vocab) logits: rows go through the head in chunks,
/// and the gradient (for `h`, and for `w` when it trains) is computed in
/// the same pass, since the loss is the end of the graph. Peak extra memory
/// is one chunk of logits instead of several full copies.
///
/// `h` (M, d), `w` (V, d), `targets` (M) u32. Softmax in f32 (f64 for f64).
///
/// `grad_scale` is the gradient the caller expects back for the loss (what
/// it multiplies the loss by; 1 for a plain `backward`): the chunks'
/// gradients are made with it, so the backward pass does not scale the
/// (V, d) weight gradient again. Any other gradient is still right, at the
/// cost of that pass.
pub fn lm_head_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
    grad_scale: f64,
) -> Result<Tensor> {
    let grad_scale = if grad_scale.is_finite() && grad_scale != 0.0 { grad_scale } else { 1.0 };
    let op = FusedHeadCe {
        w: w.clone(),
        targets: targets.clone(),
        chunk: chunk.max(1),
        w_grad: w.track_op(),
        grad_scale,
        grads: std::sync::Mutex::new(None),
    };
    let h = dense(h)?;
    h.apply_op2(w, op)
}

struct FusedHeadCe {
    w: Tensor,
    targets: Tensor,
    chunk: usize,
    w_grad: bool,
    /// The gradient `grads` are made for (see [`lm_head_cross_entropy`]).
    grad_scale: f64,
    /// grad_scale * d(loss)/dh and grad_scale * d(loss)/dw, computed by
    /// the forward pass.
    grads: std::sync::Mutex<Option<(Tensor, Option<Tensor>)>>,
}

impl FusedHeadCe {
    fn run(&self, h: &Tensor) -> Result<Tensor> {
        let m = h.dim(0)?;
        let acc = if h.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let w = self.w.detach();
        // The CE kernel on CUDA (f32, bf16), unless PIPE_FUSED_KERNELS=0.
        let fused = crate::nn::fused::usable(h) && self.targets.dtype() == DType::U32;
        let mut total = Tensor::zeros((), acc, h.device())?;
        let mut dh = Vec::new();
        let mut dw: Option<Tensor> = None;
        let mut start = 0;
        while start < m {
            let n = self.chunk.min(m - start);
            let hc = h.narrow(0, start, n)?;
            let t = self.targets.narrow(0, start, n)?;
            let p = if fused {
                // One kernel: the loss per row, and softmax - onehot over the logits.
                let logits = hc.matmul(&w.t()?)?;
                let rows = crate::nn::fused::cross_entropy_grad_in_place(&logits, &t, self.grad_scale as f32)?;
                total = (total + rows.sum_all()?)?;
                logits
            } else {
                let logits = hc.matmul(&w.t()?)?.to_dtype(acc)?;
                let max = logits.max_keepdim(D::Minus1)?;
                let e = logits.broadcast_sub(&max)?.exp()?;
                let sum = e.sum_keepdim(D::Minus1)?;
                let lse = (sum.log()? + max)?;
                let picked = logits.gather(&t.unsqueeze(1)?, 1)?;
                total = (total + (lse - picked)?.sum_all()?)?;
                // d nll / d logits = softmax - onehot
                let onehot = Tensor::zeros(logits.shape(), acc, h.device())?.scatter_add(
                    &t.unsqueeze(1)?,
                    &Tensor::ones((n, 1), acc, h.device())?,
                    1,
                )?;
                let p = (e.broadcast_div(&sum)? - onehot)?;
                let p = if self.grad_scale == 1.0 { p } else { p.affine(self.grad_scale, 0.0)? };
                p.to_dtype(h.dtype())?
            };
            dh.push(p.matmul(&w)?);
            if self.w_grad {
                dw = Some(match dw {
                    // On CUDA, dw += p.T @ hc in place (cuBLAS with beta 1):
                    // no (vocab, d) product and add pass per chunk.
                    Some(a) if a.device().is_cuda() && matches!(a.dtype(), DType::F32 | DType::BF16) => {
                        a.inplace_op3(&p, &hc, &AddMatmul { ta: true, tb: false, alpha: 1.0 })?;
                        a
                    }
                    Some(a) => (a + p.t()?.matmul(&hc)?)?,
                    None => p.t()?.matmul(&hc)?,
                });
            }
            start += n;
        }
        let dh = if dh.is_empty() { h.zeros_like()? } else { Tensor::cat(&dh, 0)? };
        if let Ok(mut g) = self.grads.lock() {
            *g = Some((dh, dw));
        }
        Ok(total)
    }
}

/// `acc += alpha * op(p) @ op(q)` in place, `op` transposing where `ta` /
/// `tb` say: `acc` (m, n), op(p) (m, k), op(q) (k, n), all dense and
/// row-major in one dtype (f32 or bf16) on CUDA; one cuBLAS product with
/// beta = 1 (f32 sums, alpha in f32).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct AddMatmul {
    pub ta: bool,
    pub tb: bool,
    pub alpha: f64,
}

impl candle_core::InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "add-matmul"
    }

    crate::nn::fused::cpu_fwd_cuda_only!(inplace3);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        al: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        q: &candle_core::CudaStorage,
        ql: &Layout,
    ) -> Result<()> {
        gemm_cuda(acc, al, (p, pl, self.ta), (q, ql, self.tb), self.alpha, 1.0)
    }
}

/// `alpha * op(p) @ op(q)` (op: transposed or not), for gradients made
/// from detached tensors (no graph): on CUDA in f32 or bf16 one cuBLAS
/// product with `alpha` as its scale, elsewhere a product and an `affine`
/// (the LoRA linear's backward pass scaled two products a linear with an
/// extra launch each: 420 of a SmolLM2 LoRA step's ~3,500).
pub fn scaled_matmul(p: &Tensor, ta: bool, q: &Tensor, tb: bool, alpha: f64) -> Result<Tensor> {
    let cuda = p.device().is_cuda() && matches!(p.dtype(), DType::F32 | DType::BF16) && p.rank() == 2;
    if cuda && q.rank() == 2 && q.dtype() == p.dtype() {
        return dense(p)?.apply_op2_no_bwd(&dense(q)?, &ScaledMatmul { ta, tb, alpha });
    }
    let op = |t: &Tensor, tr: bool| if tr { t.t() } else { Ok(t.clone()) };
    let y = op(p, ta)?.matmul(&op(q, tb)?)?;
    if alpha == 1.0 {
        Ok(y)
    } else {
        y.affine(alpha, 0.0)
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct ScaledMatmul {
    ta: bool,
    tb: bool,
    alpha: f64,
}

impl candle_core::CustomOp2 for ScaledMatmul {
    fn name(&self) -> &'static str {
        "scaled-matmul"
    }

    crate::nn::fused::cpu_fwd_cuda_only!(op2);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        q: &candle_core::CudaStorage,
        ql: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let ((pr, pc), (qr, qc)) = (pl.shape().dims2()?, ql.shape().dims2()?);
        let shape = Shape::from((if self.ta { pc } else { pr }, if self.tb { qr } else { qc }));
        // SAFETY: the product (beta = 0) writes every element.
        let mut out = unsafe { p.device().alloc_uninit(&shape, p.dtype())? };
        gemm_cuda(&mut out, &Layout::contiguous(&shape), (p, pl, self.ta), (q, ql, self.tb), self.alpha, 0.0)?;
        Ok((out, shape))
    }
}

/// `acc = alpha * op(p) @ op(q) + beta * acc` by one cuBLAS product, each
/// operand with its layout and whether it is transposed ([`AddMatmul`]:
/// beta = 1; with beta = 0, `acc` is only written: it may hold anything).
#[cfg(feature = "cuda")]
fn gemm_cuda(
    acc: &mut candle_core::CudaStorage,
    al: &Layout,
    (p, pl, ta): (&candle_core::CudaStorage, &Layout, bool),
    (q, ql, tb): (&candle_core::CudaStorage, &Layout, bool),
    alpha: f64,
    beta: f64,
) -> Result<()> {
    use candle_core::cuda::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::cuda::WrapErr;
    let ((m, n), (pr, pc), (qr, qc)) = (al.shape().dims2()?, pl.shape().dims2()?, ql.shape().dims2()?);
    let ((pm, pk), (qk, qn)) = (if ta { (pc, pr) } else { (pr, pc) }, if tb { (qc, qr) } else { (qr, qc) });
    let offsets = (al.contiguous_offsets(), pl.contiguous_offsets(), ql.contiguous_offsets());
    let (Some((a0, a1)), Some((p0, p1)), Some((q0, q1))) = offsets else {
        candle_core::bail!("cuBLAS product: non-contiguous input")
    };
    if pm != m || qn != n || pk != qk || p.dtype() != acc.dtype() || q.dtype() != acc.dtype() {
        candle_core::bail!(
            "cuBLAS product: {:?} = op({:?}) @ op({:?}) (ta {ta}, tb {tb})",
            al.dims(),
            pl.dims(),
            ql.dims()
        );
    }
    let dev = acc.device().clone();
    let (stream, blas) = (dev.cuda_stream(), dev.cublas_handle());
    let (alpha, beta) = (alpha as f32, beta as f32);
    let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    // Column-major: acc.T (n, m) += op(q).T (n, k) @ op(p).T (k, m); a
    // row-major (r, c) buffer is a column-major (c, r) one, leading dim c.
    macro_rules! run {
        ($t:ty, $dt:expr) => {{
            let ps = p.as_cuda_slice::<$t>()?.slice(p0..p1);
            let qs = q.as_cuda_slice::<$t>()?.slice(q0..q1);
            let mut cs = acc.as_cuda_slice_mut::<$t>()?.slice_mut(a0..a1);
            let (pp, _rp) = ps.device_ptr(&stream);
            let (qp, _rq) = qs.device_ptr(&stream);
            let (cp, _rc) = cs.device_ptr_mut(&stream);
            // SAFETY: the shapes and leading dimensions describe dense
            // buffers of exactly these sizes, on the handle's stream.
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    op(tb),
                    op(ta),
                    n as i32,
                    m as i32,
                    pk as i32,
                    (&alpha) as *const f32 as *const _,
                    qp as *const _,
                    $dt,
                    qc as i32,
                    pp as *const _,
                    $dt,
                    pc as i32,
                    (&beta) as *const f32 as *const _,
                    cp as *mut _,
                    $dt,
                    n as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .w()?;
        }};
    }
    match acc.dtype() {
        DType::F32 => run!(f32, sys::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => run!(half::bf16, sys::cudaDataType_t::CUDA_R_16BF),
        dt => candle_core::bail!("cuBLAS product: {dt:?} (f32, bf16)"),
    }
    Ok(())
}

impl candle_core::CustomOp2 for FusedHeadCe {
    fn name(&self) -> &'static str {
        "fused-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_storage(&self.run(&cpu_tensor(s, l))?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_storage(&self.run(&cuda_tensor(s, l)?)?, self.name())
    }

    fn bwd(&self, _h: &Tensor, _w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Taken, not cloned: the op (alive with the graph) keeps no handle
        // to them, so the backward pass's later ops may add into them in
        // place (a tied embedding's rows into dw, `GatherRows::bwd_acc`).
        let Some((dh, dw)) = self.grads.lock().ok().and_then(|mut x| x.take()) else {
            candle_core::bail!("fused-head-cross-entropy: backward before forward, or a second backward pass")
        };
        // The loss is a scalar: its gradient read back (the training step
        // has already synchronised to read the loss). The gradients were
        // made for grad_scale; scale them only for another factor.
        let gv = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let dw = if self.w_grad { dw } else { None };
        if gv as f32 == self.grad_scale as f32 {
            return Ok((Some(dh), dw));
        }
        let f = gv / self.grad_scale;
        Ok((Some(dh.affine(f, 0.0)?), dw.map(|d| d.affine(f, 0.0)).transpose()?))
    }
}

/// Softmax over the last dim of scores (G, R, L) under a causal mask, where
/// row r is query position `r % L` (several heads folded into rows): keys
/// after the query get probability 0. On the CPU this is one fused pass
/// that keeps only its output (the plain composition keeps the masked
/// scores, their exponentials and the sum); elsewhere it falls back to the
/// composition.
pub fn causal_softmax(s: &Tensor) -> Result<Tensor> {
    let (_, r, l) = s.dims3()?;
    let fused = s.device().is_cpu() && matches!(s.dtype(), DType::F32 | DType::F64) && r % l == 0;
    if !fused {
        return causal_softmax_composed(s);
    }
    let s = dense(s)?;
    s.apply_op1(CausalSoftmax)
}

/// `causal_softmax(qa @ kt)` for queries `qa` (G, R, d) and keys `kt`
/// (G, d, L), R a multiple of L: on the CPU in f32 or f64 one op whose
/// graph keeps only its inputs and the probabilities, not the (G, R, L)
/// scores (the composition's matmul output, kept as the softmax's input
/// although its backward pass reads only the probabilities: at 1,024
/// positions and SmolLM2's 9 heads 38 MB a layer). The same operations
/// in the same order, forward and backward: the same values to the bit.
/// Elsewhere the composition.
pub fn causal_attention_probs(qa: &Tensor, kt: &Tensor) -> Result<Tensor> {
    let fused = qa.device().is_cpu()
        && matches!(qa.dtype(), DType::F32 | DType::F64)
        && qa.dtype() == kt.dtype()
        && qa.rank() == 3
        && kt.rank() == 3
        && qa.dim(0)? == kt.dim(0)?
        && qa.dim(2)? == kt.dim(1)?
        && kt.dim(2)? > 0
        && qa.dim(1)? % kt.dim(2)? == 0;
    if !fused {
        return causal_softmax(&qa.matmul(kt)?);
    }
    qa.apply_op2(kt, CausalProbs)
}

struct CausalProbs;

impl candle_core::CustomOp2 for CausalProbs {
    fn name(&self) -> &'static str {
        "causal-attention-probs"
    }

    fn cpu_fwd(&self, q: &CpuStorage, ql: &Layout, k: &CpuStorage, kl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, r, d) = ql.shape().dims3()?;
        let l = kl.shape().dims()[2];
        // The scores as Tensor::matmul makes them (the same call), then
        // the causal softmax's pass; the scores are dropped here.
        let scores = q.matmul(k, (g, r, l, d), ql, kl)?;
        Ok((causal_softmax_cpu(&scores, 0, g * r * l, l)?, Shape::from((g, r, l))))
    }

    /// The causal softmax's backward pass, then the matmul's (as
    /// candle's backprop takes them: `ds @ kt.T`, `qa.T @ ds`).
    fn bwd(&self, qa: &Tensor, kt: &Tensor, p: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = causal_softmax_grad(p, g)?;
        let dq = ds.matmul(&kt.t()?)?;
        let dk = qa.t()?.matmul(&ds)?;
        Ok((Some(dq), Some(dk)))
    }
}

/// [`causal_softmax`] from plain ops, the mask made on the tensor's device
/// (no host-side mask, no upload).
pub(crate) fn causal_softmax_composed(s: &Tensor) -> Result<Tensor> {
    let (g, r, l) = s.dims3()?;
    let mask = causal_mask(l, 0, s.dtype(), s.device())?;
    softmax(&s.contiguous()?.reshape((g, r / l, l, l))?.broadcast_add(&mask)?.reshape((g, r, l))?)
}

/// Additive mask (len, past + len): row i (query position past + i) sees
/// keys 0..=past + i (0), not the later ones (-1e30). Built on `device` from
/// two aranges and a comparison.
pub fn causal_mask(len: usize, past: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let total = past + len;
    let rows = Tensor::arange(past as u32, total as u32, device)?.reshape((len, 1))?;
    let cols = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
    cols.broadcast_le(&rows)?.to_dtype(dtype)?.affine(1e30, -1e30)
}

struct CausalSoftmax;

fn causal_softmax_rows<T: num_like::Float>(x: &[T], l: usize, out: &mut [T]) {
    use rayon::prelude::*;
    out.par_chunks_mut(l).zip(x.par_chunks(l)).enumerate().for_each(|(row, (o, xs))| {
        let q = row % l;
        let mut m = xs[0];
        for v in &xs[1..=q] {
            if *v > m {
                m = *v;
            }
        }
        let mut sum = T::zero();
        for c in 0..=q {
            let e = (xs[c] - m).exp();
            o[c] = e;
            sum = sum + e;
        }
        let inv = T::one() / sum;
        for v in o.iter_mut().take(q + 1) {
            *v = *v * inv;
        }
        for v in o.iter_mut().skip(q + 1) {
            *v = T::zero();
        }
    });
}

/// The few float operations the fused kernels need, for f32 and f64.
mod num_like {
    pub trait Float:
        Copy
        + Send
        + Sync
        + PartialOrd
        + std::ops::Sub<Output = Self>
        + std::ops::Add<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
    {
        fn zero() -> Self;
        fn one() -> Self;
        fn exp(self) -> Self;
    }
    impl Float for f32 {
        fn zero() -> Self {
            0.0
        }
        fn one() -> Self {
            1.0
        }
        fn exp(self) -> Self {
            f32::exp(self)
        }
    }
    impl Float for f64 {
        fn zero() -> Self {
            0.0
        }
        fn one() -> Self {
            1.0
        }
        fn exp(self) -> Self {
            f64::exp(self)
        }
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let len = *l.dims().last().unwrap_or(&1);
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("causal-softmax: input must be contiguous")
        };
        Ok((causal_softmax_cpu(s, a, b, len)?, l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(causal_softmax_grad(p, g)?))
    }
}

/// [`causal_softmax_rows`] of elements a..b of a CPU storage (f32 or f64),
/// rows of `len`.
fn causal_softmax_cpu(s: &CpuStorage, a: usize, b: usize, len: usize) -> Result<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(v) => {
            let mut out = vec![0f32; b - a];
            causal_softmax_rows(&v[a..b], len, &mut out);
            CpuStorage::F32(out)
        }
        CpuStorage::F64(v) => {
            let mut out = vec![0f64; b - a];
            causal_softmax_rows(&v[a..b], len, &mut out);
            CpuStorage::F64(out)
        }
        _ => candle_core::bail!("causal-softmax: f32 or f64 only"),
    })
}

/// The softmax's backward pass from its output `p` and gradient `g`:
/// p * (g - sum(g * p)) (masked entries have p = 0).
fn causal_softmax_grad(p: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dot = (g * p)?.sum_keepdim(D::Minus1)?;
    g.broadcast_sub(&dot)?.mul(p)
}
