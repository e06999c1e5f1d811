//! Reading a model's GGUF header where it lives, without its weights.
//!
//! An `http(s)://` model is read with HTTP range requests: the first MiB, then as long
//! a prefix as the parse says it needs (a GGUF header is metadata, the tokenizer's
//! vocabulary and the tensor table: a few MiB even for 150k-token vocabularies), never
//! more than [`MAX_HEADER_BYTES`] and never a byte of tensor data beyond that. A server
//! that ignores `Range` and answers 200 with the whole file is read only as far as the
//! prefix, then the connection is dropped
//! (<https://www.rfc-editor.org/rfc/rfc9110#name-range-requests>).
//!
//! `file://` and `pvc://` models live on the nodes: the operator's pod cannot open them,
//! so a probe pod reads them there (`reconcile::model`).

use std::time::Duration;

use gguf::{Gguf, ModelSummary};

/// The first read.
const FIRST_READ: u64 = 1 << 20;
/// The longest header read over HTTP.
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

/// Why a header could not be read over HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The request failed or timed out.
    #[error("GET {url} (bytes {start}-{end}): {message}")]
    Http {
        /// The URL.
        url: String,
        /// First byte asked for.
        start: u64,
        /// Last byte asked for.
        end: u64,
        /// What went wrong.
        message: String,
    },
    /// The file is not a usable GGUF.
    #[error("{url}: {source}")]
    Gguf {
        /// The URL.
        url: String,
        /// The reader's error.
        source: gguf::Error,
    },
    /// The header is longer than this reader fetches.
    #[error("{url}: the GGUF header is longer than {MAX_HEADER_BYTES} bytes")]
    TooLong {
        /// The URL.
        url: String,
    },
}

/// An HTTP client for header reads: a connect timeout and a timeout per request.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5).min(timeout))
        .timeout(timeout)
        .build()
        .expect("a TLS-capable HTTP client builds")
}

/// Reads the summary of the GGUF model at `url`.
pub async fn read_http(client: &reqwest::Client, url: &str) -> Result<ModelSummary, HeaderError> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut want = FIRST_READ;
    loop {
        let have = bytes.len() as u64;
        let got = fetch_range(client, url, have, want - 1).await?;
        let short = (got.len() as u64) < want - have;
        bytes.extend_from_slice(&got);
        let gguf_err = |source| HeaderError::Gguf {
            url: url.to_string(),
            source,
        };
        match Gguf::parse(&bytes) {
            Ok(g) => return g.summary().map_err(gguf_err),
            Err(e) => match e.prefix_needed() {
                // The file ended before the header did: it is cut short.
                Some(_) if short => return Err(gguf_err(e)),
                Some(need) if need > MAX_HEADER_BYTES => {
                    return Err(HeaderError::TooLong {
                        url: url.to_string(),
                    })
                }
                // Ask for what the parse needs, at least twice as much as before, so a
                // header of n bytes takes O(log n) requests.
                Some(need) => want = need.max(want * 2).min(MAX_HEADER_BYTES),
                None => return Err(gguf_err(e)),
            },
        }
    }
}

/// Bytes `start..=end` of `url` (fewer where the file ends first).
async fn fetch_range(
    client: &reqwest::Client,
    url: &str,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, HeaderError> {
    let fail = |message: String| HeaderError::Http {
        url: url.to_string(),
        start,
        end,
        message,
    };
    let mut resp = client
        .get(url)
        .header(reqwest::header::RANGE, format!("bytes={start}-{end}"))
        .send()
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    // 206: the range (or its part before the end of the file). 200: the server ignores
    // ranges and sends the whole file from byte 0. 416: the file ends before `start`.
    let skip = match resp.status().as_u16() {
        206 => {
            let first = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if first != Some(start) {
                return Err(fail(format!(
                    "206 with Content-Range {:?}, not starting at {start}",
                    resp.headers().get(reqwest::header::CONTENT_RANGE)
                )));
            }
            0
        }
        200 => start,
        416 => return Ok(Vec::new()),
        s => return Err(fail(format!("HTTP {s}"))),
    };
    let len = end + 1 - start;
    let mut out = Vec::with_capacity(len.min(FIRST_READ) as usize);
    let mut skipped = 0u64;
    while (out.len() as u64) < len {
        let Some(chunk) = resp.chunk().await.map_err(|e| fail(error_chain(&e)))? else {
            break;
        };
        let mut chunk = &chunk[..];
        if skipped < skip {
            let n = (skip - skipped).min(chunk.len() as u64) as usize;
            skipped += n as u64;
            chunk = &chunk[n..];
        }
        let room = (len - out.len() as u64) as usize;
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    // Dropping `resp` here closes a connection that would go on sending the file.
    Ok(out)
}

/// The error and its causes, one line (reqwest's Display omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{HeaderMap, Response, StatusCode};
    use axum::routing::get;

    use super::*;

    /// Serves `file` at `/m.gguf`; with `ranges`, honours `Range` as RFC 9110 says,
    /// else answers 200 with the whole file. Counts the bytes it sent.
    async fn serve(file: Vec<u8>, ranges: bool) -> (String, Arc<AtomicU64>) {
        let sent = Arc::new(AtomicU64::new(0));
        let file = Arc::new(file);
        let counter = sent.clone();
        let app = axum::Router::new().route(
            "/m.gguf",
            get(move |headers: HeaderMap| {
                let file = file.clone();
                let sent = counter.clone();
                async move {
                    let range = headers
                        .get("range")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes="))
                        .and_then(|v| v.split_once('-'))
                        .and_then(|(a, b)| {
                            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
                        });
                    match range {
                        Some((a, _)) if ranges && a >= file.len() => Response::builder()
                            .status(StatusCode::RANGE_NOT_SATISFIABLE)
                            .body(Body::empty())
                            .unwrap(),
                        Some((a, b)) if ranges => {
                            let b = b.min(file.len() - 1);
                            sent.fetch_add((b + 1 - a) as u64, Ordering::Relaxed);
                            Response::builder()
                                .status(StatusCode::PARTIAL_CONTENT)
                                .header("content-range", format!("bytes {a}-{b}/{}", file.len()))
                                .body(Body::from(file[a..=b].to_vec()))
                                .unwrap()
                        }
                        _ => {
                            // The whole file in 64 KiB chunks, counted as they are taken.
                            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                                file.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
                            let stream = futures::stream::iter(chunks).map(move |c| {
                                if let Ok(c) = &c {
                                    sent.fetch_add(c.len() as u64, Ordering::Relaxed);
                                }
                                c
                            });
                            Response::new(Body::from_stream(stream))
                        }
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/m.gguf"), sent)
    }
    use futures::StreamExt;

    #[tokio::test]
    async fn reads_the_real_header_with_ranges_and_without() {
        let Some(path) = gguf::smollm2_fixture() else {
            return;
        };
        let file = std::fs::read(&path).unwrap();
        let want = Gguf::parse(&file).unwrap().summary().unwrap();
        let c = client(Duration::from_secs(10));
        for ranges in [true, false] {
            let (url, sent) = serve(file.clone(), ranges).await;
            let got = read_http(&c, &url).await.unwrap();
            assert_eq!(got, want);
            let sent = sent.load(Ordering::Relaxed);
            // The header of SmolLM2 (49k-token vocabulary and merges) is about 2 MB of
            // a 100 MB file. With ranges, exactly the prefix read is sent; a server that
            // ignores them sends what the socket buffers take before the drop (13 MB
            // seen on loopback under load), never the file.
            let bound = if ranges { 4 << 20 } else { file.len() / 2 };
            assert!(sent < bound as u64, "ranges {ranges}: sent {sent}");
        }
    }

    #[tokio::test]
    async fn cut_and_foreign_files_and_dead_servers_are_named() {
        let c = client(Duration::from_secs(2));
        let (url, _) = serve(b"<html>not a model</html>".to_vec(), true).await;
        let e = read_http(&c, &url).await.unwrap_err().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");
        // A header cut short: the file ends inside the metadata.
        let mut cut = gguf::Writer::new(3)
            .kv("general.architecture", gguf::Value::String("llama".into()))
            .bytes();
        cut.truncate(30);
        let (url, _) = serve(cut, true).await;
        let e = read_http(&c, &url).await.unwrap_err().to_string();
        assert!(e.contains("truncated GGUF"), "{e}");
        let e = read_http(&c, "http://127.0.0.1:9/m.gguf")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("GET http://127.0.0.1:9/m.gguf (bytes 0-1048575): "),
            "{e}"
        );
        let (url, _) = serve(Vec::new(), true).await;
        let e = read_http(&c, &url.replace("m.gguf", "missing"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("HTTP 404"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and never answers.
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let c = client(Duration::from_millis(500));
        let e = read_http(&c, &format!("http://{addr}/m.gguf"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("timed out") || e.contains("timeout"), "{e}");
        hold.abort();
    }
}
