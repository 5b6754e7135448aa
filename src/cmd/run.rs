//! `pipe run [FILE] [STAGES..]`

use anyhow::Result;
use pipe_engine::exec::{self, Outcome, RunOptions};
use pipe_engine::spec::VarOverride;
use pipe_engine::stage::Cancel;

use crate::ui::Ui;

#[allow(clippy::too_many_arguments)]
pub fn run(
    args: Vec<String>,
    jobs: usize,
    gpus: Option<Vec<u32>>,
    dry_run: bool,
    force: Vec<String>,
    keep_going: bool,
    frozen: bool,
    set: &[VarOverride],
) -> Result<i32> {
    let (file, targets) = match args.split_first() {
        Some((f, rest)) if super::looks_like_pipeline(f) => (Some(f.into()), rest.to_vec()),
        _ => (None, args),
    };
    let (ws, p, pid) = super::load(file, set)?;
    let gpus = gpus.unwrap_or_else(|| {
        std::env::var("CUDA_VISIBLE_DEVICES")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| (0..pipe_stages::cuda_device_count() as u32).collect())
    });
    for f in &force {
        if p.index(f).is_none() {
            return Err(super::UsageError(format!("--force {f}: no stage named `{f}` in {}", p.path.display())).into());
        }
    }
    let opts = RunOptions { targets, jobs, gpus, force, keep_going, frozen };
    if dry_run {
        for (name, runs, reasons) in exec::plan(&ws, &p, &pid, &opts)? {
            if runs {
                println!("would run  {name}: {}", reasons.join("; "));
            } else {
                println!("cached     {name}");
            }
        }
        return Ok(0);
    }
    let cancel = Cancel::default();
    {
        let cancel = cancel.clone();
        let mut hits = 0;
        let _ = ctrlc::set_handler(move || {
            hits += 1;
            if hits > 1 {
                eprintln!("pipe: stopping now");
                std::process::exit(130);
            }
            eprintln!("pipe: stopping: the running stages are being stopped; nothing partial is published (Ctrl-C again to quit at once)");
            cancel.cancel();
        });
    }
    let ui = Ui::new();
    let summary = exec::run(&ws, &p, &pid, &opts, &cancel, &ui)?;
    if !summary.drift.is_empty() {
        eprintln!(
            "error: --frozen: {} stage(s) differ from {}:",
            summary.drift.len(),
            pipe_engine::records::LockFile::path_for(&p.path).display()
        );
        for d in &summary.drift {
            eprintln!("  {d}");
        }
        eprintln!("hint: run `pipe run` without --frozen to update the lock file, and commit it");
        return Ok(1);
    }
    let (mut ran, mut cached, mut failed, mut skipped) = (0, 0, Vec::new(), Vec::new());
    for (name, o) in &summary.outcomes {
        match o {
            Outcome::Ran { .. } => ran += 1,
            Outcome::Cached { .. } => cached += 1,
            Outcome::Service { started: true, .. } => ran += 1,
            Outcome::Service { started: false, .. } => cached += 1,
            Outcome::Failed(_) => failed.push(name.as_str()),
            Outcome::Skipped(why) => skipped.push(format!("{name} ({why})")),
        }
    }
    let mut line = format!("pipe: {} stage(s): {ran} ran, {cached} cached", summary.outcomes.len());
    if !failed.is_empty() {
        line.push_str(&format!(", {} failed ({})", failed.len(), failed.join(", ")));
    }
    if !skipped.is_empty() {
        line.push_str(&format!(", {} not run: {}", skipped.len(), skipped.join(", ")));
    }
    ui.line(&line);
    // Stages with a summary (evaluate's score table) print it on stdout.
    for (name, o) in &summary.outcomes {
        if let Outcome::Ran { output, .. } = o {
            if let Ok(text) = fs_err::read_to_string(ws.store.object_path(output).join("summary.txt")) {
                println!("{name}: {text}");
            }
        }
    }
    if summary.cancelled {
        return Ok(130);
    }
    Ok(if summary.failed() { 1 } else { 0 })
}
