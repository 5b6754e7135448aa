//! The stage contract. A stage *kind* (`command`, `dataset`, ...) turns a
//! stage's params into a prepared [`Stage`]; the engine hashes what the stage
//! declares (params, files, inputs, env) into its key and calls [`Stage::run`]
//! with a [`RunCtx`] when the key has no cached result.
//!
//! Kinds live in the `pipe-stages` crate and are listed in its registry; the
//! engine never names a kind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::yaml::Seg;

/// A params error at a path inside the stage's fields.
#[derive(Debug, Clone)]
pub struct ParamError {
    pub path: Vec<Seg>,
    pub message: String,
    pub hint: Option<String>,
    /// Point at the key itself rather than its value (unknown fields).
    pub at_key: bool,
}

impl ParamError {
    pub fn new(path: Vec<Seg>, message: impl Into<String>) -> Self {
        ParamError { path, message: message.into(), hint: None, at_key: false }
    }

    pub fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }
}

/// Deserialize a stage's params (a struct with `deny_unknown_fields`),
/// turning serde's message into a located [`ParamError`] with "did you mean".
pub fn parse_params<T: DeserializeOwned>(v: &Value) -> Result<T, ParamError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let mut path: Vec<Seg> = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                _ => None,
            })
            .collect();
        let msg = e.inner().to_string();
        // "unknown field `x`, expected one of `a`, `b`" / "expected `a`"
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let field = rest.split('`').next().unwrap_or_default().to_string();
            let expected: Vec<&str> = rest
                .split_once(", expected")
                .map(|(_, e)| e.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            if path.last() != Some(&Seg::Key(field.clone())) {
                path.push(Seg::Key(field.clone()));
            }
            let hint = crate::diag::did_you_mean(&field, expected.iter().copied())
                .unwrap_or_else(|| format!("valid fields: {}", expected.join(", ")));
            return ParamError { path, message: format!("unknown field `{field}`"), hint: Some(hint), at_key: true };
        }
        if let Some(field) = msg.strip_prefix("missing field `") {
            let field = field.trim_end_matches('`');
            return ParamError::new(path, format!("missing field `{field}`"))
                .hint(format!("add `{field}:` to the stage"));
        }
        let shown = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        let field = path
            .iter()
            .map(|s| match s {
                Seg::Key(k) => k.clone(),
                Seg::Index(i) => format!("[{i}]"),
            })
            .collect::<Vec<_>>()
            .join(".");
        let hint = if shown.contains("expected a sequence") {
            Some("write a list, e.g. `[a, b]` or one `- item` per line")
        } else if shown.contains("expected a string") {
            Some("quote the value to make it a string")
        } else if shown.contains("expected a map") || shown.contains("expected struct") {
            Some("write a mapping, e.g. `{key: value}` or indented `key: value` lines")
        } else if shown.contains("expected a boolean") {
            Some("write `true` or `false`")
        } else if shown.contains("expected u32") || shown.contains("expected usize") || shown.contains("expected u64") {
            Some("write a whole number, without quotes")
        } else {
            None
        };
        let message = if field.is_empty() { shown } else { format!("field `{field}`: {shown}") };
        let mut e = ParamError::new(path, message);
        e.hint = hint.map(str::to_string);
        e
    })
}

/// A workspace file or directory the stage reads, hashed by content into its key.
#[derive(Debug, Clone)]
pub struct FileDep {
    /// Relative to the workspace root (as written by the user).
    pub path: String,
    /// Where it was declared, for errors ("file not found").
    pub at: Vec<Seg>,
}

/// What a stage needs to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// GPUs (device slots) the stage takes.
    pub gpus: u32,
}

/// A stage kind: validates params and builds a [`Stage`].
pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bump when the kind's behaviour changes: every stage of this kind reruns.
    fn version(&self) -> u32;
    fn summary(&self) -> &'static str;
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError>;
}

/// A prepared stage: params validated, ready to be keyed and run.
pub trait Stage: Send + Sync {
    /// Workspace files the stage reads (hashed by content into the key).
    fn files(&self) -> Vec<FileDep> {
        Vec::new()
    }
    fn resources(&self) -> Resources {
        Resources::default()
    }
    /// False for stages whose output may differ between runs with one key
    /// (`pipe verify` skips re-executing them).
    fn deterministic(&self) -> bool {
        true
    }
    /// Declared environment parts (device class, precision) that go into the key.
    fn key_env(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// Facts resolved outside the workspace each time the key is computed
    /// (e.g. the commit sha a hub branch points to), so that a moving source
    /// shows up in `status`. An error (offline, say) leaves the stage unkeyed:
    /// `status` reports it and `run` fails the stage with the message.
    fn pins(&self) -> Result<BTreeMap<String, String>, StageFailure> {
        Ok(BTreeMap::new())
    }
    /// Produce the output into `ctx.out_dir`.
    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure>;
    /// A service stage (`serve`) is never run for an output: the engine
    /// starts it (with this) only when a dependent has to run, hands its
    /// base URL to them (`RunCtx::endpoints`), and stops it after them. Its
    /// dependents' keys take the service's key in place of an output digest.
    fn start_service(&self, _ctx: &RunCtx) -> Option<Result<Box<dyn Service>, StageFailure>> {
        None
    }
    fn is_service(&self) -> bool {
        false
    }
}

/// A running service (see [`Stage::start_service`]).
pub trait Service: Send {
    /// Base URL dependents talk to, e.g. `http://127.0.0.1:41234/v1`.
    fn url(&self) -> String;
    /// Stop it and wait until it has stopped.
    fn stop(self: Box<Self>);
    /// The run was cancelled: end what it is doing now (requests in flight
    /// fail) rather than let it finish; `stop` follows. Default: nothing.
    fn abort(&self) {}
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StageFailure {
    pub message: String,
    pub hint: Option<String>,
}

impl StageFailure {
    pub fn new(message: impl Into<String>) -> Self {
        StageFailure { message: message.into(), hint: None }
    }
    pub fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }
}

impl From<std::io::Error> for StageFailure {
    fn from(e: std::io::Error) -> Self {
        StageFailure::new(e.to_string())
    }
}

/// Set by Ctrl-C / SIGTERM; stages poll it and stop their children.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Progress reports from a running stage (shown on a TTY, logged otherwise).
pub trait Progress: Send + Sync {
    fn message(&self, msg: &str);
}

/// Everything a running stage gets.
pub struct RunCtx<'a> {
    pub stage: &'a str,
    pub workspace: &'a Path,
    /// The directory to write the output into (`$PIPE_OUT`); published on success.
    pub out_dir: &'a Path,
    /// Scratch space outside the output (params file, temporaries).
    pub work_dir: &'a Path,
    /// Persistent scratch for this stage key (`.pipe/resume/<key>/`, created
    /// on demand): checkpoints live here, so an interrupted or failed run of
    /// the same key resumes. Removed once the output is published.
    pub resume_dir: &'a Path,
    /// Input name -> path of the upstream artifact (or sub-path of it).
    pub inputs: BTreeMap<String, PathBuf>,
    /// Input name -> base URL, for inputs that are services.
    pub endpoints: BTreeMap<String, String>,
    pub params: &'a Value,
    /// GPU ids assigned to this stage (for `CUDA_VISIBLE_DEVICES`).
    pub gpus: Vec<u32>,
    pub cancel: Cancel,
    pub progress: &'a dyn Progress,
    pub log: Mutex<fs_err::File>,
    pub log_path: PathBuf,
}

impl RunCtx<'_> {
    /// Append a line to the stage log.
    pub fn log_line(&self, line: &str) {
        if let Ok(mut f) = self.log.lock() {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// All stage kinds known to this build.
#[derive(Default)]
pub struct Registry {
    kinds: Vec<Box<dyn StageKind>>,
}

impl Registry {
    pub fn register(&mut self, k: Box<dyn StageKind>) {
        self.kinds.push(k);
    }

    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds.iter().find(|k| k.name() == name).map(|k| k.as_ref())
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }
}
