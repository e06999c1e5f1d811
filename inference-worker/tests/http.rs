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
        (json!({"prompt": "a", "n": 2}), "only n = 1"),
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
