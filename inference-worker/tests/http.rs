//! The HTTP API in process, on a synthetic model: OpenAI response and stream shapes,
//! every error path with an OpenAI error body, probes, metrics, and a client that leaves.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use inference_worker::backend::cpu::quant::WeightType;
use inference_worker::backend::cpu::CpuBackend;
use inference_worker::backend::{Backend, KvLayout};
use inference_worker::http::{router, AppState, Loaded};
use inference_worker::metrics::Metrics;
use inference_worker::scheduler::{self, EngineConfig, Handle};
use inference_worker::tokenizer::{ChatTemplate, Tokenizer};
use serde_json::{json, Value};

struct Server {
    url: String,
    state: Arc<AppState>,
    engine: Handle,
}

async fn server(queue: usize, load: bool) -> Server {
    server_with(queue, load, Duration::ZERO).await
}

/// A backend that takes at least `delay` per forward pass: long generations stay in
/// flight long enough for a test to act while they run.
struct Slow {
    inner: Box<dyn Backend>,
    delay: Duration,
}

impl Backend for Slow {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn config(&self) -> &inference_worker::model::ModelConfig {
        self.inner.config()
    }
    fn kv_layout(&self) -> KvLayout {
        self.inner.kv_layout()
    }
    fn memory_bytes(&self) -> u64 {
        self.inner.memory_bytes()
    }
    fn forward(
        &mut self,
        chunks: &[inference_worker::backend::SeqChunk<'_>],
    ) -> Result<Vec<f32>, inference_worker::backend::BackendError> {
        std::thread::sleep(self.delay);
        self.inner.forward(chunks)
    }
}

async fn server_with(queue: usize, load: bool, step: Duration) -> Server {
    let m = common::model(WeightType::Q8_0, "llama", 21);
    // A file per server: rewriting a file another test has mapped would be a SIGBUS.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = common::write_tmp(&format!("http-{n}.gguf"), &m.bytes);
    let file = Arc::new(gguf::GgufFile::open(&path).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_gguf(file.header()).unwrap());
    let backend = CpuBackend::load(
        Arc::clone(&file),
        KvLayout {
            block_size: 16,
            n_blocks: 64,
        },
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let config = EngineConfig {
        max_batch: 4,
        max_batch_tokens: 64,
        max_seq_len: 256,
        queue_capacity: queue,
        prefix_caching: true,
    };
    let backend: Box<dyn Backend> = if step.is_zero() {
        Box::new(backend)
    } else {
        Box::new(Slow {
            inner: Box::new(backend),
            delay: step,
        })
    };
    let (engine, _) = scheduler::start(
        backend,
        Arc::clone(&tokenizer),
        config,
        Arc::clone(&metrics),
    );
    let state = Arc::new(AppState::new(metrics, "synthetic".into()));
    if load {
        let chat = ChatTemplate::new(None, "", "</s>").unwrap();
        state.set_loaded(Loaded {
            engine: engine.clone(),
            tokenizer,
            chat,
            max_seq_len: 256,
        });
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router(Arc::clone(&state));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { url, state, engine }
}

async fn send(url: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post(url: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = send(url, body).await;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap())
}

fn assert_openai_error(body: &Value, kind: &str, needle: &str) {
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert!(e["message"].as_str().unwrap().contains(needle), "{body}");
}

#[tokio::test]
async fn completions_and_chat_answer_in_openai_shape() {
    let s = server(8, true).await;
    let (st, _, b) = post(
        &format!("{}/v1/completions", s.url),
        json!({"model": "synthetic", "prompt": "abc", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["object"], "text_completion");
    assert!(b["id"].as_str().unwrap().starts_with("cmpl-"));
    let u = &b["usage"];
    assert_eq!(u["prompt_tokens"], 3);
    assert!(u["completion_tokens"].as_u64().unwrap() <= 5);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(["length", "stop"].contains(&b["choices"][0]["finish_reason"].as_str().unwrap()));
    // Greedy is deterministic.
    let (_, _, again) = post(
        &format!("{}/v1/completions", s.url),
        json!({"prompt": "abc", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(b["choices"][0]["text"], again["choices"][0]["text"]);

    let (st, _, b) = post(
        &format!("{}/v1/chat/completions", s.url),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["choices"][0]["message"]["role"], "assistant");

    let models: Value = reqwest::get(format!("{}/v1/models", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "synthetic");
    assert_eq!(models["data"][0]["max_model_len"], 256);
}

/// Reads a whole SSE body into its `data:` payloads.
async fn sse(url: &str, body: Value) -> Vec<String> {
    let r = send(url, body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

#[tokio::test]
async fn streams_are_server_sent_events_ending_in_done() {
    let s = server(8, true).await;
    let events = sse(
        &format!("{}/v1/completions", s.url),
        json!({"prompt": "abc", "max_tokens": 6, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    // The stream carries the same text as the plain response.
    let (_, _, whole) = post(
        &format!("{}/v1/completions", s.url),
        json!({"prompt": "abc", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(streamed, whole["choices"][0]["text"].as_str().unwrap());

    let events = sse(
        &format!("{}/v1/chat/completions", s.url),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        usage["usage"]["completion_tokens"].as_u64().unwrap() <= 3,
        "{usage}"
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn bad_requests_get_openai_errors_with_the_reason() {
    let s = server(8, true).await;
    let c = format!("{}/v1/completions", s.url);
    let r = reqwest::Client::new()
        .post(&c)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_openai_error(
        &r.json().await.unwrap(),
        "invalid_request_error",
        "invalid JSON body",
    );
    let (st, _, b) = post(&c, json!({"max_tokens": 3})).await;
    assert_eq!(st, 400);
    assert_openai_error(&b, "invalid_request_error", "missing field `prompt`");
    let (st, _, b) = post(&c, json!({"prompt": "a", "model": "gpt-4"})).await;
    assert_eq!(st, 404);
    assert_eq!(b["error"]["code"], "model_not_found");
    for (body, needle) in [
        (
            json!({"prompt": "a", "temperature": 3}),
            "temperature 3 is outside",
        ),
        (json!({"prompt": "a", "top_p": 0}), "top_p 0 is outside"),
        (json!({"prompt": "a", "n": 17}), "n 17 is outside [1, 16]"),
        (json!({"prompt": "a", "max_tokens": 0}), "at least 1"),
        (
            json!({"prompt": "a", "max_tokens": 1000}),
            "maximum context length is 256 tokens",
        ),
        (json!({"prompt": ["a", "b"]}), "exactly one prompt"),
        (json!({"prompt": ""}), "the prompt is empty"),
    ] {
        let (st, _, b) = post(&c, body.clone()).await;
        assert_eq!(st, 400, "{body}: {b}");
        assert_openai_error(&b, "invalid_request_error", needle);
    }
    let (st, _, b) = post(
        &format!("{}/v1/chat/completions", s.url),
        json!({"messages": []}),
    )
    .await;
    assert_eq!(st, 400);
    assert_openai_error(&b, "invalid_request_error", "messages must not be empty");
    let r = reqwest::get(format!("{}/v2/nothing", s.url)).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_openai_error(&r.json().await.unwrap(), "not_found_error", "no such route");
    // The empty prompt is blamed on the prompt, not on max_tokens.
    let (_, _, b) = post(&c, json!({"prompt": ""})).await;
    assert_eq!(b["error"]["param"], "prompt", "{b}");
    // A wrong method and an oversized body are OpenAI errors too, not bare statuses.
    let r = reqwest::get(&c).await.unwrap();
    assert_eq!(r.status(), 405);
    assert_openai_error(
        &r.json().await.unwrap(),
        "invalid_request_error",
        "GET is not allowed",
    );
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(3 << 20));
    let r = reqwest::Client::new()
        .post(&c)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_openai_error(
        &r.json().await.unwrap(),
        "invalid_request_error",
        "larger than",
    );
    // Headers over the limit: 431, also in OpenAI's shape (hyper's own is empty).
    let r = reqwest::Client::new()
        .post(&c)
        .header("content-type", "application/json")
        .header("x-padding", "p".repeat(80 << 10))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_openai_error(
        &r.json().await.unwrap(),
        "invalid_request_error",
        "over the limit of 100 fields and 65536 bytes",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_batch_slots_take_requests_even_with_no_queue() {
    // Queue capacity 0 and 4 batch slots: 4 simultaneous requests all fit in the free
    // slots, so none is refused (429 was answered while slots were free: only the
    // waiting requests were counted against the queue).
    let s = server(0, true).await;
    let url = format!("{}/v1/completions", s.url);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, json!({"prompt": "a", "max_tokens": 8})).await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn probes_follow_loading_and_metrics_are_prometheus_text() {
    let s = server(8, false).await;
    let ready = |u: String| async move { reqwest::get(u).await.unwrap().status().as_u16() };
    assert_eq!(ready(format!("{}/healthz", s.url)).await, 200);
    assert_eq!(
        ready(format!("{}/readyz", s.url)).await,
        503,
        "not ready before the model is installed"
    );
    let (st, _, b) = post(&format!("{}/v1/completions", s.url), json!({"prompt": "a"})).await;
    assert_eq!(st, 503);
    assert_openai_error(&b, "server_error", "still loading");

    let loaded = server(8, true).await;
    assert_eq!(ready(format!("{}/readyz", loaded.url)).await, 200);
    post(
        &format!("{}/v1/completions", loaded.url),
        json!({"prompt": "ab", "max_tokens": 2}),
    )
    .await;
    let r = reqwest::get(format!("{}/metrics", loaded.url))
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("openmetrics"));
    let text = r.text().await.unwrap();
    for name in [
        "gpuscale_worker_queue_depth ",
        "gpuscale_worker_running_sequences ",
        "gpuscale_worker_kv_cache_usage_ratio ",
        "gpuscale_worker_generation_tokens_total ",
        "gpuscale_worker_request_duration_seconds_bucket",
        "gpuscale_worker_time_to_first_token_seconds_bucket",
        "gpuscale_worker_model_load_seconds ",
        "gpuscale_worker_ready 1",
        "# EOF",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    assert!(
        text.contains("gpuscale_worker_prompt_tokens_total 2"),
        "{text}"
    );
    // Draining flips readiness.
    loaded.engine.drain();
    assert_eq!(ready(format!("{}/readyz", loaded.url)).await, 503);
    let (st, _, _) = post(
        &format!("{}/v1/completions", loaded.url),
        json!({"prompt": "a"}),
    )
    .await;
    assert_eq!(st, 503);
    let _ = &loaded.state;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    // 10 ms a step: 250 tokens take 2.5 s, so the sequence is surely running when the
    // client leaves, and only the disconnect can end it early.
    let s = server_with(8, true, Duration::from_millis(10)).await;
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"prompt": "abc", "max_tokens": 250, "temperature": 1.0, "stream": true}))
        .send()
        .await
        .unwrap();
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.engine.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "sequence not freed after the client left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = s.state.metrics.encode();
    // Freed mid-generation and counted as the client's cancellation (499).
    assert!(m.contains("gpuscale_worker_running_sequences 0"), "{m}");
    assert!(
        m.contains("gpuscale_worker_requests_total{status=\"499\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn unserved_fields_are_refused_by_name_never_ignored() {
    let s = server(8, true).await;
    let c = format!("{}/v1/completions", s.url);
    let chat = format!("{}/v1/chat/completions", s.url);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (url, body, param, needle) in [
        (
            &chat,
            json!({"messages": msgs, "functions": []}),
            "functions",
            "deprecated",
        ),
        (
            &chat,
            json!({"messages": msgs, "tool_choice": "auto"}),
            "tool_choice",
            "tool_choice needs tools",
        ),
        (
            &chat,
            json!({"messages": msgs, "response_format": {"type": "regex"}}),
            "response_format",
            "must be text, json_object or json_schema",
        ),
        (
            &chat,
            json!({"messages": msgs, "store": true}),
            "store",
            "stores nothing",
        ),
        (
            &chat,
            json!({"messages": msgs, "top_logprobs": 2}),
            "top_logprobs",
            "needs logprobs: true",
        ),
        (
            &chat,
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
            "more than 20",
        ),
        (
            &chat,
            json!({"messages": msgs, "echo": true}),
            "echo",
            "Unrecognized request argument supplied: echo",
        ),
        (
            &c,
            json!({"prompt": "a", "suffix": "b"}),
            "suffix",
            "fill-in-the-middle",
        ),
        (
            &c,
            json!({"prompt": "a", "min_tokens": 2}),
            "min_tokens",
            "Unrecognized request argument supplied: min_tokens",
        ),
        (
            &c,
            json!({"prompt": "a", "best_of": 3}),
            "best_of",
            "best_of must equal n",
        ),
        (
            &c,
            json!({"prompt": "a", "stream_options": {"include_usage": true}}),
            "stream_options",
            "only allowed with stream",
        ),
        (
            &c,
            json!({"prompt": "a", "logit_bias": {"99999": 1}}),
            "logit_bias",
            "not a token id",
        ),
        (
            &c,
            json!({"prompt": "a", "logit_bias": {"3": 101}}),
            "logit_bias",
            "outside [-100, 100]",
        ),
        (
            &c,
            json!({"prompt": "a", "presence_penalty": 3}),
            "presence_penalty",
            "outside [-2, 2]",
        ),
        (
            &c,
            json!({"prompt": "a", "min_p": 1.5}),
            "min_p",
            "outside [0, 1]",
        ),
        (
            &c,
            json!({"prompt": "a", "repetition_penalty": 0}),
            "repetition_penalty",
            "outside (0, 10]",
        ),
        (
            &c,
            json!({"prompt": "a", "top_k": -2}),
            "top_k",
            "must be positive",
        ),
        (
            &c,
            json!({"prompt": "a", "logprobs": 21}),
            "logprobs",
            "more than 20",
        ),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            "body",
            "`image_url` are not supported",
        ),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": "x", "mood": 1}]}),
            "body",
            "unknown field `mood`",
        ),
    ] {
        let (st, _, b) = post(url, body.clone()).await;
        assert_eq!(st, 400, "{body}: {b}");
        assert_openai_error(&b, "invalid_request_error", needle);
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
    }
    // The served values of the same fields are taken; nulls ask for nothing.
    for body in [
        json!({"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello", "refusal": null, "annotations": [], "audio": null, "function_call": null, "tool_calls": null},
                            {"role": "user", "content": "again"}],
               "max_tokens": 2, "tools": null, "logprobs": null, "stream": null, "stop": null}),
        json!({"messages": msgs, "response_format": {"type": "text"}, "store": false, "user": "u-1", "max_tokens": 2}),
        json!({"messages": [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                            {"role": "tool", "content": "42", "tool_call_id": "c1"}], "max_tokens": 2}),
    ] {
        let (st, _, b) = post(&chat, body.clone()).await;
        assert_eq!(st, 200, "{body}: {b}");
    }
    // `ignore_eos` goes on past the end-of-sequence token a bias makes certain, to
    // `max_tokens`, showing no text for it; without it, that token ends the completion.
    let eos = (common::VOCAB - 1).to_string();
    for (ignore, finish, tokens) in [(false, "stop", 1), (true, "length", 4)] {
        let body = json!({"prompt": "a", "max_tokens": 4, "temperature": 0,
                          "logit_bias": {eos.as_str(): 100}, "ignore_eos": ignore});
        let (st, _, b) = post(&c, body.clone()).await;
        assert_eq!(st, 200, "{body}: {b}");
        assert_eq!(b["choices"][0]["finish_reason"], finish, "{body}: {b}");
        assert_eq!(b["choices"][0]["text"], "", "{body}: {b}");
        assert_eq!(b["usage"]["completion_tokens"], tokens, "{body}: {b}");
    }
}

/// A completion's `logprobs.tokens` joined, and its per-token log-probabilities.
fn completion_tokens(choice: &Value) -> (Vec<String>, Vec<Value>) {
    let lp = &choice["logprobs"];
    let tokens = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    (tokens, lp["token_logprobs"].as_array().unwrap().clone())
}

#[tokio::test]
async fn logprobs_echo_n_and_bias_do_what_openai_says() {
    let s = server(8, true).await;
    let c = format!("{}/v1/completions", s.url);
    let chat = format!("{}/v1/chat/completions", s.url);

    // Greedy: every chosen token is the most likely one, so its log-probability is the
    // largest of its position's alternatives; the tokens spell the text.
    let (st, _, b) = post(
        &c,
        json!({"prompt": "abc", "max_tokens": 6, "temperature": 0, "logprobs": 3}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let choice = &b["choices"][0];
    let (tokens, lps) = completion_tokens(choice);
    let eos = usize::from(choice["finish_reason"] == "stop");
    assert_eq!(
        tokens.len() + eos,
        b["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        "{b}"
    );
    assert_eq!(tokens.concat(), choice["text"].as_str().unwrap());
    for (j, lp) in lps.iter().enumerate() {
        let lp = lp.as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = choice["logprobs"]["top_logprobs"][j].as_object().unwrap();
        assert!((3..=4).contains(&top.len()), "{top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (best - lp).abs() < 1e-6,
            "greedy picked the most likely token"
        );
        assert_eq!(
            choice["logprobs"]["text_offset"][j], j,
            "one character per token"
        );
    }
    // Streamed, the same tokens with the same log-probabilities.
    let events = sse(
        &c,
        json!({"prompt": "abc", "max_tokens": 6, "temperature": 0, "logprobs": 3, "stream": true}),
    )
    .await;
    let (mut st_tokens, mut st_lps) = (Vec::new(), Vec::new());
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if v["choices"][0]["logprobs"].is_object() {
            let (t, l) = completion_tokens(&v["choices"][0]);
            st_tokens.extend(t);
            st_lps.extend(l);
        }
    }
    assert_eq!(st_tokens, tokens);
    assert_eq!(st_lps, lps);

    // Echo: the prompt comes first, its first token unscored; the first completion
    // token's score is the same as without echo.
    let (st, _, e) = post(
        &c,
        json!({"prompt": "abc", "max_tokens": 6, "temperature": 0, "logprobs": 1, "echo": true}),
    )
    .await;
    assert_eq!(st, 200, "{e}");
    let echoed = &e["choices"][0];
    assert_eq!(
        echoed["text"].as_str().unwrap(),
        format!("abc{}", choice["text"].as_str().unwrap())
    );
    let (etokens, elps) = completion_tokens(echoed);
    assert_eq!(etokens[..3], ["a", "b", "c"]);
    assert!(
        elps[0].is_null() && elps[1].is_number() && elps[2].is_number(),
        "{elps:?}"
    );
    assert_eq!(etokens[3..], tokens[..]);
    if let (Some(x), Some(y)) = (elps.get(3), lps.first()) {
        assert!(
            (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4,
            "{x} vs {y}"
        );
    }
    let (_, _, plain_echo) =
        post(&c, json!({"prompt": "abc", "max_tokens": 2, "echo": true})).await;
    assert!(plain_echo["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("abc"));
    assert!(plain_echo["choices"][0]["logprobs"].is_null());

    // Chat: OpenAI's content list with bytes and alternatives.
    let (st, _, b) = post(
        &chat,
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let content = b["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let text: String = content
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        b["choices"][0]["message"]["content"].as_str().unwrap()
    );
    for t in content {
        assert_eq!(
            t["bytes"].as_array().unwrap().len(),
            t["token"].as_str().unwrap().len()
        );
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(t["top_logprobs"][0]["logprob"], t["logprob"]);
    }
    let (_, _, none) = post(
        &chat,
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await;
    assert!(none["choices"][0]["logprobs"].is_null());

    // A bias of +100 decides even greedy decoding; a frequency penalty then wears it
    // down until the runner-up (biased 10 lower) gets its turn.
    let biased = json!({"prompt": "abc", "max_tokens": 16, "temperature": 0, "logit_bias": {"5": 100, "6": 90}});
    let (_, _, b) = post(&c, biased.clone()).await;
    assert_eq!(b["choices"][0]["text"], "f".repeat(16));
    let mut penalised = biased;
    penalised["frequency_penalty"] = json!(2.0);
    let (_, _, b) = post(&c, penalised).await;
    let text = b["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("ff") && text.contains('g'), "{text}");

    // n: one response with every choice, reproducible by seed.
    let three = json!({"prompt": "abc", "max_tokens": 4, "n": 3, "seed": 7, "temperature": 1});
    let (st, _, b) = post(&c, three.clone()).await;
    assert_eq!(st, 200, "{b}");
    let choices = b["choices"].as_array().unwrap();
    assert_eq!(
        choices
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let completion = b["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((3..=12).contains(&completion), "{b}");
    let (_, _, again) = post(&c, three).await;
    assert_eq!(b["choices"], again["choices"]);
    // The choices of a long prompt compute it once: the others share its full blocks.
    let long = "the quick brown fox jumps over the lazy dog, again and again";
    let before = s.state.metrics.prefix_cache_hits.get();
    let (st, _, b) = post(&c, json!({"prompt": long, "max_tokens": 2, "n": 3})).await;
    assert_eq!(st, 200, "{b}");
    let shared = s.state.metrics.prefix_cache_hits.get() - before;
    assert!(
        shared >= 2 * 48,
        "3 blocks of 16 for each later choice: {shared}"
    );
    // Streamed, each choice finishes under its own index, then one [DONE].
    let events = sse(&chat, json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "stream": true})).await;
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut finished: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|v| v["choices"][0]["finish_reason"].is_string())
        .map(|v| v["choices"][0]["index"].as_u64().unwrap())
        .collect();
    finished.sort_unstable();
    assert_eq!(finished, [0, 1]);
}
