//! Fused causal attention over packed variable-length sequences on CUDA
//! (kernels/attn.cu): one launch per layer covers every sequence of the
//! batch, forward and backward, instead of a dozen small ops per sequence.
//! The scores never reach global memory; the backward pass recomputes them
//! from the saved log-sum-exp (FlashAttention-2's scheme). Grouped-query
//! attention is native (a key/value head serves its query heads without
//! copies). f32 or bf16 storage, f32 arithmetic; head dims 64 and 128.
//! bf16 runs on tensor cores (kernels/attn_tc.cu: `mma.sync` bf16 products
//! with f32 accumulation, the backward pass one kernel summing dQ, dK and dV
//! in f32; `PIPE_ATTENTION_TC=0` falls back), f32 on CUDA cores
//! (kernels/attn.cu).
//!
//! [`attention_packed`] takes q, k and v packed in one tensor (the output
//! of one projection for all three, as full fine-tuning makes it) and
//! gives their gradient back packed the same way.
//!
//! [`usable`] says whether a call can take this path; elsewhere (the CPU,
//! f64, other head dims) the caller uses the plain composition, which the
//! tests compare this against.

use candle_core::{DType, Result, Tensor};

/// Head dims the kernels are compiled for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether [`attention`] runs for these tensors (a CUDA build, a CUDA
/// tensor, f32 or bf16, a supported head dim). `PIPE_FUSED_ATTENTION=0`
/// turns it off (to compare against the composition).
pub fn usable(q: &Tensor) -> bool {
    crate::nn::fused::kernels_on(q, crate::nn::fused::Switch::Attention)
        && q.dims().last().is_some_and(|d| HEAD_DIMS.contains(d))
}

/// Whether `dt` takes the tensor-core kernels (bf16, unless
/// `PIPE_ATTENTION_TC=0`).
fn tensor_cores(dt: DType) -> bool {
    dt == DType::BF16 && env_once!("PIPE_ATTENTION_TC").is_none_or(|v| v != "0")
}

/// Rows per tile of the kernels for head dim `hd` and dtype `dt`: 64 on
/// tensor cores, 4096 / hd on CUDA cores.
pub fn tile_rows(hd: usize, dt: DType) -> usize {
    if tensor_cores(dt) {
        64
    } else {
        4096 / hd.max(1)
    }
}

/// The work split of a batch for attention with head dim `hd` in `dt`: 4
/// numbers per tile (first and one-past-last row of the tile, first and
/// one-past-last row of its sequence); a tile has at most
/// [`tile_rows`] rows of one sequence. Then two launch orders of the
/// tensor-core kernels (attn_tc.cu's `tile_at`), a tile index each: the
/// forward pass's (and dQ's), most keys attended first, and the backward
/// pass's, most queries after the tile's first row first (ties in table
/// order). Longest first, a launch's last blocks are short ones: in
/// table order, a tile near a sequence's end (the most work forward)
/// could start last and hold the kernel's end.
pub fn tiles(seqs: &[(usize, usize)], hd: usize, dt: DType) -> Vec<u32> {
    let rows = tile_rows(hd, dt);
    let mut t = Vec::new();
    for &(off, len) in seqs {
        let mut s = off;
        while s < off + len {
            let e = (s + rows).min(off + len);
            t.extend([s as u32, e as u32, off as u32, (off + len) as u32]);
            s = e;
        }
    }
    let n = t.len() / 4;
    let tile = |i: usize| -> [u64; 4] { std::array::from_fn(|k| t[4 * i + k] as u64) };
    let mut fwd: Vec<u32> = (0..n as u32).collect();
    fwd.sort_by_key(|&i| {
        let [a, b, s, _] = tile(i as usize);
        std::cmp::Reverse((b - a) * (b - s))
    });
    let mut bwd: Vec<u32> = (0..n as u32).collect();
    bwd.sort_by_key(|&i| {
        let [a, _, _, e] = tile(i as usize);
        std::cmp::Reverse(e - a)
    });
    t.extend(fwd);
    t.extend(bwd);
    t
}

/// The number of tiles in a table of [`tiles`].
#[cfg(feature = "cuda")]
fn tile_count(table: &Tensor) -> usize {
    table.elem_count() / 6
}

/// Causal attention of `q` (N, Hq, D) over `k`, `v` (N, Hkv, D) within each
/// sequence that `tiles` (from [`tiles`] for q's head dim and dtype, as a
/// u32 tensor on the same device) describes; `scale` multiplies the scores. Returns (N, Hq, D).
/// Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, tiles: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, tiles, scale, split_backward())
}

#[cfg(any(feature = "cuda", test))]
thread_local! {
    /// Tests: this thread's `PIPE_ATTN_FWD=2` (`Some(true)`: two K/V buffers).
    static FWD_TWO: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: forward launches of the three-buffer kernel on this thread.
    static FWD3_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether the forward kernel at head dim `d` in `dt` stages keys and
/// values through three shared-memory buffers (copies two tiles ahead, one
/// block barrier a tile) instead of two: head dim 64 on tensor cores,
/// unless `PIPE_ATTN_FWD=2`.
#[cfg(feature = "cuda")]
fn fwd_three_buffers(d: usize, dt: DType) -> bool {
    d == 64
        && tensor_cores(dt)
        && !FWD_TWO.with(|t| t.get()).unwrap_or_else(|| env_once!("PIPE_ATTN_FWD").is_some_and(|v| v == "2"))
}

/// Whether the tensor-core backward pass runs as two kernels (dQ; dK and
/// dV), each recomputing the scores and dP, instead of one that computes
/// them once and sums dQ in f32 (`PIPE_ATTN_BWD=split`; the fused kernel
/// is the default).
fn split_backward() -> bool {
    env_once!("PIPE_ATTN_BWD").is_some_and(|v| v == "split")
}

/// [`attention`] with the backward pass's kernels chosen (`split`: see
/// [`split_backward`]).
pub fn attention_with(q: &Tensor, k: &Tensor, v: &Tensor, tiles: &Tensor, scale: f64, split: bool) -> Result<Tensor> {
    let (n, hq, d) = q.dims3()?;
    let (nk, hkv, dk) = k.dims3()?;
    if nk != n || dk != d || v.dims() != k.dims() || hkv == 0 || hq % hkv != 0 || tiles.dtype() != DType::U32 {
        candle_core::bail!(
            "fused attention: q {:?}, k {:?}, v {:?}, tiles {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims(),
            tiles.dtype()
        );
    }
    let (q, k, v) = (super::ops::dense(q)?, super::ops::dense(k)?, super::ops::dense(v)?);
    q.apply_op3(&k, &v, Attn { tiles: super::ops::dense(tiles)?, scale: scale as f32, split, lse: Default::default() })
}

/// Whether [`attention_packed`] runs for heads of `d` values in tensors
/// like `like` (device, dtype): [`usable`]'s conditions, bf16 on tensor
/// cores, and the one-kernel backward pass (not `PIPE_ATTN_BWD=split`).
pub fn packed_usable(like: &Tensor, d: usize) -> bool {
    crate::nn::fused::kernels_on(like, crate::nn::fused::Switch::Attention)
        && HEAD_DIMS.contains(&d)
        && tensor_cores(like.dtype())
        && !split_backward()
}

/// [`attention`] of q, k and v packed in one tensor (N, hq + 2 hkv, D):
/// each row's hq query heads, then its hkv key heads and hkv value heads
/// (one projection's output for all three, rotary embedding applied to the
/// first hq + hkv heads). bf16 on CUDA ([`packed_usable`]). Its gradient
/// comes back packed the same way, so the projection's backward pass is one
/// product, with no copies to split or join the three.
pub fn attention_packed(qkv: &Tensor, hq: usize, hkv: usize, tiles: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, heads, _) = qkv.dims3()?;
    if hkv == 0
        || !hq.is_multiple_of(hkv)
        || heads != hq + 2 * hkv
        || tiles.dtype() != DType::U32
        || !tensor_cores(qkv.dtype())
    {
        candle_core::bail!(
            "fused attention: packed q, k, v {:?} {:?} for {hq} query and {hkv} key/value heads, tiles {:?}",
            qkv.dims(),
            qkv.dtype(),
            tiles.dtype()
        );
    }
    super::ops::dense(qkv)?.apply_op1(AttnPacked {
        hq,
        hkv,
        tiles: super::ops::dense(tiles)?,
        scale: scale as f32,
        lse: Default::default(),
    })
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AttnPacked {
    hq: usize,
    hkv: usize,
    tiles: Tensor,
    scale: f32,
    /// As [`Attn`]'s.
    lse: super::ops::Saved,
}

impl candle_core::CustomOp1 for AttnPacked {
    fn name(&self) -> &'static str {
        "fused-varlen-attention-packed"
    }

    crate::nn::fused::cpu_fwd_cuda_only!(op1);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (o, lse) = cuda::forward_packed(self, (s, l))?;
        self.lse.keep(lse);
        Ok(o)
    }

    fn bwd(&self, qkv: &Tensor, o: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let lse = self.lse.get("fused attention")?;
        let dout = super::ops::dense(&dout.to_dtype(qkv.dtype())?)?;
        let Some(delta) = delta(o, &dout)? else { candle_core::bail!("fused attention: packed q, k, v off CUDA") };
        backward_packed(self, qkv, &dout, &lse, &delta).map(Some)
    }
}

#[cfg(feature = "cuda")]
fn backward_packed(op: &AttnPacked, qkv: &Tensor, dout: &Tensor, lse: &Tensor, delta: &Tensor) -> Result<Tensor> {
    cuda::backward_packed(op, qkv, dout, lse, delta)
}

#[cfg(not(feature = "cuda"))]
fn backward_packed(op: &AttnPacked, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
    crate::nn::fused::cuda_only(candle_core::CustomOp1::name(op))
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Attn {
    tiles: Tensor,
    scale: f32,
    /// Two backward kernels instead of one (tensor cores).
    split: bool,
    /// (Hq, N) f32, log2-sum-exp2 of the scaled scores: from the forward
    /// pass, for the backward pass.
    lse: super::ops::Saved,
}

impl candle_core::CustomOp3 for Attn {
    fn name(&self) -> &'static str {
        "fused-varlen-attention"
    }

    crate::nn::fused::cpu_fwd_cuda_only!(op3);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CudaStorage,
        kl: &candle_core::Layout,
        vs: &candle_core::CudaStorage,
        vl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (o, lse) = cuda::forward(self, (qs, ql), (ks, kl), (vs, vl))?;
        self.lse.keep(lse);
        Ok(o)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.get("fused attention")?;
        let dout = super::ops::dense(&dout.to_dtype(q.dtype())?)?;
        // delta_i = rowsum(dO_i * O_i), (N, Hq): one kernel on tensor cores' path.
        let delta = match delta(o, &dout)? {
            Some(d) => d,
            None => {
                let d = (dout.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?.sum(candle_core::D::Minus1)?;
                super::ops::dense(&d)?
            }
        };
        let (dq, dk, dv) = backward(self, q, k, v, &dout, &lse, &delta)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The row sums of `dout * o` (N, Hq, D) as (N, Hq) f32 in one kernel,
/// for bf16 on CUDA (the tensor-core path); `None` elsewhere.
#[cfg(feature = "cuda")]
fn delta(o: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
    if !o.device().is_cuda() || !tensor_cores(o.dtype()) || dout.dtype() != o.dtype() {
        return Ok(None);
    }
    cuda::delta(&super::ops::dense(o)?, dout).map(Some)
}

#[cfg(not(feature = "cuda"))]
fn delta(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(feature = "cuda")]
fn backward(
    op: &Attn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    cuda::backward(op, q, k, v, dout, lse, delta)
}

#[cfg(not(feature = "cuda"))]
fn backward(
    op: &Attn,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    crate::nn::fused::cuda_only(candle_core::CustomOp3::name(op))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda::cudarc::driver::{
        CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda::{CudaDevice, CudaStorage, WrapErr};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Layout, Result, Shape, Tensor};

    use super::{Attn, AttnPacked};
    use crate::nn::kernels::{by_dtype, cuda_of, device, func, tensor, view, with, ATTN_BIN, ATTN_TC_BIN};

    const THREADS: u32 = 128;

    /// The kernel `what` for head dim `d` and dtype `dt`, with the dynamic
    /// shared memory it needs (tensor-core kernels) set as its limit.
    fn kernel(dev: &CudaDevice, what: &str, dt: DType, d: usize) -> Result<(CudaFunction, u32)> {
        if !super::tensor_cores(dt) {
            return Ok((func(dev, "pipe_attn", ATTN_BIN, &format!("attn_{what}_{d}"), dt)?, 0));
        }
        let f = func(dev, "pipe_attn_tc", ATTN_TC_BIN, &format!("attn_tc_{what}_{d}"), dt)?;
        // Padded bf16 tiles of d + 8 (attn_tc.cu): forward two (fwd3:
        // three) buffers of K, V; dQ Q, dO and two buffers of K, V; dK/dV K, V (kb rows: 64,
        // 128 for the fused backward) and two buffers of Q, dO (bq rows) +
        // bq lse and delta, and for the fused backward a (kb, bq + 8) tile
        // of dS^T.
        let row = (d + 8) * 2;
        let bq = if d == 128 { 32 } else { 64 };
        let dkv = |kb: usize| 2 * kb * row + 2 * (2 * bq * row + 2 * bq * 4);
        let bytes = match what {
            "fwd" => 4 * 64 * row,
            "fwd3" => 6 * 64 * row,
            "bwd_dq" => 6 * 64 * row,
            "bwd_dkv" => dkv(64),
            _ => dkv(128) + 128 * (bq + 8) * 2,
        };
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32).w()?;
        Ok((f, bytes as u32))
    }

    /// The grid of a kernel over `tiles` and `heads`: (tiles, heads) for
    /// attn.cu's, (heads, tiles) for the tensor-core ones, which take the
    /// tiles in the table's launch orders (attn_tc.cu's `tile_at`).
    fn cfg(tiles: usize, heads: usize, smem: u32, tc: bool, threads: u32) -> LaunchConfig {
        let (x, y) = if tc { (heads, tiles) } else { (tiles, heads) };
        LaunchConfig { shared_mem_bytes: smem, ..crate::nn::kernels::grid(x, y, threads) }
    }

    fn n_tiles(op: &Attn) -> usize {
        super::tile_count(&op.tiles)
    }

    pub(super) fn forward(
        op: &Attn,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
    ) -> Result<((CudaStorage, Shape), Tensor)> {
        by_dtype!(q.0.dtype(), forward_t, op, q, k, v)
    }

    fn forward_t<T: CudaDType + DeviceRepr>(
        op: &Attn,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
    ) -> Result<((CudaStorage, Shape), Tensor)> {
        let (n, hq, d) = ql.shape().dims3()?;
        let hkv = kl.shape().dims3()?.1;
        let dm = Dims { n, hq, hkv, d, qs: hq * d, kvs: hkv * d };
        let (q, k, v) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?, view::<T>(vs, vl)?);
        fwd_launch(&device(qs), &op.tiles, op.scale, qs.dtype(), (&q, &k, &v), dm)
    }

    pub(super) fn forward_packed(
        op: &AttnPacked,
        x: (&CudaStorage, &Layout),
    ) -> Result<((CudaStorage, Shape), Tensor)> {
        let (s, l) = x;
        let (n, heads, d) = l.shape().dims3()?;
        let (hq, hkv) = (op.hq, op.hkv);
        let dm = Dims { n, hq, hkv, d, qs: heads * d, kvs: heads * d };
        let all = view::<half::bf16>(s, l)?;
        let (k, v) = (all.slice(hq * d..), all.slice((hq + hkv) * d..));
        fwd_launch(&device(s), &op.tiles, op.scale, s.dtype(), (&all, &k, &v), dm)
    }

    /// Shapes and row strides (in elements) of an attention call: q (n, hq,
    /// d) rows `qs` apart, k and v (n, hkv, d) rows `kvs` apart (the
    /// tensor-core kernels; the f32 ones take them contiguous).
    #[derive(Clone, Copy)]
    struct Dims {
        n: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        qs: usize,
        kvs: usize,
    }

    /// The forward kernel: o (n, hq, d) and the log-sum-exps (hq, n).
    fn fwd_launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        tiles: &Tensor,
        scale: f32,
        dt: DType,
        (q, k, v): (&CudaView<T>, &CudaView<T>, &CudaView<T>),
        dm: Dims,
    ) -> Result<((CudaStorage, Shape), Tensor)> {
        let Dims { n, hq, hkv, d, .. } = dm;
        let (tst, tl) = tiles.storage_and_layout();
        let tv = view::<u32>(cuda_of(&tst)?, tl)?;
        // SAFETY: the kernel writes every element of both (every row of
        // every sequence is in exactly one tile).
        let mut o = unsafe { dev.alloc::<T>(n * hq * d)? };
        let mut lse = unsafe { dev.alloc::<f32>(hq * n)? };
        let three = super::fwd_three_buffers(d, dt);
        if three {
            super::FWD3_RUNS.with(|r| r.set(r.get() + 1));
        }
        let (f, smem) = kernel(dev, if three { "fwd3" } else { "fwd" }, dt, d)?;
        let stream = dev.cuda_stream();
        let (ni, hqi, hkvi, qsi, kvsi) = (n as i32, hq as i32, hkv as i32, dm.qs as i32, dm.kvs as i32);
        let sl2 = scale * std::f32::consts::LOG2_E;
        let mut b = stream.launch_builder(&f);
        b.arg(q).arg(k).arg(v).arg(&mut o).arg(&mut lse).arg(&tv);
        b.arg(&ni).arg(&hqi).arg(&hkvi).arg(&sl2);
        if super::tensor_cores(dt) {
            b.arg(&qsi).arg(&kvsi);
        }
        // SAFETY: argument types and order match attn_fwd_* in kernels/attn.cu
        // and attn_tc_fwd_* / attn_tc_fwd3_* (with the row strides) in
        // kernels/attn_tc.cu.
        unsafe { b.launch(cfg(super::tile_count(tiles), hq, smem, super::tensor_cores(dt), THREADS)) }.w()?;
        let lse = tensor(CudaStorage::wrap_cuda_slice(lse, dev.clone()), (hq, n));
        Ok(((CudaStorage::wrap_cuda_slice(o, dev.clone()), Shape::from((n, hq, d))), lse))
    }

    /// The one-kernel backward pass on tensor cores: dQ, dK and dV summed
    /// unscaled into f32 (zeroed here), a block per key tile and query head.
    #[allow(clippy::too_many_arguments)]
    fn bwd_fused_launch<T: DeviceRepr>(
        dev: &CudaDevice,
        tiles: &CudaView<u32>,
        n_tiles: usize,
        scale: f32,
        (q, k, v, dout): (&CudaView<T>, &CudaView<T>, &CudaView<T>, &CudaView<T>),
        (lse, delta): (&CudaView<f32>, &CudaView<f32>),
        dm: Dims,
    ) -> Result<[CudaSlice<f32>; 3]> {
        let Dims { n, hq, hkv, d, .. } = dm;
        let mut dq_acc = dev.alloc_zeros::<f32>(n * hq * d)?;
        let mut dk_acc = dev.alloc_zeros::<f32>(n * hkv * d)?;
        let mut dv_acc = dev.alloc_zeros::<f32>(n * hkv * d)?;
        let (f, smem) = kernel(dev, "bwd", DType::BF16, d)?;
        let stream = dev.cuda_stream();
        let (ni, hqi, hkvi, qsi, kvsi) = (n as i32, hq as i32, hkv as i32, dm.qs as i32, dm.kvs as i32);
        let sl2 = scale * std::f32::consts::LOG2_E;
        let mut b = stream.launch_builder(&f);
        b.arg(q).arg(k).arg(v).arg(dout).arg(lse).arg(delta);
        b.arg(&mut dq_acc).arg(&mut dk_acc).arg(&mut dv_acc);
        b.arg(tiles).arg(&ni).arg(&hqi).arg(&hkvi).arg(&sl2).arg(&scale).arg(&qsi).arg(&kvsi);
        // 128 keys a block, 16 a warp.
        let lc = cfg(n_tiles, hq, smem, true, 2 * THREADS);
        // SAFETY: argument types and order match attn_tc_bwd_* in kernels/attn_tc.cu;
        // every block of the grid (one per 64-row tile and query head) exits or
        // covers its keys.
        unsafe { b.launch(lc) }.w()?;
        Ok([dq_acc, dk_acc, dv_acc])
    }

    pub(super) fn delta(o: &Tensor, dout: &Tensor) -> Result<Tensor> {
        let (n, hq, d) = o.dims3()?;
        let rows = n * hq;
        let out = with(&[o, dout], |st| {
            let dev = device(st[0].0);
            let (ov, dv) = (view::<half::bf16>(st[0].0, st[0].1)?, view::<half::bf16>(st[1].0, st[1].1)?);
            // SAFETY: the kernel writes every row.
            let mut out = unsafe { dev.alloc::<f32>(rows)? };
            let f = func(&dev, "pipe_attn_tc", ATTN_TC_BIN, &format!("attn_tc_delta_{d}"), DType::BF16)?;
            let rows_i = rows as i32;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&ov).arg(&dv).arg(&mut out).arg(&rows_i);
            // SAFETY: argument types and order match attn_tc_delta_* in kernels/attn_tc.cu.
            unsafe { b.launch(crate::nn::kernels::grid((rows * d / 8).div_ceil(256), 1, 256)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        })?;
        Ok(tensor(out, (n, hq)))
    }

    pub(super) fn backward(
        op: &Attn,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
        lse: &Tensor,
        delta: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        by_dtype!(q.dtype(), backward_t, op, q, k, v, dout, lse, delta)
    }

    fn backward_t<T: CudaDType + DeviceRepr>(
        op: &Attn,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
        lse: &Tensor,
        delta: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, hq, d) = q.dims3()?;
        let hkv = k.dims3()?.1;
        let (dq, dk, dv) = with(&[q, k, v, dout, lse, delta, &op.tiles], |st| {
            let dev = device(st[0].0);
            let [qv, kv, vv, dov] = [st[0], st[1], st[2], st[3]].map(|(s, l)| view::<T>(s, l));
            let (qv, kv, vv, dov) = (qv?, kv?, vv?, dov?);
            let (lv, dlv) = (view::<f32>(st[4].0, st[4].1)?, view::<f32>(st[5].0, st[5].1)?);
            let tiles = view::<u32>(st[6].0, st[6].1)?;
            // SAFETY: the kernels write every element (every row is in one tile;
            // dkv's grid covers every key/value head).
            let mut dq = unsafe { dev.alloc::<T>(n * hq * d)? };
            let mut dk = unsafe { dev.alloc::<T>(n * hkv * d)? };
            let mut dv = unsafe { dev.alloc::<T>(n * hkv * d)? };
            let (ni, hqi, hkvi) = (n as i32, hq as i32, hkv as i32);
            let sl2 = op.scale * std::f32::consts::LOG2_E;
            let stream = dev.cuda_stream();
            let wrap = |s| CudaStorage::wrap_cuda_slice(s, dev.clone());
            let dm = Dims { n, hq, hkv, d, qs: hq * d, kvs: hkv * d };
            let tc = super::tensor_cores(q.dtype());
            let (qsi, kvsi) = (dm.qs as i32, dm.kvs as i32);
            if !op.split && tc {
                // One kernel, a block per key tile and query head: dQ, dK and
                // dV summed unscaled into f32; then all three to bf16.
                let [dq_acc, dk_acc, dv_acc] =
                    bwd_fused_launch(&dev, &tiles, n_tiles(op), op.scale, (&qv, &kv, &vv, &dov), (&lv, &dlv), dm)?;
                let f = func(&dev, "pipe_attn_tc", ATTN_TC_BIN, "attn_tc_finish", q.dtype())?;
                let (nq, nk) = (n * hq * d, n * hkv * d);
                let mut b = stream.launch_builder(&f);
                b.arg(&dq_acc).arg(&mut dq).arg(&nq).arg(&dk_acc).arg(&mut dk).arg(&dv_acc).arg(&mut dv);
                b.arg(&nk).arg(&op.scale);
                // SAFETY: argument types and order match attn_tc_finish_bf16; nq and nk are
                // multiples of 8 (d is 64 or 128), nk <= nq, all buffers fresh allocations.
                unsafe { b.launch(crate::nn::kernels::grid((nq / 8).div_ceil(256), 1, 256)) }.w()?;
                return Ok((wrap(dq), wrap(dk), wrap(dv)));
            }
            let (f, smem) = kernel(&dev, "bwd_dq", q.dtype(), d)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lv).arg(&dlv).arg(&mut dq).arg(&tiles);
            b.arg(&ni).arg(&hqi).arg(&hkvi).arg(&sl2).arg(&op.scale);
            if tc {
                b.arg(&qsi).arg(&kvsi);
            }
            // SAFETY: argument types and order match attn_bwd_dq_* in kernels/attn.cu
            // and attn_tc_bwd_dq_* (with the row strides) in kernels/attn_tc.cu.
            unsafe { b.launch(cfg(n_tiles(op), hq, smem, tc, THREADS)) }.w()?;
            let (f, smem) = kernel(&dev, "bwd_dkv", q.dtype(), d)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lv).arg(&dlv).arg(&mut dk).arg(&mut dv).arg(&tiles);
            b.arg(&ni).arg(&hqi).arg(&hkvi).arg(&sl2).arg(&op.scale);
            if tc {
                b.arg(&qsi).arg(&kvsi);
            }
            // SAFETY: argument types and order match attn_bwd_dkv_* in kernels/attn.cu
            // and attn_tc_bwd_dkv_* (with the row strides) in kernels/attn_tc.cu.
            unsafe { b.launch(cfg(n_tiles(op), hkv, smem, tc, THREADS)) }.w()?;
            Ok((wrap(dq), wrap(dk), wrap(dv)))
        })?;
        Ok((tensor(dq, q.shape().clone()), tensor(dk, k.shape().clone()), tensor(dv, v.shape().clone())))
    }

    /// The gradient of [`super::attention_packed`]'s input, packed as it is.
    pub(super) fn backward_packed(
        op: &AttnPacked,
        qkv: &Tensor,
        dout: &Tensor,
        lse: &Tensor,
        delta: &Tensor,
    ) -> Result<Tensor> {
        let (n, heads, d) = qkv.dims3()?;
        let (hq, hkv) = (op.hq, op.hkv);
        let out = with(&[qkv, dout, lse, delta, &op.tiles], |st| {
            let dev = device(st[0].0);
            let (all, dov) = (view::<half::bf16>(st[0].0, st[0].1)?, view::<half::bf16>(st[1].0, st[1].1)?);
            let (lv, dlv) = (view::<f32>(st[2].0, st[2].1)?, view::<f32>(st[3].0, st[3].1)?);
            let tiles = view::<u32>(st[4].0, st[4].1)?;
            let (k, v) = (all.slice(hq * d..), all.slice((hq + hkv) * d..));
            let dm = Dims { n, hq, hkv, d, qs: heads * d, kvs: heads * d };
            let [dq_acc, dk_acc, dv_acc] = bwd_fused_launch(
                &dev,
                &tiles,
                super::tile_count(&op.tiles),
                op.scale,
                (&all, &k, &v, &dov),
                (&lv, &dlv),
                dm,
            )?;
            // SAFETY: attn_tc_finish_packed writes every element.
            let mut out = unsafe { dev.alloc::<half::bf16>(n * heads * d)? };
            let f = func(&dev, "pipe_attn_tc", ATTN_TC_BIN, "attn_tc_finish_packed", DType::BF16)?;
            let (rows, qw, kw) = (n, (hq * d) as i32, (hkv * d) as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&dq_acc).arg(&dk_acc).arg(&dv_acc).arg(&mut out).arg(&rows).arg(&qw).arg(&kw).arg(&op.scale);
            // SAFETY: argument types and order match attn_tc_finish_packed_bf16; qw and kw
            // are multiples of 8 (d is 64 or 128), all buffers fresh allocations.
            unsafe { b.launch(crate::nn::kernels::grid((n * heads * d / 8).div_ceil(256), 1, 256)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        })?;
        Ok(tensor(out, qkv.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::nn::tests::rel_err;

    #[test]
    fn tiles_cover_every_row_once_within_its_sequence() {
        let seqs = [(0, 1), (1, 64), (65, 65), (130, 200), (330, 4)];
        for (hd, dt) in HEAD_DIMS.into_iter().flat_map(|hd| [(hd, DType::F32), (hd, DType::BF16)]) {
            let t = tiles(&seqs, hd, dt);
            let rows = if dt == DType::BF16 { 64 } else { 4096 / hd };
            assert_eq!(tile_rows(hd, dt), rows);
            let mut seen = vec![0; 334];
            let n = t.len() / 6;
            assert_eq!(t.len(), 6 * n);
            for c in t[..4 * n].chunks(4) {
                let [a, b, s, e] = [c[0], c[1], c[2], c[3]].map(|x| x as usize);
                assert!(a < b && b - a <= rows, "{c:?}");
                assert!(seqs.contains(&(s, e - s)) && s <= a && b <= e, "{c:?}");
                (a..b).for_each(|i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&n| n == 1), "hd {hd}: {seen:?}");
            // The launch orders: every tile once, the most work first.
            let at = |i: u32, k: usize| t[4 * i as usize + k] as usize;
            for (which, work) in
                [(4, &|i| (at(i, 1) - at(i, 0)) * (at(i, 1) - at(i, 2))), (5, &|i| at(i, 3) - at(i, 0))]
                    as [(usize, &dyn Fn(u32) -> usize); 2]
            {
                let order = &t[which * n..(which + 1) * n];
                let mut sorted = order.to_vec();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>(), "hd {hd}: order {which} {order:?}");
                assert!(order.windows(2).all(|w| work(w[0]) >= work(w[1])), "hd {hd}: order {which} {order:?}");
            }
            // (130, 200) at 64 rows: 258..322 attends 192 keys a row (322..330
            // 200, but for 8 rows); the backward's first is a sequence's first.
            if dt == DType::BF16 {
                assert_eq!(at(t[4 * n], 0), 258);
                assert_eq!(at(t[5 * n], 0), 130);
            }
        }
    }

    #[test]
    fn not_used_off_cuda_or_for_other_dtypes_and_dims() -> candle_core::Result<()> {
        let q = Tensor::zeros((4, 2, 64), DType::F32, &Device::Cpu)?;
        assert!(!usable(&q));
        let t = Tensor::from_vec(tiles(&[(0, 4)], 64, DType::F32), 6, &Device::Cpu)?;
        let err = attention(&q, &q, &q, &t, 0.125).expect_err("the CPU has no fused kernel");
        assert!(err.to_string().contains("CUDA only"), "{err}");
        let bad = Tensor::zeros((4, 3, 64), DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((4, 2, 64), DType::F32, &Device::Cpu)?;
        assert!(attention(&bad, &k, &k, &t, 0.125).is_err(), "3 query heads cannot share 2 kv heads");
        Ok(())
    }

    /// The plain composition (per sequence, kv heads repeated, additive
    /// causal mask, softmax), differentiable; f64 on the CPU.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, seqs: &[(usize, usize)], scale: f64) -> Result<Tensor> {
        let (hq, hkv) = (q.dim(1)?, k.dim(1)?);
        let idx: Vec<u32> = (0..hq).map(|h| (h / (hq / hkv)) as u32).collect();
        let idx = Tensor::from_vec(idx, hq, q.device())?;
        let mut outs = Vec::new();
        for &(off, len) in seqs {
            let qi = q.narrow(0, off, len)?.transpose(0, 1)?.contiguous()?;
            let ki = k.narrow(0, off, len)?.transpose(0, 1)?.contiguous()?.index_select(&idx, 0)?;
            let vi = v.narrow(0, off, len)?.transpose(0, 1)?.contiguous()?.index_select(&idx, 0)?;
            let s = (qi.matmul(&ki.t()?)? * scale)?;
            let mask = crate::nn::ops::causal_mask(len, 0, DType::F64, q.device())?;
            let p = crate::nn::ops::softmax(&s.broadcast_add(&mask)?)?;
            outs.push(p.matmul(&vi)?.transpose(0, 1)?);
        }
        Tensor::cat(&outs, 0)
    }

    /// Forward and backward against the composition, on the GPU machine
    /// (skipped where there is no CUDA device): packed sequences of awkward
    /// lengths (1, a tile, a tile + 1, several tiles), grouped-query and
    /// plain attention, head dims 64 and 128, f32 and bf16 (its backward
    /// pass fused and split; at head dim 64 the forward kernel with three
    /// K/V buffers and with two).
    #[test]
    fn fused_attention_matches_the_composition_on_cuda() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        let seqs = [(0, 1), (1, 5), (6, 64), (70, 65), (135, 130), (265, 300)];
        let n = 565;
        for (hq, hkv, d) in [(6, 2, 64), (4, 4, 64), (4, 1, 128)] {
            let scale = 1.0 / (d as f64).sqrt();
            let q = Tensor::randn(0f64, 1.0, (n, hq, d), &Device::Cpu)?;
            let k = Tensor::randn(0f64, 1.0, (n, hkv, d), &Device::Cpu)?;
            let v = Tensor::randn(0f64, 1.0, (n, hkv, d), &Device::Cpu)?;
            let w = Tensor::randn(0f64, 1.0, (n, hq, d), &Device::Cpu)?;
            // bf16 three times: the fused backward kernel and the split
            // pair, and at head dim 64 the forward kernel with two K/V
            // buffers (three is the default there).
            let mut cases = vec![(DType::F32, 1e-4, false, false), (DType::BF16, 3e-2, false, false)];
            cases.push((DType::BF16, 3e-2, true, false));
            if d == 64 {
                cases.push((DType::BF16, 3e-2, false, true));
            }
            for (dt, tol, split, two) in cases {
                FWD_TWO.with(|t| t.set(Some(two)));
                let runs = FWD3_RUNS.with(|r| r.get());
                let on = |t: &Tensor| t.to_dtype(dt)?.to_device(&dev);
                let (qg, kg, vg) =
                    (Var::from_tensor(&on(&q)?)?, Var::from_tensor(&on(&k)?)?, Var::from_tensor(&on(&v)?)?);
                // The reference starts from the same (rounded) inputs.
                let back =
                    |t: &Var| -> Result<Var> { Var::from_tensor(&t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?) };
                let (qr, kr, vr) = (back(&qg)?, back(&kg)?, back(&vg)?);
                let want = reference(&qr, &kr, &vr, &seqs, scale)?;
                let gw = (&want * &w)?.sum_all()?.backward()?;
                let tl = tiles(&seqs, d, dt);
                let t = Tensor::from_vec(tl.clone(), tl.len(), &dev)?;
                assert!(usable(&qg));
                let got = attention_with(&qg, &kg, &vg, &t, scale, split)?;
                let three = FWD3_RUNS.with(|r| r.get()) > runs;
                assert_eq!(three, d == 64 && dt == DType::BF16 && !two, "hq {hq} d {d} {dt:?}: forward kernel");
                FWD_TWO.with(|t| t.set(None));
                let wg = w.to_dtype(DType::F32)?.to_device(&dev)?;
                let gg = (got.to_dtype(DType::F32)? * wg)?.sum_all()?.backward()?;
                let what = format!("hq {hq} hkv {hkv} d {d} {dt:?} split {split} two buffers {two}");
                let e = rel_err(&got, &want)?;
                assert!(e < tol, "{what}: output off by {e}");
                for (name, a, b) in [("dq", &qg, &qr), ("dk", &kg, &kr), ("dv", &vg, &vr)] {
                    let (Some(ga), Some(gb)) = (gg.get(a.as_tensor()), gw.get(b.as_tensor())) else {
                        panic!("{what}: no {name}")
                    };
                    let e = rel_err(ga, gb)?;
                    assert!(e < tol * 3.0, "{what}: {name} off by {e}");
                }
            }
            // q, k, v packed in one tensor (bf16): the same values, and the
            // gradient packed the same way.
            let qkv = Tensor::cat(&[&q, &k, &v], 1)?;
            let g = Var::from_tensor(&qkv.to_dtype(DType::BF16)?.to_device(&dev)?)?;
            let r = Var::from_tensor(&g.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)?;
            let (qr, kr, vr) = (r.narrow(1, 0, hq)?, r.narrow(1, hq, hkv)?, r.narrow(1, hq + hkv, hkv)?);
            let want = reference(&qr, &kr, &vr, &seqs, scale)?;
            let gw = (&want * &w)?.sum_all()?.backward()?;
            let tl = tiles(&seqs, d, DType::BF16);
            let t = Tensor::from_vec(tl.clone(), tl.len(), &dev)?;
            assert!(packed_usable(g.as_tensor(), d));
            let got = attention_packed(&g, hq, hkv, &t, scale)?;
            let gg = (got.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?.to_device(&dev)?)?.sum_all()?.backward()?;
            let what = format!("hq {hq} hkv {hkv} d {d} packed");
            let e = rel_err(&got, &want)?;
            assert!(e < 3e-2, "{what}: output off by {e}");
            let (Some(ga), Some(gb)) = (gg.get(g.as_tensor()), gw.get(r.as_tensor())) else {
                panic!("{what}: no grad")
            };
            assert_eq!(ga.dims(), g.dims());
            let e = rel_err(ga, gb)?;
            assert!(e < 9e-2, "{what}: packed gradient off by {e}");
            assert!(attention_packed(&g, hq + 1, hkv, &t, scale).is_err(), "{what}: heads that do not add up");
        }
        Ok(())
    }
}
