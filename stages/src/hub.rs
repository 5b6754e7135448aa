//! Hugging Face hub access shared by the stages that read `hf://` sources
//! (`model` now, `dataset` next).
//!
//! - [`HubRef`] parses `hf://ORG/NAME[@REV]` (a model repo) and
//!   `hf://datasets/ORG/NAME[@REV]` (a dataset repo); `REV` defaults to `main`.
//! - [`Hub`] talks to the hub through the `hf-hub` crate (sync API) and its
//!   on-disk cache: [`Hub::resolve`] turns a revision (branch, tag or sha) into
//!   the commit sha and the repo's file list, [`Hub::download`] fetches one file
//!   *at that sha* (so what a stage reads is exactly what its key pinned).
//!
//! Environment, as in `huggingface_hub`: `HF_ENDPOINT` (default
//! `https://huggingface.co`), `HF_HOME` (cache under `$HF_HOME/hub`, default
//! `~/.cache/huggingface`), `HF_TOKEN` (else the token file `$HF_HOME/token`),
//! `HF_HUB_OFFLINE=1` (answer from the cache only, never the network).

use std::fmt;
use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// Model or dataset repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

/// A parsed `hf://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub kind: RepoKind,
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit sha as written (`main` when absent).
    pub revision: String,
}

/// A revision resolved on the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The 40-hex commit sha the revision points to now.
    pub sha: String,
    /// Every file in the repo at that commit (paths relative to the repo root).
    pub files: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{input}` is not a hub reference: {why}")]
    Parse { input: String, why: String },
    #[error("{what}: {message}")]
    Request { what: String, message: String, hint: Option<String> },
    #[error("{what}: not in the local hub cache and HF_HUB_OFFLINE is set")]
    Offline { what: String },
}

impl HubError {
    /// What to do about it, for a `hint:` line.
    pub fn hint(&self) -> Option<String> {
        match self {
            HubError::Parse { .. } => {
                Some("write `hf://ORG/NAME`, `hf://ORG/NAME@REVISION` or `hf://datasets/ORG/NAME[@REVISION]`".into())
            }
            HubError::Request { hint, .. } => hint.clone(),
            HubError::Offline { .. } => {
                Some("unset HF_HUB_OFFLINE to download it, or run once with network access".into())
            }
        }
    }
}

const PREFIX: &str = "hf://";

impl HubRef {
    /// Whether `s` is meant as a hub reference (starts with `hf://`).
    pub fn is_hub(s: &str) -> bool {
        s.starts_with(PREFIX)
    }

    pub fn parse(s: &str) -> Result<HubRef, HubError> {
        let bad = |why: &str| HubError::Parse { input: s.to_string(), why: why.to_string() };
        let rest = s.strip_prefix(PREFIX).ok_or_else(|| bad("it does not start with `hf://`"))?;
        let (kind, rest) = match rest.strip_prefix("datasets/") {
            Some(r) => (RepoKind::Dataset, r),
            None => (RepoKind::Model, rest.strip_prefix("models/").unwrap_or(rest)),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (rest, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad("expected ORG/NAME after `hf://`"));
        }
        let name_ok = |p: &str| p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !parts.iter().all(|p| name_ok(p)) || parts.iter().any(|p| p.starts_with('.')) {
            return Err(bad("ORG and NAME may hold letters, digits, `-`, `_` and `.`"));
        }
        if revision.is_empty() {
            return Err(bad("empty revision after `@`"));
        }
        if revision.chars().any(|c| c.is_whitespace() || c.is_control()) || revision.contains("..") {
            return Err(bad("the revision contains spaces or `..`"));
        }
        Ok(HubRef { kind, repo: repo.to_string(), revision: revision.to_string() })
    }

    fn hf_repo(&self, revision: &str) -> Repo {
        let t = match self.kind {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        };
        Repo::with_revision(self.repo.clone(), t, revision.to_string())
    }

    /// Whether the revision is already a full commit sha.
    pub fn is_sha(&self) -> bool {
        is_sha(&self.revision)
    }
}

impl fmt::Display for HubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ds = if self.kind == RepoKind::Dataset { "datasets/" } else { "" };
        write!(f, "{PREFIX}{ds}{}@{}", self.repo, self.revision)
    }
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// A hub client configured from the environment.
pub struct Hub {
    api: Api,
    cache: Cache,
    endpoint: String,
    offline: bool,
}

impl Hub {
    pub fn from_env() -> Result<Hub, HubError> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let cache = match std::env::var_os("HF_HOME").filter(|h| !h.is_empty()) {
            Some(home) => Cache::new(PathBuf::from(home).join("hub")),
            None => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
                Some(home) => Cache::new(PathBuf::from(home).join(".cache/huggingface/hub")),
                None => {
                    return Err(HubError::Request {
                        what: "hub cache".into(),
                        message: "neither HF_HOME nor HOME is set".into(),
                        hint: Some("set HF_HOME to a folder for the hub cache".into()),
                    })
                }
            },
        };
        let mut b = ApiBuilder::from_cache(cache.clone())
            .with_endpoint(endpoint.clone())
            .with_progress(false)
            .with_retries(2)
            .with_user_agent("pipe", env!("CARGO_PKG_VERSION"));
        if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
            b = b.with_token(Some(token.trim().to_string()));
        }
        let api = b.build().map_err(|e| HubError::Request {
            what: "hub client".into(),
            message: e.to_string(),
            hint: None,
        })?;
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"));
        Ok(Hub { api, cache, endpoint, offline })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The commit sha `r.revision` points to now, and the files at that commit.
    pub fn resolve(&self, r: &HubRef) -> Result<Resolved, HubError> {
        if self.offline {
            return self.resolve_cached(r);
        }
        let info = self.api.repo(r.hf_repo(&r.revision)).info().map_err(|e| self.request_error(r, None, e))?;
        if !is_sha(&info.sha) {
            return Err(HubError::Request {
                what: format!("{r}"),
                message: format!("the hub answered with `{}`, not a commit sha", info.sha),
                hint: Some(format!("check that HF_ENDPOINT ({}) is a Hugging Face hub", self.endpoint)),
            });
        }
        let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        files.sort();
        Ok(Resolved { sha: info.sha, files })
    }

    /// Just the commit sha (see [`Hub::resolve`]).
    pub fn resolve_sha(&self, r: &HubRef) -> Result<String, HubError> {
        self.resolve(r).map(|x| x.sha)
    }

    /// The files of the repo at `r.revision`.
    pub fn list_files(&self, r: &HubRef) -> Result<Vec<String>, HubError> {
        self.resolve(r).map(|x| x.files)
    }

    /// Download `file` of the repo at commit `sha` (from the cache when it is
    /// there). Returns its path in the hub cache (a symlink into `blobs/`).
    pub fn download(&self, r: &HubRef, sha: &str, file: &str) -> Result<PathBuf, HubError> {
        let repo = r.hf_repo(sha);
        if let Some(p) = self.cache.repo(repo.clone()).get(file) {
            return Ok(p);
        }
        // A snapshot written under the sha by a download through a branch.
        let p = self.cache.repo(repo.clone()).pointer_path(sha).join(file);
        if p.exists() {
            return Ok(p);
        }
        if self.offline {
            return Err(HubError::Offline { what: format!("{}@{sha}: {file}", r.repo) });
        }
        self.api.repo(repo).download(file).map_err(|e| self.request_error(r, Some(file), e))
    }

    /// Offline: the sha the cache recorded for the revision, and the files of
    /// that snapshot present locally.
    fn resolve_cached(&self, r: &HubRef) -> Result<Resolved, HubError> {
        let repo = r.hf_repo(&r.revision);
        let cached = self.cache.repo(repo.clone());
        let sha = if r.is_sha() {
            r.revision.clone()
        } else {
            let dir = self.cache.path().join(repo.folder_name()).join("refs").join(&r.revision);
            match fs_err::read_to_string(dir) {
                Ok(s) if is_sha(s.trim()) => s.trim().to_string(),
                _ => return Err(HubError::Offline { what: format!("{r}") }),
            }
        };
        let snap = cached.pointer_path(&sha);
        if !snap.is_dir() {
            return Err(HubError::Offline { what: format!("{r}") });
        }
        let mut files = Vec::new();
        for e in crate::table::files_under(&snap) {
            if let Ok(rel) = e.strip_prefix(&snap) {
                files.push(rel.to_string_lossy().into_owned());
            }
        }
        files.sort();
        Ok(Resolved { sha, files })
    }

    fn request_error(&self, r: &HubRef, file: Option<&str>, e: ApiError) -> HubError {
        let what = match file {
            Some(f) => format!("{r}: {f}"),
            None => format!("{r}"),
        };
        let status = match &e {
            ApiError::RequestError(u) => match u.as_ref() {
                ureq::Error::StatusCode(c) => Some(*c),
                _ => None,
            },
            _ => None,
        };
        let (message, hint) = match status {
            Some(401) | Some(403) => (
                format!("the hub refused access (HTTP {})", status.unwrap_or_default()),
                Some(
                    "a private or gated repo needs a token: set HF_TOKEN (and accept the repo's terms on the hub)"
                        .into(),
                ),
            ),
            Some(404) => (
                match file {
                    Some(_) => "no such file at this revision (HTTP 404)".to_string(),
                    None => "no such repo or revision (HTTP 404)".to_string(),
                },
                Some("check the ORG/NAME and the revision (branch, tag or commit sha)".into()),
            ),
            _ => (
                format!("{e} (endpoint {})", self.endpoint),
                Some("check the network, or HF_ENDPOINT; HF_HUB_OFFLINE=1 uses the local hub cache only".into()),
            ),
        };
        HubError::Request { what, message, hint }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refs() {
        let r = HubRef::parse("hf://HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(
            (r.kind, r.repo.as_str(), r.revision.as_str()),
            (RepoKind::Model, "HuggingFaceTB/SmolLM2-135M-Instruct", "main")
        );
        let r = HubRef::parse("hf://datasets/openai/gsm8k@refs/convert/parquet").unwrap();
        assert_eq!(
            (r.kind, r.repo.as_str(), r.revision.as_str()),
            (RepoKind::Dataset, "openai/gsm8k", "refs/convert/parquet")
        );
        assert_eq!(r.to_string(), "hf://datasets/openai/gsm8k@refs/convert/parquet");
        for bad in ["hf://", "hf://a", "hf://a/b/c", "hf://a/b@", "https://x/y", "hf://a b/c"] {
            assert!(HubRef::parse(bad).is_err(), "{bad}");
        }
    }
}
