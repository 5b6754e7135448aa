//! The workspace: the folder holding `.pipe/` (found upward from the
//! pipeline file), its store, stat cache, run records and stage states.

use std::path::{Path, PathBuf};

use pipe_cache::{Digest, StatCache, Store};

use crate::graph::{Pipeline, ResolvedStage};
use crate::key::{InputKey, KeyInputs, KEY_FORMAT};
use crate::records::{read_json, write_json, RunRecord, StageState};
use crate::EngineError;

pub struct Workspace {
    pub root: PathBuf,
    pub dot: PathBuf,
    pub store: Store,
    pub stat: StatCache,
}

impl Workspace {
    /// The workspace root for a pipeline file: the nearest folder upward that
    /// holds `.pipe/`, else the nearest that holds `.git`, else the current
    /// directory if the file is inside it, else the file's folder.
    pub fn find_root(pipeline: &Path) -> PathBuf {
        let abs = std::path::absolute(pipeline).unwrap_or_else(|_| pipeline.to_path_buf());
        let dir = abs.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        for marker in [".pipe", ".git"] {
            if let Some(d) = dir.ancestors().find(|d| d.join(marker).is_dir()) {
                return d.to_path_buf();
            }
        }
        match std::env::current_dir() {
            Ok(cwd) if abs.starts_with(&cwd) => cwd,
            _ => dir,
        }
    }

    pub fn open(root: &Path) -> Result<Workspace, EngineError> {
        let dot = root.join(".pipe");
        let store = Store::open(&dot)?;
        for d in ["runs-v1", "state-v1", "logs", "locks"] {
            fs_err::create_dir_all(dot.join(d))?;
        }
        let stat = StatCache::load(&dot.join("stat-cache-v1.json"));
        Ok(Workspace { root: root.to_path_buf(), dot, store, stat })
    }

    /// Identifies a pipeline file inside the workspace (for per-pipeline state).
    pub fn pipeline_id(&self, pipeline: &Path) -> String {
        let abs = std::path::absolute(pipeline).unwrap_or_else(|_| pipeline.to_path_buf());
        let rel = abs.strip_prefix(&self.root).unwrap_or(&abs);
        rel.to_string_lossy().replace(['/', '\\'], "__")
    }

    pub fn record_path(&self, key: &Digest) -> PathBuf {
        self.dot.join("runs-v1").join(format!("{}.json", key.hex()))
    }

    pub fn record(&self, key: &Digest) -> Option<RunRecord> {
        read_json(&self.record_path(key))
    }

    pub fn write_record(&self, r: &RunRecord) -> std::io::Result<()> {
        write_json(&self.record_path(&r.key), r)
    }

    /// A cache hit: a record for `key` whose object is present and verifies
    /// (through the stat cache, so unchanged objects are not re-read).
    pub fn hit(&self, key: &Digest) -> Option<RunRecord> {
        let r = self.record(key)?;
        match self.store.verify(&r.output, Some(&self.stat)) {
            Ok(true) => Some(r),
            _ => None,
        }
    }

    fn state_path(&self, pid: &str, stage: &str) -> PathBuf {
        self.dot.join("state-v1").join(pid).join(format!("{stage}.json"))
    }

    pub fn state(&self, pid: &str, stage: &str) -> StageState {
        read_json(&self.state_path(pid, stage)).unwrap_or_default()
    }

    pub fn write_state(&self, pid: &str, stage: &str, s: &StageState) -> std::io::Result<()> {
        write_json(&self.state_path(pid, stage), s)
    }

    pub fn lock_path(&self, key: &Digest) -> PathBuf {
        self.dot.join("locks").join(format!("{}.lock", key.hex()))
    }

    /// Whether another process holds the run lock of `key` (a stage is running).
    pub fn is_locked(&self, key: &Digest) -> bool {
        let p = self.lock_path(key);
        let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open(&p) else {
            return false;
        };
        match fs4::fs_std::FileExt::try_lock_exclusive(&f) {
            Ok(true) => {
                let _ = fs4::fs_std::FileExt::unlock(&f);
                false
            }
            _ => true,
        }
    }

    /// The key inputs of stage `s`, given its upstream stages' output digests
    /// (indexed like `p.stages`). `None` if an upstream output is not known.
    pub fn key_inputs(
        &self,
        p: &Pipeline,
        s: &ResolvedStage,
        outputs: &[Option<Digest>],
    ) -> Result<Option<KeyInputs>, EngineError> {
        let mut inputs = std::collections::BTreeMap::new();
        for inp in s.inputs() {
            let u = p.index(&inp.stage).expect("resolved input");
            let Some(d) = outputs[u] else {
                return Ok(None);
            };
            inputs
                .insert(inp.name.clone(), InputKey { stage: inp.stage.clone(), path: inp.subpath.clone(), digest: d });
        }
        let mut files = std::collections::BTreeMap::new();
        for f in &s.files {
            let d = pipe_cache::hash_path(&self.root.join(&f.path), Some(&self.stat)).map_err(|e| {
                EngineError::File { stage: s.name().to_string(), path: f.path.clone(), message: e.to_string() }
            })?;
            files.insert(f.path.clone(), d);
        }
        let ki = KeyInputs {
            format: KEY_FORMAT,
            kind: s.spec.kind.clone(),
            kind_version: s.kind_version,
            params: s.spec.params.clone(),
            files,
            inputs,
            env: s.stage.key_env(),
            pins: s.stage.pins().map_err(|e| EngineError::Pin { stage: s.name().to_string(), message: e.message })?,
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                "key inputs of `{}` (key {}): {}",
                s.name(),
                ki.key(),
                serde_json::to_string_pretty(&ki).unwrap_or_default()
            );
        }
        Ok(Some(ki))
    }

    pub fn save_stat_cache(&self) {
        if let Err(e) = self.stat.save() {
            tracing::warn!("could not save the stat cache: {e}");
        }
    }
}
