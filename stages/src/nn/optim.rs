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
        Ok(AdamW { cfg, params, t: 0 })
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
}
