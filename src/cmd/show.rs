//! `pipe show [FILE] STAGE [--path|--log|--json]`

use std::path::Path;

use anyhow::Result;
use pipe_engine::spec::VarOverride;
use pipe_engine::status::status;
use pipe_engine::{Pipeline, Workspace};

/// `[FILE] STAGE` -> the loaded pipeline, the stage index and name.
pub(crate) fn load_stage(
    args: Vec<String>,
    set: &[VarOverride],
) -> Result<(Workspace, Pipeline, String, usize, String)> {
    let (file, stage) = match args.as_slice() {
        [f, s] => (Some(f.into()), s.clone()),
        [s] => (None, s.clone()),
        _ => unreachable!("clap enforces 1..=2 args"),
    };
    let (ws, p, pid) = super::load(file, set)?;
    let Some(i) = p.index(&stage) else {
        let names: Vec<&str> = p.stages.iter().map(|s| s.name()).collect();
        return Err(super::UsageError(format!(
            "no stage named `{stage}` in {}\nhint: {}",
            p.path.display(),
            pipe_engine::diag::did_you_mean(&stage, names.iter().copied())
                .unwrap_or_else(|| format!("stages: {}", names.join(", ")))
        ))
        .into());
    };
    Ok((ws, p, pid, i, stage))
}

pub fn checkout(args: Vec<String>, dest: &Path, set: &[VarOverride]) -> Result<i32> {
    let (ws, p, pid, _, stage) = load_stage(args, set)?;
    let Some(rec) = ws.state(&pid, &stage).last_success.and_then(|k| ws.record(&k)) else {
        anyhow::bail!("stage `{stage}` has no result yet\nhint: run `pipe run {} {stage}`", p.path.display());
    };
    if dest.exists() {
        return Err(super::UsageError(format!("{} already exists; pass a new folder", dest.display())).into());
    }
    ws.store.checkout(&rec.output, dest)?;
    eprintln!("pipe: checked out {stage} ({}) to {}", rec.output.short(), dest.display());
    Ok(0)
}

pub fn show(args: Vec<String>, path_only: bool, log: bool, json: bool, set: &[VarOverride]) -> Result<i32> {
    let (ws, p, pid, i, stage) = load_stage(args, set)?;
    let st = status(&ws, &p, &pid)?.swap_remove(i);
    let state = ws.state(&pid, &stage);
    let Some(rec) = state.last_success.and_then(|k| ws.record(&k)) else {
        anyhow::bail!(
            "stage `{stage}` has no result yet ({})\nhint: run `pipe run {} {stage}`",
            st.state.label(),
            p.path.display()
        );
    };
    let out = ws.store.object_path(&rec.output);
    if path_only {
        println!("{}", out.display());
        return Ok(0);
    }
    if log {
        print!("{}", fs_err::read_to_string(&rec.log)?);
        return Ok(0);
    }
    let metrics = ["metrics.json", "results.json", "stats.json", "dataset.json", "model.json", "train.json"]
        .iter()
        .map(|m| out.join(m))
        .find(|m| m.is_file())
        .and_then(|m| fs_err::read(m).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    if json {
        let v = serde_json::json!({
            "schema": 1,
            "stage": stage,
            "state": st.state,
            "reasons": st.reasons,
            "key": rec.key,
            "output": rec.output,
            "path": out,
            "log": rec.log,
            "started_ms": rec.started_ms,
            "duration_ms": rec.duration_ms,
            "metrics": metrics,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("stage:    {stage} ({})", p.stages[i].spec.kind);
    let note = if st.reasons.is_empty() { String::new() } else { format!(" ({})", st.reasons.join("; ")) };
    println!("state:    {}{note}", st.state.label());
    println!("key:      {}", rec.key);
    println!("output:   {}", rec.output);
    println!("path:     {}", out.display());
    println!("log:      {}", rec.log.display());
    println!("took:     {:.2}s", rec.duration_ms as f64 / 1000.0);
    if let Ok(summary) = fs_err::read_to_string(out.join("summary.txt")) {
        print!("\n{summary}");
    }
    if let Some(m) = metrics {
        println!("metrics:  {}", serde_json::to_string(&m)?);
    }
    Ok(0)
}
