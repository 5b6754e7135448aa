//! Data parallelism's gradient all-reduce, in buckets, overlapping the
//! backward pass.
//!
//! Each replica (one thread per device) owns a [`GradSync`]. The trainable
//! variables are laid out once in the order the backward pass finishes
//! them (the last decoder layer first, the variables outside the layers
//! last) and cut into buckets of about [`bucket_bytes`] (PyTorch DDP's
//! `bucket_cap_mb`, 25 MB by default; `PIPE_DDP_BUCKET_MB` overrides it).
//! When the backward pass of a step's last micro-batch has finished a
//! layer ([`crate::nn::llama::Llama::loss_and_grads_into`]'s callback),
//! every bucket whose variables are all final is flattened into one buffer
//! and summed across the replicas while the earlier layers' gradients are
//! still being computed:
//! - over NCCL (the `nccl` feature, every replica on CUDA): an in-place
//!   all-reduce on a communication stream of its own, ordered after the
//!   gradients' kernels by an event and joined back before the optimizer;
//! - otherwise through host memory: each replica posts its buffer (as
//!   f32), and every replica sums all of them in replica order, so the
//!   replicas get bit-identical sums.
//!
//! Every replica reduces the same buckets in the same order (the layout
//! depends only on the variables), a gradient a replica did not produce
//! counting as zeros; one that no replica produced stays `None`.

use super::{NnError, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::sync::{Arc, Condvar, Mutex};

/// The bucket size: `PIPE_DDP_BUCKET_MB` megabytes (10^6 bytes), 25 unless set.
pub fn bucket_bytes() -> usize {
    std::env::var("PIPE_DDP_BUCKET_MB")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map_or(25_000_000, |mb| (mb * 1e6) as usize)
}

/// ZeRO-2's owner replica of each of `vars` among `n`: that of its bucket
/// (of [`bucket_bytes`]), as [`GradSync::var_owners`] gives it.
pub fn zero2_owners(vars: &[(String, Var)], n: usize) -> Vec<usize> {
    Layout::new(vars, bucket_bytes()).var_owners(n)
}

/// The decoder layer a variable belongs to, from its name
/// (`model.layers.{i}.…`, also under a PEFT prefix); None outside them.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    let digits = rest.split('.').next()?;
    digits.parse().ok()
}

/// The buckets, the same on every replica.
#[derive(Debug)]
struct Layout {
    /// Per variable: its decoder layer (None: reduced with the last bucket).
    layer: Vec<Option<usize>>,
    shapes: Vec<Vec<usize>>,
    buckets: Vec<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    vars: Vec<usize>,
    dtype: DType,
}

impl Layout {
    fn new(vars: &[(String, Var)], cap: usize) -> Layout {
        let layer: Vec<Option<usize>> = vars.iter().map(|(n, _)| layer_of(n)).collect();
        let mut order: Vec<usize> = (0..vars.len()).collect();
        // Last layer first; the variables outside the layers after all of them.
        order.sort_by_key(|&i| (layer[i].is_none(), std::cmp::Reverse(layer[i]), i));
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut bytes = 0;
        for i in order {
            let v = &vars[i].1;
            let dtype = v.dtype();
            let n = v.elem_count() * dtype.size_in_bytes();
            match buckets.last_mut() {
                Some(b) if b.dtype == dtype && bytes < cap => {
                    b.vars.push(i);
                    bytes += n;
                }
                _ => {
                    buckets.push(Bucket { vars: vec![i], dtype });
                    bytes = n;
                }
            }
        }
        Layout { layer, shapes: vars.iter().map(|(_, v)| v.dims().to_vec()).collect(), buckets }
    }

    /// ZeRO-2's owner of each bucket among `n` replicas: largest first to
    /// the replica holding the fewest bytes so far (ties to the lower index).
    fn owners(&self, n: usize) -> Vec<usize> {
        let bytes = |b: &Bucket| -> usize {
            b.vars.iter().map(|&i| self.shapes[i].iter().product::<usize>()).sum::<usize>() * b.dtype.size_in_bytes()
        };
        let mut order: Vec<usize> = (0..self.buckets.len()).collect();
        order.sort_by_key(|&k| (std::cmp::Reverse(bytes(&self.buckets[k])), k));
        let mut load = vec![0usize; n];
        let mut owner = vec![0usize; self.buckets.len()];
        for k in order {
            let r = (0..n).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            owner[k] = r;
            load[r] += bytes(&self.buckets[k]);
        }
        owner
    }

    /// [`Self::owners`] per variable: its bucket's owner.
    fn var_owners(&self, n: usize) -> Vec<usize> {
        let mut out = vec![0; self.shapes.len()];
        for (b, o) in self.buckets.iter().zip(self.owners(n)) {
            for &i in &b.vars {
                out[i] = o;
            }
        }
        out
    }
}

/// How the replicas exchange their buffers.
enum Link {
    Host(Arc<HostGroup>),
    #[cfg(feature = "nccl")]
    Nccl(nccl::Rank),
}

/// One replica's side of the reduction (see the module's documentation).
pub struct GradSync {
    rank: usize,
    link: Link,
    device: Device,
    layout: Arc<Layout>,
    /// This step: the variables whose gradients are final, and those this
    /// replica produced a gradient for.
    ready: Vec<bool>,
    present: Vec<bool>,
    /// The next bucket to reduce.
    next: usize,
    /// The reduced (or, over NCCL, being reduced) buffer of each bucket so
    /// far; None: sharded, another replica's bucket.
    sums: Vec<Option<Tensor>>,
    /// ZeRO-2: each bucket's sum goes only to its owner (None: to everyone).
    bucket_owner: Option<Vec<usize>>,
    /// Bytes of summed gradients this replica held after the last step.
    held: usize,
    /// This step's exchange of which gradients exist has been sent.
    presence_sent: bool,
    /// Seconds spent blocked in host exchanges this step.
    waited: f64,
}

impl GradSync {
    /// One [`GradSync`] per replica, for replica `r` on `devices[r]`, whose
    /// trainable variables (the same names and shapes on every replica)
    /// are `vars`. NCCL when built with it and every device is CUDA
    /// (`PIPE_DDP=host` forces host memory).
    pub fn group(devices: &[Device], vars: &[(String, Var)]) -> Result<Vec<GradSync>> {
        let host = std::env::var("PIPE_DDP").is_ok_and(|v| v == "host");
        Self::group_with(devices, vars, bucket_bytes(), host)
    }

    /// [`Self::group`] with buckets of `cap` bytes, over host memory if `host`.
    pub fn group_with(devices: &[Device], vars: &[(String, Var)], cap: usize, host: bool) -> Result<Vec<GradSync>> {
        let layout = Arc::new(Layout::new(vars, cap));
        let links: Vec<Link> = if !host && devices.iter().all(Device::is_cuda) && cfg!(feature = "nccl") {
            nccl_links(devices)?
        } else {
            let g = Arc::new(HostGroup::new(devices.len()));
            devices.iter().map(|_| Link::Host(g.clone())).collect()
        };
        Ok(links
            .into_iter()
            .enumerate()
            .map(|(rank, link)| GradSync {
                rank,
                link,
                device: devices[rank].clone(),
                layout: layout.clone(),
                ready: vec![false; vars.len()],
                present: vec![false; vars.len()],
                next: 0,
                sums: Vec::new(),
                bucket_owner: None,
                held: 0,
                presence_sent: false,
                waited: 0.0,
            })
            .collect())
    }

    /// ZeRO-2: from now on each bucket's sum goes only to the replica that
    /// owns it ([`Self::var_owners`]); the others drop their share once it
    /// is sent, so each holds about 1/n of the summed gradients.
    pub fn shard_gradients(&mut self) {
        self.bucket_owner = Some(self.layout.owners(self.world()));
    }

    /// ZeRO-2's owner replica of each variable: its bucket's.
    pub fn var_owners(&self) -> Vec<usize> {
        self.layout.var_owners(self.world())
    }

    /// Bytes of summed gradients this replica held after its last step.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// The sum of `x` over the replicas (e.g. the parts of a squared
    /// gradient norm), the same on every replica.
    pub fn sum_scalar(&mut self, x: f64) -> Result<f64> {
        let t = self.all_reduce(Tensor::new(&[x as f32], &self.device)?)?;
        #[cfg(feature = "nccl")]
        if let Link::Nccl(r) = &self.link {
            r.join()?;
        }
        Ok(t.to_device(&Device::Cpu)?.to_vec1::<f32>()?[0] as f64)
    }

    fn world(&self) -> usize {
        match &self.link {
            Link::Host(g) => g.n,
            #[cfg(feature = "nccl")]
            Link::Nccl(r) => r.world(),
        }
    }

    /// `nccl` or `host`: what carries the sums.
    pub fn transport(&self) -> &'static str {
        match self.link {
            Link::Host(_) => "host",
            #[cfg(feature = "nccl")]
            Link::Nccl(_) => "nccl",
        }
    }

    /// How many buckets a step reduces.
    pub fn n_buckets(&self) -> usize {
        self.layout.buckets.len()
    }

    /// Decoder layer `layer`'s gradients in `grads` are final for this step:
    /// start reducing every bucket that is now complete.
    pub fn layer_done(&mut self, layer: usize, grads: &mut [Option<Tensor>]) -> Result<()> {
        for (r, l) in self.ready.iter_mut().zip(&self.layout.layer) {
            if *l == Some(layer) {
                *r = true;
            }
        }
        self.flush(grads)
    }

    /// The step's backward pass is over: reduce what is left, wait for
    /// every sum and put the sums in `grads` (on this replica's device).
    /// Returns the seconds spent waiting for the other replicas in host
    /// exchanges (0 over NCCL, whose waits are on the GPU).
    pub fn finish(&mut self, grads: &mut [Option<Tensor>]) -> Result<f64> {
        self.ready.iter_mut().for_each(|r| *r = true);
        self.flush(grads)?;
        // Which gradients some replica produced (a count per variable).
        let present: Vec<f32> = self.present.iter().map(|&p| if p { 1.0 } else { 0.0 }).collect();
        let n = present.len();
        self.presence_sent = true;
        let present = self.all_reduce(Tensor::from_vec(present, n, &self.device)?)?;
        #[cfg(feature = "nccl")]
        if let Link::Nccl(r) = &self.link {
            r.join()?;
        }
        let present = present.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let layout = self.layout.clone();
        self.held = 0;
        for (b, flat) in layout.buckets.iter().zip(std::mem::take(&mut self.sums)) {
            let Some(flat) = flat else { continue };
            self.held += flat.elem_count() * flat.dtype().size_in_bytes();
            let mut off = 0;
            for &i in &b.vars {
                let shape = &layout.shapes[i];
                let len: usize = shape.iter().product();
                grads[i] =
                    (present[i] > 0.0).then(|| flat.narrow(0, off, len)?.reshape(shape.as_slice())).transpose()?;
                off += len;
            }
        }
        self.reset();
        Ok(std::mem::take(&mut self.waited))
    }

    /// This replica failed (or was cancelled) during the step: take part in
    /// the step's remaining exchanges with zeros, so the other replicas
    /// finish it instead of waiting in a collective forever; then forget
    /// the step. Errors here are ignored (the step is lost anyway).
    pub fn drain(&mut self) {
        let mut none: Vec<Option<Tensor>> = vec![None; self.ready.len()];
        self.ready.iter_mut().for_each(|r| *r = true);
        let _ = self.flush(&mut none);
        if !self.presence_sent {
            let n = self.present.len();
            if let Ok(t) = Tensor::zeros(n, DType::F32, &self.device) {
                let _ = self.all_reduce(t);
            }
        }
        #[cfg(feature = "nccl")]
        if let Link::Nccl(r) = &self.link {
            let _ = r.join();
        }
        self.sums.clear();
        self.reset();
    }

    fn reset(&mut self) {
        self.ready.iter_mut().for_each(|r| *r = false);
        self.present.iter_mut().for_each(|p| *p = false);
        self.next = 0;
        self.presence_sent = false;
    }

    /// ZeRO's broadcast over NCCL: variable i's value (`vars[i]`, this
    /// replica's copy) from replica `owner[i]`, which stepped it, to every
    /// other replica, in place; all replicas call it together. Host links
    /// refuse: the caller copies between devices itself.
    #[cfg_attr(not(feature = "nccl"), allow(unused_variables))]
    pub fn broadcast_owned(&mut self, vars: &[Var], owner: &[usize]) -> Result<()> {
        match &self.link {
            Link::Host(_) => Err(NnError::Other("broadcast_owned needs NCCL".into())),
            #[cfg(feature = "nccl")]
            Link::Nccl(r) => r.broadcast(vars.iter().map(|v| v.as_tensor()).zip(owner.iter().copied())),
        }
    }

    /// Tells the other replicas that this one will not take part in the
    /// step any more (it failed): their host exchanges return an error
    /// instead of waiting for it forever.
    pub fn abort(&self) {
        self.abort_handle().abort();
    }

    /// What [`Self::abort`] does, held apart from this `GradSync` (for a
    /// guard that aborts when the replica's thread panics).
    pub fn abort_handle(&self) -> AbortHandle {
        match &self.link {
            Link::Host(g) => AbortHandle(Some(g.clone())),
            #[cfg(feature = "nccl")]
            Link::Nccl(_) => AbortHandle(None),
        }
    }

    fn flush(&mut self, grads: &mut [Option<Tensor>]) -> Result<()> {
        let layout = self.layout.clone();
        while let Some(b) = layout.buckets.get(self.next) {
            if !b.vars.iter().all(|&i| self.ready[i]) {
                break;
            }
            let parts = b
                .vars
                .iter()
                .map(|&i| match &grads[i] {
                    Some(g) => g.to_dtype(b.dtype)?.flatten_all(),
                    None => Tensor::zeros(layout.shapes[i].iter().product::<usize>(), b.dtype, &self.device),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = Tensor::cat(&parts, 0)?;
            drop(parts);
            // The unreduced gradients are not needed any more.
            for &i in &b.vars {
                self.present[i] = grads[i].take().is_some();
            }
            let sum = match self.bucket_owner.as_ref().map(|o| o[self.next]) {
                Some(root) => self.reduce(flat, root)?,
                None => Some(self.all_reduce(flat)?),
            };
            self.sums.push(sum);
            self.next += 1;
        }
        Ok(())
    }

    /// `flat` through host memory: as f32 into `exchange(rank, values)`, its
    /// sum (if this replica gets one) back in `flat`'s dtype on this
    /// replica's device; the time spent in the exchange counted as waiting.
    fn host_exchange(
        &mut self,
        flat: &Tensor,
        exchange: impl FnOnce(usize, Vec<f32>) -> Result<Option<Vec<f32>>>,
    ) -> Result<Option<Tensor>> {
        let mine = flat.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let n = mine.len();
        let t = std::time::Instant::now();
        let sum = exchange(self.rank, mine)?;
        self.waited += t.elapsed().as_secs_f64();
        sum.map(|s| Ok(Tensor::from_vec(s, n, &Device::Cpu)?.to_dtype(flat.dtype())?.to_device(&self.device)?))
            .transpose()
    }

    /// The sum of `flat` over the replicas on replica `root` only (None on
    /// the others, whose buffer is freed once the send is done).
    fn reduce(&mut self, flat: Tensor, root: usize) -> Result<Option<Tensor>> {
        match &self.link {
            Link::Host(g) => {
                let g = g.clone();
                self.host_exchange(&flat, |rank, mine| g.reduce(rank, root, mine))
            }
            #[cfg(feature = "nccl")]
            Link::Nccl(r) => {
                r.reduce(&flat, root)?;
                Ok((root == self.rank).then_some(flat))
            }
        }
    }

    /// The sum of `flat` over the replicas: over NCCL, `flat` itself
    /// (summed in place, asynchronously); otherwise a new tensor.
    fn all_reduce(&mut self, flat: Tensor) -> Result<Tensor> {
        match &self.link {
            Link::Host(g) => {
                let g = g.clone();
                let sum = self.host_exchange(&flat, |rank, mine| g.all_reduce(rank, mine).map(Some))?;
                Ok(sum.expect("an all-reduce returns the sum"))
            }
            #[cfg(feature = "nccl")]
            Link::Nccl(r) => {
                r.all_reduce(&flat)?;
                Ok(flat)
            }
        }
    }
}

#[cfg(feature = "nccl")]
fn nccl_links(devices: &[Device]) -> Result<Vec<Link>> {
    Ok(nccl::ranks(devices)?.into_iter().map(Link::Nccl).collect())
}

#[cfg(not(feature = "nccl"))]
fn nccl_links(_: &[Device]) -> Result<Vec<Link>> {
    unreachable!("only called with the nccl feature")
}

/// Releases the other replicas' host exchanges ([`GradSync::abort`]); on
/// drop during a panic, it does so by itself.
pub struct AbortHandle(Option<Arc<HostGroup>>);

impl AbortHandle {
    pub fn abort(&self) {
        if let Some(g) = &self.0 {
            g.abort();
        }
    }
}

impl Drop for AbortHandle {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort();
        }
    }
}

/// The replicas' meeting point for host-memory all-reduces: a barrier that
/// can be broken ([`HostGroup::abort`]) and one slot per replica.
struct HostGroup {
    n: usize,
    state: Mutex<HostState>,
    turn: Condvar,
}

struct HostState {
    slots: Vec<Option<Arc<Vec<f32>>>>,
    /// Arrivals at the barrier in this generation, and the generation.
    arrived: usize,
    generation: u64,
    aborted: bool,
}

impl HostGroup {
    fn new(n: usize) -> HostGroup {
        HostGroup {
            n,
            state: Mutex::new(HostState { slots: vec![None; n], arrived: 0, generation: 0, aborted: false }),
            turn: Condvar::new(),
        }
    }

    fn abort(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.aborted = true;
        self.turn.notify_all();
    }

    /// Waits until all `n` replicas have arrived (or one aborted).
    fn barrier<'a>(&self, mut s: std::sync::MutexGuard<'a, HostState>) -> Result<std::sync::MutexGuard<'a, HostState>> {
        let aborted = || NnError::Other("another data-parallel replica failed".into());
        if s.aborted {
            return Err(aborted());
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.n {
            s.arrived = 0;
            s.generation += 1;
            self.turn.notify_all();
        } else {
            while s.generation == generation && !s.aborted {
                s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
        if s.aborted {
            return Err(aborted());
        }
        Ok(s)
    }

    /// Every replica's `mine`, summed in replica order, on replica `root`
    /// (None elsewhere).
    fn reduce(&self, rank: usize, root: usize, mine: Vec<f32>) -> Result<Option<Vec<f32>>> {
        if rank == root {
            return Ok(Some(self.all_reduce(rank, mine)?));
        }
        // Post, then wait while the root takes the buffers.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.slots[rank] = Some(Arc::new(mine));
        let s = self.barrier(s)?;
        drop(self.barrier(s)?);
        Ok(None)
    }

    /// Every replica's `mine`, summed in replica order (the same bits on
    /// every replica).
    fn all_reduce(&self, rank: usize, mine: Vec<f32>) -> Result<Vec<f32>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.slots[rank] = Some(Arc::new(mine));
        let s = self.barrier(s)?;
        let all: Vec<Arc<Vec<f32>>> = s.slots.iter().flatten().cloned().collect();
        // Nobody may post the next buffer before everyone has taken these.
        let s = self.barrier(s)?;
        drop(s);
        if all.len() != self.n || all.iter().any(|v| v.len() != all[0].len()) {
            return Err(NnError::Other("data-parallel replicas posted different buffers".into()));
        }
        let mut sum = all[0].as_ref().clone();
        for v in &all[1..] {
            for (a, b) in sum.iter_mut().zip(v.iter()) {
                *a += b;
            }
        }
        Ok(sum)
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::{NnError, Result};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::CudaStream;
    use candle_core::cuda::cudarc::nccl::safe::{group_end, group_start, Comm, NcclType, ReduceOp};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
    use std::sync::Arc;

    /// One replica's NCCL communicator, on a stream of its own next to
    /// candle's (`compute`).
    pub struct Rank {
        comm: Comm,
        compute: Arc<CudaStream>,
    }

    // SAFETY: an NCCL communicator may be used from any thread as long as
    // one thread at a time uses it; a `Rank` is owned by one replica's
    // thread for a step and moves between steps only with the thread's
    // join (cudarc leaves `Comm` !Send only for its raw pointer).
    unsafe impl Send for Rank {}

    fn err(e: impl std::fmt::Debug) -> NnError {
        NnError::Other(format!("nccl: {e:?}"))
    }

    /// A communicator for each device (`ncclCommInitAll`: one process,
    /// rank r on `devices[r]`).
    pub fn ranks(devices: &[Device]) -> Result<Vec<Rank>> {
        let mut computes = Vec::new();
        let mut streams = Vec::new();
        for d in devices {
            let Device::Cuda(c) = d else { return Err(NnError::Other("nccl needs CUDA devices".into())) };
            let compute = c.cuda_stream();
            // Buffers a reduce has sent are freed at once on candle's stream:
            // safe because their uses on the communication stream are
            // tracked by events (cudarc's default).
            if !compute.context().is_event_tracking() {
                return Err(NnError::Other("NCCL data parallelism needs cudarc's event tracking".into()));
            }
            streams.push(compute.fork().map_err(err)?);
            computes.push(compute);
        }
        let comms = Comm::from_devices(streams).map_err(err)?;
        Ok(comms.into_iter().zip(computes).map(|(comm, compute)| Rank { comm, compute }).collect())
    }

    impl Rank {
        /// Sums `flat` (contiguous) over the ranks in place, on the
        /// communication stream, after the work queued so far on candle's.
        pub fn all_reduce(&self, flat: &Tensor) -> Result<()> {
            self.comm.stream().join(&self.compute).map_err(err)?;
            flat.inplace_op1(&Collective(&self.comm, Op::Sum))?;
            Ok(())
        }

        /// Sums `flat` over the ranks into rank `root`'s copy, in place, on
        /// the communication stream.
        pub fn reduce(&self, flat: &Tensor, root: usize) -> Result<()> {
            self.comm.stream().join(&self.compute).map_err(err)?;
            flat.inplace_op1(&Collective(&self.comm, Op::Reduce(root as i32)))?;
            Ok(())
        }

        pub fn world(&self) -> usize {
            self.comm.world_size()
        }

        /// Each tensor's value from rank `root` to the others, in place, as
        /// one NCCL group; candle's stream then waits for it.
        pub fn broadcast<'t>(&self, items: impl Iterator<Item = (&'t Tensor, usize)>) -> Result<()> {
            self.comm.stream().join(&self.compute).map_err(err)?;
            group_start().map_err(err)?;
            let mut r = Ok(());
            for (t, root) in items {
                r = t.inplace_op1(&Collective(&self.comm, Op::Broadcast(root as i32)));
                if r.is_err() {
                    break;
                }
            }
            group_end().map_err(err)?;
            r?;
            self.join()
        }

        /// candle's stream waits for the collectives queued so far.
        pub fn join(&self) -> Result<()> {
            self.compute.join(&self.comm.stream()).map_err(err)
        }
    }

    #[derive(Clone, Copy)]
    enum Op {
        Sum,
        Reduce(i32),
        Broadcast(i32),
    }

    /// An NCCL collective on a tensor's own storage.
    struct Collective<'a>(&'a Comm, Op);

    impl Collective<'_> {
        fn run<T: NcclType + CudaDType>(&self, s: &mut CudaStorage, a: usize, b: usize) -> candle_core::Result<()> {
            let mut v = s.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
            let r = match self.1 {
                Op::Sum => self.0.all_reduce_in_place(&mut v, &ReduceOp::Sum),
                Op::Reduce(root) => self.0.reduce_in_place(&mut v, &ReduceOp::Sum, root),
                Op::Broadcast(root) => self.0.broadcast_in_place(&mut v, root),
            };
            r.map(|_| ()).map_err(|e| candle_core::Error::Msg(format!("nccl: {e:?}")))
        }
    }

    impl InplaceOp1 for Collective<'_> {
        fn name(&self) -> &'static str {
            "nccl-collective"
        }

        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("an NCCL collective on a CPU tensor")
        }

        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("an NCCL collective on a strided tensor")
            };
            match s.dtype() {
                DType::BF16 => self.run::<half::bf16>(s, a, b),
                DType::F16 => self.run::<half::f16>(s, a, b),
                DType::F32 => self.run::<f32>(s, a, b),
                d => candle_core::bail!("an NCCL collective on {d:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(shapes: &[(&str, &[usize])]) -> Vec<(String, Var)> {
        shapes.iter().map(|(n, s)| (n.to_string(), Var::zeros(*s, DType::F32, &Device::Cpu).unwrap())).collect()
    }

    /// `f(r, sync)` for every replica, each on a thread of its own, all at
    /// once; each thread's result (Err where it panicked).
    fn on_replicas<T: Send>(
        syncs: Vec<GradSync>,
        f: impl Fn(usize, GradSync) -> T + Sync,
    ) -> Vec<std::thread::Result<T>> {
        let f = &f;
        std::thread::scope(|sc| {
            let hs: Vec<_> = syncs.into_iter().enumerate().map(|(r, s)| sc.spawn(move || f(r, s))).collect();
            hs.into_iter().map(|h| h.join()).collect()
        })
    }

    #[test]
    fn layer_numbers_come_from_the_names() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"), Some(3));
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("model.layers.x.weight"), None);
    }

    #[test]
    fn buckets_follow_the_backward_order_and_the_cap() {
        let v = vars(&[
            ("model.embed_tokens.weight", &[10, 4]),
            ("model.layers.0.a", &[4, 4]),
            ("model.layers.0.b", &[4]),
            ("model.layers.1.a", &[4, 4]),
            ("model.layers.1.b", &[4]),
            ("model.norm.weight", &[4]),
        ]);
        // 64-byte cap: a bucket closes once it holds >= 64 bytes.
        let l = Layout::new(&v, 64);
        let b: Vec<Vec<usize>> = l.buckets.iter().map(|b| b.vars.clone()).collect();
        assert_eq!(b, vec![vec![3], vec![4, 1], vec![2, 0], vec![5]]);
        let one = Layout::new(&v, usize::MAX);
        assert_eq!(one.buckets.len(), 1);
        assert_eq!(one.buckets[0].vars, vec![3, 4, 1, 2, 0, 5]);
    }

    /// Three replicas on host threads, buckets of a few elements: every
    /// replica gets the same sums, in the shapes of the variables; a
    /// gradient only one replica produced is summed with zeros, one none
    /// produced stays None; reducing layer by layer gives the sums of
    /// reducing everything at the end.
    #[test]
    fn host_replicas_get_the_sums() {
        let v = vars(&[
            ("model.embed_tokens.weight", &[3, 2]),
            ("model.layers.0.a", &[2, 2]),
            ("model.layers.1.a", &[2, 2]),
            ("model.layers.1.b", &[5]),
            ("lm_head.weight", &[2]),
        ]);
        let devices = vec![Device::Cpu; 3];
        let syncs = GradSync::group_with(&devices, &v, 16, true).unwrap();
        assert_eq!(syncs[0].transport(), "host");
        assert!(syncs[0].n_buckets() >= 4, "{}", syncs[0].n_buckets());
        let grad = |r: usize, i: usize| -> Option<Tensor> {
            if i == 4 || (i == 3 && r != 1) {
                return None; // lm_head: no replica; layers.1.b: replica 1 only
            }
            let n: usize = v[i].1.elem_count();
            let data: Vec<f32> = (0..n).map(|k| (r * 100 + i * 10 + k) as f32).collect();
            Some(Tensor::from_vec(data, v[i].1.dims(), &Device::Cpu).unwrap())
        };
        let run = |layered: bool| -> Vec<Vec<Option<Tensor>>> {
            let syncs = GradSync::group_with(&devices, &v, 16, true).unwrap();
            on_replicas(syncs, |r, mut s| {
                let mut g: Vec<Option<Tensor>> = (0..5).map(|i| grad(r, i)).collect();
                if layered {
                    s.layer_done(1, &mut g).unwrap();
                    s.layer_done(0, &mut g).unwrap();
                }
                s.finish(&mut g).unwrap();
                g
            })
            .into_iter()
            .map(Result::unwrap)
            .collect()
        };
        let flat = |t: &Option<Tensor>| t.as_ref().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for layered in [false, true] {
            let out = run(layered);
            for (r, out) in out.iter().enumerate() {
                for i in 0..5 {
                    let want: Option<Vec<f32>> = match i {
                        4 => None,
                        3 => flat(&grad(1, 3)),
                        _ => {
                            let parts: Vec<Vec<f32>> = (0..3).map(|r| flat(&grad(r, i)).unwrap()).collect();
                            Some((0..parts[0].len()).map(|k| parts.iter().map(|p| p[k]).sum()).collect())
                        }
                    };
                    assert_eq!(flat(&out[i]), want, "replica {r}, variable {i}, layered {layered}");
                    if let Some(t) = &out[i] {
                        assert_eq!(t.dims(), v[i].1.dims());
                    }
                }
            }
        }
    }

    /// Over NCCL, one replica per GPU the machine has (one is enough to
    /// load NCCL and run the streams): bf16 gradients reduced bucket by
    /// bucket as layers finish, the sums in place on every replica, a
    /// gradient one replica lacks counted as zeros; then ZeRO's broadcast
    /// gives each replica the owners' values.
    #[cfg(feature = "nccl")]
    #[test]
    fn nccl_replicas_get_the_sums_and_the_owners_values() {
        use candle_core::cuda::cudarc::driver::CudaContext;
        let Some(_) = crate::nn::tests::cuda_device().unwrap() else { return };
        let n = CudaContext::device_count().unwrap() as usize;
        let devices: Vec<Device> = (0..n).map(|i| Device::new_cuda(i).unwrap()).collect();
        let names = ["model.layers.0.a", "model.layers.1.a", "model.norm.weight"];
        let shapes: [&[usize]; 3] = [&[64, 32], &[3000], &[32]];
        let per: Vec<Vec<(String, Var)>> = devices
            .iter()
            .map(|d| {
                names
                    .iter()
                    .zip(shapes)
                    .map(|(nm, s)| (nm.to_string(), Var::zeros(s, DType::BF16, d).unwrap()))
                    .collect()
            })
            .collect();
        let syncs = GradSync::group_with(&devices, &per[0], 4096, false).unwrap();
        assert_eq!(syncs[0].transport(), "nccl");
        let grad = |r: usize, i: usize, d: &Device| -> Option<Tensor> {
            (i != 1 || r == 0).then(|| {
                let k: usize = shapes[i].iter().product();
                let v: Vec<f32> = (0..k).map(|j| ((j % 7) as f32 - 3.0) * (r + 1) as f32).collect();
                Tensor::from_vec(v, shapes[i], d).unwrap().to_dtype(DType::BF16).unwrap()
            })
        };
        let owner: Vec<usize> = (0..3).map(|i| i % n).collect();
        type Out = (Vec<Option<Tensor>>, Vec<Option<Tensor>>, Vec<usize>);
        let out: Vec<Out> = on_replicas(syncs, |r, mut s| {
            let (d, vars) = (&devices[r], &per[r]);
            let mut g: Vec<Option<Tensor>> = (0..3).map(|i| grad(r, i, d)).collect();
            s.layer_done(1, &mut g).unwrap();
            s.layer_done(0, &mut g).unwrap();
            s.finish(&mut g).unwrap();
            for (i, v) in vars.iter().enumerate() {
                v.1.set(&Tensor::full((r * 10 + i) as f32, shapes[i], d).unwrap().to_dtype(DType::BF16).unwrap())
                    .unwrap();
            }
            let vs: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            s.broadcast_owned(&vs, &owner).unwrap();
            // ZeRO-2: each bucket's sum on its owner only.
            s.shard_gradients();
            let mut g2: Vec<Option<Tensor>> = (0..3).map(|i| grad(r, i, d)).collect();
            s.layer_done(1, &mut g2).unwrap();
            s.layer_done(0, &mut g2).unwrap();
            s.finish(&mut g2).unwrap();
            assert_eq!(s.sum_scalar(1.5).unwrap(), 1.5 * n as f64);
            (g, g2, s.var_owners())
        })
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let host = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (r, (g, g2, owners)) in out.iter().enumerate() {
            for i in 0..3 {
                let want: Vec<f32> = if i == 1 {
                    host(&grad(0, 1, &Device::Cpu).unwrap())
                } else {
                    let parts: Vec<Vec<f32>> = (0..n).map(|q| host(&grad(q, i, &Device::Cpu).unwrap())).collect();
                    (0..parts[0].len()).map(|k| parts.iter().map(|p| p[k]).sum()).collect()
                };
                assert_eq!(host(g[i].as_ref().unwrap()), want, "replica {r}, variable {i}");
                match &g2[i] {
                    Some(t) => {
                        assert_eq!((owners[i], host(t)), (r, want.clone()), "sharded: replica {r}, variable {i}")
                    }
                    None => assert_ne!(owners[i], r, "sharded: replica {r} owns variable {i} but has no sum"),
                }
                let v = host(per[r][i].1.as_tensor());
                assert!(v.iter().all(|&x| x == (owner[i] * 10 + i) as f32), "replica {r}, variable {i}: {:?}", &v[..4]);
            }
        }
    }

    /// A replica that fails mid-step drains: it takes part in the rest of
    /// the step's exchanges with zeros, so the others finish the step (with
    /// its contribution missing) instead of waiting; the next step works.
    #[test]
    fn a_failed_replica_drains_the_step() {
        let v = vars(&[("model.layers.0.a", &[4]), ("model.layers.1.a", &[4]), ("lm_head.weight", &[2])]);
        let syncs = GradSync::group_with(&[Device::Cpu, Device::Cpu], &v, 8, true).unwrap();
        let ones = |n: usize| Some(Tensor::ones(n, DType::F32, &Device::Cpu).unwrap());
        let out: Vec<Vec<Vec<f32>>> = on_replicas(syncs, |r, mut s| {
            let mut g = vec![ones(4), ones(4), ones(2)];
            s.layer_done(1, &mut g).unwrap();
            if r == 1 {
                s.drain(); // fails after its first bucket
            } else {
                s.layer_done(0, &mut g).unwrap();
                s.finish(&mut g).unwrap();
            }
            let first: Vec<f32> = g.iter().flatten().flat_map(|t| t.to_vec1::<f32>().unwrap()).collect::<Vec<_>>();
            // The next step, both whole.
            let mut g = vec![ones(4), ones(4), ones(2)];
            s.finish(&mut g).unwrap();
            let second = g.iter().flatten().flat_map(|t| t.to_vec1::<f32>().unwrap()).collect();
            vec![first, second]
        })
        .into_iter()
        .map(Result::unwrap)
        .collect();
        // Replica 0: layer 1 summed with replica 1's ones, the rest with zeros.
        assert_eq!(out[0][0], vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]);
        assert_eq!(out[0][1], vec![2.0; 10]);
        assert_eq!(out[1][1], vec![2.0; 10]);
    }

    /// A replica that panics releases the others through its abort handle.
    #[test]
    fn a_panicking_replica_releases_the_others() {
        let v = vars(&[("model.layers.0.a", &[4])]);
        let syncs = GradSync::group_with(&[Device::Cpu, Device::Cpu], &v, 16, true).unwrap();
        let results: Vec<bool> = on_replicas(syncs, |r, mut s| {
            let _release = s.abort_handle();
            if r == 1 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                panic!("replica 1 fails");
            }
            let mut g = vec![Some(Tensor::ones(4, DType::F32, &Device::Cpu).unwrap())];
            s.finish(&mut g).is_ok()
        })
        .into_iter()
        .map(|r| r.unwrap_or(false))
        .collect();
        assert_eq!(results, vec![false, false]);
    }

    /// A replica that fails tells the others, which stop waiting for it
    /// with an error instead of hanging.
    #[test]
    fn a_failed_replica_releases_the_others() {
        let v = vars(&[("model.layers.0.a", &[4])]);
        let devices = vec![Device::Cpu; 2];
        let syncs = GradSync::group(&devices, &v).unwrap();
        let results: Vec<bool> = on_replicas(syncs, |r, mut s| {
            if r == 1 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                s.abort();
                return false;
            }
            let mut g = vec![Some(Tensor::ones(4, DType::F32, &Device::Cpu).unwrap())];
            s.finish(&mut g).is_ok()
        })
        .into_iter()
        .map(Result::unwrap)
        .collect();
        assert_eq!(results, vec![false, false]);
    }
}
