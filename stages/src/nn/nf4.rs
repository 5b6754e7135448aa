//! NF4 storage for QLoRA: a frozen 2-D weight kept as 4-bit NormalFloat codes
//! with double-quantised block scales, laid out as bitsandbytes'
//! `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`.
//!
//! [`Nf4Tensor::quantize`] takes an `(out, in)` weight; [`Nf4Tensor::dequantize`]
//! gives it back (approximately) for each matmul. Layout, over the row-major
//! flattened weight of `n` values (`n` must be a multiple of 64; nothing is
//! padded):
//! - `n / 2` bytes of codes, two per byte, the even element in the high
//!   nibble (`dQuantizeNF4(x0) << 4 | dQuantizeNF4(x1)`);
//! - one 8-bit code per block of 64 for its absmax: the absmaxes minus their
//!   mean (`offset`, f32), quantised with bitsandbytes' signed dynamic 8-bit
//!   map ([`DYNAMIC_MAP`]) in blocks of 256 absmaxes;
//! - one f32 scale per block of 256 absmaxes, and the f32 offset.
//!
//! Dequantised value: `NF4_CODE[q] * (DYNAMIC[qa] * scale + offset)`, in f32,
//! then cast, as bitsandbytes' `dequantize_4bit` computes it.
//!
//! Bit-compatibility with bitsandbytes: codes are chosen with the CUDA
//! kernels' comparison trees (`dQuantizeNF4`, `dQuantize<0>`) on `x * (1 /
//! max(absmax, 1e-38))` in f32, as its CPU kernels scale, so codes and 8-bit
//! absmaxes match for the same f32 inputs. The offset is the mean accumulated in f64 and rounded to f32;
//! torch's f32 `mean()` may differ from it in the last bit.
//! `scripts/reference/nf4_ref.py` re-implements the algorithm in numpy (and
//! compares with bitsandbytes where it is installed); the tests pin its
//! output.

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Values quantised with one NF4 absmax.
pub const BLOCK: usize = 64;
/// Block absmaxes quantised with one f32 scale (the double quantisation).
pub const ABSMAX_BLOCK: usize = 256;

/// The 16 NF4 code values, as bitsandbytes stores them: `get_4bit_type("nf4")`
/// in `bitsandbytes/functional.py` and `nf4_dequantization_lut` /
/// `dDequantizeNF4` in `csrc/kernels.cu` (the QLoRA paper's normal quantiles,
/// normalised to [-1, 1], exact zero at index 7).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' `dQuantizeNF4` (csrc/kernels.cu): a comparison tree on the
/// midpoints between neighbouring codes (the CPU kernel's `bucketize` on
/// f32 midpoints agrees). A value exactly on a midpoint goes to the lower
/// code; NaN to code 0.
#[allow(clippy::excessive_precision)]
#[inline]
fn quantize_nf4(x: f32) -> u8 {
    if x > 0.03979014977812767 {
        if x > 0.3893125355243683 {
            if x > 0.6427869200706482 {
                if x > 0.8614784181118011 {
                    0b1111
                } else {
                    0b1110
                }
            } else if x > 0.5016634166240692 {
                0b1101
            } else {
                0b1100
            }
        } else if x > 0.2035212516784668 {
            if x > 0.2920137718319893 {
                0b1011
            } else {
                0b1010
            }
        } else if x > 0.1202552504837513 {
            0b1001
        } else {
            0b1000
        }
    } else if x > -0.33967943489551544 {
        if x > -0.13791173323988914 {
            if x > -0.045525018125772476 {
                0b0111
            } else {
                0b0110
            }
        } else if x > -0.23460740596055984 {
            0b0101
        } else {
            0b0100
        }
    } else if x > -0.6106329262256622 {
        if x > -0.4599952697753906 {
            0b0011
        } else {
            0b0010
        }
    } else if x > -0.8480964004993439 {
        0b0001
    } else {
        0b0000
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`, the code of the 8-bit absmaxes: 256 sorted values in
/// [-1, 1] (7 decades of `10^e * mean(linspace(0.1, 1))` fractions, both
/// signs, plus 0 and 1). Copied from bitsandbytes 0.50.2 on torch 2.15's CPU
/// (`scripts/reference/nf4_ref.py --dump-dynamic-map`): torch's vectorised
/// f32 `linspace` rounds some fractions differently from a scalar
/// re-computation, so the values are pinned rather than recomputed.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
#[rustfmt::skip]
pub const DYNAMIC_MAP: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0.0,
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.0,
];

/// bitsandbytes' `dQuantize<0>` (csrc/kernels.cu): a 7-step binary search of
/// the sorted 256-entry code, then the nearer of the two neighbours by
/// midpoint. Exactly on a midpoint it keeps the search's last pivot, where
/// the CPU backend's `bucketize` takes the lower code; elsewhere both pick
/// the nearest value.
fn quantize_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    chosen as u8
}

/// Byte -> (high-nibble value, low-nibble value), so dequantising a byte is
/// one load and two multiplies.
fn pair_table() -> &'static [[f32; 2]; 256] {
    static TABLE: OnceLock<[[f32; 2]; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[0f32; 2]; 256];
        for (b, e) in t.iter_mut().enumerate() {
            *e = [NF4_CODE[b >> 4], NF4_CODE[b & 0x0f]];
        }
        t
    })
}

/// bitsandbytes' CPU kernels clamp an absmax to this before taking its
/// inverse, so an all-zero block quantises to the zero code (the CUDA kernel
/// gets NaN and code 0 instead; both dequantise to 0).
const TINY: f32 = 1e-38;

/// A 2-D weight in NF4 with double-quantised absmax (see the module docs).
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    shape: (usize, usize),
    /// `n / 2` bytes, high nibble first.
    codes: Vec<u8>,
    /// One dynamic-map index per 64-value block.
    qabsmax: Vec<u8>,
    /// One f32 absmax per 256 blocks (of `absmax - offset`).
    absmax_scale: Vec<f32>,
    /// Mean of the block absmaxes.
    offset: f32,
    /// The codes, absmaxes, scales and tables on the GPU, uploaded on the
    /// first dequantisation there (see [`Nf4Tensor::dequantize`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    on_device: OnceLock<OnDevice>,
}

/// An [`Nf4Tensor`]'s data on one CUDA device.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct OnDevice {
    codes: Tensor,
    qabsmax: Tensor,
    scale: Tensor,
    /// NF4_CODE, then DYNAMIC_MAP.
    tables: Tensor,
}

/// Quantises a 2-D float weight `(out, in)` (any float dtype, any device;
/// it is read back to the host as f32). Errors if it is not 2-D or its
/// number of elements is not a multiple of [`BLOCK`]: nothing is padded, so
/// such a layer stays unquantised.
pub fn quantize(w: &Tensor) -> Result<Nf4Tensor> {
    let (rows, cols) = w.dims2()?;
    if !w.dtype().is_float() {
        candle_core::bail!("nf4: cannot quantise a {:?} tensor; expected a float weight", w.dtype());
    }
    let n = rows * cols;
    if !n.is_multiple_of(BLOCK) {
        candle_core::bail!(
            "nf4: a ({rows}, {cols}) weight has {n} values, not a multiple of the block size {BLOCK}; \
             keep this layer unquantised"
        );
    }
    let x = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let nblocks = n / BLOCK;

    // First level: one absmax per 64 values, codes from x * (1 / absmax).
    let mut codes = vec![0u8; n / 2];
    let mut absmax = vec![0f32; nblocks];
    codes.par_chunks_mut(BLOCK / 2).zip(absmax.par_iter_mut()).zip(x.par_chunks(BLOCK)).for_each(
        |((out, amax), xs)| {
            let m = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            *amax = m;
            let inv = 1.0 / m.max(TINY);
            for (o, pair) in out.iter_mut().zip(xs.chunks_exact(2)) {
                *o = (quantize_nf4(pair[0] * inv) << 4) | quantize_nf4(pair[1] * inv);
            }
        },
    );

    // Second level: absmax - mean, in blocks of 256, on the dynamic map.
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / nblocks as f64) as f32;
    let code = &DYNAMIC_MAP;
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut qabsmax = vec![0u8; nblocks];
    let absmax_scale: Vec<f32> = qabsmax
        .chunks_mut(ABSMAX_BLOCK)
        .zip(centred.chunks(ABSMAX_BLOCK))
        .map(|(q, c)| {
            let m = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = 1.0 / m.max(TINY);
            for (q, &v) in q.iter_mut().zip(c) {
                *q = quantize_dynamic(code, v * inv);
            }
            m
        })
        .collect();

    Ok(Nf4Tensor { shape: (rows, cols), codes, qabsmax, absmax_scale, offset, on_device: OnceLock::new() })
}

impl Nf4Tensor {
    /// Same as the free function [`quantize`].
    pub fn quantize(w: &Tensor) -> Result<Nf4Tensor> {
        quantize(w)
    }

    /// The weight's `(out, in)` shape.
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    /// Storage in bytes: `n / 2` (codes) + `n / 64` (8-bit absmaxes) +
    /// `4 * ceil(n / 64 / 256)` (f32 scales) + 4 (f32 offset). The shared
    /// 256-entry dynamic map (1 KiB, a constant) is not counted.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + self.qabsmax.len() + 4 * self.absmax_scale.len() + 4
    }

    /// The dequantised absmax of 64-value block `b`, as bitsandbytes computes it.
    fn block_absmax(&self, b: usize) -> f32 {
        DYNAMIC_MAP[self.qabsmax[b] as usize] * self.absmax_scale[b / ABSMAX_BLOCK] + self.offset
    }

    fn fill<T: Send>(&self, out: &mut [T], conv: impl Fn(f32) -> T + Sync) {
        let table = pair_table();
        // Chunks of several blocks so rayon's per-task overhead stays small.
        const BLOCKS_PER_TASK: usize = 64;
        out.par_chunks_mut(BLOCK * BLOCKS_PER_TASK)
            .zip(self.codes.par_chunks(BLOCK / 2 * BLOCKS_PER_TASK))
            .enumerate()
            .for_each(|(task, (out, codes))| {
                for (j, (out, codes)) in out.chunks_mut(BLOCK).zip(codes.chunks(BLOCK / 2)).enumerate() {
                    let scale = self.block_absmax(task * BLOCKS_PER_TASK + j);
                    for (o, &byte) in out.chunks_exact_mut(2).zip(codes) {
                        let [hi, lo] = table[byte as usize];
                        o[0] = conv(hi * scale);
                        o[1] = conv(lo * scale);
                    }
                }
            });
    }

    /// The `(out, in)` weight in `dtype` on `device`: computed in f32 on the
    /// host (rayon over blocks), converted while writing, then moved. On
    /// CUDA (f32, bf16; unless `PIPE_FUSED_KERNELS=0`) a kernel makes it on
    /// the GPU from the NF4 data kept there (uploaded once), the same bits.
    pub fn dequantize(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        if crate::nn::fused::kernels_for(device, dtype, crate::nn::fused::Switch::Kernels) {
            return self.dequantize_cuda(device, dtype);
        }
        let n = self.codes.len() * 2;
        let shape = self.shape;
        match dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                self.fill(&mut v, |x| x);
                Tensor::from_vec(v, shape, device)
            }
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; n];
                self.fill(&mut v, bf16::from_f32);
                Tensor::from_vec(v, shape, device)
            }
            DType::F16 => {
                let mut v = vec![f16::ZERO; n];
                self.fill(&mut v, f16::from_f32);
                Tensor::from_vec(v, shape, device)
            }
            DType::F64 => {
                let mut v = vec![0f64; n];
                self.fill(&mut v, f64::from);
                Tensor::from_vec(v, shape, device)
            }
            other => candle_core::bail!("nf4: cannot dequantise to {other:?}; use a float dtype"),
        }
    }
}

impl Nf4Tensor {
    #[cfg(not(feature = "cuda"))]
    fn dequantize_cuda(&self, _: &Device, _: DType) -> Result<Tensor> {
        crate::nn::fused::cuda_only("nf4 dequantise")
    }

    #[cfg(feature = "cuda")]
    fn dequantize_cuda(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::cudarc::driver::{DeviceRepr, PushKernelArg};
        use candle_core::cuda::{CudaStorage, WrapErr};
        use candle_core::cuda_backend::CudaDType;

        use crate::nn::kernels::{blocks, by_dtype, func, grid, tensor, view, with, NF4_BIN};

        let upload = || -> Result<OnDevice> {
            let mut tables = NF4_CODE.to_vec();
            tables.extend_from_slice(&DYNAMIC_MAP);
            Ok(OnDevice {
                codes: Tensor::from_slice(&self.codes, self.codes.len(), device)?,
                qabsmax: Tensor::from_slice(&self.qabsmax, self.qabsmax.len(), device)?,
                scale: Tensor::from_slice(&self.absmax_scale, self.absmax_scale.len(), device)?,
                tables: Tensor::from_vec(tables, 16 + 256, device)?,
            })
        };
        let fresh;
        let d = match self.on_device.get() {
            Some(d) if d.codes.device().same_device(device) => d,
            Some(_) => {
                fresh = upload()?; // another GPU: not cached
                &fresh
            }
            None => {
                let _ = self.on_device.set(upload()?);
                self.on_device.get().expect("just set")
            }
        };
        fn launch<T: CudaDType + DeviceRepr>(
            s: &[(&CudaStorage, &candle_core::Layout)],
            offset: f32,
            dt: DType,
        ) -> Result<CudaStorage> {
            let dev = s[0].0.device().clone();
            let nbytes = s[0].1.shape().elem_count();
            let (codes, qabsmax) = (view::<u8>(s[0].0, s[0].1)?, view::<u8>(s[1].0, s[1].1)?);
            let (scale, tables) = (view::<f32>(s[2].0, s[2].1)?, view::<f32>(s[3].0, s[3].1)?);
            // SAFETY: the kernel writes every element.
            let mut out = unsafe { dev.alloc::<T>(nbytes * 2)? };
            let f = func(&dev, "pipe_nf4", NF4_BIN, "nf4_dequant", dt)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&codes).arg(&qabsmax).arg(&scale).arg(&tables).arg(&offset).arg(&mut out).arg(&nbytes);
            // SAFETY: argument types and order match nf4_dequant_* in kernels/nf4.cu.
            unsafe { b.launch(grid(blocks(nbytes), 1, 256)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out =
            with(&[&d.codes, &d.qabsmax, &d.scale, &d.tables], |s| by_dtype!(dtype, launch, s, self.offset, dtype))?;
        Ok(tensor(out, self.shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On CUDA the kernel gives the host's bits, f32 and bf16, over several
    /// blocks of 256 absmaxes; uploaded once. Run on the GPU machine;
    /// skipped elsewhere.
    #[test]
    fn cuda_dequantisation_matches_the_host_bit_for_bit() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        let w = Tensor::from_vec(normal(256 * 192, 5), (256, 192), &Device::Cpu)?;
        let q = quantize(&w)?;
        for dt in [DType::F32, DType::BF16] {
            let host = q.dequantize(&Device::Cpu, dt)?.to_dtype(DType::F64)?;
            let gpu = q.dequantize(&dev, dt)?;
            assert_eq!(gpu.dims(), [256, 192]);
            assert_eq!(gpu.dtype(), dt);
            let d =
                (gpu.to_device(&Device::Cpu)?.to_dtype(DType::F64)? - host)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(d, 0.0, "{dt:?}: the GPU's values differ from the host's by up to {d}");
        }
        assert!(q.on_device.get().is_some(), "uploaded once, kept");
        Ok(())
    }

    /// The test matrix of `scripts/reference/nf4_ref.py` (`matrix()`), in the
    /// same f32 operations.
    fn ref_matrix(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|k| {
                let num = ((k as i64 * 7919 + 13) % 2003 - 1001) as f32;
                let b = k / 64;
                let s = ((b * 37) % 11 + 1) as f32 / 16.0;
                num / 1001.0 * s
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Same checksum as the reference script.
    fn checksum(data: &[u8]) -> u64 {
        const P: u128 = (1 << 61) - 1;
        let mut acc: u128 = 0;
        for (i, &v) in data.iter().enumerate() {
            acc = (acc + (i as u128 + 1) * v as u128) % P;
        }
        acc as u64
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// A deterministic standard-normal-ish sample (Box-Muller on a LCG).
    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut uniform = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u1, u2) = (uniform(), uniform());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn every_code_value_round_trips_exactly() {
        // Every block holds each code value 4 times, scaled by the same
        // absmax (2.5), so the double-quantised absmax is exact (offset =
        // absmax, centred = 0) and dequantisation must give the values back.
        let row: Vec<f32> = (0..64).map(|i| NF4_CODE[i % 16] * 2.5).collect();
        let v: Vec<f32> = row.iter().cycle().take(64 * 6).copied().collect();
        let w = Tensor::from_vec(v.clone(), (3, 128), &Device::Cpu).unwrap();
        let q = quantize(&w).unwrap();
        for (i, byte) in q.codes.iter().enumerate() {
            let (a, b) = ((2 * i) % 16, (2 * i + 1) % 16);
            assert_eq!(*byte, ((a << 4) | b) as u8, "byte {i}");
        }
        assert_eq!(values(&q.dequantize(&Device::Cpu, DType::F32).unwrap()), v);
    }

    #[test]
    fn quantisation_picks_the_nearest_code() {
        for i in -20_000..=20_000 {
            let x = i as f32 / 20_000.0;
            let q = quantize_nf4(x) as usize;
            let best = NF4_CODE.iter().map(|c| (c - x).abs()).fold(f32::INFINITY, f32::min);
            assert!((NF4_CODE[q] - x).abs() <= best, "x = {x}: code {q}");
        }
        // The 8-bit dynamic code, on its own map. A value on a midpoint (to
        // f32 rounding) may go either way: the CUDA search (copied here)
        // keeps its last pivot, the CPU `bucketize` takes the lower code.
        for i in -20_000..=20_000 {
            let x = i as f32 / 20_000.0;
            let q = quantize_dynamic(&DYNAMIC_MAP, x) as usize;
            let best = DYNAMIC_MAP.iter().map(|c| (c - x).abs()).fold(f32::INFINITY, f32::min);
            assert!((DYNAMIC_MAP[q] - x).abs() <= best + 1e-7, "x = {x}: code {q}");
        }
        // -0.94375 is the midpoint of codes 3 and 4 (-0.95078125, -0.93671876).
        assert_eq!(quantize_dynamic(&DYNAMIC_MAP, -0.94375), 4);
        assert_eq!(quantize_dynamic(&DYNAMIC_MAP, -0.9438), 3);
    }

    #[test]
    fn dynamic_map_is_bitsandbytes() {
        assert!(DYNAMIC_MAP.windows(2).all(|w| w[0] < w[1] || (w[0] == 0.0 && w[1] == 0.0)));
        assert_eq!((DYNAMIC_MAP[0], DYNAMIC_MAP[127], DYNAMIC_MAP[255]), (-0.99296874, 0.0, 1.0));
        // Smallest magnitude: 1e-6 * (0.1 + 1) / 2.
        assert_eq!(DYNAMIC_MAP[128], 5.5000004e-07);
    }

    /// `python3 scripts/reference/nf4_ref.py` (numpy; identical to
    /// bitsandbytes 0.50.2 on CPU, checked with `--bnb`).
    #[test]
    fn matches_the_numpy_reference_small() {
        let q = quantize(&ref_matrix(4, 64)).unwrap();
        let hex: String = q.codes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0feeedcba9876543221100ffeeddcba9865443211100feeedcba9876543221100ffeeddcba98755432211\
             00feeedcba9876543221110ffeeddcba9876543221100feeedcbb9876543321110ffeeddcba987654322\
             1100ffeedccba876543321110ffeeddcba9876543221100ffeedccba8765433211100feeddcba9876543221"
        );
        assert_eq!(q.qabsmax, [22, 194, 255, 37]);
        assert_eq!(q.absmax_scale, [0.29490823]);
        assert_eq!(q.offset, 0.26309627);
        let dq = values(&q.dequantize(&Device::Cpu, DType::F32).unwrap());
        let at: Vec<f32> = [0, 1, 63, 64, 133, 255].iter().map(|&i| dq[i]).collect();
        assert_eq!(at, [-0.06149885, 0.06149885, -0.06149885, -0.3071021, 0.40341318, -0.086123265]);
        let sum: f64 = dq.iter().map(|&v| v as f64).sum();
        assert!((sum - 0.9993593799881637).abs() < 1e-12, "{sum}");
    }

    /// Two second-level blocks (320 absmaxes: 256 + a partial 64).
    #[test]
    fn matches_the_numpy_reference_two_absmax_blocks() {
        let q = quantize(&ref_matrix(64, 320)).unwrap();
        assert_eq!(checksum(&q.codes), 6510172180);
        assert_eq!(checksum(&q.qabsmax), 6572111);
        assert_eq!(q.absmax_scale, [0.3170874, 0.31640065]);
        assert_eq!(q.offset, 0.3704126);
        let dq = values(&q.dequantize(&Device::Cpu, DType::F32).unwrap());
        let at: Vec<f32> = [0, 1, 63, 64, 10245, 20479].iter().map(|&i| dq[i]).collect();
        assert_eq!(at, [-0.06001374, 0.06001374, -0.06001374, -0.30972007, -0.073007174, -0.042249173]);
        let sum: f64 = dq.iter().map(|&v| v as f64).sum();
        assert!((sum - -14.599653773475438).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn error_is_bounded_by_the_absmax_on_normal_weights() {
        let (rows, cols) = (96, 256); // 384 blocks: two absmax blocks
        let v: Vec<f32> = normal(rows * cols, 7).iter().map(|x| x * 0.02).collect();
        let w = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu).unwrap();
        let q = quantize(&w).unwrap();
        let dq = values(&q.dequantize(&Device::Cpu, DType::F32).unwrap());
        // Largest half gap between neighbouring NF4 codes (between 0.723 and 1).
        let half_gap = NF4_CODE.windows(2).map(|w| (w[1] - w[0]) / 2.0).fold(0f32, f32::max);
        let mut sq = 0f64;
        for (b, (xs, ys)) in v.chunks(BLOCK).zip(dq.chunks(BLOCK)).enumerate() {
            let absmax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            let absmax_dq = q.block_absmax(b);
            // Double quantisation: within half the widest dynamic-map gap
            // near 1 (0.9/64/2) of the block's second-level scale.
            let scale = q.absmax_scale[b / ABSMAX_BLOCK];
            assert!((absmax_dq - absmax).abs() <= scale * 0.0071 + 1e-7, "block {b}: {absmax} vs {absmax_dq}");
            for (x, y) in xs.iter().zip(ys) {
                let bound = absmax * half_gap + (absmax_dq - absmax).abs() + 1e-7;
                assert!((x - y).abs() <= bound, "block {b}: {x} -> {y}, bound {bound}");
                sq += ((x - y) as f64).powi(2);
            }
        }
        // And on average far below the worst case: RMS error < 10% of the RMS weight.
        let rms_err = (sq / v.len() as f64).sqrt();
        assert!(rms_err < 0.1 * 0.02, "rms error {rms_err}");
    }

    #[test]
    fn nbytes_is_half_a_byte_per_value_plus_scales() {
        let w = Tensor::zeros((576, 1536), DType::BF16, &Device::Cpu).unwrap();
        let q = quantize(&w).unwrap();
        let n: usize = 576 * 1536;
        let blocks = n / 64;
        assert_eq!(q.nbytes(), n / 2 + blocks + 4 * blocks.div_ceil(256) + 4);
        assert_eq!(q.nbytes(), 442_368 + 13_824 + 4 * 54 + 4);
        // ~0.516 bytes per parameter vs 2 for bf16.
        assert!((q.nbytes() as f64 / n as f64 - 0.5159).abs() < 1e-3);
        assert_eq!(q.shape(), (576, 1536));
        // All zeros stay zeros.
        let dq = q.dequantize(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(dq.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn dtypes_agree_and_bad_shapes_are_refused() {
        let w = ref_matrix(8, 64);
        let q = quantize(&w.to_dtype(DType::BF16).unwrap()).unwrap();
        let f = q.dequantize(&Device::Cpu, DType::F32).unwrap();
        for dt in [DType::BF16, DType::F16, DType::F64] {
            let d = q.dequantize(&Device::Cpu, dt).unwrap();
            assert_eq!(d.dtype(), dt);
            assert_eq!(d.dims2().unwrap(), (8, 64));
            let back = values(&d.to_dtype(DType::F32).unwrap());
            let want = values(&f.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap());
            assert_eq!(back, want, "{dt:?}");
        }
        let err = quantize(&Tensor::zeros((3, 10), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a multiple of the block size 64"), "{err}");
        assert!(quantize(&Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap()).is_err());
        assert!(q.dequantize(&Device::Cpu, DType::U8).is_err());
    }
}
