//! Training metrics in the formats users already read: `metrics.jsonl`
//! ([`MetricsLog`]), TensorBoard scalars ([`EventWriter`]) and a loss plot
//! ([`plot_loss`]). [`Metrics`] writes the first two at once, which is what
//! the `train` stage calls at every logging step.
//!
//! Layout inside a metrics directory:
//!
//! ```text
//! metrics.jsonl                        one JSON object per logged step
//! tensorboard/events.out.tfevents.*    one file per (re)start; `tensorboard --logdir tensorboard`
//! loss.png                             written by the caller with plot_loss / Metrics::plot_loss
//! ```

mod jsonl;
mod plot;
mod tb;

use std::io;
use std::path::{Path, PathBuf};

pub use jsonl::{series, MetricsLog, METRICS_FILE};
pub use plot::{plot_loss, plot_loss_sized, PLOT_SIZE};
pub use tb::EventWriter;

/// The TensorBoard log directory inside a metrics directory.
pub const TB_DIR: &str = "tensorboard";

/// `metrics.jsonl` and TensorBoard events, written together.
pub struct Metrics {
    pub jsonl: MetricsLog,
    pub tb: EventWriter,
    dir: PathBuf,
}

impl Metrics {
    /// Start fresh in `dir` (created if needed; an old `metrics.jsonl` is
    /// truncated).
    pub fn create(dir: &Path) -> io::Result<Self> {
        let jsonl = MetricsLog::create(dir)?;
        let tb = EventWriter::create(&dir.join(TB_DIR))?;
        Ok(Metrics { jsonl, tb, dir: dir.to_owned() })
    }

    /// Continue in `dir` after resuming from the checkpoint of `step`:
    /// `metrics.jsonl` keeps its lines up to `step`; TensorBoard gets a new
    /// event file beside the old ones. TensorBoard drops the old file's
    /// scalars past `step` by itself when the new file steps back
    /// (its "purge orphaned data", on by default).
    pub fn resume(dir: &Path, step: u64) -> io::Result<Self> {
        let jsonl = MetricsLog::open_append(dir, step)?;
        let tb = EventWriter::create(&dir.join(TB_DIR))?;
        Ok(Metrics { jsonl, tb, dir: dir.to_owned() })
    }

    /// Log one step: a `metrics.jsonl` line `{"step": step, <fields in
    /// order>}` and one TensorBoard scalar per field, tagged `train/<name>`
    /// as the HF Trainer prefixes them (`train/loss`, `train/lr`,
    /// `train/grad_norm`, `train/tokens_per_s`, ...); a name that already
    /// holds a `/` (`eval/loss`) is used as the tag unchanged. Non-finite
    /// values are `null` in the JSON and NaN/inf in TensorBoard. Both files
    /// are flushed, so a live `tensorboard` or `tail -f` sees the step.
    pub fn log(&mut self, step: u64, fields: &[(&str, f64)]) -> io::Result<()> {
        let mut rec = serde_json::Map::with_capacity(fields.len() + 1);
        rec.insert("step".to_owned(), step.into());
        for &(name, v) in fields {
            rec.insert(name.to_owned(), v.into());
        }
        self.jsonl.log(&serde_json::Value::Object(rec))?;
        for &(name, v) in fields {
            if name.contains('/') {
                self.tb.scalar(name, step, v as f32)?;
            } else {
                self.tb.scalar(&format!("train/{name}"), step, v as f32)?;
            }
        }
        self.tb.flush()
    }

    /// Hand buffered TensorBoard records to the OS (`log` already does).
    pub fn flush(&mut self) -> io::Result<()> {
        self.tb.flush()
    }

    /// Plot `loss` against `step` from the whole `metrics.jsonl` (so a resumed
    /// run's plot covers the steps before the resume) into `png`.
    pub fn plot_loss(&self, png: &Path, title: &str) -> io::Result<()> {
        let records = MetricsLog::read(&self.dir.join(METRICS_FILE))?;
        plot_loss(png, &series(&records, "loss"), title)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metrics_log_writes_both_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Metrics::create(dir.path()).unwrap();
        for step in 1..=3 {
            let fields = [("epoch", 0.5 * step as f64), ("loss", 3.0 / step as f64), ("lr", 1e-4)];
            m.log(step, &fields).unwrap();
        }
        m.log(4, &[("loss", f64::INFINITY), ("eval/loss", 1.25)]).unwrap();
        let recs = MetricsLog::read(&dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(recs.len(), 4);
        // Key order as given, `step` first.
        assert_eq!(serde_json::to_string(&recs[0]).unwrap(), r#"{"step":1,"epoch":0.5,"loss":3.0,"lr":0.0001}"#);
        assert_eq!(recs[3], json!({"step": 4, "loss": null, "eval/loss": 1.25}));
        let tb_files: Vec<_> = fs_err::read_dir(dir.path().join(TB_DIR)).unwrap().collect();
        assert_eq!(tb_files.len(), 1);
        let tb_len = fs_err::metadata(m.tb.path()).unwrap().len();
        assert!(tb_len > 11 * 40, "{tb_len} bytes for 11 scalars");

        let png = dir.path().join("loss.png");
        m.plot_loss(&png, "loss").unwrap();
        assert!(fs_err::read(&png).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));

        drop(m);
        let mut m = Metrics::resume(dir.path(), 2).unwrap();
        m.log(3, &[("loss", 0.9)]).unwrap();
        let recs = MetricsLog::read(&dir.path().join(METRICS_FILE)).unwrap();
        let steps: Vec<_> = recs.iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3]);
        assert_eq!(recs[2]["loss"], json!(0.9));
        assert_eq!(fs_err::read_dir(dir.path().join(TB_DIR)).unwrap().count(), 2);
    }

    /// Not a test: writes an event file for `scripts/interop/tensorboard.sh`
    /// into `$PIPE_TB_INTEROP_DIR`, with the values that script expects.
    #[test]
    #[ignore = "run by scripts/interop/tensorboard.sh"]
    fn interop_write_tensorboard_events() {
        let Some(dir) = std::env::var_os("PIPE_TB_INTEROP_DIR") else {
            panic!("set PIPE_TB_INTEROP_DIR to the directory to write into");
        };
        let dir = PathBuf::from(dir);
        let mut m = Metrics::create(&dir).unwrap();
        for step in 1..=50u64 {
            let s = step as f64;
            let fields = [
                ("epoch", s / 50.0),
                ("loss", 2.0 + 1.0 / s),
                ("lr", 1e-4 * (1.0 - s / 50.0)),
                ("grad_norm", 0.5 + s / 100.0),
                ("tokens_per_s", 1000.0 + s),
                ("elapsed_s", s * 0.25),
            ];
            m.log(step, &fields).unwrap();
        }
        m.log(51, &[("eval/loss", 1.5)]).unwrap();
        m.plot_loss(&dir.join("loss.png"), "interop loss").unwrap();
    }
}
