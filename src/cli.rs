use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use pipe_engine::spec::VarOverride;

/// pipe: the LLM fine-tuning workflow as a declarative, content-hashed build graph.
#[derive(Parser, Debug)]
#[command(name = "pipe", version, about, propagate_version = true)]
pub struct Cli {
    /// More output on stderr (-v: info, -vv: debug, including every stage key's inputs as JSON).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone, Default)]
pub struct PipelineArgs {
    /// Override a var: `--set vars.lr=0.001` (value read as YAML). Repeatable.
    #[arg(long = "set", value_name = "vars.NAME=VALUE", global = true)]
    pub set: Vec<VarOverride>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run stale stages (and their stale ancestors); cached stages are skipped.
    Run {
        /// Pipeline file (default: pipeline.yaml, else the only file in pipelines/), then stage names.
        #[arg(value_name = "[FILE] [STAGES]")]
        args: Vec<String>,
        /// Run up to N independent stages at once.
        #[arg(short, long, default_value_t = default_jobs())]
        jobs: usize,
        /// GPU ids for `gpus:` stages (default: CUDA_VISIBLE_DEVICES, else every GPU a CUDA build sees).
        #[arg(long, value_delimiter = ',')]
        gpus: Option<Vec<u32>>,
        /// Print what would run and why, and which stages are cached; run nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Rerun this stage even if it is cached (repeatable).
        #[arg(short, long, value_name = "STAGE")]
        force: Vec<String>,
        /// After a failure, keep running stages that do not depend on it.
        #[arg(short, long)]
        keep_going: bool,
        /// Fail (exit 1) if any stage's key differs from the lock file; never write it.
        #[arg(long)]
        frozen: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Per stage: fresh / stale / never run / failed / running, and why.
    Status {
        /// Pipeline file.
        file: Option<PathBuf>,
        /// Machine-readable output (schema 1).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// A stage's latest result: output path, digest, key, metrics, log.
    Show {
        /// [FILE] STAGE
        #[arg(value_name = "[FILE] STAGE", required = true, num_args = 1..=2)]
        args: Vec<String>,
        /// Print only the output path.
        #[arg(long, conflicts_with_all = ["log", "json"])]
        path: bool,
        /// Print the stage's log.
        #[arg(long, conflicts_with = "json")]
        log: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Copy a stage's latest output to a folder (hardlinks where possible: objects are read-only).
    Checkout {
        /// [FILE] STAGE DEST
        #[arg(value_name = "[FILE] STAGE DEST", required = true, num_args = 2..=3)]
        args: Vec<String>,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Re-execute deterministic stages and check their outputs against the lock file;
    /// re-hash every stored object the lock references.
    Verify {
        /// Pipeline file.
        file: Option<PathBuf>,
        /// Only re-hash stored objects and compare keys; do not re-execute.
        #[arg(long)]
        no_exec: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Serve a model over the OpenAI API: /v1/chat/completions, /v1/completions,
    /// /v1/models, /health (continuous batching; Ctrl-C stops gracefully).
    ///
    /// On CUDA the server warms up before it prints `serving`: a few synthetic
    /// requests through every kind of step, so that what a process does once
    /// (loading kernels, recording the decode graphs) does not land on the
    /// first requests. PIPE_SERVE_WARMUP=0 skips it; =1 warms up on the CPU too.
    Serve {
        /// [FILE] MODEL: a model folder, or a stage (a `serve` stage, or one whose output is a model folder).
        #[arg(value_name = "[FILE] MODEL", required = true, num_args = 1..=2)]
        args: Vec<String>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (0: any free port; the line `serving NAME on http://HOST:PORT` says which).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// The model name clients ask for (default: the stage or folder name).
        #[arg(long)]
        model_name: Option<String>,
        /// Sequences decoded together at most (default 64).
        #[arg(long)]
        max_batch: Option<usize>,
        /// Requests waiting beyond the batch; more are refused with 503 (default 256).
        #[arg(long)]
        queue: Option<usize>,
        /// Cap the context length (default: the model's max_position_embeddings).
        #[arg(long)]
        max_model_len: Option<usize>,
        /// auto | cpu | cuda
        #[arg(long)]
        device: Option<String>,
        /// auto (f32 on CPU, bf16 on CUDA) | f32 | bf16 | f16
        #[arg(long)]
        dtype: Option<String>,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Print the content digest of files or directories (the digests pipe uses in keys).
    Hash {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Delete stored outputs no lock file references (and not among the last N runs).
    Gc {
        /// Also keep the outputs of the N most recent runs.
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        /// Also delete work dirs of failed or killed runs under .pipe/tmp, and
        /// the checkpoints interrupted train stages would resume from (.pipe/resume).
        #[arg(long)]
        tmp: bool,
        /// Report what would be deleted.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Workspace root (default: found from the current directory).
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
