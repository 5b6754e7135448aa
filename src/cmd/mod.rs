//! One file per command.

mod gc;
mod run;
mod serve;
mod show;
mod status;
mod verify;

use std::path::{Path, PathBuf};

use anyhow::Result;
use pipe_engine::spec::VarOverride;
use pipe_engine::{Pipeline, Workspace};

use crate::cli::{Cli, Command};

/// An invalid command line (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run { args, jobs, gpus, dry_run, force, keep_going, frozen, p } => {
            run::run(args, jobs, gpus, dry_run, force, keep_going, frozen, &p.set)
        }
        Command::Status { file, json, p } => status::status(file, json, &p.set),
        Command::Show { args, path, log, json, p } => show::show(args, path, log, json, &p.set),
        Command::Checkout { mut args, p } => {
            let dest = PathBuf::from(args.pop().expect("clap enforces 2..=3 args"));
            show::checkout(args, &dest, &p.set)
        }
        Command::Verify { file, no_exec, p } => verify::verify(file, no_exec, &p.set),
        Command::Serve { args, host, port, model_name, max_batch, queue, max_model_len, device, dtype, p } => {
            serve::serve(
                args,
                serve::Flags { host, port, model_name, max_batch, queue, max_model_len, device, dtype },
                &p.set,
            )
        }
        Command::Gc { keep_last, tmp, dry_run, root } => gc::gc(keep_last, tmp, dry_run, root),
        Command::Hash { paths } => {
            for p in paths {
                println!("{}  {}", pipe_cache::hash_path(&p, None)?, p.display());
            }
            Ok(0)
        }
    }
}

/// `pipeline.yaml` in the current directory, else the only YAML file in `pipelines/`.
pub fn default_pipeline() -> Result<PathBuf> {
    let direct = PathBuf::from("pipeline.yaml");
    if direct.is_file() {
        return Ok(direct);
    }
    let mut found: Vec<PathBuf> = fs_err::read_dir("pipelines")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(UsageError("no pipeline file given, and there is no pipeline.yaml or pipelines/*.yaml here\nhint: pass one, e.g. `pipe run pipelines/quickstart.yaml`".into()).into()),
        _ => Err(UsageError(format!(
            "several pipelines in pipelines/ ({}): say which one\nhint: e.g. `pipe run {}`",
            found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            found[0].display()
        ))
        .into()),
    }
}

pub fn looks_like_pipeline(s: &str) -> bool {
    s.ends_with(".yaml") || s.ends_with(".yml") || Path::new(s).is_file()
}

pub fn load(file: Option<PathBuf>, set: &[VarOverride]) -> Result<(Workspace, Pipeline, String)> {
    let file = match file {
        Some(f) => f,
        None => default_pipeline()?,
    };
    let registry = pipe_stages::registry();
    let (ws, p) = pipe_engine::load(&file, set, &registry)?;
    let pid = ws.pipeline_id(&p.path);
    Ok((ws, p, pid))
}
