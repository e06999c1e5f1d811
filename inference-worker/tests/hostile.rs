//! The worker against a hostile but fair client (issue #23), on the real binary serving
//! SmolLM2: the worst prompts (long runs of one letter, of one non-ASCII script) are
//! tokenized off the async executor in linear time, so the probes and metrics keep
//! answering while they are; a prompt too long to ever fit is refused before any work.

mod common;

use std::time::{Duration, Instant};

use common::process::{start, start_with};
use inference_worker::tokenizer::Tokenizer;
use serde_json::{json, Value};

/// The most bytes a prompt may have before it is refused unread: 2048 tokens of the
/// vocabulary's longest token.
fn byte_limit(model: &std::path::Path) -> usize {
    let bytes = std::fs::read(model).unwrap();
    let t = Tokenizer::from_gguf(&gguf::Gguf::parse(&bytes).unwrap()).unwrap();
    2048 * t.max_token_bytes()
}

async fn chat(url: &str, content: String) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": content}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_answer_while_the_worst_prompts_are_tokenized() {
    let Some(model) = gguf::smollm2_fixture() else {
        return;
    };
    let w = start(&model).await;
    // Right under the size limit, so each is tokenized in full (then refused: far more
    // than 2048 tokens). Before the fix one such prompt took minutes on a request thread.
    let n = byte_limit(&model).min(400_000) - 1000;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let content = if i % 2 == 0 {
            "a".repeat(n)
        } else {
            "日".repeat(n / 3)
        };
        let url = w.url.clone();
        tasks.push(tokio::spawn(async move { chat(&url, content).await }));
    }
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        for path in ["/healthz", "/metrics"] {
            let t = Instant::now();
            let r = probe.get(format!("{}{path}", w.url)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            slowest = slowest.max(t.elapsed());
            probes += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("maximum context length"),
            "{body}"
        );
    }
    eprintln!("{probes} probes while 6 worst-case prompts were tokenized; slowest {slowest:?}");
    // A liveness probe's default timeout is 1 s; it must never come near it.
    assert!(
        slowest < Duration::from_millis(900),
        "slowest probe {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_too_long_to_ever_fit_is_refused_before_tokenizing() {
    let Some(model) = gguf::smollm2_fixture() else {
        return;
    };
    let w = start(&model).await;
    let (status, body) = chat(&w.url, "a".repeat(byte_limit(&model) + 1)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "messages");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("bytes"),
        "{body}"
    );
}

/// A client that sends half a request's headers and stops gets its connection closed
/// after `--header-read-timeout-seconds`, instead of holding it open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(model) = gguf::smollm2_fixture() else {
        return;
    };
    let w = start_with(&model, &["--header-read-timeout-seconds", "1"]).await;
    let addr = w.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: worker\r\n")
        .await
        .unwrap();
    let sent = Instant::now();
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await;
    let waited = sent.elapsed();
    match read {
        Ok(Ok(n)) => {
            // Closed (0), or an error status written before closing.
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
        }
        Ok(Err(_)) => {} // reset
        Err(_) => panic!("the half-sent request was still open after 10 s"),
    }
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    // Meanwhile the worker serves others.
    assert_eq!(
        reqwest::get(format!("{}/healthz", w.url))
            .await
            .unwrap()
            .status(),
        200
    );
}
