//! What the engine remembers between runs, all under `.pipe/`:
//!
//! - `runs-v1/<key>.json`: [`RunRecord`], key -> output digest (+ the key's
//!   inputs, so a later status can say what changed).
//! - `state-v1/<pipeline>/<stage>.json`: [`StageState`], the latest success and
//!   failure of a stage of a pipeline (drives `status` reasons).
//! - `pipelines/<name>.lock` (beside the pipeline): [`LockFile`].

use std::path::{Path, PathBuf};

use pipe_cache::Digest;
use serde::{Deserialize, Serialize};

use crate::key::KeyInputs;
use crate::yaml::{self, YVal};

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RunRecord {
    pub schema: u32,
    pub stage: String,
    pub pipeline: String,
    pub key: Digest,
    pub output: Digest,
    pub key_inputs: KeyInputs,
    /// Unix time in milliseconds.
    pub started_ms: u64,
    pub duration_ms: u64,
    pub log: PathBuf,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Failure {
    pub key: Digest,
    pub message: String,
    pub log: PathBuf,
    pub work_dir: PathBuf,
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct StageState {
    /// Key of the latest successful run (its record is `runs-v1/<key>.json`).
    pub last_success: Option<Digest>,
    pub last_failure: Option<Failure>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Option<T> {
    let bytes = fs_err::read(p).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write_json<T: Serialize>(p: &Path, v: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    pipe_cache::Store::write_atomic(p, &bytes)
}

#[derive(Clone, Debug, PartialEq)]
pub struct LockEntry {
    pub kind: String,
    pub key: Digest,
    pub output: Digest,
    pub deterministic: bool,
}

/// `pipelines/<name>.lock`: per stage its key and output digest, in pipeline
/// order, one block per stage so merges stay local.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LockFile {
    pub stages: Vec<(String, LockEntry)>,
}

impl LockFile {
    pub fn path_for(pipeline: &Path) -> PathBuf {
        pipeline.with_extension("lock")
    }

    pub fn get(&self, stage: &str) -> Option<&LockEntry> {
        self.stages.iter().find(|(n, _)| n == stage).map(|(_, e)| e)
    }

    /// Read a lock file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<LockFile>, String> {
        let text = match fs_err::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let bad = |what: &str| format!("{}: {what}; delete it and rerun `pipe run` to regenerate it", path.display());
        let root = yaml::parse(0, &text).map_err(|d| bad(&d.message))?;
        match root.get("schema").map(|n| n.to_json()) {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(1) => {}
            _ => return Err(bad("unsupported or missing `schema` (expected 1)")),
        }
        let mut lf = LockFile::default();
        if let Some(YVal::Map(m)) = root.get("stages").map(|n| &n.val) {
            for (name, _, node) in m {
                let field = |k: &str| node.get(k).map(|n| n.to_json());
                let digest = |k: &str| -> Result<Digest, String> {
                    field(k)
                        .and_then(|v| v.as_str().and_then(|s| s.parse().ok()))
                        .ok_or_else(|| bad(&format!("stage `{name}` has no valid `{k}`")))
                };
                lf.stages.push((
                    name.clone(),
                    LockEntry {
                        kind: field("kind").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
                        key: digest("key")?,
                        output: digest("output")?,
                        deterministic: field("deterministic").and_then(|v| v.as_bool()).unwrap_or(true),
                    },
                ));
            }
        }
        Ok(Some(lf))
    }

    pub fn render(&self) -> String {
        let mut s = String::from("# Written by `pipe run`: per stage its cache key and output digest.\n# Commit it; `pipe run --frozen` and `pipe verify` check against it.\nschema: 1\nstages:\n");
        for (name, e) in &self.stages {
            s.push_str(&format!(
                "  {name}:\n    kind: {}\n    key: {}\n    output: {}\n    deterministic: {}\n",
                e.kind, e.key, e.output, e.deterministic
            ));
        }
        s
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        pipe_cache::Store::write_atomic(path, self.render().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_roundtrip() {
        let d = pipe_cache::hash_bytes(b"x");
        let lf = LockFile {
            stages: vec![("gen".into(), LockEntry { kind: "command".into(), key: d, output: d, deterministic: false })],
        };
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.lock");
        lf.write(&p).unwrap();
        assert_eq!(LockFile::read(&p).unwrap(), Some(lf));
        assert_eq!(LockFile::read(&t.path().join("none.lock")).unwrap(), None);
        fs_err::write(&p, "schema: 7\n").unwrap();
        assert!(LockFile::read(&p).unwrap_err().contains("schema"));
    }
}
