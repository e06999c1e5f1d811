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

/// Label of per-GPU telemetry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabel {
    /// CUDA/NVML index.
    pub gpu: u32,
}

/// Label of a GPU this worker was given.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuInfoLabel {
    /// Its UUID (`GPU-…` or `MIG-…`).
    pub uuid: String,
}

/// Label of a throttle reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabel {
    /// CUDA/NVML index.
    pub gpu: u32,
    /// NVML's reason, e.g. HwThermalSlowdown.
    pub reason: String,
}

/// Label of an XID error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XidLabel {
    /// CUDA/NVML index.
    pub gpu: u32,
    /// The XID code (e.g. 79: fallen off the bus).
    pub xid: u64,
}

/// One reading of a GPU (NVML), as the worker exports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    /// Memory in use on the whole device, bytes.
    pub memory_used: u64,
    /// Device memory, bytes.
    pub memory_total: u64,
    /// Fraction of time a kernel ran over the last sample period.
    pub utilization: f64,
    /// Degrees Celsius.
    pub temperature_c: u32,
    /// Watts.
    pub power_w: f64,
    /// Every known throttle reason and whether it is active now.
    pub throttle: Vec<(&'static str, bool)>,
    /// XID errors seen since the last sample.
    pub xids: Vec<u64>,
}

/// All metrics, cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    tokio_tasks: Gauge,
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
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: Counter,
    /// Prompt tokens found there (not computed again); hits / queries is the hit ratio.
    pub prefix_cache_hits: Counter,
    /// Full KV blocks kept for reuse (held by sequences or idle).
    pub prefix_cache_blocks: Gauge,
    /// Seconds the model took to load and warm up.
    pub load_seconds: Gauge<f64, AtomicU64>,
    /// Seconds of the warm-up pass alone.
    pub warmup_seconds: Gauge<f64, AtomicU64>,
    /// Seconds fetching the model into the node's cache (0 on a cache hit).
    pub download_seconds: Gauge<f64, AtomicU64>,
    /// Bytes of the model in the cache so far (its size once complete).
    pub download_bytes: Gauge,
    /// The model's size, once the server has said it.
    pub download_total_bytes: Gauge,
    /// 1 when the model was already in the node's cache.
    pub model_cache_hit: Gauge,
    /// 1 when ready to serve.
    pub ready: Gauge,
    /// Bytes the backend reserved (device memory on CUDA, measured).
    pub memory_reserved_bytes: Gauge,
    gpu_memory_used: Family<GpuLabel, Gauge>,
    gpu_memory_total: Family<GpuLabel, Gauge>,
    gpu_utilization: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    gpu_temperature: Family<GpuLabel, Gauge>,
    gpu_power: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    gpu_throttle: Family<ThrottleLabel, Gauge>,
    gpu_xids: Family<XidLabel, Counter>,
    gpu_info: Family<GpuInfoLabel, Gauge>,
}

impl Metrics {
    /// Registers every metric under the `gpuscale_worker` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpuscale_worker");
        let m = Metrics {
            tokio_tasks: Gauge::default(),
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
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            prefix_cache_blocks: Gauge::default(),
            load_seconds: Gauge::default(),
            warmup_seconds: Gauge::default(),
            download_seconds: Gauge::default(),
            download_bytes: Gauge::default(),
            download_total_bytes: Gauge::default(),
            model_cache_hit: Gauge::default(),
            ready: Gauge::default(),
            memory_reserved_bytes: Gauge::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_utilization: Family::default(),
            gpu_temperature: Family::default(),
            gpu_power: Family::default(),
            gpu_throttle: Family::default(),
            gpu_xids: Family::default(),
            gpu_info: Family::default(),
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
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queries.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache (hit ratio: hits / queries)",
            m.prefix_cache_hits.clone(),
        );
        registry.register(
            "prefix_cache_blocks",
            "Full KV blocks kept for reuse",
            m.prefix_cache_blocks.clone(),
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
        registry.register(
            "model_warmup_seconds",
            "The warm-up pass, part of model_load_seconds",
            m.warmup_seconds.clone(),
        );
        registry.register(
            "model_download_seconds",
            "Fetching an http(s) model into the node's cache (0 on a cache hit)",
            m.download_seconds.clone(),
        );
        registry.register(
            "model_download_bytes",
            "Bytes of the model in the node's cache so far",
            m.download_bytes.clone(),
        );
        registry.register(
            "model_download_total_bytes",
            "The model's size as its server reports it (0 until known)",
            m.download_total_bytes.clone(),
        );
        registry.register(
            "model_cache_hit",
            "1 when the model was already in the node's cache",
            m.model_cache_hit.clone(),
        );
        registry.register("ready", "1 when the worker serves", m.ready.clone());
        registry.register(
            "gpu_info",
            "1 for each GPU this worker was given (by UUID): what the device plugin assigned",
            m.gpu_info.clone(),
        );
        registry.register(
            "memory_reserved_bytes",
            "Memory the backend reserved for weights, KV cache and activations",
            m.memory_reserved_bytes.clone(),
        );
        // GPU telemetry (NVML): absent on CPU nodes, where no series appear.
        registry.register(
            "gpu_memory_used_bytes",
            "GPU memory in use (whole device)",
            m.gpu_memory_used.clone(),
        );
        registry.register(
            "gpu_memory_total_bytes",
            "GPU memory",
            m.gpu_memory_total.clone(),
        );
        registry.register(
            "gpu_utilization_ratio",
            "Fraction of time a kernel was running",
            m.gpu_utilization.clone(),
        );
        registry.register(
            "gpu_temperature_celsius",
            "GPU temperature",
            m.gpu_temperature.clone(),
        );
        registry.register("gpu_power_watts", "GPU power draw", m.gpu_power.clone());
        registry.register(
            "gpu_throttle_active",
            "1 while the clocks are throttled for this reason",
            m.gpu_throttle.clone(),
        );
        registry.register(
            "gpu_xid_errors",
            "Critical XID errors reported by the driver",
            m.gpu_xids.clone(),
        );
        registry.register(
            "tokio_alive_tasks",
            "Tasks alive in this process's tokio runtime, read at each scrape (a count that grows under steady load is a leak)",
            m.tokio_tasks.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Exports one NVML reading of GPU `gpu`.
    /// Exports the GPUs this worker was given.
    pub fn set_gpus(&self, uuids: &[String]) {
        for uuid in uuids {
            self.gpu_info
                .get_or_create(&GpuInfoLabel { uuid: uuid.clone() })
                .set(1);
        }
    }

    pub fn record_gpu(&self, gpu: u32, s: &GpuSample) {
        let l = GpuLabel { gpu };
        self.gpu_memory_used
            .get_or_create(&l)
            .set(s.memory_used as i64);
        self.gpu_memory_total
            .get_or_create(&l)
            .set(s.memory_total as i64);
        self.gpu_utilization.get_or_create(&l).set(s.utilization);
        self.gpu_temperature
            .get_or_create(&l)
            .set(s.temperature_c as i64);
        self.gpu_power.get_or_create(&l).set(s.power_w);
        for (reason, active) in &s.throttle {
            self.gpu_throttle
                .get_or_create(&ThrottleLabel {
                    gpu,
                    reason: (*reason).to_string(),
                })
                .set(i64::from(*active));
        }
        for xid in &s.xids {
            self.gpu_xids
                .get_or_create(&XidLabel { gpu, xid: *xid })
                .inc();
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tokio_tasks.set(rt.metrics().num_alive_tasks() as i64);
        }
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
