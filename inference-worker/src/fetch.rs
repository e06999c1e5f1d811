//! Fetching an `http(s)://` model into the node's model cache before it is loaded.
//!
//! One download per node, shared by every replica there: an exclusive lock on
//! `<file>.lock` is held while a replica checks the cache and downloads, so a second
//! replica waits and then finds the file complete. A download goes to `<file>.partial`
//! and resumes from its length with a `Range` request after an interrupted transfer
//! (here, or in a replica that died); it is renamed into place only once complete and,
//! when a SHA-256 was given, verified (a mismatch deletes it: a corrupt model is never
//! served). A cached file is memory-mapped where it lies, never copied. After a
//! download, the least recently used other models are evicted until the cache fits its
//! size limit; one that another replica is downloading (its lock held) is kept.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::metrics::Metrics;

/// What to fetch and where.
#[derive(Clone, Debug)]
pub struct Fetch {
    /// The model's URL.
    pub url: String,
    /// Its place in the cache.
    pub dest: PathBuf,
    /// The expected SHA-256, lowercase hex.
    pub sha256: Option<String>,
    /// Evict other models beyond this many bytes in the cache directory.
    pub cache_max_bytes: Option<u64>,
    /// Interrupted transfers resumed before giving up.
    pub retries: u32,
}

/// What a fetch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The file was in the cache (no byte downloaded).
    pub cached: bool,
    /// Bytes downloaded by this process.
    pub downloaded: u64,
    /// Where the first request resumed (0: from the start).
    pub resumed_from: u64,
    /// Models evicted to make room.
    pub evicted: Vec<PathBuf>,
}

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A local file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server refused or the transfer broke, after the retries.
    #[error("downloading {url}: {message} (at {at} of {total} bytes; the partial file is kept and resumed next time)")]
    Transfer {
        /// The URL.
        url: String,
        /// What happened.
        message: String,
        /// Bytes on disk.
        at: u64,
        /// The file's size, if known.
        total: String,
    },
    /// The server answered with an error that a retry will not change.
    #[error("downloading {url}: the server answered HTTP {status}")]
    Refused {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The downloaded file is not the one asked for.
    #[error("downloading {url}: SHA-256 mismatch: expected {expected}, got {got}; the file was deleted, not served")]
    Mismatch {
        /// The URL.
        url: String,
        /// What `--model-sha256` said.
        expected: String,
        /// What the bytes hash to.
        got: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Makes `f.dest` hold the complete model, downloading it if the cache lacks it.
pub async fn ensure(f: &Fetch, metrics: &Arc<Metrics>) -> Result<Fetched, FetchError> {
    let dir = f.dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let lock_path = sibling(&f.dest, ".lock");
    let lock = File::create(&lock_path).map_err(io("creating", &lock_path))?;
    // Blocks while another replica on this node downloads the same model.
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .expect("the lock task does not panic")
        .map_err(io("locking", &lock_path))?;
    let result = fetch_locked(f, metrics).await;
    drop(lock); // unlocks
    result
}

async fn fetch_locked(f: &Fetch, metrics: &Arc<Metrics>) -> Result<Fetched, FetchError> {
    if f.dest.is_file() && cached_ok(f)? {
        // Touched, so eviction counts it as used.
        let _ = File::options()
            .append(true)
            .open(&f.dest)
            .and_then(|file| file.set_modified(std::time::SystemTime::now()));
        let size = std::fs::metadata(&f.dest).map_or(0, |m| m.len());
        metrics.download_total_bytes.set(size as i64);
        metrics.download_bytes.set(size as i64);
        return Ok(Fetched {
            cached: true,
            downloaded: 0,
            resumed_from: 0,
            evicted: Vec::new(),
        });
    }
    let partial = sibling(&f.dest, ".partial");
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .expect("a TLS-capable HTTP client builds");
    let mut resumed_from = None;
    let mut downloaded = 0;
    let mut attempt = 0;
    let (size, digest) = loop {
        match transfer(f, &client, &partial, metrics).await {
            Ok(t) => {
                resumed_from.get_or_insert(t.from);
                downloaded += t.got;
                break (t.size, t.digest);
            }
            Err((e, t)) => {
                resumed_from.get_or_insert(t.from);
                downloaded += t.got;
                attempt += 1;
                if attempt > f.retries || !matches!(e, FetchError::Transfer { .. }) {
                    return Err(e);
                }
                tracing::warn!(error = %e, attempt, "model download interrupted; resuming");
                tokio::time::sleep(Duration::from_millis(500 << attempt.min(5))).await;
            }
        }
    };
    let got = hex(&digest);
    if let Some(expected) = &f.sha256 {
        if *expected != got {
            let _ = std::fs::remove_file(&partial);
            return Err(FetchError::Mismatch {
                url: f.url.clone(),
                expected: expected.clone(),
                got,
            });
        }
    }
    std::fs::write(sibling(&f.dest, ".sha256"), &got).map_err(io("writing", &f.dest))?;
    std::fs::rename(&partial, &f.dest).map_err(io("renaming", &partial))?;
    tracing::info!(url = %f.url, bytes = size, sha256 = %got, "model downloaded");
    let evicted = match f.cache_max_bytes {
        Some(max) => evict(&f.dest, max),
        None => Vec::new(),
    };
    Ok(Fetched {
        cached: false,
        downloaded,
        resumed_from: resumed_from.unwrap_or(0),
        evicted,
    })
}

/// Whether the cached file is the model asked for: with a SHA-256, the digest recorded
/// when it was downloaded (or, lacking that, the file's own) must match.
fn cached_ok(f: &Fetch) -> Result<bool, FetchError> {
    let Some(expected) = &f.sha256 else {
        return Ok(true);
    };
    let recorded = std::fs::read_to_string(sibling(&f.dest, ".sha256")).ok();
    let got = match recorded {
        Some(r) => r.trim().to_string(),
        None => {
            let mut file = File::open(&f.dest).map_err(io("opening", &f.dest))?;
            hex(&hash_prefix(&mut file, u64::MAX, &f.dest)?.finalize())
        }
    };
    if got != *expected {
        tracing::warn!(path = %f.dest.display(), %got, %expected, "cached model has another SHA-256; downloading again");
        let _ = std::fs::remove_file(&f.dest);
        return Ok(false);
    }
    Ok(true)
}

struct Transfer {
    from: u64,
    got: u64,
    size: u64,
    digest: Vec<u8>,
}

/// One request: resumes `partial` from its length to the end of the file.
async fn transfer(
    f: &Fetch,
    client: &reqwest::Client,
    partial: &Path,
    metrics: &Metrics,
) -> Result<Transfer, (FetchError, Transfer)> {
    let mut file = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(partial)
    {
        Ok(file) => file,
        Err(e) => return Err((io("opening", partial)(e), empty(0))),
    };
    let have = file.metadata().map_or(0, |m| m.len());
    let broken = |message: String, at: u64, total: Option<u64>, got: u64| {
        (
            FetchError::Transfer {
                url: f.url.clone(),
                message,
                at,
                total: total.map_or_else(|| "unknown".into(), |t| t.to_string()),
            },
            empty_from(have, got),
        )
    };
    let mut req = client.get(&f.url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| broken(chain(&e), have, None, 0))?;
    let status = resp.status().as_u16();
    // 206: the rest, appended. 200: the whole file (a server that ignores ranges):
    // start over. 416: nothing after `have`: the partial file may be complete or
    // longer than the file; start over to be sure.
    let (start, size) = match status {
        206 => (
            have,
            resp.headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok()),
        ),
        200 => (0, resp.content_length()),
        416 => {
            let _ = file.set_len(0);
            return Err(broken(
                "the partial file is not a prefix of the file (HTTP 416); starting over".into(),
                0,
                None,
                0,
            ));
        }
        s if (400..500).contains(&s) && s != 408 && s != 429 => {
            return Err((
                FetchError::Refused {
                    url: f.url.clone(),
                    status: s,
                },
                empty(have),
            ))
        }
        s => return Err(broken(format!("HTTP {s}"), have, None, 0)),
    };
    let hasher = if start == 0 {
        Sha256::new()
    } else {
        match hash_prefix(&mut file, start, partial) {
            Ok(h) => h,
            Err(e) => return Err((e, empty(have))),
        }
    };
    let mut hasher = hasher;
    if let Err(e) = file
        .set_len(start)
        .and_then(|()| file.seek(SeekFrom::Start(start)).map(drop))
    {
        return Err((io("truncating", partial)(e), empty(have)));
    }
    let total = size.unwrap_or(0);
    metrics.download_total_bytes.set(total as i64);
    metrics.download_bytes.set(start as i64);
    let mut at = start;
    let mut got = 0;
    let mut last_log = Instant::now();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let _ = file.flush();
                return Err(broken(chain(&e), at, size, got));
            }
        };
        if let Err(e) = file.write_all(&chunk) {
            return Err((io("writing", partial)(e), empty_from(have, got)));
        }
        hasher.update(&chunk);
        at += chunk.len() as u64;
        got += chunk.len() as u64;
        metrics.download_bytes.set(at as i64);
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(bytes = at, total, "downloading the model");
        }
    }
    if let Err(e) = file.sync_all() {
        return Err((io("syncing", partial)(e), empty_from(have, got)));
    }
    if size.is_some_and(|s| s != at) {
        return Err(broken(
            format!("the body ended at {at} bytes"),
            at,
            size,
            got,
        ));
    }
    Ok(Transfer {
        from: start,
        got,
        size: at,
        digest: hasher.finalize().to_vec(),
    })
}

fn empty(from: u64) -> Transfer {
    empty_from(from, 0)
}

fn empty_from(from: u64, got: u64) -> Transfer {
    Transfer {
        from,
        got,
        size: 0,
        digest: Vec::new(),
    }
}

/// The SHA-256 state over the first `n` bytes of `file` (all of it for `u64::MAX`).
fn hash_prefix(file: &mut File, n: u64, path: &Path) -> Result<Sha256, FetchError> {
    file.seek(SeekFrom::Start(0)).map_err(io("reading", path))?;
    let mut hasher = Sha256::new();
    let mut left = n;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let read = file.read(&mut buf[..want]).map_err(io("reading", path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        left -= read as u64;
    }
    Ok(hasher)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes the least recently used models beside `keep` until the directory's models
/// take at most `max` bytes; a model whose lock another process holds is kept.
fn evict(keep: &Path, max: u64) -> Vec<PathBuf> {
    let Some(dir) = keep.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut models: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_name()?.to_str()?;
            if name.ends_with(".lock") || name.ends_with(".sha256") {
                return None;
            }
            let meta = e.metadata().ok()?;
            if !meta.is_file() {
                return None;
            }
            Some((meta.modified().ok()?, meta.len(), path.clone()))
        })
        .collect();
    let mut total: u64 = models.iter().map(|m| m.1).sum();
    models.sort();
    let mut evicted = Vec::new();
    for (_, len, path) in models {
        if total <= max {
            break;
        }
        if path == keep {
            continue;
        }
        let model = match path.to_str().and_then(|p| p.strip_suffix(".partial")) {
            Some(p) => PathBuf::from(p),
            None => path.clone(),
        };
        // Another replica downloading or checking it holds its lock.
        let Ok(lock) = File::create(sibling(&model, ".lock")) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            let _ = std::fs::remove_file(sibling(&model, ".sha256"));
            total -= len;
            tracing::info!(path = %path.display(), bytes = len, "evicted from the model cache");
            evicted.push(path);
        }
    }
    evicted
}

/// The error and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
