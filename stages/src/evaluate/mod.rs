//! `evaluate`: score a model behind an OpenAI-compatible endpoint on GSM8K,
//! exactly as lm-evaluation-harness does (`local-chat-completions` with the
//! chat template; see [`gsm8k`] for the prompt, filters and quirks).
//!
//! ```yaml
//! eval:
//!   kind: evaluate
//!   inputs: {endpoint: server, data: gsm8k_test}   # endpoint: a `serve` stage
//!   # endpoint: http://localhost:8000/v1           # or any external OpenAI-compatible server
//!   # model: NAME                                   # with an external endpoint (default: its first model)
//!   task: gsm8k_cot            # gsm8k_cot (8 built-in CoT exemplars) | gsm8k (5-shot from `fewshot` docs)
//!   num_fewshot: 8             # default: the task's
//!   fewshot_as_multiturn: true # exemplars as user/assistant turns (lm_eval's default with a chat template)
//!   system_prompt: "..."       # or system_prompt_file: prompts/math.txt
//!   exclude: pipelines/data/gsm8k-test-gsm-symbolic-sources.json  # or a list of 0-based row indices
//!   limit: 200                 # the first N remaining rows
//!   num_concurrent: 8
//!   max_retries: 3             # per request, exponential backoff, on connection errors, 429 and 5xx
//!   timeout_s: 600             # per request
//!   max_tokens: 256            # default: the task's
//!   split: test                # which `<split>.parquet` of a dataset input (default: test, else the only file)
//! ```
//!
//! Inputs: `data`, rows with `question` and `answer` (a `dataset` stage, or
//! `data_file:` a workspace JSONL/JSON/CSV/Parquet file); `fewshot` (gsm8k
//! only: the train split, or `fewshot_file:`); `endpoint` (a `serve` stage).
//! Row ids are 0-based indices in the data, before `exclude` and `limit`.
//!
//! Output: `results.json` (accuracy per filter with lm_eval's standard error,
//! counts, timings, config), `samples.jsonl` (id, prompt messages, response,
//! extracted answers, target, correct per filter), `summary.txt` (the table
//! `pipe show` prints).
//!
//! Key: params, file digests and input digests; for a `serve` input the
//! served stage's key (model digest + server params). Never deterministic
//! (`pipe verify` does not re-execute it): concurrent requests batch
//! differently from run to run, and an external server may change.

pub mod gsm8k;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pipe_engine::stage::{parse_params, FileDep, ParamError, RunCtx, Stage, StageFailure, StageKind};
use pipe_engine::yaml::Seg;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::table;
use crate::train::fail;
use gsm8k::{exact_match, mean, mean_stderr, Doc, Filter, Task, Turn};

pub struct EvaluateKind;

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Exclude {
    Ids(Vec<usize>),
    File(String),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    task: String,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    num_fewshot: Option<usize>,
    #[serde(default = "yes")]
    fewshot_as_multiturn: bool,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default)]
    system_prompt_file: Option<String>,
    #[serde(default)]
    exclude: Option<Exclude>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default = "one")]
    num_concurrent: usize,
    #[serde(default = "three")]
    max_retries: u32,
    #[serde(default = "timeout")]
    timeout_s: u64,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    data_file: Option<String>,
    #[serde(default)]
    fewshot_file: Option<String>,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn three() -> u32 {
    3
}
fn timeout() -> u64 {
    600
}

struct EvaluateStage {
    p: Params,
    task: Task,
}

fn at(f: &str) -> Vec<Seg> {
    vec![Seg::Key(f.into())]
}

impl StageKind for EvaluateKind {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "GSM8K (gsm8k_cot, gsm8k) against an OpenAI-compatible endpoint, scored as lm-evaluation-harness does"
    }
    fn prepare(&self, params: &Value) -> Result<Box<dyn Stage>, ParamError> {
        let p: Params = parse_params(params)?;
        let task: Task = p.task.parse().map_err(|e: gsm8k::UnknownTask| {
            ParamError::new(at("task"), e.to_string()).hint("write `task: gsm8k_cot` or `task: gsm8k`")
        })?;
        if let Some(u) = &p.endpoint {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ParamError::new(at("endpoint"), format!("`{u}` is not an http(s) URL")).hint(
                    "give a base URL like http://localhost:8000/v1, or take a `serve` stage as `inputs: {endpoint: STAGE}`",
                ));
            }
        }
        if p.system_prompt.is_some() && p.system_prompt_file.is_some() {
            return Err(ParamError::new(
                at("system_prompt_file"),
                "give `system_prompt` or `system_prompt_file`, not both",
            ));
        }
        if p.num_concurrent == 0 {
            return Err(ParamError::new(at("num_concurrent"), "`num_concurrent` must be at least 1"));
        }
        if p.limit == Some(0) {
            return Err(ParamError::new(at("limit"), "`limit` must be at least 1 (leave it out for every row)"));
        }
        if let (Task::Gsm8kCot, Some(n)) = (task, p.num_fewshot) {
            if n > gsm8k::COT_EXEMPLARS.len() {
                return Err(ParamError::new(at("num_fewshot"), format!("gsm8k_cot has 8 exemplars; {n} asked for")));
            }
        }
        Ok(Box::new(EvaluateStage { p, task }))
    }
}

impl Stage for EvaluateStage {
    fn files(&self) -> Vec<FileDep> {
        let mut v = Vec::new();
        for (f, path) in [
            ("system_prompt_file", &self.p.system_prompt_file),
            ("data_file", &self.p.data_file),
            ("fewshot_file", &self.p.fewshot_file),
        ] {
            if let Some(path) = path {
                v.push(FileDep { path: path.clone(), at: at(f) });
            }
        }
        if let Some(Exclude::File(f)) = &self.p.exclude {
            v.push(FileDep { path: f.clone(), at: at("exclude") });
        }
        v
    }

    fn deterministic(&self) -> bool {
        false
    }

    fn run(&self, ctx: &RunCtx) -> Result<(), StageFailure> {
        let p = &self.p;
        let ws = ctx.workspace;
        let base = match (ctx.endpoints.get("endpoint"), &p.endpoint) {
            (Some(_), Some(_)) => {
                return Err(StageFailure::new("both `endpoint:` and an `endpoint` input are given")
                    .hint("keep one: a `serve` stage as input, or an external URL"))
            }
            (Some(u), None) => u.clone(),
            (None, Some(u)) => u.trim_end_matches('/').to_string(),
            (None, None) => {
                return Err(StageFailure::new("`evaluate` needs an endpoint").hint(
                    "take a `serve` stage as `inputs: {endpoint: STAGE}`, or set `endpoint: http://HOST:PORT/v1`",
                ))
            }
        };
        let data = match (&p.data_file, ctx.inputs.get("data")) {
            (Some(f), None) => ws.join(f),
            (None, Some(d)) => pick_split(d, p.split.as_deref())?,
            (Some(_), Some(_)) => return Err(StageFailure::new("both `data_file:` and a `data` input are given")),
            (None, None) => {
                return Err(StageFailure::new("`evaluate` needs data")
                    .hint("take a dataset stage as `inputs: {data: STAGE}`, or set `data_file: FILE`"))
            }
        };
        let docs = read_docs(&data)?;
        let total = docs.len();
        let excluded: BTreeSet<usize> = match &p.exclude {
            None => BTreeSet::new(),
            Some(Exclude::Ids(v)) => v.iter().copied().collect(),
            Some(Exclude::File(f)) => read_exclude(&ws.join(f))?,
        };
        let mut items: Vec<(usize, Doc)> =
            docs.into_iter().enumerate().filter(|(i, _)| !excluded.contains(i)).collect();
        let n_excluded = total - items.len();
        if let Some(l) = p.limit {
            items.truncate(l);
        }
        if items.is_empty() {
            return Err(StageFailure::new(format!("{}: no rows left to evaluate", data.display())));
        }
        let fewshot_docs = if self.task.needs_fewshot_docs() {
            let f = match (&p.fewshot_file, ctx.inputs.get("fewshot")) {
                (Some(f), _) => ws.join(f),
                (None, Some(d)) => pick_split(d, Some("train")).or_else(|_| pick_split(d, None))?,
                (None, None) => {
                    return Err(StageFailure::new("task gsm8k draws its exemplars from train docs")
                        .hint("take the train split as `inputs: {fewshot: STAGE}` or set `fewshot_file: FILE`"))
                }
            };
            read_docs(&f)?
        } else {
            Vec::new()
        };
        let system = match (&p.system_prompt, &p.system_prompt_file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(f)) => Some(fs_err::read_to_string(ws.join(f))?.trim_end_matches('\n').to_string()),
            (None, None) => None,
        };
        let num_fewshot = p.num_fewshot.unwrap_or(self.task.default_num_fewshot());
        let gen = self.task.gen_spec();
        let max_tokens = p.max_tokens.unwrap_or(gen.max_tokens);
        let client = Client::new(&base, p.timeout_s, p.max_retries);
        let model = match &p.model {
            Some(m) => m.clone(),
            None => client.first_model()?,
        };
        ctx.log_line(&format!(
            "evaluating {} on {} docs ({} excluded of {total}) against {base} (model {model}), {} at a time",
            self.task,
            items.len(),
            n_excluded,
            p.num_concurrent
        ));
        // Requests, built in document order (gsm8k's few-shot draws depend on it).
        let mut sampler = gsm8k::FewshotSampler::new();
        let requests: Vec<Vec<Turn>> = items
            .iter()
            .map(|(_, d)| {
                let shots: Vec<Doc> = if self.task.needs_fewshot_docs() {
                    sampler.next(&fewshot_docs, num_fewshot).into_iter().cloned().collect()
                } else {
                    Vec::new()
                };
                self.task.messages(d, &shots, num_fewshot, system.as_deref(), p.fewshot_as_multiturn)
            })
            .collect();
        let t0 = Instant::now();
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let answers: Mutex<Vec<Option<Answer>>> = Mutex::new((0..items.len()).map(|_| None).collect());
        let first_error: Mutex<Option<StageFailure>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..p.num_concurrent.min(items.len()) {
                s.spawn(|| loop {
                    if ctx.cancel.is_cancelled() || first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= items.len() {
                        return;
                    }
                    let body = json!({
                        "model": model, "messages": requests[i], "max_tokens": max_tokens,
                        "temperature": gen.temperature, "stop": gen.until, "seed": gsm8k::SEED,
                    });
                    match client.chat(&body) {
                        Ok(a) => {
                            if let Ok(mut v) = answers.lock() {
                                v[i] = Some(a);
                            }
                            let k = done.fetch_add(1, Ordering::SeqCst) + 1;
                            if k.is_multiple_of(10) || k == items.len() {
                                let el = t0.elapsed().as_secs_f64();
                                ctx.progress.message(&format!(
                                    "{k}/{} answered ({:.2}/s, ETA {:.0} s)",
                                    items.len(),
                                    k as f64 / el,
                                    (items.len() - k) as f64 * el / k as f64
                                ));
                            }
                        }
                        Err(e) => {
                            let e = StageFailure::new(format!("row {}: {}", items[i].0, e.message))
                                .hint(e.hint.unwrap_or_else(|| format!("the endpoint is {base}")));
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(e);
        }
        if ctx.cancel.is_cancelled() {
            return Err(StageFailure::new("cancelled"));
        }
        let wall = t0.elapsed().as_secs_f64();
        let answers: Vec<Answer> =
            answers.into_inner().map_err(|_| fail("a request thread panicked"))?.into_iter().flatten().collect();
        if answers.len() != items.len() {
            return Err(fail("internal: some requests got no answer"));
        }
        self.write(ctx, &items, &requests, &answers, Summary { wall, total, n_excluded, model, base, num_fewshot })
    }
}

struct Summary {
    wall: f64,
    total: usize,
    n_excluded: usize,
    model: String,
    base: String,
    num_fewshot: usize,
}

impl EvaluateStage {
    fn write(
        &self,
        ctx: &RunCtx,
        items: &[(usize, Doc)],
        requests: &[Vec<Turn>],
        answers: &[Answer],
        s: Summary,
    ) -> Result<(), StageFailure> {
        let n = items.len();
        let mut samples = std::io::BufWriter::new(fs_err::File::create(ctx.out_dir.join("samples.jsonl"))?);
        let mut scores: Vec<Vec<f64>> = vec![Vec::with_capacity(n); Filter::ALL.len()];
        let mut invalid = vec![0usize; Filter::ALL.len()];
        for (((id, doc), req), a) in items.iter().zip(requests).zip(answers) {
            let target = self.task.target(doc);
            let mut extracted = serde_json::Map::new();
            let mut correct = serde_json::Map::new();
            for (k, f) in Filter::ALL.iter().enumerate() {
                let x = f.apply(self.task, &a.text);
                let ok = exact_match(&x, &target);
                invalid[k] += usize::from(x == gsm8k::INVALID);
                scores[k].push(if ok { 1.0 } else { 0.0 });
                extracted.insert(f.name().into(), json!(x));
                correct.insert(f.name().into(), json!(ok));
            }
            let line = json!({
                "id": id, "question": doc.question, "target": target, "messages": req,
                "response": a.text, "extracted": extracted, "correct": correct,
                "finish_reason": a.finish_reason, "completion_tokens": a.completion_tokens,
            });
            writeln!(samples, "{line}")?;
        }
        samples.flush()?;
        let mut filters = serde_json::Map::new();
        let mut table = format!(
            "{} ({}-shot{}), n = {n}\n{:<18} {:>9} {:>9} {:>8} {:>8}\n",
            self.task,
            s.num_fewshot,
            if self.p.fewshot_as_multiturn { ", multiturn" } else { "" },
            "filter",
            "accuracy",
            "stderr",
            "correct",
            "invalid"
        );
        for (k, f) in Filter::ALL.iter().enumerate() {
            let (acc, se) = (mean(&scores[k]), mean_stderr(&scores[k]));
            let correct = scores[k].iter().filter(|x| **x > 0.0).count();
            filters.insert(
                f.name().into(),
                json!({"exact_match": acc, "exact_match_stderr": if se.is_finite() { json!(se) } else { json!(null) },
                       "correct": correct, "invalid": invalid[k]}),
            );
            table.push_str(&format!(
                "{:<18} {:>8.2}% {:>8.2}% {:>8} {:>8}\n",
                f.name(),
                acc * 100.0,
                if se.is_finite() { se * 100.0 } else { f64::NAN },
                correct,
                invalid[k]
            ));
        }
        let (pt, ct): (usize, usize) =
            answers.iter().fold((0, 0), |(p, c), a| (p + a.prompt_tokens, c + a.completion_tokens));
        let retries: u32 = answers.iter().map(|a| a.retries).sum();
        let lat: f64 = answers.iter().map(|a| a.latency_s).sum::<f64>() / n as f64;
        table.push_str(&format!(
            "{n} requests in {:.1} s ({:.2}/s, mean latency {lat:.2} s), {ct} tokens generated ({:.1} tok/s)\n",
            s.wall,
            n as f64 / s.wall,
            ct as f64 / s.wall
        ));
        let results = json!({
            "schema": 1,
            "task": self.task.name(),
            "filters": filters,
            "n": n,
            "counts": {"rows": s.total, "excluded": s.n_excluded, "evaluated": n, "retries": retries},
            "timings": {"wall_s": s.wall, "requests_per_s": n as f64 / s.wall, "mean_latency_s": lat,
                        "prompt_tokens": pt, "completion_tokens": ct, "completion_tokens_per_s": ct as f64 / s.wall},
            "config": {"num_fewshot": s.num_fewshot, "fewshot_as_multiturn": self.p.fewshot_as_multiturn,
                       "system_prompt": requests.first().and_then(|r| r.first()).filter(|t| t.role == "system").map(|t| &t.content),
                       "limit": self.p.limit, "num_concurrent": self.p.num_concurrent, "model": s.model,
                       "endpoint": if self.p.endpoint.is_some() { json!(s.base) } else { json!("serve stage") },
                       "gen": {"max_tokens": self.p.max_tokens.unwrap_or(self.task.gen_spec().max_tokens),
                               "stop": self.task.gen_spec().until, "temperature": self.task.gen_spec().temperature}},
        });
        let text = serde_json::to_string_pretty(&results).map_err(fail)?;
        fs_err::write(ctx.out_dir.join("results.json"), text + "\n")?;
        fs_err::write(ctx.out_dir.join("summary.txt"), &table)?;
        for l in table.lines() {
            ctx.log_line(l);
        }
        Ok(())
    }
}

/// `<split>.parquet` (or any data file of that stem) in a dataset artifact;
/// without a split: `test`, else the only data file. A file input is itself.
fn pick_split(dir: &Path, split: Option<&str>) -> Result<PathBuf, StageFailure> {
    if dir.is_file() {
        return Ok(dir.to_path_buf());
    }
    let files = table::data_files(dir);
    let stem = |f: &PathBuf| f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let want = split.unwrap_or("test");
    if let Some(f) = files.iter().find(|f| stem(f) == want) {
        return Ok(f.clone());
    }
    if split.is_none() && files.len() == 1 {
        return Ok(files[0].clone());
    }
    let names: Vec<String> = files.iter().map(stem).collect();
    Err(StageFailure::new(format!("{}: no `{want}` data file", dir.display()))
        .hint(format!("set `split:` to one of: {}", names.join(", "))))
}

/// `{question, answer}` rows of a data file.
fn read_docs(path: &Path) -> Result<Vec<Doc>, StageFailure> {
    let reader = table::open(&[path.to_path_buf()], None)?;
    let mut docs = Vec::new();
    for b in reader {
        for row in table::batch_rows(&b?)? {
            let i = docs.len();
            let field = |f: &str| -> Result<String, StageFailure> {
                match row.get(f) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(StageFailure::new(format!(
                        "{}: row {i}: field `{f}` must be a string, found {other}",
                        path.display()
                    ))),
                    None => Err(StageFailure::new(format!("{}: row {i}: field `{f}` is missing", path.display()))
                        .hint("GSM8K rows have `question` and `answer` (ending `#### N`); rename columns in a `dataset` stage")),
                }
            };
            docs.push(Doc { question: field("question")?, answer: field("answer")? });
        }
    }
    Ok(docs)
}

/// Row ids to leave out: a JSON list of 0-based indices, or an object with
/// `excluded_indices` (like `pipelines/data/gsm8k-test-gsm-symbolic-sources.json`).
fn read_exclude(path: &Path) -> Result<BTreeSet<usize>, StageFailure> {
    let text = fs_err::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| StageFailure::new(format!("{}:{}:{}: {e}", path.display(), e.line(), e.column())))?;
    let list = match &v {
        Value::Array(_) => &v,
        Value::Object(o) => o.get("excluded_indices").unwrap_or(&Value::Null),
        _ => &Value::Null,
    };
    let ids: Option<BTreeSet<usize>> =
        list.as_array().map(|a| a.iter().filter_map(|x| x.as_u64().map(|i| i as usize)).collect());
    match ids {
        Some(s) if s.len() == list.as_array().map(|a| a.len()).unwrap_or(0) => Ok(s),
        _ => Err(StageFailure::new(format!("{}: expected a list of row indices", path.display()))
            .hint("write `[3, 17, ...]` or `{\"excluded_indices\": [3, 17, ...]}`")),
    }
}

/// One scored answer.
struct Answer {
    text: String,
    finish_reason: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    latency_s: f64,
    retries: u32,
}

/// A minimal OpenAI chat client (ureq): retries connection errors, 429 and
/// 5xx with exponential backoff (0.5 s, 1 s, 2 s, ...).
struct Client {
    agent: ureq::Agent,
    base: String,
    retries: u32,
}

impl Client {
    fn new(base: &str, timeout_s: u64, retries: u32) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(timeout_s)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Client { agent, base: base.trim_end_matches('/').to_string(), retries }
    }

    fn first_model(&self) -> Result<String, StageFailure> {
        let url = format!("{}/models", self.base);
        let v = self.call(|| self.agent.get(&url).call())?.0;
        v["data"][0]["id"].as_str().map(String::from).ok_or_else(|| {
            StageFailure::new(format!("{url} lists no model")).hint("set `model:` to the name the server expects")
        })
    }

    fn chat(&self, body: &Value) -> Result<Answer, StageFailure> {
        let url = format!("{}/chat/completions", self.base);
        let t = Instant::now();
        let (v, retries) = self.call(|| self.agent.post(&url).send_json(body))?;
        let choice = &v["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .ok_or_else(|| StageFailure::new(format!("{url}: the answer has no `choices[0].message.content`: {v}")))?;
        Ok(Answer {
            text: text.to_string(),
            finish_reason: choice["finish_reason"].as_str().unwrap_or_default().to_string(),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize,
            completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize,
            latency_s: t.elapsed().as_secs_f64(),
            retries,
        })
    }

    /// Run a request with retries; the JSON body and the retries it took.
    fn call(
        &self,
        send: impl Fn() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(Value, u32), StageFailure> {
        let mut attempt = 0;
        loop {
            let (retryable, msg) = match send() {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    if status == 200 {
                        let v = serde_json::from_str(&text)
                            .map_err(|e| StageFailure::new(format!("the endpoint answered invalid JSON: {e}")))?;
                        return Ok((v, attempt));
                    }
                    let detail = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["error"]["message"].as_str().map(String::from))
                        .unwrap_or(text);
                    (status == 429 || status >= 500, format!("HTTP {status}: {detail}"))
                }
                Err(e) => (true, e.to_string()),
            };
            if !retryable || attempt >= self.retries {
                let tries = if attempt > 0 { format!(" (after {} retries)", attempt) } else { String::new() };
                return Err(StageFailure::new(format!("{msg}{tries}")));
            }
            std::thread::sleep(Duration::from_millis(500 << attempt.min(6)));
            attempt += 1;
        }
    }
}
