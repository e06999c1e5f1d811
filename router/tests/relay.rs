//! The router's HTTP behaviour against stand-in workers (axum servers on loopback
//! addresses, as the simulated kubelet gives pods): holding and releasing, refusals,
//! retries before the first byte, streaming, cancellation, request ids and the route
//! header. The table is fed as the watches would feed it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use gpuscale_router::table::Table;
use gpuscale_router::{proxy, HoldConfig, Router};
use serde_json::{json, Value};

/// What a stand-in worker saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    /// Streams that ended because the client went away.
    cancelled: AtomicUsize,
    ids: Mutex<Vec<String>>,
}

#[derive(Clone)]
struct Fake {
    seen: Arc<Seen>,
    /// Status to answer with (200 streams five chunks 100 ms apart).
    status: u16,
}

struct CancelGuard(Arc<Seen>, bool);
impl CancelGuard {
    fn finish(&mut self) {
        self.1 = true;
    }
}
impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn generate(State(f): State<Fake>, headers: HeaderMap) -> Response {
    f.seen.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(id) = headers.get("x-request-id") {
        f.seen.ids.lock().unwrap().push(id.to_str().unwrap().into());
    }
    if f.status != 200 {
        return (
            axum::http::StatusCode::from_u16(f.status).unwrap(),
            "{\"error\":{}}",
        )
            .into_response();
    }
    let guard = CancelGuard(f.seen.clone(), false);
    let chunks = futures::stream::unfold((0, guard), |(i, mut guard)| async move {
        if i == 5 {
            guard.finish();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let line = format!("data: {{\"i\":{i}}}\n\n");
        Some((Ok::<_, std::io::Error>(line), (i + 1, guard)))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}

/// A stand-in worker on `ip:port`.
async fn worker(ip: &str, port: u16, status: u16) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(generate))
        .route("/v1/completions", post(generate))
        .with_state(Fake {
            seen: seen.clone(),
            status,
        });
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    seen
}

/// A free port (on 127.0.0.1; the stand-ins use it on other loopback addresses).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn table(port: u16, ready_pods: &[(&str, &str)]) -> Table {
    let d = serde_json::from_value(json!({
        "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
        "metadata": {"name": "smollm", "namespace": "default",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"model": {"name": "smol", "source": "file:///models/m.gguf"},
                 "resources": {"maxBatchSize": 2}, "worker": {"port": port}},
        "status": {"measuredReadySeconds": 7.0}
    }))
    .unwrap();
    let pods: Vec<_> = ready_pods
        .iter()
        .map(|(name, ip)| {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "default",
                                 "labels": {"gpuscale.dev/deployment": "smollm",
                                            "gpuscale.dev/serving": "true"}},
                    "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
                }))
                .unwrap(),
            )
        })
        .collect();
    Table::build(&[Arc::new(d)], &pods)
}

async fn router(hold: Duration, max_held: usize) -> (Arc<Router>, SocketAddr) {
    let r = Router::new(HoldConfig {
        timeout: hold,
        max_held,
    });
    let app = proxy::app(r.clone(), reqwest::Client::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, addr)
}

fn chat(system: &str, user: &str) -> Value {
    json!({"model": "smol", "stream": true, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": user}]})
}

async fn post_chat(addr: SocketAddr, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("x-request-id", "req-1")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_request_at_zero_replicas_is_held_until_one_is_ready_then_streams() {
    let port = free_port();
    let (r, addr) = router(Duration::from_secs(30), 10).await;
    r.set_table(table(port, &[]), true);
    let held = tokio::spawn(async move {
        let t = Instant::now();
        let resp = post_chat(addr, &chat("sys", "hi")).await;
        (t, resp)
    });
    // Held: counted, and visible to the autoscaler in /metrics.
    let key = r.table().pool("smol").unwrap().key.clone();
    for _ in 0..50 {
        if r.held(&key) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.held(&key), 1);
    let page = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(
            "gpuscale_router_held_requests{namespace=\"default\",deployment=\"smollm\"} 1"
        ),
        "{page}"
    );
    // A replica becomes ready 300 ms later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = worker("127.0.0.2", port, 200).await;
    let ready_at = Instant::now();
    r.set_table(table(port, &[("smollm-0", "127.0.0.2")]), true);
    let (t, resp) = held.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-1");
    let route = resp.headers()[proxy::ROUTE_HEADER]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        route.starts_with("pod=smollm-0; reason=least-loaded"),
        "{route}"
    );
    // Streamed: the first chunk arrives long before the last (5 × 100 ms).
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let first_at = Instant::now();
    assert!(String::from_utf8_lossy(&first).contains("\"i\":0"));
    let mut rest = Vec::new();
    while let Some(c) = body.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).contains("\"i\":4"));
    assert!(Instant::now() - first_at > Duration::from_millis(300));
    // The held request went out as soon as the replica was there: its wait is the
    // replica's arrival plus the first chunk's 100 ms, not a polling period.
    let overhead = first_at - ready_at;
    assert!(overhead < Duration::from_millis(400), "{overhead:?}");
    assert!(first_at - t > Duration::from_millis(300));
    assert_eq!(seen.ids.lock().unwrap().as_slice(), ["req-1"]);
    assert_eq!(r.held(&key), 0);
}

#[tokio::test]
async fn a_full_hold_queue_is_429_and_a_hold_that_runs_out_is_503_with_retry_after() {
    let port = free_port();
    let (r, addr) = router(Duration::from_millis(500), 1).await;
    r.set_table(table(port, &[]), true);
    let first = tokio::spawn(async move { post_chat(addr, &chat("s", "a")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = post_chat(addr, &chat("s", "b")).await;
    assert_eq!(second.status(), 429);
    assert_eq!(
        second.headers()["retry-after"],
        "7",
        "the measured ready time"
    );
    let v: Value = second.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let first = first.await.unwrap();
    assert_eq!(first.status(), 503);
    assert_eq!(first.headers()["retry-after"], "7");
    let v: Value = first.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no replica of `smol`"));
}

#[tokio::test]
async fn unknown_models_and_bad_bodies_are_refused_in_openai_shape() {
    let (r, addr) = router(Duration::from_secs(1), 10).await;
    r.set_table(table(free_port(), &[]), true);
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"model": "nope", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    let resp = http
        .post(format!("http://{addr}/v1/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "model");
    // /v1/models lists the deployment even at zero replicas.
    let v: Value = http
        .get(format!("http://{addr}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "smol");
    assert_eq!(v["data"][0]["owned_by"], "default/smollm");
}

#[tokio::test]
async fn a_refused_connection_or_a_draining_replica_is_retried_on_another() {
    let port = free_port();
    let (r, addr) = router(Duration::from_secs(5), 10).await;
    // 127.0.0.3 has no worker (connection refused); 127.0.0.4 is draining (503).
    let draining = worker("127.0.0.4", port, 503).await;
    let good = worker("127.0.0.5", port, 200).await;
    r.set_table(
        table(
            port,
            &[
                ("smollm-0", "127.0.0.3"),
                ("smollm-1", "127.0.0.4"),
                ("smollm-2", "127.0.0.5"),
            ],
        ),
        true,
    );
    for i in 0..3 {
        let resp = post_chat(addr, &chat("s", &format!("q{i}"))).await;
        assert_eq!(resp.status(), 200);
        let route = resp.headers()[proxy::ROUTE_HEADER]
            .to_str()
            .unwrap()
            .to_string();
        assert!(route.starts_with("pod=smollm-2"), "{route}");
        resp.bytes().await.unwrap();
    }
    assert_eq!(good.requests.load(Ordering::SeqCst), 3);
    assert!(draining.requests.load(Ordering::SeqCst) >= 1);
    let page = r.metrics.encode();
    assert!(page.contains("why=\"connect\""), "{page}");
    assert!(page.contains("why=\"unavailable\""), "{page}");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_request() {
    let port = free_port();
    let (r, addr) = router(Duration::from_secs(5), 10).await;
    let seen = worker("127.0.0.6", port, 200).await;
    r.set_table(table(port, &[("smollm-0", "127.0.0.6")]), true);
    let resp = post_chat(addr, &chat("s", "bye")).await;
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    for _ in 0..50 {
        if seen.cancelled.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.cancelled.load(Ordering::SeqCst), 1);
    // And the replica's slot is free again.
    let page = r.metrics.encode();
    assert!(
        page.contains(
            "gpuscale_router_in_flight_requests{namespace=\"default\",deployment=\"smollm\"} 0"
        ),
        "{page}"
    );
}

#[tokio::test]
async fn a_shared_system_prompt_sticks_to_one_replica_until_it_is_loaded() {
    let port = free_port();
    let (r, addr) = router(Duration::from_secs(5), 100).await;
    let a = worker("127.0.0.7", port, 200).await;
    let b = worker("127.0.0.8", port, 200).await;
    r.set_table(
        table(
            port,
            &[("smollm-0", "127.0.0.7"), ("smollm-1", "127.0.0.8")],
        ),
        true,
    );
    let system = "You are a careful assistant. ".repeat(20);
    // One after another: every request after the first goes where the prefix is.
    let mut reasons = HashMap::new();
    let mut pods = HashMap::new();
    for i in 0..4 {
        let resp = post_chat(addr, &chat(&system, &format!("question {i}"))).await;
        let route = resp.headers()[proxy::ROUTE_HEADER]
            .to_str()
            .unwrap()
            .to_string();
        resp.bytes().await.unwrap();
        let pod = route.split(';').next().unwrap().to_string();
        let reason = route
            .split("reason=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        *pods.entry(pod).or_insert(0) += 1;
        *reasons.entry(reason).or_insert(0) += 1;
    }
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(reasons.get("prefix"), Some(&3), "{reasons:?}");
    // Four at once (capacity 4 per replica): the bound spreads them.
    let sends: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                post_chat(
                    addr,
                    &chat(
                        &"You are a careful assistant. ".repeat(20),
                        &format!("burst {i}"),
                    ),
                )
                .await
            })
        })
        .collect();
    for s in sends {
        s.await.unwrap().bytes().await.unwrap();
    }
    let (na, nb) = (
        a.requests.load(Ordering::SeqCst),
        b.requests.load(Ordering::SeqCst),
    );
    assert_eq!(na + nb, 8);
    // The first three of the burst stay within the bound on the prefix holder; the
    // fourth would put it at 3 against a mean of 1.5 and goes to the other.
    assert_eq!((na, nb), (7, 1), "the burst is spread");
    let page = r.metrics.encode();
    assert!(page.contains("reason=\"prefix-over-bound\""), "{page}");
}
