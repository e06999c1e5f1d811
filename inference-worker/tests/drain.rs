//! SIGTERM drains the real worker binary serving SmolLM2: readiness goes false, new
//! requests get 503, every in-flight request (streamed or not) completes, exit status 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `/readyz` until the worker at `url` is ready (a minute at most).
async fn wait_ready(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .get(format!("{url}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "worker never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let Some(model) = gguf::smollm2_fixture() else {
        return;
    };
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args([
            "--threads",
            "2",
            "--max-batch",
            "4",
            "--memory-budget",
            "400MiB",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_ready(&client, &url).await;
    // Four requests in flight: two streamed, two whole; 40 tokens each.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            let body = json!({"prompt": format!("Story number {i}:"), "max_tokens": 40, "temperature": 0, "stream": stream});
            let r = client.post(format!("{url}/v1/completions")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            if stream {
                assert!(text.trim_end().ends_with("data: [DONE]"), "stream {i} cut short: {text}");
                let last: Value = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter(|d| *d != "[DONE]")
                    .map(|d| serde_json::from_str(d).unwrap())
                    .next_back()
                    .unwrap();
                last["choices"][0]["finish_reason"].as_str().unwrap().to_string()
            } else {
                let v: Value = serde_json::from_str(&text).unwrap();
                let reason = v["choices"][0]["finish_reason"].as_str().unwrap().to_string();
                if reason == "length" {
                    assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
                }
                reason
            }
        }));
    }
    // Wait until the worker has all four running, then SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.contains("gpuscale_worker_running_sequences 4") {
            break;
        }
        assert!(Instant::now() < deadline, "requests never started:\n{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = client.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "readiness must go false while draining"
    );
    let late = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "late"}))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 503);
    let body: Value = late.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{body}"
    );
    for t in tasks {
        // Finished by length or by the model's end token: either way, completed.
        let reason = t.await.unwrap();
        assert!(reason == "length" || reason == "stop", "{reason}");
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    // One structured log line per request, with its id and token counts.
    let out = BufReader::new(child.stdout.take().unwrap());
    let lines: Vec<Value> = out
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 4, "{lines:?}");
    for r in requests {
        assert_eq!(r["fields"]["status"], 200);
        assert!(r["fields"]["completion_tokens"].as_u64().unwrap() >= 1);
        assert!(r["fields"]["request_id"]
            .as_str()
            .unwrap()
            .starts_with("cmpl-"));
    }
}

/// A drain that runs past `--drain-timeout-seconds` stops on time: the requests still
/// running end with an error event and `[DONE]` (never a cut connection), and the exit
/// status says the drain failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_past_its_timeout_ends_streams_properly_and_on_time() {
    let Some(model) = gguf::smollm2_fixture() else {
        return;
    };
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .args(["--model", model.to_str().unwrap(), "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--threads", "2"])
        .args(["--memory-budget", "400MiB", "--drain-timeout-seconds", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_ready(&client, &url).await;
    // Two streams far longer than the drain timeout (1,900 tokens at tens a second),
    // greedy on a prompt the model goes on counting from, so none ends early by itself.
    let mut tasks = Vec::new();
    for i in 0..2 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let prompt = (1..=20 + i)
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let body = json!({"prompt": prompt, "max_tokens": 1900,
                              "temperature": 0, "stream": true});
            let r = client
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            r.text().await.unwrap()
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let term = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    for t in tasks {
        let text = t.await.unwrap();
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "cut short: {text}"
        );
        assert!(text.contains("drain timeout"), "no error event: {text}");
    }
    let status = child.wait().unwrap();
    let took = term.elapsed();
    assert!(
        !status.success(),
        "a drain that cut requests must not exit 0"
    );
    // The timeout, one engine step and at most a second to close the responses.
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
}
