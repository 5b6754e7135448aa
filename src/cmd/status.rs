//! `pipe status [FILE] [--json]`

use std::path::PathBuf;

use anyhow::Result;
use pipe_engine::spec::VarOverride;
use pipe_engine::status::{status as compute, StageStatus};
use serde::Serialize;

#[derive(Serialize)]
struct JsonStatus<'a> {
    schema: u32,
    stages: &'a [StageStatus],
}

pub fn status(file: Option<PathBuf>, json: bool, set: &[VarOverride]) -> Result<i32> {
    let (ws, p, pid) = super::load(file, set)?;
    let st = compute(&ws, &p, &pid)?;
    ws.save_stat_cache();
    if json {
        println!("{}", serde_json::to_string_pretty(&JsonStatus { schema: 1, stages: &st })?);
        return Ok(0);
    }
    let w = st.iter().map(|s| s.name.len()).max().unwrap_or(5).max(5);
    println!("{:w$}  {:9}  WHY", "STAGE", "STATE");
    for s in &st {
        let why = if s.reasons.is_empty() {
            s.output.map(|o| format!("output {}", o.short())).unwrap_or_default()
        } else {
            s.reasons.join("; ")
        };
        println!("{:w$}  {:9}  {why}", s.name, s.state.label());
    }
    Ok(0)
}
