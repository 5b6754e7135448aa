//! Every pipeline-file error, rendered with file:line:col, the line and a hint (exit 2).

use crate::common::*;

fn err(yaml: &str) -> String {
    let ws = Ws::new();
    ws.write("p.yaml", yaml);
    ws.write("params.yaml", "lr: 0.1\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stdout.is_empty());
    o.stderr.replace(&ws.path().display().to_string(), "[WS]")
}

#[test]
fn unknown_field_with_did_you_mean() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: command\n    cmd: echo\n    outz: [a]\n"));
}

#[test]
fn wrong_type() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: command\n    cmd: echo\n    outs: 3\n"));
}

#[test]
fn input_names_unknown_stage() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: command\n    cmd: echo\n  use:\n    kind: command\n    inputs: {data: gne}\n    cmd: echo\n"));
}

#[test]
fn missing_dep_file() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: command\n    cmd: echo\n    deps: [gen.py]\n"));
}

#[test]
fn unknown_kind() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: comand\n    cmd: echo\n"));
}

#[test]
fn command_of_the_wrong_shape() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: command\n    cmd: {run: x}\n"));
}

#[test]
fn dependency_cycle() {
    insta::assert_snapshot!(err(
        "stages:\n  a:\n    kind: command\n    inputs: {x: c}\n    cmd: echo\n  b:\n    kind: command\n    inputs: {x: a}\n    cmd: echo\n  c:\n    kind: command\n    inputs: {x: b}\n    cmd: echo\n"
    ));
}

#[test]
fn unknown_var() {
    insta::assert_snapshot!(err("vars:\n  lr: 1\nstages:\n  gen:\n    kind: command\n    cmd: echo ${vars.lf}\n"));
}

#[test]
fn bad_yaml() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: command\n   cmd: echo\n"));
}

#[test]
fn missing_field_and_several_errors_at_once() {
    insta::assert_snapshot!(err("stages:\n  gen:\n    kind: command\n  two:\n    kind: commandd\n"));
}

#[test]
fn unknown_top_level_field() {
    insta::assert_snapshot!(err("stage:\n  gen:\n    kind: command\n"));
}

#[test]
fn params_files_feed_vars_and_errors_point_into_them() {
    let ws = Ws::new();
    ws.write("params.yaml", "n: 5\nnested: {m: x}\n");
    ws.write("p.yaml", "params: [params.yaml]\nvars: {n: 1}\nstages:\n  s:\n    kind: command\n    cmd: echo ${vars.n} ${vars.nested.m} > $PIPE_OUT/o\n");
    ws.ok(&["run", "p.yaml"]);
    assert_eq!(fs_err::read_to_string(ws.out_path("p.yaml", "s").join("o")).unwrap(), "5 x\n");
    ws.ok(&["run", "p.yaml", "--set", "vars.n=9"]);
    assert_eq!(fs_err::read_to_string(ws.out_path("p.yaml", "s").join("o")).unwrap(), "9 x\n");
    ws.write("params.yaml", "n: [unclosed\n");
    let o = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("--> "), "{o:?}");
    assert!(o.stderr.contains("params.yaml:"), "{o:?}");
    let o = ws.pipe(&["run", "p.yaml", "--set", "n=3"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("only vars can be set"), "{o:?}");
}

#[test]
fn missing_pipeline_file() {
    let ws = Ws::new();
    let o = ws.pipe(&["run", "nope.yaml"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("nope.yaml"), "{o:?}");
}
