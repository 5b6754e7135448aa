//! `command`: run a shell command with declared deps and outs (the DVC stage).
//!
//! Inputs: other stages' outputs (`inputs: {data: gen}` -> `$PIPE_IN_DATA`),
//! workspace files and dirs (`deps:`).
//! Outputs: whatever the command writes to `$PIPE_OUT`; every path in `outs:`
//! must exist there afterwards.
//! Key: `cmd`, `outs`, `params` (also given as the JSON file `$PIPE_PARAMS`),
//! `env`, `gpus`, `deterministic`, the content digest of every dep, the
//! digests of the inputs.
//!
//! The command runs with `sh -c` (or as argv when `cmd` is a list) in the
//! workspace root, in its own process group so Ctrl-C stops all of it.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use pipe_engine::stage::{parse_params, FileDep, ParamError, Resources, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use serde::Deserialize;
use serde_json::Value;

pub struct CommandKind;

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a shell command (string) or a list of program arguments")]
enum Cmd {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a string, number or boolean")]
enum EnvValue {
    Str(String),
    Num(serde_json::Number),
    Bool(bool),
}

impl EnvValue {
    fn text(&self) -> String {
        match self {
            EnvValue::Str(s) => s.clone(),
            EnvValue::Num(n) => n.to_string(),
            EnvValue::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    cmd: Cmd,
    #[serde(default)]
    deps: Vec<String>,
    #[serde(default)]
    outs: Vec<String>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    env: BTreeMap<String, EnvValue>,
    #[serde(default = "yes")]
    deterministic: bool,
    #[serde(default)]
    gpus: u32,
}

fn yes() -> bool {
    true
}

struct CommandStage {
    p: Params,
}

impl StageKind for CommandKind {
    fn name(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "any shell command with declared deps and outs"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        match &p.cmd {
            Cmd::Shell(s) if s.trim().is_empty() => {
                return Err(ParamError::new(vec![Seg::Key("cmd".into())], "`cmd` is empty")
                    .hint("give the shell command to run"))
            }
            Cmd::Argv(a) if a.is_empty() => {
                return Err(ParamError::new(vec![Seg::Key("cmd".into())], "`cmd` is an empty list")
                    .hint("give the program and its arguments"))
            }
            _ => {}
        }
        for (i, o) in p.outs.iter().enumerate() {
            let bad = o.is_empty() || o.starts_with('/') || o.split('/').any(|c| c == "..");
            if bad {
                return Err(ParamError::new(
                    vec![Seg::Key("outs".into()), Seg::Index(i)],
                    format!("`{o}` is not a relative path inside $PIPE_OUT"),
                )
                .hint("outs are paths relative to $PIPE_OUT, without `..`"));
            }
        }
        for (i, d) in p.deps.iter().enumerate() {
            if d.is_empty() || d.split('/').any(|c| c == "..") {
                return Err(ParamError::new(
                    vec![Seg::Key("deps".into()), Seg::Index(i)],
                    format!("`{d}` is not a path inside the workspace"),
                )
                .hint("deps are workspace files or folders, relative to the workspace root"));
            }
        }
        Ok(Box::new(CommandStage { p }))
    }
}

impl Stage for CommandStage {
    fn files(&self) -> Vec<FileDep> {
        self.p
            .deps
            .iter()
            .enumerate()
            .map(|(i, d)| FileDep {
                path: d.trim_end_matches('/').to_string(),
                at: vec![Seg::Key("deps".into()), Seg::Index(i)],
            })
            .collect()
    }

    fn resources(&self) -> Resources {
        Resources { gpus: self.p.gpus }
    }

    fn deterministic(&self) -> bool {
        self.p.deterministic
    }

    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let params_file = ctx.work_dir.join("params.json");
        let params = self.p.params.clone().unwrap_or_else(|| Value::Object(Default::default()));
        fs_err::write(&params_file, serde_json::to_vec_pretty(&params).map_err(std::io::Error::other)?)?;

        let mut cmd = match &self.p.cmd {
            Cmd::Shell(s) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(s);
                c
            }
            Cmd::Argv(a) => {
                let mut c = Command::new(&a[0]);
                c.args(&a[1..]);
                c
            }
        };
        cmd.current_dir(ctx.workspace)
            .env("PIPE_OUT", ctx.out_dir)
            .env("PIPE_PARAMS", &params_file)
            .env("PIPE_STAGE", ctx.stage)
            .stdin(Stdio::null());
        for (name, url) in &ctx.endpoints {
            cmd.env(format!("PIPE_IN_{}", name.to_uppercase().replace('-', "_")), url);
        }
        for (name, path) in &ctx.inputs {
            cmd.env(format!("PIPE_IN_{}", name.to_uppercase().replace('-', "_")), path);
        }
        for (k, v) in &self.p.env {
            cmd.env(k, v.text());
        }
        if !ctx.gpus.is_empty() {
            let ids: Vec<String> = ctx.gpus.iter().map(u32::to_string).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
        }
        {
            let log = ctx.log.lock().map_err(|_| StageFailure::new("log poisoned"))?;
            cmd.stdout(log.file().try_clone()?).stderr(log.file().try_clone()?);
        }
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill
        // the child if pipe dies (kill -9), so no command outlives its run.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let shown = match &self.p.cmd {
            Cmd::Shell(s) => s.clone(),
            Cmd::Argv(a) => a.join(" "),
        };
        ctx.log_line(&format!("# $ {shown}"));
        let mut child = cmd.spawn().map_err(|e| StageFailure::new(format!("cannot start `{shown}`: {e}")))?;
        let pgid = child.id() as i32;
        let mut wait = Duration::from_millis(1);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if ctx.cancel.is_cancelled() {
                stop_group(pgid, &mut child);
                return Err(StageFailure::new("cancelled"));
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(50));
        };
        // Reap anything the command left running in its group.
        // SAFETY: plain syscall on a process group we created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        if !status.success() {
            let what = match (status.code(), status.signal()) {
                (Some(c), _) => format!("exited with status {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                _ => "failed".into(),
            };
            return Err(StageFailure::new(format!("command `{}` {what}", first_line(&shown))));
        }
        let missing: Vec<&str> =
            self.p.outs.iter().filter(|o| !ctx.out_dir.join(o).exists()).map(String::as_str).collect();
        if !missing.is_empty() {
            return Err(StageFailure::new(format!(
                "declared output{} not produced: {}",
                if missing.len() > 1 { "s" } else { "" },
                missing.join(", ")
            ))
            .hint("write outputs under $PIPE_OUT (e.g. `> $PIPE_OUT/data.txt`), or remove them from `outs:`"));
        }
        Ok(())
    }
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or_default();
    if l.len() < s.len() {
        format!("{l} ...")
    } else {
        l.to_string()
    }
}

/// SIGTERM the group, give it a moment, then SIGKILL.
fn stop_group(pgid: i32, child: &mut std::process::Child) {
    // SAFETY: plain syscalls on the process group we created.
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
    }
    for _ in 0..50 {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let _ = child.wait();
}
