use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub struct Ws {
    pub dir: tempfile::TempDir,
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Stages reported as running / cached, in report order.
    pub fn ran(&self) -> Vec<String> {
        self.stage_lines(": running")
    }
    pub fn cached(&self) -> Vec<String> {
        self.stage_lines(": cached")
    }
    fn stage_lines(&self, what: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .stderr
            .lines()
            .filter_map(|l| l.strip_prefix("pipe: "))
            .filter(|l| l.contains(what))
            .map(|l| l.split(':').next().unwrap_or_default().to_string())
            .collect();
        v.sort();
        v
    }
}

impl From<Output> for Out {
    fn from(o: Output) -> Self {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipe")
}

impl Ws {
    pub fn new() -> Ws {
        let dir = tempfile::tempdir().expect("tempdir");
        fs_err::create_dir(dir.path().join(".pipe")).expect("mkdir .pipe");
        Ws { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.path().join(rel);
        if let Some(d) = p.parent() {
            fs_err::create_dir_all(d).expect("mkdir");
        }
        fs_err::write(p, content).expect("write");
    }

    pub fn read(&self, rel: &str) -> String {
        fs_err::read_to_string(self.path().join(rel)).expect("read")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.path())
            .env("NO_COLOR", "1")
            .env("PIPE_PLAIN", "1")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("PIPE_LOG")
            .stdin(Stdio::null());
        c
    }

    pub fn pipe(&self, args: &[&str]) -> Out {
        self.cmd(args).output().expect("run pipe").into()
    }

    /// Run and assert success.
    pub fn ok(&self, args: &[&str]) -> Out {
        let o = self.pipe(args);
        assert_eq!(o.code, 0, "pipe {args:?} failed:\n{o:?}");
        o
    }

    pub fn status_json(&self, file: &str) -> serde_json::Value {
        let o = self.ok(&["status", file, "--json"]);
        serde_json::from_str(&o.stdout).expect("status --json is JSON")
    }

    /// Output path of a stage's latest result.
    pub fn out_path(&self, file: &str, stage: &str) -> PathBuf {
        PathBuf::from(self.ok(&["show", file, stage, "--path"]).stdout.trim())
    }

    pub fn objects(&self) -> Vec<String> {
        let mut v = Vec::new();
        for shard in fs_err::read_dir(self.path().join(".pipe/objects-v1")).expect("objects dir") {
            for o in fs_err::read_dir(shard.expect("entry").path()).expect("shard") {
                v.push(o.expect("entry").file_name().to_string_lossy().into_owned());
            }
        }
        v.sort();
        v
    }
}

/// Wait until `cond` holds (polling), or panic after `secs`.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed().as_secs() < secs, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
