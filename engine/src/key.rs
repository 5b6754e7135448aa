//! Stage keys. Everything that goes into a key is one struct, [`KeyInputs`],
//! serialised canonically (JSON with sorted maps) and hashed with BLAKE3
//! under a versioned domain. `-vv` prints it; `status` diffs two of them to
//! say why a stage is stale.

use std::collections::BTreeMap;

use pipe_cache::Digest;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bump when the serialisation or meaning of [`KeyInputs`] changes.
pub const KEY_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InputKey {
    pub stage: String,
    /// Sub-path inside the upstream artifact ("" for all of it).
    pub path: String,
    pub digest: Digest,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct KeyInputs {
    pub format: u32,
    pub kind: String,
    pub kind_version: u32,
    /// The stage's resolved fields (vars interpolated).
    pub params: Value,
    /// Workspace files the stage reads, by content digest.
    pub files: BTreeMap<String, Digest>,
    pub inputs: BTreeMap<String, InputKey>,
    /// Declared environment parts (device class, precision).
    pub env: BTreeMap<String, String>,
    /// Facts resolved outside the workspace (hub revisions), see `Stage::pins`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pins: BTreeMap<String, String>,
}

impl KeyInputs {
    pub fn key(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"pipe-stage-key\0");
        h.update(&canonical_json(&serde_json::to_value(self).expect("KeyInputs serialises")));
        h.finalize().into()
    }
}

/// JSON with object keys sorted at every level, no whitespace.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(o) => {
                let sorted: BTreeMap<&String, Value> = o.iter().map(|(k, v)| (k, sort(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_vec(&sort(v)).expect("JSON serialises")
}

/// Human reasons why `new` differs from `old`, most fundamental first.
pub fn explain(old: &KeyInputs, new: &KeyInputs) -> Vec<String> {
    let mut r = Vec::new();
    if old.format != new.format {
        r.push(format!("key format {} -> {}", old.format, new.format));
    }
    if old.kind != new.kind {
        r.push(format!("kind {} -> {}", old.kind, new.kind));
    } else if old.kind_version != new.kind_version {
        r.push(format!("kind version {} -> {}", old.kind_version, new.kind_version));
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &old.params, &mut a);
    flatten("", &new.params, &mut b);
    for k in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        match (a.get(k), b.get(k)) {
            (Some(Value::String(x)), Some(Value::String(y))) if x != y => {
                let (x, y) = diff_window(x, y);
                r.push(format!("param {k}: {x} -> {y}"))
            }
            (Some(x), Some(y)) if x != y => r.push(format!("param {k}: {} -> {}", show(x), show(y))),
            (Some(x), None) => r.push(format!("param {k}: {} -> (unset)", show(x))),
            (None, Some(y)) => r.push(format!("param {k}: (unset) -> {}", show(y))),
            _ => {}
        }
    }
    for (k, d) in &new.files {
        match old.files.get(k) {
            None => r.push(format!("file {k} added")),
            Some(o) if o != d => r.push(format!("file {k} changed")),
            _ => {}
        }
    }
    for k in old.files.keys().filter(|k| !new.files.contains_key(*k)) {
        r.push(format!("file {k} removed"));
    }
    for (k, i) in &new.inputs {
        match old.inputs.get(k) {
            None => r.push(format!("input {k} added ({})", i.stage)),
            Some(o) if o.stage != i.stage || o.path != i.path => {
                r.push(format!("input {k}: {} -> {}", show_input(o), show_input(i)))
            }
            Some(o) if o.digest != i.digest => {
                r.push(format!("input {k} changed (digest {}.. -> {}..)", &o.digest.hex()[..4], &i.digest.hex()[..4]))
            }
            _ => {}
        }
    }
    for k in old.inputs.keys().filter(|k| !new.inputs.contains_key(*k)) {
        r.push(format!("input {k} removed"));
    }
    for k in old.env.keys().chain(new.env.keys().filter(|k| !old.env.contains_key(*k))) {
        if old.env.get(k) != new.env.get(k) {
            let s = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            r.push(format!("env {k}: {} -> {}", s(old.env.get(k)), s(new.env.get(k))));
        }
    }
    for k in old.pins.keys().chain(new.pins.keys().filter(|k| !old.pins.contains_key(*k))) {
        if old.pins.get(k) != new.pins.get(k) {
            let s = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            r.push(format!("{k}: {} -> {}", s(old.pins.get(k)), s(new.pins.get(k))));
        }
    }
    r
}

fn show_input(i: &InputKey) -> String {
    if i.path.is_empty() {
        i.stage.clone()
    } else {
        format!("{}/{}", i.stage, i.path)
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, x) in o {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&p, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Two long strings shown around where they differ: `"…--n 3 >…" -> "…--n 4 >…"`.
fn diff_window(a: &str, b: &str) -> (String, String) {
    if a.chars().count() <= 40 && b.chars().count() <= 40 {
        return (format!("{a:?}"), format!("{b:?}"));
    }
    let (ac, bc): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let pre = ac.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    let suf = ac[pre..].iter().rev().zip(bc[pre..].iter().rev()).take_while(|(x, y)| x == y).count();
    let cut = |c: &[char]| {
        let start = pre.saturating_sub(12);
        let end = (c.len() - suf + 12).min(c.len());
        let mid: String = c[start..end].iter().collect();
        let mid = format!("{mid:?}");
        let mid = &mid[1..mid.len() - 1];
        format!("\"{}{mid}{}\"", if start > 0 { "…" } else { "" }, if end < c.len() { "…" } else { "" })
    };
    (cut(&ac), cut(&bc))
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ki(params: Value) -> KeyInputs {
        KeyInputs {
            format: KEY_FORMAT,
            kind: "command".into(),
            kind_version: 1,
            params,
            files: BTreeMap::new(),
            inputs: BTreeMap::new(),
            env: BTreeMap::new(),
            pins: BTreeMap::new(),
        }
    }

    #[test]
    fn key_ignores_map_order_and_sees_values() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"x":1,"y":2}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"y":2,"x":1},"a":1}"#).unwrap();
        assert_eq!(ki(a.clone()).key(), ki(b).key());
        assert_ne!(ki(a).key(), ki(json!({"a": 2, "b": {"x": 1, "y": 2}})).key());
    }

    #[test]
    fn explains_nested_param_and_version_changes() {
        let old = ki(json!({"lora": {"r": 16}, "cmd": "x"}));
        let mut new = ki(json!({"lora": {"r": 32}, "cmd": "x"}));
        new.kind_version = 2;
        assert_eq!(explain(&old, &new), vec!["kind version 1 -> 2", "param lora.r: 16 -> 32"]);
        let a = ki(json!({"cmd": "python3 pipelines/example/gen.py --n 3 > $PIPE_OUT/data.txt"}));
        let b = ki(json!({"cmd": "python3 pipelines/example/gen.py --n 4 > $PIPE_OUT/data.txt"}));
        assert_eq!(
            explain(&a, &b),
            vec![r#"param cmd: "…/gen.py --n 3 > $PIPE_OUT…" -> "…/gen.py --n 4 > $PIPE_OUT…""#]
        );
    }
}
