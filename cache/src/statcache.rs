//! A stat cache: (device, inode, size, mtime, ctime) -> content digest, so that
//! `status` and no-op runs never re-read unchanged large files.
//!
//! Entries are keyed by (device, inode), not path, so an artifact renamed
//! into the store keeps its entries.
//!
//! Loaded once per process, saved atomically at the end; two processes saving
//! at once lose at most some entries (which only costs a re-hash later).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::Digest;

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Row {
    stamp: Stamp,
    digest: Digest,
}

/// Rows kept when saving even if this process never touched them.
const MAX_ROWS: usize = 200_000;

#[derive(Serialize, Deserialize)]
struct OnDisk {
    schema: u32,
    rows: Vec<Row>,
}

/// (stamp, digest, used by this process)
type Entry = (Stamp, Digest, bool);

#[derive(Default)]
pub struct StatCache {
    file: Option<PathBuf>,
    map: Mutex<HashMap<(u64, u64), Entry>>,
    dirty: Mutex<bool>,
}

impl StatCache {
    /// An in-memory cache that is never saved.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Load from `file`; a missing or unreadable file gives an empty cache
    /// (the cache is an optimisation, never a source of truth).
    pub fn load(file: &Path) -> Self {
        let map = fs_err::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice::<OnDisk>(&b).ok())
            .filter(|d| d.schema == 1)
            .map(|d| d.rows.into_iter().map(|r| ((r.stamp.dev, r.stamp.ino), (r.stamp, r.digest, false))).collect())
            .unwrap_or_default();
        StatCache { file: Some(file.to_path_buf()), map: Mutex::new(map), dirty: Mutex::new(false) }
    }

    pub fn lookup(&self, _path: &Path, meta: &std::fs::Metadata) -> Option<Digest> {
        let stamp = Stamp::of(meta);
        let mut map = self.map.lock().expect("stat cache lock");
        match map.get_mut(&(stamp.dev, stamp.ino)) {
            Some((s, d, touched)) if *s == stamp => {
                *touched = true;
                Some(*d)
            }
            _ => None,
        }
    }

    pub fn insert(&self, _path: &Path, meta: &std::fs::Metadata, digest: Digest) {
        let stamp = Stamp::of(meta);
        self.map.lock().expect("stat cache lock").insert((stamp.dev, stamp.ino), (stamp, digest, true));
        *self.dirty.lock().expect("stat cache lock") = true;
    }

    /// Write atomically; past `MAX_ROWS`, only entries used by this process stay.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !*self.dirty.lock().expect("stat cache lock") {
            return Ok(());
        }
        let map = self.map.lock().expect("stat cache lock");
        let keep_all = map.len() <= MAX_ROWS;
        let rows: Vec<Row> = map
            .values()
            .filter(|(_, _, touched)| keep_all || *touched)
            .map(|(s, d, _)| Row { stamp: *s, digest: *d })
            .collect();
        let bytes = serde_json::to_vec(&OnDisk { schema: 1, rows }).map_err(std::io::Error::other)?;
        crate::store::write_atomic(file, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_path;

    #[test]
    fn hit_until_the_file_changes() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs_err::write(&f, "one").unwrap();
        let c = StatCache::load(&t.path().join("cache.json"));
        let d1 = hash_path(&f, Some(&c)).unwrap();
        let m = fs_err::metadata(&f).unwrap();
        assert_eq!(c.lookup(&f, &m), Some(d1));
        c.save().unwrap();
        let c2 = StatCache::load(&t.path().join("cache.json"));
        assert_eq!(c2.lookup(&f, &m), Some(d1));
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs_err::write(&f, "two").unwrap();
        let m2 = fs_err::metadata(&f).unwrap();
        assert_eq!(c2.lookup(&f, &m2), None);
        assert_ne!(hash_path(&f, Some(&c2)).unwrap(), d1);
    }
}
