//! The `pipe` binary: CLI parsing (clap) and one file per command in `cmd/`.
//! Stdout carries data (tables, JSON); progress and logs go to stderr.

mod cli;
mod cmd;
mod ui;

use clap::Parser;

/// glibc's allocator spends ~45% of `pack`'s time on the tokenizer's many small
/// allocations at 100k samples; mimalloc keeps throughput flat (benches/pack.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    fn mi_option_set(option: i32, value: std::os::raw::c_long);
}

fn main() {
    // Die quietly on a closed pipe (`pipe status | head -1`), like other CLIs.
    // SAFETY: setting a signal disposition before any threads start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Large tensors come and go every op; mimalloc hands freed memory back
    // to the OS after 10 ms, and then every new tensor page-faults on zeroed
    // pages (a quarter of a training step's time). Keep it instead.
    // SAFETY: a plain option setter of the allocator linked in (mimalloc's
    // `mi_option_purge_delay` is option 15 in v2 and v3), before any thread.
    unsafe { mi_option_set(15, -1) };
    // candle's element-wise thread pool spins between ops on pinned threads,
    // fighting the matmul threads for the cores (on 2 cores a training step
    // ran 2x slower with it), and with one thread the other cores idle
    // through every element-wise op (on rayon: 1.19x a CPU LoRA step).
    // Unless the user sized that pool, its work goes to rayon's pool, the
    // matmuls' own threads (`PIPE_ELEMWISE_RAYON=0`: the small pool as
    // before, a quarter of the cores; `=1`: rayon whatever the pool's size).
    // Both variables are exported, so stages run as child processes do
    // the same.
    let sized = std::env::var_os("CANDLE_NUM_THREADS").is_some();
    let rayon = match std::env::var_os("PIPE_ELEMWISE_RAYON") {
        Some(v) => v != "0",
        None => !sized,
    };
    // SAFETY: no other thread exists yet.
    unsafe {
        std::env::set_var("PIPE_ELEMWISE_RAYON", if rayon { "1" } else { "0" });
        if !sized {
            let quarter = || std::thread::available_parallelism().map(|n| n.get() / 4).unwrap_or(1).max(1);
            std::env::set_var("CANDLE_NUM_THREADS", if rayon { 1 } else { quarter() }.to_string());
        }
    }
    pipe_stages::nn::set_elementwise_on_rayon(rayon);
    let args = cli::Cli::parse();
    let filter = match args.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PIPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    let code = match cmd::dispatch(args) {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<pipe_engine::EngineError>() {
            Some(ee) => {
                eprintln!("{}", render_error(&ee.to_string()));
                ee.exit_code()
            }
            None => {
                eprintln!("{}", render_error(&format!("{e:#}")));
                e.downcast_ref::<cmd::UsageError>().map(|_| 2).unwrap_or(1)
            }
        },
    };
    std::process::exit(code);
}

fn render_error(msg: &str) -> String {
    if msg.starts_with("error:") {
        msg.to_string()
    } else {
        format!("error: {msg}")
    }
}
