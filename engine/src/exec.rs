//! `pipe run`: the scheduler. Stages whose inputs are done are keyed; a key
//! with a verified record is a hit, anything else runs in a worker thread
//! (up to `jobs` at once, GPU stages holding device slots) under a per-key
//! file lock, writes into a work dir under `.pipe/tmp/`, and is published
//! atomically. Outputs feed the keys of dependents, so a rerun that
//! reproduces its output leaves them cached (early cutoff).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pipe_cache::Digest;

use crate::graph::Pipeline;
use crate::key::{explain, KeyInputs};
use crate::records::{now_ms, Failure, LockEntry, LockFile, RunRecord};
use crate::stage::{Cancel, Progress, RunCtx, Service};
use crate::status::{self, State};
use crate::workspace::Workspace;
use crate::EngineError;

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stage names to run (with their ancestors); empty = all.
    pub targets: Vec<String>,
    pub jobs: usize,
    /// GPU ids available for `gpu` stages.
    pub gpus: Vec<u32>,
    /// Stages to rerun even on a cache hit.
    pub force: Vec<String>,
    pub keep_going: bool,
    pub frozen: bool,
}

/// How a stage ended in this run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Cached {
        key: Digest,
        output: Digest,
    },
    Ran {
        key: Digest,
        output: Digest,
    },
    Failed(String),
    /// Not started: an upstream stage failed, or the run stopped early.
    Skipped(String),
    /// A service stage: keyed, started only if a dependent ran.
    Service {
        key: Digest,
        started: bool,
    },
}

#[derive(Debug, Default)]
pub struct RunSummary {
    pub outcomes: Vec<(String, Outcome)>,
    pub cancelled: bool,
    /// `--frozen` drift, one line per stage.
    pub drift: Vec<String>,
}

impl RunSummary {
    pub fn failed(&self) -> bool {
        self.cancelled
            || !self.drift.is_empty()
            || self.outcomes.iter().any(|(_, o)| matches!(o, Outcome::Failed(_) | Outcome::Skipped(_)))
    }
}

/// What the scheduler tells the user; the CLI renders it (TTY or plain).
pub trait Reporter: Send + Sync {
    fn started(&self, stage: &str, reasons: &[String]);
    fn cached(&self, stage: &str, output: &Digest);
    fn finished(&self, stage: &str, output: &Digest, elapsed: Duration);
    fn failed(&self, stage: &str, message: &str, log: &std::path::Path, work_dir: &std::path::Path);
    fn waiting(&self, stage: &str, holder: &str);
    fn progress(&self, stage: &str, message: &str);
    /// A service stage was stopped (its dependents are done).
    fn stopped(&self, _stage: &str) {}
}

struct StageProgress<'a> {
    stage: &'a str,
    reporter: &'a dyn Reporter,
}

impl Progress for StageProgress<'_> {
    fn message(&self, msg: &str) {
        self.reporter.progress(self.stage, msg)
    }
}

enum Slot {
    Pending,
    Running,
    Done(Outcome),
}

/// Dry run: what would run and why, without running anything.
pub fn plan(
    ws: &Workspace,
    p: &Pipeline,
    pid: &str,
    opts: &RunOptions,
) -> Result<Vec<(String, bool, Vec<String>)>, EngineError> {
    let selected = selection(p, &opts.targets)?;
    let st = status::status(ws, p, pid)?;
    let mut rebuilt = vec![false; p.stages.len()];
    let mut out = Vec::new();
    for i in selected {
        let s = &st[i];
        let forced = opts.force.iter().any(|f| f == &s.name);
        let runs = forced || s.state != State::Fresh;
        // A service's "output" (its key) changes only with its inputs.
        rebuilt[i] =
            if p.stages[i].stage.is_service() { p.stages[i].upstream.iter().any(|u| rebuilt[*u]) } else { runs };
        let mut reasons = if forced { vec!["forced".to_string()] } else { s.reasons.clone() };
        if runs {
            // Say which inputs will be rebuilt instead of the generic "not up to date".
            for inp in p.stages[i].inputs() {
                let u = p.index(&inp.stage).expect("resolved");
                if rebuilt[u] {
                    reasons.retain(|r| !r.starts_with(&format!("input {} is not up to date", inp.name)));
                    reasons.push(format!(
                        "input {} will be rebuilt (stage {}); reruns unless its output is unchanged",
                        inp.name, inp.stage
                    ));
                }
            }
        }
        out.push((s.name.clone(), runs, reasons));
    }
    // A service runs only for dependents that run.
    for (i, st) in p.stages.iter().enumerate() {
        if !st.stage.is_service() {
            continue;
        }
        let Some(k) = out.iter().position(|(n, ..)| n == st.name()) else { continue };
        let users: Vec<String> = out
            .iter()
            .filter(|(n, runs, _)| *runs && p.index(n).is_some_and(|j| p.stages[j].upstream.contains(&i)))
            .map(|(n, ..)| n.clone())
            .collect();
        out[k].1 = !users.is_empty();
        out[k].2 = if users.is_empty() {
            vec!["service: no stage that uses it runs".into()]
        } else {
            vec![format!("service, started for {}", users.join(", "))]
        };
    }
    Ok(out)
}

fn selection(p: &Pipeline, targets: &[String]) -> Result<Vec<usize>, EngineError> {
    let mut idx = Vec::new();
    for t in targets {
        match p.index(t) {
            Some(i) => idx.push(i),
            None => {
                let names: Vec<&str> = p.stages.iter().map(|s| s.name()).collect();
                return Err(EngineError::UnknownStage {
                    name: t.clone(),
                    hint: crate::diag::did_you_mean(t, names.iter().copied())
                        .unwrap_or_else(|| format!("stages: {}", names.join(", "))),
                });
            }
        }
    }
    Ok(p.closure(&idx))
}

/// `--frozen`: every selected stage's key must equal the lock file's (upstream
/// outputs taken from the lock). Returns one line per drifting stage.
pub fn frozen_drift(
    ws: &Workspace,
    p: &Pipeline,
    lock: &LockFile,
    selected: &[usize],
) -> Result<Vec<String>, EngineError> {
    let mut assumed: Vec<Option<Digest>> = p.stages.iter().map(|s| lock.get(s.name()).map(|e| e.output)).collect();
    let mut drift = Vec::new();
    for &i in selected {
        let s = &p.stages[i];
        if s.stage.is_service() {
            // Never locked: its key stands in for an output.
            assumed[i] = ws.key_inputs(p, s, &assumed).ok().flatten().map(|k| k.key());
            continue;
        }
        let Some(entry) = lock.get(s.name()) else {
            drift.push(format!("{}: not in the lock file", s.name()));
            continue;
        };
        let ki = match ws.key_inputs(p, s, &assumed) {
            Err(EngineError::Pin { message, .. }) => {
                drift.push(format!("{}: cannot resolve its source: {message}", s.name()));
                continue;
            }
            other => other?,
        };
        let Some(ki) = ki else {
            drift.push(format!("{}: an input is not in the lock file", s.name()));
            assumed[i] = None;
            continue;
        };
        if ki.key() != entry.key {
            let why = match ws.record(&entry.key) {
                Some(r) => explain(&r.key_inputs, &ki).join("; "),
                None => String::new(),
            };
            let why = if why.is_empty() {
                "key differs from the lock (no local record of the locked key to compare with)".to_string()
            } else {
                why
            };
            drift.push(format!("{}: {why}", s.name()));
        }
    }
    Ok(drift)
}

pub fn run(
    ws: &Workspace,
    p: &Pipeline,
    pid: &str,
    opts: &RunOptions,
    cancel: &Cancel,
    reporter: &dyn Reporter,
) -> Result<RunSummary, EngineError> {
    let selected = selection(p, &opts.targets)?;
    let lock_path = LockFile::path_for(&p.path);
    let mut summary = RunSummary::default();
    let lock = if opts.frozen {
        let lock = LockFile::read(&lock_path).map_err(EngineError::Lock)?.ok_or_else(|| {
            EngineError::Lock(format!(
                "--frozen needs a lock file, and {} does not exist; run `pipe run` without --frozen once and commit it",
                lock_path.display()
            ))
        })?;
        summary.drift = frozen_drift(ws, p, &lock, &selected)?;
        if !summary.drift.is_empty() {
            return Ok(summary);
        }
        Some(lock)
    } else {
        None
    };

    let n = p.stages.len();
    let mut slots: Vec<Slot> = (0..n).map(|_| Slot::Pending).collect();
    let mut outputs: Vec<Option<Digest>> = vec![None; n];
    let jobs = opts.jobs.max(1);
    let mut free_gpus: Vec<u32> = opts.gpus.clone();
    let mut running = 0usize;
    let mut stop_launching = false;
    let (tx, rx) = mpsc::channel::<(usize, Outcome, Vec<u32>)>();
    let mut services: BTreeMap<usize, Box<dyn Service>> = BTreeMap::new();

    let mut aborted = false;
    std::thread::scope(|scope| -> Result<(), EngineError> {
        loop {
            if cancel.is_cancelled() {
                stop_launching = true;
                // Services end their requests in flight, so the stages
                // waiting on them notice the cancellation now.
                if !aborted {
                    services.values().for_each(|s| s.abort());
                    aborted = true;
                }
            }
            // Launch (or resolve as hits) everything that is ready.
            let mut progressed = true;
            while progressed && !stop_launching {
                progressed = false;
                for &i in &selected {
                    if !matches!(slots[i], Slot::Pending) {
                        continue;
                    }
                    let s = &p.stages[i];
                    let ups: Vec<&Slot> = s.upstream.iter().map(|u| &slots[*u]).collect();
                    if let Some(bad) = s
                        .upstream
                        .iter()
                        .find(|u| matches!(slots[**u], Slot::Done(Outcome::Failed(_) | Outcome::Skipped(_))))
                    {
                        slots[i] = Slot::Done(Outcome::Skipped(format!(
                            "upstream stage {} did not finish",
                            p.stages[*bad].name()
                        )));
                        progressed = true;
                        continue;
                    }
                    if !ups.iter().all(|u| matches!(u, Slot::Done(_))) {
                        continue;
                    }
                    let ki = match ws.key_inputs(p, s, &outputs) {
                        Ok(Some(ki)) => ki,
                        Ok(None) => unreachable!("all upstream stages are done"),
                        Err(e @ EngineError::Pin { .. }) => {
                            let msg = e.to_string();
                            reporter.failed(s.name(), &msg, std::path::Path::new("-"), std::path::Path::new("-"));
                            slots[i] = Slot::Done(Outcome::Failed(msg));
                            progressed = true;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let key = ki.key();
                    if s.stage.is_service() {
                        outputs[i] = Some(key);
                        slots[i] = Slot::Done(Outcome::Service { key, started: false });
                        progressed = true;
                        continue;
                    }
                    let forced = opts.force.iter().any(|f| f == s.name());
                    if !forced {
                        if let Some(r) = ws.hit(&key) {
                            outputs[i] = Some(r.output);
                            mark_success(ws, pid, s.name(), &key)?;
                            reporter.cached(s.name(), &r.output);
                            slots[i] = Slot::Done(Outcome::Cached { key, output: r.output });
                            progressed = true;
                            continue;
                        }
                    }
                    let need = s.stage.resources().gpus as usize;
                    if need > opts.gpus.len() {
                        let msg = format!(
                            "needs {need} GPU(s) but {} are available (set CUDA_VISIBLE_DEVICES or --gpus)",
                            opts.gpus.len()
                        );
                        reporter.failed(s.name(), &msg, std::path::Path::new("-"), std::path::Path::new("-"));
                        slots[i] = Slot::Done(Outcome::Failed(msg));
                        progressed = true;
                        continue;
                    }
                    if running >= jobs || free_gpus.len() < need {
                        continue;
                    }
                    // Start the services it talks to (once; they stay up for the others).
                    let mut endpoints = BTreeMap::new();
                    let mut service_failed = None;
                    for inp in s.inputs() {
                        let u = p.index(&inp.stage).expect("resolved");
                        if !p.stages[u].stage.is_service() {
                            continue;
                        }
                        let svc = match services.entry(u) {
                            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::btree_map::Entry::Vacant(e) => {
                                match start_service(ws, p, u, &outputs, cancel, reporter) {
                                    Ok(svc) => {
                                        if let Slot::Done(Outcome::Service { started, .. }) = &mut slots[u] {
                                            *started = true;
                                        }
                                        e.insert(svc)
                                    }
                                    Err(m) => {
                                        service_failed = Some((u, m));
                                        break;
                                    }
                                }
                            }
                        };
                        endpoints.insert(inp.name.clone(), svc.url());
                    }
                    if let Some((u, m)) = service_failed {
                        slots[u] = Slot::Done(Outcome::Failed(m));
                        slots[i] =
                            Slot::Done(Outcome::Skipped(format!("service {} did not start", p.stages[u].name())));
                        progressed = true;
                        continue;
                    }
                    let gpus: Vec<u32> = free_gpus.drain(..need).collect();
                    let reasons = why_run(ws, pid, s.name(), &ki, forced);
                    let expected =
                        lock.as_ref().and_then(|l| l.get(s.name())).filter(|e| e.deterministic).map(|e| e.output);
                    slots[i] = Slot::Running;
                    running += 1;
                    let tx = tx.clone();
                    let cancel = cancel.clone();
                    let up = outputs.clone();
                    scope.spawn(move || {
                        let outcome = run_one(
                            ws,
                            p,
                            pid,
                            i,
                            ki,
                            &reasons,
                            forced,
                            expected,
                            &up,
                            endpoints,
                            gpus.clone(),
                            cancel,
                            reporter,
                        );
                        let _ = tx.send((i, outcome, gpus));
                    });
                    progressed = true;
                }
            }
            stop_idle_services(p, &selected, &slots, &mut services, reporter);
            if running == 0 {
                break;
            }
            // Wake up now and then while services run, to pass a
            // cancellation on to them (see `Service::abort`).
            let (i, outcome, gpus) = if services.is_empty() || aborted {
                rx.recv().expect("workers send before exiting")
            } else {
                match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("workers send before exiting"),
                }
            };
            running -= 1;
            free_gpus.extend(gpus);
            free_gpus.sort();
            match &outcome {
                Outcome::Ran { output, .. } | Outcome::Cached { output, .. } => outputs[i] = Some(*output),
                Outcome::Service { .. } => {}
                Outcome::Failed(_) | Outcome::Skipped(_) => {
                    if !opts.keep_going {
                        stop_launching = true;
                    }
                }
            }
            slots[i] = Slot::Done(outcome);
        }
        Ok(())
    })?;
    for (u, svc) in std::mem::take(&mut services) {
        svc.stop();
        reporter.stopped(p.stages[u].name());
    }

    summary.cancelled = cancel.is_cancelled();
    for &i in &selected {
        let o = match std::mem::replace(&mut slots[i], Slot::Pending) {
            Slot::Done(o) => o,
            _ if summary.cancelled => Outcome::Skipped("cancelled".into()),
            _ => Outcome::Skipped(
                "not started: an earlier stage failed (use --keep-going to run independent stages)".into(),
            ),
        };
        summary.outcomes.push((p.stages[i].name().to_string(), o));
    }
    if !opts.frozen {
        update_lock_file(p, &lock_path, &summary)?;
    }
    ws.save_stat_cache();
    Ok(summary)
}

fn why_run(ws: &Workspace, pid: &str, stage: &str, ki: &KeyInputs, forced: bool) -> Vec<String> {
    if forced {
        return vec!["forced".into()];
    }
    let st = ws.state(pid, stage);
    match st.last_success.and_then(|k| ws.record(&k)) {
        None => vec!["never run".into()],
        Some(r) if r.key == ki.key() => vec!["output missing or corrupt".into()],
        Some(r) => {
            let w = explain(&r.key_inputs, ki);
            if w.is_empty() {
                vec!["key changed".into()]
            } else {
                w
            }
        }
    }
}

fn mark_success(ws: &Workspace, pid: &str, stage: &str, key: &Digest) -> Result<(), EngineError> {
    let mut st = ws.state(pid, stage);
    if st.last_success != Some(*key) || st.last_failure.is_some() {
        st.last_success = Some(*key);
        st.last_failure = None;
        ws.write_state(pid, stage, &st)?;
    }
    Ok(())
}

/// Hold the run lock of a key (an OS file lock: released if the holder dies,
/// so locks of killed runs are never stale). Polls so Ctrl-C still works.
fn acquire(
    ws: &Workspace,
    key: &Digest,
    stage: &str,
    cancel: &Cancel,
    reporter: &dyn Reporter,
) -> Result<Option<std::fs::File>, EngineError> {
    use fs4::fs_std::FileExt;
    use std::io::{Read, Seek, Write};
    let path = ws.lock_path(key);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| EngineError::Io(fs_err_wrap(e, &path)))?;
    let mut told = false;
    loop {
        if f.try_lock_exclusive().map_err(|e| EngineError::Io(fs_err_wrap(e, &path)))? {
            break;
        }
        if !told {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            reporter.waiting(stage, if holder.is_empty() { "another pipe run" } else { holder });
            told = true;
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "pid {} ({})", std::process::id(), stage);
    Ok(Some(f))
}

fn fs_err_wrap(e: std::io::Error, p: &std::path::Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run_one(
    ws: &Workspace,
    p: &Pipeline,
    pid: &str,
    i: usize,
    ki: KeyInputs,
    reasons: &[String],
    forced: bool,
    expected: Option<Digest>,
    outputs: &[Option<Digest>],
    endpoints: BTreeMap<String, String>,
    gpus: Vec<u32>,
    cancel: Cancel,
    reporter: &dyn Reporter,
) -> Outcome {
    let s = &p.stages[i];
    let name = s.name();
    let key = ki.key();
    let fail = |msg: String| {
        reporter.failed(name, &msg, std::path::Path::new("-"), std::path::Path::new("-"));
        Outcome::Failed(msg)
    };
    let _lock = match acquire(ws, &key, name, &cancel, reporter) {
        Ok(Some(l)) => l,
        Ok(None) => return Outcome::Skipped("cancelled".into()),
        Err(e) => return fail(e.to_string()),
    };
    // Another run may have produced it while we waited.
    if !forced {
        if let Some(r) = ws.hit(&key) {
            if let Err(e) = mark_success(ws, pid, name, &key) {
                return fail(e.to_string());
            }
            reporter.cached(name, &r.output);
            return Outcome::Cached { key, output: r.output };
        }
    }
    reporter.started(name, reasons);
    let started = Instant::now();
    let started_ms = now_ms();
    let work = match ws.store.new_work_dir(name) {
        Ok(w) => w,
        Err(e) => return fail(e.to_string()),
    };
    let out_dir = work.join("out");
    let resume_dir = ws.dot.join("resume").join(key.hex());
    let log_path = ws.dot.join("logs").join(name).join(format!("{started_ms}-{}.log", key.short()));
    let setup = (|| -> Result<(fs_err::File, BTreeMap<String, PathBuf>), String> {
        fs_err::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
        fs_err::create_dir_all(log_path.parent().expect("log has a dir")).map_err(|e| e.to_string())?;
        let mut log = fs_err::File::create(&log_path).map_err(|e| e.to_string())?;
        use std::io::Write;
        let _ = writeln!(
            log,
            "# pipe: stage {name}, key {key}\n# work dir: {}\n# why: {}",
            work.display(),
            reasons.join("; ")
        );
        Ok((log, input_paths(ws, p, s, outputs)?))
    })();
    let (log, inputs) = match setup {
        Ok(x) => x,
        Err(m) => return fail(m),
    };
    let progress = StageProgress { stage: name, reporter };
    let ctx = RunCtx {
        stage: name,
        workspace: &ws.root,
        out_dir: &out_dir,
        work_dir: &work,
        resume_dir: &resume_dir,
        inputs,
        endpoints,
        params: &s.spec.params,
        gpus,
        cancel: cancel.clone(),
        progress: &progress,
        log: std::sync::Mutex::new(log),
        log_path: log_path.clone(),
    };
    let result = s.stage.run(&ctx);
    drop(ctx);
    if cancel.is_cancelled() {
        // Nothing partial is published; the work dir is of no use.
        let _ = remove_work(&work);
        return Outcome::Skipped("cancelled".into());
    }
    let published = match result {
        Ok(()) => ws.store.publish(&out_dir, &ws.stat).map_err(|e| format!("publishing the output failed: {e}")),
        Err(f) => Err(failure_text(f)),
    };
    let published = published.and_then(|d| match expected {
        Some(e) if e != d => Err(format!(
            "--frozen: output {} differs from the lock file's {} (the stage is not reproducible)",
            d.short(),
            e.short()
        )),
        _ => Ok(d),
    });
    match published {
        Ok(d) => {
            let _ = remove_work(&work);
            let _ = remove_work(&resume_dir);
            let rec = RunRecord {
                schema: 1,
                stage: name.to_string(),
                pipeline: pid.to_string(),
                key,
                output: d,
                key_inputs: ki,
                started_ms,
                duration_ms: started.elapsed().as_millis() as u64,
                log: log_path,
            };
            if let Err(e) =
                ws.write_record(&rec).and_then(|_| mark_success(ws, pid, name, &key).map_err(std::io::Error::other))
            {
                return fail(format!("writing the run record failed: {e}"));
            }
            reporter.finished(name, &d, started.elapsed());
            Outcome::Ran { key, output: d }
        }
        Err(message) => {
            let mut st = ws.state(pid, name);
            st.last_failure = Some(Failure {
                key,
                message: message.lines().next().unwrap_or_default().to_string(),
                log: log_path.clone(),
                work_dir: work.clone(),
                at_ms: now_ms(),
            });
            let _ = ws.write_state(pid, name, &st);
            reporter.failed(name, &message, &log_path, &work);
            Outcome::Failed(message)
        }
    }
}

/// Input name -> path of the upstream output (or the sub-path in it), for
/// every input that is not a service.
fn input_paths(
    ws: &Workspace,
    p: &Pipeline,
    s: &crate::graph::ResolvedStage,
    outputs: &[Option<Digest>],
) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut inputs = BTreeMap::new();
    for inp in s.inputs() {
        let u = p.index(&inp.stage).expect("resolved");
        if p.stages[u].stage.is_service() {
            continue;
        }
        let mut path = ws.store.object_path(&outputs[u].expect("upstream done"));
        if !inp.subpath.is_empty() {
            path = path.join(&inp.subpath);
            if !path.exists() {
                return Err(format!(
                    "input `{}`: `{}` does not exist in the output of stage `{}`",
                    inp.name, inp.subpath, inp.stage
                ));
            }
        }
        inputs.insert(inp.name.clone(), path);
    }
    Ok(inputs)
}

/// A stage failure as one message, with its hint on a second line.
fn failure_text(f: crate::stage::StageFailure) -> String {
    match f.hint {
        Some(h) => format!("{}\nhint: {h}", f.message),
        None => f.message,
    }
}

fn remove_work(work: &std::path::Path) -> std::io::Result<()> {
    // Published outputs were moved away; what is left is writable scratch,
    // except a duplicate output that `publish` already removed.
    if work.exists() {
        fs_err::remove_dir_all(work)?;
    }
    Ok(())
}

fn update_lock_file(p: &Pipeline, path: &std::path::Path, summary: &RunSummary) -> Result<(), EngineError> {
    let old = LockFile::read(path).ok().flatten().unwrap_or_default();
    let mut new = LockFile::default();
    for s in &p.stages {
        let done = summary.outcomes.iter().find(|(n, _)| n == s.name()).and_then(|(_, o)| match o {
            Outcome::Cached { key, output } | Outcome::Ran { key, output } => Some((*key, *output)),
            _ => None,
        });
        let entry = match done {
            Some((key, output)) => {
                Some(LockEntry { kind: s.spec.kind.clone(), key, output, deterministic: s.stage.deterministic() })
            }
            None => old.get(s.name()).cloned(),
        };
        if let Some(e) = entry {
            new.stages.push((s.name().to_string(), e));
        }
    }
    if new != old {
        new.write(path)?;
    }
    Ok(())
}

/// Stop services none of whose selected dependents is still to run.
fn stop_idle_services(
    p: &Pipeline,
    selected: &[usize],
    slots: &[Slot],
    services: &mut BTreeMap<usize, Box<dyn Service>>,
    reporter: &dyn Reporter,
) {
    let idle: Vec<usize> = services
        .keys()
        .copied()
        .filter(|&u| {
            selected.iter().filter(|&&j| p.stages[j].upstream.contains(&u)).all(|&j| matches!(slots[j], Slot::Done(_)))
        })
        .collect();
    for u in idle {
        if let Some(svc) = services.remove(&u) {
            svc.stop();
            reporter.stopped(p.stages[u].name());
        }
    }
}

/// Start service stage `u` in-process: it gets a [`RunCtx`] like any stage
/// (inputs, params, a log), minus an output.
fn start_service(
    ws: &Workspace,
    p: &Pipeline,
    u: usize,
    outputs: &[Option<Digest>],
    cancel: &Cancel,
    reporter: &dyn Reporter,
) -> Result<Box<dyn Service>, String> {
    let s = &p.stages[u];
    let name = s.name();
    reporter.started(name, &["service needed by a stage that runs".to_string()]);
    let fail = |m: String| {
        reporter.failed(name, &m, std::path::Path::new("-"), std::path::Path::new("-"));
        m
    };
    let work = ws.store.new_work_dir(name).map_err(|e| fail(e.to_string()))?;
    let log_path = ws.dot.join("logs").join(name).join(format!("{}-service.log", now_ms()));
    fs_err::create_dir_all(log_path.parent().expect("log has a dir")).map_err(|e| fail(e.to_string()))?;
    let log = fs_err::File::create(&log_path).map_err(|e| fail(e.to_string()))?;
    let inputs = input_paths(ws, p, s, outputs).map_err(fail)?;
    let progress = StageProgress { stage: name, reporter };
    let ctx = RunCtx {
        stage: name,
        workspace: &ws.root,
        out_dir: &work,
        work_dir: &work,
        resume_dir: &work,
        inputs,
        endpoints: BTreeMap::new(),
        params: &s.spec.params,
        gpus: Vec::new(),
        cancel: cancel.clone(),
        progress: &progress,
        log: std::sync::Mutex::new(log),
        log_path: log_path.clone(),
    };
    let started = Instant::now();
    match s.stage.start_service(&ctx) {
        Some(Ok(svc)) => {
            reporter.progress(name, &format!("up at {} ({:.1} s)", svc.url(), started.elapsed().as_secs_f64()));
            Ok(svc)
        }
        Some(Err(f)) => {
            let msg = failure_text(f);
            reporter.failed(name, &msg, &log_path, &work);
            Err(msg)
        }
        None => Err(fail("the stage kind does not start a service".into())),
    }
}
