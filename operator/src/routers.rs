//! What the request routers know that the workers cannot: requests held while no
//! replica can take them (demand at zero replicas, or beyond every replica's capacity),
//! and whether a deployment gets requests at all (idleness, for scale to zero).
//!
//! A background task scrapes every router's `/metrics` (given by URL, or found as pods
//! by label) and keeps the sum per deployment. A router that cannot be read makes the
//! whole reading unknown: held requests would be missed and an idle deployment could
//! not be told from a busy one, so the autoscaler must hold rather than read zero.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::reconcile::is_ready;

/// Where the routers are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sources {
    /// Routers' base URLs (`http://host:port`).
    pub urls: Vec<String>,
    /// Router pods: `(namespace, label selector, port)`.
    pub pods: Option<(String, String, u16)>,
}

impl Sources {
    /// Whether any router is configured.
    pub fn any(&self) -> bool {
        !self.urls.is_empty() || self.pods.is_some()
    }
}

/// What the routers report on one deployment, summed over routers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reported {
    /// Requests held, waiting for a replica.
    pub held: f64,
    /// Requests answered since each router started.
    pub requests: f64,
}

/// The latest complete reading of every router.
#[derive(Clone, Debug, PartialEq)]
struct Reading {
    at: Instant,
    per: HashMap<(String, String), Reported>,
}

/// The routers' demand, shared with reconcile passes.
#[derive(Debug, Default)]
pub struct RouterDemand {
    latest: RwLock<Option<Reading>>,
}

/// A reading older than this is not used (the scrape loop is stuck or failing).
const STALE_AFTER: Duration = Duration::from_secs(10);

impl RouterDemand {
    /// What the routers report on `namespace/name` (zeros when they know nothing of
    /// it); `None` when there is no recent complete reading.
    pub fn get(&self, namespace: &str, name: &str, now: Instant) -> Option<Reported> {
        let latest = self.latest.read().unwrap();
        let r = latest
            .as_ref()
            .filter(|r| now.saturating_duration_since(r.at) < STALE_AFTER)?;
        Some(
            r.per
                .get(&(namespace.to_string(), name.to_string()))
                .copied()
                .unwrap_or_default(),
        )
    }

    fn set(&self, reading: Option<Reading>) {
        *self.latest.write().unwrap() = reading;
    }
}

/// One router's per-deployment numbers, from its text exposition.
pub fn parse(text: &str) -> Result<HashMap<(String, String), Reported>, String> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("not a Prometheus exposition: {e}"))?;
    let mut seen_any = false;
    let mut per: HashMap<(String, String), Reported> = HashMap::new();
    for s in &scrape.samples {
        let field: fn(&mut Reported) -> &mut f64 = match s.metric.as_str() {
            "gpuscale_router_held_requests" => |r| &mut r.held,
            "gpuscale_router_requests_total" | "gpuscale_router_requests" => |r| &mut r.requests,
            "gpuscale_router_ttft_seconds_count" => {
                seen_any = true;
                continue;
            }
            _ => continue,
        };
        seen_any = true;
        let (Some(ns), Some(d)) = (s.labels.get("namespace"), s.labels.get("deployment")) else {
            continue;
        };
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        *field(per.entry((ns.to_string(), d.to_string())).or_default()) += v;
    }
    // An empty page is a router that has served nothing yet, but a page of something
    // else is not a router.
    if !seen_any
        && text
            .lines()
            .any(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        return Err("the page has no gpuscale_router_* metrics".into());
    }
    Ok(per)
}

/// Scrapes the routers every `interval` into `demand`, forever.
pub async fn run(
    sources: Sources,
    client: Client,
    http: reqwest::Client,
    interval: Duration,
    demand: Arc<RouterDemand>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let reading = read_all(&sources, &client, &http, interval).await;
        if let Err(e) = &reading {
            tracing::debug!(error = %e, "router demand unknown");
        }
        demand.set(reading.ok());
    }
}

async fn read_all(
    sources: &Sources,
    client: &Client,
    http: &reqwest::Client,
    timeout: Duration,
) -> Result<Reading, String> {
    let mut urls = sources.urls.clone();
    if let Some((ns, selector, port)) = &sources.pods {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let list = pods
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(|e| format!("listing router pods: {e}"))?;
        let live: Vec<&Pod> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        if live.is_empty() {
            return Err(format!("no router pod matches {selector} in {ns}"));
        }
        for p in live {
            // A router that is not ready has held nothing yet; one that is ready must
            // answer.
            if !is_ready(p) {
                continue;
            }
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_ref());
            urls.push(format!(
                "http://{}:{port}",
                ip.ok_or("a ready router has no IP")?
            ));
        }
    }
    let reads = urls.iter().map(|u| async move {
        let text = http
            .get(format!("{u}/metrics"))
            .timeout(timeout.max(Duration::from_secs(1)))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("{u}: {e}"))?
            .text()
            .await
            .map_err(|e| format!("{u}: {e}"))?;
        parse(&text).map_err(|e| format!("{u}: {e}"))
    });
    let mut per: HashMap<(String, String), Reported> = HashMap::new();
    for r in futures::future::join_all(reads).await {
        for (k, v) in r? {
            let e = per.entry(k).or_default();
            e.held += v.held;
            e.requests += v.requests;
        }
    }
    Ok(Reading {
        at: Instant::now(),
        per,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_held_and_answered_requests_per_deployment() {
        let page = "\
# HELP gpuscale_router_requests Requests answered.
# TYPE gpuscale_router_requests counter
gpuscale_router_requests_total{namespace=\"ml\",deployment=\"llama\",code=\"200\"} 7
gpuscale_router_requests_total{namespace=\"ml\",deployment=\"llama\",code=\"503\"} 1
gpuscale_router_requests_total{namespace=\"ml\",deployment=\"qwen\",code=\"200\"} 2
# TYPE gpuscale_router_held_requests gauge
gpuscale_router_held_requests{namespace=\"ml\",deployment=\"llama\"} 3
# EOF
";
        let per = parse(page).unwrap();
        let llama = per[&("ml".to_string(), "llama".to_string())];
        assert_eq!(
            llama,
            Reported {
                held: 3.0,
                requests: 8.0
            }
        );
        assert_eq!(per[&("ml".to_string(), "qwen".to_string())].held, 0.0);
        assert!(
            parse("# EOF\n").unwrap().is_empty(),
            "a router that served nothing"
        );
        assert!(parse("up 1\n").is_err(), "not a router");
    }

    #[test]
    fn a_stale_reading_is_unknown_not_zero() {
        let d = RouterDemand::default();
        let now = Instant::now();
        assert_eq!(d.get("ml", "llama", now), None);
        d.set(Some(Reading {
            at: now,
            per: HashMap::new(),
        }));
        assert_eq!(d.get("ml", "llama", now), Some(Reported::default()));
        assert_eq!(d.get("ml", "llama", now + STALE_AFTER), None);
    }
}
