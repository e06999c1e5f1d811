//! The worker's Prometheus metrics: what the operator's autoscaler scrapes (queue depth,
//! running sequences, KV-cache use) and what an SRE reads (latency, time to first token,
//! tokens, load time). Text exposition format via prometheus-client.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code.
    pub status: u16,
}

/// All metrics, cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// Requests admitted but not yet running.
    pub queue_depth: Gauge,
    /// Sequences in the running batch.
    pub running: Gauge,
    /// Fraction of KV blocks in use.
    pub kv_usage: Gauge<f64, AtomicU64>,
    /// KV blocks in the pool.
    pub kv_blocks_total: Gauge,
    /// Completion tokens produced.
    pub tokens_generated: Counter,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
    /// Finished requests by status.
    pub requests: Family<StatusLabel, Counter>,
    /// Request latency, admission to last byte.
    pub request_seconds: Histogram,
    /// Admission to first token.
    pub ttft_seconds: Histogram,
    /// Sequences preempted for KV space (recomputed later).
    pub preemptions: Counter,
    /// Seconds the model took to load and warm up.
    pub load_seconds: Gauge<f64, AtomicU64>,
    /// 1 when ready to serve.
    pub ready: Gauge,
}

impl Metrics {
    /// Registers every metric under the `gpuscale_worker` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpuscale_worker");
        let m = Metrics {
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            kv_usage: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            tokens_generated: Counter::default(),
            prompt_tokens: Counter::default(),
            requests: Family::default(),
            request_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            ttft_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            preemptions: Counter::default(),
            load_seconds: Gauge::default(),
            ready: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_depth",
            "Requests waiting for a batch slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            m.running.clone(),
        );
        registry.register(
            "kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use",
            m.kv_usage.clone(),
        );
        registry.register(
            "kv_cache_blocks",
            "KV-cache blocks in the pool",
            m.kv_blocks_total.clone(),
        );
        registry.register(
            "generation_tokens",
            "Completion tokens generated",
            m.tokens_generated.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "requests",
            "Finished requests by HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency",
            m.request_seconds.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time to first token",
            m.ttft_seconds.clone(),
        );
        registry.register(
            "preemptions",
            "Sequences preempted to free KV blocks",
            m.preemptions.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Model load and warm-up time",
            m.load_seconds.clone(),
        );
        registry.register("ready", "1 when the worker serves", m.ready.clone());
        Metrics { registry, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
