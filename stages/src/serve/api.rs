//! The OpenAI-compatible HTTP API (axum): `POST /v1/chat/completions`,
//! `POST /v1/completions` (both with SSE streaming), `GET /v1/models`,
//! `GET /health`. Errors use OpenAI's JSON shape
//! `{"error": {"message", "type", "param", "code"}}`: 400 malformed JSON or
//! fields, 404 unknown model or route, 413 a prompt longer than the context,
//! 503 when the request queue is full. vLLM's extensions `top_k`,
//! `ignore_eos` and `stop_token_ids` are accepted.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{Engine, Event, FinishReason, GenParams, Request, SubmitError};
use crate::chat::{ChatTemplate, Message};

pub struct AppState {
    pub engine: Engine,
    pub template: Option<ChatTemplate>,
    pub model_name: String,
    pub created: u64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route", "not_found_error") })
        .with_state(state)
}

/// An OpenAI-shaped error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }
    fn bad(message: impl Into<String>, param: Option<String>) -> Self {
        ApiError { param, ..Self::new(StatusCode::BAD_REQUEST, message, "invalid_request_error") }
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.model_name, "object": "model", "created": st.created, "owned_by": "pipe",
        "max_model_len": st.engine.max_len,
    }]}))
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Debug)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Debug)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Deserialize, Debug, Default)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    n: Option<i64>,
    stop: Option<OneOrMany>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, Debug)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize, Debug)]
struct CompletionRequest {
    prompt: Prompt,
}

/// A body's JSON object, and its sampling fields (400s for malformed JSON).
fn parse_body(body: &[u8]) -> Result<(Value, Sampling), ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::bad("the body must be a JSON object", None));
    }
    let s = parse(&v)?;
    Ok((v, s))
}

/// Deserialize fields of the body; a wrong field is a 400 naming it. (Two
/// passes rather than `#[serde(flatten)]`, which loses the field's path.)
fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // serde names a missing field in the message, not the path.
        let missing = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()).map(String::from);
        match (path != ".").then_some(path) {
            Some(p) => ApiError::bad(format!("invalid field `{p}`: {msg}"), Some(p)),
            None => ApiError::bad(msg, missing),
        }
    })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn new_id(prefix: &str) -> String {
    use rand::Rng;
    format!("{prefix}-{:032x}", rand::rng().random::<u128>())
}

impl AppState {
    fn check_model(&self, s: &Sampling) -> Result<(), ApiError> {
        match &s.model {
            Some(m) if m != &self.model_name => Err(ApiError {
                param: Some("model".into()),
                code: Some("model_not_found"),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("the model `{m}` does not exist; this server serves `{}`", self.model_name),
                    "not_found_error",
                )
            }),
            _ => Ok(()),
        }
    }

    fn gen_params(&self, s: &Sampling) -> Result<GenParams, ApiError> {
        let bad = |f: &str, m: &str| ApiError::bad(format!("`{f}` {m}"), Some(f.into()));
        let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
            Some(n) if n < 1 => return Err(bad("max_tokens", "must be at least 1")),
            Some(n) => n as usize,
            None => usize::MAX,
        };
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(bad("temperature", "must be between 0 and 2"));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad("top_p", "must be in (0, 1]"));
        }
        let top_k = match s.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(_) => return Err(bad("top_k", "must be -1 (off) or a positive number")),
        };
        if let Some(n) = s.n {
            if n != 1 {
                return Err(bad("n", "must be 1 (one choice per request)"));
            }
        }
        let stop = match &s.stop {
            None => Vec::new(),
            Some(OneOrMany::One(x)) => vec![x.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        Ok(GenParams {
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed: s.seed.map(|x| x as u64),
            stop,
            stop_token_ids: s.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: s.ignore_eos.unwrap_or(false),
        })
    }

    /// Check the prompt's length and queue the request.
    fn submit(&self, prompt: Vec<u32>, params: GenParams) -> Result<UnboundedReceiver<Event>, ApiError> {
        let max = self.engine.max_len;
        if prompt.len() >= max {
            return Err(ApiError {
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
                ..ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the prompt has {} tokens; this model's context is {max} tokens, so a prompt may have {} at most",
                        prompt.len(),
                        max - 1
                    ),
                    "invalid_request_error",
                )
            });
        }
        if prompt.is_empty() {
            return Err(ApiError::bad("the prompt is empty", Some("prompt".into())));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.engine.submit(Request { prompt, params, events: tx }).map_err(|e| match e {
            SubmitError::Full(_) => ApiError {
                code: Some("queue_full"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), "server_overloaded")
            },
            SubmitError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), "server_error"),
        })?;
        Ok(rx)
    }
}

/// The whole answer of a non-streamed request.
struct Collected {
    text: String,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Delta(d) => text.push_str(&d),
            Event::Done { reason, prompt_tokens, completion_tokens, cached_tokens } => {
                return Ok(Collected { text, reason, prompt_tokens, completion_tokens, cached_tokens })
            }
            Event::Error(m) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m, "server_error")),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request", "server_error"))
}

fn usage(p: usize, c: usize, cached: usize) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// `head` (id, object, created, model) with `choices` (and more) set.
fn with(head: &Value, choices: Value, usage: Option<Value>) -> Value {
    let mut c = head.clone();
    c["choices"] = choices;
    if let Some(u) = usage {
        c["usage"] = u;
    }
    c
}

/// SSE events of a streamed answer: `delta(text)` per piece, `finish(reason)`
/// last, a usage chunk if asked for, then `[DONE]`.
fn sse_events(
    rx: UnboundedReceiver<Event>,
    head: Value,
    include_usage: bool,
    delta: fn(&str) -> Value,
    finish: fn(&str) -> Value,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
        .flat_map(move |e| {
            let out: Vec<Value> = match e {
                Event::Delta(d) => vec![with(&head, delta(&d), None)],
                Event::Done { reason, prompt_tokens, completion_tokens, cached_tokens } => {
                    let mut v = vec![with(&head, finish(reason.as_str()), None)];
                    if include_usage {
                        v.push(with(&head, json!([]), Some(usage(prompt_tokens, completion_tokens, cached_tokens))));
                    }
                    v
                }
                Event::Error(m) => vec![json!({"error": {"message": m, "type": "server_error"}})],
            };
            stream::iter(out.into_iter().map(|v| Ok(SseEvent::default().data(v.to_string()))))
        })
        .chain(stream::once(async { Ok(SseEvent::default().data("[DONE]")) }))
}

async fn chat(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let (v, sampling) = parse_body(&body)?;
    let req: ChatRequest = parse(&v)?;
    st.check_model(&sampling)?;
    let params = st.gen_params(&sampling)?;
    let template = st.template.as_ref().ok_or_else(|| {
        ApiError::bad("this model has no chat template; use /v1/completions", Some("messages".into()))
    })?;
    if req.messages.is_empty() {
        return Err(ApiError::bad("`messages` must not be empty", Some("messages".into())));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(ps)) => {
                let mut t = String::new();
                for p in ps {
                    if p.kind != "text" {
                        return Err(ApiError::bad(
                            format!("content part type `{}` is not supported (only text)", p.kind),
                            Some(format!("messages[{i}].content")),
                        ));
                    }
                    t.push_str(p.text.as_deref().unwrap_or_default());
                }
                t
            }
        };
        msgs.push(Message { role: m.role.clone(), content });
    }
    let text = template
        .render(&msgs, true)
        .map_err(|e| ApiError::bad(format!("the chat template failed: {}", e.message), Some("messages".into())))?;
    let prompt = st
        .engine
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| ApiError::bad(format!("tokenizing the prompt failed: {e}"), Some("messages".into())))?
        .get_ids()
        .to_vec();
    let rx = st.submit(prompt, params)?;
    let (id, created, model) = (new_id("chatcmpl"), unix_now(), st.model_name.clone());
    if sampling.stream {
        let include_usage = sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model});
        let first = with(
            &head,
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            None,
        );
        let events = sse_events(
            rx,
            head,
            include_usage,
            |d| json!([{"index": 0, "delta": {"content": d}, "finish_reason": null}]),
            |r| json!([{"index": 0, "delta": {}, "finish_reason": r}]),
        );
        let first = stream::once(async move { Ok::<_, Infallible>(SseEvent::default().data(first.to_string())) });
        return Ok(Sse::new(first.chain(events)).into_response());
    }
    let c = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.reason.as_str(), "logprobs": null}],
        "usage": usage(c.prompt_tokens, c.completion_tokens, c.cached_tokens),
    }))
    .into_response())
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let (v, sampling) = parse_body(&body)?;
    let req: CompletionRequest = parse(&v)?;
    st.check_model(&sampling)?;
    let params = st.gen_params(&sampling)?;
    let text = match req.prompt {
        Prompt::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= st.engine.vocab_size) {
                return Err(ApiError::bad(format!("token id {bad} is outside the vocabulary"), Some("prompt".into())));
            }
            Err(ids)
        }
        Prompt::Text(t) => Ok(t),
        Prompt::Texts(mut v) if v.len() == 1 => Ok(v.remove(0)),
        Prompt::Texts(_) => return Err(ApiError::bad("give one prompt per request", Some("prompt".into()))),
    };
    let prompt = match text {
        Ok(t) => st
            .engine
            .tokenizer
            .encode(t.as_str(), true)
            .map_err(|e| ApiError::bad(format!("tokenizing the prompt failed: {e}"), Some("prompt".into())))?
            .get_ids()
            .to_vec(),
        Err(ids) => ids,
    };
    let rx = st.submit(prompt, params)?;
    let (id, created, model) = (new_id("cmpl"), unix_now(), st.model_name.clone());
    if sampling.stream {
        let include_usage = sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head = json!({"id": id, "object": "text_completion", "created": created, "model": model});
        let events = sse_events(
            rx,
            head,
            include_usage,
            |d| json!([{"index": 0, "text": d, "finish_reason": null, "logprobs": null}]),
            |r| json!([{"index": 0, "text": "", "finish_reason": r, "logprobs": null}]),
        );
        return Ok(Sse::new(events).into_response());
    }
    let c = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": c.text, "finish_reason": c.reason.as_str(), "logprobs": null}],
        "usage": usage(c.prompt_tokens, c.completion_tokens, c.cached_tokens),
    }))
    .into_response())
}
