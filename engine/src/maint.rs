//! `pipe verify` and `pipe gc`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pipe_cache::Digest;

use crate::exec::{frozen_drift, run_one, Outcome, Reporter};
use crate::graph::Pipeline;
use crate::records::{read_json, LockFile, RunRecord};
use crate::stage::Cancel;
use crate::workspace::Workspace;
use crate::EngineError;

#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Stages whose stored output is missing or does not match its digest.
    pub corrupt: Vec<String>,
    /// Stages whose key no longer matches the lock.
    pub drift: Vec<String>,
    /// Deterministic stages re-executed with the same output digest.
    pub reproduced: Vec<String>,
    /// Re-executed stages whose output differs from the lock (or that failed).
    pub mismatched: Vec<String>,
    /// Stages not re-executed, with why.
    pub skipped: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.corrupt.is_empty() && self.drift.is_empty() && self.mismatched.is_empty()
    }
}

pub fn verify(
    ws: &Workspace,
    p: &Pipeline,
    pid: &str,
    cancel: &Cancel,
    reporter: &dyn Reporter,
    execute: bool,
) -> Result<VerifyReport, EngineError> {
    let lock_path = LockFile::path_for(&p.path);
    let lock = LockFile::read(&lock_path).map_err(EngineError::Lock)?.ok_or_else(|| {
        EngineError::Lock(format!("{} does not exist: run `pipe run` first, then verify", lock_path.display()))
    })?;
    let mut rep = VerifyReport::default();
    let all: Vec<usize> = (0..p.stages.len()).collect();
    rep.drift = frozen_drift(ws, p, &lock, &all)?;
    // Objects: full re-hash, no stat cache.
    for (name, e) in &lock.stages {
        if !ws.store.verify(&e.output, None)? {
            let what = if ws.store.has(&e.output) { "corrupt" } else { "missing" };
            rep.corrupt.push(format!("{name}: stored output {} is {what}", e.output.short()));
        }
    }
    if !execute {
        return Ok(rep);
    }
    let outputs: Vec<Option<Digest>> = p.stages.iter().map(|s| lock.get(s.name()).map(|e| e.output)).collect();
    for (i, s) in p.stages.iter().enumerate() {
        let Some(entry) = lock.get(s.name()) else { continue };
        if !entry.deterministic || !s.stage.deterministic() {
            rep.skipped.push(format!("{}: not deterministic", s.name()));
            continue;
        }
        if let Some(u) = s.upstream.iter().find(|u| outputs[**u].map(|d| !ws.store.has(&d)).unwrap_or(true)) {
            rep.skipped.push(format!(
                "{}: the output of input stage {} is not in the store (run `pipe run`)",
                s.name(),
                p.stages[*u].name()
            ));
            continue;
        }
        let ki = match ws.key_inputs(p, s, &outputs) {
            Ok(Some(ki)) => ki,
            Ok(None) => continue,
            Err(EngineError::Pin { message, .. }) => {
                rep.skipped.push(format!("{}: cannot resolve its source: {message}", s.name()));
                continue;
            }
            Err(e) => return Err(e),
        };
        if ki.key() != entry.key {
            rep.skipped.push(format!("{}: key differs from the lock", s.name()));
            continue;
        }
        let outcome = run_one(
            ws,
            p,
            pid,
            i,
            ki,
            &["verify".to_string()],
            true,
            Some(entry.output),
            &outputs,
            BTreeMap::new(),
            Vec::new(),
            cancel.clone(),
            reporter,
        );
        match outcome {
            Outcome::Ran { .. } | Outcome::Cached { .. } | Outcome::Service { .. } => {
                rep.reproduced.push(s.name().to_string())
            }
            Outcome::Failed(m) | Outcome::Skipped(m) => {
                rep.mismatched.push(format!("{}: {}", s.name(), m.lines().next().unwrap_or_default()))
            }
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    ws.save_stat_cache();
    Ok(rep)
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub kept: usize,
    pub removed: usize,
    pub bytes_freed: u64,
    pub tmp_removed: usize,
    pub lock_files: Vec<PathBuf>,
}

/// Lock files of the workspace: `*.lock` under the root (depth-limited),
/// skipping `.pipe`, `.git` and `target`.
pub fn workspace_lock_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(root, 0, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 4 {
        return;
    }
    let Ok(rd) = fs_err::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        match e.file_type() {
            Ok(t) if t.is_dir() && ![".pipe", ".git", "target", "node_modules"].contains(&name.as_str()) => {
                walk(&p, depth + 1, out);
            }
            Ok(t) if t.is_file() && name.ends_with(".lock") && name != "Cargo.lock" => {
                if matches!(LockFile::read(&p), Ok(Some(_))) {
                    out.push(p);
                }
            }
            _ => {}
        }
    }
}

/// Remove objects that no lock file references and that are not among the
/// outputs of the `keep_last` most recent runs; with `tmp`, also the work dirs
/// of runs that are no longer alive (failed runs keep theirs for inspection).
pub fn gc(ws: &Workspace, keep_last: usize, tmp: bool, dry_run: bool) -> Result<GcReport, EngineError> {
    let mut rep = GcReport { lock_files: workspace_lock_files(&ws.root), ..Default::default() };
    let mut keep: BTreeSet<Digest> = BTreeSet::new();
    for lf in &rep.lock_files {
        if let Ok(Some(l)) = LockFile::read(lf) {
            keep.extend(l.stages.iter().map(|(_, e)| e.output));
        }
    }
    if keep_last > 0 {
        let mut recs: Vec<RunRecord> = fs_err::read_dir(ws.dot.join("runs-v1"))?
            .flatten()
            .filter_map(|e| read_json::<RunRecord>(&e.path()))
            .collect();
        recs.sort_by_key(|r| std::cmp::Reverse(r.started_ms));
        keep.extend(recs.iter().take(keep_last).map(|r| r.output));
    }
    for d in ws.store.list()? {
        if keep.contains(&d) {
            rep.kept += 1;
        } else {
            rep.removed += 1;
            rep.bytes_freed +=
                if dry_run { pipe_cache::dir_size(&ws.store.object_path(&d)) } else { ws.store.remove(&d)? };
        }
    }
    if tmp {
        for e in fs_err::read_dir(ws.dot.join("tmp"))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Work dirs are named p<PID>-...; keep those of live processes.
            let alive = name
                .strip_prefix('p')
                .and_then(|r| r.split('-').next())
                .and_then(|x| x.parse::<i32>().ok())
                .is_some_and(pid_alive);
            if !alive {
                rep.tmp_removed += 1;
                rep.bytes_freed += pipe_cache::dir_size(&e.path());
                if !dry_run {
                    let _ = fs_err::remove_dir_all(e.path());
                }
            }
        }
    }
    if tmp {
        // Checkpoints of interrupted runs (`.pipe/resume/<key>`), unless a
        // run of that key is going on now.
        if let Ok(rd) = fs_err::read_dir(ws.dot.join("resume")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.parse::<Digest>().is_ok_and(|k| ws.is_locked(&k)) {
                    continue;
                }
                rep.tmp_removed += 1;
                rep.bytes_freed += pipe_cache::dir_size(&e.path());
                if !dry_run {
                    let _ = fs_err::remove_dir_all(e.path());
                }
            }
        }
    }
    Ok(rep)
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}
