//! Fused RMSNorm, rotary embedding and SwiGLU on CUDA (kernels/fused.cu):
//! one kernel each way instead of the 6-12 small ops (and their saved
//! intermediates) of the compositions in [`crate::nn::ops`], which they
//! match (to rounding: the kernels keep f32 between steps where the bf16
//! composition rounds) and which the CPU keeps using. [`usable`] says
//! whether a tensor takes this path; `PIPE_FUSED_KERNELS=0` turns it off.

use candle_core::{DType, Result, Tensor};

use candle_core::backend::BackendStorage;

use crate::nn::ops::{cpu_storage, cpu_tensor, dense};

/// The error of a fused op asked to run off CUDA (the callers check
/// [`usable`] / [`crate::nn::flash::usable`] first).
pub(crate) fn cuda_only<T>(name: &str) -> Result<T> {
    candle_core::bail!("{name}: the fused kernel runs on CUDA only")
}

/// The `cpu_fwd` of a candle custom op whose kernel runs on CUDA only: it
/// fails with [`cuda_only`]. The argument names the trait: `op1`, `op2`,
/// `op3` (`CustomOp1`-`3`), `inplace2`, `inplace3` (`InplaceOp2`, `3`).
macro_rules! cpu_fwd_cuda_only {
    (op1) => {
        $crate::nn::fused::cpu_fwd_cuda_only!(@ (candle_core::CpuStorage, candle_core::Shape);
            &candle_core::CpuStorage);
    };
    (op2) => {
        $crate::nn::fused::cpu_fwd_cuda_only!(@ (candle_core::CpuStorage, candle_core::Shape);
            &candle_core::CpuStorage, &candle_core::CpuStorage);
    };
    (op3) => {
        $crate::nn::fused::cpu_fwd_cuda_only!(@ (candle_core::CpuStorage, candle_core::Shape);
            &candle_core::CpuStorage, &candle_core::CpuStorage, &candle_core::CpuStorage);
    };
    (inplace2) => {
        $crate::nn::fused::cpu_fwd_cuda_only!(@ (); &mut candle_core::CpuStorage, &candle_core::CpuStorage);
    };
    (inplace3) => {
        $crate::nn::fused::cpu_fwd_cuda_only!(@ ();
            &mut candle_core::CpuStorage, &candle_core::CpuStorage, &candle_core::CpuStorage);
    };
    (@ $ret:ty; $($arg:ty),+) => {
        fn cpu_fwd(&self, $(_: $arg, _: &candle_core::Layout),+) -> candle_core::Result<$ret> {
            $crate::nn::fused::cuda_only(self.name())
        }
    };
}
pub(crate) use cpu_fwd_cuda_only;

/// Whether the fused kernels run for `x`: a CUDA build, a CUDA tensor, f32
/// or bf16, and not turned off with `PIPE_FUSED_KERNELS=0`.
pub fn usable(x: &Tensor) -> bool {
    kernels_on(x, Switch::Kernels)
}

/// Whether [`rms_norm`] and [`swiglu`] take `x`: [`usable`], or an f32
/// tensor on the CPU, where they run as one op each way too (candle's
/// autograd through their compositions costs ~40 and ~110 ms a SmolLM2
/// layer at 1,024 tokens on 2 cores, the ops themselves ~2 ms).
pub fn usable_or_cpu(x: &Tensor) -> bool {
    usable(x) || (x.device().is_cpu() && x.dtype() == DType::F32 && Switch::Kernels.on())
}

/// The environment variables that turn pipe's CUDA kernels off (`=0`).
#[derive(Clone, Copy)]
pub(crate) enum Switch {
    /// `PIPE_FUSED_KERNELS`: all but attention's.
    Kernels,
    /// `PIPE_FUSED_ATTENTION`: attention's.
    Attention,
}

impl Switch {
    /// Whether the switch leaves the kernels on (not `=0`).
    fn on(self) -> bool {
        let var = match self {
            Switch::Kernels => env_once!("PIPE_FUSED_KERNELS"),
            Switch::Attention => env_once!("PIPE_FUSED_ATTENTION"),
        };
        var.is_none_or(|v| v != "0")
    }
}

/// Whether pipe's CUDA kernels can take `x` (a CUDA build, a CUDA tensor, f32
/// or bf16) and the environment variable `switch` does not turn them off.
pub(crate) fn kernels_on(x: &Tensor, switch: Switch) -> bool {
    kernels_for(x.device(), x.dtype(), switch)
}

/// [`kernels_on`] for a result of `dtype` to be made on `dev`.
pub(crate) fn kernels_for(dev: &candle_core::Device, dtype: DType, switch: Switch) -> bool {
    cfg!(feature = "cuda") && dev.is_cuda() && matches!(dtype, DType::F32 | DType::BF16) && switch.on()
}

/// `T(x * rsqrt(mean(x^2) + eps)) * w` over the last dim (as
/// [`crate::nn::ops::rms_norm`]); differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dims().last().copied().unwrap_or(0);
    if w.dims() != [h] || w.dtype() != x.dtype() {
        candle_core::bail!(
            "fused rms_norm: weight {:?} {:?} for input {:?} {:?}",
            w.dims(),
            w.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    dense(x)?.apply_op2(&dense(w)?, RmsNorm { eps: eps as f32, rstd: crate::nn::ops::Saved::default() })
}

/// Rotary embedding of `x` (N, heads, head_dim) with `cos`/`sin` (N,
/// head_dim/2), `transformers`' rotate_half layout (as
/// [`crate::nn::ops::rope`]); differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_heads(x, cos, sin, x.dim(1)?)
}

/// [`rope`] on heads `0..rot` of x (N, heads, D); the other heads pass
/// through unchanged (the values of a packed q, k, v projection).
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Tensor> {
    let (n, heads, d) = x.dims3()?;
    if cos.dims() != [n, d / 2] || sin.dims() != cos.dims() || d % 2 != 0 || rot > heads {
        candle_core::bail!(
            "fused rope: x {:?}, cos {:?}, sin {:?}, {rot} heads rotated",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let (cos, sin) = (dense(&cos.to_dtype(x.dtype())?)?, dense(&sin.to_dtype(x.dtype())?)?);
    dense(x)?.apply_op3(&cos, &sin, Rope { rot })
}

/// `a + b`, differentiable in both: on CUDA (f32, bf16, same shape) one
/// kernel that moves 16 bytes a thread (the residual stream's adds);
/// candle's add elsewhere.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !add_takes(a, b) {
        return a + b;
    }
    dense(a)?.apply_op2(&dense(b)?, Add)
}

/// Whether [`add`]'s kernel takes `a` and `b`.
fn add_takes(a: &Tensor, b: &Tensor) -> bool {
    usable(a) && a.dims() == b.dims() && a.dtype() == b.dtype() && a.device().same_device(b.device())
}

/// The sum `GradStore::accumulate` uses (candle-core's pipe patch): [`add`]
/// for two dense gradients it can take, `None` (candle's add) otherwise.
fn grad_add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !(add_takes(a, b) && a.is_contiguous() && b.is_contiguous()) {
        return Ok(None);
    }
    Ok(Some(a.apply_op2_no_bwd(b, &Add)?))
}

/// Has backward passes sum a tensor's gradients with [`add`]'s kernel
/// (once per process; the first caller sets it).
pub fn install_grad_add() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        candle_core::backprop::set_accumulate_add(grad_add);
    });
}

struct Add;

impl candle_core::CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "fused-add"
    }

    cpu_fwd_cuda_only!(op2);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Ok((cuda::add((a, al), (b, bl))?, al.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(g.clone())))
    }
}

/// A dropout mask of `shape` in `dtype` (f32 or bf16) made on `device`'s
/// GPU: element i is `keep` (1 / (1 - p), rounded to f32 as the CPU's
/// masks), or 0 where a hash of (seed, i) falls below p. The CPU draws its
/// masks from a ChaCha8 stream instead ([`crate::nn::ops::dropout_mask`]):
/// the same probability, other draws. Made where it is used, instead of
/// drawn on the host and copied (an (m, k) upload a LoRA linear a step).
/// CUDA only.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn dropout_values_cuda(
    shape: &candle_core::Shape,
    dtype: DType,
    device: &candle_core::Device,
    p: f64,
    seed: u64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        return cuda::dropout_values(shape, dtype, d, p, seed);
    }
    cuda_only("fused dropout mask")
}

/// `silu(g) * u`; differentiable in both.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() || g.dtype() != u.dtype() {
        candle_core::bail!("fused swiglu: {:?} vs {:?}", g.dims(), u.dims());
    }
    dense(g)?.apply_op2(&dense(u)?, SwiGlu)
}

/// Softmax cross-entropy of each row of `logits` (M, V) against `targets`
/// (M, u32), with the gradient written over the logits: returns the loss
/// per row (M, f32, `logsumexp - logit[target]`), and `logits` then holds
/// `grad_scale * (softmax - onehot(target))` in its own dtype (`grad_scale`:
/// what the caller will scale the loss by, so the gradient needs no second
/// pass). One kernel pass instead of the composition's dozen over an f32
/// copy (for the chunked LM head, where the loss ends the graph). CUDA only.
pub fn cross_entropy_grad_in_place(logits: &Tensor, targets: &Tensor, grad_scale: f32) -> Result<Tensor> {
    let (m, _) = logits.dims2()?;
    if targets.dims() != [m] || targets.dtype() != DType::U32 || !logits.is_contiguous() {
        candle_core::bail!(
            "fused cross-entropy: logits {:?} (contiguous: {}), targets {:?} {:?}",
            logits.dims(),
            logits.is_contiguous(),
            targets.dims(),
            targets.dtype()
        );
    }
    let op = CeGrad { loss: Default::default(), grad_scale };
    logits.inplace_op2(&dense(targets)?, &op)?;
    match op.loss.lock().ok().and_then(|mut g| g.take()) {
        Some(l) => Ok(l),
        None => candle_core::bail!("fused cross-entropy: the kernel returned no loss"),
    }
}

struct CeGrad {
    loss: std::sync::Mutex<Option<Tensor>>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    grad_scale: f32,
}

impl candle_core::InplaceOp2 for CeGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    cpu_fwd_cuda_only!(inplace2);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &mut candle_core::CudaStorage,
        xl: &candle_core::Layout,
        ts: &candle_core::CudaStorage,
        tl: &candle_core::Layout,
    ) -> Result<()> {
        let loss = cuda::ce_grad((xs, xl), (ts, tl), self.grad_scale)?;
        if let Ok(mut g) = self.loss.lock() {
            *g = Some(loss);
        }
        Ok(())
    }
}

/// Rows of a table picked by ids (an embedding lookup, or the rows of the
/// hidden states that predict a label), made once per batch: the ids on
/// the device and, on CUDA, their segments for the backward pass.
pub struct RowGather {
    pub ids: Tensor,
    /// On CUDA: the segments of the backward pass (see [`Segments`]).
    seg: Option<std::sync::Arc<Segments>>,
    /// The largest id (a table must have more rows).
    max: Option<u32>,
}

impl RowGather {
    pub fn new(ids: Vec<u32>, device: &candle_core::Device) -> Result<Self> {
        let seg = device.is_cuda().then(|| std::sync::Arc::new(Segments::new(&ids, device)));
        let (n, max) = (ids.len(), ids.iter().max().copied());
        Ok(RowGather { ids: Tensor::from_vec(ids, n, device)?, seg, max })
    }

    /// Uploads the segments of the backward pass now (waiting for their
    /// sort, which runs on a thread of its own from [`Self::new`] on): for
    /// a training step to call once its forward pass is queued, while the
    /// GPU still has work, rather than when the backward pass needs them
    /// (the LM head's backward reads the loss's gradient, so the GPU has
    /// nothing queued when the labels' gather asks for its segments).
    pub fn prefetch(&self) -> Result<()> {
        match &self.seg {
            Some(seg) => seg.get().map(drop),
            None => Ok(()),
        }
    }

    /// Rows `ids` of `table` (V, d): `index_select` on dim 0, whose
    /// backward on CUDA ([`usable`]) sums the gradient's rows per distinct
    /// id with a block each, in f32 and in position order (candle's
    /// `index_add` walks every id in one thread per column: milliseconds
    /// for a batch of tokens, in the table's dtype).
    pub fn gather(&self, table: &Tensor) -> Result<Tensor> {
        match &self.seg {
            Some(seg)
                if usable(table)
                    && table.rank() == 2
                    && self.max.is_none_or(|m| table.dims().first().is_some_and(|&v| (m as usize) < v)) =>
            {
                let op = GatherRows { ids: self.ids.clone(), seg: seg.clone() };
                dense(table)?.apply_op1(op)
            }
            _ => table.index_select(&self.ids, 0),
        }
    }
}

thread_local! {
    /// Tests: backward passes on this thread whose row gather added its
    /// gradient into the table's gradient so far (`GatherRows::bwd_acc`).
    pub(crate) static ROWS_ADDED_IN_PLACE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A [`RowGather`]'s segments on the device, for its backward pass: the
/// `nseg + 1` starts, the `nseg` distinct ids, then the positions sorted
/// by id (stably), as fused.cu's `segment_add` reads them; and `nseg`.
/// They are sorted on a thread of their own while the forward pass runs,
/// and uploaded once it is queued ([`RowGather::prefetch`]) or when the
/// backward pass first needs them: sorting a batch's 8,192 ids on the
/// training thread took ~0.2-0.3 ms of each step on the GPU machines,
/// with the GPU idle (the batch is made before the step's first kernel).
pub(crate) struct Segments {
    device: candle_core::Device,
    state: std::sync::Mutex<SegState>,
}

enum SegState {
    Sorting(std::thread::JoinHandle<(Vec<u32>, usize)>),
    Sorted(Vec<u32>, usize),
    Uploaded(Tensor, usize),
    Failed,
}

impl Segments {
    fn new(ids: &[u32], device: &candle_core::Device) -> Self {
        let own = ids.to_vec();
        let state = match std::thread::Builder::new().name("pipe-segments".into()).spawn(move || segments(&own)) {
            Ok(h) => SegState::Sorting(h),
            // No thread to be had: sorted here.
            Err(_) => {
                let (layout, nseg) = segments(ids);
                SegState::Sorted(layout, nseg)
            }
        };
        Segments { device: device.clone(), state: std::sync::Mutex::new(state) }
    }

    /// The layout on the device and `nseg` (waiting for the sort).
    fn get(&self) -> Result<(Tensor, usize)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let SegState::Uploaded(t, n) = &*st {
            return Ok((t.clone(), *n));
        }
        let (layout, nseg) = match std::mem::replace(&mut *st, SegState::Failed) {
            SegState::Uploaded(..) => unreachable!("returned above"),
            SegState::Sorted(layout, n) => (layout, n),
            SegState::Sorting(h) => match h.join() {
                Ok(sorted) => sorted,
                Err(_) => candle_core::bail!("row gather: sorting the batch's ids panicked"),
            },
            SegState::Failed => candle_core::bail!("row gather: the batch's segments failed before"),
        };
        match Tensor::new(layout.as_slice(), &self.device) {
            Ok(t) => {
                *st = SegState::Uploaded(t.clone(), nseg);
                Ok((t, nseg))
            }
            // Sorted still (a failed upload, such as out of memory, may be retried).
            Err(e) => {
                *st = SegState::Sorted(layout, nseg);
                Err(e)
            }
        }
    }
}

/// [`RowGather`]'s segment layout for `ids`, and the number of distinct ids.
pub(crate) fn segments(ids: &[u32]) -> (Vec<u32>, usize) {
    // (id, position) in one key: an unstable sort gives the stable order.
    let mut keys: Vec<u64> = ids.iter().enumerate().map(|(i, &id)| (id as u64) << 32 | i as u64).collect();
    keys.sort_unstable();
    let order: Vec<u32> = keys.iter().map(|&k| k as u32).collect();
    let (mut starts, mut uniq) = (Vec::new(), Vec::new());
    for (k, &i) in order.iter().enumerate() {
        if uniq.last() != Some(&ids[i as usize]) {
            starts.push(k as u32);
            uniq.push(ids[i as usize]);
        }
    }
    let nseg = uniq.len();
    starts.push(ids.len() as u32);
    starts.extend(uniq);
    starts.extend(order);
    (starts, nseg)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GatherRows {
    ids: Tensor,
    seg: std::sync::Arc<Segments>,
}

impl candle_core::CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    cpu_fwd_cuda_only!(op1);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ts: &candle_core::CudaStorage,
        tl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (_, d) = tl.shape().dims2()?;
        let n = self.ids.dim(0)?;
        let out = crate::nn::kernels::with(&[&self.ids], |s| cuda::gather_rows((ts, tl), s[0]))?;
        Ok((out, candle_core::Shape::from((n, d))))
    }

    fn bwd(&self, table: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (seg, nseg) = self.seg.get()?;
        let dt = table.zeros_like()?;
        dt.inplace_op2(&dense(g)?, &SegmentAdd { seg, nseg })?;
        Ok(Some(dt))
    }

    /// With the table's gradient so far (a tied LM head's weight gradient,
    /// summed before the embedding's), the rows are added into it in
    /// place: no (V, d) tensor of zeros and no add of two of them (at the
    /// Llama-1B shape, 525 MB tables: a memset and a 1.5 GB add a step).
    /// Only where it is the sole handle to its storage; else as `bwd`.
    fn bwd_acc(
        &self,
        table: &Tensor,
        res: &Tensor,
        g: &Tensor,
        acc: &mut Option<Tensor>,
    ) -> Result<(Option<Tensor>, bool)> {
        let fits = |a: &Tensor| {
            crate::nn::ops::writable_in_place(a, table.dims(), table.dtype()) && a.device().same_device(table.device())
        };
        match acc.take_if(|a| fits(a)) {
            Some(a) => {
                let (seg, nseg) = self.seg.get()?;
                a.inplace_op2(&dense(g)?, &SegmentAdd { seg, nseg })?;
                ROWS_ADDED_IN_PLACE.with(|c| c.set(c.get() + 1));
                Ok((Some(a), true))
            }
            None => Ok((self.bwd(table, res, g)?, false)),
        }
    }
}

/// `dt += ` the rows of `g` summed per distinct id (fused.cu's `segment_add`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct SegmentAdd {
    seg: Tensor,
    nseg: usize,
}

impl candle_core::InplaceOp2 for SegmentAdd {
    fn name(&self) -> &'static str {
        "segment-add"
    }

    cpu_fwd_cuda_only!(inplace2);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ds: &mut candle_core::CudaStorage,
        dl: &candle_core::Layout,
        gs: &candle_core::CudaStorage,
        gl: &candle_core::Layout,
    ) -> Result<()> {
        crate::nn::kernels::with(&[&self.seg], |s| cuda::segment_add((ds, dl), (gs, gl), s[0], self.nseg))
    }
}

/// Whether RMSNorm's backward pass computes dx and the weight's gradient
/// in two passes over x and dy (`PIPE_NORM_BWD=split`, read once: to
/// compare) instead of one.
fn norm_bwd_split() -> bool {
    env_once!("PIPE_NORM_BWD").is_some_and(|v| v == "split")
}

struct RmsNorm {
    eps: f32,
    /// 1 / rms of each row (f32), from the forward pass.
    rstd: crate::nn::ops::Saved,
}

struct Rope {
    /// Heads rotated (the first ones of each row).
    rot: usize,
}
struct SwiGlu;

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    /// f32 on the CPU: the composition's ops, in its order (the same
    /// values), outside any graph.
    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        if xs.dtype() != DType::F32 {
            return cuda_only(self.name());
        }
        let (x, w) = (cpu_tensor(xs, xl), cpu_tensor(ws, wl));
        let h = w.elem_count();
        let x = x.reshape(((), h))?;
        let inv = crate::nn::ops::rms_inv(&x, self.eps as f64)?;
        let y = x.broadcast_mul(&inv)?.broadcast_mul(&w)?;
        self.rstd.keep(inv.squeeze(1)?);
        cpu_storage(&y.reshape(xl.shape())?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (y, rstd) = cuda::rms_norm_fwd(self.eps, (xs, xl), (ws, wl))?;
        self.rstd.keep(rstd);
        Ok((y, xl.shape().clone()))
    }

    /// On CUDA, x's gradient so far (`acc`: in a Llama block, the residual
    /// stream's) is added in the kernel that computes dx, instead of by a
    /// separate add pass (`PIPE_NORM_BWD=split` turns that off too).
    fn bwd_acc(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
        acc: &mut Option<Tensor>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, bool)> {
        let rstd = self.rstd.get("fused rms_norm")?;
        let dy = dense(&dy.to_dtype(x.dtype())?)?;
        // CUDA's kernels fold the sum in, and with a trained weight take one
        // pass (unless PIPE_NORM_BWD=split).
        let fold = !x.device().is_cpu() && !norm_bwd_split();
        let acc = match acc.as_ref() {
            Some(a) if fold && a.dims() == x.dims() && a.dtype() == x.dtype() => Some(dense(a)?),
            _ => None,
        };
        let summed = acc.is_some();
        if fold && w.track_op() {
            if let Some((dx, dw)) = backward::rms_norm_with_dw(x, w, &dy, &rstd, acc.as_ref())? {
                return Ok((Some(dx), Some(dw), summed));
            }
        }
        let dx = if x.device().is_cpu() {
            cpu_backward::rms_norm(x, w, &dy, &rstd)?
        } else {
            backward::rms_norm(x, w, &dy, &rstd, acc.as_ref())?
        };
        let dw = if w.track_op() && !x.device().is_cpu() {
            Some(backward::rms_norm_dw(x, &dy, &rstd)?.to_dtype(w.dtype())?)
        } else if w.track_op() {
            // sum over rows of dy * T(x * rstd), in f32
            let h = w.dim(0)?;
            let x2 = x.detach().reshape(((), h))?;
            let xhat = x2.to_dtype(DType::F32)?.broadcast_mul(&rstd.unsqueeze(1)?)?.to_dtype(x.dtype())?;
            let dw = (dy.detach().reshape(((), h))?.to_dtype(DType::F32)? * xhat.to_dtype(DType::F32)?)?.sum(0)?;
            Some(dw.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok((Some(dx), dw, summed))
    }
}

impl candle_core::CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    cpu_fwd_cuda_only!(op3);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        cs: &candle_core::CudaStorage,
        cl: &candle_core::Layout,
        ss: &candle_core::CudaStorage,
        sl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Ok((cuda::rope(1.0, self.rot, (xs, xl), (cs, cl), (ss, sl))?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The rotation is orthogonal: its transpose rotates by -angle.
        let dy = dense(&dy.to_dtype(cos.dtype())?)?;
        Ok((Some(backward::rope_t(&dy, cos, sin, self.rot)?), None, None))
    }
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    /// f32 on the CPU: one pass, each element as the composition computes
    /// it (`silu(g) * u`: the same values).
    fn cpu_fwd(
        &self,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
        us: &candle_core::CpuStorage,
        ul: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        if gs.dtype() != DType::F32 {
            return cuda_only(self.name());
        }
        let (g, u) = (cpu_dense_f32(gs, gl, self.name())?, cpu_dense_f32(us, ul, self.name())?);
        let [y] = cpu_map_f32(g.len(), |i, [y]| {
            let (g, u) = (g[i], u[i]);
            // candle's silu, then its product.
            *y = g / (1.0 + (-g).exp()) * u;
        });
        Ok((candle_core::CpuStorage::F32(y), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &candle_core::Layout,
        us: &candle_core::CudaStorage,
        ul: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Ok((cuda::swiglu_fwd((gs, gl), (us, ul))?, gl.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dense(&dy.to_dtype(g.dtype())?)?;
        let (dg, du) =
            if g.device().is_cpu() { cpu_backward::swiglu(g, u, &dy)? } else { backward::swiglu(g, u, &dy)? };
        Ok((Some(dg), Some(du)))
    }
}

/// A dense f32 CPU storage's elements.
fn cpu_dense_f32<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((o, e))) => Ok(&v[o..e]),
        _ => candle_core::bail!("{op}: the inputs must be dense f32 on the CPU"),
    }
}

/// `N` outputs of `n` elements, element `i` of each written by `f(i,
/// outputs at i)`: in chunks on rayon's pool from 64k elements (candle's
/// own threshold for its parallel element-wise ops).
fn cpu_map_f32<const N: usize>(n: usize, f: impl Fn(usize, [&mut f32; N]) + Sync) -> [Vec<f32>; N] {
    use rayon::prelude::*;
    const CHUNK: usize = 16 * 1024;
    let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| vec![0f32; n]);
    {
        let mut parts = outs.each_mut().map(|o| o.chunks_mut(CHUNK));
        let chunks: Vec<[&mut [f32]; N]> = (0..n.div_ceil(CHUNK))
            .map(|_| parts.each_mut().map(|p| p.next().expect("as many chunks in each output")))
            .collect();
        let run = |(c, mut chunk): (usize, [&mut [f32]; N])| {
            for j in 0..chunk[0].len() {
                f(c * CHUNK + j, chunk.each_mut().map(|x| &mut x[j]));
            }
        };
        if n < 4 * CHUNK {
            chunks.into_iter().enumerate().for_each(run);
        } else {
            chunks.into_par_iter().enumerate().for_each(run);
        }
    }
    outs
}

/// The backward passes of the fused ops on the CPU, from candle ops on
/// detached tensors (no graph).
mod cpu_backward {
    use candle_core::{DType, Result, Storage, Tensor, D};

    /// dx = rstd * (dn - xhat * mean(dn * xhat)), dn = dy * w, xhat = x * rstd.
    pub fn rms_norm(x: &Tensor, w: &Tensor, dy: &Tensor, rstd: &Tensor) -> Result<Tensor> {
        let h = w.elem_count();
        let (x2, dy2, w) = (x.detach().reshape(((), h))?, dy.detach().reshape(((), h))?, w.detach());
        let r = rstd.unsqueeze(1)?;
        let xhat = x2.broadcast_mul(&r)?;
        let dn = dy2.broadcast_mul(&w)?;
        let c = (&dn * &xhat)?.mean_keepdim(D::Minus1)?;
        (dn - xhat.broadcast_mul(&c)?)?.broadcast_mul(&r)?.reshape(x.shape())
    }

    /// dg = dy * u * s * (1 + g * (1 - s)), du = dy * g * s, s = sigmoid(g):
    /// in f32 one pass over dense inputs, each element as the composition
    /// of candle ops below computes it (the same values; other dtypes
    /// take the composition).
    pub fn swiglu(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let (g, u, dy) = (g.detach(), u.detach(), dy.detach());
        if g.dtype() == DType::F32 && [&g, &u, &dy].iter().all(|t| t.dims() == g.dims()) {
            let (gs, gl) = g.storage_and_layout();
            let (us, ul) = u.storage_and_layout();
            let (ys, yl) = dy.storage_and_layout();
            if let (Storage::Cpu(gs), Storage::Cpu(us), Storage::Cpu(ys)) = (&*gs, &*us, &*ys) {
                let dense = |s, l| super::cpu_dense_f32(s, l, "fused swiglu backward");
                let (g, u, dy) = (dense(gs, gl)?, dense(us, ul)?, dense(ys, yl)?);
                let [dg, du] = super::cpu_map_f32(g.len(), |i, [dg, du]| {
                    let (g, u, dy) = (g[i], u[i], dy[i]);
                    let s = 1.0 / ((-g).exp() + 1.0);
                    *du = dy * (g * s);
                    *dg = dy * u * s * (g * (1.0 - s) + 1.0);
                });
                let dev = &candle_core::Device::Cpu;
                return Ok((Tensor::from_vec(dg, gl.shape(), dev)?, Tensor::from_vec(du, gl.shape(), dev)?));
            }
        }
        swiglu_composed(&g, &u, &dy)
    }

    /// SwiGLU's backward pass as candle ops (any dtype; the one-pass f32
    /// path above computes each element as these do).
    pub(super) fn swiglu_composed(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = (g.neg()?.exp()? + 1.0)?.recip()?;
        let du = (dy * (g * &s)?)?;
        let dg = ((dy * u)? * &s)?.mul(&((g * (1.0 - &s)?)? + 1.0)?)?;
        Ok((dg, du))
    }
}

#[cfg(not(feature = "cuda"))]
mod backward {
    use candle_core::{Result, Tensor};

    pub fn rms_norm(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: Option<&Tensor>) -> Result<Tensor> {
        super::cuda_only("fused rms_norm")
    }
    pub fn rms_norm_dw(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        super::cuda_only("fused rms_norm")
    }
    pub fn rms_norm_with_dw(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        super::cuda_only("fused rms_norm")
    }
    pub fn rope_t(_: &Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<Tensor> {
        super::cuda_only("fused rope")
    }
    pub fn swiglu(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<(Tensor, Tensor)> {
        super::cuda_only("fused swiglu")
    }
}

#[cfg(feature = "cuda")]
use cuda as backward;

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda::{CudaStorage, WrapErr};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{Layout, Result, Tensor};

    use crate::nn::kernels::{blocks, by_dtype, device, func, grid, sm_count, tensor, view, with, FUSED_BIN};

    const MODULE: &str = "pipe_fused";

    pub(super) fn rms_norm_fwd(
        eps: f32,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Tensor)> {
        by_dtype!(x.0.dtype(), rms_norm_fwd_t, eps, x, w)
    }

    fn rms_norm_fwd_t<T: CudaDType + DeviceRepr>(
        eps: f32,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Tensor)> {
        let dev = device(xs);
        let h = wl.shape().elem_count();
        let m = xl.shape().elem_count() / h.max(1);
        let (x, w) = (view::<T>(xs, xl)?, view::<T>(ws, wl)?);
        // SAFETY: the kernel writes every element of both.
        let mut y = unsafe { dev.alloc::<T>(m * h)? };
        let mut rstd = unsafe { dev.alloc::<f32>(m)? };
        let f = func(&dev, MODULE, FUSED_BIN, "rmsnorm_fwd", xs.dtype())?;
        let stream = dev.cuda_stream();
        let hi = h as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&w).arg(&mut y).arg(&mut rstd).arg(&hi).arg(&eps);
        // SAFETY: argument types and order match rmsnorm_fwd_* in kernels/fused.cu.
        unsafe { b.launch(grid(m, 1, norm_threads(h))) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), tensor(CudaStorage::wrap_cuda_slice(rstd, dev), m)))
    }

    /// Threads a row for the norm kernels (a block a row): one per 8 values
    /// (their 16-byte path), in whole warps, at most 256, so that short rows
    /// (576 for SmolLM2) leave no idle warps and an SM holds more rows.
    fn norm_threads(h: usize) -> u32 {
        if h.is_multiple_of(8) {
            (h / 8).next_multiple_of(32).clamp(32, 256) as u32
        } else {
            256
        }
    }

    /// dx of RMSNorm, plus `acc` (x's gradient so far, dense, x's shape
    /// and dtype) when given.
    pub fn rms_norm(x: &Tensor, w: &Tensor, dy: &Tensor, rstd: &Tensor, acc: Option<&Tensor>) -> Result<Tensor> {
        by_dtype!(x.dtype(), rms_norm_bwd_t, x, w, dy, rstd, acc)
    }

    /// `acc`'s view, or a null pointer (the kernels' "no gradient so far").
    fn acc_arg<'a, T: CudaDType>(
        s: &'a [(&CudaStorage, &Layout)],
        i: usize,
    ) -> Result<Option<candle_core::cuda::cudarc::driver::CudaView<'a, T>>> {
        s.get(i).map(|(st, l)| view::<T>(st, l)).transpose()
    }

    fn rms_norm_bwd_t<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        rstd: &Tensor,
        acc: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = w.elem_count();
        let m = x.elem_count() / h.max(1);
        let mut ts = vec![x, w, dy, rstd];
        ts.extend(acc);
        let dx = with(&ts, |s| {
            let dev = device(s[0].0);
            let (xv, wv, dyv) = (view::<T>(s[0].0, s[0].1)?, view::<T>(s[1].0, s[1].1)?, view::<T>(s[2].0, s[2].1)?);
            let rv = view::<f32>(s[3].0, s[3].1)?;
            let av = acc_arg::<T>(s, 4)?;
            let null = 0u64;
            // SAFETY: the kernel writes every element.
            let mut dx = unsafe { dev.alloc::<T>(m * h)? };
            let f = func(&dev, MODULE, FUSED_BIN, "rmsnorm_bwd", x.dtype())?;
            let stream = dev.cuda_stream();
            let hi = h as i32;
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&dyv).arg(&rv);
            match &av {
                Some(a) => b.arg(a),
                None => b.arg(&null),
            };
            b.arg(&mut dx).arg(&hi);
            // SAFETY: argument types and order match rmsnorm_bwd_* in kernels/fused.cu
            // (acc: a device pointer or null).
            unsafe { b.launch(grid(m, 1, norm_threads(h))) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev))
        })?;
        Ok(tensor(dx, x.shape().clone()))
    }

    /// dx and the weight's gradient (in w's dtype) of RMSNorm in one pass
    /// (rmsnorm_bwd_dw: partial column sums a block, then colsum); None
    /// where a row is too long for its registers (more than 32 values a
    /// thread): the caller takes the two passes.
    pub fn rms_norm_with_dw(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        rstd: &Tensor,
        acc: Option<&Tensor>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        by_dtype!(x.dtype(), rms_norm_with_dw_t, x, w, dy, rstd, acc)
    }

    fn rms_norm_with_dw_t<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        rstd: &Tensor,
        acc: Option<&Tensor>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let h = w.elem_count();
        let m = x.elem_count() / h.max(1);
        let threads = norm_threads(h);
        let ch = match h.div_ceil(8).div_ceil(threads as usize) {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => return Ok(None),
        };
        let mut ts = vec![x, w, dy, rstd];
        ts.extend(acc);
        let (dx, dw) = with(&ts, |s| {
            let dev = device(s[0].0);
            let (xv, wv, dyv) = (view::<T>(s[0].0, s[0].1)?, view::<T>(s[1].0, s[1].1)?, view::<T>(s[2].0, s[2].1)?);
            let rv = view::<f32>(s[3].0, s[3].1)?;
            let av = acc_arg::<T>(s, 4)?;
            let null = 0u64;
            let f = func(&dev, MODULE, FUSED_BIN, &format!("rmsnorm_bwd_dw{ch}"), x.dtype())?;
            // One wave of blocks, as many as the SMs hold, each walking its
            // share of the rows.
            let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(threads, 0, None).w()?.max(1) as usize;
            let nb = m.clamp(1, sm_count(&dev)? * per_sm);
            // SAFETY: the kernels write every element of the three.
            let mut dx = unsafe { dev.alloc::<T>(m * h)? };
            let mut part = unsafe { dev.alloc::<f32>(nb * h)? };
            let mut dw = unsafe { dev.alloc::<T>(h)? };
            let stream = dev.cuda_stream();
            let (mi, hi, nbi) = (m as i32, h as i32, nb as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&dyv).arg(&rv);
            match &av {
                Some(a) => b.arg(a),
                None => b.arg(&null),
            };
            b.arg(&mut dx).arg(&mut part).arg(&mi).arg(&hi);
            // SAFETY: argument types and order match rmsnorm_bwd_dw*_* in
            // kernels/fused.cu (acc: a device pointer or null); 8 ch threads >= h.
            unsafe { b.launch(grid(nb, 1, threads)) }.w()?;
            let f = func(&dev, MODULE, FUSED_BIN, "colsum", x.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&part).arg(&mut dw).arg(&nbi).arg(&hi);
            // SAFETY: argument types and order match colsum_* in kernels/fused.cu
            // (32 columns a block of 256).
            unsafe { b.launch(grid(h.div_ceil(32), 1, 256)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), CudaStorage::wrap_cuda_slice(dw, dev)))
        })?;
        Ok(Some((tensor(dx, x.shape().clone()), tensor(dw, w.shape().clone()))))
    }

    /// The weight's gradient of RMSNorm, (h) f32: rmsnorm_dw's per-block
    /// column sums, then their sum.
    pub fn rms_norm_dw(x: &Tensor, dy: &Tensor, rstd: &Tensor) -> Result<Tensor> {
        by_dtype!(x.dtype(), rms_norm_dw_t, x, dy, rstd)
    }

    fn rms_norm_dw_t<T: CudaDType + DeviceRepr>(x: &Tensor, dy: &Tensor, rstd: &Tensor) -> Result<Tensor> {
        let m = rstd.elem_count();
        let h = x.elem_count() / m.max(1);
        let nb = m.clamp(1, 264);
        // Row lanes per block of 256 threads (rmsnorm_dw in kernels/fused.cu).
        let lanes = (256 / h.div_ceil(8).max(1)).max(1);
        let rows = nb * lanes;
        let part = with(&[x, dy, rstd], |s| {
            let dev = device(s[0].0);
            let (xv, dyv) = (view::<T>(s[0].0, s[0].1)?, view::<T>(s[1].0, s[1].1)?);
            let rv = view::<f32>(s[2].0, s[2].1)?;
            // SAFETY: the kernel writes every element.
            let mut part = unsafe { dev.alloc::<f32>(rows * h)? };
            let f = func(&dev, MODULE, FUSED_BIN, "rmsnorm_dw", x.dtype())?;
            let stream = dev.cuda_stream();
            let (mi, hi) = (m as i32, h as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&dyv).arg(&rv).arg(&mut part).arg(&mi).arg(&hi);
            // SAFETY: argument types and order match rmsnorm_dw_* in kernels/fused.cu.
            unsafe { b.launch(grid(nb, 1, 256)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(part, dev))
        })?;
        tensor(part, (rows, h)).sum(0)
    }

    pub(super) fn rope(
        sign: f32,
        rot: usize,
        x: (&CudaStorage, &Layout),
        c: (&CudaStorage, &Layout),
        s: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        by_dtype!(x.0.dtype(), rope_k, sign, rot, x, c, s)
    }

    fn rope_k<T: CudaDType + DeviceRepr>(
        sign: f32,
        rot: usize,
        (xs, xl): (&CudaStorage, &Layout),
        (cs, cl): (&CudaStorage, &Layout),
        (ss, sl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = device(xs);
        let (n, heads, d) = xl.shape().dims3()?;
        let (x, c, s) = (view::<T>(xs, xl)?, view::<T>(cs, cl)?, view::<T>(ss, sl)?);
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { dev.alloc::<T>(n * heads * d)? };
        let f = func(&dev, MODULE, FUSED_BIN, "rope", xs.dtype())?;
        let stream = dev.cuda_stream();
        let (ni, hi, di, ri) = (n as i32, heads as i32, d as i32, rot as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&c).arg(&s).arg(&mut y).arg(&ni).arg(&hi).arg(&di).arg(&sign).arg(&ri);
        // A thread a pair, or 8 (d / 2 a multiple of 8: the kernel's 16-byte path).
        let items = if (d / 2) % 8 == 0 { n * heads * d / 16 } else { n * heads * d / 2 };
        // SAFETY: argument types and order match rope_* in kernels/fused.cu.
        unsafe { b.launch(grid(blocks(items), 1, 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    pub fn rope_t(dy: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Tensor> {
        let out = with(&[dy, cos, sin], |s| rope(-1.0, rot, s[0], s[1], s[2]))?;
        Ok(tensor(out, dy.shape().clone()))
    }

    pub(super) fn dropout_values(
        shape: &candle_core::Shape,
        dtype: candle_core::DType,
        dev: &candle_core::CudaDevice,
        p: f64,
        seed: u64,
    ) -> Result<Tensor> {
        by_dtype!(dtype, dropout_values_t, shape, dtype, dev, p, seed)
    }

    fn dropout_values_t<T: CudaDType + DeviceRepr>(
        shape: &candle_core::Shape,
        dtype: candle_core::DType,
        dev: &candle_core::CudaDevice,
        p: f64,
        seed: u64,
    ) -> Result<Tensor> {
        let n = shape.elem_count();
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let f = func(dev, MODULE, FUSED_BIN, "dropout_mask", dtype)?;
        // p in [0, 1) (the train stage checks it): below 2^32.
        let thr = (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
        let keep = crate::nn::ops::dropout_keep(p) as f32;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&mut y).arg(&n).arg(&seed).arg(&thr).arg(&keep);
        // SAFETY: argument types and order match dropout_mask_* in kernels/fused.cu.
        unsafe { lb.launch(grid(blocks(n), 1, 256)) }.w()?;
        Ok(tensor(CudaStorage::wrap_cuda_slice(y, dev.clone()), shape.clone()))
    }

    pub(super) fn add(a: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
        by_dtype!(a.0.dtype(), map2_t, "add_vec", a, b)
    }

    pub(super) fn swiglu_fwd(g: (&CudaStorage, &Layout), u: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
        by_dtype!(g.0.dtype(), map2_t, "swiglu_fwd", g, u)
    }

    /// y = f(a, b) element by element through one of fused.cu's `map2`
    /// kernels, `what` (add_vec, swiglu_fwd: `(a, b, y, n)`).
    fn map2_t<T: CudaDType + DeviceRepr>(
        what: &str,
        (as_, al): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = device(as_);
        let n = al.shape().elem_count();
        let (a, b) = (view::<T>(as_, al)?, view::<T>(bs, bl)?);
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let f = func(&dev, MODULE, FUSED_BIN, what, as_.dtype())?;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&a).arg(&b).arg(&mut y).arg(&n);
        // SAFETY: argument types and order match add_vec_* and swiglu_fwd_*
        // in kernels/fused.cu. Eight elements a thread.
        unsafe { lb.launch(grid(blocks(n.div_ceil(8)), 1, 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    pub fn swiglu(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        by_dtype!(g.dtype(), swiglu_bwd_t, g, u, dy)
    }

    pub(super) fn ce_grad(x: (&mut CudaStorage, &Layout), t: (&CudaStorage, &Layout), gs: f32) -> Result<Tensor> {
        by_dtype!(x.0.dtype(), ce_grad_t, x, t, gs)
    }

    fn ce_grad_t<T: CudaDType + DeviceRepr>(
        (xs, xl): (&mut CudaStorage, &Layout),
        (ts, tl): (&CudaStorage, &Layout),
        gs: f32,
    ) -> Result<Tensor> {
        let dev = device(xs);
        let dt = xs.dtype();
        let (m, v) = xl.shape().dims2()?;
        let t = view::<u32>(ts, tl)?;
        let Some((a, b)) = xl.contiguous_offsets() else {
            candle_core::bail!("fused cross-entropy: non-contiguous logits")
        };
        let mut x = xs.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        // SAFETY: the kernel writes every element.
        let mut loss = unsafe { dev.alloc::<f32>(m)? };
        let f = func(&dev, MODULE, FUSED_BIN, "ce_grad", dt)?;
        let stream = dev.cuda_stream();
        let vi = v as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut x).arg(&t).arg(&mut loss).arg(&vi).arg(&gs);
        // SAFETY: argument types and order match ce_grad_* in kernels/fused.cu.
        unsafe { b.launch(grid(m, 1, 512)) }.w()?;
        Ok(tensor(CudaStorage::wrap_cuda_slice(loss, dev), m))
    }

    pub(super) fn gather_rows(t: (&CudaStorage, &Layout), ids: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
        by_dtype!(t.0.dtype(), gather_rows_t, t, ids)
    }

    fn gather_rows_t<T: CudaDType + DeviceRepr>(
        (ts, tl): (&CudaStorage, &Layout),
        (is, il): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = device(ts);
        let (_, d) = tl.shape().dims2()?;
        let n = il.shape().elem_count();
        let (t, ids) = (view::<T>(ts, tl)?, view::<u32>(is, il)?);
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(n * d)? };
        let f = func(&dev, MODULE, FUSED_BIN, "gather_rows", ts.dtype())?;
        let stream = dev.cuda_stream();
        let di = d as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&t).arg(&ids).arg(&mut out).arg(&di);
        // SAFETY: argument types and order match gather_rows_* in kernels/fused.cu.
        unsafe { b.launch(grid(n, 1, 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn segment_add(
        dt: (&mut CudaStorage, &Layout),
        g: (&CudaStorage, &Layout),
        seg: (&CudaStorage, &Layout),
        nseg: usize,
    ) -> Result<()> {
        by_dtype!(g.0.dtype(), segment_add_t, dt, g, seg, nseg)
    }

    fn segment_add_t<T: CudaDType + DeviceRepr>(
        (ds, dl): (&mut CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
        (ss, sl): (&CudaStorage, &Layout),
        nseg: usize,
    ) -> Result<()> {
        let dev = device(gs);
        let (_, d) = dl.shape().dims2()?;
        if gl.shape().dims2()?.1 != d || ds.dtype() != gs.dtype() {
            candle_core::bail!("segment-add: gradient {:?} {:?} for a table {:?}", gl.dims(), gs.dtype(), dl.dims());
        }
        let (g, seg) = (view::<T>(gs, gl)?, view::<u32>(ss, sl)?);
        let Some((a, b)) = dl.contiguous_offsets() else { candle_core::bail!("segment-add: non-contiguous table") };
        let mut dt = ds.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        let f = func(&dev, MODULE, FUSED_BIN, "segment_add", gs.dtype())?;
        let stream = dev.cuda_stream();
        let (ni, di) = (nseg as i32, d as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut dt).arg(&g).arg(&seg).arg(&ni).arg(&di);
        // SAFETY: argument types and order match segment_add_* in
        // kernels/fused.cu; seg holds nseg segments over g's rows, whose ids
        // are rows of dt (the batch checked them against the vocabulary).
        unsafe { b.launch(grid(nseg, 1, 256)) }.w()?;
        Ok(())
    }

    fn swiglu_bwd_t<T: CudaDType + DeviceRepr>(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = g.elem_count();
        let (dg, du) = with(&[g, u, dy], |s| {
            let dev = device(s[0].0);
            let (gv, uv, dyv) = (view::<T>(s[0].0, s[0].1)?, view::<T>(s[1].0, s[1].1)?, view::<T>(s[2].0, s[2].1)?);
            // SAFETY: the kernel writes every element of both.
            let mut dg = unsafe { dev.alloc::<T>(n)? };
            let mut du = unsafe { dev.alloc::<T>(n)? };
            let f = func(&dev, MODULE, FUSED_BIN, "swiglu_bwd", g.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&gv).arg(&uv).arg(&dyv).arg(&mut dg).arg(&mut du).arg(&n);
            // SAFETY: argument types and order match swiglu_bwd_* in kernels/fused.cu.
            // Eight elements a thread.
            unsafe { b.launch(grid(blocks(n.div_ceil(8)), 1, 256)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dg, dev.clone()), CudaStorage::wrap_cuda_slice(du, dev)))
        })?;
        Ok((tensor(dg, g.shape().clone()), tensor(du, u.shape().clone())))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::nn::ops;
    use crate::nn::tests::rel_err;

    /// The residual add: candle's add on the CPU; on CUDA the same sums as
    /// candle's (f32 exactly), 16 bytes a thread or (an odd size at an
    /// unaligned offset) one at a time, and a tensor used twice gets its
    /// two gradients summed through the same kernel (the accumulate hook).
    #[test]
    fn fused_add_and_gradient_sums_match_candle() -> Result<()> {
        let cpu = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (37, 70), &cpu)?;
        let b = Tensor::randn(0f32, 1.0, (37, 70), &cpu)?;
        let d = (add(&a, &b)? - (&a + &b)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        assert!(add(&a, &b.narrow(0, 0, 5)?).is_err(), "shapes must match");
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        install_grad_add();
        for dt in [DType::F32, DType::BF16] {
            let (ag, bg) = (a.to_dtype(dt)?.to_device(&dev)?, b.to_dtype(dt)?.to_device(&dev)?);
            for (x, y) in [(ag.clone(), bg.clone()), (ag.narrow(0, 1, 35)?, bg.narrow(0, 2, 35)?)] {
                let want = (&x + &y)?.to_dtype(DType::F64)?;
                let got = add(&x, &y)?.to_dtype(DType::F64)?;
                let e = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(e <= if dt == DType::F32 { 0.0 } else { 1e-2 }, "{dt:?} {:?}: off by {e}", x.dims());
            }
            let v = Var::from_tensor(&ag)?;
            let dy = bg.clone();
            let g = ops::backward_from(&add(v.as_tensor(), v.as_tensor())?, &dy)?;
            let got = g.get(v.as_tensor()).expect("a gradient").to_dtype(DType::F64)?;
            let want = (&dy + &dy)?.to_dtype(DType::F64)?;
            let e = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(e, 0.0, "{dt:?}: the summed gradient");
        }
        Ok(())
    }

    #[test]
    fn the_fused_kernels_are_cuda_only() -> Result<()> {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        assert!(!usable(&x) && usable_or_cpu(&x));
        let w = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        let x64 = x.to_dtype(DType::F64)?;
        assert!(!usable_or_cpu(&x64), "f64 on the CPU keeps the composition");
        let err = rms_norm(&x64, &w.to_dtype(DType::F64)?, 1e-5).unwrap_err().to_string();
        assert!(err.contains("CUDA only"), "{err}");
        assert!(swiglu(&x64, &x64).unwrap_err().to_string().contains("CUDA only"));
        assert!(rms_norm(&x, &Tensor::ones(3, DType::F32, &Device::Cpu)?, 1e-5).is_err(), "weight of the wrong size");
        assert!(swiglu(&x, &w).is_err(), "shapes differ");
        let t = Tensor::zeros(2, DType::U32, &Device::Cpu)?;
        assert!(cross_entropy_grad_in_place(&x, &t, 1.0).unwrap_err().to_string().contains("CUDA only"));
        assert!(cross_entropy_grad_in_place(&x, &t.to_dtype(DType::F32)?, 1.0).is_err(), "f32 targets");
        assert!(
            cross_entropy_grad_in_place(&x, &Tensor::zeros(3, DType::U32, &Device::Cpu)?, 1.0).is_err(),
            "3 targets"
        );
        assert!(cross_entropy_grad_in_place(&x.t()?, &t, 1.0).is_err(), "non-contiguous logits");
        Ok(())
    }

    /// The segments of a batch's ids: distinct ids in order, each one's
    /// positions in order; on the CPU a gather is `index_select` (and fails
    /// as it does on an id past the table).
    #[test]
    fn row_gather_segments_ids_and_gathers_rows() -> Result<()> {
        let (seg, nseg) = segments(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(nseg, 3);
        assert_eq!(seg, [0, 1, 3, 6, 0, 2, 5, 3, 1, 4, 0, 2, 5]);
        assert_eq!(segments(&[]), (vec![0], 0));
        let cpu = Device::Cpu;
        // Sorted on a thread of their own, uploaded once, at the first get.
        let lazy = Segments::new(&[5, 2, 5, 0, 2, 5], &cpu);
        for _ in 0..2 {
            let (t, n) = lazy.get()?;
            assert_eq!((t.to_vec1::<u32>()?, n), (seg.clone(), nseg));
        }
        let t = Tensor::arange(0f32, 18.0, &cpu)?.reshape((6, 3))?;
        let g = RowGather::new(vec![5, 2, 5, 0], &cpu)?;
        let want = t.index_select(&Tensor::new(&[5u32, 2, 5, 0], &cpu)?, 0)?;
        assert_eq!(g.gather(&t)?.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        assert!(g.gather(&t.narrow(0, 0, 5)?).is_err(), "id 5 of a 5-row table");
        Ok(())
    }

    /// The CUDA gather and its per-id backward against `index_select` and
    /// its `index_add` backward (f64 on the CPU), f32 and bf16, widths with
    /// and without 16-byte rows, ids repeated (an embedding) and distinct.
    /// Run on the GPU machine; skipped elsewhere.
    #[test]
    fn row_gather_matches_index_select_on_cuda() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        let cpu = Device::Cpu;
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 8e-3)] {
            for (v, d) in [(300, 64), (97, 70), (1000, 2048)] {
                for ids in [
                    (0..700u32).map(|i| (i * i + 3 * i) % v as u32 % 41).collect::<Vec<_>>(),
                    (0..v as u32).rev().step_by(3).collect(),
                ] {
                    let n = ids.len();
                    let table = Tensor::randn(0f64, 1.0, (v, d), &cpu)?.to_dtype(dt)?;
                    let dy = Tensor::randn(0f64, 1.0, (n, d), &cpu)?.to_dtype(dt)?;
                    let idx = Tensor::from_vec(ids.clone(), n, &cpu)?;
                    let t64 = Var::from_tensor(&table.to_dtype(DType::F64)?)?;
                    let y64 = t64.as_tensor().index_select(&idx, 0)?;
                    let want = ops::backward_from(&y64, &dy.to_dtype(DType::F64)?)?;
                    let want = want.get(t64.as_tensor()).expect("a gradient").clone();
                    let tv = Var::from_tensor(&table.to_device(&dev)?)?;
                    let g = RowGather::new(ids, &dev)?;
                    let y = g.gather(tv.as_tensor())?;
                    assert_eq!(y.dims(), [n, d]);
                    let e = rel_err(&y, &y64)?;
                    assert!(e == 0.0, "gather {dt:?} {v}x{d}: off by {e}");
                    let got = ops::backward_from(&y, &dy.to_device(&dev)?)?;
                    let got = got.get(tv.as_tensor()).expect("a gradient");
                    assert_eq!(got.dtype(), dt);
                    let e = rel_err(got, &want)?;
                    assert!(e < tol, "backward {dt:?} {v}x{d} {n} ids: off by {e}");
                }
            }
        }
        Ok(())
    }

    /// RMSNorm and SwiGLU as one op each on the CPU (f32): the composition's
    /// forward values, and its gradients (computed in f64) to f32 rounding.
    #[test]
    fn cpu_rms_norm_and_swiglu_match_the_compositions() -> Result<()> {
        let cpu = Device::Cpu;
        let (n, h) = (9, 48);
        let var = |shape: &[usize], lo: f64| -> Result<(Var, Var)> {
            let t = (Tensor::rand(lo, 1.0, shape, &cpu)? * 2.0)?.to_dtype(DType::F32)?;
            Ok((Var::from_tensor(&t)?, Var::from_tensor(&t.to_dtype(DType::F64)?)?))
        };
        let (x, x64) = var(&[n, h], -1.0)?;
        let (w, w64) = var(&[h], 0.0)?;
        let dy = Tensor::randn(0f64, 1.0, (n, h), &cpu)?;
        let got = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let plain32 = {
            let inv = ops::rms_inv(x.as_tensor(), 1e-5)?;
            x.as_tensor().broadcast_mul(&inv)?.broadcast_mul(w.as_tensor())?
        };
        assert_eq!(rel_err(&got, &plain32)?, 0.0, "the forward is the composition's, op for op");
        let want = ops::rms_norm(x64.as_tensor(), w64.as_tensor(), 1e-5)?;
        let gg = (got.to_dtype(DType::F64)? * &dy)?.sum_all()?.backward()?;
        let gw = (&want * &dy)?.sum_all()?.backward()?;
        for (name, a, b) in [("dx", &x, &x64), ("dw", &w, &w64)] {
            let e = rel_err(gg.get(a.as_tensor()).expect(name), gw.get(b.as_tensor()).expect(name))?;
            assert!(e < 1e-5, "rms_norm {name}: off by {e}");
        }
        // SwiGLU: a small case and one of 210k elements (the parallel
        // chunks); the values and the f32 gradients are the composition's
        // exactly (one pass computing each element as its ops do).
        for (n, h) in [(n, h), (300, 700)] {
            let (g, g64) = var(&[n, h], -12.0)?;
            let (u, u64_) = var(&[n, h], -1.0)?;
            let dy = Tensor::randn(0f64, 1.0, (n, h), &cpu)?;
            let got = swiglu(g.as_tensor(), u.as_tensor())?;
            let plain = (g.as_tensor().silu()? * u.as_tensor())?;
            assert_eq!(rel_err(&got, &plain)?, 0.0);
            let dy32 = dy.to_dtype(DType::F32)?;
            let gg = (&got * &dy32)?.sum_all()?.backward()?;
            let (dg, du) = super::cpu_backward::swiglu_composed(g.as_tensor(), u.as_tensor(), &dy32)?;
            for (name, a, want) in [("dg", &g, &dg), ("du", &u, &du)] {
                let e = rel_err(gg.get(a.as_tensor()).expect(name), want)?;
                assert_eq!(e, 0.0, "swiglu {name} ({n} x {h}): the f32 composition's");
            }
            let want = (g64.as_tensor().silu()? * u64_.as_tensor())?;
            let gg = (got.to_dtype(DType::F64)? * &dy)?.sum_all()?.backward()?;
            let gw = (&want * &dy)?.sum_all()?.backward()?;
            for (name, a, b) in [("dg", &g, &g64), ("du", &u, &u64_)] {
                let e = rel_err(gg.get(a.as_tensor()).expect(name), gw.get(b.as_tensor()).expect(name))?;
                assert!(e < 1e-5, "swiglu {name}: off by {e}");
            }
        }
        Ok(())
    }

    /// The cross-entropy kernel against the composition in f64 on the CPU
    /// (logsumexp - picked; softmax - onehot), from the same rounded logits,
    /// f32 and bf16, vocabularies smaller and larger than a block. Run on
    /// the GPU machine; skipped elsewhere.
    #[test]
    fn fused_cross_entropy_matches_the_composition_on_cuda() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        let cpu = Device::Cpu;
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            for (m, v) in [(37, 300), (9, 5003), (4, 49_152)] {
                let x = (Tensor::randn(0f64, 3.0, (m, v), &cpu)?).to_dtype(dt)?;
                let t = Tensor::from_vec((0..m as u32).map(|i| (i * 7919) % v as u32).collect::<Vec<_>>(), m, &cpu)?;
                let xc = x.to_dtype(DType::F64)?;
                let lse = xc.exp()?.sum_keepdim(1)?.log()?;
                let want_loss = (lse.squeeze(1)? - xc.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?)?;
                let onehot = Tensor::zeros((m, v), DType::F64, &cpu)?.scatter_add(
                    &t.unsqueeze(1)?,
                    &Tensor::ones((m, 1), DType::F64, &cpu)?,
                    1,
                )?;
                // The gradient made for the loss's scale (here 1/m).
                let gs = 1.0 / m as f64;
                let want_grad = ((xc.broadcast_sub(&lse)?.exp()? - onehot)? * gs)?;
                let xg = x.to_device(&dev)?;
                let loss = cross_entropy_grad_in_place(&xg, &t.to_device(&dev)?, gs as f32)?;
                let e = rel_err(&loss, &want_loss)?;
                assert!(e < 1e-5, "loss {dt:?} {m}x{v}: off by {e}");
                let e = rel_err(&xg, &want_grad)?;
                assert!(e < tol, "gradient {dt:?} {m}x{v}: off by {e}");
            }
        }
        Ok(())
    }

    /// Each kernel and its backward against the composition in f64 on the
    /// CPU, from the same (rounded) inputs, f32 and bf16. Run on the GPU
    /// machine; skipped elsewhere.
    #[test]
    fn fused_kernels_match_the_compositions_on_cuda() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        let cpu = Device::Cpu;
        let (n, heads, d, h) = (37, 3, 64, 576);
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let var = |shape: &[usize], lo: f64| -> Result<(Var, Var)> {
                let t = (Tensor::rand(lo, 1.0, shape, &cpu)? * 2.0)?.to_dtype(dt)?.to_device(&dev)?;
                let g = Var::from_tensor(&t)?;
                let c = Var::from_tensor(&t.to_device(&cpu)?.to_dtype(DType::F64)?)?;
                Ok((g, c))
            };
            let check = |what: &str, got: &Tensor, want: &Tensor, t: f64| -> Result<()> {
                let e = rel_err(got, want)?;
                assert!(e < t, "{what} {dt:?}: off by {e}");
                Ok(())
            };
            // The gradients of sum(out * dy) for each (name, GPU var, CPU
            // var), from the kernel's output and the composition's.
            let grads_match = |got: &Tensor, want: &Tensor, dy: &Tensor, vars: &[(&str, &Var, &Var)]| -> Result<()> {
                let gw = (want * dy)?.sum_all()?.backward()?;
                let gg =
                    (got.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?.to_device(&dev)?)?.sum_all()?.backward()?;
                for (name, a, b) in vars {
                    let (Some(ga), Some(gb)) = (gg.get(a.as_tensor()), gw.get(b.as_tensor())) else {
                        panic!("no {name}")
                    };
                    check(name, ga, gb, tol * 2.0)?;
                }
                Ok(())
            };
            // RMSNorm, trainable weight (dx and dw in one pass): rows of 576
            // go 8 values a thread, rows of 13 one at a time; rows of 3,000
            // and 6,144 take 2 and 4 chunks of 8 a thread, rows of 10,001
            // are too long for that (two passes).
            for hh in [h, 13, 3000, 6144, 10_001] {
                let (xg, xc) = var(&[n, hh], -1.0)?;
                let (wg, wc) = var(&[hh], 0.0)?;
                let dy = Tensor::randn(0f64, 1.0, (n, hh), &cpu)?;
                let want = ops::rms_norm(xc.as_tensor(), wc.as_tensor(), 1e-5)?;
                let got = rms_norm(xg.as_tensor(), wg.as_tensor(), 1e-5)?;
                check("rms_norm", &got, &want, tol)?;
                grads_match(&got, &want, &dy, &[("rms_norm dx", &xg, &xc), ("rms_norm dw", &wg, &wc)])?;
            }
            // A residual around the norm: x's gradient from the add comes
            // first, and the norm's kernel adds its own to it (one pass and
            // two, the latter with a frozen weight).
            for hh in [h, 13] {
                let (xg, xc) = var(&[n, hh], -1.0)?;
                let (wg, wc) = var(&[hh], 0.0)?;
                let dy = Tensor::randn(0f64, 1.0, (n, hh), &cpu)?;
                let want = (xc.as_tensor() + (ops::rms_norm(xc.as_tensor(), wc.as_tensor(), 1e-5)? * 3.0)?)?;
                let got = (xg.as_tensor() + (rms_norm(xg.as_tensor(), wg.as_tensor(), 1e-5)? * 3.0)?)?;
                grads_match(&got, &want, &dy, &[("residual + rms_norm dx", &xg, &xc), ("dw", &wg, &wc)])?;
                let frozen = wg.as_tensor().detach();
                let got = (xg.as_tensor() + (rms_norm(xg.as_tensor(), &frozen, 1e-5)? * 3.0)?)?;
                grads_match(&got, &want, &dy, &[("residual + rms_norm (frozen weight) dx", &xg, &xc)])?;
            }
            // More rows than the weight-gradient kernels have blocks (264 for
            // the two passes; 4 an SM for rows of 2,048 in one pass).
            for (rows, hh) in [(600, 96), (1500, 2048)] {
                let (xg, xc) = var(&[rows, hh], -1.0)?;
                let (wg, wc) = var(&[hh], 0.0)?;
                let dy = Tensor::randn(0f64, 1.0, (rows, hh), &cpu)?;
                let want = ops::rms_norm(xc.as_tensor(), wc.as_tensor(), 1e-5)?;
                let got = rms_norm(xg.as_tensor(), wg.as_tensor(), 1e-5)?;
                let what = format!("rms_norm dx and dw, {rows} rows of {hh}");
                grads_match(&got, &want, &dy, &[(&what, &xg, &xc), (&what, &wg, &wc)])?;
            }
            // RoPE (cos/sin of real angles): head dim 64 goes 8 pairs a
            // thread, 12 a pair at a time.
            for d in [d, 12] {
                let (xg, xc) = var(&[n, heads, d], -1.0)?;
                let ang = Tensor::rand(0f64, 6.0, (n, d / 2), &cpu)?;
                let (cos, sin) = (ang.cos()?, ang.sin()?);
                let on = |t: &Tensor| t.to_dtype(dt)?.to_device(&dev);
                let back = |t: &Tensor| t.to_dtype(dt)?.to_dtype(DType::F64);
                let want = ops::rope(xc.as_tensor(), &back(&cos)?, &back(&sin)?)?;
                let got = rope(xg.as_tensor(), &on(&cos)?, &on(&sin)?)?;
                check(&format!("rope d {d}"), &got, &want, tol)?;
                let dy = Tensor::randn(0f64, 1.0, (n, heads, d), &cpu)?;
                grads_match(&got, &want, &dy, &[("rope dx", &xg, &xc)])?;
                // The first 2 heads rotated, the last passed through
                // (packed q, k, v), both ways.
                let got = rope_heads(xg.as_tensor(), &on(&cos)?, &on(&sin)?, 2)?;
                let want = Tensor::cat(
                    &[&ops::rope(&xc.narrow(1, 0, 2)?, &back(&cos)?, &back(&sin)?)?, &xc.narrow(1, 2, 1)?],
                    1,
                )?;
                check(&format!("rope 2 of 3 heads, d {d}"), &got, &want, tol)?;
                grads_match(&got, &want, &dy, &[("rope 2 of 3 heads dx", &xg, &xc)])?;
                assert!(rope_heads(xg.as_tensor(), &on(&cos)?, &on(&sin)?, 4).is_err(), "4 of 3 heads");
            }
            // SwiGLU: 8 elements a thread, and (5 x 13) one at a time.
            for (r, c) in [(n, h), (5, 13)] {
                let (gv, gc) = var(&[r, c], -3.0)?;
                let (ug, uc) = var(&[r, c], -1.0)?;
                let want = (gc.as_tensor().silu()? * uc.as_tensor())?;
                let got = swiglu(gv.as_tensor(), ug.as_tensor())?;
                check("swiglu", &got, &want, tol)?;
                let dy = Tensor::randn(0f64, 1.0, (r, c), &cpu)?;
                grads_match(&got, &want, &dy, &[("swiglu dg", &gv, &gc), ("swiglu du", &ug, &uc)])?;
            }
        }
        Ok(())
    }
}
