//! The router's Prometheus metrics (`gpuscale_router_*`). The operator's autoscaler
//! reads two of them: `held_requests` (demand no replica holds yet) and `requests_total`
//! (whether a deployment is idle, for scale to zero).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::table::Key;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeploymentLabels {
    namespace: String,
    deployment: String,
}

impl From<&Key> for DeploymentLabels {
    fn from(k: &Key) -> Self {
        DeploymentLabels {
            namespace: k.namespace.clone(),
            deployment: k.name.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    namespace: String,
    deployment: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    namespace: String,
    deployment: String,
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    namespace: String,
    deployment: String,
    revision: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PickLabels {
    namespace: String,
    deployment: String,
    pod: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    namespace: String,
    deployment: String,
    why: &'static str,
}

/// Every metric of the router.
pub struct Metrics {
    registry: Registry,
    tokio_tasks: Gauge,
    requests: Family<CodeLabels, Counter>,
    held: Family<DeploymentLabels, Gauge>,
    in_flight: Family<DeploymentLabels, Gauge>,
    picks: Family<PickLabels, Counter>,
    prefix_blocks: Family<DeploymentLabels, Counter>,
    prefix_hit_blocks: Family<DeploymentLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    ttft: Family<DeploymentLabels, Histogram>,
    hold_seconds: Family<DeploymentLabels, Histogram>,
    version_answers: Family<OutcomeLabels, Counter>,
    version_ttft: Family<VersionLabels, Histogram>,
    version_itl: Family<VersionLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn gaps() -> Histogram {
    // 1 ms to about 33 s between streamed chunks.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn seconds() -> Histogram {
    // 5 ms to about 11 min: a GPU cold start is held that long.
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

impl Metrics {
    /// Registers every metric under the `gpuscale_router` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpuscale_router");
        let m = Metrics {
            registry: Registry::default(),
            tokio_tasks: Gauge::default(),
            requests: Family::default(),
            held: Family::default(),
            in_flight: Family::default(),
            picks: Family::default(),
            prefix_blocks: Family::default(),
            prefix_hit_blocks: Family::default(),
            retries: Family::default(),
            ttft: Family::new_with_constructor(seconds),
            hold_seconds: Family::new_with_constructor(seconds),
            version_answers: Family::default(),
            version_ttft: Family::new_with_constructor(seconds),
            version_itl: Family::new_with_constructor(gaps),
        };
        registry.register(
            "requests",
            "Requests answered, by deployment and HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "held_requests",
            "Requests waiting for a replica (none ready, or all saturated)",
            m.held.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests sent to a replica and not finished",
            m.in_flight.clone(),
        );
        registry.register(
            "picks",
            "Replicas picked, by pod and reason (prefix, least-loaded, prefix-over-bound)",
            m.picks.clone(),
        );
        registry.register(
            "prefix_blocks",
            "Prompt blocks routed (64 bytes each, at most 256 per request)",
            m.prefix_blocks.clone(),
        );
        registry.register(
            "prefix_hit_blocks",
            "Prompt blocks the picked replica had been sent before",
            m.prefix_hit_blocks.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again to another replica before the first byte",
            m.retries.clone(),
        );
        registry.register(
            "ttft_seconds",
            "Arrival at the router to the first response byte sent to the client",
            m.ttft.clone(),
        );
        registry.register(
            "hold_seconds",
            "Time requests were held waiting for a replica",
            m.hold_seconds.clone(),
        );
        // Per version (pod-template hash), what a rollout's gate compares: the operator
        // reads the change of each over a step's window.
        registry.register(
            "version_answers",
            "Answers relayed, by version and outcome (ok, error: 5xx or cut short, cancelled by the client)",
            m.version_answers.clone(),
        );
        registry.register(
            "version_ttft_seconds",
            "Arrival at the router to the first response byte, by version",
            m.version_ttft.clone(),
        );
        registry.register(
            "version_itl_seconds",
            "Time between streamed chunks (tokens) after the first, by version",
            m.version_itl.clone(),
        );
        registry.register(
            "tokio_alive_tasks",
            "Tasks alive in this process's tokio runtime, read at each scrape (a count that grows under steady load is a leak)",
            m.tokio_tasks.clone(),
        );
        Metrics { registry, ..m }
    }

    pub(crate) fn answered(&self, key: &Key, code: u16) {
        self.requests
            .get_or_create(&CodeLabels {
                namespace: key.namespace.clone(),
                deployment: key.name.clone(),
                code,
            })
            .inc();
    }

    pub(crate) fn set_held(&self, key: &Key, n: usize) {
        self.held.get_or_create(&key.into()).set(n as i64);
    }

    pub(crate) fn in_flight(&self, key: &Key, delta: i64) {
        self.in_flight.get_or_create(&key.into()).inc_by(delta);
    }

    pub(crate) fn picked(&self, key: &Key, pod: &str, reason: &'static str) {
        self.picks
            .get_or_create(&PickLabels {
                namespace: key.namespace.clone(),
                deployment: key.name.clone(),
                pod: pod.to_string(),
                reason,
            })
            .inc();
    }

    pub(crate) fn prefix(&self, key: &Key, blocks: usize, hit: usize) {
        self.prefix_blocks
            .get_or_create(&key.into())
            .inc_by(blocks as u64);
        self.prefix_hit_blocks
            .get_or_create(&key.into())
            .inc_by(hit as u64);
    }

    pub(crate) fn retried(&self, key: &Key, why: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                namespace: key.namespace.clone(),
                deployment: key.name.clone(),
                why,
            })
            .inc();
    }

    pub(crate) fn first_byte(&self, key: &Key, secs: f64) {
        self.ttft.get_or_create(&key.into()).observe(secs);
    }

    fn version(key: &Key, revision: &str) -> VersionLabels {
        VersionLabels {
            namespace: key.namespace.clone(),
            deployment: key.name.clone(),
            revision: revision.to_string(),
        }
    }

    pub(crate) fn version_answer(&self, key: &Key, revision: &str, outcome: &'static str) {
        self.version_answers
            .get_or_create(&OutcomeLabels {
                namespace: key.namespace.clone(),
                deployment: key.name.clone(),
                revision: revision.to_string(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn version_first_byte(&self, key: &Key, revision: &str, secs: f64) {
        self.version_ttft
            .get_or_create(&Self::version(key, revision))
            .observe(secs);
    }

    pub(crate) fn version_gap(&self, key: &Key, revision: &str, secs: f64) {
        self.version_itl
            .get_or_create(&Self::version(key, revision))
            .observe(secs);
    }

    pub(crate) fn held_for(&self, key: &Key, secs: f64) {
        self.hold_seconds.get_or_create(&key.into()).observe(secs);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tokio_tasks.set(rt.metrics().num_alive_tasks() as i64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
