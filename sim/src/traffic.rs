//! Traffic for the demo and the end-to-end scenarios: OpenAI-style completions sent to
//! a Service's ready endpoints. The simulator has no kube-proxy, so the client picks an
//! endpoint itself (round robin over the ready pods the Service selects), re-read every
//! half second as replicas come and go.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

/// How one request went.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Seconds since the traffic started.
    pub at: f64,
    pub latency: Duration,
    /// HTTP status, or None when no connection was made.
    pub status: Option<u16>,
    /// Whether the request asked for an SSE stream.
    pub stream: bool,
    /// Whether the whole answer arrived (a stream ends with `data: [DONE]`); false
    /// for an answer cut short after its status, as when the worker dies mid-stream.
    pub complete: bool,
}

/// Requests per second over time: `(seconds from start, rate)` steps.
#[derive(Clone, Debug)]
pub struct Profile(pub Vec<(f64, f64)>);

impl Profile {
    /// The rate at `t` seconds.
    pub fn rate_at(&self, t: f64) -> f64 {
        self.0
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .map_or(0.0, |(_, r)| *r)
    }

    /// When the traffic stops.
    pub fn end(&self) -> f64 {
        self.0.last().map_or(0.0, |(t, _)| *t)
    }
}

/// The ready endpoints (`http://ip:port`) behind a Service.
pub async fn endpoints(client: &Client, ns: &str, service: &str) -> Vec<String> {
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let Ok(svc) = svcs.get(service).await else {
        return Vec::new();
    };
    let spec = svc.spec.unwrap_or_default();
    let port = spec
        .ports
        .iter()
        .flatten()
        .next()
        .and_then(|p| match &p.target_port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                Some(*n as u16)
            }
            _ => u16::try_from(p.port).ok(),
        })
        .unwrap_or(8080);
    let selector = spec
        .selector
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await else {
        return Vec::new();
    };
    list.items
        .iter()
        .filter(|p| {
            gpuscale_operator::reconcile::is_ready(p) && p.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|p| {
            Some(format!(
                "http://{}:{port}",
                p.status.as_ref()?.pod_ip.as_ref()?
            ))
        })
        .collect()
}

/// Sends completions following `profile` to the ready endpoints of a Service (round
/// robin, as kube-proxy spreads connections) and returns every outcome once all have
/// finished. Each request generates exactly `max_tokens` (`ignore_eos`, as vLLM's
/// serving benchmark sends), so a scenario's load does not depend on where the model
/// happens to stop.
pub async fn drive(
    client: Client,
    ns: &str,
    service: &str,
    model: &str,
    max_tokens: u32,
    profile: Profile,
) -> Vec<Outcome> {
    let never = watch::channel(false).1;
    drive_until(client, ns, service, model, max_tokens, profile, never).await
}

/// [`drive`], sending no new request once `stop` turns true (or at `profile`'s end,
/// whichever comes first): for a scenario whose load must last until something it
/// waits for has happened, however long the machine takes to get there.
pub async fn drive_until(
    client: Client,
    ns: &str,
    service: &str,
    model: &str,
    max_tokens: u32,
    profile: Profile,
    stop: watch::Receiver<bool>,
) -> Vec<Outcome> {
    let targets: Arc<Mutex<Vec<String>>> = Arc::default();
    let refresher = {
        let (client, ns, service, targets) = (
            client.clone(),
            ns.to_string(),
            service.to_string(),
            targets.clone(),
        );
        tokio::spawn(async move {
            loop {
                let found = endpoints(&client, &ns, &service).await;
                *targets.lock().expect("targets lock") = found;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let out = send(targets, model, max_tokens, profile, false, true, stop).await;
    refresher.abort();
    out
}

/// Sends completions following `profile` to one URL (the request router), each
/// `max_tokens` long, as [`drive`] does.
pub async fn drive_url(url: &str, model: &str, max_tokens: u32, profile: Profile) -> Vec<Outcome> {
    send(
        Arc::new(Mutex::new(vec![url.to_string()])),
        model,
        max_tokens,
        profile,
        false,
        true,
        watch::channel(false).1,
    )
    .await
}

/// To one URL, with every other request streamed (SSE), each up to `max_tokens`,
/// ending where the model ends (as users' requests do: the soak's steady load).
pub async fn drive_url_streaming(
    url: &str,
    model: &str,
    max_tokens: u32,
    profile: Profile,
) -> Vec<Outcome> {
    send(
        Arc::new(Mutex::new(vec![url.to_string()])),
        model,
        max_tokens,
        profile,
        true,
        false,
        watch::channel(false).1,
    )
    .await
}

/// Sends completions following `profile` (a new request every 1/rate seconds, each on
/// its own task so that a slow one never holds the next back) to `targets` in turn,
/// every other one streamed when `streams`, each `max_tokens` long when `fixed_length`
/// (else up to it, ending where the model ends), none after `stop` turns true. Each
/// answer is read to its end.
async fn send(
    targets: Arc<Mutex<Vec<String>>>,
    model: &str,
    max_tokens: u32,
    profile: Profile,
    streams: bool,
    fixed_length: bool,
    stop: watch::Receiver<bool>,
) -> Vec<Outcome> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("a plain HTTP client");
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut credit = 0.0;
    let mut sent_count = 0usize;
    let tick = Duration::from_millis(50);
    // Credit accrues by the time that passed, not by ticks: on a loaded machine a 50 ms
    // sleep can take longer, and an open-loop load must not slow down with its client.
    let mut last = 0.0;
    while start.elapsed().as_secs_f64() < profile.end() && !*stop.borrow() {
        tokio::time::sleep(tick).await;
        let now = start.elapsed().as_secs_f64();
        credit += profile.rate_at(now) * (now - last);
        last = now;
        while credit >= 1.0 {
            credit -= 1.0;
            let (http, targets, next) = (http.clone(), targets.clone(), next.clone());
            let model = model.to_string();
            let stream = streams && sent_count % 2 == 1;
            sent_count += 1;
            let body = json!({"model": model, "prompt": "Tell me a short story about a GPU.",
                              "max_tokens": max_tokens, "stream": stream,
                              "ignore_eos": fixed_length});
            tasks.spawn(async move {
                let sent = Instant::now();
                let at = sent.duration_since(start).as_secs_f64();
                // Wait (briefly) for an endpoint rather than count a refusal of our own.
                let mut url = None;
                for _ in 0..100 {
                    let t = targets.lock().expect("targets lock").clone();
                    if !t.is_empty() {
                        url = Some(t[next.fetch_add(1, Ordering::Relaxed) % t.len()].clone());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let (status, complete) = match url {
                    Some(u) => match http
                        .post(format!("{u}/v1/completions"))
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let complete = match r.bytes().await {
                                Ok(b) if stream => b.trim_ascii_end().ends_with(b"data: [DONE]"),
                                Ok(_) => true,
                                Err(_) => false,
                            };
                            (Some(status), complete)
                        }
                        Err(_) => (None, false),
                    },
                    None => (None, false),
                };
                Outcome {
                    at,
                    latency: sent.elapsed(),
                    status,
                    stream,
                    complete,
                }
            });
        }
    }
    // Every request sent gives one outcome: a request task that panicked is an error
    // (no status), never silently left out of the count.
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap_or(Outcome {
            at: start.elapsed().as_secs_f64(),
            latency: Duration::ZERO,
            status: None,
            stream: false,
            complete: false,
        }));
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    out
}

/// Requests, errors and latency percentiles of `outcomes`.
#[derive(Debug)]
pub struct Summary {
    pub requests: usize,
    /// Not answered 200 in full (refused, failed, or cut short).
    pub errors: usize,
    /// Of the errors, answers cut short after a 200 (a worker that died mid-answer:
    /// nothing a retry by the router could save, as part was with the client).
    pub cut: usize,
    pub p50: Duration,
    pub p99: Duration,
    /// The errors themselves (when sent, status, latency), so a failed check says
    /// what went wrong and when.
    pub failed: Vec<Outcome>,
}

/// The `q` quantile (0 to 1) of `sorted` (nearest rank; zero when empty).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Summarises outcomes (an error is anything but a whole 200).
pub fn summary(outcomes: &[Outcome]) -> Summary {
    let mut lat: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    lat.sort();
    let pick = |q: f64| percentile(&lat, q);
    let failed: Vec<Outcome> = outcomes
        .iter()
        .filter(|o| o.status != Some(200) || !o.complete)
        .cloned()
        .collect();
    Summary {
        requests: outcomes.len(),
        errors: failed.len(),
        cut: failed.iter().filter(|o| o.status == Some(200)).count(),
        p50: pick(0.5),
        p99: pick(0.99),
        failed,
    }
}
