//! Reading a worker's load from its Prometheus `/metrics`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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

/// Scrapes over HTTP/1.1 with a short timeout: a slow worker must not stall the loop.
///
/// Connections are kept between scrapes, but as bare sockets. A pooled client
/// (reqwest, hyper-util's) keeps each idle connection's task, request channel and
/// buffers: 25 KB a worker in hyper alone, measured with heaptrack, so 250 MB at
/// 10,000 workers, where a parked socket is a descriptor. It is parked as a
/// `std::net::TcpStream`, out of tokio's reactor (`TcpStream::into_std` deregisters
/// it), and registered again when it is taken: a registration is tokio's
/// `ScheduledIo`, 256 bytes, and the 10,000 parked sockets' were 2.56 MB of the fleet
/// operator's heap (heaptrack), for two `epoll_ctl` calls a scrape.
/// Each scrape runs one exchange over a socket with hyper's connection-level API and
/// takes the socket back afterwards (`without_shutdown`); without keep-alive at all
/// the operator spent 1.7x the CPU per pass on connecting (README, fleet scale).
pub struct HttpScraper {
    timeout: Duration,
    idle: Mutex<Idle>,
    /// Exchanges under way at once, at most [`EXCHANGES`].
    exchanges: tokio::sync::Semaphore,
}

/// How many scrapes run at once, over all passes. Each exchange holds three 8 KB
/// allocations of hyper's while it runs (the write buffer, the read buffer and the
/// first block of its request channel: heaptrack, 24 KB an exchange), and passes come
/// in waves (every deployment is requeued each scrape interval), so the places fill
/// and the allocator keeps the peak's pages: unbounded, at 3,000 workers a heap
/// profile caught 3,388 exchanges at once, 28 MB of a 97 MB peak. At 256 places they
/// were still the largest holder at 2,500 workers (6.2 MB of a 28 MB peak). A loopback
/// exchange takes well under a millisecond, so 128 at once still scrape tens of
/// thousands of workers a second: the fleet (10,000 workers scraped every 2 s) ran as
/// many passes a second with 128 as with 256, and its operator's RSS at a quarter of
/// the size fell from 51.3 to 47.6 and 48.4 MiB (README, fleet scale). At 64, the
/// full fleet's RSS fell from 64.2 to about 61.5 MiB, the 10,000 workers still scraped
/// every 2 s (5,000 exchanges a second is about 13 ms a place). A worker that never
/// answers holds its place for the scrape timeout only.
const EXCHANGES: usize = 64;

/// Sockets parked after a scrape, by authority (`ip:port`), with when each was parked.
#[derive(Default)]
struct Idle {
    sockets: HashMap<String, (std::net::TcpStream, Instant)>,
    swept: Option<Instant>,
}

/// A socket parked longer than this is closed: its worker is probably gone (hyper's
/// pool closes idle connections after 90 s too).
const IDLE_FOR: Duration = Duration::from_secs(90);

/// A worker's page larger than this is refused rather than read (a worker's is a few KB).
const MAX_BODY: usize = 4 << 20;

impl HttpScraper {
    /// A scraper whose requests give up after `timeout`.
    pub fn new(timeout: Duration) -> HttpScraper {
        Self::with_limit(timeout, EXCHANGES)
    }

    fn with_limit(timeout: Duration, exchanges: usize) -> HttpScraper {
        HttpScraper {
            timeout,
            idle: Mutex::new(Idle::default()),
            exchanges: tokio::sync::Semaphore::new(exchanges),
        }
    }

    /// Sockets parked now.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.lock().sockets.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, authority: &str) -> Option<TcpStream> {
        self.lock()
            .sockets
            .remove(authority)
            .filter(|(_, at)| at.elapsed() < IDLE_FOR)
            // Still non-blocking, as `into_std` left it.
            .and_then(|(io, _)| TcpStream::from_std(io).ok())
    }

    fn park(&self, authority: &str, io: TcpStream) {
        let Ok(io) = io.into_std() else {
            return;
        };
        let now = Instant::now();
        let mut idle = self.lock();
        // Sockets of workers no longer scraped go within a sweep of IDLE_FOR.
        if idle.swept.is_none_or(|t| now - t > IDLE_FOR) {
            idle.sockets.retain(|_, (_, at)| now - *at < IDLE_FOR);
            idle.swept = Some(now);
        }
        idle.sockets.insert(authority.to_string(), (io, now));
    }

    /// `GET url` (with `authority` its `host:port`): the body, over a parked socket
    /// when there is one.
    async fn get(&self, url: &http::Uri, authority: &str) -> Result<String, String> {
        // A worker may have closed a parked socket (it restarted, or timed the
        // connection out): then a new one is tried, once. A GET is safe to repeat.
        let reused = match self.take(authority) {
            Some(io) => exchange(io, url, authority).await.ok(),
            None => None,
        };
        let (text, io) = match reused {
            Some(done) => done,
            None => {
                let io = TcpStream::connect(authority)
                    .await
                    .map_err(|e| format!("connecting: {e}"))?;
                let _ = io.set_nodelay(true);
                exchange(io, url, authority).await?
            }
        };
        if let Some(io) = io {
            self.park(authority, io);
        }
        Ok(text)
    }
}

/// One HTTP/1.1 GET over `io`: the body, and the socket when the server keeps it open.
async fn exchange(
    io: TcpStream,
    url: &http::Uri,
    authority: &str,
) -> Result<(String, Option<TcpStream>), String> {
    use http_body_util::BodyExt;

    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    // `send` moves in, so it is dropped once the answer is read: that lets the
    // connection finish and give the socket back.
    let answer = async move {
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let close = resp
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        let text = String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8")?;
        Ok::<_, String>((text, close))
    };
    // The connection is driven here, beside the request, rather than by a task of its
    // own: nothing outlives the exchange.
    let mut answer = std::pin::pin!(answer);
    let mut conn = std::pin::pin!(conn.without_shutdown());
    let (answer, parts, ended_first) = tokio::select! {
        r = &mut answer => (r, conn.await, false),
        // The server closed first; the answer may still be whole in hyper's hands.
        c = &mut conn => (answer.await, c, true),
    };
    let (text, close) = answer?;
    // A socket is parked only when the server keeps it open and no byte past the
    // answer came (the stream would be out of step).
    let io = parts
        .ok()
        .filter(|p| !close && !ended_first && p.read_buf.is_empty())
        .map(|p| p.io.into_inner());
    Ok((text, io))
}

impl Scrape for HttpScraper {
    fn load<'a>(&'a self, base: &'a str) -> BoxFuture<'a, Result<WorkerLoad, ScrapeError>> {
        Box::pin(async move {
            let url = format!("{base}/metrics");
            let http = |message: String| ScrapeError::Http {
                url: url.clone(),
                message,
            };
            let uri: http::Uri = url.parse().map_err(|e| http(format!("{e}")))?;
            if uri.scheme_str() != Some("http") {
                return Err(http("only http:// workers can be scraped".to_string()));
            }
            let Some(authority) = uri.authority().map(|a| a.to_string()) else {
                return Err(http("no host in the URL".to_string()));
            };
            // Waiting for a place is not the worker's slowness: the timeout starts after.
            let _place = self
                .exchanges
                .acquire()
                .await
                .map_err(|_| http("the scraper is closed".to_string()))?;
            // Boxed once a place is had: the thousands of scrapes waiting for one hold
            // only this small future, not the exchange's (a fleet's first wave had
            // 10,000 waiting; `heaptrack` put 25 MB of peak heap here when inline).
            let text = tokio::time::timeout(self.timeout, Box::pin(self.get(&uri, &authority)))
                .await
                .map_err(|_| http(format!("no answer within {:?}", self.timeout)))?
                .map_err(http)?;
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

    const PAGE: &str = "gpuscale_worker_queue_depth 1\ngpuscale_worker_running_sequences 2\n";

    #[tokio::test]
    async fn scrapes_reuse_one_parked_socket_per_worker() {
        use axum::extract::ConnectInfo;
        use std::net::SocketAddr;
        let peers = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move |ConnectInfo(peer): ConnectInfo<SocketAddr>| {
                seen.lock().unwrap().push(peer);
                async { PAGE }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        let s = HttpScraper::new(Duration::from_secs(2));
        for _ in 0..3 {
            assert_eq!(s.load(&base).await.unwrap().in_flight(), 3.0);
        }
        let peers = peers.lock().unwrap().clone();
        assert_eq!(peers.len(), 3);
        assert!(peers.iter().all(|p| *p == peers[0]), "{peers:?}");
        assert_eq!(s.parked(), 1);
    }

    /// A server that answers one request per connection and closes it soon after
    /// without saying so (as a worker that restarted, or timed the connection out, does).
    async fn one_answer_per_connection(status: &'static str) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut io, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match io.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{PAGE}",
                    PAGE.len()
                );
                let _ = io.write_all(answer.as_bytes()).await;
                // Closed a little later, once the client has parked it.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    drop(io);
                });
            }
        });
        (base, accepted)
    }

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_parked_socket_the_worker_closed_is_replaced_not_reported() {
        let (base, accepted) = one_answer_per_connection("200 OK").await;
        let s = HttpScraper::new(Duration::from_secs(2));
        for _ in 0..3 {
            assert_eq!(s.load(&base).await.unwrap().waiting, 1.0);
            // Parked, then closed by the server.
            assert_eq!(s.parked(), 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_error_status_is_an_error() {
        let (base, _) = one_answer_per_connection("503 Service Unavailable").await;
        let e = HttpScraper::new(Duration::from_secs(2))
            .load(&base)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .ends_with("HTTP status 503 Service Unavailable"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_worker_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // Accepted by the kernel's backlog, never read.
        let e = HttpScraper::new(Duration::from_millis(200))
            .load(&base)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no answer within 200ms"), "{e}");
        drop(listener);
    }

    /// Scrapes beyond the limit wait for a place instead of each opening a
    /// connection: ten scrapes of workers that never answer, three at a time.
    #[tokio::test]
    async fn no_more_exchanges_run_at_once_than_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((io, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(io); // never answered
            }
        });
        let s = Arc::new(HttpScraper::with_limit(Duration::from_millis(400), 3));
        let scrapes: Vec<_> = (0..10)
            .map(|_| {
                let (s, base) = (s.clone(), base.clone());
                tokio::spawn(async move { s.load(&base).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        for scrape in scrapes {
            assert!(scrape.await.unwrap().is_err());
        }
        // Every scrape had its own full timeout once it had a place.
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
        server.abort();
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
