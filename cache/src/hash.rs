//! File and directory digests.
//!
//! A directory's digest is a Merkle hash: BLAKE3 over a versioned header and,
//! for every entry in sorted relative-path order, its kind, path, exec bit and
//! content digest (files) or target (symlinks). Empty directories count, so
//! `mkdir out/x` changes the digest.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::{Digest, StatCache};

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("cannot walk {path}: {source}")]
    Walk { path: PathBuf, source: walkdir::Error },
    #[error("{0} is neither a file nor a directory")]
    Special(PathBuf),
}

/// Files at least this large are hashed with memory mapping and rayon.
const PARALLEL_THRESHOLD: u64 = 16 << 20;

pub fn hash_bytes(bytes: &[u8]) -> Digest {
    blake3::hash(bytes).into()
}

/// Content digest of one file (multi-threaded for large files).
pub fn hash_file(path: &Path) -> Result<Digest, HashError> {
    let len = fs_err::metadata(path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= PARALLEL_THRESHOLD {
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    } else {
        let mut f = fs_err::File::open(path)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hasher.finalize().into())
}

enum Entry {
    Dir(String),
    File(String, PathBuf, bool),
    Link(String, String),
}

/// Digest of a file or directory. Files: their content digest. Directories:
/// the Merkle digest described in the module docs. `cache` avoids re-hashing
/// files whose (inode, size, mtime, ctime) did not change.
pub fn hash_path(path: &Path, cache: Option<&StatCache>) -> Result<Digest, HashError> {
    let meta = fs_err::metadata(path)?;
    if meta.is_file() {
        return cached_file_digest(path, &meta, cache);
    }
    if !meta.is_dir() {
        return Err(HashError::Special(path.to_path_buf()));
    }
    let mut entries = Vec::new();
    for e in walkdir::WalkDir::new(path).min_depth(1).sort_by_file_name() {
        let e = e.map_err(|source| HashError::Walk { path: path.to_path_buf(), source })?;
        let rel =
            e.path().strip_prefix(path).expect("walkdir yields children of its root").to_string_lossy().into_owned();
        let ft = e.file_type();
        if ft.is_symlink() {
            let target = fs_err::read_link(e.path())?;
            entries.push(Entry::Link(rel, target.to_string_lossy().into_owned()));
        } else if ft.is_dir() {
            entries.push(Entry::Dir(rel));
        } else if ft.is_file() {
            let exec = e.metadata().map(|m| m.permissions().mode() & 0o111 != 0).unwrap_or(false);
            entries.push(Entry::File(rel, e.path().to_path_buf(), exec));
        } else {
            return Err(HashError::Special(e.path().to_path_buf()));
        }
    }
    // walkdir sorts per directory; sort globally by path bytes so the order
    // does not depend on traversal details.
    entries.sort_by(|a, b| entry_path(a).cmp(entry_path(b)));
    let digests: Vec<Option<Digest>> = entries
        .par_iter()
        .map(|e| match e {
            Entry::File(_, p, _) => {
                let m = fs_err::metadata(p)?;
                cached_file_digest(p, &m, cache).map(Some)
            }
            _ => Ok(None),
        })
        .collect::<Result<_, HashError>>()?;
    let mut h = blake3::Hasher::new();
    h.update(b"pipe-tree-v1\n");
    for (e, d) in entries.iter().zip(digests) {
        match e {
            Entry::Dir(rel) => {
                h.update(b"d\0");
                h.update(rel.as_bytes());
                h.update(b"\n");
            }
            Entry::File(rel, _, exec) => {
                h.update(if *exec { b"x\0" } else { b"f\0" });
                h.update(rel.as_bytes());
                h.update(b"\0");
                h.update(&d.expect("file entries have digests").0);
                h.update(b"\n");
            }
            Entry::Link(rel, target) => {
                h.update(b"l\0");
                h.update(rel.as_bytes());
                h.update(b"\0");
                h.update(target.as_bytes());
                h.update(b"\n");
            }
        }
    }
    Ok(h.finalize().into())
}

fn entry_path(e: &Entry) -> &str {
    match e {
        Entry::Dir(p) | Entry::File(p, _, _) | Entry::Link(p, _) => p,
    }
}

fn cached_file_digest(path: &Path, meta: &std::fs::Metadata, cache: Option<&StatCache>) -> Result<Digest, HashError> {
    if let Some(c) = cache {
        if let Some(d) = c.lookup(path, meta) {
            return Ok(d);
        }
    }
    let d = hash_file(path)?;
    if let Some(c) = cache {
        c.insert(path, meta, d);
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tree(dir: &Path) {
        fs_err::create_dir_all(dir.join("a/b")).unwrap();
        fs_err::write(dir.join("a/b/x.txt"), "hello").unwrap();
        fs_err::write(dir.join("y.txt"), "world").unwrap();
    }

    #[test]
    fn tree_digest_is_stable_and_sensitive() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        tree(&a);
        tree(&b);
        let da = hash_path(&a, None).unwrap();
        assert_eq!(da, hash_path(&b, None).unwrap());
        // content change
        fs_err::write(b.join("y.txt"), "World").unwrap();
        let db = hash_path(&b, None).unwrap();
        assert_ne!(da, db);
        // exec bit change
        fs_err::write(b.join("y.txt"), "world").unwrap();
        assert_eq!(da, hash_path(&b, None).unwrap());
        let mut p = fs_err::metadata(b.join("y.txt")).unwrap().permissions();
        p.set_mode(0o755);
        fs_err::set_permissions(b.join("y.txt"), p).unwrap();
        assert_ne!(da, hash_path(&b, None).unwrap());
        // rename changes the digest even with equal content
        let c = t.path().join("c");
        tree(&c);
        fs_err::rename(c.join("y.txt"), c.join("z.txt")).unwrap();
        assert_ne!(da, hash_path(&c, None).unwrap());
        // empty dir counts
        let d = t.path().join("d");
        tree(&d);
        fs_err::create_dir(d.join("empty")).unwrap();
        assert_ne!(da, hash_path(&d, None).unwrap());
    }

    #[test]
    fn large_file_parallel_path_matches_plain_blake3() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("big");
        let data: Vec<u8> = (0..(PARALLEL_THRESHOLD as usize + 12345)).map(|i| (i * 31 % 251) as u8).collect();
        fs_err::write(&p, &data).unwrap();
        assert_eq!(hash_file(&p).unwrap(), hash_bytes(&data));
    }
}
