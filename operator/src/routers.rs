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

/// What the routers saw of one version of a deployment (pod-template hash), since
/// each router started, summed over routers: a rollout's gate reads the change of it
/// over a step's window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VersionCounts {
    /// Answers relayed whole.
    pub ok: f64,
    /// 5xx answers and answers cut short.
    pub errors: f64,
    /// Time to first byte: cumulative bucket counts by upper bound (seconds).
    pub ttft: Vec<(f64, f64)>,
    /// Time between streamed chunks, the same way.
    pub itl: Vec<(f64, f64)>,
}

impl VersionCounts {
    /// What happened between `base` and now; `None` when a count went back (a router
    /// restarted): the window must start again.
    pub fn since(&self, base: &VersionCounts) -> Option<crate::rollout::Measured> {
        let ok = self.ok - base.ok;
        let errors = self.errors - base.errors;
        if ok < 0.0 || errors < 0.0 {
            return None;
        }
        Some(crate::rollout::Measured {
            requests: ok + errors,
            errors,
            ttft_p95: quantile(0.95, &delta(&self.ttft, &base.ttft)?),
            itl_p95: quantile(0.95, &delta(&self.itl, &base.itl)?),
        })
    }
}

/// Bucket counts of `now` less `base`, by bound; `None` if any went back.
fn delta(now: &[(f64, f64)], base: &[(f64, f64)]) -> Option<Vec<(f64, f64)>> {
    now.iter()
        .map(|&(le, c)| {
            let b = base.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
            (c >= b).then_some((le, c - b))
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside its bucket as
/// Prometheus' `histogram_quantile` does; `None` with no observation. A quantile in the
/// `+Inf` bucket is the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, c) in &b {
        if c >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let inside = c - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lo + (le - lo) * frac);
        }
        (lo, below) = (le, c);
    }
    Some(lo)
}

/// One router's page, or several summed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Page {
    /// Per deployment.
    pub per: HashMap<(String, String), Reported>,
    /// Per deployment, per version.
    pub versions: HashMap<(String, String), HashMap<String, VersionCounts>>,
}

impl Page {
    fn add(&mut self, other: Page) {
        for (k, v) in other.per {
            let e = self.per.entry(k).or_default();
            e.held += v.held;
            e.requests += v.requests;
        }
        for (k, vs) in other.versions {
            let mine = self.versions.entry(k).or_default();
            for (rev, v) in vs {
                let e = mine.entry(rev).or_default();
                e.ok += v.ok;
                e.errors += v.errors;
                add_buckets(&mut e.ttft, &v.ttft);
                add_buckets(&mut e.itl, &v.itl);
            }
        }
    }
}

fn add_buckets(into: &mut Vec<(f64, f64)>, from: &[(f64, f64)]) {
    for &(le, c) in from {
        match into.iter_mut().find(|(l, _)| *l == le) {
            Some((_, have)) => *have += c,
            None => into.push((le, c)),
        }
    }
}

/// The latest complete reading of every router.
#[derive(Clone, Debug, PartialEq)]
struct Reading {
    at: Instant,
    page: Page,
}

/// The routers' demand, shared with reconcile passes.
#[derive(Debug, Default)]
pub struct RouterDemand {
    latest: RwLock<Option<Reading>>,
}

/// A reading older than this is not used (the scrape loop is stuck or failing).
const STALE_AFTER: Duration = Duration::from_secs(10);

impl RouterDemand {
    /// `read` of the latest page, if it is recent and complete.
    fn recent<T>(&self, now: Instant, read: impl FnOnce(&Page) -> T) -> Option<T> {
        let latest = self.latest.read().unwrap();
        let r = latest
            .as_ref()
            .filter(|r| now.saturating_duration_since(r.at) < STALE_AFTER)?;
        Some(read(&r.page))
    }

    /// What the routers report on `namespace/name` (zeros when they know nothing of
    /// it); `None` when there is no recent complete reading.
    pub fn get(&self, namespace: &str, name: &str, now: Instant) -> Option<Reported> {
        let key = (namespace.to_string(), name.to_string());
        self.recent(now, |p| p.per.get(&key).copied().unwrap_or_default())
    }

    /// What the routers saw of each version of `namespace/name` (empty when nothing);
    /// `None` when there is no recent complete reading.
    pub fn versions(
        &self,
        namespace: &str,
        name: &str,
        now: Instant,
    ) -> Option<HashMap<String, VersionCounts>> {
        let key = (namespace.to_string(), name.to_string());
        self.recent(now, |p| p.versions.get(&key).cloned().unwrap_or_default())
    }

    fn set(&self, reading: Option<Reading>) {
        *self.latest.write().unwrap() = reading;
    }
}

/// One router's per-deployment numbers, from its text exposition.
pub fn parse(text: &str) -> Result<Page, String> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("not a Prometheus exposition: {e}"))?;
    let mut seen_any = false;
    let mut per: HashMap<(String, String), Reported> = HashMap::new();
    let mut versions: HashMap<(String, String), HashMap<String, VersionCounts>> = HashMap::new();
    for s in &scrape.samples {
        if let Some(what) = s.metric.strip_prefix("gpuscale_router_version_") {
            seen_any = true;
            let (Some(ns), Some(d), Some(rev)) = (
                s.labels.get("namespace"),
                s.labels.get("deployment"),
                s.labels.get("revision"),
            ) else {
                continue;
            };
            let v = versions
                .entry((ns.to_string(), d.to_string()))
                .or_default()
                .entry(rev.to_string())
                .or_default();
            match (what, &s.value) {
                ("answers_total" | "answers", prometheus_parse::Value::Counter(n))
                | ("answers_total" | "answers", prometheus_parse::Value::Untyped(n)) => {
                    match s.labels.get("outcome") {
                        Some("ok") => v.ok += n,
                        Some("error") => v.errors += n,
                        _ => {}
                    }
                }
                ("ttft_seconds", prometheus_parse::Value::Histogram(h)) => {
                    add_buckets(
                        &mut v.ttft,
                        &h.iter().map(|b| (b.less_than, b.count)).collect::<Vec<_>>(),
                    );
                }
                ("itl_seconds", prometheus_parse::Value::Histogram(h)) => {
                    add_buckets(
                        &mut v.itl,
                        &h.iter().map(|b| (b.less_than, b.count)).collect::<Vec<_>>(),
                    );
                }
                _ => {}
            }
            continue;
        }
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
    Ok(Page { per, versions })
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
    let mut page = Page::default();
    for r in futures::future::join_all(reads).await {
        page.add(r?);
    }
    Ok(Reading {
        at: Instant::now(),
        page,
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
        let per = parse(page).unwrap().per;
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
            parse("# EOF\n").unwrap().per.is_empty(),
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
            page: Page::default(),
        }));
        assert_eq!(d.get("ml", "llama", now), Some(Reported::default()));
        assert_eq!(d.get("ml", "llama", now + STALE_AFTER), None);
    }

    #[test]
    fn reads_each_version_and_measures_a_window_as_the_change_since_its_start() {
        let page = |ok: u32, err: u32, fast: u32, slow: u32| {
            format!(
                "\
# TYPE gpuscale_router_version_answers counter
gpuscale_router_version_answers_total{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\",outcome=\"ok\"}} {ok}
gpuscale_router_version_answers_total{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\",outcome=\"error\"}} {err}
gpuscale_router_version_answers_total{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\",outcome=\"cancelled\"}} 9
# TYPE gpuscale_router_version_ttft_seconds histogram
gpuscale_router_version_ttft_seconds_bucket{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\",le=\"0.1\"}} {fast}
gpuscale_router_version_ttft_seconds_bucket{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\",le=\"0.2\"}} {}
gpuscale_router_version_ttft_seconds_bucket{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\",le=\"+Inf\"}} {}
gpuscale_router_version_ttft_seconds_sum{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\"}} 1
gpuscale_router_version_ttft_seconds_count{{namespace=\"ml\",deployment=\"llama\",revision=\"aaa\"}} {}
# EOF
",
                fast + slow,
                fast + slow,
                fast + slow
            )
        };
        let key = ("ml".to_string(), "llama".to_string());
        let base = parse(&page(10, 0, 10, 0)).unwrap().versions[&key]["aaa"].clone();
        assert_eq!((base.ok, base.errors), (10.0, 0.0));
        // Two routers add up.
        let mut two = parse(&page(10, 0, 10, 0)).unwrap();
        two.add(parse(&page(10, 0, 10, 0)).unwrap());
        assert_eq!(two.versions[&key]["aaa"].ok, 20.0);
        // Since the base: 10 more answers, 2 of them errors, all of them slow.
        let now = parse(&page(18, 2, 10, 10)).unwrap().versions[&key]["aaa"].clone();
        let w = now.since(&base).unwrap();
        assert_eq!((w.requests, w.errors), (10.0, 2.0));
        let p95 = w.ttft_p95.unwrap();
        assert!((0.19..=0.2).contains(&p95), "{p95}");
        assert_eq!(w.itl_p95, None);
        // A router restarted: its counts went back, the window must start again.
        assert_eq!(base.since(&now), None);
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let b = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b).unwrap() - 0.1).abs() < 1e-9);
        assert!((quantile(0.75, &b).unwrap() - 0.15).abs() < 1e-9);
        assert_eq!(quantile(0.95, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        // Beyond the last finite bound: that bound.
        assert_eq!(
            quantile(0.99, &[(0.1, 1.0), (f64::INFINITY, 10.0)]),
            Some(0.1)
        );
    }
}
