//! Chat templates as `transformers` renders them: the Jinja template from
//! `tokenizer_config.json` (or a file), rendered with `trim_blocks` and
//! `lstrip_blocks`, `raise_exception`, `strftime_now`, the Python string
//! methods HF templates call, and `add_generation_prompt`.
//!
//! [`ChatTemplate::assistant_spans`] finds the byte ranges of assistant turns
//! by rendering growing prefixes of the conversation: the text added by
//! assistant turn `i` is what `render(m[..=i])` adds to
//! `render(m[..i], add_generation_prompt=true)`. This works for any template
//! whose renderings of prefixes are prefixes of the whole (ChatML, Llama 3,
//! Qwen 2.5 ...), and is checked on every sample.

use std::ops::Range;
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind};
use pipe_engine::stage::StageFailure;
use serde::Serialize;
use serde_json::Value;

#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// From a model folder's `tokenizer_config.json`, or `override_file`.
    pub fn load(model_dir: &Path, override_file: Option<&Path>) -> Result<ChatTemplate, StageFailure> {
        let cfg_path = model_dir.join("tokenizer_config.json");
        let cfg: Value = match fs_err::read(&cfg_path) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| StageFailure::new(format!("{}: {e}", cfg_path.display())))?
            }
            Err(_) if override_file.is_some() => Value::Null,
            Err(e) => {
                return Err(StageFailure::new(e.to_string()).hint("the model input must hold tokenizer_config.json"))
            }
        };
        let source = match override_file {
            Some(f) => fs_err::read_to_string(f)?,
            None => match cfg.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                // A list of named templates: take "default".
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string)
                    .ok_or_else(|| StageFailure::new(format!("{}: no `default` chat template", cfg_path.display())))?,
                _ => {
                    return Err(StageFailure::new(format!("{} has no chat_template", cfg_path.display()))
                        .hint("set `chat_template: FILE` on the stage to give one"))
                }
            },
        };
        Self::from_source(&source, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))
    }

    pub fn from_source(source: &str, bos_token: String, eos_token: String) -> Result<ChatTemplate, StageFailure> {
        let mut env = crate::jinja::environment();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| StageFailure::new(e.to_string()))?,
        );
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for a "today" line; keep renders reproducible.
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| StageFailure::new(format!("invalid chat template: {e}")))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, StageFailure> {
        let t = self.env.get_template("chat").map_err(|e| StageFailure::new(e.to_string()))?;
        t.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| StageFailure::new(format!("chat template: {e}")))
    }

    /// The full rendering and the byte ranges of every assistant turn in it.
    pub fn assistant_spans(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>), StageFailure> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            // The last turn's prefix is the whole conversation: no third render.
            let rendered;
            let upto = if i + 1 == messages.len() {
                &full
            } else {
                rendered = self.render(&messages[..=i], false)?;
                &rendered
            };
            if !full.starts_with(&before)
                || !full.starts_with(upto.as_str())
                || upto.len() < before.len()
                || !upto.starts_with(&before)
            {
                return Err(StageFailure::new(
                    "the chat template does not render conversation prefixes as prefixes, so assistant turns cannot be located",
                )
                .hint("use `loss_on: all`, or give a template without history-dependent output via `chat_template:`"));
            }
            spans.push(before.len()..upto.len());
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn m(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn chatml_render_and_spans() {
        let t = ChatTemplate::from_source(CHATML, String::new(), "<|im_end|>".into()).unwrap();
        let msgs = [m("user", "hi"), m("assistant", "yo"), m("user", "2+2?"), m("assistant", "4")];
        let (text, spans) = t.assistant_spans(&msgs).unwrap();
        assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
        assert_eq!(spans.len(), 2);
        assert_eq!(&text[spans[0].clone()], "yo<|im_end|>\n");
        assert_eq!(&text[spans[1].clone()], "4<|im_end|>\n");
        assert!(t
            .render(&msgs[..1], true)
            .unwrap()
            .ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));
    }

    // Meta-Llama-3-8B-Instruct's template.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    // Qwen2.5-Instruct's template without the tool-calling branches.
    const QWEN25: &str = "{%- if tools %}\n    {{- 'tools' }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn llama3_template() {
        let t = ChatTemplate::from_source(LLAMA3, "<|begin_of_text|>".into(), "<|eot_id|>".into()).unwrap();
        let msgs = [m("user", " hi "), m("assistant", "yo")];
        let (text, spans) = t.assistant_spans(&msgs).unwrap();
        assert_eq!(text, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>");
        assert_eq!(&text[spans[0].clone()], "yo<|eot_id|>");
    }

    #[test]
    fn qwen25_template() {
        let t = ChatTemplate::from_source(QWEN25, String::new(), "<|im_end|>".into()).unwrap();
        let (text, spans) = t.assistant_spans(&[m("user", "hi"), m("assistant", "yo")]).unwrap();
        assert_eq!(text, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n");
        assert_eq!(&text[spans[0].clone()], "yo<|im_end|>\n");
        let (text, _) = t.assistant_spans(&[m("system", "S"), m("user", "hi"), m("assistant", "yo")]).unwrap();
        assert!(text.starts_with("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"), "{text}");
    }

    #[test]
    fn raise_exception_surfaces() {
        let t = ChatTemplate::from_source("{{ raise_exception('no system allowed') }}", String::new(), String::new())
            .unwrap();
        let e = t.render(&[m("system", "x")], false).unwrap_err();
        assert!(e.message.contains("no system allowed"), "{}", e.message);
    }
}
