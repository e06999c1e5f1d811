//! Reading a worker's load from its Prometheus `/metrics`.

use std::time::Duration;

use futures::future::BoxFuture;

/// What the autoscaler and the ledger need from one worker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerLoad {
    /// Requests waiting for a batch slot.
    pub waiting: f64,
    /// Sequences running.
    pub running: f64,
    /// Requests finished since the worker started, any status (a counter).
    pub requests_total: f64,
    /// Tokens generated since the worker started (a counter).
    pub generated_tokens_total: f64,
    /// The GPUs the worker was given (`gpuscale_worker_gpu_info`), by UUID: what the
    /// device plugin assigned, whatever placement chose. Empty on CPU.
    pub gpus: Vec<String>,
    /// How the worker started (it answers while it fetches and loads the model).
    pub startup: Startup,
}

/// A worker's start, from its own metrics (zeros where a phase has not happened).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Startup {
    /// Bytes of an http(s) model in the node's cache so far.
    pub download_bytes: f64,
    /// The model's size (0: not downloading, or not known yet).
    pub download_total: f64,
    /// Seconds fetching the model (0 on a cache hit or a node path).
    pub download_seconds: f64,
    /// Whether the model was in the node's cache already.
    pub cache_hit: bool,
    /// Seconds loading the model, warm-up included.
    pub load_seconds: f64,
    /// Seconds of the warm-up pass.
    pub warmup_seconds: f64,
}

impl Startup {
    /// Bytes done and in all, while a download is under way.
    pub fn downloading(&self) -> Option<(f64, f64)> {
        (self.download_total > 0.0 && self.download_bytes < self.download_total)
            .then_some((self.download_bytes, self.download_total))
    }
}

impl WorkerLoad {
    /// Waiting plus running.
    pub fn in_flight(&self) -> f64 {
        self.waiting + self.running
    }
}

/// Why a worker's load is unknown.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request failed.
    #[error("GET {url}: {message}")]
    Http {
        /// The URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The body is not the worker's metrics.
    #[error("{url}: {message}")]
    Format {
        /// The URL.
        url: String,
        /// What is missing.
        message: String,
    },
}

/// Parses the worker's exposition text (`gpuscale_worker_queue_depth`,
/// `gpuscale_worker_running_sequences`, `gpuscale_worker_requests_total`).
pub fn parse(url: &str, text: &str) -> Result<WorkerLoad, ScrapeError> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).map_err(|e| ScrapeError::Format {
        url: url.to_string(),
        message: format!("not Prometheus text: {e}"),
    })?;
    let sum = |name: &str| -> Option<f64> {
        let mut found = None;
        for s in scrape.samples.iter().filter(|s| s.metric == name) {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            *found.get_or_insert(0.0) += v;
        }
        found
    };
    let need = |name: &str| {
        sum(name).ok_or_else(|| ScrapeError::Format {
            url: url.to_string(),
            message: format!("no {name} sample: is this a gpuscale worker?"),
        })
    };
    let mut gpus: Vec<String> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "gpuscale_worker_gpu_info")
        .filter_map(|s| s.labels.get("uuid").map(String::from))
        .collect();
    gpus.sort();
    gpus.dedup();
    Ok(WorkerLoad {
        waiting: need("gpuscale_worker_queue_depth")?,
        running: need("gpuscale_worker_running_sequences")?,
        requests_total: sum("gpuscale_worker_requests_total").unwrap_or(0.0),
        generated_tokens_total: sum("gpuscale_worker_generation_tokens_total").unwrap_or(0.0),
        gpus,
        startup: Startup {
            download_bytes: sum("gpuscale_worker_model_download_bytes").unwrap_or(0.0),
            download_total: sum("gpuscale_worker_model_download_total_bytes").unwrap_or(0.0),
            download_seconds: sum("gpuscale_worker_model_download_seconds").unwrap_or(0.0),
            cache_hit: sum("gpuscale_worker_model_cache_hit").unwrap_or(0.0) > 0.0,
            load_seconds: sum("gpuscale_worker_model_load_seconds").unwrap_or(0.0),
            warmup_seconds: sum("gpuscale_worker_model_warmup_seconds").unwrap_or(0.0),
        },
    })
}

/// Where worker loads come from: HTTP in production, fixed values in tests.
pub trait Scrape: Send + Sync {
    /// The load of the worker serving `base` (`http://ip:port`).
    fn load<'a>(&'a self, base: &'a str) -> BoxFuture<'a, Result<WorkerLoad, ScrapeError>>;
}

/// Scrapes over HTTP with a short timeout: a slow worker must not stall the loop.
pub struct HttpScraper {
    client: reqwest::Client,
}

impl HttpScraper {
    /// A scraper whose requests give up after `timeout`.
    pub fn new(timeout: Duration) -> HttpScraper {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("a plain HTTP client always builds");
        HttpScraper { client }
    }
}

impl Scrape for HttpScraper {
    fn load<'a>(&'a self, base: &'a str) -> BoxFuture<'a, Result<WorkerLoad, ScrapeError>> {
        Box::pin(async move {
            let url = format!("{base}/metrics");
            let http = |e: reqwest::Error| ScrapeError::Http {
                url: url.clone(),
                message: e.to_string(),
            };
            let resp = self
                .client
                .get(&url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(http)?;
            let text = resp.text().await.map_err(http)?;
            parse(&url, &text)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_worker_exposition() {
        let text = "# HELP gpuscale_worker_queue_depth Requests waiting.\n\
            # TYPE gpuscale_worker_queue_depth gauge\n\
            gpuscale_worker_queue_depth 3\n\
            # TYPE gpuscale_worker_running_sequences gauge\n\
            gpuscale_worker_running_sequences 5\n\
            # TYPE gpuscale_worker_requests_total counter\n\
            gpuscale_worker_requests_total{status=\"ok\"} 40\n\
            gpuscale_worker_requests_total{status=\"error\"} 2\n\
            # TYPE gpuscale_worker_generation_tokens_total counter\n\
            gpuscale_worker_generation_tokens_total 1234\n\
            # EOF\n";
        let l = parse("http://w/metrics", text).unwrap();
        assert_eq!(
            l,
            WorkerLoad {
                waiting: 3.0,
                running: 5.0,
                requests_total: 42.0,
                generated_tokens_total: 1234.0,
                gpus: Vec::new(),
                startup: Startup::default(),
            }
        );
        assert_eq!(l.in_flight(), 8.0);
    }

    #[test]
    fn reads_a_download_under_way() {
        let text = "gpuscale_worker_queue_depth 0\ngpuscale_worker_running_sequences 0\n\
            gpuscale_worker_model_download_bytes 25\n\
            gpuscale_worker_model_download_total_bytes 100\n\
            gpuscale_worker_model_cache_hit 0\n";
        let l = parse("http://w/metrics", text).unwrap();
        assert_eq!(l.startup.downloading(), Some((25.0, 100.0)));
        assert!(!l.startup.cache_hit);
    }

    #[test]
    fn a_page_without_worker_metrics_is_an_error_not_zero_load() {
        let e = parse("http://w/metrics", "up 1\n").unwrap_err();
        assert!(
            e.to_string().contains("no gpuscale_worker_queue_depth"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_worker_is_an_error() {
        let s = HttpScraper::new(Duration::from_millis(300));
        let e = s.load("http://127.0.0.1:9").await.unwrap_err();
        assert!(
            e.to_string().starts_with("GET http://127.0.0.1:9/metrics"),
            "{e}"
        );
    }
}
