//! `pipe status`: per stage fresh / stale / never run / failed / running,
//! with the reasons a stale stage would rerun. Reads records and the stat
//! cache only: unchanged files are not re-hashed.

use pipe_cache::Digest;
use serde::Serialize;

use crate::graph::Pipeline;
use crate::key::explain;
use crate::records::read_json;
use crate::workspace::Workspace;
use crate::EngineError;

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Fresh,
    Stale,
    NeverRun,
    Failed,
    Running,
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Stale => "stale",
            State::NeverRun => "never run",
            State::Failed => "failed",
            State::Running => "running",
        }
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct StageStatus {
    pub name: String,
    pub state: State,
    pub reasons: Vec<String>,
    pub key: Option<Digest>,
    pub output: Option<Digest>,
}

/// Status of every stage, in topological order.
pub fn status(ws: &Workspace, p: &Pipeline, pid: &str) -> Result<Vec<StageStatus>, EngineError> {
    let mut outputs: Vec<Option<Digest>> = vec![None; p.stages.len()];
    let mut out = Vec::with_capacity(p.stages.len());
    for (i, s) in p.stages.iter().enumerate() {
        let st = ws.state(pid, s.name());
        let ki = match ws.key_inputs(p, s, &outputs) {
            Err(EngineError::Pin { message, .. }) => {
                let state = if st.last_success.is_none() { State::NeverRun } else { State::Stale };
                out.push(StageStatus {
                    name: s.name().into(),
                    state,
                    reasons: vec![format!("cannot resolve its source: {message}")],
                    key: None,
                    output: None,
                });
                continue;
            }
            other => other?,
        };
        let Some(ki) = ki else {
            let stale: Vec<String> = s
                .inputs()
                .iter()
                .filter(|inp| outputs[p.index(&inp.stage).expect("resolved")].is_none())
                .map(|inp| format!("input {} is not up to date (stage {})", inp.name, inp.stage))
                .collect();
            let state =
                if st.last_success.is_none() && st.last_failure.is_none() { State::NeverRun } else { State::Stale };
            let mut reasons = stale;
            if state == State::NeverRun {
                reasons.insert(0, "never run".into());
            }
            out.push(StageStatus { name: s.name().into(), state, reasons, key: None, output: None });
            continue;
        };
        let key = ki.key();
        if s.stage.is_service() {
            outputs[i] = Some(key);
            out.push(StageStatus {
                name: s.name().into(),
                state: State::Fresh,
                reasons: vec!["service: started when a stage that uses it runs; never cached".into()],
                key: Some(key),
                output: None,
            });
            continue;
        }
        let (state, reasons, output) = if let Some(r) = ws.hit(&key) {
            outputs[i] = Some(r.output);
            (State::Fresh, vec![], Some(r.output))
        } else if ws.is_locked(&key) {
            (State::Running, vec!["being run by another `pipe run`".into()], None)
        } else if let Some(f) = st.last_failure.as_ref().filter(|f| f.key == key) {
            (State::Failed, vec![format!("failed: {} (log: {})", f.message, f.log.display())], None)
        } else {
            match st.last_success.and_then(|k| ws.record(&k).map(|r| (k, r))) {
                None if st.last_success.is_none() => (State::NeverRun, vec!["never run".into()], None),
                None => (State::Stale, vec!["record of the last run is missing".into()], None),
                Some((k, _)) if k == key => (State::Stale, vec!["output missing or corrupt".into()], None),
                Some((_, r)) => {
                    let mut why = explain(&r.key_inputs, &ki);
                    if why.is_empty() {
                        why.push("key changed".into());
                    }
                    (State::Stale, why, None)
                }
            }
        };
        let mut reasons = reasons;
        if !matches!(state, State::Fresh | State::Running) {
            let ckpt = ws.dot.join("resume").join(key.hex()).join("checkpoint").join("state.json");
            if let Some(v) = read_json::<serde_json::Value>(&ckpt) {
                let step = v.get("step").and_then(|s| s.as_u64()).map(|s| format!(" (step {s})")).unwrap_or_default();
                reasons.push(format!("an interrupted run left a checkpoint{step}: the next run resumes from it"));
            }
        }
        out.push(StageStatus { name: s.name().into(), state, reasons, key: Some(key), output });
    }
    Ok(out)
}
