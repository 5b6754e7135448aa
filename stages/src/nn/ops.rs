//! Differentiable building blocks. candle 0.11's fused `softmax_last_dim`,
//! `rms_norm`, `rope*` and `QMatMul` have no backward pass, so everything
//! here is composed from ops that do (checked against finite differences in
//! the tests), plus [`frozen_matmul`]: `x @ w.T` whose backward only
//! computes the gradient for `x`. candle's own matmul backward also computes
//! the (discarded) gradient of a frozen weight: a third matmul per linear.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, D};

/// RMSNorm in f32 (or f64 when the input is f64), scaled by `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = if dt == DType::F64 { x.clone() } else { x.to_dtype(DType::F32)? };
    let inv = xf.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&inv)?.to_dtype(dt)?.broadcast_mul(w)
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
    let half = x.dim(D::Minus1)? / 2;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = x1.broadcast_mul(&cos)?.sub(&x2.broadcast_mul(&sin)?)?;
    let b = x2.broadcast_mul(&cos)?.add(&x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// Additive causal mask (L, L): 0 on and below the diagonal, -inf above.
pub fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(v, (l, l), device)?.to_dtype(dtype)
}

/// `x @ w.T` for a weight that never trains: backward returns only dx.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.matmul(&w.t()?);
    }
    // The op reads the storage from offset 0 with contiguous strides.
    let x = if x.is_contiguous() && x.layout().start_offset() == 0 { x.clone() } else { x.force_contiguous()? };
    x.apply_op1(FrozenMatmul { w: w.clone() })
}

struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Tensor::from_storage(Storage::Cpu(s.clone()), l.shape().clone(), BackpropOp::none(), false);
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let (st, _) = y.storage_and_layout();
        match &*st {
            Storage::Cpu(c) => Ok((c.clone(), shape)),
            _ => candle_core::bail!("frozen-matmul: the weight is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let x = Tensor::from_storage(Storage::Cuda(s.try_clone(l)?), l.shape().clone(), BackpropOp::none(), false);
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let (st, yl) = y.storage_and_layout();
        match &*st {
            Storage::Cuda(c) => Ok((c.try_clone(yl)?, shape)),
            _ => candle_core::bail!("frozen-matmul: the weight is not on the GPU"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w)?))
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
pub fn lm_head_cross_entropy(h: &Tensor, w: &Tensor, targets: &Tensor, chunk: usize) -> Result<Tensor> {
    let op = FusedHeadCe {
        w: w.clone(),
        targets: targets.clone(),
        chunk: chunk.max(1),
        w_grad: w.track_op(),
        grads: std::sync::Mutex::new(None),
    };
    let h = if h.is_contiguous() && h.layout().start_offset() == 0 { h.clone() } else { h.force_contiguous()? };
    h.apply_op2(w, op)
}

struct FusedHeadCe {
    w: Tensor,
    targets: Tensor,
    chunk: usize,
    w_grad: bool,
    /// d(loss)/dh and d(loss)/dw, computed by the forward pass.
    grads: std::sync::Mutex<Option<(Tensor, Option<Tensor>)>>,
}

impl FusedHeadCe {
    fn run(&self, h: &Tensor) -> Result<Tensor> {
        let m = h.dim(0)?;
        let acc = if h.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let w = self.w.detach();
        let mut total = Tensor::zeros((), acc, h.device())?;
        let mut dh = Vec::new();
        let mut dw: Option<Tensor> = None;
        let mut start = 0;
        while start < m {
            let n = self.chunk.min(m - start);
            let hc = h.narrow(0, start, n)?;
            let t = self.targets.narrow(0, start, n)?;
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
            let p = (e.broadcast_div(&sum)? - onehot)?.to_dtype(h.dtype())?;
            dh.push(p.matmul(&w)?);
            if self.w_grad {
                let g = p.t()?.matmul(&hc)?;
                dw = Some(match dw {
                    Some(a) => (a + g)?,
                    None => g,
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

impl candle_core::CustomOp2 for FusedHeadCe {
    fn name(&self) -> &'static str {
        "fused-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = Tensor::from_storage(Storage::Cpu(s.clone()), l.shape().clone(), BackpropOp::none(), false);
        let y = self.run(&h)?;
        let (st, _) = y.storage_and_layout();
        match &*st {
            Storage::Cpu(c) => Ok((c.clone(), Shape::from(()))),
            _ => candle_core::bail!("fused-head-cross-entropy: the weight is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let h = Tensor::from_storage(Storage::Cuda(s.try_clone(l)?), l.shape().clone(), BackpropOp::none(), false);
        let y = self.run(&h)?;
        let (st, yl) = y.storage_and_layout();
        match &*st {
            Storage::Cuda(c) => Ok((c.try_clone(yl)?, Shape::from(()))),
            _ => candle_core::bail!("fused-head-cross-entropy: the weight is not on the GPU"),
        }
    }

    fn bwd(&self, h: &Tensor, _w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((dh, dw)) = self.grads.lock().ok().and_then(|x| x.clone()) else {
            candle_core::bail!("fused-head-cross-entropy: backward before forward")
        };
        let g = g.to_dtype(h.dtype())?;
        let dh = dh.broadcast_mul(&g)?;
        let dw = match dw {
            Some(d) if self.w_grad => Some(d.broadcast_mul(&g)?),
            _ => None,
        };
        Ok((Some(dh), dw))
    }
}
