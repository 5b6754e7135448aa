//! Pipeline files: raw YAML -> [`PipelineSpec`] with `vars` interpolated and
//! every stage's params kept with source locations.
//!
//! ```yaml
//! params: [params.yaml]   # optional: YAML files whose keys are merged into vars
//! vars: {n: 3}            # defaults; params files override, `--set vars.n=4` overrides both
//! stages:
//!   gen: {kind: command, cmd: "echo ${vars.n} > $PIPE_OUT/n", outs: [n]}
//! ```
//!
//! `${vars.a.b}` alone in a scalar takes the var's value with its type;
//! inside a longer string it is substituted as text. Other `${...}` (shell
//! variables) are left alone.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::diag::{did_you_mean, Diagnostic, Loc, Sources, SpecErrors};
use crate::yaml::{self, YNode, YVal};

#[derive(Clone, Debug)]
pub struct InputSpec {
    /// Name inside the stage (`$PIPE_IN_<NAME>`).
    pub name: String,
    pub stage: String,
    /// Path inside the upstream output ("" for the whole artifact).
    pub subpath: String,
    pub loc: Loc,
}

#[derive(Clone, Debug)]
pub struct StageSpec {
    pub name: String,
    pub name_loc: Loc,
    pub kind: String,
    pub kind_loc: Loc,
    pub inputs: Vec<InputSpec>,
    /// The stage's own fields (all but `kind` and `inputs`), interpolated.
    pub params: Value,
    /// The interpolated stage mapping, for locating errors in params.
    pub node: YNode,
}

pub struct PipelineSpec {
    pub path: PathBuf,
    pub sources: Sources,
    pub vars: Value,
    pub stages: Vec<StageSpec>,
}

/// A `--set vars.x=value` override.
#[derive(Clone, Debug)]
pub struct VarOverride {
    pub path: Vec<String>,
    pub value: Value,
}

impl std::str::FromStr for VarOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE (e.g. vars.lr=0.001)"))?;
        let k = k.trim();
        let rest =
            k.strip_prefix("vars.").ok_or_else(|| format!("`{k}`: only vars can be set (write `vars.{k}=...`)"))?;
        let path: Vec<String> = rest.split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("`{k}` is not a valid var path"));
        }
        // The value is read as YAML, so `3` is a number and `"3"` a string.
        let value = match yaml::parse(0, &format!("v: {v}")) {
            Ok(n) => n.get("v").map(YNode::to_json).unwrap_or(Value::Null),
            Err(_) => Value::String(v.to_string()),
        };
        Ok(VarOverride { path, value })
    }
}

pub fn load(path: &Path, overrides: &[VarOverride]) -> Result<PipelineSpec, SpecErrors> {
    let mut sources = Sources::default();
    let text = fs_err::read_to_string(path).map_err(|e| {
        SpecErrors(vec![Diagnostic::new(format!("cannot read pipeline file: {e}"), None)
            .hint("pass the pipeline file as the first argument, e.g. `pipe run pipelines/example.yaml`")])
    })?;
    let file = sources.add(path.to_path_buf(), text.clone());
    let fail = |d: Diagnostic, s: &Sources| SpecErrors(vec![d.render(s)]);
    let root = yaml::parse(file, &text).map_err(|d| fail(d, &sources))?;
    let YVal::Map(top) = &root.val else {
        return Err(fail(
            Diagnostic::new("the pipeline file must be a YAML mapping", Some(root.loc)).hint("start with `stages:`"),
            &sources,
        ));
    };

    let mut errors = Vec::new();
    for (k, kl, _) in top {
        if !["vars", "params", "stages"].contains(&k.as_str()) {
            errors.push(
                Diagnostic::new(format!("unknown top-level field `{k}`"), Some(*kl)).maybe_hint(
                    did_you_mean(k, ["vars", "params", "stages"])
                        .or_else(|| Some("top-level fields are `vars`, `params` and `stages`".into())),
                ),
            );
        }
    }

    // vars: inline defaults, then params files, then --set.
    let mut vars = YNode { loc: root.loc, val: YVal::Map(Vec::new()) };
    if let Some(v) = root.get("vars") {
        match &v.val {
            YVal::Map(_) => vars = v.clone(),
            YVal::Scalar(Value::Null) => {}
            _ => errors.push(
                Diagnostic::new(format!("`vars` must be a mapping, found {}", v.kind_name()), Some(v.loc))
                    .hint("write `vars:` followed by indented `name: value` lines"),
            ),
        }
    }
    if let Some(p) = root.get("params") {
        let files: Vec<&YNode> = match &p.val {
            YVal::Seq(s) => s.iter().collect(),
            YVal::Scalar(Value::String(_)) => vec![p],
            _ => {
                errors.push(
                    Diagnostic::new("`params` must be a list of YAML files", Some(p.loc))
                        .hint("e.g. `params: [params.yaml]` (paths relative to the pipeline file)"),
                );
                vec![]
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        for f in files {
            let YVal::Scalar(Value::String(rel)) = &f.val else {
                errors.push(Diagnostic::new("params file names must be strings", Some(f.loc)));
                continue;
            };
            let fp = base.join(rel);
            match fs_err::read_to_string(&fp) {
                Err(e) => errors.push(
                    Diagnostic::new(format!("cannot read params file `{rel}`: {e}"), Some(f.loc))
                        .hint("params files are resolved relative to the pipeline file"),
                ),
                Ok(t) => {
                    let id = sources.add(fp.clone(), t.clone());
                    match yaml::parse(id, &t) {
                        Err(d) => errors.push(d),
                        Ok(n) if matches!(n.val, YVal::Map(_)) => merge_into(&mut vars, n),
                        Ok(n) => errors.push(Diagnostic::new(
                            format!("params file must be a mapping, found {}", n.kind_name()),
                            Some(n.loc),
                        )),
                    }
                }
            }
        }
    }
    for o in overrides {
        let loc = Loc::default();
        let mut node = YNode::from_json(&o.value, loc);
        for k in o.path.iter().rev() {
            node = YNode { loc, val: YVal::Map(vec![(k.clone(), loc, node)]) };
        }
        merge_into(&mut vars, node);
    }

    let mut stages = Vec::new();
    match root.get("stages") {
        None => errors.push(
            Diagnostic::new("the pipeline has no `stages:`", None)
                .hint("add `stages:` with at least one stage, e.g. `hello: {kind: command, cmd: \"echo hi\"}`"),
        ),
        Some(s) => match &s.val {
            YVal::Map(list) => {
                for (name, name_loc, node) in list {
                    match stage_spec(name, *name_loc, node, &vars) {
                        Ok(st) => stages.push(st),
                        Err(mut e) => errors.append(&mut e),
                    }
                }
            }
            _ => errors.push(
                Diagnostic::new(
                    format!("`stages` must be a mapping of named stages, found {}", s.kind_name()),
                    Some(s.loc),
                )
                .hint("write each stage as `name:` followed by its indented fields"),
            ),
        },
    }
    if !errors.is_empty() {
        return Err(SpecErrors(errors.into_iter().map(|d| d.render(&sources)).collect()));
    }
    Ok(PipelineSpec { path: path.to_path_buf(), sources, vars: vars.to_json(), stages })
}

/// Deep-merge `over` into `base` (maps merge, anything else replaces).
fn merge_into(base: &mut YNode, over: YNode) {
    match (&mut base.val, over.val) {
        (YVal::Map(b), YVal::Map(o)) => {
            for (k, kl, v) in o {
                match b.iter_mut().find(|(bk, _, _)| *bk == k) {
                    Some((_, _, bv)) => merge_into(bv, v),
                    None => b.push((k, kl, v)),
                }
            }
        }
        (_, v) => {
            base.val = v;
            base.loc = over.loc;
        }
    }
}

fn stage_spec(name: &str, name_loc: Loc, node: &YNode, vars: &YNode) -> Result<StageSpec, Vec<Diagnostic>> {
    if !valid_name(name) {
        return Err(vec![Diagnostic::new(format!("invalid stage name `{name}`"), Some(name_loc))
            .hint("stage names use letters, digits, `_` and `-`")]);
    }
    let mut errors = Vec::new();
    let node = interpolate(node, vars, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let YVal::Map(fields) = &node.val else {
        return Err(vec![Diagnostic::new(
            format!("stage `{name}` must be a mapping, found {}", node.kind_name()),
            Some(node.loc),
        )
        .hint("a stage needs at least `kind:`, e.g. `kind: command`")]);
    };
    let (kind, kind_loc) = match node.get("kind") {
        Some(YNode { loc, val: YVal::Scalar(Value::String(k)) }) => (k.clone(), *loc),
        Some(other) => {
            return Err(vec![Diagnostic::new(
                format!("`kind` of stage `{name}` must be a string, found {}", other.kind_name()),
                Some(other.loc),
            )])
        }
        None => {
            return Err(vec![Diagnostic::new(format!("stage `{name}` has no `kind`"), Some(name_loc))
                .hint("add e.g. `kind: command`")])
        }
    };
    let mut inputs = Vec::new();
    if let Some(inp) = node.get("inputs") {
        match &inp.val {
            YVal::Map(m) => {
                for (iname, iloc, v) in m {
                    match &v.val {
                        YVal::Scalar(Value::String(r)) => {
                            let (stage, sub) = r.split_once('/').unwrap_or((r.as_str(), ""));
                            if !valid_name(iname) {
                                errors.push(
                                    Diagnostic::new(format!("invalid input name `{iname}`"), Some(*iloc)).hint(
                                        "input names use letters, digits, `_` and `-` (they become $PIPE_IN_<NAME>)",
                                    ),
                                );
                            }
                            inputs.push(InputSpec {
                                name: iname.clone(),
                                stage: stage.to_string(),
                                subpath: sub.trim_matches('/').to_string(),
                                loc: v.loc,
                            });
                        }
                        _ => errors.push(Diagnostic::new(
                            format!(
                                "input `{iname}` must be a stage name (optionally `stage/sub/path`), found {}",
                                v.kind_name()
                            ),
                            Some(v.loc),
                        )),
                    }
                }
            }
            _ => errors.push(
                Diagnostic::new(format!("`inputs` must be a mapping, found {}", inp.kind_name()), Some(inp.loc))
                    .hint("write `inputs: {data: other_stage}`"),
            ),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let params = Value::Object(
        fields
            .iter()
            .filter(|(k, _, _)| k != "kind" && k != "inputs")
            .map(|(k, _, v)| (k.clone(), v.to_json()))
            .collect(),
    );
    Ok(StageSpec { name: name.to_string(), name_loc, kind, kind_loc, inputs, params, node })
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn interpolate(node: &YNode, vars: &YNode, errors: &mut Vec<Diagnostic>) -> YNode {
    match &node.val {
        YVal::Scalar(Value::String(s)) if s.contains("${vars.") => {
            interpolate_str(s, node.loc, vars, errors).unwrap_or_else(|| node.clone())
        }
        YVal::Scalar(_) => node.clone(),
        YVal::Seq(s) => {
            YNode { loc: node.loc, val: YVal::Seq(s.iter().map(|n| interpolate(n, vars, errors)).collect()) }
        }
        YVal::Map(m) => YNode {
            loc: node.loc,
            val: YVal::Map(m.iter().map(|(k, kl, v)| (k.clone(), *kl, interpolate(v, vars, errors))).collect()),
        },
    }
}

fn interpolate_str(s: &str, loc: Loc, vars: &YNode, errors: &mut Vec<Diagnostic>) -> Option<YNode> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${vars.") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            errors.push(Diagnostic::new("unterminated `${vars.` reference", Some(loc)).hint("close it with `}`"));
            return None;
        };
        let expr = &after[..end];
        let path: Vec<&str> = expr["vars.".len()..].split('.').collect();
        let mut cur = vars;
        for (i, seg) in path.iter().enumerate() {
            match cur.get(seg) {
                Some(n) => cur = n,
                None => {
                    let names: Vec<String> = match &cur.val {
                        YVal::Map(m) => m.iter().map(|(k, _, _)| k.clone()).collect(),
                        _ => vec![],
                    };
                    let so_far = format!("vars.{}", path[..=i].join("."));
                    let hint = did_you_mean(seg, names.iter().map(String::as_str)).or_else(|| {
                        Some(if names.is_empty() {
                            "define it under `vars:` or pass `--set vars.NAME=VALUE`".into()
                        } else {
                            format!("defined here: {}", names.join(", "))
                        })
                    });
                    errors.push(Diagnostic::new(format!("unknown variable `{so_far}`"), Some(loc)).maybe_hint(hint));
                    return None;
                }
            }
        }
        let whole = start == 0 && end + 3 == rest.len() && out.is_empty();
        if whole {
            return Some(YNode { loc, val: cur.val.clone() });
        }
        match &cur.val {
            YVal::Scalar(Value::String(v)) => out.push_str(v),
            YVal::Scalar(Value::Null) => {}
            YVal::Scalar(v) => out.push_str(&v.to_string()),
            _ => {
                errors.push(
                    Diagnostic::new(
                        format!("`${{{expr}}}` is {} and cannot be part of a string", cur.kind_name()),
                        Some(loc),
                    )
                    .hint("use it alone as the whole value, or reference one of its scalar fields"),
                );
                return None;
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(YNode { loc, val: YVal::Scalar(Value::String(out)) })
}
