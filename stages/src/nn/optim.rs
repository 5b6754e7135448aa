//! AdamW with f32 moments (whatever the parameter dtype), decoupled weight
//! decay skipped for biases and norm weights (1-D parameters, as the HF
//! Trainer groups them), global-norm gradient clipping, and the HF
//! learning-rate schedules with warmup.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::nn::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// As `transformers`' `constant`: warmup is ignored.
    Constant,
    #[serde(rename = "constant_with_warmup")]
    ConstantWithWarmup,
    Linear,
    Cosine,
}

/// Learning rate at `step` (0-based optimizer step), as `transformers`'
/// `get_{constant,linear,cosine}_schedule_with_warmup`.
pub fn lr_at(schedule: Schedule, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if schedule == Schedule::Constant {
        return base;
    }
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let rest = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / rest;
    match schedule {
        Schedule::Constant | Schedule::ConstantWithWarmup => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    /// f32 master copy when the parameter is stored in a lower precision.
    pub master: Option<Tensor>,
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub params: Vec<Param>,
    /// Optimizer steps taken.
    pub t: usize,
    /// Whether [`Self::clip_and_step`] runs the CUDA kernels (kernels/optim.cu:
    /// one launch for the norm and one for the update of all the parameters
    /// of a dtype) instead of
    /// the composition: every parameter on CUDA in f32 or bf16, and not
    /// turned off with `PIPE_FUSED_KERNELS=0`.
    pub fused: bool,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = var.rank() > 1;
                let sdt = state_dtype(var.dtype());
                let master = if var.dtype() == sdt { None } else { Some(var.to_dtype(sdt)?) };
                let m = Tensor::zeros(var.shape(), sdt, var.device())?;
                let v = Tensor::zeros(var.shape(), sdt, var.device())?;
                Ok(Param { name, var, decay, master, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        let fused = !params.is_empty() && params.iter().all(|p| crate::nn::fused::usable(p.var.as_tensor()));
        Ok(AdamW { cfg, params, t: 0, fused })
    }

    /// Bytes of optimizer state held: moments and f32 master copies.
    pub fn state_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.params.iter().map(|p| bytes(&p.m) + bytes(&p.v) + p.master.as_ref().map_or(0, bytes)).sum()
    }

    /// The step of a training loop: `grads[i]` for `params[i]` (None: the
    /// batch did not reach it, a zero gradient), clipped to global norm
    /// `max_norm` (0: no clipping), then [`Self::step`]. Returns the norm
    /// before clipping.
    pub fn clip_and_step(&mut self, grads: Vec<Option<Tensor>>, max_norm: f64, lr: f64) -> Result<f64> {
        let present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
        #[cfg(feature = "cuda")]
        if self.fused && !present.is_empty() && present.iter().all(crate::nn::fused::usable) {
            // The norm stays on the device for the update's kernel, which
            // computes the clipping factor itself: the host reads the norm
            // once the update is queued, not between the two kernels.
            let sumsq = cuda::sum_squares_on_device(&present)?;
            drop(present);
            let grads = self.dense_grads(grads)?;
            self.fused_step(grads, cuda::Clip::Norm { sumsq: &sumsq, max_norm }, lr)?;
            return Ok(cuda::read_sum(&sumsq)?.sqrt());
        }
        let norm = global_norm(&present)?;
        drop(present);
        self.step_with_norm(grads, norm, max_norm, lr)?;
        Ok(norm)
    }

    /// Each parameter's gradient, zeros where the batch did not reach it.
    fn dense_grads(&self, grads: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        Ok(grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| g.map_or_else(|| p.var.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?)
    }

    /// [`Self::clip_and_step`] for gradients whose global norm `norm` is
    /// known (with sharded optimizer state, the norm over every replica's
    /// gradients, not only the ones this optimizer steps).
    pub fn step_with_norm(&mut self, grads: Vec<Option<Tensor>>, norm: f64, max_norm: f64, lr: f64) -> Result<()> {
        let mut grads = self.dense_grads(grads)?;
        if self.fused {
            #[cfg(feature = "cuda")]
            return self.fused_step(grads, cuda::Clip::Factor(clip_scale(norm, max_norm).unwrap_or(1.0) as f32), lr);
            #[cfg(not(feature = "cuda"))]
            return Ok(crate::nn::fused::cuda_only("fused AdamW")?);
        }
        clip(&mut grads, norm, max_norm)?;
        self.step(&grads, lr)
    }

    /// One update with gradients `grads[i]` for `params[i]` (already
    /// averaged and clipped).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let sdt = p.m.dtype();
            let g = g.to_dtype(sdt)?;
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let w = match &p.master {
                Some(m) => m.clone(),
                None => p.var.as_tensor().clone(),
            };
            // torch.optim.AdamW: decay first, then the Adam step.
            let w = if p.decay && c.weight_decay > 0.0 { (&w * (1.0 - lr * c.weight_decay))? } else { w };
            let denom = ((&p.v / bc2)?.sqrt()? + c.eps)?;
            let upd = ((&p.m / bc1)? / denom)?;
            let w = (w - (upd * lr)?)?;
            match &mut p.master {
                Some(m) => {
                    p.var.set(&w.to_dtype(p.var.dtype())?)?;
                    *m = w;
                }
                None => p.var.set(&w)?,
            }
        }
        Ok(())
    }
}

impl AdamW {
    #[cfg(feature = "cuda")]
    /// The update on CUDA, the gradients scaled by `clip`'s factor.
    fn fused_step(&mut self, grads: Vec<Tensor>, clip: cuda::Clip<'_>, lr: f64) -> Result<()> {
        let grads = grads
            .iter()
            .zip(&self.params)
            .map(|(g, p)| crate::nn::ops::contiguous(&g.to_dtype(p.var.dtype())?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.t += 1;
        let c = self.cfg;
        let decays: Vec<f32> = self
            .params
            .iter()
            .map(|p| if p.decay && c.weight_decay > 0.0 { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 })
            .collect();
        let h = cuda::Hyper {
            lr: lr as f32,
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            eps: c.eps as f32,
            bc1: (1.0 - c.beta1.powi(self.t as i32)) as f32,
            bc2: (1.0 - c.beta2.powi(self.t as i32)) as f32,
        };
        Ok(cuda::step(&self.params, &grads, &decays, clip, h)?)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{
        CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg, SyncOnDrop,
    };
    use candle_core::cuda::{CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Tensor};

    use super::Param;
    use crate::nn::kernels::{cuda_of, func, OPTIM_BIN};

    const MODULE: &str = "pipe_optim";
    /// Elements per block of the multi-tensor kernels (MT_CHUNK in kernels/optim.cu).
    const CHUNK: usize = 65536;

    #[derive(Clone, Copy)]
    pub struct Hyper {
        pub lr: f32,
        pub b1: f32,
        pub b2: f32,
        pub eps: f32,
        pub bc1: f32,
        pub bc2: f32,
    }

    /// The device address of a dense tensor's first element, and the guard
    /// that records the stream's use of it when dropped.
    fn addr<'a>(st: &'a CudaStorage, l: &Layout, stream: &'a CudaStream) -> Result<(u64, SyncOnDrop<'a>)> {
        let Some((a, _)) = l.contiguous_offsets() else { candle_core::bail!("fused AdamW: a non-contiguous tensor") };
        let (p, sync) = match st.dtype() {
            DType::F32 => st.as_cuda_slice::<f32>()?.device_ptr(stream),
            DType::BF16 => st.as_cuda_slice::<half::bf16>()?.device_ptr(stream),
            dt => candle_core::bail!("fused AdamW: {dt:?} (f32, bf16)"),
        };
        Ok((p + (a * st.dtype().size_in_bytes()) as u64, sync))
    }

    /// Per dtype: the table on the device, its chunk list, and the chunks' count.
    type Groups = Vec<(DType, CudaSlice<u64>, CudaSlice<u64>, usize)>;

    /// One table per dtype, from each tensor's dtype and 8 words (kernels/optim.cu;
    /// its `n` in word 5), uploaded with its chunk list.
    fn tables(
        stream: &std::sync::Arc<CudaStream>,
        rows: impl Iterator<Item = (DType, [u64; 8])> + Clone,
    ) -> Result<Groups> {
        let mut groups = Vec::new();
        for dt in [DType::F32, DType::BF16] {
            let (mut tab, mut chunks) = (Vec::new(), Vec::new());
            for (_, w) in rows.clone().filter(|(d, _)| *d == dt) {
                let t = (tab.len() / 8) as u64;
                tab.extend_from_slice(&w);
                chunks.extend((0..(w[5] as usize).div_ceil(CHUNK) as u64).map(|c| t << 32 | c));
            }
            if !chunks.is_empty() {
                let n = chunks.len();
                groups.push((dt, stream.clone_htod(&tab).w()?, stream.clone_htod(&chunks).w()?, n));
            }
        }
        Ok(groups)
    }

    fn chunk_grid(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// The clipping factor of an update: given, or computed by the
    /// kernel from the gradients' sum of squares on the device
    /// ([`sum_squares_on_device`]) and the largest norm (kernels/optim.cu's
    /// clip_factor, as [`super::clip_scale`]).
    #[derive(Clone, Copy)]
    pub enum Clip<'a> {
        Factor(f32),
        Norm { sumsq: &'a Tensor, max_norm: f64 },
    }

    /// The sum of the squares of every element of `grads` (f32 or bf16, on
    /// one CUDA device; at least one): one launch per dtype, one read back.
    pub fn sum_squares(grads: &[Tensor]) -> Result<f64> {
        read_sum(&sum_squares_on_device(grads)?)
    }

    /// A sum of [`sum_squares_on_device`], read back.
    pub fn read_sum(sumsq: &Tensor) -> Result<f64> {
        Ok(sumsq.to_vec1::<f32>()?[0] as f64)
    }

    /// [`sum_squares`] left on the device: a one-element f32 tensor, its
    /// kernels queued (an error for no gradients).
    pub fn sum_squares_on_device(grads: &[Tensor]) -> Result<Tensor> {
        let Some(first) = grads.first() else { candle_core::bail!("sum of squares: no gradients") };
        let candle_core::Device::Cuda(dev) = first.device() else { candle_core::bail!("sum of squares: not on CUDA") };
        if grads.iter().any(|g| !g.device().same_device(first.device())) {
            candle_core::bail!("sum of squares: gradients on several devices");
        }
        let stream = dev.cuda_stream();
        let grads = grads.iter().map(crate::nn::ops::contiguous).collect::<Result<Vec<_>>>()?;
        let acc = Tensor::zeros(1, DType::F32, first.device())?;
        let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
        let acc_guard = acc.storage_and_layout();
        let mut syncs = Vec::with_capacity(grads.len() + 1);
        let mut rows = Vec::with_capacity(grads.len());
        for (g, (st, l)) in grads.iter().zip(&guards) {
            let (ptr, sync) = addr(cuda_of(st)?, l, &stream)?;
            syncs.push(sync);
            rows.push((g.dtype(), [0, 0, 0, 0, ptr, g.elem_count() as u64, 0, 0]));
        }
        let (out, sync) = addr(cuda_of(&acc_guard.0)?, acc_guard.1, &stream)?;
        syncs.push(sync);
        for (dt, tab, chunks, n) in &tables(&stream, rows.into_iter())? {
            let f = func(dev, MODULE, OPTIM_BIN, "multi_sumsq", *dt)?;
            let mut b = stream.launch_builder(&f);
            b.arg(tab).arg(chunks).arg(&out);
            // SAFETY: argument types and order match multi_sumsq_* in kernels/optim.cu;
            // the table's addresses are of live, dense tensors of the group's dtype.
            unsafe { b.launch(chunk_grid(*n)) }.w()?;
        }
        drop(syncs);
        drop(acc_guard);
        Ok(acc)
    }

    /// AdamW on every parameter with `grads[i]` (for `params[i]`, in its
    /// dtype) scaled by `clip`'s factor: one launch per dtype of parameters
    /// (`multi_adamw`), whatever their number. Parameters, f32 master
    /// copies and moments are updated in place.
    pub fn step(params: &[Param], grads: &[Tensor], decays: &[f32], clip: Clip<'_>, h: Hyper) -> Result<()> {
        let Some(first) = grads.first() else { return Ok(()) };
        let candle_core::Device::Cuda(dev) = first.device() else { candle_core::bail!("fused AdamW: not on CUDA") };
        for (p, g) in params.iter().zip(grads) {
            let n = p.var.elem_count();
            if g.dims() != p.var.dims() || g.dtype() != p.var.dtype() || !g.device().same_device(first.device()) {
                candle_core::bail!(
                    "fused AdamW: gradient {:?} {:?} for {} {:?} {:?}",
                    g.dims(),
                    g.dtype(),
                    p.name,
                    p.var.dims(),
                    p.var.dtype()
                );
            }
            let state = [Some(&p.m), Some(&p.v), p.master.as_ref()];
            if state.into_iter().flatten().any(|t| t.dtype() != DType::F32 || t.elem_count() != n) {
                candle_core::bail!("fused AdamW: optimizer state of {} is not f32 of {n} elements", p.name);
            }
        }
        let stream = dev.cuda_stream();
        // Read guards on every tensor for the update. The parameters,
        // masters and moments are written through their addresses: this
        // optimizer's own tensors, used by nothing else during its step, on
        // this device's one stream (the guards record that use).
        let ts: Vec<[Option<&Tensor>; 5]> = params
            .iter()
            .zip(grads)
            .map(|(p, g)| [p.master.as_ref(), Some(p.var.as_tensor()), Some(&p.m), Some(&p.v), Some(g)])
            .collect();
        let guards: Vec<Vec<Option<_>>> =
            ts.iter().map(|row| row.iter().map(|t| t.map(|t| t.storage_and_layout())).collect()).collect();
        let mut syncs = Vec::with_capacity(params.len() * 5);
        let mut words: Vec<[u64; 8]> = Vec::with_capacity(params.len());
        for ((row, p), decay) in guards.iter().zip(params).zip(decays) {
            let mut a = [0u64; 5];
            for (slot, g) in a.iter_mut().zip(row) {
                if let Some((st, l)) = g {
                    let (ptr, sync) = addr(cuda_of(st)?, l, &stream)?;
                    *slot = ptr;
                    syncs.push(sync);
                }
            }
            // No master: the parameter is f32 and is its own master.
            let w32 = if p.master.is_some() { a[0] } else { a[1] };
            words.push([w32, a[1], a[2], a[3], a[4], p.var.elem_count() as u64, decay.to_bits() as u64, 0]);
        }
        let (gscale, max_norm, sumsq) = match clip {
            Clip::Factor(f) => (f, 0.0f64, None),
            Clip::Norm { sumsq, max_norm } => {
                if sumsq.dtype() != DType::F32 || sumsq.elem_count() != 1 || !sumsq.device().same_device(first.device())
                {
                    candle_core::bail!("fused AdamW: the sum of squares is not one f32 on the gradients' device");
                }
                (1.0, max_norm, Some(sumsq.storage_and_layout()))
            }
        };
        // The sum's address, or null (kernels/optim.cu's clip_factor).
        let (sumsq_ptr, sumsq_sync) = match &sumsq {
            Some((st, l)) => {
                let (ptr, sync) = addr(cuda_of(st)?, l, &stream)?;
                (ptr, Some(sync))
            }
            None => (0u64, None),
        };
        for (dt, tab, chunks, n) in &tables(&stream, params.iter().map(|p| p.var.dtype()).zip(words))? {
            let f = func(dev, MODULE, OPTIM_BIN, "multi_adamw", *dt)?;
            let mut b = stream.launch_builder(&f);
            b.arg(tab).arg(chunks);
            b.arg(&h.lr).arg(&h.b1).arg(&h.b2).arg(&h.eps).arg(&h.bc1).arg(&h.bc2).arg(&gscale);
            b.arg(&sumsq_ptr).arg(&max_norm);
            // SAFETY: argument types and order match multi_adamw_* in kernels/optim.cu;
            // w32, m and v are dense f32 and w and g of the group's dtype, each
            // of the table's n elements; sumsq is null or one f32.
            unsafe { b.launch(chunk_grid(*n)) }.w()?;
        }
        drop((syncs, sumsq_sync));
        drop(sumsq);
        Ok(())
    }
}

fn state_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Global L2 norm of the gradients, computed in f32 (f64 for f64).
/// One device round trip, however many gradients (each one a sync would
/// stall a GPU between hundreds of tiny kernels).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    // On CUDA: one launch (kernels/optim.cu multi_sumsq), not a sum per tensor.
    #[cfg(feature = "cuda")]
    if !grads.is_empty() && grads.iter().all(crate::nn::fused::usable) {
        return Ok(cuda::sum_squares(grads)?.sqrt());
    }
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(state_dtype(g.dtype()))?.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// The factor that scales gradients of global norm `norm` to at most
/// `max_norm` (0: no clipping), as `torch.nn.utils.clip_grad_norm_`:
/// max_norm / (norm + 1e-6); None when they are within it.
fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// Scale gradients of global norm `norm` to at most `max_norm` (the factor
/// of [`clip_scale`]).
pub fn clip(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if let Some(f) = clip_scale(norm, max_norm) {
        for g in grads.iter_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_match_transformers() {
        // get_linear_schedule_with_warmup(warmup=2, total=10), base 1.0
        let lin: Vec<f64> = (0..10).map(|s| lr_at(Schedule::Linear, 1.0, s, 2, 10)).collect();
        assert_eq!(lin[0], 0.0);
        assert_eq!(lin[1], 0.5);
        assert_eq!(lin[2], 1.0);
        assert!((lin[6] - 0.5).abs() < 1e-12);
        let cos = lr_at(Schedule::Cosine, 1.0, 6, 2, 10);
        assert!((cos - 0.5).abs() < 1e-12, "{cos}");
        assert_eq!(lr_at(Schedule::Constant, 2e-4, 0, 2, 10), 2e-4);
        assert_eq!(lr_at(Schedule::ConstantWithWarmup, 2e-4, 1, 2, 10), 1e-4);
        assert_eq!(lr_at(Schedule::ConstantWithWarmup, 2e-4, 9, 2, 10), 2e-4);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0]], &dev)?)?;
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
        let g = Tensor::new(&[[0.5f64, 0.25]], &dev)?;
        opt.step(&[g], 0.01)?;
        // step 1: m_hat = g, v_hat = g^2, update = sign(g) (up to eps)
        let got = w.as_tensor().to_vec2::<f64>()?;
        let want0 = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 * 0.5 / (0.5 + 1e-8);
        let want1 = -2.0 * (1.0 - 0.01 * 0.1) - 0.01 * 0.25 / (0.25 + 1e-8);
        assert!((got[0][0] - want0).abs() < 1e-12 && (got[0][1] - want1).abs() < 1e-12, "{got:?}");
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &dev)?];
        let n = global_norm(&g)?;
        assert!((n - 5.0).abs() < 1e-6);
        clip(&mut g, n, 1.0)?;
        assert!((global_norm(&g)? - 1.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn the_fused_step_is_for_cuda_parameters_only() -> Result<()> {
        let w = Var::from_tensor(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?)?;
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(vec![("w".into(), w)], cfg)?;
        assert!(!opt.fused, "CPU parameters take the composition");
        opt.fused = true;
        let err = opt.clip_and_step(vec![None], 1.0, 1e-3).unwrap_err().to_string();
        assert!(err.contains("CUDA"), "{err}");
        Ok(())
    }

    /// The CUDA kernels (norm, clipping, AdamW with decay, f32 master of bf16
    /// weights) against the composed step on the same device: weights,
    /// masters and moments after three steps, f32 and bf16 parameters, with
    /// and without clipping, one gradient missing. Run on the GPU machine;
    /// skipped elsewhere.
    #[test]
    fn fused_adamw_matches_the_composed_step_on_cuda() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        for dt in [DType::F32, DType::BF16] {
            for max_norm in [0.0, 1.0] {
                // [300, 300]: two chunks of the multi-tensor kernels; with
                // bf16, p1 stays f32 (two groups of parameters).
                let shapes: [&[usize]; 4] = [&[64, 300], &[300], &[5, 7], &[300, 300]];
                let make = || -> Result<Vec<(String, Var)>> {
                    shapes
                        .iter()
                        .enumerate()
                        .map(|(i, sh)| {
                            let t = Tensor::randn(0f32, 1.0, *sh, &Device::Cpu)?;
                            let dti = if i == 1 { DType::F32 } else { dt };
                            Ok((format!("p{i}"), Var::from_tensor(&t.to_dtype(dti)?.to_device(&dev)?)?))
                        })
                        .collect()
                };
                let copies = |vars: &[(String, Var)]| {
                    vars.iter()
                        .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
                        .collect::<Result<Vec<_>>>()
                };
                let a_vars = make()?;
                let b_vars = copies(&a_vars)?;
                // `host`: the kernels given the clipping factor the host
                // computes from the norm it read (the sharded optimizer's
                // path); `fused` computes it on the device.
                let mut host = AdamW::new(copies(&a_vars)?, cfg)?;
                let mut fused = AdamW::new(a_vars, cfg)?;
                let mut composed = AdamW::new(b_vars, cfg)?;
                assert!(fused.fused && host.fused, "CUDA parameters take the kernels");
                composed.fused = false;
                for step in 0..3 {
                    let grads: Vec<Option<Tensor>> = shapes
                        .iter()
                        .enumerate()
                        .map(|(i, sh)| {
                            // p3's gradient: rows of a larger one (a view at
                            // an offset, as k's and v's in the stacked q/k/v
                            // gradient), which the kernels read in place.
                            let rows = if i == 3 { sh[0] + 100 } else { sh[0] };
                            let big = [&[rows], &sh[1..]].concat();
                            let g = Tensor::randn(0f32, 0.5, big, &Device::Cpu)?.to_dtype(dt)?.to_device(&dev)?;
                            let g = if i == 3 { g.narrow(0, 100, sh[0])? } else { g };
                            Ok((i != 2 || step != 1).then_some(g))
                        })
                        .collect::<Result<_>>()?;
                    // The norm alone (the sharded optimizer's), against the CPU's.
                    let present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
                    let on_cpu = present.iter().map(|g| g.to_device(&Device::Cpu)).collect::<Result<Vec<_>, _>>()?;
                    let (gn, cn) = (global_norm(&present)?, global_norm(&on_cpu)?);
                    assert!((gn - cn).abs() < 1e-4 * cn, "{dt:?} global norm {gn} vs {cn}");
                    let na = fused.clip_and_step(grads.clone(), max_norm, 1e-2)?;
                    host.step_with_norm(grads.clone(), gn, max_norm, 1e-2)?;
                    let nb = composed.clip_and_step(grads, max_norm, 1e-2)?;
                    assert!((na - nb).abs() < 1e-4 * nb, "{dt:?} step {step}: norm {na} vs {nb}");
                    // The norm read after the update is the one it clipped by.
                    assert!((na - gn).abs() < 1e-6 * gn, "{dt:?} step {step}: norm {na} vs {gn}");
                }
                // The device's clipping factor is the host's (up to the order
                // of the norm's atomic sums): the same moments and masters.
                for (a, b) in fused.params.iter().zip(&host.params) {
                    for (what, x, y) in [("m", &a.m, &b.m), ("v", &a.v, &b.v)] {
                        let e = crate::nn::tests::rel_err(x, y)?;
                        assert!(e < 1e-5, "{} {what} {dt:?} max_norm {max_norm}: device clipping off by {e}", a.name);
                    }
                    if let (Some(x), Some(y)) = (&a.master, &b.master) {
                        let e = crate::nn::tests::rel_err(x, y)?;
                        assert!(e < 1e-5, "{} master {dt:?} max_norm {max_norm}: device clipping off by {e}", a.name);
                    }
                }
                // The composition clips bf16 gradients in bf16, the kernel in
                // f32: with clipping, the composition's factor is rounded to
                // bf16 (up to 2^-8 on every gradient) and so is each clipped
                // gradient, up to 4 * 2^-8 on a squared gradient in v.
                let stol = if max_norm > 0.0 { 2e-2 } else { 1e-2 };
                let (wtol, stol, mtol) = if dt == DType::F32 { (1e-5, 1e-5, 1e-5) } else { (1e-2, stol, 1e-4) };
                for (a, b) in fused.params.iter().zip(&composed.params) {
                    let checks = [
                        ("weight", a.var.as_tensor().clone(), b.var.as_tensor().clone(), wtol),
                        ("m", a.m.clone(), b.m.clone(), stol),
                        ("v", a.v.clone(), b.v.clone(), stol),
                    ];
                    for (what, x, y, tol) in checks {
                        let e = crate::nn::tests::rel_err(&x, &y)?;
                        assert!(e < tol, "{} {what} {dt:?} max_norm {max_norm}: off by {e}", a.name);
                    }
                    if let (Some(x), Some(y)) = (&a.master, &b.master) {
                        let e = crate::nn::tests::rel_err(x, y)?;
                        assert!(e < mtol, "{} master {dt:?}: off by {e}", a.name);
                    }
                    assert_eq!(a.master.is_some(), a.var.dtype() == DType::BF16);
                }
            }
        }
        Ok(())
    }
}
