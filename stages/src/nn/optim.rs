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
    /// one launch per tensor for the norm and one for the update) instead of
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
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| g.map_or_else(|| p.var.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        if self.fused {
            return self.fused_clip_and_step(grads, max_norm, lr);
        }
        let norm = global_norm(&grads)?;
        clip(&mut grads, norm, max_norm)?;
        self.step(&grads, lr)?;
        Ok(norm)
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
    fn fused_clip_and_step(&mut self, grads: Vec<Tensor>, max_norm: f64, lr: f64) -> Result<f64> {
        let grads = grads
            .iter()
            .zip(&self.params)
            .map(|(g, p)| crate::nn::ops::dense(&g.to_dtype(p.var.dtype())?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = cuda::global_norm(&grads)?;
        let gscale = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        self.t += 1;
        let c = self.cfg;
        for (p, g) in self.params.iter().zip(&grads) {
            let decay = if p.decay && c.weight_decay > 0.0 { 1.0 - lr * c.weight_decay } else { 1.0 };
            let h = cuda::Hyper {
                lr: lr as f32,
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                eps: c.eps as f32,
                decay: decay as f32,
                bc1: (1.0 - c.beta1.powi(self.t as i32)) as f32,
                bc2: (1.0 - c.beta2.powi(self.t as i32)) as f32,
                gscale: gscale as f32,
            };
            cuda::adamw(p, g, h)?;
        }
        Ok(norm)
    }

    #[cfg(not(feature = "cuda"))]
    fn fused_clip_and_step(&mut self, _: Vec<Tensor>, _: f64, _: f64) -> Result<f64> {
        Ok(crate::nn::fused::cuda_only("fused AdamW")?)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{
        CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg, SyncOnDrop,
    };
    use candle_core::cuda::{CudaStorage, WrapErr};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Layout, Result, Tensor};

    use super::Param;
    use crate::nn::kernels::{by_dtype, device, func, grid, view, with, OPTIM_PTX};

    const MODULE: &str = "pipe_optim";

    /// At most 4096 blocks: `sumsq` adds one atomic per block.
    fn blocks(n: usize) -> usize {
        crate::nn::kernels::blocks(n).min(4096)
    }

    /// sqrt of the sum of squares of every gradient (f32 on the device,
    /// one read back).
    pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
        let Some(first) = grads.first() else { return Ok(0.0) };
        let acc = Tensor::zeros(1, DType::F32, first.device())?;
        for g in grads {
            by_dtype!(g.dtype(), sumsq, g, &acc)?;
        }
        Ok((acc.to_vec1::<f32>()?[0] as f64).sqrt())
    }

    fn sumsq<T: CudaDType + DeviceRepr>(g: &Tensor, acc: &Tensor) -> Result<()> {
        with(&[g, acc], |s| {
            let dev = device(s[0].0);
            let n = s[0].1.shape().elem_count();
            let gv = view::<T>(s[0].0, s[0].1)?;
            let stream = dev.cuda_stream();
            // `acc` is this function's caller's own fresh buffer: written
            // (atomically) through its pointer.
            let (out, _sync) = s[1].0.as_cuda_slice::<f32>()?.device_ptr(&stream);
            let f = func(&dev, MODULE, OPTIM_PTX, "sumsq", g.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&gv).arg(&n).arg(&out);
            // SAFETY: argument types and order match sumsq_* in kernels/optim.cu.
            unsafe { b.launch(grid(blocks(n), 1, 256)) }.w()?;
            Ok(())
        })
    }

    #[derive(Clone, Copy)]
    pub struct Hyper {
        pub lr: f32,
        pub b1: f32,
        pub b2: f32,
        pub eps: f32,
        pub decay: f32,
        pub bc1: f32,
        pub bc2: f32,
        pub gscale: f32,
    }

    /// The update of one parameter, in place: the parameter (write-locked
    /// through an in-place op), its f32 master copy and moments (this
    /// optimizer's own tensors, never shared, written through their
    /// pointers).
    pub fn adamw(p: &Param, g: &Tensor, h: Hyper) -> Result<()> {
        if g.dims() != p.var.dims() || g.dtype() != p.var.dtype() {
            candle_core::bail!(
                "fused AdamW: gradient {:?} {:?} for {} {:?}",
                g.dims(),
                g.dtype(),
                p.name,
                p.var.dims()
            );
        }
        let op = Update { m: &p.m, v: &p.v, master: p.master.as_ref(), h };
        p.var.as_tensor().inplace_op2(g, &op)
    }

    struct Update<'a> {
        m: &'a Tensor,
        v: &'a Tensor,
        master: Option<&'a Tensor>,
        h: Hyper,
    }

    impl candle_core::InplaceOp2 for Update<'_> {
        fn name(&self) -> &'static str {
            "fused-adamw"
        }

        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            crate::nn::fused::cuda_only(self.name())
        }

        fn cuda_fwd(&self, ws: &mut CudaStorage, wl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<()> {
            by_dtype!(ws.dtype(), update, self, (ws, wl), (gs, gl))
        }
    }

    /// The device address of a dense f32 storage's first element.
    fn ptr<'a>((st, l): (&'a CudaStorage, &Layout), stream: &'a CudaStream) -> Result<(u64, SyncOnDrop<'a>)> {
        let (p, sync) = st.as_cuda_slice::<f32>()?.device_ptr(stream);
        Ok((p + (l.start_offset() * 4) as u64, sync))
    }

    fn update<T: CudaDType + DeviceRepr>(
        u: &Update<'_>,
        (ws, wl): (&mut CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
    ) -> Result<()> {
        let dt = ws.dtype();
        let mut state = vec![u.m, u.v];
        state.extend(u.master);
        with(&state, |s| {
            let dev = device(gs);
            let n = wl.shape().elem_count();
            if s.iter().any(|(st, l)| st.dtype() != DType::F32 || l.shape().elem_count() != n || !l.is_contiguous()) {
                candle_core::bail!("fused AdamW: optimizer state is not dense f32 of {n} elements");
            }
            let Some((a, b)) = wl.contiguous_offsets() else {
                candle_core::bail!("fused AdamW: non-contiguous parameter")
            };
            let stream = dev.cuda_stream();
            let g = view::<T>(gs, gl)?;
            let (m, _sm) = ptr(s[0], &stream)?;
            let (v, _sv) = ptr(s[1], &stream)?;
            let mut w = ws.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
            let (wp, _sw) = w.device_ptr_mut(&stream);
            let (w32, _s32) = match s.get(2) {
                Some(master) => {
                    let (p, sync) = ptr(*master, &stream)?;
                    (p, Some(sync))
                }
                None => (wp, None),
            };
            let f = func(&dev, MODULE, OPTIM_PTX, "adamw", dt)?;
            let h = u.h;
            let mut b = stream.launch_builder(&f);
            b.arg(&w32).arg(&wp).arg(&m).arg(&v).arg(&g).arg(&n);
            b.arg(&h.lr).arg(&h.b1).arg(&h.b2).arg(&h.eps).arg(&h.decay).arg(&h.bc1).arg(&h.bc2).arg(&h.gscale);
            // SAFETY: argument types and order match adamw_* in kernels/optim.cu;
            // w32 is the parameter itself (f32) or its master copy.
            unsafe { b.launch(grid(blocks(n), 1, 256)) }.w()?;
            Ok(())
        })
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
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(state_dtype(g.dtype()))?.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`: factor max_norm / (norm + 1e-6)).
pub fn clip(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm > 0.0 && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
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
                let shapes: [&[usize]; 3] = [&[64, 300], &[300], &[5, 7]];
                let make = || -> Result<Vec<(String, Var)>> {
                    shapes
                        .iter()
                        .enumerate()
                        .map(|(i, sh)| {
                            let t = Tensor::randn(0f32, 1.0, *sh, &Device::Cpu)?;
                            Ok((format!("p{i}"), Var::from_tensor(&t.to_dtype(dt)?.to_device(&dev)?)?))
                        })
                        .collect()
                };
                let a_vars = make()?;
                let b_vars = a_vars
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
                    .collect::<Result<Vec<_>>>()?;
                let mut fused = AdamW::new(a_vars, cfg)?;
                let mut composed = AdamW::new(b_vars, cfg)?;
                assert!(fused.fused, "CUDA parameters take the kernels");
                composed.fused = false;
                for step in 0..3 {
                    let grads: Vec<Option<Tensor>> = shapes
                        .iter()
                        .enumerate()
                        .map(|(i, sh)| {
                            let g = (Tensor::randn(0f32, 0.5, *sh, &Device::Cpu)?.to_dtype(dt)?.to_device(&dev))?;
                            Ok((i != 2 || step != 1).then_some(g))
                        })
                        .collect::<Result<_>>()?;
                    let na = fused.clip_and_step(grads.clone(), max_norm, 1e-2)?;
                    let nb = composed.clip_and_step(grads, max_norm, 1e-2)?;
                    assert!((na - nb).abs() < 1e-4 * nb, "{dt:?} step {step}: norm {na} vs {nb}");
                }
                // The composition clips bf16 gradients in bf16, the kernel in f32.
                let (wtol, stol, mtol) = if dt == DType::F32 { (1e-5, 1e-5, 1e-5) } else { (1e-2, 1e-2, 1e-4) };
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
                    assert_eq!(a.master.is_some(), dt == DType::BF16);
                }
            }
        }
        Ok(())
    }
}
