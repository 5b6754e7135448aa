//! A tiny Hugging Face hub on 127.0.0.1 for tests: repos with branches and
//! commits the test writes, served on the endpoints `hf-hub` 0.5 calls:
//!
//! - `GET /api/{models|datasets}/ORG/NAME/revision/REV` -> `{"id", "sha", "siblings": [{"rfilename"}]}`
//! - `GET /ORG/NAME/resolve/REV/FILE` and `/datasets/ORG/NAME/resolve/REV/FILE`
//!   with `x-repo-commit`, `etag`, `content-length`, and `Range: bytes=A-[B]`
//!   answered `206` with `content-range: bytes A-B/SIZE` (hf-hub reads the size
//!   from a `bytes=0-0` probe).
//!
//! `REV` is a branch or a full sha (`%2F` for `/` in branch names). Every
//! request is logged (`requests()`), so tests can prove what was fetched.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Repo {
    branches: HashMap<String, String>,
    commits: HashMap<String, BTreeMap<String, Vec<u8>>>,
}

#[derive(Default)]
struct State {
    /// ("models" | "datasets", "ORG/NAME") -> repo
    repos: HashMap<(String, String), Repo>,
    log: Vec<String>,
    commits: u64,
}

pub struct HubServer {
    pub url: String,
    state: Arc<Mutex<State>>,
}

fn hex40(parts: &[&[u8]]) -> String {
    let mut out = String::new();
    for salt in 0u8..3 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        for p in parts {
            p.hash(&mut h);
        }
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(40);
    out
}

impl HubServer {
    pub fn start() -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        HubServer { url, state }
    }

    /// Commit `files` (the whole tree) to `kind` ("models" or "datasets")
    /// repo `repo` and point `branch` at it. Returns the commit sha.
    pub fn commit(&self, kind: &str, repo: &str, branch: &str, files: &[(&str, Vec<u8>)]) -> String {
        let mut st = self.state.lock().expect("hub state");
        st.commits += 1;
        let n = st.commits.to_le_bytes();
        let mut parts: Vec<&[u8]> = vec![repo.as_bytes(), &n];
        for (name, data) in files {
            parts.push(name.as_bytes());
            parts.push(data);
        }
        let sha = hex40(&parts);
        let r = st.repos.entry((kind.to_string(), repo.to_string())).or_default();
        r.commits.insert(sha.clone(), files.iter().map(|(n, d)| (n.to_string(), d.clone())).collect());
        r.branches.insert(branch.to_string(), sha.clone());
        sha
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("hub state").log.clone()
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

fn serve(mut conn: TcpStream, st: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
    let mut range: Option<String> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    st.lock().expect("hub state").log.push(format!("{method} {path}"));
    let not_found = |conn: &mut TcpStream, what: &str| {
        respond(
            conn,
            "404 Not Found",
            &[("x-error-code", "RepoNotFound".into())],
            format!("{{\"error\":\"{what}\"}}").as_bytes(),
        )
    };
    let segs: Vec<String> = path.trim_start_matches('/').split('/').map(|s| s.replace("%2F", "/")).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();

    // /api/{kind}/ORG/NAME/revision/REV
    if let ["api", kind, org, name, "revision", rev @ ..] = segs.as_slice() {
        let repo = format!("{org}/{name}");
        let rev = rev.join("/");
        let st = st.lock().expect("hub state");
        let Some(r) = st.repos.get(&(kind.to_string(), repo.clone())) else {
            drop(st);
            return not_found(&mut conn, "repo not found");
        };
        let sha = r.branches.get(&rev).cloned().unwrap_or(rev);
        let Some(files) = r.commits.get(&sha) else {
            drop(st);
            return not_found(&mut conn, "revision not found");
        };
        let siblings: Vec<serde_json::Value> = files.keys().map(|f| serde_json::json!({"rfilename": f})).collect();
        let body = serde_json::json!({"id": repo, "sha": sha, "siblings": siblings}).to_string();
        drop(st);
        return respond(&mut conn, "200 OK", &[("content-type", "application/json".into())], body.as_bytes());
    }

    // [/datasets]/ORG/NAME/resolve/REV/FILE...
    let (kind, rest): (&str, &[&str]) = match segs.as_slice() {
        ["datasets", rest @ ..] => ("datasets", rest),
        rest => ("models", rest),
    };
    if let [org, name, "resolve", rev, file @ ..] = rest {
        let repo = format!("{org}/{name}");
        let file = file.join("/");
        let st = st.lock().expect("hub state");
        let found = st.repos.get(&(kind.to_string(), repo)).and_then(|r| {
            let sha = r.branches.get(*rev).cloned().unwrap_or_else(|| rev.to_string());
            r.commits.get(&sha).and_then(|fs| fs.get(&file)).map(|d| (sha, d.clone()))
        });
        drop(st);
        let Some((sha, data)) = found else {
            return not_found(&mut conn, "entry not found");
        };
        let etag = format!("\"{}\"", hex40(&[&data]));
        let size = data.len();
        let mut headers = vec![("x-repo-commit", sha), ("etag", etag), ("accept-ranges", "bytes".to_string())];
        let spec = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-'));
        return match spec {
            Some((a, b)) => {
                let start: usize = a.parse().unwrap_or(0).min(size);
                let end: usize = if b.is_empty() { size.saturating_sub(1) } else { b.parse().unwrap_or(0) };
                let end = end.min(size.saturating_sub(1));
                let body = if size == 0 || start > end { &data[0..0] } else { &data[start..=end] };
                headers.push(("content-range", format!("bytes {start}-{end}/{size}")));
                respond(&mut conn, "206 Partial Content", &headers, body)
            }
            None => respond(&mut conn, "200 OK", &headers, &data),
        };
    }
    not_found(&mut conn, "no such endpoint")
}
