//! `pipe verify [FILE]`

use std::path::PathBuf;

use anyhow::Result;
use pipe_engine::spec::VarOverride;
use pipe_engine::stage::Cancel;

use crate::ui::Ui;

pub fn verify(file: Option<PathBuf>, no_exec: bool, set: &[VarOverride]) -> Result<i32> {
    let (ws, p, pid) = super::load(file, set)?;
    let ui = Ui::new();
    let rep = pipe_engine::maint::verify(&ws, &p, &pid, &Cancel::default(), &ui, !no_exec)?;
    for r in &rep.reproduced {
        println!("ok          {r}: output matches the lock file");
    }
    for s in &rep.skipped {
        println!("skipped     {s}");
    }
    for d in &rep.drift {
        println!("drift       {d}");
    }
    for c in &rep.corrupt {
        println!("corrupt     {c}");
    }
    for m in &rep.mismatched {
        println!("mismatch    {m}");
    }
    if rep.ok() {
        eprintln!("pipe: verify: ok");
        Ok(0)
    } else {
        eprintln!(
            "pipe: verify: FAILED ({} corrupt, {} drifted, {} not reproduced)",
            rep.corrupt.len(),
            rep.drift.len(),
            rep.mismatched.len()
        );
        if !rep.corrupt.is_empty() {
            eprintln!("hint: `pipe run` treats corrupt outputs as absent and rebuilds them");
        }
        Ok(1)
    }
}
