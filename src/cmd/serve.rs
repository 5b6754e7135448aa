//! `pipe serve [FILE] MODEL`: the OpenAI-compatible server for humans.
//! MODEL is a model folder, or a stage of a pipeline: a `serve` stage (its
//! params and its model input), or any stage whose output is a model folder.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use pipe_engine::spec::VarOverride;
use pipe_stages::serve::{self, ServeParams};

pub struct Flags {
    pub host: IpAddr,
    pub port: u16,
    pub model_name: Option<String>,
    pub max_batch: Option<usize>,
    pub queue: Option<usize>,
    pub max_model_len: Option<usize>,
    pub device: Option<String>,
    pub dtype: Option<String>,
}

fn enum_value<T: serde::de::DeserializeOwned>(flag: &str, v: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|e| super::UsageError(format!("--{flag} {v}: {e}")).into())
}

pub fn serve(args: Vec<String>, f: Flags, set: &[VarOverride]) -> Result<i32> {
    let (dir, name, mut params) = resolve(args, set)?;
    if let Some(v) = f.model_name {
        params.model_name = Some(v);
    }
    if let Some(v) = f.max_batch {
        params.max_batch = v.max(1);
    }
    if let Some(v) = f.queue {
        params.queue = v.max(1);
    }
    if let Some(v) = f.max_model_len {
        params.max_model_len = Some(v);
    }
    if let Some(v) = &f.device {
        params.device = enum_value("device", v)?;
    }
    if let Some(v) = &f.dtype {
        params.dtype = enum_value("dtype", v)?;
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let server = serve::start(&dir, &name, &params, &[], SocketAddr::new(f.host, f.port), &|m| eprintln!("pipe: {m}"))
        .map_err(|e| anyhow::anyhow!("{}{}", e.message, e.hint.map(|h| format!("\nhint: {h}")).unwrap_or_default()))?;
    eprintln!(
        "pipe: serving {} on http://{} (OpenAI API at {}; Ctrl-C stops)",
        server.model_name,
        server.addr,
        server.base_url()
    );
    let _ = rx.recv();
    eprintln!("pipe: stopping: finishing running requests");
    server.stop();
    eprintln!("pipe: stopped");
    Ok(0)
}

/// The model folder, the default model name and the server params.
fn resolve(args: Vec<String>, set: &[VarOverride]) -> Result<(PathBuf, String, ServeParams)> {
    if let [one] = args.as_slice() {
        let dir = PathBuf::from(one);
        if dir.is_dir() {
            if !dir.join("config.json").is_file() {
                return Err(super::UsageError(format!(
                    "{} is not a model folder (no config.json)\nhint: pass an HF folder, or a stage name of a pipeline",
                    dir.display()
                ))
                .into());
            }
            let name = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
            return Ok((dir, name.unwrap_or_else(|| "model".into()), ServeParams::default()));
        }
    }
    let (ws, p, pid, i, stage) = super::show::load_stage(args, set)?;
    let s = &p.stages[i];
    let (model_stage, params) = if s.spec.kind == "serve" {
        let params: ServeParams = serde_json::from_value(s.spec.params.clone())
            .with_context(|| format!("stage `{stage}`: invalid params"))?;
        let inp = s.inputs().iter().find(|x| x.name == "model").map(|x| x.stage.clone());
        let Some(m) = inp else { anyhow::bail!("serve stage `{stage}` has no `model` input") };
        (m, params)
    } else {
        (stage.clone(), ServeParams::default())
    };
    let Some(rec) = ws.state(&pid, &model_stage).last_success.and_then(|k| ws.record(&k)) else {
        anyhow::bail!(
            "stage `{model_stage}` has no result yet\nhint: run `pipe run {} {model_stage}`",
            p.path.display()
        );
    };
    Ok((ws.store.object_path(&rec.output), stage, params))
}
