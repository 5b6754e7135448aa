//! `serve`: an OpenAI-compatible endpoint for a model folder (a service stage).
//!
//! ```yaml
//! server:
//!   kind: serve
//!   inputs: {model: merged}     # an HF folder: a `model` or `merge` stage, or `train` with method full
//!   dtype: auto                 # auto (f32 on CPU, bf16 on CUDA) | f32 | bf16 | f16
//!   device: auto                # auto | cpu | cuda
//!   max_batch: 64               # sequences decoded together (continuous batching)
//!   queue: 256                  # requests waiting beyond the batch; more get 503
//!   max_model_len: 2048         # optional: cap the context (default: max_position_embeddings)
//!   model_name: my-model        # optional: the name clients ask for (default: the stage name)
//!   chat_template: FILE         # optional: a Jinja file instead of tokenizer_config's template
//! ```
//!
//! A service stage is never cached: the engine starts it (in-process, on
//! 127.0.0.1 with a free port) when a stage that uses it must run, waits for
//! `/health`, passes its base URL (`http://127.0.0.1:PORT/v1`) to the
//! dependents, and stops it after them. Dependents' keys take this stage's
//! key (kind, version, params and the model's digest) in place of an output
//! digest. `pipe serve MODEL` runs the same server for humans.
//!
//! [`engine`] is the continuous-batching generator; [`api`] the HTTP routes.

pub mod api;
pub mod engine;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;
use pipe_engine::stage::{parse_params, FileDep, ParamError, RunCtx, Service, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat::ChatTemplate;
use crate::nn::llama::{Llama, TrainSpec};
use crate::train::{fail, DevicePref};
use engine::{Engine, EngineOptions};

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DTypePref {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// Everything that configures a server (the stage's params, and `pipe serve`'s flags).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServeParams {
    #[serde(default)]
    pub dtype: DTypePref,
    #[serde(default)]
    pub device: DevicePref,
    #[serde(default = "max_batch")]
    pub max_batch: usize,
    #[serde(default = "queue")]
    pub queue: usize,
    #[serde(default)]
    pub max_model_len: Option<usize>,
    #[serde(default)]
    pub model_name: Option<String>,
    #[serde(default)]
    pub chat_template: Option<String>,
}

fn max_batch() -> usize {
    64
}
fn queue() -> usize {
    256
}

impl Default for ServeParams {
    fn default() -> Self {
        ServeParams {
            dtype: DTypePref::Auto,
            device: DevicePref::Auto,
            max_batch: max_batch(),
            queue: queue(),
            max_model_len: None,
            model_name: None,
            chat_template: None,
        }
    }
}

/// A running server: its address and how to stop it.
pub struct Server {
    pub addr: SocketAddr,
    pub model_name: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    abort: Arc<std::sync::atomic::AtomicBool>,
}

impl Server {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stop accepting, let running requests finish, and wait.
    pub fn stop(mut self) {
        self.stop_inner()
    }

    /// Block until the server stops by itself (never, unless it fails).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner()
    }
}

impl Service for Server {
    fn url(&self) -> String {
        self.base_url()
    }
    fn abort(&self) {
        self.abort.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn stop(self: Box<Self>) {
        (*self).stop()
    }
}

/// Load a model folder and serve it on `addr` (port 0: any free port).
/// Returns once `/health` answers.
pub fn start(
    model_dir: &Path,
    default_name: &str,
    p: &ServeParams,
    gpus: &[u32],
    addr: SocketAddr,
    log: &dyn Fn(&str),
) -> Result<Server, StageFailure> {
    let t0 = Instant::now();
    let device = p.device.device(gpus)?;
    let dtype = match p.dtype {
        DTypePref::Auto if device.is_cuda() => DType::BF16,
        DTypePref::Auto | DTypePref::F32 => DType::F32,
        DTypePref::Bf16 => DType::BF16,
        DTypePref::F16 => DType::F16,
    };
    let mut model = Llama::load(model_dir, dtype, &device, &TrainSpec::default()).map_err(|e| {
        fail(format!("loading the model: {e}"))
            .hint("the `model` input must be an HF folder (config.json + safetensors)")
    })?;
    if let Some(m) = p.max_model_len {
        model.cfg.max_position_embeddings = m.min(model.cfg.max_position_embeddings).max(2);
    }
    let tok_path = model_dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| fail(format!("{}: {e}", tok_path.display())).hint("the model folder must hold tokenizer.json"))?;
    let template = match &p.chat_template {
        Some(f) => Some(ChatTemplate::load(model_dir, Some(Path::new(f)))?),
        None => ChatTemplate::load(model_dir, None).ok(),
    };
    if template.is_none() {
        log("the model has no chat template: /v1/chat/completions will answer 400; /v1/completions works");
    }
    let eos = engine::eos_ids(model_dir, &tokenizer);
    let max_len = model.cfg.max_position_embeddings;
    let engine = Engine::start(
        model,
        Arc::new(tokenizer),
        eos.clone(),
        EngineOptions {
            max_batch: p.max_batch.max(1),
            queue: p.queue.max(1),
            warm_up: warm_up_wanted(device.is_cuda()),
            ..Default::default()
        },
    );
    let model_name = p.model_name.clone().unwrap_or_else(|| default_name.to_string());
    let warm = match &engine.warmed_up {
        Some(Ok(d)) => format!(", warmed up in {:.1} s", d.as_secs_f64()),
        Some(Err(e)) => format!(", warm-up failed ({e})"),
        None => String::new(),
    };
    log(&format!(
        "loaded {} on {} as {dtype:?} in {:.1} s (context {max_len}, eos ids {eos:?}, max batch {}, queue {}{warm})",
        model_dir.display(),
        if device.is_cuda() { "cuda" } else { "cpu" },
        t0.elapsed().as_secs_f64(),
        p.max_batch,
        p.queue
    ));
    let abort = engine.abort_handle();
    let state = Arc::new(api::AppState {
        engine,
        template,
        model_name: model_name.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pipe-http")
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting the HTTP runtime: {e}")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| fail(format!("cannot listen on {addr}: {e}")).hint("pick another port with --port"))?;
    let addr = listener.local_addr().map_err(fail)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = api::router(state);
    let thread = std::thread::Builder::new()
        .name("pipe-serve".into())
        .spawn(move || {
            rt.block_on(async move {
                let r = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!("server: {e}");
                }
            });
        })
        .map_err(|e| fail(format!("starting the server thread: {e}")))?;
    let server = Server { addr, model_name, shutdown: Some(tx), thread: Some(thread), abort };
    wait_healthy(&server)?;
    Ok(server)
}

/// Whether the engine warms up before serving ([`EngineOptions::warm_up`]):
/// on CUDA unless `PIPE_SERVE_WARMUP=0`; on the CPU, where nothing is
/// compiled or recorded on first use, only with `PIPE_SERVE_WARMUP=1`.
fn warm_up_wanted(cuda: bool) -> bool {
    match std::env::var("PIPE_SERVE_WARMUP").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => cuda,
    }
}

fn wait_healthy(s: &Server) -> Result<(), StageFailure> {
    let url = format!("http://{}/health", s.addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ureq::get(&url).call() {
            Ok(r) if r.status() == 200 => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(fail(format!("the server at {} did not answer /health within 30 s", s.addr)))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

pub struct ServeKind;

struct ServeStage {
    p: ServeParams,
}

impl StageKind for ServeKind {
    fn name(&self) -> &'static str {
        "serve"
    }
    fn version(&self) -> u32 {
        // 2: CUDA decode projections on tensor cores and packed prefill;
        // small-batch CPU products by row (greedy outputs may differ at
        // near-ties). 3: the CPU's decode attention over ranges of
        // positions merged, with a vector exp, and its small products
        // summed in another order.
        3
    }
    fn summary(&self) -> &'static str {
        "an OpenAI-compatible endpoint for a model (a service: started for the stages that use it)"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: ServeParams = parse_params(params)?;
        for (f, v) in [("max_batch", p.max_batch), ("queue", p.queue)] {
            if v == 0 {
                return Err(ParamError::new(vec![Seg::Key(f.into())], format!("`{f}` must be at least 1")));
            }
        }
        Ok(Box::new(ServeStage { p }))
    }
}

impl Stage for ServeStage {
    fn files(&self) -> Vec<FileDep> {
        self.p
            .chat_template
            .iter()
            .map(|f| FileDep { path: f.clone(), at: vec![Seg::Key("chat_template".into())] })
            .collect()
    }
    fn key_env(&self) -> std::collections::BTreeMap<String, String> {
        [("device".to_string(), if self.p.device.on_cuda() { "cuda" } else { "cpu" }.to_string())].into()
    }
    fn is_service(&self) -> bool {
        true
    }
    fn run(&self, _ctx: &RunCtx) -> Result<(), StageFailure> {
        Err(StageFailure::new("`serve` is a service: it is started for the stages that use it, not run")
            .hint("run a stage that takes it as an input (e.g. `evaluate`), or use `pipe serve`"))
    }
    fn start_service(&self, ctx: &RunCtx) -> Option<Result<Box<dyn Service>, StageFailure>> {
        Some((|| {
            let model: &PathBuf = ctx.inputs.get("model").ok_or_else(|| {
                StageFailure::new("`serve` needs an input named `model`").hint("write `inputs: {model: MODEL_STAGE}`")
            })?;
            let mut p = self.p.clone();
            if let Some(f) = &p.chat_template {
                p.chat_template = Some(ctx.workspace.join(f).to_string_lossy().into_owned());
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], 0));
            let s = start(model, ctx.stage, &p, &ctx.gpus, addr, &|m| ctx.log_line(m))?;
            ctx.log_line(&format!("serving {} on {}", s.model_name, s.base_url()));
            Ok(Box::new(s) as Box<dyn Service>)
        })())
    }
}
