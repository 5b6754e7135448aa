//! pipe-cache: the content-addressed store under `.pipe/`.
//!
//! - [`Digest`]: a BLAKE3 digest, printed as hex.
//! - [`hash_file`] / [`hash_path`]: file digests and the Merkle digest of a
//!   directory (sorted relative paths + exec bit + file digests), using a
//!   [`StatCache`] so unchanged files are not re-hashed.
//! - [`Store`]: `objects-v1/` (read-only, deduplicated artifacts), `tmp/`
//!   (work dirs), atomic publish (write, fsync, rename), verification,
//!   checkout (hardlink with copy fallback) and removal for gc.
//!
//! The layout is versioned (`objects-v1`): a change of the digest scheme gets a
//! new directory, never a silent reinterpretation of old objects.

mod digest;
mod hash;
mod statcache;
mod store;

pub use digest::{Digest, ParseDigestError};
pub use hash::{hash_bytes, hash_file, hash_path, HashError};
pub use statcache::StatCache;
pub use store::{dir_size, Store, StoreError};
