//! Progress and events on stderr: spinners per running stage on a terminal
//! (indicatif), plain `pipe: STAGE: ...` lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipe_cache::Digest;
use pipe_engine::exec::Reporter;

pub struct Ui {
    tty: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
    /// Without a terminal, progress lines are throttled per stage: when the
    /// last one was printed, and the newest one held back since (printed
    /// when the stage ends, so a log shows final counts).
    last_plain: Mutex<HashMap<String, (Instant, Option<String>)>>,
}

/// At most one plain progress line per stage this often.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

impl Ui {
    pub fn new() -> Ui {
        let tty = (std::io::stderr().is_terminal() && std::env::var_os("PIPE_PLAIN").is_none())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Ui { tty, bars: Mutex::new(HashMap::new()), last_plain: Mutex::new(HashMap::new()) }
    }

    pub fn line(&self, s: &str) {
        match &self.tty {
            Some(mp) => {
                let _ = mp.println(s);
            }
            None => eprintln!("{s}"),
        }
    }

    fn finish_bar(&self, stage: &str) {
        if let Some(b) = self.bars.lock().expect("ui lock").remove(stage) {
            b.finish_and_clear();
        }
        let held = self.last_plain.lock().expect("ui lock").remove(stage).and_then(|(_, m)| m);
        if let Some(m) = held {
            self.line(&format!("pipe: {stage}: {m}"));
        }
    }
}

impl Reporter for Ui {
    fn started(&self, stage: &str, reasons: &[String]) {
        let why = if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join("; ")) };
        self.line(&format!("pipe: {stage}: running{why}"));
        if let Some(mp) = &self.tty {
            let b = mp.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {elapsed} {wide_msg}").expect("valid template"),
            );
            b.set_prefix(stage.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            self.bars.lock().expect("ui lock").insert(stage.to_string(), b);
        }
    }

    fn cached(&self, stage: &str, output: &Digest) {
        self.line(&format!("pipe: {stage}: cached ({})", output.short()));
    }

    fn finished(&self, stage: &str, output: &Digest, elapsed: Duration) {
        self.finish_bar(stage);
        self.line(&format!("pipe: {stage}: done in {:.2}s ({})", elapsed.as_secs_f64(), output.short()));
    }

    fn failed(&self, stage: &str, message: &str, log: &Path, work_dir: &Path) {
        self.finish_bar(stage);
        let mut s = format!("pipe: {stage}: FAILED: {message}");
        if log != Path::new("-") {
            if let Ok(text) = fs_err::read_to_string(log) {
                let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("# ")).collect();
                let tail = &lines[lines.len().saturating_sub(15)..];
                if !tail.is_empty() {
                    s.push_str(&format!("\n  last lines of the log:\n    {}", tail.join("\n    ")));
                }
            }
            s.push_str(&format!("\n  log: {}\n  work dir kept for inspection: {}", log.display(), work_dir.display()));
        }
        self.line(&s);
    }

    fn stopped(&self, stage: &str) {
        self.finish_bar(stage);
        self.line(&format!("pipe: {stage}: stopped"));
    }

    fn waiting(&self, stage: &str, holder: &str) {
        self.line(&format!("pipe: {stage}: waiting: another `pipe run` is running this stage ({holder})"));
    }

    fn progress(&self, stage: &str, message: &str) {
        if let Some(b) = self.bars.lock().expect("ui lock").get(stage) {
            b.set_message(message.to_string());
            return;
        }
        let mut last = self.last_plain.lock().expect("ui lock");
        let due = last.get(stage).is_none_or(|(t, _)| t.elapsed() >= PLAIN_EVERY);
        if due {
            last.insert(stage.to_string(), (Instant::now(), None));
            drop(last);
            self.line(&format!("pipe: {stage}: {message}"));
        } else if let Some((_, held)) = last.get_mut(stage) {
            *held = Some(message.to_string());
        }
    }
}
