//! `pipe gc`

use std::path::PathBuf;

use anyhow::Result;
use pipe_engine::Workspace;

pub fn gc(keep_last: usize, tmp: bool, dry_run: bool, root: Option<PathBuf>) -> Result<i32> {
    let root =
        match root {
            Some(r) => r,
            None => {
                let cwd = std::env::current_dir()?;
                match cwd.ancestors().find(|d| d.join(".pipe").is_dir()) {
                    Some(d) => d.to_path_buf(),
                    None => return Err(super::UsageError(
                        "no .pipe/ here or above: nothing to collect\nhint: run it inside a workspace, or pass --root"
                            .into(),
                    )
                    .into()),
                }
            }
        };
    let ws = Workspace::open(&root)?;
    let rep = pipe_engine::maint::gc(&ws, keep_last, tmp, dry_run)?;
    let verb = if dry_run { "would free" } else { "freed" };
    println!(
        "{verb} {} in {} object(s){}; kept {} object(s) referenced by {} lock file(s){}",
        human_bytes(rep.bytes_freed),
        rep.removed,
        if tmp { format!(" and {} work dir(s)", rep.tmp_removed) } else { String::new() },
        rep.kept,
        rep.lock_files.len(),
        if keep_last > 0 { format!(" or the last {keep_last} run(s)") } else { String::new() }
    );
    Ok(0)
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
