//! Crash safety, Ctrl-C, concurrent runs.

use std::process::Stdio;

use crate::common::*;

/// The stage waits while the workspace file `slow` exists (not part of its
/// key), so a test can hold it mid-run and later let it finish.
const SLOW: &str = "stages:\n  s:\n    kind: command\n    cmd: echo $$ > sh.pid; echo started >> started.log; echo partial > $PIPE_OUT/x; while [ -f slow ]; do sleep 0.05; done; echo done > $PIPE_OUT/x\n    outs: [x]\n  t:\n    kind: command\n    inputs: {s: s}\n    cmd: cat $PIPE_IN_S/x > $PIPE_OUT/y\n";

fn started(ws: &Ws) -> usize {
    fs_err::read_to_string(ws.path().join("started.log")).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn kill_9_mid_stage_leaves_the_store_consistent() {
    let ws = Ws::new();
    ws.write("p.yaml", SLOW);
    ws.write("slow", "");
    let mut child = ws.cmd(&["run", "p.yaml"]).stderr(Stdio::null()).spawn().unwrap();
    wait_for(20, "the stage to start", || started(&ws) == 1);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(ws.objects().is_empty(), "nothing partial published");
    let st = ws.status_json("p.yaml");
    assert_eq!(st["stages"][0]["state"], "never_run", "the lock of the killed run is not held: {st}");
    fs_err::remove_file(ws.path().join("slow")).unwrap();
    let o = ws.ok(&["run", "p.yaml"]);
    assert_eq!(o.ran(), ["s", "t"]);
    assert_eq!(fs_err::read_to_string(ws.out_path("p.yaml", "t").join("y")).unwrap(), "done\n");
    ws.ok(&["verify", "p.yaml"]);
}

#[test]
fn ctrl_c_stops_the_command_and_publishes_nothing() {
    interrupt(libc::SIGINT);
}

#[test]
fn sigterm_stops_the_command_and_publishes_nothing() {
    interrupt(libc::SIGTERM);
}

fn interrupt(signal: i32) {
    let ws = Ws::new();
    ws.write("p.yaml", SLOW);
    ws.write("slow", "");
    let child = ws.cmd(&["run", "p.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(20, "the stage to start", || started(&ws) == 1);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let o: Out = child.wait_with_output().unwrap().into();
    assert_eq!(o.code, 130, "{o:?}");
    assert!(o.stderr.contains("pipe: stopping"), "{o:?}");
    assert!(ws.objects().is_empty(), "{o:?}");
    assert!(fs_err::read_dir(ws.path().join(".pipe/tmp")).unwrap().next().is_none(), "cancelled work dirs are removed");
    // The command was stopped with pipe: its shell is gone although `slow` still exists.
    let pid: i32 = ws.read("sh.pid").trim().parse().unwrap();
    // SAFETY: signal 0 only checks whether the process exists.
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "the command's shell still runs");
}

#[test]
fn a_second_run_waits_for_the_first_and_reuses_its_result() {
    let ws = Ws::new();
    ws.write("p.yaml", SLOW);
    ws.write("slow", "");
    let first = ws.cmd(&["run", "p.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(20, "the first run to start", || started(&ws) == 1);
    let second = ws.cmd(&["run", "p.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(20, "status to show the stage running", || ws.status_json("p.yaml")["stages"][0]["state"] == "running");
    std::thread::sleep(std::time::Duration::from_millis(300));
    fs_err::remove_file(ws.path().join("slow")).unwrap();
    let a: Out = first.wait_with_output().unwrap().into();
    let b: Out = second.wait_with_output().unwrap().into();
    assert_eq!(a.code, 0, "{a:?}");
    assert_eq!(b.code, 0, "{b:?}");
    assert!(b.stderr.contains("pipe: s: waiting: another `pipe run` is running this stage (pid "), "{b:?}");
    assert!(b.cached().contains(&"s".to_string()), "{b:?}");
    assert_eq!(started(&ws), 1, "the stage ran once");
}
