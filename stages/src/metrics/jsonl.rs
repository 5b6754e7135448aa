//! `metrics.jsonl`: one JSON object per logged step, appended as training
//! runs, truncated back to a checkpoint's step on resume.

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The file name inside a metrics directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends lines to `<dir>/metrics.jsonl`. Each [`MetricsLog::log`] writes one
/// whole line with one `write` call and no buffering, so a reader (or a crash)
/// sees complete lines only, except possibly a torn last line after a kill,
/// which [`MetricsLog::open_append`] drops.
pub struct MetricsLog {
    file: fs_err::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Create `dir` if needed and start an empty `metrics.jsonl` (an existing
    /// one is truncated).
    pub fn create(dir: &Path) -> io::Result<Self> {
        fs_err::create_dir_all(dir)?;
        let path = dir.join(METRICS_FILE);
        let file = fs_err::File::create(&path)?;
        Ok(MetricsLog { file, path })
    }

    /// Reopen for a run resumed from the checkpoint of `truncate_after_step`:
    /// keep the lines with `step <= truncate_after_step`, drop later ones
    /// (logged after the checkpoint, they will be logged again) and any line
    /// that is not a JSON object with an integer `step` (a torn tail).
    /// A missing file starts empty. The kept lines are rewritten through a
    /// temporary file and a rename, so a crash here loses nothing.
    pub fn open_append(dir: &Path, truncate_after_step: u64) -> io::Result<Self> {
        fs_err::create_dir_all(dir)?;
        let path = dir.join(METRICS_FILE);
        let mut kept = Vec::new();
        match fs_err::File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let line = line?;
                    let step = serde_json::from_slice::<Value>(&line).ok().and_then(|v| v.get("step")?.as_u64());
                    match step {
                        Some(s) if s <= truncate_after_step => {
                            kept.extend_from_slice(&line);
                            kept.push(b'\n');
                        }
                        Some(_) => {}
                        None if line.iter().all(u8::is_ascii_whitespace) => {}
                        None => tracing::warn!(
                            "{}: dropping a line that is not a metrics record: {:.80}",
                            path.display(),
                            String::from_utf8_lossy(&line)
                        ),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
        fs_err::write(&tmp, &kept)?;
        fs_err::rename(&tmp, &path)?;
        let file = fs_err::OpenOptions::new().append(true).open(&path)?;
        Ok(MetricsLog { file, path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `rec` as one line. Non-finite floats cannot be JSON: build
    /// records with `serde_json::json!`/`Value::from`, which turn them into
    /// `null`.
    pub fn log(&mut self, rec: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }

    /// Read every record of a `metrics.jsonl` (blank lines skipped). A line
    /// that is not JSON is an error naming the file and line.
    pub fn read(path: &Path) -> io::Result<Vec<Value>> {
        let f = fs_err::File::open(path)?;
        let mut out = Vec::new();
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(&line).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}:{}: {e}", path.display(), i + 1))
            })?;
            out.push(v);
        }
        Ok(out)
    }
}

/// `(step, value)` of every record holding a numeric `step` and `key`
/// (`null`s, i.e. non-finite values, come back as NaN so plots can count them).
pub fn series(records: &[Value], key: &str) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let step = r.get("step")?.as_u64()?;
            let v = r.get(key)?;
            Some((step, if v.is_null() { f64::NAN } else { v.as_f64()? }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn create_log_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::create(&dir.path().join("sub")).unwrap();
        log.log(&json!({"step": 1, "loss": 2.5})).unwrap();
        log.log(&json!({"step": 2, "loss": f64::NAN})).unwrap();
        let recs = MetricsLog::read(log.path()).unwrap();
        assert_eq!(recs, vec![json!({"step": 1, "loss": 2.5}), json!({"step": 2, "loss": null})]);
        let s = series(&recs, "loss");
        assert_eq!(s[0], (1, 2.5));
        assert!(s[1].0 == 2 && s[1].1.is_nan());
        // create truncates.
        let log = MetricsLog::create(&dir.path().join("sub")).unwrap();
        assert!(MetricsLog::read(log.path()).unwrap().is_empty());
    }

    #[test]
    fn resume_truncates_after_checkpoint_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::create(dir.path()).unwrap();
        for step in 1..=6 {
            log.log(&json!({"step": step, "loss": 10.0 - step as f64})).unwrap();
        }
        drop(log);
        // Simulate a kill mid-write: a torn last line.
        let path = dir.path().join(METRICS_FILE);
        let mut text = fs_err::read_to_string(&path).unwrap();
        text.push_str("{\"step\": 7, \"lo");
        fs_err::write(&path, &text).unwrap();

        let mut log = MetricsLog::open_append(dir.path(), 4).unwrap();
        log.log(&json!({"step": 5, "loss": 0.5})).unwrap();
        let steps: Vec<u64> = MetricsLog::read(&path).unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5]);
        assert_eq!(MetricsLog::read(&path).unwrap()[4]["loss"], json!(0.5));
        // The first four lines are kept byte for byte.
        let new = fs_err::read_to_string(&path).unwrap();
        let old_four: String = text.split_inclusive('\n').take(4).collect();
        assert!(new.starts_with(&old_four));
        assert!(!dir.path().join(format!(".{METRICS_FILE}.tmp")).exists());

        // Resuming at step 0 keeps nothing; a missing file starts empty.
        drop(MetricsLog::open_append(dir.path(), 0).unwrap());
        assert!(MetricsLog::read(&path).unwrap().is_empty());
        let fresh = tempfile::tempdir().unwrap();
        let log = MetricsLog::open_append(&fresh.path().join("m"), 3).unwrap();
        assert!(MetricsLog::read(log.path()).unwrap().is_empty());
    }

    #[test]
    fn read_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        fs_err::write(&path, "{\"step\":1}\n\nnot json\n").unwrap();
        let err = MetricsLog::read(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("metrics.jsonl:3:"), "{err}");
    }
}
