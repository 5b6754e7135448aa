//! `pipe serve` (the OpenAI API over a tiny random model with a byte-level
//! tokenizer), and `serve` + `evaluate` as pipeline stages.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{bin, Ws};
use crate::train::write_tiny_llama;

struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pipe serve ARGS --port 0`, once it says where it listens.
fn serve(ws: &Ws, args: &[&str]) -> Serve {
    serve_env(ws, args, &[]).0
}

/// The same with environment variables, and what it printed up to then.
fn serve_env(ws: &Ws, args: &[&str], env: &[(&str, &str)]) -> (Serve, Vec<String>) {
    let mut child = Command::new(bin())
        .current_dir(ws.path())
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pipe serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut said = Vec::new();
    let url = loop {
        let line = lines.next().expect("pipe serve exited before serving").expect("read stderr");
        said.push(line.clone());
        if let Some(rest) = line.split(" on ").nth(1).filter(|_| line.contains("serving")) {
            break rest.split_whitespace().next().expect("url").to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Serve { child, url }, said)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// POST a body (raw text); (status, JSON or the raw text as a string).
fn post(url: &str, body: &str) -> (u16, Value) {
    let mut r = agent().post(url).header("content-type", "application/json").send(body).expect("request");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn chat(s: &Serve, body: Value) -> (u16, Value) {
    post(&format!("{}/v1/chat/completions", s.url), &body.to_string())
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"].as_str().expect("content").to_string()
}

fn hi(extra: Value) -> Value {
    let mut b = json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0});
    for (k, v) in extra.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

#[test]
fn serve_answers_the_openai_chat_and_completions_api() {
    let ws = Ws::new();
    write_tiny_llama(&ws, "model", true);
    let s = serve(&ws, &["model"]);
    let mut r = agent().get(&format!("{}/health", s.url)).call().expect("health");
    assert_eq!(r.status(), 200);
    let models: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let _ = &models;
    let mut r = agent().get(&format!("{}/v1/models", s.url)).call().unwrap();
    let models: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "model");

    // Greedy: deterministic, usage counted (ChatML prompt: 21 byte-level tokens).
    let (st, a) = chat(&s, hi(json!({"max_tokens": 12, "ignore_eos": true})));
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["usage"]["prompt_tokens"], 21, "{a}");
    assert_eq!(a["usage"]["completion_tokens"], 12);
    assert_eq!(a["usage"]["total_tokens"], 33);
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    let (_, b) = chat(&s, hi(json!({"max_tokens": 12, "ignore_eos": true})));
    assert_eq!(content(&a), content(&b));

    // Streaming gives the same text, in SSE chunks ending with [DONE].
    let (st, raw) = post(
        &format!("{}/v1/chat/completions", s.url),
        &hi(json!({"max_tokens": 12, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}))
            .to_string(),
    );
    assert_eq!(st, 200);
    let raw = raw.as_str().expect("an event stream").to_string();
    let data: Vec<&str> = raw.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{raw}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, content(&a));
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 12);

    // A stop string cuts the text before it (and is not streamed out).
    let full = content(&a);
    let cut = full.char_indices().nth(4).map(|(i, _)| i).unwrap();
    let stop: String = full[cut..].chars().take(2).collect();
    let (_, c) = chat(&s, hi(json!({"max_tokens": 12, "ignore_eos": true, "stop": stop})));
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    assert_eq!(content(&c), full[..full.find(&stop).unwrap()]);

    // Concurrent requests are batched together and give the same greedy answers.
    let prompts: Vec<String> = (0..6).map(|i| format!("question {i}: {}", "x".repeat(i * 3))).collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            content(
                &chat(
                    &s,
                    json!({"messages": [{"role": "user", "content": p}], "max_tokens": 10, "temperature": 0,
                           "ignore_eos": true}),
                )
                .1,
            )
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = &s;
                sc.spawn(move || {
                    content(
                        &chat(
                            s,
                            json!({"messages": [{"role": "user", "content": p}], "max_tokens": 10, "temperature": 0,
                                   "ignore_eos": true}),
                        )
                        .1,
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);

    // Sampling with a seed is reproducible.
    let sampled = |seed| content(&chat(&s, hi(json!({"max_tokens": 16, "temperature": 1.0, "seed": seed}))).1);
    assert_eq!(sampled(5), sampled(5));

    // /v1/completions with a plain prompt.
    let (st, c) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "abc", "max_tokens": 5, "ignore_eos": true, "temperature": 0}).to_string(),
    );
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["prompt_tokens"], 3);
    assert_eq!(c["usage"]["completion_tokens"], 5);

    // Errors: OpenAI's shape and status codes.
    let err = |body: &str, path: &str| post(&format!("{}{path}", s.url), body);
    let (st, e) = err("{not json", "/v1/chat/completions");
    assert_eq!(st, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{e}");
    let (st, e) = chat(&s, hi(json!({"temperature": "hot"})));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("temperature")), "{e}");
    let (st, e) = chat(&s, hi(json!({"temperature": 7})));
    assert_eq!((st, e["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{e}");
    let (st, e) = chat(&s, json!({"model": "model"}));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("messages")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("messages"), "{e}");
    let (st, e) = chat(&s, hi(json!({"n": 2})));
    assert_eq!(st, 400, "{e}");
    let (st, e) = chat(&s, hi(json!({"model": "gpt-5"})));
    assert_eq!((st, e["error"]["code"].as_str()), (404, Some("model_not_found")), "{e}");
    let long = "y".repeat(600);
    let (st, e) = chat(&s, json!({"messages": [{"role": "user", "content": long}]}));
    assert_eq!((st, e["error"]["code"].as_str()), (413, Some("context_length_exceeded")), "{e}");
    let (st, _) = err("{}", "/v1/nothing");
    assert_eq!(st, 404);
}

#[test]
fn a_full_queue_is_refused_with_503_and_ctrl_c_finishes_running_requests() {
    let ws = Ws::new();
    write_tiny_llama(&ws, "model", true);
    let mut s = serve(&ws, &["model", "--max-batch", "1", "--queue", "1"]);
    let long = hi(json!({"max_tokens": 480, "ignore_eos": true}));
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                let (s, long) = (&s, long.clone());
                sc.spawn(move || chat(s, long))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().0).collect()
    });
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.iter().all(|&c| c == 200 || c == 503), "{statuses:?}");

    // SIGINT while a request runs: it still completes, then the server exits 0.
    let answer = std::thread::scope(|sc| {
        let h = sc.spawn(|| chat(&s, long.clone()));
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(s.child.id() as i32, libc::SIGINT) };
        h.join().unwrap()
    });
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(answer.1["usage"]["completion_tokens"], 480);
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `PIPE_SERVE_WARMUP=1` (on by default on CUDA only): the engine runs its
/// synthetic requests before the server says it is serving, and answers as
/// a server without the warm-up does.
#[test]
fn serve_warms_up_before_serving_and_answers_the_same() {
    let ws = Ws::new();
    write_tiny_llama(&ws, "model", true);
    let (warm, said) = serve_env(&ws, &["model"], &[("PIPE_SERVE_WARMUP", "1")]);
    let loaded = said.iter().find(|l| l.contains("loaded")).unwrap_or_else(|| panic!("{said:?}"));
    assert!(loaded.contains("warmed up in"), "{loaded}");
    let (cold, said) = serve_env(&ws, &["model"], &[("PIPE_SERVE_WARMUP", "0")]);
    assert!(said.iter().all(|l| !l.contains("warm")), "{said:?}");
    let long = format!("{} tail", "the same few-shot prefix ".repeat(4));
    for q in ["hi", long.as_str()] {
        let body = json!({"messages": [{"role": "user", "content": q}], "max_tokens": 16, "temperature": 0,
                          "ignore_eos": true});
        let (st, a) = chat(&warm, body.clone());
        assert_eq!(st, 200, "{a}");
        let (_, b) = chat(&cold, body);
        assert_eq!(content(&a), content(&b), "{q}");
        assert_eq!(a["usage"], b["usage"], "{q}");
    }
}

#[test]
fn serve_rejects_what_is_not_a_model() {
    let ws = Ws::new();
    ws.write("notamodel/readme.txt", "hi");
    let out = ws.pipe(&["serve", "notamodel"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not a model folder"), "{out:?}");
}

/// A fake OpenAI server: answers each GSM8K question from `answers` (by a
/// substring of the last user message), failing the first `fail_first`
/// requests with a 500, and records every request body.
struct FakeOpenAi {
    url: String,
    requests: Arc<Mutex<Vec<Value>>>,
}

fn fake_openai(answers: Vec<(&'static str, &'static str)>, fail_first: usize) -> FakeOpenAi {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        let mut seen = 0;
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let models = head.starts_with("GET /v1/models");
            seen += usize::from(!models);
            let (status, reply) = if models {
                (200, json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
            } else if seen <= fail_first {
                (500, json!({"error": {"message": "try again"}}))
            } else {
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let last = v["messages"].as_array().and_then(|m| m.last()).cloned().unwrap_or_default();
                let q = last["content"].as_str().unwrap_or_default().to_string();
                log.lock().unwrap().push(v);
                let text = answers.iter().find(|(k, _)| q.contains(k)).map(|(_, a)| *a).unwrap_or("no idea");
                (
                    200,
                    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": "stop"}], "usage": {"prompt_tokens": 10, "completion_tokens": 5}}),
                )
            };
            let b = reply.to_string();
            let _ = write!(
                c,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                b.len()
            );
        }
    });
    FakeOpenAi { url, requests }
}

const DOCS: &str = r#####"{"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7"}
{"question": "A box holds 12 eggs. How many eggs in 2 boxes?", "answer": "12*2=<<12*2=24>>24\n#### 24"}
{"question": "Sue reads 5 pages a day for 4 days. How many pages?", "answer": "5*4=<<5*4=20>>20\n#### 20"}
{"question": "A shirt costs $1,000 and is cut by $250. Price?", "answer": "1000-250=<<1000-250=750>>750\n#### 750"}
{"question": "Excluded item, never asked.", "answer": "#### 1"}
"#####;

#[test]
fn evaluate_scores_an_external_endpoint_like_lm_eval() {
    let ws = Ws::new();
    let fake = fake_openai(
        vec![
            ("apples", "3 + 4 = 7. The answer is 7."),
            ("eggs", "So 24 eggs. The answer is 25."),
            ("pages", "He reads 20 pages."),
            ("shirt", "The answer is $750."),
        ],
        2,
    );
    ws.write("data/test.jsonl", DOCS);
    ws.write("prompts/system.txt", "Solve step by step.\n");
    ws.write(
        "p.yaml",
        &format!(
            "stages:\n  eval:\n    kind: evaluate\n    endpoint: {}\n    task: gsm8k_cot\n    data_file: data/test.jsonl\n    exclude: [4]\n    system_prompt_file: prompts/system.txt\n    num_concurrent: 2\n    max_retries: 3\n",
            fake.url
        ),
    );
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 0, "{out:?}");
    let dir = ws.out_path("p.yaml", "eval");
    let r: Value = serde_json::from_str(&fs_err::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["n"], 4);
    assert_eq!(r["counts"]["excluded"], 1);
    assert_eq!(r["counts"]["retries"], 2, "{r}");
    // strict: "The answer is 7." only ($750 does not match the strict regex);
    // flexible (last number): 7, 20 and $750 -> 750.
    assert_eq!(r["filters"]["strict-match"]["correct"], 1, "{r}");
    assert_eq!(r["filters"]["flexible-extract"]["correct"], 3, "{r}");
    assert_eq!(r["filters"]["strict-match"]["invalid"], 2, "{r}");
    assert_eq!(r["config"]["model"], "fake-model");
    let samples: Vec<Value> = fs_err::read_to_string(dir.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 4);
    assert_eq!(samples[3]["extracted"]["flexible-extract"], "$750."); // lm_eval keeps the dot
    assert_eq!(samples[3]["target"], "750");
    // The request is lm_eval's: system prompt, 8 exemplars as turns, stop, greedy.
    let reqs = fake.requests.lock().unwrap().clone();
    let q = &reqs[0];
    assert_eq!(q["messages"][0], json!({"role": "system", "content": "Solve step by step."}));
    assert_eq!(q["messages"].as_array().unwrap().len(), 1 + 16 + 1);
    assert_eq!(q["stop"], json!(["Q:", "</s>", "<|im_end|>"]));
    assert_eq!((q["max_tokens"].as_u64(), q["temperature"].as_f64()), (Some(256), Some(0.0)));
    let show = ws.ok(&["show", "p.yaml", "eval"]);
    assert!(show.stdout.contains("strict-match") && show.stdout.contains("25.00%"), "{show:?}");

    // An endpoint that keeps failing: the stage fails naming the row and the retries.
    let dead = fake_openai(vec![], 1000);
    ws.write("p.yaml", &format!(
        "stages:\n  eval:\n    kind: evaluate\n    endpoint: {}\n    model: m\n    task: gsm8k_cot\n    data_file: data/test.jsonl\n    max_retries: 1\n",
        dead.url
    ));
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("HTTP 500: try again (after 1 retries)"), "{out:?}");

    // Bad params are located.
    ws.write("p.yaml", "stages:\n  eval:\n    kind: evaluate\n    endpoint: localhost:1\n    task: gsm8k_cot\n");
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not an http(s) URL") && out.stderr.contains("p.yaml:4"), "{out:?}");
    ws.write("p.yaml", "stages:\n  eval:\n    kind: evaluate\n    endpoint: http://x/v1\n    task: gsm8k_pot\n");
    let out = ws.pipe(&["run", "p.yaml"]);
    assert!(out.code == 2 && out.stderr.contains("gsm8k_cot, gsm8k"), "{out:?}");
}

#[test]
fn a_serve_stage_runs_only_for_the_stages_that_use_it() {
    let ws = Ws::new();
    write_tiny_llama(&ws, "model", true);
    ws.write("data/test.jsonl", DOCS);
    let pipeline = |limit: usize| {
        format!(
            "stages:\n  base:\n    kind: command\n    deps: [model]\n    cmd: cp model/* $PIPE_OUT/\n  server:\n    kind: serve\n    inputs: {{model: base}}\n    max_batch: 4\n  eval:\n    kind: evaluate\n    inputs: {{endpoint: server}}\n    data_file: data/test.jsonl\n    task: gsm8k_cot\n    num_fewshot: 1\n    max_tokens: 8\n    limit: {limit}\n    num_concurrent: 2\n  ping:\n    kind: command\n    inputs: {{api: server}}\n    cmd: test -n \"$PIPE_IN_API\" && echo $PIPE_IN_API > $PIPE_OUT/url.txt\n    outs: [url.txt]\n"
        )
    };
    ws.write("p.yaml", &pipeline(3));
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("server: up at http://127.0.0.1:"), "{out:?}");
    let r: Value =
        serde_json::from_str(&fs_err::read_to_string(ws.out_path("p.yaml", "eval").join("results.json")).unwrap())
            .unwrap();
    assert_eq!(r["n"], 3);
    assert_eq!(r["config"]["model"], "server");
    let url = fs_err::read_to_string(ws.out_path("p.yaml", "ping").join("url.txt")).unwrap();
    assert!(url.starts_with("http://127.0.0.1:") && url.trim_end().ends_with("/v1"), "{url}");

    // Everything cached: the server is not started.
    let out = ws.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains("up at"), "{out:?}");
    let st = ws.status_json("p.yaml");
    let server = st["stages"].as_array().unwrap().iter().find(|s| s["name"] == "server").unwrap().clone();
    assert_eq!(server["state"], "fresh");
    assert!(server["reasons"][0].as_str().unwrap().contains("service"));

    // A changed evaluation starts the server again; a changed server reruns its users.
    ws.write("p.yaml", &pipeline(2));
    let out = ws.pipe(&["run", "p.yaml"]);
    assert!(out.code == 0 && out.stderr.contains("up at") && out.ran().contains(&"eval".to_string()), "{out:?}");
    assert!(!out.ran().contains(&"ping".to_string()), "{out:?}");
    ws.write("p.yaml", &pipeline(2).replace("max_batch: 4", "max_batch: 2"));
    let st = ws.status_json("p.yaml");
    let eval = st["stages"].as_array().unwrap().iter().find(|s| s["name"] == "eval").unwrap().clone();
    assert_eq!(eval["state"], "stale");
    assert!(eval["reasons"].to_string().contains("endpoint"), "{eval}");
}

#[test]
fn prompts_sharing_a_long_prefix_reuse_its_cache_and_answer_the_same() {
    let ws = Ws::new();
    write_tiny_llama(&ws, "model", true);
    let system = "You solve grade school math problems step by step and end with: The answer is N.".repeat(2);
    let ask = |s: &Serve, q: &str| {
        let (_, v) = chat(
            s,
            json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                   "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
        );
        (content(&v), v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap())
    };
    // First server: q1 fills the prefix cache, q2 and q1 again reuse it.
    let s = serve(&ws, &["model"]);
    let (a1, b, a2) = (ask(&s, "2+2?"), ask(&s, "3*3?"), ask(&s, "2+2?"));
    assert_eq!(a1.1, 0);
    assert!(b.1 > 150 && a2.1 > 150, "{b:?} {a2:?}");
    assert_eq!(a1.0, a2.0);
    drop(s);
    // Second server: q2 first, computed from scratch.
    let s = serve(&ws, &["model"]);
    assert_eq!(ask(&s, "3*3?"), (b.0.clone(), 0));
    drop(s);
    // Concurrent requests of one family: one prefills the shared part, the
    // others wait a step and reuse it; the answers do not change.
    let s = serve(&ws, &["model"]);
    let qs = ["2+2?", "3*3?", "2+2?", "3*3?"];
    let got: Vec<(String, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = qs.iter().map(|q| sc.spawn(|| ask(&s, q))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (q, (text, _)) in qs.iter().zip(&got) {
        assert_eq!(text, if *q == "2+2?" { &a1.0 } else { &b.0 });
    }
    assert!(got.iter().filter(|(_, cached)| *cached > 150).count() >= 3, "{got:?}");
    drop(s);
    // Two families at once: the cached prefix changes while sequences still
    // read the one before (on the CPU they share its keys and values); the
    // answers are those of a server without a cache.
    let other = "You are a careful assistant who checks every sum twice before answering.".repeat(2);
    let ask2 = |s: &Serve, sys: &str, q: &str| {
        let (_, v) = chat(
            s,
            json!({"messages": [{"role": "system", "content": sys}, {"role": "user", "content": q}],
                   "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
        );
        content(&v)
    };
    let want: Vec<String> = [(&system, "5-1?"), (&other, "5-1?"), (&other, "7+1?")]
        .iter()
        .map(|(sys, q)| {
            let s = serve(&ws, &["model"]);
            ask2(&s, sys, q)
        })
        .collect();
    let s = serve(&ws, &["model"]);
    let asks = [(0, &system, "5-1?"), (1, &other, "5-1?"), (2, &other, "7+1?")].repeat(3);
    let got: Vec<(usize, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = asks.iter().map(|(i, sys, q)| sc.spawn(|| (*i, ask2(&s, sys, q)))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, text) in got {
        assert_eq!(text, want[i], "request {i} of the two families");
    }
}

#[test]
fn the_prefix_cache_keeps_several_families_and_drops_the_least_recently_used() {
    let ws = Ws::new();
    write_tiny_llama(&ws, "model", true);
    let system = "You solve grade school math problems step by step and end with: The answer is N.".repeat(2);
    let shots = "Example: 12 pens at 3 dollars each cost 36 dollars. The answer is 36. ".repeat(4);
    let ask = |s: &Serve, sys: &str, user: &str| {
        let (_, v) = chat(
            s,
            json!({"messages": [{"role": "system", "content": sys}, {"role": "user", "content": user}],
                   "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        );
        (content(&v), v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap())
    };
    let s = serve(&ws, &["model"]);
    // A 0-shot family (the system prompt, then the question), then a
    // few-shot one that shares only the system prompt with it: the second
    // is a family of its own, so its next question reuses the exemplars too
    // (a single entry would have kept the first family's prompt).
    let zero = ask(&s, &system, "5-1?");
    assert_eq!(zero.1, 0);
    let (few1, few2) = (ask(&s, &system, &format!("{shots}2+2?")), ask(&s, &system, &format!("{shots}3*3?")));
    assert!(few1.1 > 150 && (few1.1 as usize) < system.len() + 40, "{few1:?}: the system prompt only");
    assert!(few2.1 as usize > system.len() + shots.len(), "{few2:?}: the exemplars too");
    // And the 0-shot family is still there.
    assert!(ask(&s, &system, "7+1?").1 > 150);
    drop(s);
    // The same answer from a server that computed the whole prompt.
    let fresh = serve(&ws, &["model"]);
    assert_eq!(ask(&fresh, &system, &format!("{shots}3*3?")), (few2.0.clone(), 0));
    drop(fresh);

    // Four families fill the cache; a fifth drops the least recently used
    // (the second: the first was used again), not the oldest.
    let s = serve(&ws, &["model"]);
    let sys = |i: usize| format!("{i} You are assistant number {i}; you answer every question about sums briefly.");
    for i in 1..=4 {
        assert_eq!(ask(&s, &sys(i), "1+1?").1, 0, "family {i}: first prompt");
    }
    assert!(ask(&s, &sys(1), "2+1?").1 > 60, "family 1 cached");
    assert_eq!(ask(&s, &sys(5), "1+1?").1, 0);
    assert_eq!(ask(&s, &sys(2), "2+1?").1, 0, "family 2 dropped");
    assert!(ask(&s, &sys(1), "3+1?").1 > 60, "family 1 kept");
    assert!(ask(&s, &sys(5), "3+1?").1 > 60, "family 5 kept");
}
