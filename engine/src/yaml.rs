//! YAML with source locations. Parsed with `marked-yaml` (a maintained,
//! span-keeping loader on yaml-rust2), then converted to [`YNode`]: a tree
//! whose scalars are already typed (YAML 1.2 core schema for plain scalars,
//! strings for quoted ones) and whose every node and map key keeps its [`Loc`].

use marked_yaml::types::{MarkedScalarNode, Node};
use serde_json::Value;

use crate::diag::{Diagnostic, Loc};

#[derive(Clone, Debug)]
pub struct YNode {
    pub loc: Loc,
    pub val: YVal,
}

#[derive(Clone, Debug)]
pub enum YVal {
    Scalar(Value),
    Seq(Vec<YNode>),
    /// Keys keep their own location (for "unknown field" errors).
    Map(Vec<(String, Loc, YNode)>),
}

/// One step of a path into a value: a map key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl YNode {
    pub fn get(&self, key: &str) -> Option<&YNode> {
        match &self.val {
            YVal::Map(m) => m.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    pub fn key_loc(&self, key: &str) -> Option<Loc> {
        match &self.val {
            YVal::Map(m) => m.iter().find(|(k, _, _)| k == key).map(|(_, l, _)| *l),
            _ => None,
        }
    }

    pub fn to_json(&self) -> Value {
        match &self.val {
            YVal::Scalar(v) => v.clone(),
            YVal::Seq(s) => Value::Array(s.iter().map(YNode::to_json).collect()),
            YVal::Map(m) => Value::Object(m.iter().map(|(k, _, v)| (k.clone(), v.to_json())).collect()),
        }
    }

    /// A node built from a JSON value (e.g. a `--set` override), located at `loc`.
    pub fn from_json(v: &Value, loc: Loc) -> YNode {
        let val = match v {
            Value::Array(a) => YVal::Seq(a.iter().map(|x| YNode::from_json(x, loc)).collect()),
            Value::Object(o) => YVal::Map(o.iter().map(|(k, x)| (k.clone(), loc, YNode::from_json(x, loc))).collect()),
            other => YVal::Scalar(other.clone()),
        };
        YNode { loc, val }
    }

    /// The best location for an error at `path`: the deepest node that exists;
    /// for a key that does exist as a map key, the key itself when `at_key`.
    pub fn locate(&self, path: &[Seg], at_key: bool) -> Loc {
        let mut node = self;
        for (i, seg) in path.iter().enumerate() {
            let next = match (seg, &node.val) {
                (Seg::Key(k), YVal::Map(m)) => m.iter().find(|(mk, _, _)| mk == k).map(|(_, kl, v)| {
                    if at_key && i + 1 == path.len() {
                        (Some(*kl), v)
                    } else {
                        (None, v)
                    }
                }),
                (Seg::Index(j), YVal::Seq(s)) => s.get(*j).map(|v| (None, v)),
                _ => None,
            };
            match next {
                Some((Some(kl), _)) => return kl,
                Some((None, v)) => node = v,
                None => break,
            }
        }
        node.loc
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.val {
            YVal::Map(_) => "a mapping",
            YVal::Seq(_) => "a list",
            YVal::Scalar(Value::String(_)) => "a string",
            YVal::Scalar(Value::Number(_)) => "a number",
            YVal::Scalar(Value::Bool(_)) => "a boolean",
            YVal::Scalar(_) => "null",
        }
    }
}

/// Parse YAML text from source `file` into a [`YNode`].
pub fn parse(file: usize, text: &str) -> Result<YNode, Diagnostic> {
    let opts = marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true).prevent_coercion(true);
    let node = marked_yaml::parse_yaml_with_options(file, text, opts).map_err(|e| load_error(file, text, e))?;
    Ok(convert(file, &node))
}

fn load_error(file: usize, _text: &str, e: marked_yaml::LoadError) -> Diagnostic {
    use marked_yaml::LoadError as E;
    let (m, msg, hint) = match &e {
        E::TopLevelMustBeMapping(m) => {
            (*m, "the file must be a YAML mapping".to_string(), Some("start with `stages:`"))
        }
        E::TopLevelMustBeSequence(m) => (*m, "expected a YAML list".into(), None),
        E::UnexpectedAnchor(m) => (
            *m,
            "YAML anchors and aliases are not supported".into(),
            Some("use `vars:` and `${vars.x}` to share values"),
        ),
        E::MappingKeyMustBeScalar(m) => (*m, "mapping keys must be plain strings".into(), None),
        E::UnexpectedTag(m) => (*m, "YAML tags (`!foo`) are not supported".into(), None),
        E::ScanError(m, s) => {
            (*m, format!("invalid YAML: {}", s.info()), Some("check indentation and quoting on this line"))
        }
        E::DuplicateKey(inner) => {
            let k = &inner.key;
            let m = k.span().start().copied().unwrap_or_else(|| marked_yaml::Marker::new(file, 0, 1, 1));
            (m, format!("duplicate key `{}`", k.as_str()), Some("each key may appear once in a mapping"))
        }
        // LoadError is non-exhaustive in spirit; render anything new as text.
        #[allow(unreachable_patterns)]
        _ => (marked_yaml::Marker::new(file, 0, 1, 1), e.to_string(), None),
    };
    let d = Diagnostic::new(msg, Some(Loc { file, line: m.line(), col: m.column(), len: 1 }));
    match hint {
        Some(h) => d.hint(h),
        None => d,
    }
}

fn loc_of(file: usize, span: &marked_yaml::Span, len: usize) -> Loc {
    match span.start() {
        Some(m) => Loc { file, line: m.line(), col: m.column(), len },
        None => Loc { file, line: 0, col: 0, len },
    }
}

fn convert(file: usize, node: &Node) -> YNode {
    match node {
        Node::Scalar(s) => {
            YNode { loc: loc_of(file, s.span(), s.as_str().chars().count().max(1)), val: YVal::Scalar(scalar_value(s)) }
        }
        Node::Sequence(seq) => {
            YNode { loc: loc_of(file, seq.span(), 1), val: YVal::Seq(seq.iter().map(|n| convert(file, n)).collect()) }
        }
        Node::Mapping(map) => YNode {
            loc: loc_of(file, map.span(), 1),
            val: YVal::Map(
                map.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            loc_of(file, k.span(), k.as_str().chars().count().max(1)),
                            convert(file, v),
                        )
                    })
                    .collect(),
            ),
        },
    }
}

/// YAML 1.2 core schema for plain scalars; quoted scalars stay strings.
fn scalar_value(s: &MarkedScalarNode) -> Value {
    let t = s.as_str();
    if !s.may_coerce() {
        return Value::String(t.to_string());
    }
    match t {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = t.parse::<i64>() {
        return Value::from(i);
    }
    let looks_numeric = t.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && t.chars().any(|c| c.is_ascii_digit());
    if looks_numeric {
        if let Ok(f) = t.parse::<f64>() {
            if let Some(n) = serde_json::Number::from_f64(f) {
                return Value::Number(n);
            }
        }
    }
    Value::String(t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_scalars_and_locations() {
        let y = parse(0, "a: 1\nb: '1'\nc: [x, 2.5, true, ~]\nd:\n  e: hi\n").unwrap();
        let j = y.to_json();
        assert_eq!(j, serde_json::json!({"a": 1, "b": "1", "c": ["x", 2.5, true, null], "d": {"e": "hi"}}));
        let l = y.locate(&[Seg::Key("d".into()), Seg::Key("e".into())], false);
        assert_eq!((l.line, l.col), (5, 6));
        let k = y.locate(&[Seg::Key("d".into()), Seg::Key("e".into())], true);
        assert_eq!((k.line, k.col), (5, 3));
    }
}
