//! Edit-and-rerun behaviour, parallelism, status, show.

use crate::common::*;

/// a -> b -> c, plus an independent d.
const CHAIN: &str = r#"
vars:
  msg: hello
stages:
  a:
    kind: command
    cmd: echo ${vars.msg} > $PIPE_OUT/a.txt
    outs: [a.txt]
  b:
    kind: command
    inputs: {a: a}
    cmd: tr a-z A-Z < $PIPE_IN_A/a.txt > $PIPE_OUT/b.txt
    outs: [b.txt]
  c:
    kind: command
    inputs: {b: b/b.txt}
    cmd: wc -c < $PIPE_IN_B > $PIPE_OUT/c.txt
    outs: [c.txt]
  d:
    kind: command
    cmd: cat data/d.txt > $PIPE_OUT/d.txt
    deps: [data/d.txt]
    outs: [d.txt]
"#;

fn chain() -> Ws {
    let ws = Ws::new();
    ws.write("p.yaml", CHAIN);
    ws.write("data/d.txt", "dee\n");
    ws
}

#[test]
fn first_run_then_everything_cached() {
    let ws = chain();
    let o = ws.ok(&["run", "p.yaml"]);
    assert_eq!(o.ran(), ["a", "b", "c", "d"]);
    let c = ws.out_path("p.yaml", "c");
    assert_eq!(fs_err::read_to_string(c.join("c.txt")).unwrap().trim(), "6");
    let o = ws.ok(&["run", "p.yaml"]);
    assert!(o.ran().is_empty(), "{o:?}");
    assert_eq!(o.cached(), ["a", "b", "c", "d"]);
    let st = ws.status_json("p.yaml");
    assert_eq!(st["schema"], 1);
    let states: Vec<&str> = st["stages"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["fresh"; 4]);
}

#[test]
fn var_change_reruns_exactly_the_downstream_cone() {
    let ws = chain();
    ws.ok(&["run", "p.yaml"]);
    let o = ws.ok(&["status", "p.yaml", "--set", "vars.msg=bye"]);
    assert!(
        o.stdout
            .contains(r#"a      stale      param cmd: "echo hello > $PIPE_OUT/a.txt" -> "echo bye > $PIPE_OUT/a.txt""#),
        "{o:?}"
    );
    assert!(o.stdout.contains("b      stale      input a is not up to date (stage a)"), "{o:?}");
    assert!(o.stdout.contains("d      fresh"), "{o:?}");
    let o = ws.ok(&["run", "p.yaml", "--set", "vars.msg=bye"]);
    assert_eq!(o.ran(), ["a", "b", "c"]);
    assert_eq!(o.cached(), ["d"]);
    assert!(o.stderr.contains("pipe: b: running (input a changed (digest "), "{o:?}");
}

#[test]
fn identical_output_stops_propagation() {
    let ws = chain();
    ws.ok(&["run", "p.yaml"]);
    // A different command that writes the same bytes.
    ws.write(
        "p.yaml",
        &CHAIN.replace("echo ${vars.msg} > $PIPE_OUT/a.txt", "printf '%s\\n' ${vars.msg} > $PIPE_OUT/a.txt"),
    );
    let o = ws.ok(&["run", "p.yaml"]);
    assert_eq!(o.ran(), ["a"]);
    assert_eq!(o.cached(), ["b", "c", "d"]);
}

#[test]
fn touching_a_file_without_changing_it_reruns_nothing() {
    let ws = chain();
    ws.ok(&["run", "p.yaml"]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    ws.write("data/d.txt", "dee\n");
    let o = ws.ok(&["run", "p.yaml"]);
    assert!(o.ran().is_empty(), "{o:?}");
    // A real change reruns d only, and status says which file.
    ws.write("data/d.txt", "dum\n");
    let s = ws.ok(&["status", "p.yaml"]);
    assert!(s.stdout.contains("d      stale      file data/d.txt changed"), "{s:?}");
    assert_eq!(ws.ok(&["run", "p.yaml"]).ran(), ["d"]);
}

#[test]
fn targets_run_only_their_ancestors_and_dry_run_runs_nothing() {
    let ws = chain();
    let o = ws.ok(&["run", "p.yaml", "b"]);
    assert_eq!(o.ran(), ["a", "b"]);
    let o = ws.ok(&["run", "p.yaml", "--dry-run"]);
    assert!(o.stdout.contains("cached     a"), "{o:?}");
    assert!(o.stdout.contains("would run  c: never run"), "{o:?}");
    assert!(o.stdout.contains("would run  d: never run"), "{o:?}");
    assert!(o.stderr.is_empty(), "dry run runs nothing: {o:?}");
    let o = ws.ok(&["run", "p.yaml", "--force", "a", "a"]);
    assert_eq!(o.ran(), ["a"]);
    let o = ws.pipe(&["run", "p.yaml", "nope"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("unknown stage `nope`"), "{o:?}");
}

#[test]
fn independent_stages_overlap_with_jobs() {
    let ws = Ws::new();
    let stage = |name: &str| {
        format!(
            "  {name}:\n    kind: command\n    cmd: date +%s%N > $PIPE_OUT/start; sleep 0.6; date +%s%N > $PIPE_OUT/end\n    outs: [start, end]\n    params: {{id: {name}}}\n"
        )
    };
    ws.write("p.yaml", &format!("stages:\n{}{}", stage("x"), stage("y")));
    ws.ok(&["run", "p.yaml", "--jobs", "2"]);
    let t = |s: &str, f: &str| -> u128 {
        fs_err::read_to_string(ws.out_path("p.yaml", s).join(f)).unwrap().trim().parse().unwrap()
    };
    // Overlap: each started before the other ended.
    assert!(t("x", "start") < t("y", "end") && t("y", "start") < t("x", "end"), "stages did not overlap");
}

#[test]
fn jobs_one_serialises() {
    let ws = Ws::new();
    let stage = |name: &str| {
        format!("  {name}:\n    kind: command\n    cmd: date +%s%N > $PIPE_OUT/start; sleep 0.2; date +%s%N > $PIPE_OUT/end\n    params: {{id: {name}}}\n")
    };
    ws.write("p.yaml", &format!("stages:\n{}{}", stage("x"), stage("y")));
    ws.ok(&["run", "p.yaml", "--jobs", "1"]);
    let t = |s: &str, f: &str| -> u128 {
        fs_err::read_to_string(ws.out_path("p.yaml", s).join(f)).unwrap().trim().parse().unwrap()
    };
    assert!(t("x", "end") <= t("y", "start") || t("y", "end") <= t("x", "start"));
}

#[test]
fn failed_stage_keeps_log_and_work_dir_and_keep_going_finishes_branches() {
    let ws = Ws::new();
    ws.write(
        "p.yaml",
        r#"
stages:
  bad:
    kind: command
    cmd: echo partial > $PIPE_OUT/x; echo boom >&2; exit 3
  after:
    kind: command
    inputs: {b: bad}
    cmd: "true"
  other:
    kind: command
    cmd: echo ok > $PIPE_OUT/o
"#,
    );
    let o = ws.pipe(&["run", "p.yaml", "--keep-going", "--jobs", "1"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.stderr.contains(
            "pipe: bad: FAILED: command `echo partial > $PIPE_OUT/x; echo boom >&2; exit 3` exited with status 3"
        ),
        "{o:?}"
    );
    assert!(o.stderr.contains("    boom"), "log tail shown: {o:?}");
    assert!(o.stderr.contains("after (upstream stage bad did not finish)"), "{o:?}");
    assert_eq!(o.ran(), ["bad", "other"]);
    let work =
        o.stderr.lines().find_map(|l| l.trim().strip_prefix("work dir kept for inspection: ")).expect("work dir line");
    assert!(std::path::Path::new(work).join("out/x").exists());
    let log = o.stderr.lines().find_map(|l| l.trim().strip_prefix("log: ")).expect("log line");
    assert!(fs_err::read_to_string(log).unwrap().contains("boom"));
    // Only `other` reached the store.
    assert_eq!(ws.objects().len(), 1);
    let st = ws.status_json("p.yaml");
    assert_eq!(st["stages"][0]["name"], "bad");
    assert_eq!(st["stages"][0]["state"], "failed");
    // Without --keep-going the independent stage is not started after a failure.
    let ws2 = Ws::new();
    ws2.write("p.yaml", &ws.read("p.yaml"));
    let o = ws2.pipe(&["run", "p.yaml", "--jobs", "1"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("other (not started: an earlier stage failed"), "{o:?}");
}

#[test]
fn missing_declared_out_fails_the_stage() {
    let ws = Ws::new();
    ws.write(
        "p.yaml",
        "stages:\n  s:\n    kind: command\n    cmd: echo hi > $PIPE_OUT/wrong.txt\n    outs: [right.txt]\n",
    );
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("declared output not produced: right.txt"), "{o:?}");
    assert!(o.stderr.contains("hint: write outputs under $PIPE_OUT"), "{o:?}");
    assert!(ws.objects().is_empty());
}

#[test]
fn command_environment_contract() {
    let ws = Ws::new();
    ws.write(
        "p.yaml",
        r#"
vars: {n: 7}
stages:
  up:
    kind: command
    cmd: echo up > $PIPE_OUT/u
  my-stage:
    kind: command
    inputs: {in-put: up}
    params: {n: "${vars.n}", nested: {k: [1, 2]}}
    env: {GREETING: hi, NUM: 5}
    cmd: [sh, -c, 'cat $PIPE_IN_IN_PUT/u; cat $PIPE_PARAMS; echo $PIPE_STAGE $GREETING $NUM; pwd' ]
"#,
    );
    ws.ok(&["run", "p.yaml"]);
    let log = ws.ok(&["show", "p.yaml", "my-stage", "--log"]).stdout;
    assert!(log.contains("up\n"), "{log}");
    assert!(log.contains("\"n\": 7"), "{log}");
    assert!(log.contains("my-stage hi 5"), "{log}");
    let root = ws.path().canonicalize().unwrap();
    assert!(log.contains(&format!("{}\n", root.display())), "runs in the workspace root: {log}");
}

#[test]
fn gpu_stages_get_a_device_or_fail_clearly() {
    let ws = Ws::new();
    ws.write(
        "p.yaml",
        "stages:\n  g:\n    kind: command\n    gpus: 1\n    cmd: echo $CUDA_VISIBLE_DEVICES > $PIPE_OUT/dev\n",
    );
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("needs 1 GPU(s) but 0 are available"), "{o:?}");
    ws.ok(&["run", "p.yaml", "--gpus", "3,5"]);
    assert_eq!(fs_err::read_to_string(ws.out_path("p.yaml", "g").join("dev")).unwrap().trim(), "3");
}

#[test]
fn show_and_verbose_key_inputs() {
    let ws = chain();
    let o = ws.pipe(&["show", "p.yaml", "a"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("stage `a` has no result yet"), "{o:?}");
    ws.ok(&["run", "p.yaml"]);
    let o = ws.ok(&["show", "p.yaml", "a"]);
    assert!(o.stdout.contains("state:    fresh"), "{o:?}");
    let j: serde_json::Value = serde_json::from_str(&ws.ok(&["show", "p.yaml", "a", "--json"]).stdout).unwrap();
    assert_eq!(j["state"], "fresh");
    let o = ws.ok(&["-vv", "status", "p.yaml"]);
    assert!(o.stderr.contains("key inputs of `a`"), "{o:?}");
    assert!(o.stderr.contains("\"kind_version\": 1"), "{o:?}");
    let o = ws.ok(&["--version"]);
    assert!(o.stdout.starts_with("pipe "), "{o:?}");
}

#[test]
fn default_pipeline_file_is_the_only_one_in_pipelines() {
    let ws = Ws::new();
    ws.write("pipelines/only.yaml", "stages:\n  s:\n    kind: command\n    cmd: echo hi > $PIPE_OUT/x\n");
    assert_eq!(ws.ok(&["run"]).ran(), ["s"]);
    assert!(ws.path().join("pipelines/only.lock").exists());
    ws.write("pipelines/second.yaml", "stages: {}\n");
    let o = ws.pipe(&["status"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("several pipelines in pipelines/"), "{o:?}");
}

#[test]
fn checkout_hardlinks_the_output() {
    let ws = chain();
    ws.ok(&["run", "p.yaml"]);
    ws.ok(&["checkout", "p.yaml", "b", "co"]);
    assert_eq!(ws.read("co/b.txt"), "HELLO\n");
    let o = ws.pipe(&["checkout", "p.yaml", "b", "co"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("already exists"), "{o:?}");
}
