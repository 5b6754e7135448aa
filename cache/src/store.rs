//! The on-disk store. Layout under the workspace's `.pipe/`:
//!
//! ```text
//! objects-v1/ab/abcdef.../   one read-only directory per artifact digest
//! tmp/                       work dirs of running stages (and failed ones, kept)
//! ```
//!
//! Publishing is atomic: the work dir is fsynced, made read-only, hashed, and
//! renamed into `objects-v1/`. A crash before the rename leaves only a
//! directory under `tmp/`, never a half artifact in `objects-v1/`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{hash_path, Digest, HashError, StatCache};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Hash(#[from] HashError),
}

pub struct Store {
    root: PathBuf,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Open (creating if needed) the store rooted at `root` (a `.pipe` dir).
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for d in ["objects-v1", "tmp"] {
            fs_err::create_dir_all(root.join(d))?;
        }
        Ok(Store { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("objects-v1").join(&hex[..2]).join(hex)
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.object_path(d).is_dir()
    }

    /// Re-hash a stored object; `Ok(false)` if it is missing or its content no
    /// longer matches its name. With a stat cache, unchanged files are not re-read.
    pub fn verify(&self, d: &Digest, cache: Option<&StatCache>) -> Result<bool, StoreError> {
        let p = self.object_path(d);
        if !p.is_dir() {
            return Ok(false);
        }
        match hash_path(&p, cache) {
            Ok(got) => Ok(got == *d),
            Err(HashError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A fresh, unique directory under `tmp/` for a stage's work, named
    /// `p<PID>-<label>-...` so gc can tell live runs from dead ones.
    pub fn new_work_dir(&self, label: &str) -> Result<PathBuf, StoreError> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = self.root.join("tmp").join(format!("p{}-{label}-{nanos}-{n}", std::process::id()));
        fs_err::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Move `dir` into the store under its digest and return the digest. The
    /// directory is consumed: afterwards it is either in the store or removed
    /// (when an identical object already exists).
    pub fn publish(&self, dir: &Path, cache: &StatCache) -> Result<Digest, StoreError> {
        sync_and_freeze(dir)?;
        let digest = hash_path(dir, Some(cache))?;
        let dest = self.object_path(&digest);
        if dest.is_dir() && self.verify(&digest, Some(cache))? {
            remove_tree(dir)?;
            return Ok(digest);
        }
        if dest.exists() {
            // A corrupt object of the same name: replace it.
            remove_tree(&dest)?;
        }
        let parent = dest.parent().expect("object paths have a parent");
        fs_err::create_dir_all(parent)?;
        match fs_err::rename(dir, &dest) {
            Ok(()) => {}
            // Another process published the same digest between our check and rename.
            Err(_) if dest.is_dir() => remove_tree(dir)?,
            Err(e) => return Err(e.into()),
        }
        fsync_dir(parent)?;
        Ok(digest)
    }

    /// Every digest present in `objects-v1/`.
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for shard in fs_err::read_dir(self.root.join("objects-v1"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for obj in fs_err::read_dir(shard.path())? {
                if let Ok(d) = obj?.file_name().to_string_lossy().parse() {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Delete an object; returns the bytes freed.
    pub fn remove(&self, d: &Digest) -> Result<u64, StoreError> {
        let p = self.object_path(d);
        if !p.exists() {
            return Ok(0);
        }
        let size = dir_size(&p);
        remove_tree(&p)?;
        Ok(size)
    }

    /// Materialise an object at `dest` (which must not exist): hardlinks where
    /// the filesystem allows (the object is read-only, so sharing is safe),
    /// copies otherwise.
    pub fn checkout(&self, d: &Digest, dest: &Path) -> Result<(), StoreError> {
        let src = self.object_path(d);
        for e in walkdir::WalkDir::new(&src).sort_by_file_name() {
            let e = e.map_err(|source| HashError::Walk { path: src.clone(), source })?;
            let rel = e.path().strip_prefix(&src).expect("child of root");
            let target = dest.join(rel);
            let ft = e.file_type();
            if ft.is_dir() {
                fs_err::create_dir_all(&target)?;
            } else if ft.is_symlink() {
                std::os::unix::fs::symlink(fs_err::read_link(e.path())?, &target)?;
            } else if fs_err::hard_link(e.path(), &target).is_err() {
                fs_err::copy(e.path(), &target)?;
            }
        }
        Ok(())
    }
}

/// Total size in bytes of the regular files under `p`.
pub fn dir_size(p: &Path) -> u64 {
    walkdir::WalkDir::new(p)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// fsync every file, then make the tree read-only (dirs last, bottom-up).
fn sync_and_freeze(dir: &Path) -> Result<(), StoreError> {
    let mut dirs = Vec::new();
    for e in walkdir::WalkDir::new(dir) {
        let e = e.map_err(|source| HashError::Walk { path: dir.to_path_buf(), source })?;
        let ft = e.file_type();
        if ft.is_dir() {
            dirs.push(e.path().to_path_buf());
        } else if ft.is_file() {
            let f = fs_err::File::open(e.path())?;
            f.sync_all()?;
            let mode = fs_err::metadata(e.path())?.permissions().mode();
            let ro = if mode & 0o111 != 0 { 0o555 } else { 0o444 };
            fs_err::set_permissions(e.path(), std::fs::Permissions::from_mode(ro))?;
        }
    }
    for d in dirs.iter().rev() {
        fsync_dir(d)?;
        fs_err::set_permissions(d, std::fs::Permissions::from_mode(0o555))?;
    }
    Ok(())
}

fn fsync_dir(d: &Path) -> std::io::Result<()> {
    fs_err::File::open(d)?.sync_all()
}

/// Remove a tree that may have been made read-only.
pub(crate) fn remove_tree(p: &Path) -> std::io::Result<()> {
    for e in walkdir::WalkDir::new(p).into_iter().filter_map(Result::ok) {
        if e.file_type().is_dir() {
            let _ = fs_err::set_permissions(e.path(), std::fs::Permissions::from_mode(0o755));
        }
    }
    fs_err::remove_dir_all(p)
}

impl Store {
    /// Write a file atomically: temp file in the same dir, fsync, rename, fsync dir.
    pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        write_atomic(path, bytes)
    }
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs_err::create_dir_all(parent)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{n}",
        path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    {
        let mut f = fs_err::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs_err::rename(&tmp, path)?;
    fsync_dir(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_dedupes_and_detects_corruption() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join(".pipe")).unwrap();
        let cache = StatCache::in_memory();
        let mk = |content: &str| {
            let w = store.new_work_dir("s").unwrap();
            fs_err::create_dir_all(w.join("sub")).unwrap();
            fs_err::write(w.join("sub/f.txt"), content).unwrap();
            w
        };
        let w1 = mk("a");
        let d1 = store.publish(&w1, &cache).unwrap();
        assert!(!w1.exists());
        assert!(store.has(&d1));
        let w2 = mk("a");
        assert_eq!(store.publish(&w2, &cache).unwrap(), d1);
        assert!(!w2.exists(), "duplicate work dir removed");
        assert_eq!(store.list().unwrap(), vec![d1]);
        assert!(store.verify(&d1, Some(&cache)).unwrap());

        // objects are read-only
        let f = store.object_path(&d1).join("sub/f.txt");
        assert!(fs_err::metadata(&f).unwrap().permissions().readonly());

        // checkout
        let out = t.path().join("co");
        store.checkout(&d1, &out).unwrap();
        assert_eq!(fs_err::read_to_string(out.join("sub/f.txt")).unwrap(), "a");

        // corruption is detected, even through a warm stat cache
        let mut p = fs_err::metadata(&f).unwrap().permissions();
        p.set_mode(0o644);
        fs_err::set_permissions(&f, p).unwrap();
        fs_err::write(&f, "b").unwrap();
        assert!(!store.verify(&d1, Some(&cache)).unwrap());
        assert!(store.remove(&d1).unwrap() > 0);
        assert!(!store.has(&d1));
    }
}
