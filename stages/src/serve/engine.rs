//! The generation engine behind `serve`: one thread owns the model and runs
//! continuous batching. Requests wait in a bounded queue; at every token
//! boundary the engine admits queued requests (their prompts are prefilled
//! in the same [`Llama::step`] as the running sequences' next tokens), samples
//! one token per sequence, streams the new text, and retires finished
//! sequences, freeing their KV caches.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::nn::infer::{argmax, KvCache};
use crate::nn::llama::Llama;

/// Sampling and stopping settings of one request.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0: off.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Extra stop token ids (beside the model's eos ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past eos (vLLM's `ignore_eos`, for benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// eos, a stop token or a stop string.
    Stop,
    /// `max_tokens` (or the context length) reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a request hears back, in order: text deltas, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(String),
    Done { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize },
    Error(String),
}

pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting beyond the running batch; more are refused.
    pub queue: usize,
    /// Prompt tokens prefilled in one step at most (one prompt is always admitted).
    pub max_prefill_tokens: usize,
    /// Run a few synthetic requests through every kind of step before
    /// [`Engine::start`] returns ([`Scheduler::warm_up`]), so that the
    /// first real requests do not pay for what a process does once (on
    /// CUDA: loading the kernel modules, recording the decode graphs, the
    /// memory pool's first allocations; before candle's kernels shipped as
    /// machine code, also the driver compiling their PTX, ~20 s on a fresh
    /// machine for the first batch of 8 concurrent requests).
    pub warm_up: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_batch: 64, queue: 256, max_prefill_tokens: 4096, warm_up: false }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting); retry later")]
    Full(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// A running engine. Dropping it (after the last request handle) stops the thread.
pub struct Engine {
    tx: Option<SyncSender<Request>>,
    abort: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub tokenizer: Arc<Tokenizer>,
    /// Token ids that end a generation (generation_config's eos ids).
    pub eos_ids: Vec<u32>,
    /// Prompt + generated tokens at most (`max_position_embeddings`).
    pub max_len: usize,
    pub vocab_size: usize,
    queue: usize,
    /// With [`EngineOptions::warm_up`]: how long the warm-up took, or why
    /// it failed (the engine runs either way).
    pub warmed_up: Option<Result<std::time::Duration, String>>,
}

impl Engine {
    pub fn start(model: Llama, tokenizer: Arc<Tokenizer>, eos_ids: Vec<u32>, opts: EngineOptions) -> Engine {
        let (tx, rx) = mpsc::sync_channel(opts.queue.max(1));
        let max_len = model.cfg.max_position_embeddings;
        let vocab_size = model.cfg.vocab_size;
        let tok = tokenizer.clone();
        let eos = eos_ids.clone();
        let queue = opts.queue;
        let abort = Arc::new(AtomicBool::new(false));
        let flag = abort.clone();
        let warm = opts.warm_up;
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pipe-engine".into())
            .spawn(move || {
                let mut sched = Scheduler {
                    model,
                    tok,
                    eos,
                    opts,
                    rx,
                    held: None,
                    active: Vec::new(),
                    prefix: Vec::new(),
                    uses: 0,
                    abort: flag,
                    stats: Stats::default(),
                };
                if warm {
                    let t0 = std::time::Instant::now();
                    let r = sched.warm_up().map(|()| t0.elapsed()).map_err(|e| e.to_string());
                    let _ = ready_tx.send(r);
                }
                sched.run()
            })
            .expect("spawning the engine thread");
        // (No request can arrive before this returns: the sender is not out yet.)
        let warmed_up =
            if warm { Some(ready_rx.recv().unwrap_or_else(|_| Err("the engine thread ended".into()))) } else { None };
        Engine { tx: Some(tx), abort, thread: Some(thread), tokenizer, eos_ids, max_len, vocab_size, queue, warmed_up }
    }

    /// A flag that, once set, makes the engine end every running and waiting
    /// request with an error at the next token boundary and stop (what a
    /// cancelled `pipe run` does to its services, instead of waiting for
    /// their requests to finish).
    pub fn abort_handle(&self) -> Arc<AtomicBool> {
        self.abort.clone()
    }

    pub fn submit(&self, r: Request) -> Result<(), SubmitError> {
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        tx.try_send(r).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full(self.queue),
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }

    /// Stop taking requests, finish the running ones, join the thread.
    pub fn shutdown(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown()
    }
}

/// eos ids of a model folder: generation_config.json's `eos_token_id` (an
/// id or a list), else config.json's, else tokenizer_config's `eos_token`.
pub fn eos_ids(dir: &Path, tok: &Tokenizer) -> Vec<u32> {
    let read = |f: &str| -> serde_json::Value {
        fs_err::read(dir.join(f)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    };
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        match v {
            serde_json::Value::Number(n) => n.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|i| i as u32)).collect(),
            _ => Vec::new(),
        }
    };
    for f in ["generation_config.json", "config.json"] {
        let v = ids(&read(f)["eos_token_id"]);
        if !v.is_empty() {
            return v;
        }
    }
    let tc = read("tokenizer_config.json");
    let name = match &tc["eos_token"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    };
    name.and_then(|n| tok.token_to_id(&n)).into_iter().collect()
}

struct Seq {
    req: Request,
    cache: KvCache,
    /// Tokens generated so far.
    out: Vec<u32>,
    /// Fed to the model in the next step (the prompt, then the last token).
    feed: Vec<u32>,
    rng: ChaCha8Rng,
    max_tokens: usize,
    stop_ids: HashSet<u32>,
    detok: Detok,
    text: String,
    sent: usize,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
}

struct Scheduler {
    model: Llama,
    tok: Arc<Tokenizer>,
    eos: Vec<u32>,
    opts: EngineOptions,
    rx: Receiver<Request>,
    held: Option<Request>,
    active: Vec<Seq>,
    /// Prefix cache: the first prompt of each recent family and its KV
    /// ([`Prefix`], least recently used first out). Requests sharing a long
    /// prefix with one (few-shot evaluation: the same system prompt and
    /// exemplars before every question) copy that part of its cache
    /// instead of recomputing it.
    prefix: Vec<Prefix>,
    /// Uses of the prefix cache so far (its entries' clock).
    uses: u64,
    abort: Arc<AtomicBool>,
    stats: Stats,
}

/// A prompt in the prefix cache, its KV and when it was last used.
struct Prefix {
    toks: Vec<u32>,
    cache: KvCache,
    used: u64,
}

/// Prefix-cache entries kept at most, and prompt tokens over all of them
/// (the newest entry is kept whatever its length). Two evaluations served
/// at once (the quickstart's 8-shot and 0-shot tasks) are two families; a
/// single entry swapped between them.
const PREFIX_ENTRIES: usize = 4;
const PREFIX_TOKENS: usize = 32_768;

/// Whether a prompt of `len` tokens whose longest cached prefix is
/// `shared` starts a new family: the part it does not share is at least
/// half of it (a question after the same exemplars is not; the same
/// system prompt before other exemplars is).
fn new_family(len: usize, shared: usize) -> bool {
    len >= MIN_PREFIX && len - shared.min(len) >= (len / 2).max(MIN_PREFIX)
}

/// Steps run, split into decode-only steps (every sequence feeds one token)
/// and the others (prefills, mixed), with their time: logged when the
/// engine stops.
#[derive(Default)]
struct Stats {
    decode: (usize, usize, f64),
    other: (usize, usize, f64),
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let (d, o) = (self.stats.decode, self.stats.other);
        if d.0 + o.0 > 0 {
            let each = |(n, _, s): (usize, usize, f64)| if n > 0 { s * 1e3 / n as f64 } else { 0.0 };
            tracing::info!(
                "engine: {} decode steps ({:.2} ms each, {:.1} sequences on average), {} prefill or mixed steps ({:.2} ms each)",
                d.0,
                each(d),
                d.1 as f64 / d.0.max(1) as f64,
                o.0,
                each(o)
            );
        }
    }
}

/// Token `t` of sequence `s` (sampled, or the argmax): kept, fed next,
/// its text streamed to the client up to any stop string; whether the
/// sequence ended (its `Done` sent).
fn emit(s: &mut Seq, tok: &Tokenizer, t: u32) -> bool {
    s.out.push(t);
    s.feed = vec![t];
    let stop_token = s.stop_ids.contains(&t);
    // The stop token's own text is not part of the answer.
    let visible = if stop_token { &s.out[..s.out.len() - 1] } else { &s.out[..] };
    let last = stop_token || s.out.len() >= s.max_tokens;
    if let Some(piece) = s.detok.push(tok, visible, last) {
        s.text.push_str(&piece);
    }
    let finish = if let Some(at) = find_stop(&s.text, &s.req.params.stop) {
        s.text.truncate(at);
        Some(FinishReason::Stop)
    } else if stop_token {
        Some(FinishReason::Stop)
    } else if s.out.len() >= s.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    let upto = match finish {
        Some(_) => s.text.len(),
        None => s.text.len() - held_back(&s.text, &s.req.params.stop),
    };
    if upto > s.sent {
        let _ = s.req.events.send(Event::Delta(s.text[s.sent..upto].to_string()));
        s.sent = upto;
    }
    if let Some(reason) = finish {
        let _ = s.req.events.send(Event::Done {
            reason,
            prompt_tokens: s.req.prompt.len(),
            completion_tokens: s.out.len(),
            cached_tokens: s.cached,
        });
        return true;
    }
    false
}

/// Shared prompt tokens worth reusing from the prefix cache.
const MIN_PREFIX: usize = 32;

/// The warm-up's prompt number `salt`: `n` token ids spread over the vocabulary.
fn warm_up_ids(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab.max(1)) as u32).collect()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Scheduler {
    /// Synthetic requests through each kind of step a server runs, before
    /// the first real one (nothing of them is kept: the prefix cache and
    /// the step statistics are cleared after): two prompts prefilled
    /// together, one of them sampled (its logits brought back); a third,
    /// sharing the first one's prefix, admitted from the prefix cache
    /// beside the two decoding (a mixed step); decode steps of three, two
    /// and one rows; then a lone greedy sequence (the decode chain of
    /// [`Llama::decode_greedy`]).
    fn warm_up(&mut self) -> crate::nn::Result<()> {
        let ids = |n, salt| warm_up_ids(n, salt, self.model.cfg.vocab_size);
        let greedy = GenParams { max_tokens: 6, ignore_eos: true, ..Default::default() };
        let sampled = GenParams { temperature: 1.0, top_p: 0.9, top_k: 50, seed: Some(0), ..greedy.clone() };
        let first = ids(MIN_PREFIX + 8, 0);
        let mut sibling = first[..MIN_PREFIX + 4].to_vec();
        sibling.extend(ids(6, 1));
        // The requests' receivers stay open until the end (a closed one
        // would retire its sequence).
        let mut open = Vec::new();
        let mut req = |prompt: Vec<u32>, params: GenParams| {
            let (events, rx) = tokio::sync::mpsc::unbounded_channel();
            open.push(rx);
            Request { prompt, params, events }
        };
        let batches = [
            vec![req(first, greedy.clone()), req(ids(9, 2), sampled)],
            vec![req(sibling, greedy.clone())],
            vec![req(ids(5, 3), GenParams { max_tokens: 9, ..greedy })],
        ];
        let mut r = Ok(());
        for (i, batch) in batches.into_iter().enumerate() {
            // (Within the server's batch limit, as real requests are.)
            for q in batch {
                if self.active.len() < self.opts.max_batch {
                    if let Some(s) = self.admit(q) {
                        self.active.push(s);
                    }
                }
            }
            // The second batch joins after the first's one step; then each
            // runs to its end (the last alone), 64 steps at most.
            let steps = if i == 0 { 1 } else { 64 };
            for _ in 0..steps {
                if r.is_err() || self.active.is_empty() {
                    break;
                }
                r = self.step();
            }
        }
        self.active.clear();
        self.held = None;
        self.prefix.clear();
        self.uses = 0;
        self.stats = Stats::default();
        r
    }

    fn run(mut self) {
        let mut open = true;
        loop {
            if self.active.is_empty() && self.held.is_none() {
                if !open {
                    return;
                }
                match self.rx.recv() {
                    Ok(r) => self.held = Some(r),
                    Err(_) => return,
                }
            }
            if self.abort.load(Ordering::SeqCst) {
                let msg = "the server is stopping (aborted)".to_string();
                let waiting = std::iter::from_fn(|| self.rx.try_recv().ok());
                for r in self.held.take().into_iter().chain(waiting).collect::<Vec<_>>() {
                    let _ = r.events.send(Event::Error(msg.clone()));
                }
                for s in self.active.drain(..) {
                    let _ = s.req.events.send(Event::Error(msg.clone()));
                }
                return;
            }
            // Admit at the token boundary, within the batch and prefill budgets.
            let mut prefill = 0usize;
            while self.active.len() < self.opts.max_batch {
                let r = match self.held.take() {
                    Some(r) => r,
                    None if open => match self.rx.try_recv() {
                        Ok(r) => r,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    },
                    None => break,
                };
                if prefill > 0 && prefill + r.prompt.len() > self.opts.max_prefill_tokens {
                    self.held = Some(r);
                    break;
                }
                // A prompt that shares a long prefix with one prefilled in
                // this step waits one step and reuses its cache instead.
                let (cached, _) = self.cached_prefix(&r.prompt);
                let sibling = self
                    .active
                    .iter()
                    .any(|s| s.out.is_empty() && common_prefix(&s.req.prompt, &r.prompt) >= MIN_PREFIX.max(cached + 1));
                if sibling {
                    self.held = Some(r);
                    break;
                }
                prefill += r.prompt.len() - cached;
                if let Some(s) = self.admit(r) {
                    self.active.push(s);
                }
            }
            // Clients that went away free their slot.
            self.active.retain(|s| !s.req.events.is_closed());
            if self.active.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                let msg = format!("generation failed: {e}");
                tracing::error!("{msg}");
                for s in self.active.drain(..) {
                    let _ = s.req.events.send(Event::Error(msg.clone()));
                }
            }
        }
    }

    /// The one active sequence's greedy steps through
    /// [`Llama::decode_greedy`] until it ends, a request arrives (held
    /// for admission), its client goes away or the engine is aborted.
    fn greedy_run(&mut self) -> crate::nn::Result<()> {
        let (model, tok, rx, abort, held) = (&self.model, &self.tok, &self.rx, &self.abort, &mut self.held);
        let Some(s) = self.active.first_mut() else { return Ok(()) };
        let (first, steps) = (s.feed[0], s.max_tokens.saturating_sub(s.out.len()));
        let mut cache = std::mem::take(&mut s.cache);
        let mut ended = false;
        let t0 = std::time::Instant::now();
        let n = model.decode_greedy(&mut cache, first, steps, |t| {
            ended = emit(s, tok, t);
            if ended || abort.load(Ordering::SeqCst) || s.req.events.is_closed() {
                return false;
            }
            match rx.try_recv() {
                Ok(r) => {
                    *held = Some(r);
                    false
                }
                Err(_) => true,
            }
        });
        s.cache = cache;
        let n = n?;
        let st = &mut self.stats.decode;
        *st = (st.0 + n, st.1 + n, st.2 + t0.elapsed().as_secs_f64());
        if ended {
            self.active.clear();
        }
        Ok(())
    }

    /// Prompt tokens of `prompt` the prefix cache holds (0 below
    /// MIN_PREFIX), at least one token always left to compute, and the
    /// entry holding them (the longest match).
    fn cached_prefix(&self, prompt: &[u32]) -> (usize, Option<usize>) {
        let (n, entry) = self.longest_shared(prompt);
        let n = n.min(prompt.len().saturating_sub(1));
        if n >= MIN_PREFIX {
            (n, entry)
        } else {
            (0, None)
        }
    }

    /// The most leading tokens `prompt` shares with a prefix-cache entry,
    /// and that entry.
    fn longest_shared(&self, prompt: &[u32]) -> (usize, Option<usize>) {
        let best = self.prefix.iter().enumerate().map(|(i, e)| (common_prefix(&e.toks, prompt), i)).max();
        best.map_or((0, None), |(n, i)| (n, Some(i)))
    }

    /// Prompts prefilled in the step just run that start a new family
    /// ([`new_family`]) enter the prefix cache; the least recently used
    /// entries leave it beyond [`PREFIX_ENTRIES`] or [`PREFIX_TOKENS`].
    fn remember_prefixes(&mut self) -> crate::nn::Result<()> {
        for s in self.active.iter().filter(|s| s.out.is_empty()) {
            let (shared, _) = self.longest_shared(&s.req.prompt);
            if !new_family(s.req.prompt.len(), shared) {
                continue;
            }
            self.uses += 1;
            let cache = s.cache.prefix_copy(&self.model, s.req.prompt.len(), 0)?;
            self.prefix.push(Prefix { toks: s.req.prompt.clone(), cache, used: self.uses });
            while self.prefix.len() > 1
                && (self.prefix.len() > PREFIX_ENTRIES
                    || self.prefix.iter().map(|e| e.toks.len()).sum::<usize>() > PREFIX_TOKENS)
            {
                let lru = self.prefix.iter().enumerate().min_by_key(|(_, e)| e.used).map_or(0, |(i, _)| i);
                self.prefix.remove(lru);
            }
        }
        Ok(())
    }

    fn admit(&mut self, r: Request) -> Option<Seq> {
        if r.prompt.is_empty() || r.prompt.len() >= self.model.cfg.max_position_embeddings {
            let _ = r.events.send(Event::Error(format!(
                "the prompt has {} tokens; the model takes 1 to {}",
                r.prompt.len(),
                self.model.cfg.max_position_embeddings - 1
            )));
            return None;
        }
        let room = self.model.cfg.max_position_embeddings - r.prompt.len();
        let mut stop_ids: HashSet<u32> = r.params.stop_token_ids.iter().copied().collect();
        if !r.params.ignore_eos {
            stop_ids.extend(&self.eos);
        }
        let seed = r.params.seed.unwrap_or_else(|| rand::rng().random());
        let (reuse, entry) = self.cached_prefix(&r.prompt);
        let cache = match entry {
            Some(i) => {
                self.uses += 1;
                self.prefix[i].used = self.uses;
                match self.prefix[i].cache.prefix_copy(&self.model, reuse, r.prompt.len() - reuse + 16) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = r.events.send(Event::Error(format!("copying the prefix cache failed: {e}")));
                        return None;
                    }
                }
            }
            None => KvCache::new(),
        };
        Some(Seq {
            cache,
            out: Vec::new(),
            feed: r.prompt[reuse..].to_vec(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            max_tokens: r.params.max_tokens.min(room),
            stop_ids,
            detok: Detok::default(),
            text: String::new(),
            sent: 0,
            cached: reuse,
            req: r,
        })
    }

    fn step(&mut self) -> crate::nn::Result<()> {
        // One greedy sequence decoding alone: a run of steps (through the
        // decode graph, each launched before the host reads the one before).
        if let [s] = &self.active[..] {
            if self.held.is_none() && !s.out.is_empty() && s.feed.len() == 1 && greedy(&s.req.params) {
                return self.greedy_run();
            }
        }
        let feeds: Vec<Vec<u32>> = self.active.iter_mut().map(|s| std::mem::take(&mut s.feed)).collect();
        let refs: Vec<&[u32]> = feeds.iter().map(|f| f.as_slice()).collect();
        // Greedy rows take the argmax (on the device in the decode graph);
        // only sampling rows bring their logits back.
        let sampling: Vec<bool> = self.active.iter().map(|s| !greedy(&s.req.params)).collect();
        let mut caches: Vec<&mut KvCache> = self.active.iter_mut().map(|s| &mut s.cache).collect();
        let t0 = std::time::Instant::now();
        let next = self.model.step_next(&refs, &mut caches, &sampling)?;
        let st = if refs.iter().all(|f| f.len() == 1) { &mut self.stats.decode } else { &mut self.stats.other };
        *st = (st.0 + 1, st.1 + refs.len(), st.2 + t0.elapsed().as_secs_f64());
        self.remember_prefixes()?;
        let mut done = Vec::new();
        for (i, (s, (best, row))) in self.active.iter_mut().zip(next.argmax.into_iter().zip(next.logits)).enumerate() {
            let t = match row {
                Some(row) => sample(&row, &s.req.params, &mut s.rng),
                None => best,
            };
            if emit(s, &self.tok, t) {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            self.active.swap_remove(i);
        }
        Ok(())
    }
}

/// Whether `p` decodes greedily (the argmax, no randomness).
fn greedy(p: &GenParams) -> bool {
    p.temperature <= 0.0 || p.top_k == 1
}

/// Greedy at temperature 0; else temperature, top-k, then top-p (nucleus)
/// sampling, as `transformers`' logits warpers order them.
pub fn sample(logits: &[f32], p: &GenParams, rng: &mut ChaCha8Rng) -> u32 {
    if greedy(p) {
        return argmax(logits);
    }
    let t = p.temperature as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.truncate(p.top_k);
    }
    let m = logits[idx[0] as usize] / t;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] / t - m) as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= sum);
    if p.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (k, x) in probs.iter().enumerate() {
            acc += x;
            if acc >= p.top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (k, x) in probs.iter().enumerate() {
        if u < *x {
            return idx[k];
        }
        u -= x;
    }
    idx[probs.len() - 1]
}

/// Earliest byte offset at which a stop string occurs.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// Bytes at the end of `text` that could still grow into a stop string:
/// streamed text holds them back until it is clear.
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut keep = 0;
    for s in stop {
        for n in (1..s.len()).rev() {
            if n <= keep {
                break;
            }
            if s.is_char_boundary(n) && text.ends_with(&s[..n]) {
                keep = n;
                break;
            }
        }
    }
    keep
}

/// Incremental detokenisation: a token's text can depend on its neighbours
/// (byte-level pieces of one character, leading spaces), so decode a small
/// window and emit what it adds once it is no longer a partial character.
#[derive(Default)]
struct Detok {
    prefix: usize,
    read: usize,
}

impl Detok {
    /// The text `ids` adds since the last call; with `last`, everything
    /// left (even a partial character).
    fn push(&mut self, tok: &Tokenizer, ids: &[u32], last: bool) -> Option<String> {
        if ids.len() < self.read {
            return None;
        }
        let before = tok.decode(&ids[self.prefix..self.read], true).ok()?;
        let now = tok.decode(&ids[self.prefix..], true).ok()?;
        if now.len() > before.len() && (last || !now.ends_with('\u{FFFD}')) {
            let piece = now.get(before.len()..)?.to_string();
            self.prefix = self.read;
            self.read = ids.len();
            Some(piece)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_keeps_partial_stop_strings() {
        let stop = vec!["Q:".to_string(), "<|im_end|>".to_string()];
        assert_eq!(held_back("answer Q", &stop), 1);
        assert_eq!(held_back("answer <|im", &stop), 4);
        assert_eq!(held_back("answer", &stop), 0);
        assert_eq!(find_stop("a Q: b <|im_end|>", &stop), Some(2));
        assert_eq!(find_stop("nothing", &stop), None);
    }

    #[test]
    fn sampling_respects_top_k_and_seed() {
        let logits = vec![0.0f32, 5.0, 4.9, -3.0];
        let greedy = GenParams::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let p = GenParams { temperature: 1.0, top_k: 2, ..Default::default() };
        let draws: Vec<u32> = (0..200).map(|_| sample(&logits, &p, &mut rng)).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2), "top_k 2 only draws the two best");
        assert!(draws.contains(&1) && draws.contains(&2));
        let again = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, &GenParams { temperature: 2.0, ..Default::default() }, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(again(9), again(9));
        let nucleus = GenParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        assert!((0..50).all(|_| sample(&logits, &nucleus, &mut rng) == 1), "top_p 0.5 keeps only the best token");
    }

    /// An engine on a tiny random model (32 tokens, f32, CPU) with a
    /// word-level tokenizer ("t0" .. "t31").
    fn tiny_engine(opts: EngineOptions, max_len: usize) -> Engine {
        use crate::nn::llama::TrainSpec;
        use crate::nn::tests::{tiny_config, tiny_model};
        let mut cfg = tiny_config("llama", true);
        cfg.max_position_embeddings = max_len;
        let model = tiny_model(&cfg, &TrainSpec::default(), candle_core::DType::F32).unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..32).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
        let tok: Tokenizer = serde_json::from_value::<Tokenizer>(serde_json::json!({
            "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
        }))
        .unwrap();
        Engine::start(model, Arc::new(tok), vec![], opts)
    }

    /// A request's text and its Done event (None: it ended otherwise).
    fn generate(engine: &Engine, prompt: Vec<u32>, params: GenParams) -> (String, Option<Event>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine.submit(Request { prompt, params, events: tx }).unwrap();
        let mut text = String::new();
        loop {
            match rx.blocking_recv() {
                Some(Event::Delta(d)) => text.push_str(&d),
                Some(done @ Event::Done { .. }) => return (text, Some(done)),
                _ => return (text, None),
            }
        }
    }

    #[test]
    fn warm_up_runs_every_kind_of_step_and_keeps_nothing() {
        let greedy = GenParams { max_tokens: 12, ignore_eos: true, ..Default::default() };
        let plain = tiny_engine(EngineOptions::default(), 256);
        assert!(plain.warmed_up.is_none());
        let warm = tiny_engine(EngineOptions { warm_up: true, ..Default::default() }, 256);
        assert!(matches!(warm.warmed_up, Some(Ok(_))), "{:?}", warm.warmed_up);
        // The warm-up's first prompt entered the prefix cache during the
        // warm-up; a prompt sharing it must find the cache empty again.
        let mut shared = warm_up_ids(MIN_PREFIX + 8, 0, 32);
        shared.extend([3, 1, 4]);
        let (a, done_a) = generate(&plain, shared.clone(), greedy.clone());
        let (b, done_b) = generate(&warm, shared, greedy.clone());
        assert_eq!(a, b, "the warm-up changed what a request generates");
        assert!(matches!(done_b, Some(Event::Done { cached_tokens: 0, completion_tokens: 12, .. })), "{done_b:?}");
        assert_eq!(done_a, done_b);
        // A sampled request and a second greedy one: the same on both.
        let sampled = GenParams { temperature: 0.8, seed: Some(7), ..greedy.clone() };
        assert_eq!(generate(&plain, vec![5, 6, 7], sampled.clone()), generate(&warm, vec![5, 6, 7], sampled));
        assert_eq!(generate(&plain, vec![9, 2], greedy.clone()), generate(&warm, vec![9, 2], greedy));
        // A model too short for the warm-up's prompts (they are refused,
        // as any such prompt is) and a batch of one: the warm-up still ends.
        let short = tiny_engine(EngineOptions { warm_up: true, max_batch: 1, ..Default::default() }, 8);
        assert!(matches!(short.warmed_up, Some(Ok(_))), "{:?}", short.warmed_up);
        let (_, done) = generate(&short, vec![1, 2], GenParams { max_tokens: 3, ..Default::default() });
        assert!(matches!(done, Some(Event::Done { completion_tokens: 3, .. })), "{done:?}");
    }

    #[test]
    fn abort_ends_running_and_waiting_requests_at_once() {
        let engine = tiny_engine(EngineOptions { max_batch: 1, ..Default::default() }, 1 << 20);
        let params = GenParams { max_tokens: 1 << 19, ignore_eos: true, ..Default::default() };
        let (tx1, mut rx1) = tokio::sync::mpsc::unbounded_channel();
        let (tx2, mut rx2) = tokio::sync::mpsc::unbounded_channel();
        engine.submit(Request { prompt: vec![1, 2, 3], params: params.clone(), events: tx1 }).unwrap();
        // Waits: the batch holds one sequence.
        engine.submit(Request { prompt: vec![4, 5], params, events: tx2 }).unwrap();
        assert!(matches!(rx1.blocking_recv(), Some(Event::Delta(_))));
        let t0 = std::time::Instant::now();
        engine.abort_handle().store(true, Ordering::SeqCst);
        let last = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>| loop {
            match rx.blocking_recv() {
                Some(Event::Delta(_)) => continue,
                other => return other,
            }
        };
        assert!(matches!(last(&mut rx1), Some(Event::Error(m)) if m.contains("stopping")));
        assert!(matches!(last(&mut rx2), Some(Event::Error(m)) if m.contains("stopping")));
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "{:?}", t0.elapsed());
        let (tx3, _rx3) = tokio::sync::mpsc::unbounded_channel();
        let r = Request { prompt: vec![1], params: GenParams::default(), events: tx3 };
        // The engine thread has exited: new requests are refused.
        let mut refused = false;
        for _ in 0..100 {
            if engine.submit(Request { prompt: r.prompt.clone(), params: r.params.clone(), events: r.events.clone() })
                == Err(SubmitError::Stopped)
            {
                refused = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(refused, "the aborted engine still takes requests");
    }
}
