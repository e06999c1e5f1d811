//! The HTTP API (axum): OpenAI-compatible completions and chat completions, plain or as
//! server-sent events, `/v1/models`, health and readiness probes, and `/metrics`.
//! Handlers validate, tokenize and hand the request to the engine; the engine's events
//! become the response body. A client that goes away drops the receiver, which is how
//! the engine learns to free the sequence.

pub mod openai;
pub mod tools;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use crate::metrics::{Metrics, StatusLabel};
use crate::scheduler::grammar::Grammars;
use crate::scheduler::sampling::{Sampling, TokenLogprobs};
use crate::scheduler::{Event, GenerateRequest, Handle, SubmitError};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use openai::{error_body, ChatRequest, CompletionRequest, Envelope, Kind, Params, Usage};

/// The parts that exist once the model is loaded.
pub struct Loaded {
    /// The engine.
    pub engine: Handle,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template.
    pub chat: ChatTemplate,
    /// Longest sequence (prompt + completion).
    pub max_seq_len: usize,
}

/// Everything the handlers share. The server starts before the model loads so that
/// probes answer (`/readyz` 503 "loading") while weights are read.
pub struct AppState {
    loaded: OnceLock<Loaded>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Name served as the model id.
    pub model_name: String,
    /// Set once weights are loaded and the warm-up pass ran.
    pub ready: AtomicBool,
    next_id: AtomicU64,
    /// Request preparations running off the executor (one per core).
    preparing: tokio::sync::Semaphore,
    /// The model's vocabulary indexed for structured output, built on first use.
    grammars: tokio::sync::OnceCell<Result<Arc<Grammars>, String>>,
    /// Share of completion requests answered with an injected 500 (`--fail-percent`),
    /// and the completion requests seen, which spread the failures evenly.
    fail_percent: u32,
    completions_seen: AtomicU64,
}

impl AppState {
    /// Shared state with no model yet.
    pub fn new(metrics: Arc<Metrics>, model_name: String) -> AppState {
        AppState {
            loaded: OnceLock::new(),
            metrics,
            model_name,
            ready: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            preparing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            grammars: tokio::sync::OnceCell::new(),
            fail_percent: 0,
            completions_seen: AtomicU64::new(0),
        }
    }

    /// Installs the loaded model and marks the worker ready.
    pub fn set_loaded(&self, loaded: Loaded) {
        if self.loaded.set(loaded).is_ok() {
            self.ready.store(true, Ordering::SeqCst);
            self.metrics.ready.set(1);
        }
    }

    /// The loaded model, or 503 while loading.
    fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.loaded
            .get()
            .filter(|_| self.ready.load(Ordering::SeqCst))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the model is still loading",
                )
            })
    }

    fn draining(&self) -> bool {
        self.loaded.get().is_some_and(|l| l.engine.is_draining())
    }
}

/// Fault injection for rollout and reliability tests, as Istio's HTTP fault injection
/// does it: this share of completion requests gets a 500 before any work.
impl AppState {
    /// Answers `percent` of completion requests with an injected 500.
    pub fn with_fail_percent(mut self, percent: u32) -> AppState {
        self.fail_percent = percent.min(100);
        self
    }
}

/// Whether the next completion request fails by injection: request k of every 100
/// fails when k·p/100 crosses a whole number, so the share is exact over any 100.
async fn inject_faults(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.fail_percent > 0 {
        let k = s.completions_seen.fetch_add(1, Ordering::Relaxed);
        let p = u64::from(s.fail_percent);
        if (k + 1) * p / 100 > k * p / 100 {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!(
                    "injected fault: this worker runs with --fail-percent {}",
                    s.fail_percent
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    let faults = axum::middleware::from_fn_with_state(Arc::clone(&state), inject_faults);
    Router::new()
        .route("/v1/completions", post(completions).layer(faults.clone()))
        .route("/v1/chat/completions", post(chat_completions).layer(faults))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "no such route; see /v1/models, /v1/completions, /v1/chat/completions",
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!(
                    "{method} is not allowed here: the completion routes take POST, the others GET"
                ),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(header_limits))
        .with_state(state)
}

/// The most header bytes (names and values) and header fields a request may carry.
/// The connection's own limits (`MAX_HEADER_BUF`, `MAX_HEADER_FIELDS`) are set higher,
/// so a request over these gets this OpenAI-shaped 431 rather than hyper's empty one.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// See [`MAX_HEADER_BYTES`].
pub const MAX_HEADERS: usize = 100;
/// hyper's read buffer for a request head: above [`MAX_HEADER_BYTES`].
pub const MAX_HEADER_BUF: usize = 1 << 20;
/// hyper's header field limit: above [`MAX_HEADERS`].
pub const MAX_HEADER_FIELDS: usize = 1000;

async fn header_limits(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if bytes > MAX_HEADER_BYTES || headers.len() > MAX_HEADERS {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request headers ({} fields, {bytes} bytes) are over the limit of \
                 {MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes",
                headers.len()
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// The largest request body read (2 MiB): far above any prompt a sequence can hold.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The body, or an OpenAI error when it cannot be read (413 past `MAX_BODY_BYTES`).
fn body_of(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than {MAX_BODY_BYTES} bytes")
        } else {
            e.body_text()
        };
        ApiError {
            param: None,
            ..ApiError::new(status, "invalid_request_error", message)
        }
    })
}

/// An error as OpenAI shapes it, with the status and (for 429) Retry-After.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }
    fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.status {
            StatusCode::TOO_MANY_REQUESTS => Some("rate_limit_exceeded"),
            StatusCode::NOT_FOUND if self.param.as_deref() == Some("model") => {
                Some("model_not_found")
            }
            _ => None,
        };
        let mut r = (
            self.status,
            Json(error_body(
                &self.message,
                self.kind,
                self.param.as_deref(),
                code,
            )),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(Ordering::SeqCst) && !s.draining() {
        "ready".into_response()
    } else {
        let why = if s.draining() { "draining" } else { "loading" };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    // What a request can really use: the KV cache may hold less than max_seq_len.
    let max = s.loaded.get().map(|l| l.engine.max_context());
    Json(json!({"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": 0, "owned_by": "gpuscale", "max_model_len": max,
    }]}))
}

/// Parses JSON ourselves so a malformed body gets an OpenAI error, not axum's text, and
/// refuses every field the endpoint does not serve before reading the others.
fn parse<T: serde::de::DeserializeOwned>(kind: Kind, body: &Bytes) -> Result<T, ApiError> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("invalid JSON body: {e}")))?;
    let serde_json::Value::Object(fields) = &mut v else {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    };
    // A null asks for nothing: clients send unset fields as null, and an assistant
    // message sent back as the client library returned it has `refusal: null`,
    // `annotations: []` and the like.
    fields.retain(|_, v| !v.is_null());
    if let Some(serde_json::Value::Array(messages)) = fields.get_mut("messages") {
        for m in messages.iter_mut().filter_map(|m| m.as_object_mut()) {
            m.retain(|k, v| !(v.is_null() || k == "annotations" && v == &json!([])));
        }
    }
    let fields = &*fields;
    openai::check_fields(kind, fields).map_err(|(param, m)| ApiError::invalid(param, m))?;
    serde_json::from_value(v)
        .map_err(|e| ApiError::invalid("body", format!("invalid request: {e}")))
}

/// The most alternatives per token (`top_logprobs`, completions' `logprobs`), as
/// OpenAI's chat endpoint allows.
const MAX_TOP_LOGPROBS: u32 = 20;

fn top_logprobs(param: &'static str, n: u32) -> Result<usize, ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            param,
            format!("{param} {n} is more than {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(n as usize)
}

async fn completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let req: CompletionRequest = parse(Kind::Completion, &body_of(body)?)?;
        s.loaded()?;
        let n = req.params.n.unwrap_or(1);
        if req.best_of.is_some_and(|b| b != n) {
            return Err(ApiError::invalid(
                "best_of",
                "best_of must equal n: every candidate is returned, ranking them is not implemented",
            ));
        }
        let logprobs = req
            .logprobs
            .map(|k| top_logprobs("logprobs", k))
            .transpose()?;
        let prompts = req.prompt.into_vec();
        let [prompt] = prompts.as_slice() else {
            return Err(ApiError::invalid(
                "prompt",
                "exactly one prompt per request is supported",
            ));
        };
        let tokens = tokenize(&s, "prompt", prompt.clone()).await?;
        let ask = Ask {
            kind: Kind::Completion,
            logprobs,
            echo: req.echo.then(|| prompt.clone()),
            tools: false,
            schema: None,
        };
        // OpenAI's default for completions is 16 tokens.
        run(&s, ask, tokens, req.params, 16, started).await
    }
    .await;
    finish_error(&s, result, started)
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let req: ChatRequest = parse(Kind::Chat, &body_of(body)?)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let schema = req
            .response_format
            .as_ref()
            .map(response_schema)
            .transpose()?
            .flatten();
        if req.store == Some(true) {
            return Err(ApiError::invalid(
                "store",
                "this worker stores nothing: store must be false or absent",
            ));
        }
        let choice = tools::ToolChoice::parse(req.tool_choice.as_ref())
            .map_err(|m| ApiError::invalid("tool_choice", m))?;
        let plan = match &req.tools {
            None if req.tool_choice.is_some() => {
                return Err(ApiError::invalid("tool_choice", "tool_choice needs tools"))
            }
            None if req.parallel_tool_calls.is_some() => {
                return Err(ApiError::invalid(
                    "parallel_tool_calls",
                    "parallel_tool_calls needs tools",
                ))
            }
            Some(_) if choice == tools::ToolChoice::None => None,
            None => None,
            Some(t) => Some(
                tools::plan(t, &choice, req.parallel_tool_calls.unwrap_or(true))
                    .map_err(|m| ApiError::invalid("tools", m))?,
            ),
        };
        if plan.is_some() && schema.is_some() {
            return Err(ApiError::invalid(
                "response_format",
                "response_format cannot be combined with tools: the answer's format is the tools'",
            ));
        }
        if plan.is_some() && req.logprobs {
            return Err(ApiError::invalid(
                "logprobs",
                "logprobs cannot be combined with tools yet",
            ));
        }
        let logprobs = match (req.logprobs, req.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ))
            }
            (false, None) => None,
            (true, k) => Some(top_logprobs("top_logprobs", k.unwrap_or(0))?),
        };
        let l = s.loaded()?;
        // The template adds a little to the messages; their text alone can be too long.
        let text_bytes: usize = req
            .messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        too_long(l, "messages", text_bytes)?;
        let state = Arc::clone(&s);
        let messages = match &plan {
            Some(p) => tools::messages(req.messages, p),
            None => req.messages,
        };
        let prompt = off_executor(&s, move |_| {
            let l = state.loaded()?;
            l.chat
                .render(&messages)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))
        })
        .await?;
        let tokens = tokenize(&s, "messages", prompt).await?;
        // Chat defaults to "until the context is full", as OpenAI does.
        let room = l.max_seq_len.saturating_sub(tokens.len()).max(1);
        let ask = Ask {
            kind: Kind::Chat,
            logprobs,
            echo: None,
            tools: plan.is_some(),
            schema: plan.map(|p| p.schema).or(schema),
        };
        run(&s, ask, tokens, req.params, room, started).await
    }
    .await;
    finish_error(&s, result, started)
}

/// Refuses a text that surely holds more tokens than a sequence may: more bytes than
/// `max_seq_len` tokens of the longest token could cover. Checked before any work, so
/// a huge request costs nothing; never refuses a text that would fit.
fn too_long(l: &Loaded, param: &'static str, bytes: usize) -> Result<(), ApiError> {
    let most = l.max_seq_len.saturating_mul(l.tokenizer.max_token_bytes());
    if bytes > most {
        return Err(ApiError::invalid(
            param,
            format!(
                "the prompt is {bytes} bytes, which is more than {} tokens, and a sequence holds at most {} tokens (prompt and completion)",
                l.max_seq_len, l.max_seq_len
            ),
        ));
    }
    Ok(())
}

/// Sets its flag when dropped: the handler's future is dropped when the client goes,
/// and the work it started off the executor sees the flag and stops.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs CPU-heavy request preparation (template rendering, tokenizing) on the blocking
/// pool, at most one job per core at a time, so the async executor keeps answering
/// probes and metrics however heavy the requests are. `work` gets a flag that is set
/// once nobody waits for the result any more.
async fn off_executor<T: Send + 'static>(
    s: &AppState,
    work: impl FnOnce(&AtomicBool) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = s.preparing.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting down",
        )
    })?;
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(Arc::clone(&cancel));
    tokio::task::spawn_blocking(move || work(&cancel))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("preparing the request failed: {e}"),
            )
        })?
}

/// The tokens of `text`, tokenized off the executor after the size check.
async fn tokenize(
    s: &Arc<AppState>,
    param: &'static str,
    text: String,
) -> Result<Vec<u32>, ApiError> {
    let l = s.loaded()?;
    too_long(l, param, text.len())?;
    let tokenizer = Arc::clone(&l.tokenizer);
    off_executor(s, move |cancel| {
        // `None` only when cancelled, and then nobody reads the answer.
        tokenizer.encode_until(&text, cancel).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "cancelled",
            )
        })
    })
    .await
}

fn finish_error(s: &AppState, result: Result<Response, ApiError>, started: Instant) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => {
            s.metrics
                .requests
                .get_or_create(&StatusLabel {
                    status: e.status.as_u16(),
                })
                .inc();
            tracing::info!(status = e.status.as_u16(), latency_ms = started.elapsed().as_millis() as u64, error = %e.message, "request refused");
            e.into_response()
        }
    }
}

/// The most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;

fn range(
    param: &'static str,
    v: Option<f32>,
    lo: f32,
    hi: f32,
    default: f32,
) -> Result<f32, ApiError> {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::invalid(
            param,
            format!("{param} {v} is outside [{lo}, {hi}]"),
        ));
    }
    Ok(v)
}

fn sampling(p: &Params, vocab: usize) -> Result<Sampling, ApiError> {
    let temperature = range("temperature", p.temperature, 0.0, 2.0, 1.0)?;
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p {top_p} is outside (0, 1]"),
        ));
    }
    let top_k = match p.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k {k} must be positive (0 or -1 keeps every token)"),
            ))
        }
    };
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("repetition_penalty {repetition_penalty} is outside (0, 10]"),
        ));
    }
    let mut logit_bias = Vec::new();
    for (token, &bias) in p.logit_bias.iter().flatten() {
        let id = token
            .parse::<u32>()
            .ok()
            .filter(|&id| (id as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias key {token:?} is not a token id of this model (0 to {})",
                        vocab - 1
                    ),
                )
            })?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias {bias} for token {id} is outside [-100, 100]"),
            ));
        }
        logit_bias.push((id, bias));
    }
    Ok(Sampling {
        temperature,
        top_p,
        top_k,
        min_p: range("min_p", p.min_p, 0.0, 1.0, 0.0)?,
        presence_penalty: range("presence_penalty", p.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: range("frequency_penalty", p.frequency_penalty, -2.0, 2.0, 0.0)?,
        repetition_penalty,
        logit_bias,
    })
}

/// One structured log line per request, written when the response ends (or the client
/// leaves), whatever path it takes.
struct RequestLog {
    id: String,
    user: Option<String>,
    started: Instant,
    prompt_tokens: usize,
    completion_tokens: usize,
    status: u16,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        tracing::info!(
            request_id = %self.id,
            user = self.user.as_deref(),
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            latency_ms = self.started.elapsed().as_millis() as u64,
            status = self.status,
            "request"
        );
    }
}

/// What a request wants back beyond text, by endpoint.
struct Ask {
    kind: Kind,
    /// Log-probabilities, with this many alternatives per token.
    logprobs: Option<usize>,
    /// Completions' `echo`: the prompt text, returned before each choice.
    echo: Option<String>,
    /// Chat's `response_format`, or the tools' format: the JSON schema every choice
    /// must match.
    schema: Option<serde_json::Value>,
    /// The answer is the tools' JSON (`tools::read`), returned as tool calls or text.
    tools: bool,
}

/// The JSON schema a chat's `response_format` asks for: none for `text`, any object for
/// `json_object` (as OpenAI's JSON mode), the given schema for `json_schema` (`strict`
/// or not, it is enforced).
fn response_schema(f: &serde_json::Value) -> Result<Option<serde_json::Value>, ApiError> {
    let bad = |m: String| ApiError::invalid("response_format", m);
    let fields = f
        .as_object()
        .ok_or_else(|| bad("response_format must be an object".into()))?;
    let only = |allowed: &[&str]| match fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(format!("unknown field response_format.{k}"))),
        None => Ok(()),
    };
    match fields.get("type").and_then(|t| t.as_str()) {
        Some("text") => only(&["type"]).map(|()| None),
        Some("json_object") => only(&["type"]).map(|()| Some(json!({"type": "object"}))),
        Some("json_schema") => {
            only(&["type", "json_schema"])?;
            let spec = fields
                .get("json_schema")
                .and_then(|v| v.as_object())
                .ok_or_else(
                    || bad("json_schema needs an object with `name` and `schema`".into()),
                )?;
            if let Some(k) = spec
                .keys()
                .find(|k| !["name", "schema", "strict"].contains(&k.as_str()))
            {
                // OpenAI shows `description` to the model; nothing here would, so it is
                // refused rather than dropped.
                return Err(bad(match k.as_str() {
                    "description" => "response_format.json_schema.description is not shown to the model by this worker: put the instructions in the messages".into(),
                    _ => format!("unknown field response_format.json_schema.{k}"),
                }));
            }
            if !spec.get("name").is_some_and(|n| n.is_string()) {
                return Err(bad("response_format.json_schema.name is required".into()));
            }
            if spec.get("strict").is_some_and(|s| !s.is_boolean()) {
                return Err(bad(
                    "response_format.json_schema.strict must be true or false".into(),
                ));
            }
            // OpenAI makes `schema` optional: without one, any JSON value.
            Ok(Some(spec.get("schema").cloned().unwrap_or(json!({}))))
        }
        _ => Err(bad(
            "response_format.type must be text, json_object or json_schema".into(),
        )),
    }
}

/// The model's vocabulary indexed for structured output, built once off the executor.
async fn grammars(s: &Arc<AppState>) -> Result<Arc<Grammars>, ApiError> {
    let built = s
        .grammars
        .get_or_init(|| async {
            let state = Arc::clone(s);
            off_executor(s, move |_| {
                let tokenizer = Arc::clone(&state.loaded()?.tokenizer);
                Ok(Grammars::new(&tokenizer).map(Arc::new))
            })
            .await
            .unwrap_or_else(|e| Err(e.message))
        })
        .await;
    built.clone().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("structured output is unavailable for this model: {e}"),
        )
    })
}

/// What the response is shaped from, shared by the whole and the streamed forms.
struct Shape {
    env: Envelope,
    ask: Ask,
    tokenizer: Arc<Tokenizer>,
    prompt: Vec<u32>,
    n: usize,
}

/// A finished tool-mode answer as OpenAI returns it: tool calls (finish `tool_calls`) or
/// the reply text. An answer cut by `max_tokens` is returned as it is, with `length`.
struct ToolAnswer {
    text: String,
    calls: Option<serde_json::Value>,
    finish: &'static str,
}

impl Shape {
    fn tool_answer(
        &self,
        index: usize,
        text: String,
        finish: &'static str,
    ) -> Result<ToolAnswer, String> {
        if finish != "stop" {
            return Ok(ToolAnswer {
                text,
                calls: None,
                finish,
            });
        }
        Ok(match tools::read(&text)? {
            tools::Answer::Calls(calls) => ToolAnswer {
                text: String::new(),
                calls: Some(tools::openai_calls(&self.env.id, index, &calls)),
                finish: "tool_calls",
            },
            tools::Answer::Text(text) => ToolAnswer {
                text,
                calls: None,
                finish,
            },
        })
    }

    /// The `logprobs` value for a choice's `tokens` (with the prompt's first token
    /// ahead of them when echoing the prompt's own), or none when not asked for.
    fn logprobs(
        &self,
        lead: bool,
        tokens: &[TokenLogprobs],
        offset: &mut usize,
    ) -> Option<serde_json::Value> {
        self.ask.logprobs?;
        Some(match self.ask.kind {
            Kind::Chat => openai::chat_logprobs(&self.tokenizer, tokens),
            Kind::Completion => openai::completion_logprobs(
                &self.tokenizer,
                lead.then(|| self.prompt[0]),
                tokens,
                offset,
            ),
        })
    }
}

/// Every choice's events, tagged with the choice's index.
type Choices =
    futures_util::stream::SelectAll<futures_util::stream::BoxStream<'static, (usize, Event)>>;

async fn run(
    s: &Arc<AppState>,
    ask: Ask,
    prompt: Vec<u32>,
    p: Params,
    default_max: usize,
    started: Instant,
) -> Result<Response, ApiError> {
    if let Some(m) = p.model.as_deref().filter(|m| *m != s.model_name) {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model {m:?} does not exist; this worker serves {:?}",
                    s.model_name
                ),
            )
        });
    }
    let n = p.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n {n} is outside [1, {MAX_CHOICES}]"),
        ));
    }
    if p.stream_options.is_some() && !p.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    let l = s.loaded()?;
    let sampling = sampling(&p, l.tokenizer.vocab_size())?;
    let max_tokens = match p.max_completion_tokens.or(p.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) => n.min(u32::MAX as u64) as usize,
        None => default_max,
    };
    let prompt_param = match ask.kind {
        Kind::Completion => "prompt",
        Kind::Chat => "messages",
    };
    let serial = s.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match ask.kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let salt = started.elapsed().as_nanos() as u32 ^ std::process::id();
    let id = format!("{prefix}-{serial:x}-{salt:x}");
    let stop: Vec<String> = p
        .stop
        .map(|s| s.into_vec())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let seed = p.seed.unwrap_or(serial);
    // One grammar state per choice; a schema llguidance cannot compile is the client's.
    let mut constraints = match ask.schema.clone() {
        None => Vec::new(),
        Some(schema) => {
            let grammars = grammars(s).await?;
            off_executor(s, move |_| {
                (0..n)
                    .map(|_| {
                        grammars.json_schema(schema.clone()).map_err(|e| {
                            ApiError::invalid(
                                "response_format",
                                format!("the JSON schema cannot be used: {e}"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?
        }
    }
    .into_iter();
    // Each choice is a sequence of its own, seeded apart; a refusal of any drops the
    // receivers of those already queued, which cancels them.
    let mut choices = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let (tx, rx) = mpsc::unbounded_channel();
        let req = GenerateRequest {
            id: if n == 1 {
                id.clone()
            } else {
                format!("{id}-{i}")
            },
            prompt: prompt.clone(),
            max_tokens,
            sampling: sampling.clone(),
            seed: seed.wrapping_add(i as u64),
            stop: stop.clone(),
            logprobs: ask.logprobs,
            prompt_logprobs: ask.logprobs.filter(|_| ask.echo.is_some()),
            constraint: constraints.next(),
            ignore_eos: p.ignore_eos.unwrap_or(false),
            events: tx,
        };
        l.engine.submit(req).map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                e.to_string(),
            ),
            SubmitError::Draining => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.to_string(),
            ),
            SubmitError::Invalid(m) => ApiError::invalid(prompt_param, m),
            SubmitError::EmptyPrompt => ApiError::invalid(prompt_param, e.to_string()),
        })?;
        let mut rx = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        // The other choices are queued once the first has its first event: its prompt's
        // full blocks are cached by then, and they share them instead of computing them.
        let first = if i == 0 && n > 1 {
            rx.next().await
        } else {
            None
        };
        choices.push(
            futures_util::stream::iter(first)
                .chain(rx)
                .map(move |e| (i, e))
                .boxed(),
        );
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let shape = Shape {
        env: Envelope {
            id: id.clone(),
            created,
            model: s.model_name.clone(),
            kind: ask.kind,
        },
        ask,
        tokenizer: Arc::clone(&l.tokenizer),
        prompt,
        n: n as usize,
    };
    let log = RequestLog {
        id,
        user: p.user,
        started,
        prompt_tokens: shape.prompt.len(),
        completion_tokens: 0,
        status: 499,
    };
    let events = futures_util::stream::select_all(choices);
    if p.stream {
        let include_usage = p.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream(shape, events, log, include_usage).into_response())
    } else {
        whole(shape, events, log).await
    }
}

/// One choice while it is generated.
#[derive(Default)]
struct Partial {
    text: String,
    prompt_logprobs: Vec<TokenLogprobs>,
    logprobs: Vec<TokenLogprobs>,
    finish: Option<&'static str>,
}

async fn whole(
    shape: Shape,
    mut events: Choices,
    mut log: RequestLog,
) -> Result<Response, ApiError> {
    let mut parts: Vec<Partial> = (0..shape.n).map(|_| Partial::default()).collect();
    let mut completion_tokens = 0;
    let mut done = 0;
    while let Some((i, ev)) = events.next().await {
        let part = &mut parts[i];
        match ev {
            Event::Text { text, logprobs } => {
                part.text.push_str(&text);
                part.logprobs.extend(logprobs);
            }
            Event::PromptLogprobs(lp) => part.prompt_logprobs = lp,
            Event::Done {
                reason,
                completion_tokens: c,
                ..
            } => {
                part.finish = Some(reason.as_str());
                completion_tokens += c;
                done += 1;
                if done == shape.n {
                    break;
                }
            }
            Event::Failed(m) => {
                log.status = 500;
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    m,
                ));
            }
        }
    }
    if done < shape.n {
        log.status = 500;
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the engine stopped",
        ));
    }
    let mut choices: Vec<openai::Choice> = Vec::with_capacity(parts.len());
    for (index, mut part) in parts.into_iter().enumerate() {
        let echo = shape.ask.echo.as_deref().unwrap_or("");
        let mut tokens = std::mem::take(&mut part.prompt_logprobs);
        let lead = shape.ask.echo.is_some();
        tokens.append(&mut part.logprobs);
        let mut choice = openai::Choice {
            index,
            text: format!("{echo}{}", part.text),
            finish: part.finish.unwrap_or("stop"),
            logprobs: shape.logprobs(lead, &tokens, &mut 0),
            tool_calls: None,
        };
        if shape.ask.tools {
            let a = shape
                .tool_answer(index, std::mem::take(&mut choice.text), choice.finish)
                .map_err(|e| {
                    log.status = 500;
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        format!("the tool answer could not be read: {e}"),
                    )
                })?;
            (choice.text, choice.tool_calls, choice.finish) = (a.text, a.calls, a.finish);
        }
        choices.push(choice);
    }
    let usage = Usage {
        prompt_tokens: shape.prompt.len(),
        completion_tokens,
        total_tokens: shape.prompt.len() + completion_tokens,
    };
    log.completion_tokens = completion_tokens;
    log.status = 200;
    Ok(Json(shape.env.response(&choices, usage)).into_response())
}

fn stream(
    shape: Shape,
    events: Choices,
    log: RequestLog,
    include_usage: bool,
) -> impl IntoResponse {
    let data = |v: serde_json::Value| Some(SseEvent::default().data(v.to_string()));
    let done_marker = || Some(SseEvent::default().data("[DONE]"));
    // Chat opens each choice with the assistant's role; an echo without log-probabilities
    // opens with the prompt (with them, it comes with the prompt's scores).
    let mut opening = Vec::new();
    for i in 0..shape.n {
        match (shape.env.kind, &shape.ask.echo) {
            (Kind::Chat, _) => opening.push(data(shape.env.chunk(i, None, None, true, None))),
            (Kind::Completion, Some(echo)) if shape.ask.logprobs.is_none() => {
                opening.push(data(shape.env.chunk(i, Some(echo), None, false, None)))
            }
            _ => {}
        }
    }
    let mut offsets = vec![0usize; shape.n];
    // In tool mode the answer is JSON until it is whole: held, then sent as tool calls
    // or as the reply's text.
    let mut held = vec![String::new(); shape.n];
    let mut completion_tokens = 0;
    let mut done = 0;
    let mut log = Some(log);
    // Each event becomes chunks; `None` ends the stream (after [DONE]), which drops the
    // receivers and so cancels any choice still running.
    let body = events.flat_map(move |(i, ev)| {
        let env = &shape.env;
        let items: Vec<Option<SseEvent>> = match ev {
            Event::Text { text, .. } if shape.ask.tools => {
                held[i].push_str(&text);
                Vec::new()
            }
            Event::Text { text, logprobs } => {
                let lp = shape.logprobs(false, &logprobs, &mut offsets[i]);
                vec![data(env.chunk(i, Some(&text), None, false, lp))]
            }
            Event::PromptLogprobs(lp) => {
                let echo = shape.ask.echo.as_deref().unwrap_or("");
                let lp = shape.logprobs(true, &lp, &mut offsets[i]);
                vec![data(env.chunk(i, Some(echo), None, false, lp))]
            }
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens: c,
            } => {
                completion_tokens += c;
                done += 1;
                let mut v = Vec::new();
                let mut finish = reason.as_str();
                if shape.ask.tools {
                    match shape.tool_answer(i, std::mem::take(&mut held[i]), finish) {
                        Ok(a) => {
                            finish = a.finish;
                            match &a.calls {
                                Some(calls) => v.push(data(env.tool_calls_chunk(i, calls))),
                                None => {
                                    v.push(data(env.chunk(i, Some(&a.text), None, false, None)))
                                }
                            }
                        }
                        Err(e) => {
                            return futures_util::stream::iter(vec![
                                data(error_body(&e, "server_error", None, None)),
                                done_marker(),
                                None,
                            ]);
                        }
                    }
                }
                v.push(data(env.chunk(i, None, Some(finish), false, None)));
                if done == shape.n {
                    if let Some(mut l) = log.take() {
                        l.completion_tokens = completion_tokens;
                        l.status = 200;
                    }
                    if include_usage {
                        v.push(data(env.usage_chunk(Usage {
                            prompt_tokens,
                            completion_tokens,
                            total_tokens: prompt_tokens + completion_tokens,
                        })));
                    }
                    v.extend([done_marker(), None]);
                }
                v
            }
            Event::Failed(m) => {
                if let Some(mut l) = log.take() {
                    l.status = 500;
                }
                // The error, then the end of the stream, so clients stop reading.
                vec![
                    data(error_body(&m, "server_error", None, None)),
                    done_marker(),
                    None,
                ]
            }
        };
        futures_util::stream::iter(items)
    });
    let body = futures_util::stream::iter(opening)
        .chain(body)
        .take_while(|e| std::future::ready(e.is_some()))
        .map(|e| Ok::<_, Infallible>(e.expect("ends before None")));
    Sse::new(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_capacity_is_a_429_in_openai_shape_with_retry_after() {
        let r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "at capacity",
        )
        .into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
