//! Lock files, --frozen, verify, corrupted objects, gc.

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

const P: &str = "vars: {n: 1}\nstages:\n  a:\n    kind: command\n    cmd: echo ${vars.n} > $PIPE_OUT/a\n  b:\n    kind: command\n    inputs: {a: a}\n    cmd: cat $PIPE_IN_A/a $PIPE_IN_A/a > $PIPE_OUT/b\n  r:\n    kind: command\n    deterministic: false\n    cmd: date +%s%N > $PIPE_OUT/t\n";

fn corrupt(path: &std::path::Path) {
    let mut perm = fs_err::metadata(path).unwrap().permissions();
    perm.set_mode(0o644);
    fs_err::set_permissions(path, perm).unwrap();
    fs_err::write(path, "garbage").unwrap();
}

#[test]
fn frozen_fails_on_drift_and_names_the_reason() {
    let ws = Ws::new();
    ws.write("p.yaml", P);
    let o = ws.pipe(&["run", "p.yaml", "--frozen"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("--frozen needs a lock file"), "{o:?}");
    ws.ok(&["run", "p.yaml"]);
    let lock = ws.read("p.lock");
    assert!(lock.contains("schema: 1\nstages:\n  a:\n    kind: command\n    key: "), "{lock}");
    ws.ok(&["run", "p.yaml", "--frozen"]);
    let o = ws.pipe(&["run", "p.yaml", "--frozen", "--set", "vars.n=2"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("a: param cmd: \"echo 1 > $PIPE_OUT/a\" -> \"echo 2 > $PIPE_OUT/a\""), "{o:?}");
    assert!(!o.stderr.contains("\n  b:"), "b's inputs come from the lock, so only a drifts: {o:?}");
    assert_eq!(ws.read("p.lock"), lock, "--frozen never writes the lock");
    // A clean cache with a matching lock runs, and checks outputs against it.
    fs_err::remove_dir_all(ws.path().join(".pipe")).unwrap();
    ws.ok(&["run", "p.yaml", "--frozen", "a", "b"]);
}

#[test]
fn verify_reexecutes_and_detects_corrupt_objects() {
    let ws = Ws::new();
    ws.write("p.yaml", P);
    ws.ok(&["run", "p.yaml"]);
    let o = ws.ok(&["verify", "p.yaml"]);
    assert!(o.stdout.contains("ok          a: output matches the lock file"), "{o:?}");
    assert!(o.stdout.contains("ok          b: output matches the lock file"), "{o:?}");
    assert!(o.stdout.contains("skipped     r: not deterministic"), "{o:?}");
    // Corrupt b's stored output: verify reports it, run rebuilds it.
    let b = ws.out_path("p.yaml", "b").join("b");
    corrupt(&b);
    let o = ws.pipe(&["verify", "p.yaml", "--no-exec"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stdout.contains("corrupt     b: stored output"), "{o:?}");
    let s = ws.ok(&["status", "p.yaml"]);
    assert!(s.stdout.contains("b      stale      output missing or corrupt"), "{s:?}");
    let o = ws.ok(&["run", "p.yaml"]);
    assert_eq!(o.ran(), ["b"]);
    assert_eq!(fs_err::read_to_string(&b).unwrap(), "1\n1\n");
    ws.ok(&["verify", "p.yaml"]);
}

#[test]
fn verify_catches_a_nondeterministic_stage_marked_deterministic() {
    let ws = Ws::new();
    ws.write("p.yaml", "stages:\n  t:\n    kind: command\n    cmd: date +%s%N > $PIPE_OUT/t\n");
    ws.ok(&["run", "p.yaml"]);
    let o = ws.pipe(&["verify", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stdout.contains("mismatch    t: --frozen: output"), "{o:?}");
}

#[test]
fn gc_keeps_what_lock_files_reference() {
    let ws = Ws::new();
    ws.write("p.yaml", P);
    ws.ok(&["run", "p.yaml"]);
    let first = ws.objects();
    assert_eq!(first.len(), 3);
    ws.ok(&["run", "p.yaml", "--set", "vars.n=2"]);
    assert_eq!(ws.objects().len(), 5);
    let o = ws.ok(&["gc", "--dry-run"]);
    assert!(o.stdout.starts_with("would free"), "{o:?}");
    assert_eq!(ws.objects().len(), 5);
    let o = ws.ok(&["gc"]);
    assert!(o.stdout.contains("in 2 object(s)"), "{o:?}");
    assert!(o.stdout.contains("kept 3 object(s) referenced by 1 lock file(s)"), "{o:?}");
    let o = ws.ok(&["run", "p.yaml", "--set", "vars.n=2"]);
    assert_eq!(o.cached(), ["a", "b", "r"]);
    // The old results are gone: going back reruns a and b.
    let o = ws.ok(&["run", "p.yaml"]);
    assert_eq!(o.ran(), ["a", "b"]);
    // --keep-last keeps recent runs beyond the lock.
    ws.ok(&["run", "p.yaml", "--set", "vars.n=3"]);
    let o = ws.ok(&["gc", "--keep-last", "10"]);
    assert!(o.stdout.contains("in 0 object(s)"), "{o:?}");
}
