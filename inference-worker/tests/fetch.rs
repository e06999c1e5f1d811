//! Fetching an http(s) model into the node's cache (issue #16): a fresh download, one
//! resumed after the connection broke, one resumed from a dead replica's partial file,
//! a corrupt one (SHA-256 mismatch: never served), a cache hit (no byte fetched), one
//! download for two replicas at once, eviction by size, and a refusal that says why.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::get;
use inference_worker::fetch::{ensure, Fetch, FetchError};
use inference_worker::metrics::Metrics;
use sha2::{Digest, Sha256};

struct Server {
    file: Vec<u8>,
    /// Cut the next response after this many bytes (u64::MAX: none).
    cut_next: AtomicU64,
    /// The Range header of each request ("" for none).
    ranges: Mutex<Vec<String>>,
    sent: AtomicU64,
}

async fn serve(State(s): State<Arc<Server>>, headers: HeaderMap) -> Response<Body> {
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    s.ranges.lock().unwrap().push(range.clone());
    let len = s.file.len();
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    if start >= len && !range.is_empty() {
        return Response::builder().status(416).body(Body::empty()).unwrap();
    }
    let body = s.file[start..].to_vec();
    let mut resp = Response::builder()
        .header("content-length", body.len())
        .status(if range.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::PARTIAL_CONTENT
        });
    if !range.is_empty() {
        resp = resp.header("content-range", format!("bytes {start}-{}/{len}", len - 1));
    }
    let cut = s.cut_next.swap(u64::MAX, Ordering::SeqCst) as usize;
    if cut < body.len() {
        s.sent.fetch_add(cut as u64, Ordering::SeqCst);
        // Headers and `cut` bytes go out, then the connection breaks.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(body[..cut].to_vec()),
            Err(std::io::Error::other("connection lost")),
        ];
        let stream = futures_util::stream::iter(chunks);
        return resp.body(Body::from_stream(stream)).unwrap();
    }
    s.sent.fetch_add(body.len() as u64, Ordering::SeqCst);
    resp.body(Body::from(body)).unwrap()
}

async fn start(file: Vec<u8>) -> (String, Arc<Server>) {
    let server = Arc::new(Server {
        file,
        cut_next: AtomicU64::new(u64::MAX),
        ranges: Mutex::default(),
        sent: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .route("/m.gguf", get(serve))
        .route(
            "/missing.gguf",
            get(|| async { Response::builder().status(404).body(Body::empty()).unwrap() }),
        )
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, server)
}

/// 3 MiB of bytes that are not all alike.
fn model() -> Vec<u8> {
    (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn cache(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn fetch(url: &str, dest: std::path::PathBuf, sha256: Option<String>) -> Fetch {
    Fetch {
        url: url.into(),
        dest,
        sha256,
        cache_max_bytes: None,
        retries: 3,
    }
}

#[tokio::test]
async fn downloads_resumes_after_a_break_then_hits_the_cache() {
    let file = model();
    let (base, server) = start(file.clone()).await;
    let dir = cache("resume");
    let f = fetch(
        &format!("{base}/m.gguf"),
        dir.join("m.gguf"),
        Some(sha(&file)),
    );
    let metrics = Arc::new(Metrics::new());
    server.cut_next.store(1 << 20, Ordering::SeqCst);
    let got = ensure(&f, &metrics).await.unwrap();
    assert!(!got.cached);
    assert_eq!(std::fs::read(&f.dest).unwrap(), file);
    // The break at 1 MiB was resumed from where the file ended, not from the start.
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges, ["", "bytes=1048576-"]);
    assert_eq!(got.downloaded, file.len() as u64);
    assert_eq!(server.sent.load(Ordering::SeqCst), file.len() as u64);
    assert_eq!(metrics.download_bytes.get(), file.len() as i64);
    // Another replica on the node: the cache, no request.
    let again = ensure(&f, &Arc::new(Metrics::new())).await.unwrap();
    assert!(again.cached);
    assert_eq!(server.ranges.lock().unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_dead_replica_s_partial_file_is_resumed() {
    let file = model();
    let (base, _server) = start(file.clone()).await;
    let dir = cache("partial");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.gguf.partial"), &file[..777_777]).unwrap();
    let f = fetch(
        &format!("{base}/m.gguf"),
        dir.join("m.gguf"),
        Some(sha(&file)),
    );
    let got = ensure(&f, &Arc::new(Metrics::new())).await.unwrap();
    assert_eq!(got.resumed_from, 777_777);
    assert_eq!(got.downloaded, (file.len() - 777_777) as u64);
    assert_eq!(std::fs::read(&f.dest).unwrap(), file);
    assert!(!dir.join("m.gguf.partial").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_corrupt_download_is_deleted_never_served() {
    let file = model();
    let (base, _server) = start(file.clone()).await;
    let dir = cache("corrupt");
    let wrong = sha(b"another model");
    let f = fetch(
        &format!("{base}/m.gguf"),
        dir.join("m.gguf"),
        Some(wrong.clone()),
    );
    let e = ensure(&f, &Arc::new(Metrics::new())).await.unwrap_err();
    assert!(matches!(e, FetchError::Mismatch { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&wrong) && text.contains(&sha(&file)),
        "{text}"
    );
    assert!(!f.dest.exists() && !dir.join("m.gguf.partial").exists());
    // A cached file that is not the one asked for is fetched again, not served.
    std::fs::write(&f.dest, b"stale").unwrap();
    std::fs::write(dir.join("m.gguf.sha256"), sha(b"stale")).unwrap();
    let right = fetch(&f.url, f.dest.clone(), Some(sha(&file)));
    let got = ensure(&right, &Arc::new(Metrics::new())).await.unwrap();
    assert!(!got.cached);
    assert_eq!(std::fs::read(&f.dest).unwrap(), file);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_at_once_download_once() {
    let file = model();
    let (base, server) = start(file.clone()).await;
    let dir = cache("once");
    let f = fetch(&format!("{base}/m.gguf"), dir.join("m.gguf"), None);
    let (ma, mb) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let (a, b) = tokio::join!(ensure(&f, &ma), ensure(&f, &mb));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(u8::from(a.cached) + u8::from(b.cached), 1, "{a:?} {b:?}");
    assert_eq!(server.sent.load(Ordering::SeqCst), file.len() as u64);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_least_recently_used_models_are_evicted_to_fit() {
    let file = model();
    let (base, _server) = start(file.clone()).await;
    let dir = cache("evict");
    std::fs::create_dir_all(&dir).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for (name, age) in [("old.gguf", 2u64), ("older.gguf", 3)] {
        std::fs::write(dir.join(name), vec![0u8; 2 << 20]).unwrap();
        let t = old - std::time::Duration::from_secs(age);
        std::fs::File::options()
            .append(true)
            .open(dir.join(name))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    let mut f = fetch(&format!("{base}/m.gguf"), dir.join("m.gguf"), None);
    // Room for the new model and one 2 MiB model: the older goes.
    f.cache_max_bytes = Some((file.len() + (2 << 20)) as u64);
    let got = ensure(&f, &Arc::new(Metrics::new())).await.unwrap();
    assert_eq!(got.evicted, [dir.join("older.gguf")]);
    assert!(dir.join("old.gguf").exists() && f.dest.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_refusal_says_why_and_is_not_retried() {
    let (base, _server) = start(model()).await;
    let dir = cache("refused");
    let f = fetch(&format!("{base}/missing.gguf"), dir.join("x.gguf"), None);
    let started = std::time::Instant::now();
    let e = ensure(&f, &Arc::new(Metrics::new())).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("downloading {base}/missing.gguf: the server answered HTTP 404")
    );
    assert!(
        started.elapsed() < std::time::Duration::from_millis(400),
        "retried"
    );
    let dead = fetch("http://127.0.0.1:9/m.gguf", dir.join("y.gguf"), None);
    let mut dead = dead;
    dead.retries = 1;
    let e = ensure(&dead, &Arc::new(Metrics::new()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("downloading http://127.0.0.1:9/m.gguf: "),
        "{e}"
    );
    assert!(e.contains("resumed next time"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
