//! A model server: the simulated nodes' model directory over plain HTTP, as a model
//! registry or an object store's HTTP endpoint serves files, so `http(s)://` model
//! sources run end to end. Single byte ranges are honoured (206 with `Content-Range`,
//! 416 past the end) as RFC 9110 specifies
//! (<https://www.rfc-editor.org/rfc/rfc9110#name-range-requests>); a test can cut the
//! next responses short after some bytes (a connection lost mid-file) and read the
//! `Range` headers the server saw.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::get;

/// A running model server.
pub struct ModelServer {
    url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    dir: PathBuf,
    /// Bytes of body after which the next response is cut (`u64::MAX`: never).
    cut_next: AtomicU64,
    /// Bodies are sent at this pace (0: as fast as the socket takes them).
    bytes_per_second: AtomicU64,
    /// Every request's path and `Range` header.
    seen: Mutex<Vec<(String, Option<String>)>>,
}

impl ModelServer {
    /// Serves `dir` on a free port of 127.0.0.1.
    pub async fn start(dir: PathBuf) -> anyhow::Result<ModelServer> {
        let shared = Arc::new(Shared {
            dir,
            cut_next: AtomicU64::new(u64::MAX),
            bytes_per_second: AtomicU64::new(0),
            seen: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/{file}", get(serve))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(ModelServer { url, shared, task })
    }

    /// The base URL; a model is `{url}/{file name}`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Cuts the next response after `bytes` bytes of body: a connection lost
    /// mid-file, once.
    pub fn cut_next(&self, bytes: u64) {
        self.shared.cut_next.store(bytes, Ordering::Relaxed);
    }

    /// Sends bodies at `bytes_per_second` (0: unpaced), so a download lasts long
    /// enough to be watched.
    pub fn pace(&self, bytes_per_second: u64) {
        self.shared
            .bytes_per_second
            .store(bytes_per_second, Ordering::Relaxed);
    }

    /// The path and `Range` header of every request so far.
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.shared.seen.lock().expect("seen lock").clone()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `bytes=a-b` or `bytes=a-` (one range; suffix and multiple ranges are answered with
/// the whole file, which RFC 9110 allows a server to do).
fn range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers
        .get("range")?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    if v.contains(',') {
        return None;
    }
    let (a, b) = v.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = match b.trim() {
        "" => None,
        b => Some(b.parse().ok()?),
    };
    Some((a, b))
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response<Body> {
    let status = |code: StatusCode| {
        Response::builder()
            .status(code)
            .body(Body::empty())
            .expect("a response")
    };
    shared.seen.lock().expect("seen lock").push((
        file.clone(),
        headers
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    ));
    if file.contains('/') || file.starts_with('.') {
        return status(StatusCode::NOT_FOUND);
    }
    let Ok(bytes) = tokio::fs::read(shared.dir.join(&file)).await else {
        return status(StatusCode::NOT_FOUND);
    };
    let len = bytes.len() as u64;
    let (code, start, end) = match range(&headers) {
        Some((a, _)) if a >= len => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{len}"))
                .body(Body::empty())
                .expect("a response")
        }
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            a,
            b.unwrap_or(len - 1).min(len - 1),
        ),
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
    };
    let body = bytes[start as usize..=(end as usize).min(bytes.len().saturating_sub(1))].to_vec();
    // The cut is spent on the first response long enough to be cut.
    let mut cut = shared.cut_next.load(Ordering::Relaxed);
    if (body.len() as u64) > cut {
        shared.cut_next.store(u64::MAX, Ordering::Relaxed);
    } else {
        cut = u64::MAX;
    }
    let pace = shared.bytes_per_second.load(Ordering::Relaxed);
    let mut resp = Response::builder()
        .status(code)
        .header("accept-ranges", "bytes")
        .header("content-length", body.len());
    if code == StatusCode::PARTIAL_CONTENT {
        resp = resp.header("content-range", format!("bytes {start}-{end}/{len}"));
    }
    if cut == u64::MAX && pace == 0 {
        return resp.body(Body::from(body)).expect("a response");
    }
    // In chunks, paced; after `cut` bytes the body ends with an error, which aborts
    // the response short of its Content-Length (a connection lost mid-file).
    const CHUNK: usize = 256 << 10;
    let sendable = body.len().min(usize::try_from(cut).unwrap_or(usize::MAX));
    let body = axum::body::Bytes::from(body);
    let stream = futures::stream::unfold(0usize, move |at| {
        let body = body.clone(); // a reference count, not the bytes
        async move {
            if at >= sendable {
                return (at < body.len()).then(|| {
                    (
                        Err(std::io::Error::other("simulated connection loss")),
                        usize::MAX,
                    )
                });
            }
            let end = (at + CHUNK).min(sendable);
            if pace > 0 {
                let secs = (end - at) as f64 / pace as f64;
                tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
            }
            Some((Ok::<_, std::io::Error>(body.slice(at..end)), end))
        }
    });
    resp.body(Body::from_stream(stream)).expect("a response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ranges_whole_files_and_cuts() {
        let dir = std::env::temp_dir().join(format!("sim-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.gguf"), b"0123456789").unwrap();
        let server = ModelServer::start(dir.clone()).await.unwrap();
        let url = format!("{}/m.gguf", server.url());
        let http = reqwest::Client::new();
        let get = |range: Option<&'static str>| {
            let mut r = http.get(&url);
            if let Some(range) = range {
                r = r.header("range", range);
            }
            r.send()
        };
        let r = get(Some("bytes=2-4")).await.unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(r.headers()["content-range"], "bytes 2-4/10");
        assert_eq!(r.bytes().await.unwrap(), "234");
        let r = get(Some("bytes=7-")).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), "789");
        let r = get(Some("bytes=10-20")).await.unwrap();
        assert_eq!(r.status(), 416);
        let r = get(None).await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.bytes().await.unwrap()),
            (200, "0123456789".into())
        );
        server.cut_next(4);
        // Lost before or after the headers went out: an error either way, never a
        // short file taken for a whole one.
        let cut = match get(None).await {
            Ok(r) => r.bytes().await.is_err(),
            Err(_) => true,
        };
        assert!(cut);
        let r = get(None).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), "0123456789", "cut once only");
        assert_eq!(server.requests().len(), 6);
        assert_eq!(server.requests()[0].1.as_deref(), Some("bytes=2-4"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
