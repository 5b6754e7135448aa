//! Decode steps of serving on CUDA as one CUDA graph per batch size.
//!
//! A decode step (every sequence feeds one token) of a bf16 model with plain
//! frozen weights runs through `kernels/decode.cu`: five kernels per layer
//! (RMSNorm + q/k/v + rotary + KV write; split attention over the paged
//! pool; split combine + output projection + residual; RMSNorm + gate/up +
//! SwiGLU; down projection + residual), then the final norm + LM head and
//! the argmax. Buffers live as long as the model, so the launches of one
//! step are captured once per batch size (rows padded to a power of two)
//! and replayed: a step costs one graph launch instead of ~300 kernel
//! launches and ~20 candle ops per layer. [`Llama::step`]'s candle path
//! remains for prefills, mixed steps, other dtypes and devices.
//!
//! With `PIPE_DECODE_MEGA=1`, steps of up to 8 rows run instead as one
//! persistent kernel (one block per SM, a grid barrier between the phases
//! above, each block loading its next weights before it waits), captured
//! the same way. Off by default: slower so far (docs/results.md §5).
//!
//! With `PIPE_DECODE_STREAM=1`, steps of up to 8 rows run as another
//! persistent kernel (decode.cu's `dec_stream_*`) in which every block
//! streams its fixed share of the step's weights (q/k/v pairs, one head's
//! attention and its rows of o^T, or a range of MLP units with their rows of
//! down^T, then LM head rows) through a ring of shared-memory slots, many
//! chunks ahead of the one in use; three waits a layer instead of five
//! launches. It keeps transposed copies of o and down (made on its first
//! step).
//!
//! Steps of one or two rows (by default; `PIPE_DECODE_LAY`) run instead as two
//! kernels a layer launched as thread-block clusters (decode.cu's `dec_la`:
//! q/k/v, attention and the output projection per kv head; `dec_lb`: the
//! MLP), which pass partial rows instead of adding into the residual.
//!
//! `PIPE_DECODE_GRAPH=0` turns the fast path off; `=nograph` runs the same
//! kernels launched one by one (to measure what the graph saves).

use crate::nn::llama::Llama;
use crate::nn::Result;

/// What [`Llama::step_next`] returns: every row's argmax, and the f32
/// logits of the rows that asked for them (sampling).
pub struct Next {
    pub argmax: Vec<u32>,
    pub logits: Vec<Option<Vec<f32>>>,
}

/// The model's decode-graph state (created on the first eligible step).
#[derive(Default)]
pub struct Slot {
    #[cfg(feature = "cuda")]
    inner: std::sync::Mutex<Option<imp::Graphs>>,
    /// [`Llama::decode_shape_ok`], worked out once (weights do not change).
    shape_ok: std::sync::OnceLock<bool>,
}

thread_local! {
    /// Tests: launch the kernels one by one on this thread.
    static GRAPHS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Tests: this thread's `PIPE_DECODE_PDL`.
    static PDL: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_TC`.
    static TC_FROM: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_MEGA`.
    static MEGA: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_STREAM`.
    static STREAM: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: streamed steps recorded on this thread.
    static STREAM_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: this thread's `PIPE_DECODE_MLP`.
    static MLP: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_LAY`.
    static LAY: std::cell::Cell<Option<Option<bool>>> = const { std::cell::Cell::new(None) };
    /// Tests: steps of two kernels a layer recorded on this thread.
    static LAY_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: this thread's `PIPE_DECODE_ATTN` (`Some(true)`: chunked).
    static ATTN_CHUNKED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: attention splits per (row, kv head), at most [`imp`]'s `nsplit`.
    static NSPLIT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// Tests: zero-copy steps recorded on this thread.
    static ZC_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: chains of decode steps run on this thread.
    static CHAIN_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: this thread's `PIPE_DECODE_CHAIN`.
    static CHAIN: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_ZC`.
    static ZERO_COPY: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_LP_HEAD`.
    static LP_HEAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: persistent steps with the LM head inside recorded on this thread.
    static LP_HEAD_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: this thread's `PIPE_DECODE_LP_STEPS`.
    static LP_STEPS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_LP_PDL`.
    static LP_PDL: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: persistent steps recorded on this thread as programmatic launches.
    static LP_PDL_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: launches of several chained steps recorded on this thread.
    static LP_STEPS_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: of those, launches whose steps' LM heads are kernels of
    /// their own, each feeding the next step (Gemv's `feed`).
    static FEED_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: this thread's `PIPE_DECODE_LA_WHOLE`.
    static LA_WHOLE: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
    /// Tests: this thread's `PIPE_DECODE_LP_ACC`.
    static LP_ACC: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: persistent steps recorded on this thread whose MLP added
    /// into one row a layer.
    static LP_ACC_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: this thread's `PIPE_DECODE_L2_HEAD` (`Some(None)`: off).
    static L2_HEAD: std::cell::Cell<Option<Option<usize>>> = const { std::cell::Cell::new(None) };
    /// Tests: LM head launches recorded on this thread with the head's
    /// weights in an L2 access-policy window.
    static L2_HEAD_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: this thread's `PIPE_DECODE_HEAD1` (blocks an SM; 0: off).
    static HEAD1: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// Tests: one-row LM heads on CUDA cores recorded on this thread.
    static HEAD1_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The switch: `None` off, `Some(true)` graphs, `Some(false)` plain launches.
fn mode() -> Option<bool> {
    match std::env::var("PIPE_DECODE_GRAPH").as_deref() {
        Ok("0") => None,
        Ok("nograph") => Some(false),
        _ => Some(true),
    }
}

impl Llama {
    /// Whether decode steps of this model can run through the fused
    /// kernels: a CUDA build, the model in bf16 on CUDA, frozen dense
    /// weights without LoRA or biases, head dims 64/128, at most 8 query
    /// heads per kv head, widths a multiple of 8, the switch on.
    pub fn decode_graph_ok(&self) -> bool {
        cfg!(feature = "cuda") && mode().is_some() && *self.decode.shape_ok.get_or_init(|| self.decode_shape_ok())
    }

    fn decode_shape_ok(&self) -> bool {
        use crate::nn::llama::{Linear, Weight};
        let c = &self.cfg;
        let plain_w = |w: &Weight| matches!(w, Weight::Frozen(t) if t.dtype() == candle_core::DType::BF16);
        let plain = |l: &Linear| plain_w(&l.w) && l.b.is_none() && l.lora.is_none();
        let (h, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        self.device.is_cuda()
            && self.dtype == candle_core::DType::BF16
            && matches!(hd, 64 | 128)
            && kv > 0
            && h.is_multiple_of(kv)
            && h / kv <= 8
            && c.hidden_size.is_multiple_of(8)
            && c.intermediate_size.is_multiple_of(8)
            && plain_w(&self.embed)
            && plain_w(&self.norm)
            && self.lm_head.as_ref().is_none_or(plain)
            && self.layers.iter().all(|l| {
                l.linears().into_iter().all(plain)
                    && plain_w(&l.input_layernorm)
                    && plain_w(&l.post_attention_layernorm)
            })
    }

    /// One decode step through the graph: `toks[i]` at position `pos[i]`
    /// of a sequence whose paged blocks are `tables[i]` (room reserved).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn graph_decode(
        &self,
        toks: &[u32],
        pos: &[u32],
        tables: &[&[u32]],
        logits_for: &[bool],
    ) -> Result<Next> {
        #[cfg(feature = "cuda")]
        {
            let mut g = self.decode.inner.lock().unwrap_or_else(|e| e.into_inner());
            if g.is_none() {
                *g = Some(imp::Graphs::new(self)?);
            }
            let g = g.as_mut().unwrap_or_else(|| unreachable!("set above"));
            let graph = GRAPHS_OFF.with(|off| !off.get()) && mode() == Some(true);
            g.step(self, toks, pos, tables, logits_for, graph)
        }
        #[cfg(not(feature = "cuda"))]
        Err(crate::nn::NnError::Other("the decode graph needs a CUDA build".into()))
    }

    /// Greedy steps of one sequence through the decode graph with one step
    /// in flight ([`Llama::decode_greedy`]): `first` at position `base`,
    /// then each step's argmax fed to the next on the device, `table` its
    /// blocks (room reserved for `steps` positions). `on_token` gets each
    /// step's argmax and says whether to go on; the steps run (each one's
    /// fed token now in the cache), or None where a chain does not fit
    /// (the caller then takes a step at a time). Steps launched past the
    /// last one `on_token` accepted only write positions past the cache's
    /// end, within the `steps` reserved. A launch runs K steps
    /// (`PIPE_DECODE_LP_STEPS`, 4 by default) while K are left, then the
    /// rest in one launch.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn graph_chain(
        &self,
        table: &[u32],
        base: usize,
        first: u32,
        steps: usize,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Option<usize>> {
        #[cfg(feature = "cuda")]
        {
            let mut g = self.decode.inner.lock().unwrap_or_else(|e| e.into_inner());
            if g.is_none() {
                *g = Some(imp::Graphs::new(self)?);
            }
            let g = g.as_mut().unwrap_or_else(|| unreachable!("set above"));
            if steps == 0 || !g.chain_fits(self)? {
                return Ok(None);
            }
            CHAIN_RUNS.with(|r| r.set(r.get() + 1));
            // Launches of `per` steps while that many are left, then one of
            // the rest (a graph per step count, captured once).
            let per = g.chain_steps(self)?;
            let take = |launched: usize| (steps - launched).min(per);
            let mut launched = take(0);
            let mut cur = (g.chain_launch(self, Some(first), base as u32, table, launched)?, launched);
            let mut n = 0;
            loop {
                // The next launch (if any) made before this one's tokens are read.
                let next = if launched < steps {
                    let k = take(launched);
                    let at = (base + launched) as u32;
                    launched += k;
                    Some((g.chain_launch(self, None, at, table, k)?, k))
                } else {
                    None
                };
                let mut go = true;
                for t in g.chain_wait(cur.0, cur.1)? {
                    n += 1;
                    if !on_token(t) {
                        go = false;
                        break;
                    }
                }
                match next {
                    Some(later) if go => cur = later,
                    Some(later) => {
                        g.chain_wait(later.0, later.1)?;
                        return Ok(Some(n));
                    }
                    None => return Ok(Some(n)),
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        Ok(None)
    }

    /// Microseconds of GPU time per launch of each kernel of a decode step
    /// for `b` rows (one layer's; embed, qkv, attn, o, gateup, down, head,
    /// argmax), each measured as `reps` launches in a graph. Run a decode
    /// step of `b` rows first (the buffers and the cache it reads).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn decode_profile(&self, b: usize, reps: usize) -> Result<Vec<(String, f64)>> {
        #[cfg(feature = "cuda")]
        {
            let mut g = self.decode.inner.lock().unwrap_or_else(|e| e.into_inner());
            match g.as_mut() {
                Some(g) => g.profile(self, b.next_power_of_two(), reps.max(1)),
                None => Err(crate::nn::NnError::Other("decode profile: no decode step has run".into())),
            }
        }
        #[cfg(not(feature = "cuda"))]
        Err(crate::nn::NnError::Other("the decode graph needs a CUDA build".into()))
    }

    /// The decode step's L2 window on the LM head's weights
    /// (`PIPE_DECODE_L2_HEAD`), once a step has run: the window's bytes,
    /// the L2 set aside for persisting lines, and the fraction of the
    /// window's lines marked persisting. `None`: off, no step yet, or not
    /// a CUDA build.
    pub fn decode_l2_head(&self) -> Option<(usize, usize, f32)> {
        #[cfg(feature = "cuda")]
        {
            let g = self.decode.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.as_ref().and_then(|g| g.l2_head()).map(|w| (w.bytes, w.set_aside, w.hit))
        }
        #[cfg(not(feature = "cuda"))]
        None
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::Arc;

    use candle_core::cuda::cudarc::driver::result::{free_host, malloc_host};
    use candle_core::cuda::cudarc::driver::{
        sys, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    };
    use candle_core::cuda::{CudaDevice, WrapErr};
    use candle_core::{Storage, Tensor};

    use crate::nn::infer::KV_BLOCK;
    use crate::nn::kernels::DECODE_BIN;
    use crate::nn::llama::{Llama, Weight};
    use crate::nn::{NnError, Result};

    use super::Next;

    const MODULE: &str = "pipe_decode";
    const GEMV_THREADS: u32 = 128;
    const TILE: usize = 128;
    /// Shared memory the projections may stage their batch rows in.
    const SMEM_CAP: usize = 160 * 1024;
    const SMS: usize = 132;

    /// kernels/decode.cu's `Gemv` (by value).
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Gemv {
        x: u64,
        xin: u64,
        norm: u64,
        w0: u64,
        w1: u64,
        w2: u64,
        out: u64,
        outb: u64,
        kc: u64,
        vc: u64,
        pos: u64,
        table: u64,
        inv_freq: u64,
        best: u64,
        b: i32,
        k: i32,
        n: i32,
        nh: i32,
        kv: i32,
        hd: i32,
        maxb: i32,
        eps: f32,
        out2: u64,
        parts: u64,
        np: i32,
        hbest: u64,
        hdone: u64,
        seq: u64,
        hstride: i32,
        feed: u64,
    }
    // SAFETY: plain old data laid out as the kernels' C struct.
    unsafe impl DeviceRepr for Gemv {}

    /// kernels/decode.cu's `Lay` (by value): the two cluster kernels a layer.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Lay {
        xin: u64,
        pin: u64,
        xout: u64,
        pout: u64,
        norm: u64,
        w0: u64,
        w1: u64,
        w2: u64,
        w3: u64,
        kc: u64,
        vc: u64,
        pos: u64,
        table: u64,
        inv_freq: u64,
        b: i32,
        h: i32,
        n: i32,
        nh: i32,
        kv: i32,
        maxb: i32,
        np_in: i32,
        eps: f32,
        scale: f32,
        tm: u64,
        rep: i32,
        whole: i32,
        acc: u64,
    }
    // SAFETY: as for Gemv.
    unsafe impl DeviceRepr for Lay {}

    /// kernels/decode.cu's `LayP` (by value): the one-row persistent step.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct LayP {
        a: Lay,
        layers: u64,
        x: u64,
        x2: u64,
        pa: u64,
        pb: u64,
        ctr: u64,
        nl: i32,
        nmlp: i32,
        sleep: i32,
        head: Gemv,
        embed: u64,
        steps: i32,
        cstride: i32,
        acc: u64,
    }
    // SAFETY: as for Gemv.
    unsafe impl DeviceRepr for LayP {}

    /// decode.cu's `LAY_C`, `LAY_NW`, `LAY_BMAX`, `LAY_PMAX`, `LAY_UB`,
    /// `LaShape::CH` and `LAY_PAD`.
    const LAY_C: usize = 8;
    const LAY_NW: usize = 8;
    const LAY_THREADS: u32 = 32 * LAY_NW as u32;
    const LAY_BMAX: usize = 2;
    const LAY_PMAX: usize = 16;
    const LAY_UB: usize = 16;
    const LAY_CH: usize = 128;
    const LAY_PAD: usize = 32;
    /// decode.cu's `Lay::tm` slots: LAY_T's 64 (clock, then global timer),
    /// then `lp_mark`'s 3 (from `LAY_TM`).
    const LAY_TIMES: usize = 64 + 3;

    /// kernels/decode.cu's `Attn` (by value).
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Attn {
        q: u64,
        kc: u64,
        vc: u64,
        pos: u64,
        table: u64,
        po: u64,
        pml: u64,
        ao: u64,
        count: u64,
        nh: i32,
        kv: i32,
        maxb: i32,
        nsplit: i32,
        scale: f32,
    }
    // SAFETY: as for Gemv.
    unsafe impl DeviceRepr for Attn {}

    /// kernels/decode.cu's `Mega` (by value): the persistent step.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Mega {
        g: Gemv,
        at: Attn,
        layers: u64,
        tok: u64,
        embed: u64,
        norm: u64,
        head: u64,
        logits: u64,
        act: u64,
        bar: u64,
        l: i32,
        h: i32,
        i: i32,
        v: i32,
        mask: i32,
    }
    // SAFETY: as for Gemv.
    unsafe impl DeviceRepr for Mega {}

    /// kernels/decode.cu's `Stream` (by value): the streamed persistent step.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Stream {
        layers: u64,
        tok: u64,
        pos: u64,
        table: u64,
        embed: u64,
        norm: u64,
        head: u64,
        inv_freq: u64,
        x: u64,
        q: u64,
        logits: u64,
        best: u64,
        bar: u64,
        l: i32,
        h: i32,
        i: i32,
        v: i32,
        nh: i32,
        kv: i32,
        maxb: i32,
        ch: i32,
        eps: f32,
        scale: f32,
        mask: i32,
    }
    // SAFETY: as for Gemv.
    unsafe impl DeviceRepr for Stream {}

    struct LayerPtrs {
        ln1: u64,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        ln2: u64,
        gate: u64,
        up: u64,
        down: u64,
    }

    /// Page-locked host memory of `len` values of T (zeroed), for copies
    /// that a graph can hold and that run without a staging copy.
    struct Pinned<T> {
        ptr: *mut T,
        len: usize,
        /// Its address in the device's space (mapped).
        dev: u64,
    }
    // SAFETY: the memory is owned here; it is only used under the model's
    // `decode` mutex, as the graphs are.
    unsafe impl<T> Send for Pinned<T> {}

    impl<T: Copy + Default> Pinned<T> {
        /// `flags`: cuMemHostAlloc's (write-combined for what only the host
        /// writes and the GPU reads); always mapped into the device's
        /// space, so that kernels may read and write it themselves.
        fn new(stream: &CudaStream, len: usize, flags: u32) -> Result<Self> {
            stream.context().bind_to_thread().w()?;
            // SAFETY: a fresh allocation of len values, owned by the result.
            let flags = flags | sys::CU_MEMHOSTALLOC_DEVICEMAP;
            let ptr = unsafe { malloc_host(len.max(1) * std::mem::size_of::<T>(), flags) }.w()? as *mut T;
            let mut p = Pinned { ptr, len, dev: 0 };
            p.as_mut().fill(T::default());
            // SAFETY: ptr was allocated mapped just above; dev is written.
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut p.dev, ptr as *mut c_void, 0) }.result().w()?;
            Ok(p)
        }

        fn as_ref(&self) -> &[T] {
            // SAFETY: len values allocated in `new`, initialised there.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }

        fn as_mut(&mut self) -> &mut [T] {
            // SAFETY: as above; `&mut self` is the only reference.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        }
    }

    impl<T> Drop for Pinned<T> {
        fn drop(&mut self) {
            // SAFETY: allocated by malloc_host in `new`. A step waits for its
            // stream before it returns, so no copy is in flight, and a graph
            // left holding the address is cleared with its buffers (or
            // dropped unlaunched).
            let _ = unsafe { free_host(self.ptr as *mut c_void) };
        }
    }

    /// Device buffers for `cap` rows (some only owned here: the kernels
    /// reach them through `p`).
    #[allow(dead_code)]
    struct Bufs {
        cap: usize,
        /// The step's inputs (`inp`'s layout) and its argmax keys (`best`)
        /// on the host: the step's graph copies them in and out itself.
        /// Two halves each (`in_stride` and `cap` values): a chain of
        /// steps fills one while a step reads the other; other steps use
        /// the first.
        host_in: Pinned<u32>,
        host_best: Pinned<u64>,
        in_stride: usize,
        /// A chain's steps: counted on the device (`seq`) by each step and
        /// here by each launch (the same while the buffers live).
        seq: CudaSlice<u32>,
        launched: u64,
        /// The step's inputs, uploaded at once: tokens (cap), positions
        /// (cap), block tables (cap, maxb).
        inp: CudaSlice<u32>,
        best: CudaSlice<u64>,
        x: CudaSlice<f32>,
        /// The other residual buffer of the fused MLP (layers alternate).
        x2: CudaSlice<f32>,
        /// The streamed step's three residual buffers (3, cap, hidden).
        x3: CudaSlice<f32>,
        /// The two-kernel layers' partial rows: the attention kernel's
        /// (kv, cap, hidden), then the MLP kernel's (LAY_PMAX, cap, hidden).
        parts: CudaSlice<f32>,
        /// The one-row persistent step's MLP sums, a row a layer
        /// (decode.cu's `LayP::acc`; [`lp_acc`]): zero when allocated,
        /// and the kernel keeps them so between steps but for the last.
        acc: CudaSlice<f32>,
        /// Profiling: the phases' clocks of one layer's two kernels
        /// (decode.cu's `Lay::tm`).
        times: CudaSlice<i64>,
        q: CudaSlice<f32>,
        po: CudaSlice<f32>,
        pml: CudaSlice<f32>,
        ao: CudaSlice<half::bf16>,
        count: CudaSlice<u32>,
        act: CudaSlice<half::bf16>,
        logits: CudaSlice<f32>,
        /// The persistent steps' grid barrier and the streamed step's q/k/v
        /// counter, or the one-row persistent step's two counters a layer
        /// (zeroed before each step).
        bar: CudaSlice<u32>,
        /// Their addresses, taken once: cudarc's event bookkeeping of
        /// `device_ptr` must stay out of a stream capture.
        p: BufPtrs,
    }

    #[derive(Clone, Copy)]
    struct BufPtrs {
        tok: u64,
        pos: u64,
        table: u64,
        best: u64,
        x: u64,
        x2: u64,
        x3: u64,
        parts: u64,
        acc: u64,
        times: u64,
        q: u64,
        po: u64,
        pml: u64,
        ao: u64,
        count: u64,
        act: u64,
        logits: u64,
        bar: u64,
        inv_freq: u64,
        /// host_in and host_best, as the device sees them.
        hin: u64,
        hbest: u64,
        /// A chain's step count (dec_embed_io's `seq`).
        seq: u64,
    }

    /// One graph per padded batch size, for the pool layout it was
    /// captured with.
    struct Graph(CudaGraph);
    // SAFETY: a graph is only used under the model's `decode` mutex, so
    // never from two threads at once (what the CUDA docs ask of graphs).
    unsafe impl Send for Graph {}

    pub struct Graphs {
        dev: CudaDevice,
        stream: Arc<CudaStream>,
        funcs: HashMap<String, CudaFunction>,
        /// The weights (kept alive: the graphs hold their addresses).
        _keep: Vec<Tensor>,
        layers: Vec<LayerPtrs>,
        embed: u64,
        norm: u64,
        head: u64,
        inv_freq: CudaSlice<f32>,
        bufs: Option<Bufs>,
        /// The pool's generation and per-layer key/value addresses.
        pool: (u64, Vec<(u64, u64)>, Vec<Tensor>),
        scratch_block: u32,
        /// Keyed by the padded batch size and the switches' [`variant`]
        /// at capture (tests change them between steps).
        /// (And a chain's steps a launch; 0: not a chain.)
        graphs: HashMap<(usize, Variant, usize), Graph>,
        maxb: usize,
        /// The persistent step's per-layer weights and this pool's key and
        /// value addresses (decode.cu's `MegaLayer`, 11 addresses a layer),
        /// and its address (taken once: outside any capture).
        mega_layers: Option<(CudaSlice<u64>, u64)>,
        /// The streamed step's transposed o and down weights (made on its
        /// first step), and its layer table (decode.cu's `StreamLayer`,
        /// for this pool) with its address.
        stream_w: Option<Vec<(Tensor, Tensor)>>,
        stream_layers: Option<(CudaSlice<u64>, u64)>,
        /// Streaming multiprocessors: the persistent step's blocks.
        sms: u32,
        /// Shared memory a block may opt into.
        smem_optin: usize,
        /// Recorded on candle's stream and waited for by the decode
        /// stream before each step (one event, not one a step).
        joined: CudaEvent,
        /// Recorded after each chain step's launch (a step's half).
        chain_ev: [CudaEvent; 2],
        /// The LM head's weights as an L2 access-policy window of the head
        /// kernel's launches ([`l2_head`]), if on.
        l2: Option<L2Window>,
    }

    /// An L2 access-policy window: `hit` of the lines of `bytes` from
    /// `base` are kept in the `set_aside` bytes of L2 reserved for
    /// persisting lines (the context's limit, set when the graphs are
    /// made), the rest streamed.
    #[derive(Clone, Copy, Debug)]
    pub struct L2Window {
        pub base: u64,
        pub bytes: usize,
        pub set_aside: usize,
        pub hit: f32,
    }

    // SAFETY: the CUDA handles inside are used only under the model's
    // `decode` mutex; the device context is thread-safe.
    unsafe impl Send for Graphs {}

    fn addr(t: &Tensor, stream: &Arc<CudaStream>) -> Result<u64> {
        let (s, l) = t.storage_and_layout();
        let Storage::Cuda(c) = &*s else { return Err(NnError::Other("decode graph: a tensor is not on CUDA".into())) };
        let Some((a, _)) = l.contiguous_offsets() else {
            return Err(NnError::Other("decode graph: a weight is not contiguous".into()));
        };
        if !a.is_multiple_of(8) {
            return Err(NnError::Other("decode graph: a weight is not 16-byte aligned".into()));
        }
        let sl = c.as_cuda_slice::<half::bf16>()?;
        let (p, _sync) = sl.device_ptr(stream);
        Ok(p + (a * 2) as u64)
    }

    fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
        let (p, _sync) = s.device_ptr(stream);
        p
    }

    fn dense(w: &Weight) -> Result<Tensor> {
        match w {
            Weight::Frozen(t) => Ok(t.contiguous()?),
            _ => Err(NnError::Other("decode graph: a weight is not frozen".into())),
        }
    }

    impl Graphs {
        pub fn new(m: &Llama) -> Result<Graphs> {
            let dev = match &m.device {
                candle_core::Device::Cuda(d) => d.clone(),
                _ => return Err(NnError::Other("decode graph: the model is not on CUDA".into())),
            };
            let stream = dev.cuda_stream().context().new_stream().w()?;
            let mut keep = Vec::new();
            let mut a = |w: &Weight| -> Result<u64> {
                let t = dense(w)?;
                let p = addr(&t, &stream)?;
                keep.push(t);
                Ok(p)
            };
            let layers = m
                .layers
                .iter()
                .map(|l| {
                    Ok(LayerPtrs {
                        ln1: a(&l.input_layernorm)?,
                        q: a(&l.q.w)?,
                        k: a(&l.k.w)?,
                        v: a(&l.v.w)?,
                        o: a(&l.o.w)?,
                        ln2: a(&l.post_attention_layernorm)?,
                        gate: a(&l.gate.w)?,
                        up: a(&l.up.w)?,
                        down: a(&l.down.w)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let embed = a(&m.embed)?;
            let norm = a(&m.norm)?;
            let head = match &m.lm_head {
                Some(l) => a(&l.w)?,
                None => embed,
            };
            let inv: Vec<f32> = m.inv_freq().iter().map(|&f| f as f32).collect();
            let inv_freq = stream.clone_htod(&inv).w()?;
            let scratch_block = m.kv_pool().alloc(m, 1)?[0];
            let mut funcs = HashMap::new();
            let mut names: Vec<String> = ["qkv", "o", "gateup", "down", "head"]
                .iter()
                .flat_map(|k| [1, 2, 4, 8, 16].map(|bt| format!("dec_{k}_{bt}")))
                .collect();
            names.extend(
                ["qkv", "o", "gateup", "down", "head", "mlp", "headp"]
                    .iter()
                    .flat_map(|k| [8, 16, 32, 64].map(|bt| format!("tc_{k}_{bt}"))),
            );
            names.extend(
                [
                    "dec_attn_64",
                    "dec_attn_128",
                    "dec_embed",
                    "dec_embed_io",
                    "dec_argmax",
                    "dec_head1",
                    "dec_mega_64",
                    "dec_mega_128",
                ]
                .map(String::from),
            );
            names.extend([64, 128].iter().flat_map(|hd| (1..=8).map(move |r| format!("dec_attnc_{hd}_{r}"))));
            names.extend([64, 128].iter().flat_map(|hd| (1..=8).map(move |r| format!("dec_la_{hd}_{r}"))));
            names.extend([64, 128].iter().flat_map(|hd| (1..=8).map(move |r| format!("dec_lp_{hd}_{r}"))));
            names.extend([64, 128].iter().flat_map(|hd| (1..=8).map(move |r| format!("dec_lph_{hd}_{r}"))));
            names.extend((1..=LAY_BMAX).map(|b| format!("dec_lb_{b}")));
            let smem_optin = stream
                .context()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                .w()? as usize;
            for n in names {
                let f = dev.get_or_load_custom_image(&n, MODULE, DECODE_BIN)?.into_cuda_function();
                if n.starts_with("tc_") || (n.starts_with("dec_") && !n.starts_with("dec_attn_")) {
                    f.set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        SMEM_CAP as i32,
                    )
                    .w()?;
                }
                funcs.insert(n, f);
            }
            for hd in [64, 128] {
                for bt in STREAM_BT {
                    let n = format!("dec_stream_{hd}_{bt}");
                    let f = dev.get_or_load_custom_image(&n, MODULE, DECODE_BIN)?.into_cuda_function();
                    f.set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        (smem_optin - STREAM_STATIC) as i32,
                    )
                    .w()?;
                    funcs.insert(n, f);
                }
            }
            let sms =
                stream.context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?
                    as u32;
            let joined = stream.context().new_event(None).w()?;
            let chain_ev = [stream.context().new_event(None).w()?, stream.context().new_event(None).w()?];
            let head_bytes = m.cfg.vocab_size * m.cfg.hidden_size * 2;
            let l2 = match l2_head() {
                Some(mib) => l2_window(&stream, head, head_bytes, mib)?,
                None => None,
            };
            Ok(Graphs {
                dev,
                stream,
                funcs,
                _keep: keep,
                layers,
                embed,
                norm,
                head,
                inv_freq,
                bufs: None,
                pool: (u64::MAX, Vec::new(), Vec::new()),
                scratch_block,
                graphs: HashMap::new(),
                maxb: m.cfg.max_position_embeddings.div_ceil(KV_BLOCK),
                mega_layers: None,
                stream_w: None,
                stream_layers: None,
                sms,
                smem_optin,
                joined,
                chain_ev,
                l2,
            })
        }

        /// [`L2Window`] of the head, if on.
        pub fn l2_head(&self) -> Option<L2Window> {
            self.l2
        }
    }

    impl Drop for Graphs {
        /// The head's window, if on: its lines back to normal and the L2
        /// set aside for persisting lines back to none (the context's
        /// other work gets the whole L2 again).
        fn drop(&mut self) {
            if self.l2.is_some() && self.stream.context().bind_to_thread().is_ok() {
                // SAFETY: context calls; the context is bound to this
                // thread. (Errors leave the L2 as it was: nothing to do.)
                unsafe {
                    let _ = sys::cuCtxResetPersistingL2Cache();
                    let _ = sys::cuCtxSetLimit(sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE, 0);
                }
            }
        }
    }

    impl Graphs {
        fn alloc(&self, m: &Llama, cap: usize) -> Result<Bufs> {
            let c = &m.cfg;
            let (h, hd) = (c.num_attention_heads, c.head_dim());
            let s = &self.stream;
            let nsplit = nsplit_max(1, c.kv_heads());
            let inp = s.alloc_zeros(cap * (2 + self.maxb)).w()?;
            let best = s.alloc_zeros(cap).w()?;
            let x = s.alloc_zeros(cap * c.hidden_size).w()?;
            let x2 = s.alloc_zeros(cap * c.hidden_size).w()?;
            let x3 = s.alloc_zeros(3 * cap * c.hidden_size).w()?;
            let parts = s.alloc_zeros((c.kv_heads() + LAY_PMAX) * cap * c.hidden_size).w()?;
            let acc = s.alloc_zeros(self.layers.len() * c.hidden_size).w()?;
            let times = s.alloc_zeros(LAY_TIMES).w()?;
            let q = s.alloc_zeros(cap * h * hd).w()?;
            let po = s.alloc_zeros(cap * h * nsplit * hd).w()?;
            let pml = s.alloc_zeros(cap * h * nsplit * 2).w()?;
            let ao = s.alloc_zeros(cap * h * hd).w()?;
            let count = s.alloc_zeros(cap * c.kv_heads()).w()?;
            let act = s.alloc_zeros(cap * c.intermediate_size).w()?;
            let logits = s.alloc_zeros(cap * c.vocab_size).w()?;
            // The persistent step's 2 counters a layer, then the LM head's
            // count of finished blocks (zero-copy steps); after them, a
            // launch of up to LP_STEPS_MAX chained steps' (lp_counters).
            let bar = s.alloc_zeros(lp_counters(self.layers.len(), LP_STEPS_MAX)).w()?;
            let base = ptr(&inp, s);
            let in_stride = (cap * (2 + self.maxb)).next_multiple_of(4);
            let host_in = Pinned::new(s, 2 * in_stride, sys::CU_MEMHOSTALLOC_WRITECOMBINED)?;
            let host_best = Pinned::new(s, 2 * cap, 0)?;
            let seq = s.alloc_zeros(1).w()?;
            let p = BufPtrs {
                tok: base,
                pos: base + 4 * cap as u64,
                table: base + 8 * cap as u64,
                best: ptr(&best, s),
                x: ptr(&x, s),
                x2: ptr(&x2, s),
                x3: ptr(&x3, s),
                parts: ptr(&parts, s),
                acc: ptr(&acc, s),
                times: ptr(&times, s),
                q: ptr(&q, s),
                po: ptr(&po, s),
                pml: ptr(&pml, s),
                ao: ptr(&ao, s),
                count: ptr(&count, s),
                act: ptr(&act, s),
                logits: ptr(&logits, s),
                bar: ptr(&bar, s),
                inv_freq: ptr(&self.inv_freq, s),
                hin: host_in.dev,
                hbest: host_best.dev,
                seq: ptr(&seq, s),
            };
            Ok(Bufs {
                cap,
                host_in,
                host_best,
                in_stride,
                seq,
                launched: 0,
                inp,
                best,
                x,
                x2,
                x3,
                parts,
                acc,
                times,
                q,
                po,
                pml,
                ao,
                count,
                act,
                logits,
                bar,
                p,
            })
        }

        pub fn step(
            &mut self,
            m: &Llama,
            toks: &[u32],
            pos: &[u32],
            tables: &[&[u32]],
            logits_for: &[bool],
            use_graph: bool,
        ) -> Result<Next> {
            let n = toks.len();
            let bucket = n.next_power_of_two();
            self.prepare(m, bucket)?;
            // Inputs in Bufs::inp's layout: padded rows feed token 0 at
            // position 0 of the scratch block; into pinned memory, which the
            // step's graph copies in itself (no copy in flight: every step
            // ends with the stream synchronized).
            let len = self.fill_inputs(0, bucket, toks, pos, tables, 1)?;
            if use_graph {
                self.launch_graph((bucket, variant(), 0), |g| g.io_step(m, bucket, len))?;
            } else {
                self.io_step(m, bucket, len)?;
            }
            self.finish_step(m, bucket, n, logits_for, 0)
        }

        /// Launch the graph of `key`, captured first from what `record`
        /// enqueues on the decode stream if there is none yet.
        fn launch_graph(
            &mut self,
            key: (usize, Variant, usize),
            record: impl FnOnce(&Self) -> Result<()>,
        ) -> Result<()> {
            if !self.graphs.contains_key(&key) {
                self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
                let rec = record(self);
                let g = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
                rec?;
                let g = g.w()?.ok_or_else(|| NnError::Other("decode graph: the capture was empty".into()))?;
                g.upload().w()?;
                self.graphs.insert(key, Graph(g));
            }
            self.graphs[&key].0.launch().w()?;
            Ok(())
        }

        /// Buffers for `bucket` rows and the pool's current addresses (the
        /// graphs dropped when either changes), the streamed step's table.
        fn prepare(&mut self, m: &Llama, bucket: usize) -> Result<()> {
            if self.bufs.as_ref().is_none_or(|b| b.cap < bucket) {
                self.graphs.clear();
                self.bufs = Some(self.alloc(m, bucket.max(8))?);
            }
            let pool = m.kv_pool();
            // (The store's tensors cloned only when it was reallocated.)
            if pool.generation() != self.pool.0 {
                let (gen, ks, vs) = pool.snapshot();
                self.graphs.clear();
                let kv = ks.iter().zip(&vs).map(|(k, v)| Ok((addr(k, &self.stream)?, addr(v, &self.stream)?)));
                let kv = kv.collect::<Result<Vec<_>>>()?;
                let table: Vec<u64> = self
                    .layers
                    .iter()
                    .zip(&kv)
                    .flat_map(|(l, &(k, v))| [l.ln1, l.q, l.k, l.v, l.o, l.ln2, l.gate, l.up, l.down, k, v])
                    .collect();
                let table = self.stream.clone_htod(&table).w()?;
                let at = ptr(&table, &self.stream);
                self.mega_layers = Some((table, at));
                self.stream_layers = None;
                self.pool = (gen, kv, ks.into_iter().chain(vs).collect());
            }
            if stream_on() && self.stream_layers.is_none() {
                self.stream_table(m)?;
            }
            Ok(())
        }

        /// The inputs of `n` rows padded to `bucket` (Bufs::inp's layout:
        /// padded rows feed token 0 at position 0 of the scratch block) into
        /// half `half` of host_in; then candle's stream joined (the pool's
        /// last writes, prefills, are on it). The number of input values.
        /// `steps` > 1 (one row, a launch of chained steps): the positions
        /// of its steps after the first follow pos[0] in the padded rows'
        /// slots.
        fn fill_inputs(
            &mut self,
            half: usize,
            bucket: usize,
            toks: &[u32],
            pos: &[u32],
            tables: &[&[u32]],
            steps: usize,
        ) -> Result<usize> {
            let (maxb, scratch) = (self.maxb, self.scratch_block);
            let bufs = self.bufs.as_mut().ok_or_else(|| NnError::Other("decode graph: no buffers".into()))?;
            let cap = bufs.cap;
            let len = 2 * cap + bucket * maxb;
            let at = half * bufs.in_stride;
            let inp = &mut bufs.host_in.as_mut()[at..at + len];
            inp[..2 * cap].fill(0);
            inp[2 * cap..].fill(scratch);
            for i in 0..toks.len() {
                inp[i] = toks[i];
                inp[cap + i] = pos[i];
                let row = &mut inp[2 * cap + i * maxb..2 * cap + (i + 1) * maxb];
                let t = &tables[i][..tables[i].len().min(maxb)];
                row[..t.len()].copy_from_slice(t);
            }
            if steps > 1 {
                if toks.len() != 1 || steps > cap {
                    return Err(NnError::Other(format!("decode graph: {steps} chained steps of {} rows", toks.len())));
                }
                for s in 1..steps {
                    inp[cap + s] = pos[0] + s as u32;
                }
            }
            // (host_in is write-combined and may be read by the step's
            // first kernel itself: its stores drained before the launch.)
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.joined.record(&self.dev.cuda_stream()).w()?;
            self.stream.wait(&self.joined).w()?;
            Ok(len)
        }

        /// After a step's launch: the rows' logits where asked, the stream
        /// synchronized, the argmax of its `n` rows (keys in half `half` of
        /// host_best).
        fn finish_step(&self, m: &Llama, bucket: usize, n: usize, logits_for: &[bool], half: usize) -> Result<Next> {
            let bufs = self.bufs.as_ref().ok_or_else(|| NnError::Other("decode graph: no buffers".into()))?;
            let v = m.cfg.vocab_size;
            let mut logits = Vec::with_capacity(n);
            for (i, &want) in logits_for.iter().enumerate().take(n) {
                logits.push(if want {
                    let mut row = vec![0f32; v];
                    self.stream.memcpy_dtoh(&bufs.logits.slice(i * v..(i + 1) * v), &mut row).w()?;
                    Some(row)
                } else {
                    None
                });
            }
            self.stream.synchronize().w()?;
            if lay_times() > 0 && lay_fits(&m.cfg, bucket) {
                let mut t = vec![0i64; LAY_TIMES];
                self.stream.memcpy_dtoh(&bufs.times, &mut t).w()?;
                print_lay_times(&t);
            }
            // decode.cu's argmax_key: the index is in the low half, inverted
            // (the keys copied out by the step, the stream synchronized above).
            let at = half * bufs.cap;
            let keys = &bufs.host_best.as_ref()[at..at + n];
            let argmax = keys.iter().map(|k| u32::MAX - (*k as u32)).collect();
            Ok(Next { argmax, logits })
        }

        /// Whether one row's steps can run as a chain ([`Self::chain_launch`]):
        /// the zero-copy persistent step, through graphs.
        pub fn chain_fits(&mut self, m: &Llama) -> Result<bool> {
            if !chain_on() || super::mode() != Some(true) || super::GRAPHS_OFF.with(|off| off.get()) {
                return Ok(false);
            }
            self.prepare(m, 1)?;
            self.zero_copy_fits(m, 1)
        }

        /// Chained steps a launch ([`chain_steps_wanted`]) where the step
        /// (with the LM head inside, [`lp_head`]) fits (all its clusters
        /// resident), else 1.
        pub fn chain_steps(&self, m: &Llama) -> Result<usize> {
            let k = chain_steps_wanted();
            Ok(if k > 1 && self.lp_config(&m.cfg, 1, lp_head())?.is_some() { k } else { 1 })
        }

        /// Launch `steps` steps of a chain of one row (after
        /// [`Self::chain_fits`]; more than one: [`Self::chain_steps`]), feeding
        /// `tok` (None: the argmax of the chain's step before, on the
        /// device) at `pos` with block table `table`, then each step's
        /// argmax at the positions after; it may start while the launch
        /// before runs. Its number, for [`Self::chain_wait`]; at most two
        /// launches may be made and not waited for.
        pub fn chain_launch(
            &mut self,
            m: &Llama,
            tok: Option<u32>,
            pos: u32,
            table: &[u32],
            steps: usize,
        ) -> Result<u64> {
            self.prepare(m, 1)?;
            let k = self.bufs.as_ref().ok_or_else(|| NnError::Other("decode graph: no buffers".into()))?.launched;
            let half = (k & 1) as usize;
            let len = self.fill_inputs(half, 1, &[tok.unwrap_or(u32::MAX)], &[pos], &[table], steps)?;
            self.launch_graph((1, variant(), steps), |g| g.record_only(m, 1, None, Some((len, steps))))?;
            self.chain_ev[half].record(&self.stream).w()?;
            if let Some(b) = self.bufs.as_mut() {
                b.launched += 1;
            }
            Ok(k)
        }

        /// The argmax of each of the `steps` steps of chain launch `k` once
        /// it has run.
        pub fn chain_wait(&self, k: u64, steps: usize) -> Result<Vec<u32>> {
            let half = (k & 1) as usize;
            self.chain_ev[half].synchronize().w()?;
            let bufs = self.bufs.as_ref().ok_or_else(|| NnError::Other("decode graph: no buffers".into()))?;
            let keys = &bufs.host_best.as_ref()[half * bufs.cap..half * bufs.cap + steps];
            Ok(keys.iter().map(|k| u32::MAX - (*k as u32)).collect())
        }

        /// A step on the decode stream, as its graph holds it: the inputs
        /// (`len` values of `host_in`) in, the kernels of `b` rows, their
        /// argmax keys out to `host_best`.
        fn io_step(&self, m: &Llama, b: usize, len: usize) -> Result<()> {
            let bufs = self.bufs.as_ref().ok_or_else(|| NnError::Other("decode graph: no buffers".into()))?;
            let st = self.stream.cu_stream();
            self.stream.context().bind_to_thread().w()?;
            if self.zero_copy_fits(m, b)? {
                return self.record_only(m, b, None, Some((len, 0)));
            }
            // SAFETY: host_in holds cap (2 + maxb) >= len values and `inp`
            // (at p.tok) as many; pinned memory, owned by `bufs`.
            unsafe { sys::cuMemcpyHtoDAsync_v2(bufs.p.tok, bufs.host_in.ptr as *const c_void, len * 4, st) }
                .result()
                .w()?;
            self.record_only(m, b, None, None)?;
            // SAFETY: b <= cap keys on both sides.
            unsafe { sys::cuMemcpyDtoHAsync_v2(bufs.host_best.ptr as *mut c_void, bufs.p.best, b * 8, st) }
                .result()
                .w()?;
            Ok(())
        }

        /// Whether a step of `b` rows does its own input and output
        /// ([`zero_copy`]): the one-row persistent step only (the
        /// other paths' kernels read the inputs before their programmatic
        /// wait, so the inputs must be on the device before the step).
        fn zero_copy_fits(&self, m: &Llama, b: usize) -> Result<bool> {
            Ok(zero_copy()
                && !self.stream_fits(m, b)
                && !self.mega_fits(m, b)
                && lay_fits(&m.cfg, b)
                && self.lp_config(&m.cfg, b, false)?.is_some())
        }

        fn f(&self, name: &str) -> Result<&CudaFunction> {
            self.funcs.get(name).ok_or_else(|| NnError::Other(format!("decode graph: no kernel {name}")))
        }

        /// Launch kernel `name` on the decode stream; `args` point at the
        /// argument values. With `pdl` (and `PIPE_DECODE_PDL` not 0) as a
        /// programmatic dependent launch: it may start while the kernel
        /// before it runs (decode.cu's pdl_wait orders what matters).
        ///
        /// # Safety
        /// `args` must match the kernel's parameters and outlive the call.
        unsafe fn go(&self, name: &str, c: LaunchConfig, args: &mut [*mut c_void], pdl: bool) -> Result<()> {
            let mut attrs: Vec<_> = pdl_attr(pdl).into_iter().collect();
            // SAFETY: passed on from the caller.
            unsafe { self.go_with(name, c, args, &mut attrs) }
        }

        /// [`Self::go`] with these launch attributes.
        ///
        /// # Safety
        /// As for [`Self::go`].
        unsafe fn go_with(
            &self,
            name: &str,
            c: LaunchConfig,
            args: &mut [*mut c_void],
            attrs: &mut [sys::CUlaunchAttribute],
        ) -> Result<()> {
            let f = self.f(name)?;
            let lc = self.cu_config(c, attrs);
            self.stream.context().bind_to_thread().w()?;
            // SAFETY: the caller vouches for `args`; the config is complete.
            unsafe { sys::cuLaunchKernelEx(&lc, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
                .result()
                .w()?;
            Ok(())
        }

        /// The driver's launch config of `c` on the decode stream.
        fn cu_config(&self, c: LaunchConfig, attrs: &mut [sys::CUlaunchAttribute]) -> sys::CUlaunchConfig {
            sys::CUlaunchConfig {
                gridDimX: c.grid_dim.0,
                gridDimY: c.grid_dim.1,
                gridDimZ: c.grid_dim.2,
                blockDimX: c.block_dim.0,
                blockDimY: c.block_dim.1,
                blockDimZ: c.block_dim.2,
                sharedMemBytes: c.shared_mem_bytes,
                hStream: self.stream.cu_stream(),
                attrs: attrs.as_mut_ptr(),
                numAttrs: attrs.len() as u32,
            }
        }

        /// Enqueue one decode step for `b` rows (the buffers' inputs set),
        /// or with `only` just that kind's kernel of the first layer
        /// (profiling). `io`: the step reads its `io.0` input values from
        /// `host_in` and writes its keys to `host_best` itself
        /// ([`Self::zero_copy_fits`]); with `io.1` > 0, as a launch of that
        /// many steps of a chain ([`Self::chain_launch`]).
        fn record_only(&self, m: &Llama, b: usize, only: Option<&str>, io: Option<(usize, usize)>) -> Result<()> {
            let on = |k: &str| only.is_none_or(|o| o == k);
            let c = &m.cfg;
            let p = self.bufs.as_ref().ok_or_else(|| NnError::Other("decode graph: no buffers".into()))?.p;
            if only.is_none() && self.stream_fits(m, b) {
                return self.record_stream(m, b, p);
            }
            if only.is_none() && self.mega_fits(m, b) {
                return self.record_mega(m, b, p);
            }
            if only.is_none() && lay_fits(c, b) {
                return self.record_lay(m, b, p, io);
            }
            let (hid, inter, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
            let (nh, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
            let x = p.x;
            let (base, at0) = self.step_args(m, b, p);
            let tok = p.tok;
            let hid_i = hid as i32;
            if on("embed") {
                let mut args = [arg(&tok), arg(&self.embed), arg(&x), arg(&hid_i), arg(&p.best)];
                // SAFETY: arguments match dec_embed in kernels/decode.cu. The
                // step's first kernel waits for the uploads before it.
                unsafe { self.go("dec_embed", cfg(b, 1, 256, 0), &mut args, false) }?;
            }
            let (q, act) = (p.q, p.act);
            let layers = if only.is_some() { 1 } else { self.layers.len() };
            // The fused MLP (gate/up, SwiGLU and down in one kernel) adds its
            // blocks' shares into the other residual buffer, which the o
            // kernel fills first: the layers alternate between the two.
            let fuse = only.is_none() && b >= tc_from() && mlp_fused();
            let (mut cur, mut alt) = (x, p.x2);
            for (li, lp) in self.layers.iter().enumerate().take(layers) {
                let (kc, vc) = self.pool.1[li];
                let qkv_units = (nh + 2 * kv) * hd / 2;
                self.gemv_if(
                    on("qkv"),
                    "qkv",
                    Gemv {
                        x: cur,
                        norm: lp.ln1,
                        w0: lp.q,
                        w1: lp.k,
                        w2: lp.v,
                        out: q,
                        kc,
                        vc,
                        k: hid as i32,
                        n: qkv_units as i32,
                        ..base
                    },
                )?;
                let at = Attn { kc, vc, ..at0 };
                if on("attn") {
                    let (name, threads, smem) = if attn_chunked() {
                        (format!("dec_attnc_{hd}_{}", nh / kv), 32 * attnc_warps(hd), attnc_smem(hd))
                    } else {
                        (format!("dec_attn_{hd}"), TILE, 0)
                    };
                    let c = LaunchConfig {
                        grid_dim: (at.nsplit as u32, kv as u32, b as u32),
                        block_dim: (threads as u32, 1, 1),
                        shared_mem_bytes: smem as u32,
                    };
                    // SAFETY: the argument matches dec_attn_* / dec_attnc_*
                    // in kernels/decode.cu (decode_shape_ok: 1 to 8 query
                    // heads a kv head); the shared memory is theirs.
                    unsafe { self.go(&name, c, &mut [arg(&at)], true) }?;
                }
                let out2 = if fuse { alt } else { 0 };
                let o = Gemv { xin: p.ao, w0: lp.o, out: cur, out2, k: (nh * hd) as i32, n: hid as i32, ..base };
                self.gemv_if(on("o"), "o", o)?;
                if fuse {
                    let (norm, w0, w1, w2) = (lp.ln2, lp.gate, lp.up, lp.down);
                    let a = Gemv { x: cur, norm, w0, w1, w2, out: alt, k: hid as i32, n: inter as i32, ..base };
                    self.mma("mlp", a)?;
                    std::mem::swap(&mut cur, &mut alt);
                    continue;
                }
                self.gemv_if(
                    on("gateup"),
                    "gateup",
                    Gemv { norm: lp.ln2, w0: lp.gate, w1: lp.up, outb: act, k: hid as i32, n: inter as i32, ..base },
                )?;
                self.gemv_if(
                    on("down"),
                    "down",
                    Gemv { xin: act, w0: lp.down, out: x, k: inter as i32, n: hid as i32, ..base },
                )?;
            }
            let logits = p.logits;
            self.gemv_if(
                on("head"),
                "head",
                Gemv { x: cur, norm: self.norm, w0: self.head, out: logits, k: hid as i32, n: v as i32, ..base },
            )?;
            // The tensor-core head keeps the argmax itself.
            if on("argmax") && b < tc_from() {
                let vi = v as i32;
                let mut args = [arg(&logits), arg(&p.best), arg(&vi)];
                // SAFETY: arguments match dec_argmax in kernels/decode.cu.
                unsafe { self.go("dec_argmax", cfg(b, 1, 1024, 0), &mut args, true) }?;
            }
            Ok(())
        }

        /// What every kernel of a step of `b` rows shares: the
        /// projections' arguments (no weights, outputs or widths yet) and
        /// the attention's (no layer's keys and values yet).
        fn step_args(&self, m: &Llama, b: usize, p: BufPtrs) -> (Gemv, Attn) {
            let c = &m.cfg;
            let (nh, kv, hd) = (c.num_attention_heads as i32, c.kv_heads() as i32, c.head_dim());
            let g = Gemv {
                x: p.x,
                pos: p.pos,
                table: p.table,
                inv_freq: p.inv_freq,
                best: p.best,
                b: b as i32,
                nh,
                kv,
                hd: hd as i32,
                maxb: self.maxb as i32,
                eps: c.rms_norm_eps as f32,
                ..Default::default()
            };
            let at = Attn {
                q: p.q,
                pos: p.pos,
                table: p.table,
                po: p.po,
                pml: p.pml,
                ao: p.ao,
                count: p.count,
                nh,
                kv,
                maxb: self.maxb as i32,
                nsplit: nsplit(b, kv as usize) as i32,
                scale: 1.0 / (hd as f32).sqrt(),
                ..Default::default()
            };
            (g, at)
        }

        /// The launch of the one-row persistent step (`dec_lp_*`: the kv
        /// heads' clusters, then the MLP's; shared memory for either), its
        /// layer table's address and whether the launch is cooperative
        /// ([`lp_mode`]), if it runs: one row, the switch on, a layer
        /// table, and all its clusters resident at once (the occupancy the
        /// driver reports).
        fn lp_config(
            &self,
            c: &crate::nn::config::LlamaConfig,
            b: usize,
            head: bool,
        ) -> Result<Option<(LaunchConfig, u64, bool)>> {
            let (Some(coop), Some((_, table)), 1) = (lp_mode(), self.mega_layers.as_ref(), b) else {
                return Ok(None);
            };
            let (kv, hd) = (c.kv_heads(), c.head_dim());
            let rep = c.num_attention_heads / kv;
            let clusters = kv + c.intermediate_size / LAY_UB / LAY_C;
            // (With the LM head inside: its staged row and the warps' sums too.)
            let head_smem = if head { mma_smem(c.hidden_size, 8, LAY_NW) } else { 0 };
            let lc = LaunchConfig {
                grid_dim: ((clusters * LAY_C) as u32, 1, 1),
                block_dim: (LAY_THREADS, 1, 1),
                shared_mem_bytes: la_smem(c).max(lb_smem(c, 1)).max(head_smem) as u32,
            };
            let f = self.f(&lp_name(hd, rep, head))?;
            let cl = self.cu_config(lc, &mut []);
            let mut n = 0i32;
            self.stream.context().bind_to_thread().w()?;
            // SAFETY: a complete config of a loaded kernel; n is written.
            // (A driver that cannot say: the two kernels a layer.)
            let known = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &cl) }.result().is_ok();
            Ok((known && n as usize >= clusters).then_some((lc, *table, coop)))
        }

        /// Whether a step of `b` rows runs as the persistent kernel: up
        /// to one batch chunk of 8 rows, tensor cores, the switch on, and
        /// the widest projection input staged within [`SMEM_CAP`].
        fn mega_fits(&self, m: &Llama, b: usize) -> bool {
            let c = &m.cfg;
            b <= 8 && b >= tc_from() && mega_on() && self.mega_layers.is_some() && mega_smem(c) <= SMEM_CAP
        }

        /// The whole step of `b` rows as one persistent kernel
        /// (decode.cu's `dec_mega_*`): its barrier zeroed, then one block
        /// per SM, launched cooperatively (all blocks resident at once).
        fn record_mega(&self, m: &Llama, b: usize, p: BufPtrs) -> Result<()> {
            let c = &m.cfg;
            let hd = c.head_dim();
            let layers =
                self.mega_layers.as_ref().ok_or_else(|| NnError::Other("decode graph: no layer table".into()))?.1;
            let (g, at) = self.step_args(m, b, p);
            let mg = Mega {
                g,
                at,
                layers,
                tok: p.tok,
                embed: self.embed,
                norm: self.norm,
                head: self.head,
                logits: p.logits,
                act: p.act,
                bar: p.bar,
                l: self.layers.len() as i32,
                h: c.hidden_size as i32,
                i: c.intermediate_size as i32,
                v: c.vocab_size as i32,
                mask: std::env::var("PIPE_DECODE_MEGA_MASK").ok().and_then(|v| v.parse().ok()).unwrap_or(63),
            };
            let lc = cfg(self.sms as usize, 1, TILE as u32, mega_smem(c) as u32);
            // (`PIPE_DECODE_COOP=0`: a plain launch; one block per SM is
            // resident at once on a GPU no other kernel occupies.)
            let coop = std::env::var("PIPE_DECODE_COOP").map_or(true, |v| v != "0");
            // SAFETY: the argument matches dec_mega_* in kernels/decode.cu;
            // its barrier is the buffers' first u32.
            unsafe { self.go_persistent(&format!("dec_mega_{hd}"), lc, &mut [arg(&mg)], p.bar, 1, coop) }
        }

        /// A persistent step: `counters` u32 at `bar` zeroed (none: the
        /// kernel before zeroed them), then the kernel launched
        /// (cooperatively when `coop`: all blocks resident at once), on the
        /// decode stream; with no counters to zero, a programmatic launch
        /// where [`lp_pdl`] says so (the kernel waits before its first
        /// read).
        ///
        /// # Safety
        /// As for [`Self::go`]; `bar` must hold `counters` u32.
        unsafe fn go_persistent(
            &self,
            name: &str,
            lc: LaunchConfig,
            args: &mut [*mut c_void],
            bar: u64,
            counters: usize,
            coop: bool,
        ) -> Result<()> {
            self.stream.context().bind_to_thread().w()?;
            if counters > 0 {
                // SAFETY: the caller vouches for `bar`; on the decode stream.
                unsafe { sys::cuMemsetD32Async(bar, 0, counters, self.stream.cu_stream()) }.result().w()?;
            }
            // SAFETY: a plain C struct; zero is a valid value of every field.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attr.value.cooperative = 1;
            let mut attrs: Vec<_> = coop.then_some(attr).into_iter().collect();
            if counters == 0 && lp_pdl() {
                super::LP_PDL_RUNS.with(|r| r.set(r.get() + 1));
                attrs.extend(pdl_attr(true));
            }
            // SAFETY: passed on from the caller.
            unsafe { self.go_with(name, lc, args, &mut attrs) }
        }

        /// The streamed step's transposed o and down weights (once) and its
        /// layer table for the current pool.
        fn stream_table(&mut self, m: &Llama) -> Result<()> {
            if self.stream_w.is_none() {
                let t = |w: &Weight| -> Result<Tensor> { Ok(dense(w)?.t()?.contiguous()?) };
                let w = m.layers.iter().map(|l| Ok((t(&l.o.w)?, t(&l.down.w)?))).collect::<Result<Vec<_>>>()?;
                // (Made on candle's stream: the step joins it before its launch.)
                self.stream_w = Some(w);
            }
            let tw = self.stream_w.as_ref().unwrap_or_else(|| unreachable!("made above"));
            let mut table = Vec::with_capacity(11 * self.layers.len());
            for ((l, &(k, v)), (ot, dt)) in self.layers.iter().zip(&self.pool.1).zip(tw) {
                let (ot, dt) = (addr(ot, &self.stream)?, addr(dt, &self.stream)?);
                table.extend([l.ln1, l.q, l.k, l.v, ot, l.ln2, l.gate, l.up, dt, k, v]);
            }
            let table = self.stream.clone_htod(&table).w()?;
            let at = ptr(&table, &self.stream);
            self.stream_layers = Some((table, at));
            Ok(())
        }

        /// Whether a step of `b` rows runs as the streamed persistent
        /// kernel: the switch on, up to 8 rows, hidden size at most 2,048 (a
        /// thread per 8 columns), at most half the SMs as attention blocks,
        /// and ring slots of at least 3 rows (an MLP unit).
        fn stream_fits(&self, m: &Llama, b: usize) -> bool {
            let c = &m.cfg;
            stream_on()
                && b <= 8
                && c.hidden_size <= 2048
                && c.num_attention_heads * 2 <= self.sms as usize
                && self.stream_layers.is_some()
                && stream_ch(c, b, self.smem_optin).is_some()
        }

        /// The whole step of `b` rows as decode.cu's `dec_stream_<hd>_<b>`:
        /// its counters zeroed, then one block per SM, cooperatively.
        fn record_stream(&self, m: &Llama, b: usize, p: BufPtrs) -> Result<()> {
            let c = &m.cfg;
            let hd = c.head_dim();
            let (ch, smem) = stream_ch(c, b, self.smem_optin)
                .ok_or_else(|| NnError::Other("decode graph: the streamed step does not fit".into()))?;
            let layers =
                self.stream_layers.as_ref().ok_or_else(|| NnError::Other("decode graph: no layer table".into()))?.1;
            let st = Stream {
                layers,
                tok: p.tok,
                pos: p.pos,
                table: p.table,
                embed: self.embed,
                norm: self.norm,
                head: self.head,
                inv_freq: p.inv_freq,
                x: p.x3,
                q: p.q,
                logits: p.logits,
                best: p.best,
                bar: p.bar,
                l: self.layers.len() as i32,
                h: c.hidden_size as i32,
                i: c.intermediate_size as i32,
                v: c.vocab_size as i32,
                nh: c.num_attention_heads as i32,
                kv: c.kv_heads() as i32,
                maxb: self.maxb as i32,
                ch: ch as i32,
                eps: c.rms_norm_eps as f32,
                scale: 1.0 / (hd as f32).sqrt(),
                // Profiling only: decode.cu's `Stream::mask`.
                mask: std::env::var("PIPE_DECODE_STREAM_MASK").ok().and_then(|v| v.parse().ok()).unwrap_or(63),
            };
            let lc = cfg(self.sms as usize, 1, STREAM_THREADS, smem as u32);
            super::STREAM_RUNS.with(|r| r.set(r.get() + 1));
            // SAFETY: the argument matches dec_stream_* in kernels/decode.cu
            // (b is 1, 2, 4 or 8: a padded batch of at most 8 rows); its
            // grid barrier and q/k/v counter are the buffers' two u32.
            unsafe { self.go_persistent(&format!("dec_stream_{hd}_{b}"), lc, &mut [arg(&st)], p.bar, 2, true) }
        }

        /// The step of `b` rows as two cluster kernels a layer (decode.cu's
        /// `dec_la_*`, `dec_lb_*`; [`lay_fits`]): the embedding into x,
        /// then per layer the attention kernel (x + the MLP's partial rows
        /// in, their sum into x2, the kv heads' output rows into the
        /// attention part of `parts`) and the MLP kernel (x2 + those in,
        /// the sum back into x, each cluster's down rows into the MLP
        /// part), then the LM head on x + the MLP part.
        fn record_lay(&self, m: &Llama, b: usize, p: BufPtrs, io: Option<(usize, usize)>) -> Result<()> {
            let c = &m.cfg;
            let (hid, kv, hd) = (c.hidden_size, c.kv_heads(), c.head_dim());
            let rep = c.num_attention_heads / kv;
            let hid_i = hid as i32;
            let nl = self.layers.len();
            // A chain's steps a launch (1: not a chain, or one).
            let steps = io.map_or(1, |(_, k)| k.max(1));
            let lph = lp_head();
            let lp = self.lp_config(c, b, lph)?;
            // The persistent step's counters and the head's (and a launch of
            // several steps' after them).
            let nctr = lp_counters(nl, steps) as i32;
            let (cap, stride) = self.bufs.as_ref().map_or((0, 0), |b| (b.cap, b.in_stride as i32));
            let chain = io.is_some_and(|(_, c)| c > 0);
            if let Some((n, _)) = io {
                if lp.is_none() || (chain && b != 1) {
                    return Err(NnError::Other(
                        "decode graph: zero-copy input without the one-row persistent step".into(),
                    ));
                }
                if steps > 1 && !(chain && steps <= LP_STEPS_MAX) {
                    return Err(NnError::Other(format!(
                        "decode graph: {steps} steps a launch outside a chain of the persistent step"
                    )));
                }
                super::ZC_RUNS.with(|r| r.set(r.get() + 1));
                let n = n as i32;
                // (A chain's step counter; none: 0, a null pointer.)
                let seq = if chain { p.seq } else { 0 };
                let mut args = [
                    arg(&p.tok),
                    arg(&self.embed),
                    arg(&p.x),
                    arg(&hid_i),
                    arg(&p.best),
                    arg(&p.hin),
                    arg(&n),
                    arg(&stride),
                    arg(&p.bar),
                    arg(&nctr),
                    arg(&seq),
                ];
                // SAFETY: arguments match dec_embed_io in kernels/decode.cu: host_in (mapped) holds n values (a
                // chain: two halves of `stride` >= n, a multiple of 4), `inp`
                // as many, `bar` nctr counters, `seq` one (a chain: one row,
                // one block). The persistent kernel after it is not a
                // programmatic launch (it starts after this ends).
                unsafe { self.go("dec_embed_io", cfg(b, 1, 256, 0), &mut args, false) }?;
            } else {
                let mut args = [arg(&p.tok), arg(&self.embed), arg(&p.x), arg(&hid_i), arg(&p.best)];
                // SAFETY: arguments match dec_embed in kernels/decode.cu.
                unsafe { self.go("dec_embed", cfg(b, 1, 256, 0), &mut args, false) }?;
            }
            let pa = p.parts;
            let pb = pa + (kv * b * hid * 4) as u64;
            let mlp_blocks = c.intermediate_size / LAY_UB;
            super::LAY_RUNS.with(|r| r.set(r.get() + 1));
            let base = Lay {
                pos: p.pos,
                table: p.table,
                inv_freq: p.inv_freq,
                b: b as i32,
                h: hid_i,
                n: c.intermediate_size as i32,
                nh: c.num_attention_heads as i32,
                kv: kv as i32,
                maxb: self.maxb as i32,
                eps: c.rms_norm_eps as f32,
                scale: 1.0 / (hd as f32).sqrt(),
                whole: la_whole(),
                ..Default::default()
            };
            let times = lay_times();
            let (g, _) = self.step_args(m, b, p);
            // The persistent step's MLP sums, one row a layer (lp_acc):
            // the head then reads x and the last layer's row.
            let acc = lp.is_some() && lp_acc() && nl >= 2;
            let (parts, np) = if acc {
                (p.acc + (4 * (nl - 1) * c.hidden_size) as u64, 1)
            } else {
                (pb, (mlp_blocks / LAY_C) as i32)
            };
            let head = Gemv {
                x: p.x,
                parts,
                np,
                norm: self.norm,
                w0: self.head,
                out: p.logits,
                k: hid_i,
                n: c.vocab_size as i32,
                // (Zero-copy: the head's last block writes the keys out.)
                hbest: if io.is_some() { p.hbest } else { 0 },
                hdone: p.bar + 8 * nl as u64,
                seq: if chain { p.seq } else { 0 },
                hstride: cap as i32,
                ..g
            };
            let fused_head = lp.is_some() && lph;
            if let Some((lc, layers, coop)) = lp {
                // (Several steps: their counters after the one-step ones,
                // as many a step.)
                let one = lp_counters(nl, 1);
                let ctr = if steps > 1 { p.bar + 4 * one as u64 } else { p.bar };
                let pp = LayP {
                    a: Lay { tm: if times > 0 { p.times } else { 0 }, rep: (times > 1) as i32, ..base },
                    layers,
                    x: p.x,
                    x2: p.x2,
                    pa,
                    pb,
                    ctr,
                    nl: nl as i32,
                    nmlp: mlp_blocks as i32,
                    sleep: lp_sleep(),
                    head: if fused_head { head } else { Gemv::default() },
                    embed: self.embed,
                    steps: steps as i32,
                    cstride: one as i32,
                    acc: if acc { p.acc } else { 0 },
                };
                if acc {
                    super::LP_ACC_RUNS.with(|r| r.set(r.get() + 1));
                }
                if steps > 1 && !fused_head {
                    // Several chained steps, each the persistent step and
                    // then the head's kernel, whose last block feeds the
                    // argmax's embedding row into x for the next (Gemv's
                    // feed): step s counts on ctr + s cstride (zeroed by
                    // dec_embed_io), reads position pos[s] and writes its
                    // key to the half's slot s.
                    super::LP_STEPS_RUNS.with(|r| r.set(r.get() + 1));
                    super::FEED_RUNS.with(|r| r.set(r.get() + 1));
                    for s in 0..steps {
                        let ctr = ctr + (4 * s * one) as u64;
                        let ps = LayP { a: Lay { pos: p.pos + 4 * s as u64, ..pp.a }, ctr, steps: 1, ..pp };
                        // SAFETY: as below, one step of dec_lp_* (its
                        // counters are step s's of lp_counters(nl, steps)).
                        unsafe { self.go_persistent(&lp_name(hd, rep, false), lc, &mut [arg(&ps)], ctr, 0, coop) }?;
                        let feed = if s + 1 < steps { self.embed } else { 0 };
                        let hdone = ctr + 8 * nl as u64;
                        self.mma("headp", Gemv { hbest: head.hbest + 8 * s as u64, hdone, feed, ..head })?;
                    }
                    return Ok(());
                }
                // SAFETY: the argument matches dec_lp_* in kernels/decode.cu;
                // lp_config checked that its clusters fit at once; `bar`
                // holds lp_counters(nl, LP_STEPS_MAX) counters (steps <=
                // LP_STEPS_MAX, checked above; the keys' slots: cap >= 8).
                // (Zeroed here, and the embedding's kernel above ran before:
                // no block of the step reads them before its wait for that
                // kernel.)
                // (dec_lph: the head's Gemv as tc_headp_8 takes it below; its
                // count of finished blocks, after the 2 nl, is 0 between steps.)
                let zero = if io.is_some() { 0 } else { 2 * nl };
                unsafe { self.go_persistent(&lp_name(hd, rep, lph), lc, &mut [arg(&pp)], ctr, zero, coop) }?;
                if fused_head {
                    super::LP_HEAD_RUNS.with(|r| r.set(r.get() + 1));
                    if steps > 1 {
                        super::LP_STEPS_RUNS.with(|r| r.set(r.get() + 1));
                    }
                    return Ok(());
                }
            } else {
                for (li, lp) in self.layers.iter().enumerate() {
                    let (kc, vc) = self.pool.1[li];
                    let np_in = if li == 0 { 0 } else { (mlp_blocks / LAY_C) as i32 };
                    let (w0, w1, w2, w3) = (lp.q, lp.k, lp.v, lp.o);
                    let (tm, twice) = if times > 0 && li == 3 { (p.times, (times > 1) as i32) } else { (0, 0) };
                    let la = Lay {
                        tm,
                        rep: twice,
                        xin: p.x,
                        pin: pb,
                        xout: p.x2,
                        pout: pa,
                        norm: lp.ln1,
                        w0,
                        w1,
                        w2,
                        w3,
                        kc,
                        vc,
                        np_in,
                        ..base
                    };
                    let lc = LaunchConfig {
                        grid_dim: (LAY_C as u32, kv as u32, b as u32),
                        block_dim: (LAY_THREADS, 1, 1),
                        shared_mem_bytes: la_smem(c) as u32,
                    };
                    // SAFETY: the argument matches dec_la_* in kernels/decode.cu
                    // (lay_fits: the shapes it takes, its shared memory).
                    unsafe { self.go(&format!("dec_la_{hd}_{rep}"), lc, &mut [arg(&la)], true) }?;
                    let (w0, w1, w2) = (lp.gate, lp.up, lp.down);
                    let np_in = kv as i32;
                    let lb = Lay {
                        tm,
                        rep: twice,
                        xin: p.x2,
                        pin: pa,
                        xout: p.x,
                        pout: pb,
                        norm: lp.ln2,
                        w0,
                        w1,
                        w2,
                        np_in,
                        ..base
                    };
                    let lc = cfg(mlp_blocks, 1, LAY_THREADS, lb_smem(c, b) as u32);
                    // SAFETY: as above, dec_lb_{b} (b <= LAY_BMAX).
                    unsafe { self.go(&format!("dec_lb_{b}"), lc, &mut [arg(&lb)], true) }?;
                }
            }
            self.mma("headp", head)
        }

        fn gemv_if(&self, on: bool, kind: &str, a: Gemv) -> Result<()> {
            if on {
                self.gemv(kind, a)
            } else {
                Ok(())
            }
        }

        /// GPU time of each kernel of a step for `b` rows (after a step of
        /// that size): `reps` launches of one kernel captured into a graph,
        /// timed with events; microseconds per launch. Then `step_graph`:
        /// the step's own graph replayed back to back (GPU time per step).
        pub fn profile(&mut self, m: &Llama, b: usize, reps: usize) -> Result<Vec<(String, f64)>> {
            if self.bufs.as_ref().is_none_or(|x| x.cap < b) || self.pool.1.is_empty() {
                return Err(NnError::Other("decode profile: run a step of this size first".into()));
            }
            let mut out = Vec::new();
            for kind in ["embed", "qkv", "attn", "o", "gateup", "down", "head", "argmax"] {
                self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
                let mut rec = Ok(());
                for _ in 0..reps {
                    rec = rec.and_then(|_| self.record_only(m, b, Some(kind), None));
                }
                let g = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
                rec?;
                // (The tensor-core head keeps the argmax: no argmax kernel.)
                let Some(g) = g.w()? else { continue };
                g.upload().w()?;
                g.launch().w()?;
                let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
                let start = self.stream.record_event(flags).w()?;
                for _ in 0..5 {
                    g.launch().w()?;
                }
                let end = self.stream.record_event(flags).w()?;
                let ms = start.elapsed_ms(&end).w()? as f64;
                out.push((kind.to_string(), ms * 1e3 / (5 * reps) as f64));
            }
            // The whole step as replayed (the graph of this size).
            if let Some(g) = self.graphs.get(&(b, variant(), 0)) {
                let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
                let start = self.stream.record_event(flags).w()?;
                for _ in 0..10 {
                    g.0.launch().w()?;
                }
                let end = self.stream.record_event(flags).w()?;
                out.push(("step_graph".to_string(), start.elapsed_ms(&end).w()? as f64 * 1e3 / 10.0));
            }
            self.stream.synchronize().w()?;
            Ok(out)
        }

        /// A projection for `a.b` rows: on tensor cores from
        /// [`tc_from`] rows up, else warp-per-row dot products.
        fn gemv(&self, kind: &str, a: Gemv) -> Result<()> {
            if (a.b as usize) >= tc_from() {
                return self.mma(kind, a);
            }
            let (b, k) = (a.b as usize, a.k as usize);
            let mut bt = 16usize.min(b.next_power_of_two());
            while bt > 1 && bt * k * 2 > SMEM_CAP {
                bt /= 2;
            }
            if k * 2 > SMEM_CAP {
                return Err(NnError::Other(format!("decode graph: width {k} is too wide to stage")));
            }
            // Four weight rows per warp at a time (decode.cu's UN units).
            let rows_per_unit = if matches!(kind, "qkv" | "gateup") { 2 } else { 1 };
            let units_per_block = (GEMV_THREADS / 32) as usize * 4 / rows_per_unit;
            let blocks = (a.n as usize).div_ceil(units_per_block).min(SMS * 16);
            let c = cfg(blocks, b.div_ceil(bt), GEMV_THREADS, (bt * k * 2) as u32);
            // SAFETY: the argument matches dec_{kind}_{bt} in kernels/decode.cu.
            unsafe { self.go(&format!("dec_{kind}_{bt}"), c, &mut [arg(&a)], true) }
        }
    }

    impl Graphs {
        /// A projection's launch attributes: programmatic, and for the LM
        /// head the L2 window on its weights ([`l2_head`]) when on.
        fn mma_attrs(&self, head: bool) -> Vec<sys::CUlaunchAttribute> {
            let mut attrs: Vec<_> = pdl_attr(true).into_iter().collect();
            if let (true, Some(w)) = (head, self.l2) {
                attrs.push(window_attr(&w));
                super::L2_HEAD_RUNS.with(|r| r.set(r.get() + 1));
            }
            attrs
        }

        /// A projection on tensor cores: tiles of 16 weight rows, batch
        /// chunks of BT rows (the smallest of 8..64 that holds the batch
        /// and fits in shared memory with the warps' partial sums), 4 or 8
        /// warps splitting K; at one row the LM head on CUDA cores where
        /// [`head1`] says so.
        fn mma(&self, kind: &str, a: Gemv) -> Result<()> {
            let (b, k, n) = (a.b as usize, a.k as usize, a.n as usize);
            let head = kind.starts_with("head");
            let per_sm = head1();
            if head && b == 1 && per_sm > 0 && k.is_multiple_of(8) && k <= 8 * 256 {
                // (The head after the five launches a layer: no partial rows.)
                let a = if kind == "head" { Gemv { parts: 0, np: 0, ..a } } else { a };
                let smem = (k * 2).next_multiple_of(16) + k * 4;
                let c = cfg(self.sms as usize * per_sm, 1, 256, smem as u32);
                let mut attrs = self.mma_attrs(head);
                super::HEAD1_RUNS.with(|r| r.set(r.get() + 1));
                // SAFETY: the argument matches dec_head1 in kernels/decode.cu
                // (k % 8 == 0, k <= 8 x its 256 threads, its shared memory).
                return unsafe { self.go_with("dec_head1", c, &mut [arg(&a)], &mut attrs) };
            }
            let row = (k + 8) * 2;
            // The fused MLP's too: a tile's 8 columns of the down projection
            // (k rows of 16 bytes) and 8 values a row.
            let extra = |bt: usize| if kind == "mlp" { 8 * k * 2 + 8 * bt * 4 } else { 0 };
            let mut bt = b.next_power_of_two().clamp(8, 64);
            while bt > 8 && bt * row + 8 * (bt / 8) * 512 + extra(bt) > SMEM_CAP {
                bt /= 2;
            }
            if 8 * row + 8 * 512 + extra(8) > SMEM_CAP {
                return Err(NnError::Other(format!("decode graph: width {k} is too wide to stage")));
            }
            // 8 warps for long rows (K split 8 ways) and big chunks (8
            // warps staging); blocks loop over tiles from 16 rows up, so
            // that fewer blocks stage the chunk.
            let warps = if k.div_ceil(32) >= 32 || bt >= 32 { 8 } else { 4 };
            let smem = mma_smem(k, bt, warps) + extra(bt);
            let tiles = if matches!(kind, "qkv" | "gateup" | "mlp") { n.div_ceil(8) } else { n.div_ceil(16) };
            // (The head's blocks also merge their argmax into one key per
            // row with a global atomic each: fewer blocks, less contention.)
            // At 8 rows, 2 head blocks an SM (H200, SmolLM2-135M, batch 1:
            // 0.448 against 0.462 ms a step with 8 an SM; 1 an SM 0.457,
            // 4 0.455-0.461, 12 0.467, 24 0.494; docs/results.md §5).
            let blocks = if head && bt == 8 {
                tiles.min(SMS * 2)
            } else if head || bt > 8 {
                tiles.min(SMS * 256 / bt.max(32))
            } else {
                tiles
            };
            let c = cfg(blocks, b.div_ceil(bt), warps as u32 * 32, smem as u32);
            let mut attrs = self.mma_attrs(head);
            // SAFETY: the argument matches tc_{kind}_{bt} in kernels/decode.cu.
            unsafe { self.go_with(&format!("tc_{kind}_{bt}"), c, &mut [arg(&a)], &mut attrs) }
        }
    }

    /// Steps of up to 8 rows as one persistent kernel (`PIPE_DECODE_MEGA=1`;
    /// off by default: on an H200 it is slower than the five launches per
    /// layer, 1.17 against 0.90 ms a SmolLM2-135M step at batch 1).
    /// `PIPE_DECODE_MEGA_MASK` (profiling; wrong results unless 63) picks
    /// the phases that run: decode.cu's `Mega::mask`.
    fn mega_on() -> bool {
        switch(&super::MEGA, || std::env::var("PIPE_DECODE_MEGA").is_ok_and(|v| v == "1"))
    }

    /// Steps of up to 8 rows as the streamed persistent kernel
    /// (`PIPE_DECODE_STREAM=1`).
    fn stream_on() -> bool {
        switch(&super::STREAM, || std::env::var("PIPE_DECODE_STREAM").is_ok_and(|v| v == "1"))
    }

    /// decode.cu's `SNT`, `NSLOT`; the streamed kernels' padded batch
    /// sizes; their static shared memory (at most).
    const STREAM_THREADS: u32 = 256;
    const STREAM_SLOTS: usize = 8;
    const STREAM_BT: [usize; 4] = [1, 2, 4, 8];
    const STREAM_STATIC: usize = 1024;
    /// decode.cu's `SCH_MAX`: rows a ring slot holds at most.
    const STREAM_ROWS_MAX: usize = 192;

    /// The streamed step's ring slot in weight rows (at most
    /// [`STREAM_ROWS_MAX`]) and its dynamic shared memory: the ring, the
    /// staged rows (bf16), the SwiGLU values of a slot's units a row, the attention output
    /// of each row, the scaled query, 8 warps' partial attention and the
    /// layer table (decode.cu's `StreamLayer`, 11 addresses a layer). None
    /// where a slot would hold fewer than 3 rows.
    fn stream_ch(c: &crate::nn::config::LlamaConfig, b: usize, optin: usize) -> Option<(usize, usize)> {
        let (h, hd) = (c.hidden_size, c.head_dim());
        let fixed = b * h * 2
            + STREAM_ROWS_MAX / 3 * b * 4
            + b * hd * 4
            + hd * 4
            + (8 * (hd + 2) * 4).next_multiple_of(16)
            + c.num_hidden_layers * 11 * 8;
        let ch = (optin.checked_sub(STREAM_STATIC + fixed)? / (STREAM_SLOTS * h * 2)).min(STREAM_ROWS_MAX);
        (ch >= 3).then_some((ch, STREAM_SLOTS * ch * h * 2 + fixed))
    }

    /// Gate/up, SwiGLU and the down projection as one kernel a layer
    /// (`PIPE_DECODE_MLP=1`; off by default: on an H200, SmolLM2-135M,
    /// 2026-12-03, 1.03-1.04x at batch 1 but 0.98x at 8 and 0.85x at 64,
    /// see docs/results.md): decode.cu's
    /// `OUT_MLP`, the down projection's shares summed into the residual
    /// with f32 reductions, so a step's sums vary in their last bits from
    /// run to run.
    fn mlp_fused() -> bool {
        switch(&super::MLP, || std::env::var("PIPE_DECODE_MLP").is_ok_and(|v| v == "1"))
    }

    /// The largest (padded) step that runs as two cluster kernels a layer
    /// (`PIPE_DECODE_LAY`): [`LAY_BMAX`] rows by default (on an H200 they
    /// are faster than the five launches at batches 1 and 2,
    /// docs/results.md §5), `0`: never.
    fn lay_max() -> usize {
        let on = switch(&super::LAY, || match std::env::var("PIPE_DECODE_LAY").as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            _ => None,
        });
        if on == Some(false) {
            0
        } else {
            LAY_BMAX
        }
    }

    /// Whether a step of `b` (padded) rows runs as two cluster kernels a
    /// layer: at most [`lay_max`] rows, and a shape
    /// decode.cu's `lay_attn` / `lay_mlp` take: head dims 64 or 128, the
    /// hidden size a multiple of 8 [`LAY_C`] and at most 1,024 (a float4 a
    /// thread of 256; the LM head's 128 threads take two), the MLP in whole
    /// clusters of 16-unit blocks, at most [`LAY_PMAX`] of them, and both
    /// kernels' shared memory within [`SMEM_CAP`].
    pub(super) fn lay_fits(c: &crate::nn::config::LlamaConfig, b: usize) -> bool {
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        b <= lay_max()
            && matches!(hd, 64 | 128)
            && h.is_multiple_of(8 * LAY_C)
            && h <= 1024
            && i.is_multiple_of(LAY_UB * LAY_C)
            && i / (LAY_UB * LAY_C) <= LAY_PMAX
            && c.kv_heads() <= LAY_PMAX
            && la_smem(c) <= SMEM_CAP
            && lb_smem(c, b) <= SMEM_CAP
    }

    /// Whether a one-row step of the two cluster kernels runs as one
    /// persistent kernel (decode.cu's `dec_lp_*`), and whether its launch
    /// is cooperative (the driver then refuses a grid whose blocks cannot
    /// all be resident): `PIPE_DECODE_LP=0` None (off), `=nocoop`
    /// Some(false), else Some(true).
    fn lp_mode() -> Option<bool> {
        match std::env::var("PIPE_DECODE_LP").as_deref() {
            Ok("0") => None,
            Ok("nocoop") => Some(false),
            _ => Some(true),
        }
    }

    /// Whether the one-row persistent step also runs the LM head
    /// (`PIPE_DECODE_LP_HEAD=1`; `dec_lph_*`: its
    /// blocks take the head's tiles once the last layer's MLP blocks have
    /// arrived, instead of a kernel of its own after it). Off by default:
    /// on an H200 a step at a time is ~4% slower with it (0.374 against
    /// 0.359 ms a SmolLM2 step), and launches of 8 with it are slower
    /// than one step a launch without it (`pipe serve`, one streamed
    /// request: 2,731-2,754 against 2,835-2,851 tok/s; docs/results.md
    /// §5). Without it a launch of several steps is each step's
    /// persistent kernel and head kernel in turn, the head's last block
    /// feeding the next step.
    fn lp_head() -> bool {
        switch(&super::LP_HEAD, || std::env::var("PIPE_DECODE_LP_HEAD").is_ok_and(|v| v == "1"))
    }

    /// decode.cu's `mma_proj` shared memory (its OUT_MLP extra aside): `bt`
    /// staged rows of width `k` (padded by 8), then `warps` warps' partial
    /// sums of a tile.
    fn mma_smem(k: usize, bt: usize, warps: usize) -> usize {
        (bt * (k + 8) * 2).next_multiple_of(16) + warps * (bt / 8) * 4 * 32 * 4
    }

    /// Chained greedy steps a launch of the one-row persistent step
    /// (`PIPE_DECODE_LP_STEPS=K`, 1 to [`LP_STEPS_MAX`], 4 by default):
    /// the last block of each step's LM head feeds its argmax's embedding
    /// row to the next step (Gemv's `feed`, or decode.cu's `lp_feed`
    /// with the head inside the step, [`lp_head`]): no input kernel or
    /// graph between them, and the host's inputs read once a launch. On
    /// an H100 (SmolLM2-135M, 100-position prompts, 128 steps, three
    /// rounds, ms a step) 4: 0.3709 / 0.3704 / 0.3704, 8: 0.3704 / 0.3699
    /// / 0.3714, 1: 0.3758 / 0.3740 / 0.3749 (docs/results.md §5). 4
    /// rather than 8: a sequence that stops (or a request that arrives)
    /// waits for at most two launches, and wastes at most 3 steps.
    fn chain_steps_wanted() -> usize {
        let k = switch(&super::LP_STEPS, || {
            std::env::var("PIPE_DECODE_LP_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(4)
        });
        k.clamp(1, LP_STEPS_MAX)
    }

    /// The most chained steps a launch ([`chain_steps_wanted`]): the keys' slots
    /// of a half of `host_best` (the buffers hold at least 8 rows).
    const LP_STEPS_MAX: usize = 8;

    /// u32 counters of a launch of `steps` one-row persistent steps: 2 a
    /// layer and the LM head's count of finished blocks; with more than
    /// one step, as many again for each step after them (its 2 a layer and
    /// the one its token's feed adds to).
    fn lp_counters(nl: usize, steps: usize) -> usize {
        (2 * nl + 1) * if steps > 1 { steps + 1 } else { 1 }
    }

    /// The one-row persistent step's kernel.
    fn lp_name(hd: usize, rep: usize, head: bool) -> String {
        format!("{}_{hd}_{rep}", if head { "dec_lph" } else { "dec_lp" })
    }

    /// Nanoseconds a waiting block of that step sleeps between its polls
    /// of a counter (`PIPE_DECODE_LP_SLEEP`, 0: none). 250 by default: on
    /// an H200 (one call, two rounds, ms a step) 0: 0.372 / 0.366, 32:
    /// 0.369 / 0.369, 100: 0.359 / 0.371, 250: 0.363 / 0.360, 600: 0.388 /
    /// 0.390 (docs/results.md §5).
    fn lp_sleep() -> i32 {
        std::env::var("PIPE_DECODE_LP_SLEEP").ok().and_then(|v| v.parse().ok()).unwrap_or(250)
    }

    /// Whether the one-row persistent step's MLP clusters add their
    /// partial rows into one row a layer with f32 atomics (decode.cu's
    /// `LayP::acc`), so that the next layer's attention blocks and the LM
    /// head read the residual as two rows instead of 1 + intermediate /
    /// 128 (SmolLM2-135M: 13). On by default (`PIPE_DECODE_LP_ACC=0`:
    /// the partial rows, summed in a fixed order): on an H100, SmolLM2-135M
    /// shape, `decode_bench --greedy`, three rounds, 0.3838-0.3867 ms a
    /// step against 0.3934-0.3954 (1.02x); on an H200 0.3439-0.3457
    /// against 0.3510-0.3516 (1.02x). The same for the attention's
    /// output projections (the MLP reading two rows instead of 1 + kv
    /// heads) gained nothing more (0.3851-0.3872) and was not kept
    /// (docs/results.md §5). The sums' order, and so the logits' last
    /// bits, vary from run to run, as the five-launch kernels' do. Models
    /// of one layer never do.
    fn lp_acc() -> bool {
        switch(&super::LP_ACC, || std::env::var("PIPE_DECODE_LP_ACC").map_or(true, |v| v != "0"))
    }

    /// Whether the one-row persistent step of the zero-copy path is a
    /// programmatic launch after the kernel before it (its input kernel,
    /// or the step before's LM head in a launch of several): its blocks
    /// wait there at their start instead of being launched once that
    /// kernel ends. On by default (`PIPE_DECODE_LP_PDL=0`: off): on an
    /// H100 (SmolLM2-135M, 100-position prompts, one step a launch, three
    /// rounds) 0.3758 / 0.3740 / 0.3749 ms a step against 0.3774 / 0.3743
    /// / 0.3762 (docs/results.md §5).
    fn lp_pdl() -> bool {
        switch(&super::LP_PDL, || std::env::var("PIPE_DECODE_LP_PDL").map_or(true, |v| v != "0"))
    }

    /// The launch attribute of a programmatic dependent launch, if `pdl`
    /// and `PIPE_DECODE_PDL` is not 0.
    fn pdl_attr(pdl: bool) -> Option<sys::CUlaunchAttribute> {
        if !(pdl && pdl_on()) {
            return None;
        }
        // SAFETY: a plain C struct; zero is a valid value of every field.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        Some(attr)
    }

    /// The launch attribute of `w`: its persisting share, the rest
    /// streaming (a graph's kernel node keeps it).
    fn window_attr(w: &L2Window) -> sys::CUlaunchAttribute {
        // SAFETY: as in pdl_attr.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW;
        attr.value.accessPolicyWindow = sys::CUaccessPolicyWindow {
            base_ptr: w.base as *mut c_void,
            num_bytes: w.bytes,
            hitRatio: w.hit,
            hitProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_PERSISTING,
            missProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_STREAMING,
        };
        attr
    }

    /// The LM head of one row on CUDA cores (decode.cu's `dec_head1`: warps
    /// over groups of 8 weight rows, no tile barriers) with this many
    /// blocks of 8 warps an SM instead of the tensor-core head
    /// (`tc_headp_8`), where the hidden size is a multiple of 8 and at
    /// most 2,048 (`PIPE_DECODE_HEAD1=n`, 2 by default; 0: the tensor-core
    /// head). SmolLM2-135M shape, `decode_bench --greedy`, 100-position
    /// prompts, ms a step, same call, rounds alternating: H200 2 an SM
    /// 0.3384-0.3390 against 0.3418-0.3439 (1.01x; 1: 0.3437-0.3443, 3:
    /// 0.3417-0.3425, 4: 0.3404-0.3411); H100 0.3768-0.3775 against
    /// 0.3801-0.3813 (docs/results.md §5). Inside the persistent step
    /// (`PIPE_DECODE_LP_HEAD=1`) the head stays the tensor-core code:
    /// this one was slower there.
    fn head1() -> usize {
        switch(&super::HEAD1, || std::env::var("PIPE_DECODE_HEAD1").ok().and_then(|v| v.parse().ok()).unwrap_or(2))
    }

    /// Whether the LM head's weights stay in L2 from one decode step to
    /// the next (`PIPE_DECODE_L2_HEAD`): the head kernel's launches carry
    /// an access-policy window over its weights, of which as many lines as
    /// the L2 set aside for persisting lines holds are kept there (the
    /// rest streamed); the layers' weights, read once a step, never
    /// evict them. `Some(0)`: set aside as much as the device allows
    /// (`max`), `Some(n)`: n MiB (20 by default), `None` (`0`): off.
    /// SmolLM2-135M's head is 54 MiB of bf16 (49,152 x 576), its 30
    /// layers 202 MiB; an H100's or H200's L2 is 50 MB. H200, the head on
    /// CUDA cores ([`head1`]), ms a step as for `head1`: 20 MiB
    /// 0.3371-0.3372 against 0.3380-0.3398 off (~0.5%; 16: 0.3368-0.3397,
    /// 24: 0.3363-0.3394, 12: 0.3378-0.3399, the most the H200 sets aside,
    /// 31.25 MiB: 0.3392-0.3412); with the tensor-core head on an H100 the
    /// most set aside also made 64 rows 4% slower (2.148 against 2.067
    /// ms), 24 MiB on the H200 not (docs/results.md §5).
    fn l2_head() -> Option<usize> {
        switch(&super::L2_HEAD, || match std::env::var("PIPE_DECODE_L2_HEAD").as_deref() {
            Ok("max") => Some(0),
            Ok(v) => v.parse().ok().filter(|&n| n > 0),
            Err(_) => Some(20),
        })
    }

    /// [`L2Window`] over `bytes` from `base` with `mib` MiB of L2 set
    /// aside (0: the device's most), the context's limit set to it; `None`
    /// where the device sets none aside.
    fn l2_window(stream: &CudaStream, base: u64, bytes: usize, mib: usize) -> Result<Option<L2Window>> {
        let ctx = stream.context();
        let most = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE).w()?;
        let win = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE).w()?;
        let (most, win) = (most.max(0) as usize, win.max(0) as usize);
        let set_aside = if mib == 0 { most } else { (mib << 20).min(most) };
        let bytes = bytes.min(win);
        if set_aside == 0 || bytes == 0 {
            return Ok(None);
        }
        ctx.bind_to_thread().w()?;
        // SAFETY: a context limit; the context is bound to this thread.
        unsafe { sys::cuCtxSetLimit(sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE, set_aside) }.result().w()?;
        Ok(Some(L2Window { base, bytes, set_aside, hit: (set_aside as f32 / bytes as f32).min(1.0) }))
    }

    /// Whether the one-row persistent step reads its inputs from, and
    /// writes its argmax keys to, mapped host memory itself (its embedding
    /// kernel and its LM head's last block) instead of copies before and
    /// after its kernels (`PIPE_DECODE_ZC=0`: copies).
    fn zero_copy() -> bool {
        switch(&super::ZERO_COPY, || std::env::var("PIPE_DECODE_ZC").map_or(true, |v| v != "0"))
    }

    /// Whether [`Llama::decode_greedy`] keeps one step in flight on the
    /// GPU (on by default; `PIPE_DECODE_CHAIN=0`: a step at a time).
    fn chain_on() -> bool {
        switch(&super::CHAIN, || std::env::var("PIPE_DECODE_CHAIN").map_or(true, |v| v != "0"))
    }

    /// dec_la: sequences of up to this many positions (at most
    /// `LAY_CH`) are attended whole by each block of a kv head's cluster,
    /// with no merge of the blocks' position ranges
    /// (`PIPE_DECODE_LA_WHOLE`, 64 by default; 0: never). Each block
    /// stages its own range of keys and pushes it to the others. On an
    /// H200 (SmolLM2-135M, batch 1, 20-position prompts and 64 steps, one
    /// call, three rounds) 64: 0.349-0.351 ms a step, 128: 0.350-0.357,
    /// 0: 0.354-0.363; at 100-position prompts 128 is slower than 0
    /// (docs/results.md §5).
    fn la_whole() -> i32 {
        switch(&super::LA_WHOLE, || {
            std::env::var("PIPE_DECODE_LA_WHOLE").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
        })
    }

    /// Profiling (`PIPE_DECODE_LAY_TIMES=1`): each step prints the phases
    /// of layer 3's two kernels (block 0's clock, converted at the rate the
    /// global timer shows over dec_la); `=2`: some phases run twice and
    /// the second pass is printed too (a cold first pass is instruction
    /// or data fetch, not work).
    fn lay_times() -> u8 {
        match std::env::var("PIPE_DECODE_LAY_TIMES").as_deref() {
            Ok("1") => 1,
            Ok("2") => 2,
            _ => 0,
        }
    }

    /// `lay_times`' line: `t[i]` decode.cu's LAY_T(i) clock, `t[32 + i]`
    /// its global timer (ns).
    fn print_lay_times(t: &[i64]) {
        let ghz = (t[13] - t[0]) as f64 / (t[32 + 13] - t[32]).max(1) as f64;
        let us = |i: usize, j: usize| (t[j] - t[i]) as f64 / (1000.0 * ghz);
        let la: Vec<String> = (1..14).map(|i| format!("{:.2}", us(i - 1, i))).collect();
        let lb: Vec<String> = (17..24).map(|i| format!("{:.2}", us(i - 1, i))).collect();
        let mut line = format!("lay times us ({ghz:.2} GHz): attn [{}] mlp [{}]", la.join(" "), lb.join(" "));
        if t[64] != 0 {
            line += &format!(
                " persistent kernel: start to wait {:.2} us, wait to end {:.2} us",
                (t[65] - t[64]) as f64 / 1000.0,
                (t[66] - t[65]) as f64 / 1000.0
            );
        }
        if t[14] != 0 {
            line += &format!(
                " attn setup: qkv rows {:.2} o rows {:.2} keys {:.2} rotary {:.2} cluster sync {:.2}",
                us(0, 14),
                us(14, 15),
                us(15, 24),
                us(24, 30),
                us(30, 1)
            );
        }
        if t[25] != 0 {
            line += &format!(
                " second pass: norm {:.2}/{:.2} qkv {:.2}/{:.2} o {:.2}/{:.2} mlp norm {:.2}/{:.2} mlp {:.2}/{:.2}",
                us(2, 3),
                us(3, 25),
                us(4, 5),
                us(5, 26),
                us(12, 13),
                us(13, 27),
                us(18, 19),
                us(19, 28),
                us(20, 21),
                us(21, 29)
            );
        }
        eprintln!("{line}");
    }

    /// decode.cu's `lay_attn` shared memory (its layout comment).
    fn la_smem(c: &crate::nn::config::LlamaConfig) -> usize {
        let (h, hd) = (c.hidden_size, c.head_dim());
        let rep = c.num_attention_heads / c.kv_heads();
        let upb = ((rep + 2) * hd / 2).div_ceil(LAY_C);
        // Weight rows in tiles of 16, their strides padded by LAY_PAD.
        let (q_rows, o_rows) = ((2 * upb).next_multiple_of(16), (h / LAY_C).next_multiple_of(16));
        let bf16s =
            q_rows * (h + LAY_PAD) + o_rows * (rep * hd + LAY_PAD) + 2 * LAY_CH * (hd + 8) + 2 * h + 2 * rep * hd;
        let f32s = 2 * hd
            + LAY_NW * (rep * hd).max(128)
            + (LAY_NW * rep * 2).next_multiple_of(4)
            + LAY_C * rep * hd
            + (LAY_C * rep * 2).next_multiple_of(4);
        bf16s * 2 + f32s * 4
    }

    /// decode.cu's `lay_mlp` shared memory for `b` rows: gate and up rows
    /// (padded), down columns, the staged rows, the norm's weights, SwiGLU
    /// values (bf16), the warps' gate/up sums and the partial rows.
    fn lb_smem(c: &crate::nn::config::LlamaConfig, b: usize) -> usize {
        let h = c.hidden_size;
        (2 * LAY_UB * (h + LAY_PAD) + h * LAY_UB + b * h + h + b * LAY_UB) * 2 + (LAY_NW * 2 * LAY_UB * b + b * h) * 4
    }

    /// What the switches that shape a recorded step read now.
    type Variant = (bool, usize, bool, bool, bool, bool, usize, i32, bool, bool);

    fn variant() -> Variant {
        let lay = (lay_max(), la_whole(), zero_copy(), lp_head());
        (mega_on(), tc_from(), pdl_on(), attn_chunked(), mlp_fused(), stream_on(), lay.0, lay.1, lay.2, lay.3)
    }

    /// A switch: this thread's test setting, else what `env` reads.
    fn switch<T: Copy + 'static>(
        test: &'static std::thread::LocalKey<std::cell::Cell<Option<T>>>,
        env: impl FnOnce() -> T,
    ) -> T {
        test.with(|t| t.get()).unwrap_or_else(env)
    }

    /// The five-launch step's attention: chunked (decode.cu's
    /// `attn_chunked`: a block's first keys and values copied before it
    /// waits for the q/k/v kernel, a warp's own softmax per 32 positions)
    /// unless `PIPE_DECODE_ATTN=tile` (`attn`: a thread per position of a
    /// 128-position tile, as the persistent step runs it).
    fn attn_chunked() -> bool {
        switch(&super::ATTN_CHUNKED, || std::env::var("PIPE_DECODE_ATTN").map_or(true, |v| v != "tile"))
    }

    /// Warps of a chunked attention block (decode.cu's `ATTNC_WARPS`).
    fn attnc_warps(hd: usize) -> usize {
        if hd <= 64 {
            8
        } else {
            4
        }
    }

    /// Dynamic shared memory of a chunked attention block (decode.cu's
    /// `attn_chunked`): keys and values of 32 positions a warp (rows padded
    /// by 8 elements), the scaled queries of up to 8 heads, and each
    /// warp's partial outputs and (max, sum)s.
    fn attnc_smem(hd: usize) -> usize {
        let nw = attnc_warps(hd);
        2 * 32 * nw * (hd + 8) * 2 + 8 * hd * 4 + nw * 8 * hd * 4 + nw * 8 * 2 * 4
    }

    /// Dynamic shared memory of the persistent step: 8 staged rows of the
    /// widest projection input (padded as in [`Graphs::mma`]) and 4 warps'
    /// partial sums.
    fn mega_smem(c: &crate::nn::config::LlamaConfig) -> usize {
        let k = c.hidden_size.max(c.intermediate_size).max(c.num_attention_heads * c.head_dim());
        (8 * (k + 8) * 2).next_multiple_of(16) + 4 * 4 * 32 * 4
    }

    /// Programmatic dependent launches (`PIPE_DECODE_PDL`, default on).
    fn pdl_on() -> bool {
        switch(&super::PDL, || std::env::var("PIPE_DECODE_PDL").map_or(true, |v| v != "0"))
    }

    /// Batch size from which projections run on tensor cores
    /// (`PIPE_DECODE_TC`: a size, or 0 for never; default 1: always).
    fn tc_from() -> usize {
        switch(&super::TC_FROM, || match std::env::var("PIPE_DECODE_TC").ok().and_then(|v| v.parse::<usize>().ok()) {
            Some(0) => usize::MAX,
            Some(n) => n,
            None => 1,
        })
    }

    /// A kernel argument for [`Graphs::go`].
    fn arg<T>(v: &T) -> *mut c_void {
        v as *const T as *mut c_void
    }

    fn cfg(x: usize, y: usize, threads: u32, smem: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (x as u32, y as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
    }

    /// Attention splits per (row, kv head): enough blocks to fill the GPU
    /// at small batches, at most 16 (the buffers are sized for 1 row).
    fn nsplit_max(b: usize, kv: usize) -> usize {
        (2 * SMS).div_ceil(b * kv).clamp(1, 16)
    }

    /// [`nsplit_max`], or fewer where a test says.
    fn nsplit(b: usize, kv: usize) -> usize {
        let n = nsplit_max(b, kv);
        super::NSPLIT.with(|t| t.get()).map_or(n, |o| o.clamp(1, n))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::nn::config::LlamaConfig;
    use crate::nn::infer::{argmax, rows_f32, KvCache};
    use crate::nn::llama::{Llama, TrainSpec};
    use crate::nn::Result;

    /// Drops `m`'s decode graphs and buffers (CUDA builds), so that the
    /// next steps record theirs: the tests' counters count graphs recorded.
    fn fresh_graphs(m: &Llama) {
        #[cfg(feature = "cuda")]
        {
            *m.decode.inner.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = m;
    }

    fn config(hidden: usize, heads: usize, kv: usize, tied: bool) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": tied, "max_position_embeddings": 512,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        }))
        .expect("valid config")
    }

    /// `n` sequences prefilled (lengths `extra` + 3..~200: one and several
    /// attention tiles or chunks), then `steps` decode steps through `step_next` on `m` (fast),
    /// through the candle path on `m` (slow) and on `exact` (the same
    /// weights in f64 on the CPU); returns the worst relative logit error of
    /// the fast and of the slow path against the exact one.
    fn compare(m: &Llama, exact: &Llama, n: usize, steps: usize, graphs: bool, extra: usize) -> Result<(f64, f64)> {
        super::GRAPHS_OFF.with(|off| off.set(!graphs));
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|i| (0..extra + 3 + (i * 37 + 11) % 200).map(|t| ((t * 13 + i * 7) % 300) as u32).collect())
            .collect();
        let new = || (0..n).map(|_| KvCache::new()).collect::<Vec<_>>();
        let (mut fast, mut slow, mut ex) = (new(), new(), new());
        for (i, p) in prompts.iter().enumerate() {
            m.step(&[p], &mut [&mut fast[i]])?;
            m.step(&[p], &mut [&mut slow[i]])?;
            exact.step(&[p], &mut [&mut ex[i]])?;
        }
        let mut feed: Vec<u32> = (0..n as u32).map(|i| i * 5 % 300).collect();
        let rel = |a: &[f32], r: &[f32]| {
            let scale = r.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            a.iter().zip(r).fold(0f64, |acc, (x, y)| acc.max((x - y).abs() as f64)) / scale
        };
        let (mut worst_fast, mut worst_slow) = (0f64, 0f64);
        for step in 0..steps {
            let toks: Vec<&[u32]> = feed.iter().map(std::slice::from_ref).collect();
            let want: Vec<bool> = (0..n).map(|i| (i + step) % 3 != 0).collect();
            let next = m.step_next(&toks, &mut fast.iter_mut().collect::<Vec<_>>(), &want)?;
            let sl = rows_f32(&m.step(&toks, &mut slow.iter_mut().collect::<Vec<_>>())?)?;
            let r = rows_f32(&exact.step(&toks, &mut ex.iter_mut().collect::<Vec<_>>())?)?;
            assert_eq!(next.argmax.len(), n);
            for i in 0..n {
                assert_eq!(next.logits[i].is_some(), want[i], "logits only where asked");
                if let Some(l) = &next.logits[i] {
                    assert_eq!(next.argmax[i], argmax(l), "the device argmax is the logits' argmax");
                    worst_fast = worst_fast.max(rel(l, &r[i]));
                    worst_slow = worst_slow.max(rel(&sl[i], &r[i]));
                }
                // Where the exact best token is clear, the fast path picks it.
                let best = argmax(&r[i]) as usize;
                let second = r[i].iter().enumerate().filter(|&(j, _)| j != best).fold(f32::MIN, |a, (_, &v)| a.max(v));
                if r[i][best] - second > 0.1 * r[i][best].abs().max(1.0) {
                    assert_eq!(next.argmax[i] as usize, best, "row {i} step {step}");
                }
            }
            assert!(fast.iter().zip(&slow).all(|(a, b)| a.len() == b.len()));
            feed = next.argmax;
        }
        super::GRAPHS_OFF.with(|off| off.set(false));
        Ok((worst_fast, worst_slow))
    }

    /// The fused decode step against exact (f64) logits, no worse than the
    /// candle path in bf16 (run on the GPU machine; skipped elsewhere): head
    /// dims 64 and 128, 2 and 4 query heads per kv head, tied and untied
    /// heads, batches of 1, 3 (padded to 4), 20 and 70 (padded to 128: two
    /// chunks of 64 rows on tensor cores; 20 is two chunks of 16 for the
    /// dot products), tensor cores and dot products, with the graph and
    /// without, and a pool that grows (recapture) on the way.
    #[test]
    fn decode_graph_steps_match_the_candle_path_on_cuda() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        // The two cluster kernels a layer (the default for 1 and 2 rows
        // where the shape fits): head dims 64 and 128, 2 query heads a kv
        // head, tied and untied heads, through graphs and not, prompts of
        // up to ~500 positions (a block's range in one chunk) and of ~1,200
        // (several chunks a block).
        super::LAY.with(|t| t.set(Some(Some(true))));
        // SmolLM2-135M's shape (what the benchmarks measure) takes them at 1 and 2 rows.
        #[cfg(feature = "cuda")]
        {
            let mut smol = config(576, 9, 3, true);
            smol.intermediate_size = 1536;
            smol.num_hidden_layers = 30;
            smol.vocab_size = 49152;
            assert!(super::imp::lay_fits(&smol, 1) && super::imp::lay_fits(&smol, 2), "{smol:?}");
        }
        for cfg in [config(256, 4, 2, true), config(256, 2, 1, false)] {
            let mut long = cfg.clone();
            long.max_position_embeddings = 2048;
            for (cfg, extra) in [(cfg, 0), (long, 1100)] {
                let m = crate::nn::tests::tiny_model_on(&cfg, &TrainSpec::default(), DType::BF16, &dev)?;
                let exact = crate::nn::tests::tiny_model(&cfg, &TrainSpec::default(), DType::F64)?;
                #[cfg(feature = "cuda")]
                assert!(super::imp::lay_fits(&cfg, 2), "{cfg:?}");
                // (Short prompts also with every block of a cluster
                // attending the whole sequence, PIPE_DECODE_LA_WHOLE.)
                // (And one row with its inputs and keys copied by the
                // graph instead of by its kernels, PIPE_DECODE_ZC=0.)
                let wholes: &[(i32, bool)] =
                    if extra == 0 { &[(0, true), (128, true), (0, false)] } else { &[(0, true)] };
                let cases = [(1, true, extra), (2, false, extra), (1, false, extra), (2, true, 300)];
                for (&(whole, zc), (n, graphs, extra)) in wholes.iter().flat_map(|w| cases.map(|c| (w, c))) {
                    super::LA_WHOLE.with(|t| t.set(Some(whole)));
                    super::ZERO_COPY.with(|t| t.set(Some(zc)));
                    let (runs, zc_runs) = (super::LAY_RUNS.with(|r| r.get()), super::ZC_RUNS.with(|r| r.get()));
                    let (fast, slow) = compare(&m, &exact, n, 4, graphs, extra)?;
                    let what = format!(
                        "batch {n} graphs {graphs} prompts +{extra} whole {whole} zero-copy {zc}, two kernels a layer"
                    );
                    eprintln!("hd {} {what}: max rel logit error fused {fast:.4}, candle {slow:.4}", cfg.head_dim());
                    assert!(fast < 1.5 * slow + 0.005, "{what}: fused {fast} against candle's {slow}");
                    assert!(super::LAY_RUNS.with(|r| r.get()) > runs || graphs, "{what}: the two kernels ran");
                    // (Without a graph every step records: one row is the
                    // persistent step, which does its own copies if asked.)
                    let zc_ran = super::ZC_RUNS.with(|r| r.get()) > zc_runs;
                    assert!(graphs || zc_ran == (zc && n == 1), "{what}: zero-copy steps ran: {zc_ran}");
                }
                // The LM head inside the persistent step (PIPE_DECODE_LP_HEAD):
                // one row, zero-copy through graphs, copies without.
                super::LP_HEAD.with(|t| t.set(Some(true)));
                for (zc, graphs) in [(true, true), (false, false)] {
                    super::ZERO_COPY.with(|t| t.set(Some(zc)));
                    let runs = super::LP_HEAD_RUNS.with(|r| r.get());
                    let (fast, slow) = compare(&m, &exact, 1, 4, graphs, extra)?;
                    let what = format!("batch 1 graphs {graphs} prompts +{extra} zero-copy {zc}, the head in the step");
                    eprintln!("hd {} {what}: max rel logit error fused {fast:.4}, candle {slow:.4}", cfg.head_dim());
                    assert!(fast < 1.5 * slow + 0.005, "{what}: fused {fast} against candle's {slow}");
                    assert!(super::LP_HEAD_RUNS.with(|r| r.get()) > runs, "{what}: the step with the head ran");
                }
                super::LP_HEAD.with(|t| t.set(None));
                super::ZERO_COPY.with(|t| t.set(None));
                // The MLP's sums added into one row a layer
                // (PIPE_DECODE_LP_ACC), the head a kernel of its own and
                // inside the step, through graphs and without.
                // (The default, on: the cases above. Fresh graphs for each
                // case: the counter counts graphs recorded.)
                for (acc, head, graphs) in
                    [(false, false, true), (false, true, true), (true, true, true), (true, false, false)]
                {
                    super::LP_ACC.with(|t| t.set(Some(acc)));
                    super::LP_HEAD.with(|t| t.set(Some(head)));
                    fresh_graphs(&m);
                    let runs = super::LP_ACC_RUNS.with(|r| r.get());
                    let (fast, slow) = compare(&m, &exact, 1, 4, graphs, extra)?;
                    let what = format!(
                        "batch 1 graphs {graphs} prompts +{extra} head inside {head}, MLP sums a row a layer {acc}"
                    );
                    eprintln!("hd {} {what}: max rel logit error fused {fast:.4}, candle {slow:.4}", cfg.head_dim());
                    assert!(fast < 1.5 * slow + 0.005, "{what}: fused {fast} against candle's {slow}");
                    assert_eq!(
                        super::LP_ACC_RUNS.with(|r| r.get()) > runs,
                        acc,
                        "{what}: the step with the sums a row ran"
                    );
                }
                super::LP_ACC.with(|t| t.set(None));
                super::LP_HEAD.with(|t| t.set(None));
                // The LM head's weights kept in L2 (PIPE_DECODE_L2_HEAD, a
                // cache hint: the same results), at the device's most and
                // at 1 MiB, one row (the head on CUDA cores) and two (on
                // tensor cores).
                for (mib, n) in [(0, 1), (1, 2)] {
                    super::L2_HEAD.with(|t| t.set(Some(Some(mib))));
                    fresh_graphs(&m);
                    let runs = super::L2_HEAD_RUNS.with(|r| r.get());
                    let (fast, slow) = compare(&m, &exact, n, 4, true, extra)?;
                    let what = format!("batch {n} prompts +{extra}, the head's weights in L2 ({mib} MiB)");
                    let w = m.decode_l2_head();
                    eprintln!(
                        "hd {} {what}: max rel logit error fused {fast:.4}, candle {slow:.4}, window {w:?}",
                        cfg.head_dim()
                    );
                    assert!(fast < 1.5 * slow + 0.005, "{what}: fused {fast} against candle's {slow}");
                    let (bytes, set_aside, hit) = w.expect("the device sets L2 aside");
                    assert_eq!(bytes, cfg.vocab_size * cfg.hidden_size * 2, "{what}");
                    assert!(mib == 0 || set_aside == 1 << 20, "{what}: {set_aside}");
                    assert_eq!(hit, (set_aside as f32 / bytes as f32).min(1.0), "{what}");
                    assert!(super::L2_HEAD_RUNS.with(|r| r.get()) > runs, "{what}: the head ran with the window");
                }
                super::L2_HEAD.with(|t| t.set(None));
                // The one-row LM head on CUDA cores (PIPE_DECODE_HEAD1), 1
                // and 3 blocks an SM, through graphs and without (the
                // default, 2, and the tensor-core head: the cases above).
                for (per_sm, graphs) in [(1, true), (3, false)] {
                    super::HEAD1.with(|t| t.set(Some(per_sm)));
                    fresh_graphs(&m);
                    let runs = super::HEAD1_RUNS.with(|r| r.get());
                    let (fast, slow) = compare(&m, &exact, 1, 4, graphs, extra)?;
                    let what =
                        format!("batch 1 graphs {graphs} prompts +{extra}, the head on CUDA cores ({per_sm} an SM)");
                    eprintln!("hd {} {what}: max rel logit error fused {fast:.4}, candle {slow:.4}", cfg.head_dim());
                    assert!(fast < 1.5 * slow + 0.005, "{what}: fused {fast} against candle's {slow}");
                    assert!(super::HEAD1_RUNS.with(|r| r.get()) > runs, "{what}: the head on CUDA cores ran");
                }
                super::HEAD1.with(|t| t.set(None));
                fresh_graphs(&m);
            }
        }
        super::LA_WHOLE.with(|t| t.set(None));
        super::LAY.with(|t| t.set(Some(Some(false))));
        for cfg in [config(256, 4, 2, true), config(512, 4, 1, false)] {
            let m = crate::nn::tests::tiny_model_on(&cfg, &TrainSpec::default(), DType::BF16, &dev)?;
            let exact = crate::nn::tests::tiny_model(&cfg, &TrainSpec::default(), DType::F64)?;
            assert!(m.decode_graph_ok());
            // The fused step no worse than the candle path (both against
            // the exact logits).
            let check = |what: &str, n: usize, steps: usize, graphs: bool, extra: usize| -> Result<()> {
                let (fast, slow) = compare(&m, &exact, n, steps, graphs, extra)?;
                eprintln!("hidden {} {what}: max rel logit error fused {fast:.4}, candle {slow:.4}", cfg.hidden_size);
                assert!(fast < 1.5 * slow + 0.005, "{what}: fused {fast} against candle's {slow}");
                Ok(())
            };
            // Tensor-core projections (the default; up to 8 rows as the
            // persistent kernel unless `mega` is off), then warp-per-row
            // dot products (other batch sizes: a graph is captured per
            // size). Programmatic dependent launches on, except for 8 rows.
            for (n, graphs, tc, mega) in [
                (1, true, true, true),
                (3, true, true, true),
                (1, true, true, false),
                (3, false, true, false),
                (20, true, true, true),
                (3, false, true, true),
                (70, true, true, true),
            ]
            .into_iter()
            .chain([
                (2, true, false, true),
                (20, false, false, true),
                (1, false, false, true),
                (8, true, true, true),
            ]) {
                super::TC_FROM.with(|t| t.set(Some(if tc { 1 } else { usize::MAX })));
                super::PDL.with(|t| t.set(Some(n != 8)));
                super::MEGA.with(|t| t.set(Some(mega)));
                check(&format!("batch {n} graphs {graphs} tensor cores {tc} persistent {mega}"), n, 5, graphs, 0)?;
            }
            super::TC_FROM.with(|t| t.set(None));
            super::PDL.with(|t| t.set(None));
            super::MEGA.with(|t| t.set(None));
            // The fused MLP (five-launch step) at batch sizes of one chunk
            // and of several (70: chunks of 64), through graphs and not.
            super::MEGA.with(|t| t.set(Some(false)));
            super::MLP.with(|t| t.set(Some(true)));
            for (n, graphs) in [(1, true), (3, false), (20, true), (70, true)] {
                check(&format!("batch {n} graphs {graphs} fused MLP"), n, 5, graphs, 0)?;
            }
            check("batch 2 fused MLP, long prompts", 2, 3, false, 300)?;
            super::MLP.with(|t| t.set(None));
            super::MEGA.with(|t| t.set(None));
            // The streamed persistent step: batches 1, 2, 3 (padded to 4) and
            // 8, through graphs and not, and long prompts (303-502 positions:
            // attention in rounds of 256, the first from the keys and values
            // loaded before the wait).
            super::STREAM.with(|t| t.set(Some(true)));
            let runs = super::STREAM_RUNS.with(|r| r.get());
            for (n, graphs) in [(1, true), (2, false), (3, true), (8, true)] {
                check(&format!("batch {n} graphs {graphs} streamed"), n, 5, graphs, 0)?;
            }
            check("batch 1 streamed, long prompts", 1, 3, true, 300)?;
            check("batch 3 streamed, long prompts", 3, 3, false, 300)?;
            assert!(super::STREAM_RUNS.with(|r| r.get()) > runs, "the streamed step ran");
            super::STREAM.with(|t| t.set(None));
            // The five-launch step's attention kinds on long prompts (314,
            // 351 and 388 positions and 3 steps: 2 chunks of 256 at head
            // dim 64, 3 or 4 of 128 at 128), without the graph (the splits
            // change between runs): chunked with a split per chunk, with
            // one split walking every chunk, with 3 splits (at head dim 128
            // the first walks chunks 0 and 3 of the third row), then the
            // tile kind.
            for (n, chunked, splits) in [(1, true, None), (2, true, Some(1)), (3, true, Some(3)), (1, false, None)] {
                super::ATTN_CHUNKED.with(|t| t.set(Some(chunked)));
                super::NSPLIT.with(|t| t.set(splits));
                check(&format!("batch {n} long prompts, chunked {chunked} splits {splits:?}"), n, 3, false, 300)?;
            }
            super::ATTN_CHUNKED.with(|t| t.set(None));
            super::NSPLIT.with(|t| t.set(None));
            // The tile kind through a graph (12 rows: a padded size of its own).
            super::ATTN_CHUNKED.with(|t| t.set(Some(false)));
            check("batch 12 tile attention", 12, 3, true, 0)?;
            super::ATTN_CHUNKED.with(|t| t.set(None));
            let prof = m.decode_profile(1, 3)?;
            super::LAY.with(|t| t.set(None));
            // (The tensor-core head keeps the argmax: its graph is empty.
            // The last entry, the whole step's graph, exists for batch 1
            // only when the last steps of that size ran through a graph.)
            assert!(prof.len() >= 8, "{prof:?}");
            assert!(prof.iter().filter(|(k, _)| k != "argmax").all(|(_, us)| *us > 0.0), "{prof:?}");
        }
        Ok(())
    }

    /// [`Llama::decode_greedy`] against [`Llama::step_next`] a step at a
    /// time on `m`: the same tokens, a stop where `on_token` says (the
    /// cache holding the fed tokens, going on from there as if never
    /// stopped), and its bad input refused.
    fn greedy_matches_steps(m: &Llama) -> Result<()> {
        let prompt: &[u32] = &[5, 9, 2, 7, 1, 3];
        let prefilled = |c: &mut KvCache| -> Result<u32> { Ok(m.step_next(&[prompt], &mut [c], &[false])?.argmax[0]) };
        let mut a = KvCache::new();
        let first = prefilled(&mut a)?;
        let (mut want, mut feed) = (Vec::new(), first);
        for _ in 0..7 {
            feed = m.step_next(&[&[feed]], &mut [&mut a], &[false])?.argmax[0];
            want.push(feed);
        }
        let mut b = KvCache::new();
        assert_eq!(prefilled(&mut b)?, first);
        let mut got = Vec::new();
        assert_eq!(
            m.decode_greedy(&mut b, first, 7, |t| {
                got.push(t);
                true
            })?,
            7
        );
        assert_eq!(got, want);
        assert_eq!(b.len(), a.len());
        // Stopped after 3 (the third token not fed), then 4 more.
        let mut c = KvCache::new();
        prefilled(&mut c)?;
        let mut got = Vec::new();
        let n = m.decode_greedy(&mut c, first, 7, |t| {
            got.push(t);
            got.len() < 3
        })?;
        assert_eq!((n, &got[..], c.len()), (3, &want[..3], prompt.len() + 3));
        let mut rest = Vec::new();
        m.decode_greedy(&mut c, got[2], 4, |t| {
            rest.push(t);
            true
        })?;
        assert_eq!(rest, want[3..]);
        assert_eq!(m.decode_greedy(&mut c, first, 0, |_| true)?, 0);
        let vocab = m.cfg.vocab_size as u32;
        let e = m.decode_greedy(&mut c, vocab, 1, |_| true).expect_err("outside the vocabulary").to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        let e = m.decode_greedy(&mut c, 1, m.cfg.max_position_embeddings, |_| true).expect_err("too long").to_string();
        assert!(e.contains("would pass the model's"), "{e}");
        Ok(())
    }

    #[test]
    fn greedy_decoding_is_steps_of_argmax() -> Result<()> {
        let cfg = crate::nn::tests::tiny_config("llama", true);
        let m = crate::nn::tests::tiny_model(&cfg, &TrainSpec::default(), DType::F32)?;
        greedy_matches_steps(&m)
    }

    /// On the GPU machine: the chain of graph steps (each step's argmax fed
    /// to the next on the device) gives the tokens of the graph a step at
    /// a time, and ran, also with the LM head inside the persistent step
    /// and with several steps a launch; with `PIPE_DECODE_CHAIN=0` a step
    /// at a time.
    #[test]
    fn greedy_chain_on_cuda_matches_steps() -> Result<()> {
        let Some(dev) = crate::nn::tests::cuda_device()? else { return Ok(()) };
        super::LAY.with(|t| t.set(Some(Some(true))));
        let m = crate::nn::tests::tiny_model_on(&config(256, 4, 2, true), &TrainSpec::default(), DType::BF16, &dev)?;
        assert!(m.decode_graph_ok());
        // (Also with the LM head inside the persistent step, and with
        // launches of 4 and of 3 steps: greedy_matches_steps' 7 steps as 4
        // + 3 and 3 + 3 + 1, stopped inside a launch and at its end. The
        // switches unset: 4 steps a launch, each step's head a kernel of
        // its own feeding the next step, unless PIPE_DECODE_LP_HEAD=1
        // puts it inside.)
        // (The MLP's sums a row a layer, PIPE_DECODE_LP_ACC, by default;
        // also without: one step a launch, and 4 with the head inside.)
        // (The one-row head on CUDA cores, PIPE_DECODE_HEAD1, by default
        // where the head is a kernel of its own; also the tensor-core
        // head; inside the persistent step always the tensor-core code.)
        // (PIPE_DECODE_LP_PDL=1: the persistent step a programmatic launch,
        // after the input kernel or the head of the step before.)
        for (chain, head, steps, acc, h1, pdl) in [
            (true, Some(false), Some(1), None, 0, false),
            (true, Some(true), Some(1), None, 0, false),
            (true, Some(true), Some(4), None, 0, false),
            (true, Some(true), Some(3), None, 0, false),
            (false, Some(false), Some(1), None, 0, false),
            (true, None, None, None, 0, false),
            (true, None, Some(4), None, 0, false),
            (true, Some(false), Some(4), None, 0, false),
            (true, Some(false), Some(1), Some(false), 0, false),
            (true, Some(true), Some(4), Some(false), 0, false),
            (true, Some(false), Some(1), None, 1, false),
            (false, Some(false), Some(1), None, 3, false),
            (true, Some(true), Some(4), None, 2, false),
            (true, None, Some(3), None, 2, false),
            (true, None, Some(4), Some(false), 1, false),
            (true, None, Some(1), None, 2, true),
            (true, None, Some(4), None, 2, true),
            (true, Some(true), Some(4), None, 0, true),
            (false, Some(false), Some(1), None, 2, true),
        ] {
            super::LP_ACC.with(|t| t.set(acc));
            super::CHAIN.with(|t| t.set(Some(chain)));
            super::LP_HEAD.with(|t| t.set(head));
            super::LP_STEPS.with(|t| t.set(steps));
            super::HEAD1.with(|t| t.set(Some(h1)));
            super::LP_PDL.with(|t| t.set(Some(pdl)));
            // (Fresh graphs: the counters count graphs recorded, and a case
            // before may have recorded this one's step counts: 4 + 3, then
            // 3 + 3 + 1.)
            fresh_graphs(&m);
            let runs = |r: &'static std::thread::LocalKey<std::cell::Cell<usize>>| r.with(|r| r.get());
            let before = [
                runs(&super::CHAIN_RUNS),
                runs(&super::LP_HEAD_RUNS),
                runs(&super::LP_STEPS_RUNS),
                runs(&super::LP_ACC_RUNS),
                runs(&super::HEAD1_RUNS),
                runs(&super::FEED_RUNS),
                runs(&super::LP_PDL_RUNS),
            ];
            greedy_matches_steps(&m)?;
            let what = format!(
                "chain {chain}, head {head:?}, {steps:?} steps a launch, MLP sums a row {acc:?}, head on CUDA cores {h1}, \
                 programmatic {pdl}"
            );
            assert_eq!(
                runs(&super::LP_ACC_RUNS) > before[3],
                acc.unwrap_or(true),
                "{what}: steps with the sums a row ran"
            );
            // (Unset: 4 steps a launch, the head a kernel of its own.)
            let several = chain && steps.unwrap_or(4) > 1;
            let inside = head == Some(true);
            // (Inside the step: the tensor-core head whatever HEAD1 says.)
            assert_eq!(runs(&super::HEAD1_RUNS) > before[4], h1 > 0 && !inside, "{what}: the head on CUDA cores ran");
            assert_eq!(runs(&super::CHAIN_RUNS) > before[0], chain, "{what}: chains ran");
            assert_eq!(runs(&super::LP_HEAD_RUNS) > before[1], inside, "{what}: the head in the step ran");
            assert_eq!(runs(&super::LP_STEPS_RUNS) > before[2], several, "{what}: launches of several steps ran");
            assert_eq!(
                runs(&super::FEED_RUNS) > before[5],
                several && !inside,
                "{what}: launches of several steps, each with its head kernel, ran"
            );
            assert_eq!(runs(&super::LP_PDL_RUNS) > before[6], pdl, "{what}: programmatic persistent steps ran");
        }
        super::HEAD1.with(|t| t.set(None));
        super::LP_PDL.with(|t| t.set(None));
        super::CHAIN.with(|t| t.set(None));
        super::LP_HEAD.with(|t| t.set(None));
        super::LP_STEPS.with(|t| t.set(None));
        super::LP_ACC.with(|t| t.set(None));
        super::LAY.with(|t| t.set(None));
        Ok(())
    }

    #[test]
    fn step_next_off_the_gpu_is_the_argmax_of_step() -> Result<()> {
        let cfg = crate::nn::tests::tiny_config("llama", true);
        let m = crate::nn::tests::tiny_model(&cfg, &TrainSpec::default(), DType::F32)?;
        assert!(!m.decode_graph_ok(), "CPU models take the candle path");
        let (mut a, mut b) = (KvCache::new(), KvCache::new());
        let p: &[u32] = &[1, 2, 3, 4];
        m.step(&[p], &mut [&mut b])?;
        let first = m.step_next(&[p], &mut [&mut a], &[true])?;
        let l = first.logits[0].clone().expect("asked for");
        assert_eq!(first.argmax[0], argmax(&l));
        let next = m.step_next(&[&[first.argmax[0]]], &mut [&mut a], &[false])?;
        let r = rows_f32(&m.step(&[&[first.argmax[0]]], &mut [&mut b])?)?;
        assert_eq!(next.argmax[0], argmax(&r[0]));
        assert!(next.logits[0].is_none());
        assert!(m.step_next(&[&[1]], &mut [&mut a], &[true, false]).is_err(), "one flag per sequence");
        assert!(m.step_next(&[&[400]], &mut [&mut a], &[false]).is_err(), "token outside the vocabulary");
        Ok(())
    }
}
