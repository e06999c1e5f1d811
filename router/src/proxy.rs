//! The OpenAI endpoint: reads a request's `model` and prompt, has `Router::route` pick
//! a replica (holding the request while none can take it), and relays the answer as it
//! comes, byte for byte, so SSE streams token by token with the client's backpressure.
//!
//! - Sent again to another replica when the picked one refuses the connection, fails
//!   before answering, is draining (503) or full (429): nothing has reached the client
//!   yet, so the retry is invisible to it.
//! - A client that goes away drops the relay, which drops the upstream connection: the
//!   worker stops generating for it.
//! - `x-request-id` is taken from the client or made, sent to the worker and returned.
//! - `x-gpuscale-route` says which replica took the request and why.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::Uri;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures::Stream;
use serde_json::{json, Value};

use crate::prefix;
use crate::route::{Refusal, Router, Ticket};

/// The largest request body relayed (the worker's own limit is 2 MiB).
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Replicas tried for one request before the router gives up with 502.
pub const MAX_ATTEMPTS: usize = 4;
/// The header naming the replica and the reason it was picked.
pub const ROUTE_HEADER: &str = "x-gpuscale-route";

#[derive(Clone)]
struct AppState {
    router: Arc<Router>,
    http: reqwest::Client,
}

/// The router's HTTP API.
pub fn app(router: Arc<Router>, http: reqwest::Client) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(relay))
        .route("/v1/chat/completions", post(relay))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such route; the router serves /v1/completions, /v1/chat/completions and /v1/models",
                None,
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState { router, http })
}

/// An OpenAI-shaped error.
fn error(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response {
    let code = match status {
        StatusCode::TOO_MANY_REQUESTS => Some("rate_limit_exceeded"),
        StatusCode::NOT_FOUND if param == Some("model") => Some("model_not_found"),
        _ => None,
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": param, "code": code}})),
    )
        .into_response()
}

fn with_retry_after(mut r: Response, seconds: u64) -> Response {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    r
}

/// The text whose leading blocks decide prefix affinity: the prompt, or the chat's
/// messages in order (role and text of each; the chat template adds the same framing
/// to every request, so it does not change which requests share a prefix).
pub fn prompt_text(body: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value, out: &mut String| match v {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                match p {
                    Value::String(s) => out.push_str(s),
                    Value::Object(o) => {
                        if let Some(Value::String(s)) = o.get("text") {
                            out.push_str(s);
                        }
                    }
                    other => out.push_str(&other.to_string()),
                }
            }
        }
        Value::Null => {}
        other => out.push_str(&other.to_string()),
    };
    if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            out.push_str(m.get("role").and_then(Value::as_str).unwrap_or(""));
            out.push('\n');
            text(m.get("content").unwrap_or(&Value::Null), &mut out);
            out.push('\n');
        }
    } else if let Some(p) = body.get("prompt") {
        text(p, &mut out);
    }
    out
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 200)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string)
}

async fn relay(State(s): State<AppState>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = Instant::now();
    let id = request_id(&headers);
    let mut r = relay_inner(&s, uri.path(), &id, body, arrived).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

async fn relay_inner(
    s: &AppState,
    path: &str,
    id: &str,
    body: Bytes,
    arrived: Instant,
) -> Response {
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("the body is not JSON: {e}"),
                None,
            )
        }
    };
    let Some(model) = parsed.get("model").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "`model` is required: the router sends each request to the deployment serving that model (GET /v1/models lists them)",
            Some("model"),
        );
    };
    let blocks = prefix::blocks(model, &prompt_text(&parsed));
    let mut tried = HashSet::new();
    let mut last_failure = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        let ticket = match s.router.route(model, &blocks, &tried, arrived).await {
            Ok(t) => t,
            Err(refusal) => return refused(&s.router, refusal, model, id, arrived),
        };
        let sent = s
            .http
            .post(format!("{}{path}", ticket.url))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", id)
            .body(body.clone())
            .send()
            .await;
        let why = match sent {
            Err(e) => {
                ticket.mark_down(Instant::now());
                last_failure = format!("{}: {e}", ticket.pod);
                if e.is_connect() {
                    "connect"
                } else {
                    "no-answer"
                }
            }
            Ok(resp) if resp.status() == StatusCode::SERVICE_UNAVAILABLE => {
                last_failure = format!("{}: 503 (draining or not ready)", ticket.pod);
                "unavailable"
            }
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                last_failure = format!("{}: 429 (its queue is full)", ticket.pod);
                "full"
            }
            Ok(resp) => return answer(&s.router, ticket, resp, id, model, arrived, attempt),
        };
        tracing::info!(request_id = id, pod = %ticket.pod, why, "sending to another replica");
        s.router.metrics.retried(&ticket.key, why);
        tried.insert(ticket.pod.clone());
    }
    error(
        StatusCode::BAD_GATEWAY,
        "server_error",
        &format!("no replica answered after {MAX_ATTEMPTS} attempts; the last: {last_failure}"),
        None,
    )
}

fn refused(router: &Router, refusal: Refusal, model: &str, id: &str, arrived: Instant) -> Response {
    let held_ms = arrived.elapsed().as_millis() as u64;
    let r = match &refusal {
        Refusal::UnknownModel => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("the model `{model}` does not exist: no InferenceDeployment the router watches serves it (GET /v1/models lists those that do)"),
            Some("model"),
        ),
        Refusal::Timeout { retry_after, .. } => with_retry_after(
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                &format!("no replica of `{model}` could take the request within {:.0} s; try again later", held_ms as f64 / 1000.0),
                None,
            ),
            *retry_after,
        ),
        Refusal::QueueFull { retry_after, .. } => with_retry_after(
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                &format!("too many requests for `{model}` are waiting for a replica; try again later"),
                None,
            ),
            *retry_after,
        ),
    };
    if let Refusal::Timeout { key, .. } | Refusal::QueueFull { key, .. } = &refusal {
        router.metrics.answered(key, r.status().as_u16());
    }
    tracing::info!(
        target: "gpuscale_router::request",
        request_id = id, model, status = r.status().as_u16(), held_ms, outcome = ?refusal,
        "request refused"
    );
    r
}

fn answer(
    router: &Router,
    ticket: Ticket,
    resp: reqwest::Response,
    id: &str,
    model: &str,
    arrived: Instant,
    attempts: usize,
) -> Response {
    let status = resp.status();
    router.metrics.answered(&ticket.key, status.as_u16());
    let mut out = Response::builder().status(status.as_u16());
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
    ] {
        if let Some(v) = resp.headers().get(&name) {
            out = out.header(name, v.as_bytes());
        }
    }
    let route = format!(
        "pod={}; reason={}; prefix={}/{}; load={:.0}; attempts={attempts}",
        ticket.pod, ticket.reason, ticket.matched, ticket.blocks, ticket.load
    );
    out = out.header(ROUTE_HEADER, route);
    let streaming = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let relay = Relay {
        upstream: Box::pin(resp.bytes_stream()),
        streaming,
        last_chunk: None,
        log: RequestLog {
            id: id.to_string(),
            model: model.to_string(),
            status: status.as_u16(),
            arrived,
            first_byte: None,
            bytes: 0,
            outcome: "client went away",
            attempts,
        },
        ticket,
    };
    out.body(Body::from_stream(relay)).unwrap_or_else(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
            None,
        )
    })
}

/// What the per-request log line says.
struct RequestLog {
    id: String,
    model: String,
    status: u16,
    arrived: Instant,
    first_byte: Option<f64>,
    bytes: usize,
    outcome: &'static str,
    attempts: usize,
}

/// The worker's answer on its way to the client; the request counts against its
/// replica until this is dropped (finished, failed or abandoned by the client).
struct Relay {
    upstream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// An SSE stream: the gaps between its chunks are inter-token latency.
    streaming: bool,
    last_chunk: Option<Instant>,
    ticket: Ticket,
    log: RequestLog,
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.upstream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let (key, revision) = (&this.ticket.key, &this.ticket.revision);
                let metrics = &this.ticket.router().metrics;
                let now = Instant::now();
                if this.log.first_byte.is_none() {
                    let t = this.log.arrived.elapsed().as_secs_f64();
                    this.log.first_byte = Some(t);
                    metrics.first_byte(key, t);
                    metrics.version_first_byte(key, revision, t);
                } else if let (true, Some(last)) = (this.streaming, this.last_chunk) {
                    metrics.version_gap(key, revision, (now - last).as_secs_f64());
                }
                this.last_chunk = Some(now);
                this.log.bytes += chunk.len();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                // Part of the answer is with the client already: nothing to retry. The
                // error ends the response, and the client sees it cut short.
                this.log.outcome = "replica failed mid-answer";
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => {
                this.log.outcome = "done";
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let l = &self.log;
        let outcome = match l.outcome {
            _ if l.status >= 500 => "error",
            "replica failed mid-answer" => "error",
            "done" => "ok",
            _ => "cancelled",
        };
        self.ticket.router().metrics.version_answer(
            &self.ticket.key,
            &self.ticket.revision,
            outcome,
        );
        tracing::info!(
            target: "gpuscale_router::request",
            request_id = %l.id,
            model = %l.model,
            deployment = %self.ticket.key,
            pod = %self.ticket.pod,
            reason = self.ticket.reason.as_str(),
            prefix_blocks = self.ticket.blocks,
            prefix_matched = self.ticket.matched,
            status = l.status,
            attempts = l.attempts,
            ttft_ms = l.first_byte.map(|t| (t * 1000.0) as u64),
            duration_ms = l.arrived.elapsed().as_millis() as u64,
            bytes = l.bytes,
            outcome = l.outcome,
            "request"
        );
    }
}

async fn models(State(s): State<AppState>) -> Response {
    let table = s.router.table();
    let data: Vec<Value> = table
        .models()
        .map(|(name, pool)| {
            json!({
                "id": name,
                "object": "model",
                "created": pool.created,
                "owned_by": pool.key.to_string(),
                "ready_replicas": pool.replicas.len(),
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.router.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.router.synced() {
        "ready".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "listing deployments and pods",
        )
            .into_response()
    }
}
