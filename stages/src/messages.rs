//! `messages`: map records to chat conversations or prompt/completion pairs,
//! validating every row.
//!
//! Inputs: exactly one (`inputs: {data: STAGE}`), a dataset output; each of
//! its data files (`data.parquet`, `train.parquet`, `test.parquet`, ...) maps
//! to a file of the same name, so splits carry through.
//! Params: `format: conversation|instruction`; templates over the row's fields
//! (Jinja: `user: "{{ question }}"`, `assistant: "{{ answer }}"`, or
//! `prompt:`/`completion:`); `system:` inline, or `system_file:` (a workspace
//! file, hashed into the key); multi-turn sources with `turns: {field, role,
//! content, roles: {human: user, gpt: assistant}}`; `on_error: fail|skip`;
//! `export: jsonl` also writes `<name>.jsonl` as `datasets`' `to_json()` would.
//! Output: Parquet with a `messages` column (list of `{role, content}`) or
//! `prompt` and `completion` columns, plus `stats.json` (rows in/out, skips by
//! reason with the first examples).
//! Key: all params, the system file's digest, the input digest.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use pipe_engine::stage::{parse_params, FileDep, ParamError, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::table::{self, ParquetOut};

pub struct MessagesKind;

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Conversation,
    Instruction,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum OnError {
    #[default]
    Fail,
    Skip,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Export {
    Jsonl,
}

fn default_role_key() -> String {
    "role".into()
}
fn default_content_key() -> String {
    "content".into()
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Turns {
    field: String,
    #[serde(default = "default_role_key")]
    role: String,
    #[serde(default = "default_content_key")]
    content: String,
    /// Source role name -> system|user|assistant (identity when absent).
    #[serde(default)]
    roles: BTreeMap<String, String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    format: Format,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    system_file: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    assistant: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    completion: Option<String>,
    #[serde(default)]
    turns: Option<Turns>,
    #[serde(default)]
    on_error: OnError,
    #[serde(default)]
    export: Option<Export>,
}

struct MessagesStage {
    p: Params,
}

fn at(k: &str) -> Vec<Seg> {
    vec![Seg::Key(k.into())]
}

impl StageKind for MessagesKind {
    fn name(&self) -> &'static str {
        "messages"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "map records to chat messages or prompt/completion, validating every row"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        if p.system.is_some() && p.system_file.is_some() {
            return Err(ParamError::new(at("system_file"), "give `system` or `system_file`, not both"));
        }
        let env = crate::jinja::environment();
        for (k, v) in [
            ("system", &p.system),
            ("user", &p.user),
            ("assistant", &p.assistant),
            ("prompt", &p.prompt),
            ("completion", &p.completion),
        ] {
            if let Some(t) = v {
                if let Err(e) = env.template_from_str(t) {
                    return Err(ParamError::new(at(k), format!("invalid template: {e}"))
                        .hint("templates are Jinja: `{{ field }}` inserts the row's `field`"));
                }
            }
        }
        match p.format {
            Format::Conversation => {
                if p.prompt.is_some() || p.completion.is_some() {
                    let k = if p.prompt.is_some() { "prompt" } else { "completion" };
                    return Err(ParamError::new(at(k), format!("`{k}` belongs to `format: instruction`"))
                        .hint("for conversations use `user:` and `assistant:` (or `turns:`)"));
                }
                match (&p.turns, p.user.is_some(), p.assistant.is_some()) {
                    (Some(_), false, false) => {}
                    (Some(_), _, _) => {
                        return Err(ParamError::new(
                            at("turns"),
                            "give either `turns:` or `user:`/`assistant:` templates, not both",
                        ))
                    }
                    (None, true, true) => {}
                    (None, _, _) => {
                        let missing = if p.user.is_none() { "user" } else { "assistant" };
                        return Err(ParamError::new(vec![], format!("missing field `{missing}`"))
                            .hint("e.g. `user: \"{{ question }}\"` and `assistant: \"{{ answer }}\"`, or `turns:` for multi-turn data"));
                    }
                }
                for (role, target) in p.turns.iter().flat_map(|t| t.roles.iter()) {
                    if !["system", "user", "assistant"].contains(&target.as_str()) {
                        return Err(ParamError::new(
                            vec![Seg::Key("turns".into()), Seg::Key("roles".into()), Seg::Key(role.clone())],
                            format!("`{target}` is not a role"),
                        )
                        .hint("map source roles to system, user or assistant"));
                    }
                }
            }
            Format::Instruction => {
                if p.prompt.is_none() || p.completion.is_none() {
                    let missing = if p.prompt.is_none() { "prompt" } else { "completion" };
                    return Err(ParamError::new(vec![], format!("missing field `{missing}`"))
                        .hint("`format: instruction` needs `prompt:` and `completion:` templates"));
                }
                for k in ["user", "assistant", "turns"] {
                    let set = match k {
                        "user" => p.user.is_some(),
                        "assistant" => p.assistant.is_some(),
                        _ => p.turns.is_some(),
                    };
                    if set {
                        return Err(ParamError::new(at(k), format!("`{k}` belongs to `format: conversation`")));
                    }
                }
            }
        }
        Ok(Box::new(MessagesStage { p }))
    }
}

/// Why a row was rejected (the key in `stats.json`) and the message.
struct RowError {
    reason: &'static str,
    message: String,
}

fn row_err(reason: &'static str, message: String) -> RowError {
    RowError { reason, message }
}

struct Mapper {
    env: minijinja::Environment<'static>,
    system: Option<String>,
}

impl Mapper {
    /// Render one template over a row, checking the fields it uses first so
    /// the error names the field.
    fn render(&self, name: &str, tpl: &str, row: &Map<String, Value>) -> Result<String, RowError> {
        let t = self.env.template_from_str(tpl).map_err(|e| row_err("template_error", e.to_string()))?;
        for var in t.undeclared_variables(false) {
            match row.get(&var) {
                None => return Err(row_err("missing_field", format!("field `{var}` is missing (used by `{name}`)"))),
                Some(Value::Null) => {
                    return Err(row_err("missing_field", format!("field `{var}` is null (used by `{name}`)")))
                }
                _ => {}
            }
        }
        let s = t
            .render(minijinja::Value::from(minijinja::value::Serde(row)))
            .map_err(|e| row_err("template_error", format!("`{name}`: {e}")))?;
        if s.trim().is_empty() {
            return Err(row_err("empty_content", format!("`{name}` content is empty")));
        }
        Ok(s)
    }

    fn conversation(&self, p: &Params, row: &Map<String, Value>) -> Result<Value, RowError> {
        let mut msgs: Vec<(String, String)> = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(("system".into(), self.render("system", s, row)?));
        }
        if let Some(t) = &p.turns {
            let turns = match row.get(&t.field) {
                None | Some(Value::Null) => {
                    return Err(row_err("missing_field", format!("field `{}` is missing", t.field)))
                }
                Some(Value::Array(a)) => a,
                Some(other) => {
                    return Err(row_err(
                        "wrong_type",
                        format!("field `{}` is not a list of turns (found {})", t.field, kind(other)),
                    ))
                }
            };
            for (j, turn) in turns.iter().enumerate() {
                let get = |k: &str| turn.get(k);
                let role = match get(&t.role) {
                    Some(Value::String(r)) => r.clone(),
                    Some(other) => {
                        return Err(row_err(
                            "wrong_type",
                            format!("turn {j}: `{}` is not a string (found {})", t.role, kind(other)),
                        ))
                    }
                    None => return Err(row_err("missing_field", format!("turn {j}: no `{}`", t.role))),
                };
                let mapped = t.roles.get(&role).cloned().unwrap_or_else(|| role.clone());
                if !["system", "user", "assistant"].contains(&mapped.as_str()) {
                    return Err(row_err(
                        "unknown_role",
                        format!("turn {j}: role `{role}` is not mapped to system, user or assistant"),
                    ));
                }
                let content = match get(&t.content) {
                    Some(Value::String(c)) => c.clone(),
                    Some(other) => {
                        return Err(row_err(
                            "non_string_content",
                            format!("turn {j}: `{}` is not a string (found {})", t.content, kind(other)),
                        ))
                    }
                    None => return Err(row_err("missing_field", format!("turn {j}: no `{}`", t.content))),
                };
                if content.trim().is_empty() {
                    return Err(row_err("empty_content", format!("turn {j}: content is empty")));
                }
                msgs.push((mapped, content));
            }
        } else {
            msgs.push(("user".into(), self.render("user", p.user.as_deref().unwrap_or_default(), row)?));
            msgs.push(("assistant".into(), self.render("assistant", p.assistant.as_deref().unwrap_or_default(), row)?));
        }
        check_order(&msgs)?;
        Ok(json!({"messages": msgs.into_iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()}))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An optional system turn first, then user/assistant alternating, starting
/// with user and ending with assistant (something to train on).
fn check_order(msgs: &[(String, String)]) -> Result<(), RowError> {
    let roles: Vec<&str> = msgs.iter().map(|(r, _)| r.as_str()).collect();
    let body = if roles.first() == Some(&"system") { &roles[1..] } else { &roles[..] };
    let ok = !body.is_empty()
        && body.iter().enumerate().all(|(i, r)| *r == if i % 2 == 0 { "user" } else { "assistant" })
        && body.last() == Some(&"assistant");
    if ok {
        Ok(())
    } else {
        Err(row_err(
            "wrong_role_order",
            format!("wrong role order: {} (expected an optional system turn, then user and assistant alternating, ending with assistant)", roles.join(", ")),
        ))
    }
}

fn schema(format: Format) -> SchemaRef {
    match format {
        Format::Conversation => {
            let item = Field::new(
                "item",
                DataType::Struct(
                    vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)].into(),
                ),
                true,
            );
            Arc::new(Schema::new(vec![Field::new("messages", DataType::List(Arc::new(item)), true)]))
        }
        Format::Instruction => Arc::new(Schema::new(vec![
            Field::new("prompt", DataType::Utf8, true),
            Field::new("completion", DataType::Utf8, true),
        ])),
    }
}

impl Stage for MessagesStage {
    fn files(&self) -> Vec<FileDep> {
        self.p.system_file.iter().map(|f| FileDep { path: f.clone(), at: at("system_file") }).collect()
    }

    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let input = match ctx.inputs.values().collect::<Vec<_>>().as_slice() {
            [one] => (*one).clone(),
            _ => {
                return Err(StageFailure::new(format!("`messages` reads exactly one input, got {}", ctx.inputs.len()))
                    .hint("write `inputs: {data: YOUR_DATASET_STAGE}`"))
            }
        };
        let files = if input.is_dir() { table::data_files(&input) } else { vec![input.clone()] };
        if files.is_empty() {
            return Err(StageFailure::new(format!("no data files in the input ({})", input.display())));
        }
        let system = match &self.p.system_file {
            Some(f) => Some(fs_err::read_to_string(ctx.workspace.join(f))?.trim_end_matches('\n').to_string()),
            None => self.p.system.clone(),
        };
        let mapper = Mapper { env: crate::jinja::environment(), system };
        let schema = schema(self.p.format);
        let mut stats = Map::new();
        for file in &files {
            let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
            let st = self.map_file(ctx, &mapper, file, &name, &schema)?;
            stats.insert(name, st);
        }
        fs_err::write(
            ctx.out_dir.join("stats.json"),
            serde_json::to_vec_pretty(&stats).map_err(std::io::Error::other)?,
        )?;
        Ok(())
    }
}

impl MessagesStage {
    fn map_file(
        &self,
        ctx: &RunCtx,
        mapper: &Mapper,
        file: &Path,
        name: &str,
        schema: &SchemaRef,
    ) -> Result<Value, StageFailure> {
        let shown = file.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let mut out = ParquetOut::create(&ctx.out_dir.join(format!("{name}.parquet")), schema.clone())?;
        let mut export = match self.p.export {
            Some(Export::Jsonl) => {
                Some(std::io::BufWriter::new(fs_err::File::create(ctx.out_dir.join(format!("{name}.jsonl")))?))
            }
            None => None,
        };
        let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut examples: Vec<String> = Vec::new();
        let (mut row_no, mut rows_out) = (0usize, 0usize);
        for batch in table::open(&[file.to_path_buf()], None)? {
            if ctx.cancel.is_cancelled() {
                return Err(StageFailure::new("cancelled"));
            }
            let mut mapped = Vec::new();
            for row in table::batch_rows(&batch?)? {
                let r = match self.p.format {
                    Format::Conversation => mapper.conversation(&self.p, &row),
                    Format::Instruction => (|| {
                        let prompt = mapper.render("prompt", self.p.prompt.as_deref().unwrap_or_default(), &row)?;
                        let completion =
                            mapper.render("completion", self.p.completion.as_deref().unwrap_or_default(), &row)?;
                        Ok(json!({"prompt": prompt, "completion": completion}))
                    })(),
                };
                match r {
                    Ok(v) => mapped.push(v),
                    Err(e) => {
                        let msg = format!("{shown}: row {row_no} (0-based): {}", e.message);
                        if self.p.on_error == OnError::Fail {
                            return Err(StageFailure::new(msg).hint("fix the data, or set `on_error: skip` to drop such rows (they are counted in stats.json)"));
                        }
                        *skipped.entry(e.reason).or_default() += 1;
                        if examples.len() < 5 {
                            examples.push(msg);
                        }
                    }
                }
                row_no += 1;
            }
            if let Some(w) = export.as_mut() {
                for v in &mapped {
                    let mut line = String::new();
                    pandas_json(v, &mut line);
                    writeln!(w, "{line}")?;
                }
            }
            let mut dec = arrow_json::ReaderBuilder::new(schema.clone())
                .build_decoder()
                .map_err(|e| StageFailure::new(e.to_string()))?;
            dec.serialize(&mapped).map_err(|e| StageFailure::new(e.to_string()))?;
            if let Some(b) = dec.flush().map_err(|e| StageFailure::new(e.to_string()))? {
                rows_out += b.num_rows();
                out.write(&b)?;
            }
            ctx.progress.message(&format!("{shown}: {row_no} rows"));
        }
        out.finish()?;
        if let Some(mut w) = export {
            w.flush()?;
        }
        if rows_out == 0 {
            return Err(StageFailure::new(format!("{shown}: no rows left ({row_no} read, all skipped)"))
                .hint(examples.first().cloned().unwrap_or_default()));
        }
        Ok(json!({"rows_in": row_no, "rows_out": rows_out, "skipped": skipped, "skipped_examples": examples}))
    }
}

/// JSON as pandas' `to_json` writes it (what `datasets.Dataset.to_json` uses):
/// compact, `/` escaped as `\/`, non-ASCII as `\uXXXX` (force_ascii).
fn pandas_json(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => {
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '/' => out.push_str("\\/"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 || (c as u32) > 0x7f => {
                        let mut buf = [0u16; 2];
                        for unit in c.encode_utf16(&mut buf) {
                            out.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pandas_json(x, out);
            }
            out.push(']');
        }
        Value::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pandas_json(&Value::String(k.clone()), out);
                out.push(':');
                pandas_json(x, out);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pandas_style_escapes() {
        let mut s = String::new();
        pandas_json(&json!({"a": "x/y \"é\" 😀\n\u{1}\u{7f}"}), &mut s);
        assert_eq!(s, "{\"a\":\"x\\/y \\\"\\u00e9\\\" \\ud83d\\ude00\\n\\u0001\u{7f}\"}");
    }

    #[test]
    fn role_order() {
        let m = |r: &[&str]| r.iter().map(|x| (x.to_string(), "c".to_string())).collect::<Vec<_>>();
        assert!(check_order(&m(&["system", "user", "assistant"])).is_ok());
        assert!(check_order(&m(&["user", "assistant", "user", "assistant"])).is_ok());
        assert!(check_order(&m(&["assistant", "user"])).is_err());
        assert!(check_order(&m(&["user", "user", "assistant"])).is_err());
        assert!(check_order(&m(&["user"])).is_err());
        assert!(check_order(&m(&["user", "system", "assistant"])).is_err());
    }
}
