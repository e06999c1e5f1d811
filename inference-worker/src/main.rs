//! `inference-worker`: serves one GGUF model over an OpenAI-compatible HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use inference_worker::backend::cpu::CpuBackend;
use inference_worker::backend::cuda::{self, CudaBackend, CudaOptions};
use inference_worker::backend::split::{Part, Split};
use inference_worker::backend::{Backend, Logits, SeqChunk};
use inference_worker::budget;
use inference_worker::device::{self, Device, DeviceRequest, Probe};
use inference_worker::http::{router, AppState, Loaded};
use inference_worker::metrics::Metrics;
use inference_worker::model::ModelConfig;
use inference_worker::scheduler::{self, EngineConfig};
use inference_worker::tokenizer::{ChatTemplate, Tokenizer};

/// Serves a GGUF model (Llama family) over an OpenAI-compatible HTTP API with continuous
/// batching, a paged KV cache, Prometheus metrics and graceful drain on SIGTERM.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "inference-worker",
    version,
    after_help = "Also: `inference-worker inspect MODEL [--json]` prints what sizing a \
                  replica needs, from the model's header."
)]
struct Cli {
    /// Path to the model file (GGUF v2/v3; F32, F16, Q4_0, Q4_1, Q8_0 tensors).
    #[arg(long, env = "GPUSCALE_MODEL")]
    model: PathBuf,
    /// Fetch the model from this http(s) URL into the node's cache at --model first
    /// (resumed after an interruption; one download per node; a cached copy is used
    /// where it lies).
    #[arg(long, env = "GPUSCALE_MODEL_URL", value_parser = http_url)]
    model_url: Option<String>,
    /// The SHA-256 the fetched model must have (64 hex digits); with --model-url only.
    #[arg(long, requires = "model_url", value_parser = sha256_hex)]
    model_sha256: Option<String>,
    /// Evict the least recently used other models from the cache directory beyond this
    /// size, e.g. 200GiB; with --model-url only.
    #[arg(long, requires = "model_url", value_parser = parse_bytes)]
    model_cache_max_bytes: Option<u64>,
    /// Model id served in the API (default: the file name without extension).
    #[arg(long)]
    model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080, env = "GPUSCALE_PORT")]
    port: u16,
    /// Compute threads (default: all cores).
    #[arg(long, value_parser = within::<1, 1024>)]
    threads: Option<usize>,
    /// Device to run on: auto (CUDA when a driver, a GPU and NVRTC are present, else
    /// CPU), cpu, or cuda:N. A comma-separated list (cuda:0,cuda:1 or cuda:0,cpu) splits
    /// the model by layers over those devices, in order, each device's share of the
    /// layers in proportion to its --memory-budget (llama.cpp's --split-mode layer).
    #[arg(
        long,
        default_value = "auto",
        env = "GPUSCALE_DEVICE",
        value_delimiter = ','
    )]
    device: Vec<DeviceRequest>,
    /// Where compiled CUDA kernels are cached (default ~/.cache/gpuscale/kernels).
    #[arg(long, env = "GPUSCALE_KERNEL_CACHE")]
    kernel_cache: Option<PathBuf>,
    /// Replay decode steps as CUDA graphs (off: launch every kernel, for debugging).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cuda_graphs: bool,
    /// Memory (or VRAM) budget for weights plus KV cache, e.g. 1GiB, 512MiB or bytes,
    /// per device: one size for every device of --device, or one per device
    /// (20GiB,60GiB). What remains after the weights becomes KV-cache blocks.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes, env = "GPUSCALE_MEMORY_BUDGET", value_delimiter = ',')]
    memory_budget: Vec<u64>,
    /// Requests that may wait for a batch slot; beyond it the API answers 429.
    /// 0 takes only what free batch slots can take at once.
    #[arg(long, default_value_t = 64, value_parser = within::<0, 1_000_000>)]
    queue_size: usize,
    /// Sequences batched together in one forward pass.
    #[arg(long, default_value_t = 8, value_parser = within::<1, 1024>)]
    max_batch: usize,
    /// Tokens in one forward pass; longer prompts are processed in chunks.
    #[arg(long, default_value_t = 512, value_parser = within::<1, 1_048_576>)]
    max_batch_tokens: usize,
    /// Longest sequence, prompt plus completion (default: the model's context, at most 4096).
    #[arg(long, value_parser = within::<2, 1_048_576>)]
    max_seq_len: Option<usize>,
    /// Keep full KV-cache blocks after their request ends and reuse them for later
    /// requests whose prompts begin with the same tokens (off: every prompt is computed).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prefix_caching: bool,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, value_parser = within::<1, 1024>)]
    block_size: usize,
    /// Seconds a client has to send a request's headers before its connection closes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_read_timeout_seconds: u64,
    /// Longest wait for in-flight requests after SIGTERM before exiting anyway.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    drain_timeout_seconds: u64,
    /// Where to write why the worker stopped on a fatal error: the container's
    /// terminationMessagePath (the operator passes /dev/termination-log).
    #[arg(long)]
    termination_log: Option<PathBuf>,
    /// Answer this share of completion requests with a 500 before any work, in
    /// percent: fault injection, to test what routers and rollouts do with a failing
    /// replica (0, the default: none).
    #[arg(long, default_value_t = 0, value_parser = within::<0, 100>, env = "GPUSCALE_FAIL_PERCENT")]
    fail_percent: usize,
    /// Log as JSON lines (default) or human text.
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

/// A whole number within `LO..=HI`; clap names the flag in the error.
fn within<const LO: usize, const HI: usize>(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number (valid: {LO} to {HI})"))?;
    if !(LO..=HI).contains(&n) {
        return Err(format!("{n} is outside the valid range {LO} to {HI}"));
    }
    Ok(n)
}

/// An `http://` or `https://` URL.
fn http_url(s: &str) -> Result<String, String> {
    if (s.starts_with("http://") || s.starts_with("https://")) && s.len() > "https://".len() {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an http:// or https:// URL"))
    }
}

/// 64 hex digits, lowercased.
fn sha256_hex(s: &str) -> Result<String, String> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(format!("{s:?} is not a SHA-256 (64 hex digits)"))
    }
}

/// Parses sizes like `512MiB`, `2GiB`, `1.5G`, `1000000`; zero is refused.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 512MiB or 2GiB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "Ki" | "KiB" => 1024.0,
        "M" | "MB" => 1e6,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use KiB, MiB, GiB, K, M, G)"
            ))
        }
    };
    let bytes = (n * mult) as u64;
    if bytes == 0 {
        return Err(format!(
            "{s:?} is no memory at all; give a size such as 512MiB"
        ));
    }
    Ok(bytes)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "inspect") {
        let cli = inference_worker::inspect::InspectCli::parse_from(std::env::args_os().skip(1));
        return inference_worker::inspect::run(&cli);
    }
    let cli = Cli::parse();
    let result = serve_model(&cli).await;
    if let (Err(e), Some(path)) = (&result, &cli.termination_log) {
        // The kubelet copies this file (at most 4096 bytes) into the container's
        // lastState, where `kubectl describe` and the operator read why it stopped.
        let text: String = format!("{e:#}").chars().take(4000).collect();
        let _ = std::fs::write(path, text);
    }
    result
}

async fn serve_model(cli: &Cli) -> anyhow::Result<()> {
    let cli = cli.clone();
    // Settings that can never serve are refused before anything starts.
    if cli.model.is_dir() {
        anyhow::bail!(
            "--model {}: is a directory; give the path of a GGUF file",
            cli.model.display()
        );
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let probe = Probe::detect();
    let devices = device::select_all(&cli.device, probe).map_err(anyhow::Error::msg)?;
    let budgets = budgets(&cli.memory_budget, devices.len()).map_err(anyhow::Error::msg)?;
    for (device, why) in &devices {
        tracing::info!(%device, reason = %why, ?probe, "device selected");
    }
    let devices: Vec<(Device, u64)> = devices.into_iter().map(|d| d.0).zip(budgets).collect();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the compute threads")?;

    let model_name = cli.model_name.clone().unwrap_or_else(|| {
        cli.model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let metrics = Arc::new(Metrics::new());
    // What the device plugin gave this pod, for the operator's ledger (none on CPU).
    let gpus = inference_worker::telemetry::visible_gpus();
    if !gpus.is_empty() {
        tracing::info!(?gpus, "GPUs assigned to this worker");
    }
    metrics.set_gpus(&gpus);
    if cli.fail_percent > 0 {
        tracing::warn!(
            percent = cli.fail_percent,
            "fault injection: failing this share of completion requests"
        );
    }
    let state = Arc::new(
        AppState::new(Arc::clone(&metrics), model_name.clone())
            .with_fail_percent(cli.fail_percent as u32),
    );
    let addr: SocketAddr = format!("{}:{}", cli.host, cli.port)
        .parse()
        .context("--host/--port")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, model = %cli.model.display(), threads, "listening; loading the model");

    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(Arc::clone(&state));
    let header_timeout = Duration::from_secs(cli.header_read_timeout_seconds);
    let server = tokio::spawn(serve(listener, app, header_timeout, shutdown_rx));

    if let Some(url) = &cli.model_url {
        // Served meanwhile: /healthz answers and /metrics shows the download's progress.
        let started = Instant::now();
        let fetch = inference_worker::fetch::Fetch {
            url: url.clone(),
            dest: cli.model.clone(),
            sha256: cli.model_sha256.clone(),
            cache_max_bytes: cli.model_cache_max_bytes,
            retries: 5,
        };
        let fetched = inference_worker::fetch::ensure(&fetch, &metrics).await?;
        metrics.model_cache_hit.set(i64::from(fetched.cached));
        metrics
            .download_seconds
            .set(started.elapsed().as_secs_f64());
        tracing::info!(
            cached = fetched.cached,
            downloaded = fetched.downloaded,
            resumed_from = fetched.resumed_from,
            evicted = ?fetched.evicted,
            seconds = started.elapsed().as_secs_f64(),
            "model in the node's cache"
        );
    }
    let started = Instant::now();
    let loaded = tokio::task::spawn_blocking({
        let cli = cli.clone();
        let metrics = Arc::clone(&metrics);
        move || load(&cli, &devices, metrics)
    })
    .await??;
    metrics.load_seconds.set(started.elapsed().as_secs_f64());
    tracing::info!(
        load_seconds = started.elapsed().as_secs_f64(),
        max_seq_len = loaded.max_seq_len,
        "model loaded and warmed up; ready"
    );
    let engine = loaded.engine.clone();
    state.set_loaded(loaded);

    wait_for_signal().await;
    // Drain: readiness goes false and new requests get 503, in-flight ones finish.
    engine.drain();
    metrics.ready.set(0);
    tracing::info!(in_flight = engine.in_flight(), "SIGTERM: draining");
    let deadline = Instant::now() + Duration::from_secs(cli.drain_timeout_seconds);
    while engine.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut = engine.in_flight();
    if cut > 0 {
        // Each one ends with an error (a stream with an error event and [DONE]), at the
        // end of the current step, rather than by a closed connection.
        tracing::warn!(
            in_flight = cut,
            "drain timeout; ending the requests still in flight"
        );
        engine.abort_all(&format!(
            "the worker is shutting down: the drain timeout ({} s) passed before this request finished; retry it",
            cli.drain_timeout_seconds
        ));
        let settle = Instant::now() + Duration::from_secs(1);
        while engine.in_flight() > 0 && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = shutdown_tx.send(());
    // Open responses (streams that just got their last event) finish before serve
    // returns; within a second, so the whole stop stays within the timeout plus that.
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    engine.shutdown();
    if cut > 0 {
        anyhow::bail!("drain timed out: {cut} request(s) ended with an error");
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections finish.
/// A client gets `header_timeout` to send a request's headers: a half-sent request
/// does not hold its connection (and a task) open for ever. (axum::serve has no such
/// setting; this is its loop with hyper's HTTP/1 header read timeout.)
async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(inference_worker::http::MAX_HEADER_BUF)
        .max_headers(inference_worker::http::MAX_HEADER_FIELDS);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// One `--memory-budget` for every device, or one per device.
fn budgets(given: &[u64], devices: usize) -> Result<Vec<u64>, String> {
    match given.len() {
        1 => Ok(vec![given[0]; devices]),
        n if n == devices => Ok(given.to_vec()),
        n => Err(format!(
            "--memory-budget: {n} sizes for {devices} device(s) in --device; give one size for every device or one per device"
        )),
    }
}

/// The backend on `devices`: the whole model on one, or a layer split over several,
/// each part within its device's budget and all with the KV blocks the tightest affords.
fn backend(
    cli: &Cli,
    file: &Arc<gguf::GgufFile>,
    config: &ModelConfig,
    devices: &[(Device, u64)],
    max_seq_len: usize,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Box<dyn Backend>> {
    let n = config.n_layers;
    let shares: Vec<f64> = devices.iter().map(|d| d.1 as f64).collect();
    let ranges = gguf::split::layer_ranges(n, &shares);
    if let Some(at) = ranges.iter().position(|r| r.is_empty()) {
        anyhow::bail!(
            "--device: {} gets no layer of the model's {n} ({} devices; layers go in proportion to --memory-budget); list fewer devices or give it a larger budget",
            devices[at].0,
            devices.len()
        );
    }
    let whole = devices.len() == 1;
    let header = file.header();
    // What each device is, holds, may use and has free.
    let mut names = Vec::new();
    let mut needs = Vec::new();
    for ((device, budget), range) in devices.iter().zip(&ranges) {
        let (name, overhead, free) = match *device {
            Device::Cpu => (format!("{device}"), 0, None),
            Device::Cuda(ordinal) => {
                let info = cuda::device_info(ordinal)?;
                let scratch =
                    cuda::scratch_bytes(config, cli.max_batch_tokens, max_seq_len, cli.block_size);
                (
                    format!("cuda:{ordinal} ({})", info.name),
                    scratch,
                    Some(info.free),
                )
            }
        };
        let weights = match (device, whole) {
            // One map: a tied head reads the embedding's pages.
            (Device::Cpu, true) => header.weight_bytes(),
            _ => gguf::split::part_weight_bytes(header, range.clone(), n),
        };
        names.push(name);
        needs.push((range.len(), weights, overhead, *budget, free));
    }
    let parts: Vec<budget::Part<'_>> = names
        .iter()
        .zip(&needs)
        .map(
            |(name, &(layers, weights, overhead, budget, free))| budget::Part {
                device: name,
                layers,
                weights,
                overhead,
                budget,
                free,
            },
        )
        .collect();
    // A GPU's KV pool must hold at least one whole sequence; the CPU's a useful prefix.
    let any_gpu = devices.iter().any(|d| matches!(d.0, Device::Cuda(_)));
    let min_tokens = if any_gpu {
        max_seq_len
    } else {
        max_seq_len.min(256)
    };
    let plans = budget::plan_parts(config, &parts, cli.block_size, min_tokens)?;
    let layout = plans[0].layout;
    let mut loaded: Vec<Box<dyn Part>> = Vec::new();
    let mut sampled = std::collections::HashSet::new();
    for (((device, _), range), plan) in devices.iter().zip(&ranges).zip(&plans) {
        let part: Box<dyn Part> = match *device {
            Device::Cpu => Box::new(CpuBackend::load_part(
                Arc::clone(file),
                layout,
                range.clone(),
            )?),
            Device::Cuda(ordinal) => {
                let cache = cli.kernel_cache.clone().or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".cache/gpuscale/kernels"))
                });
                let opts = CudaOptions {
                    ordinal,
                    max_tokens: cli.max_batch_tokens,
                    max_seq_len,
                    kernel_cache: cache,
                    graphs: cli.cuda_graphs,
                    layers: Some(range.clone()),
                };
                let b = CudaBackend::load(Arc::clone(file), layout, opts)?;
                tracing::info!(
                    device = %Part::device(&b),
                    planned_bytes = plan.total(),
                    reserved_bytes = b.reserved_bytes(),
                    "VRAM reserved"
                );
                // One sampler per GPU, however many parts it holds.
                if sampled.insert(ordinal)
                    && !inference_worker::telemetry::spawn(
                        Arc::clone(metrics),
                        ordinal as u32,
                        Duration::from_secs(5),
                    )
                {
                    tracing::info!("no NVML: GPU metrics are not exported");
                }
                Box::new(b)
            }
        };
        tracing::info!(
            device = %part.device(),
            layers = ?range,
            planned_bytes = plan.total(),
            "model part loaded"
        );
        loaded.push(part);
    }
    // One part is the whole model; the split then hands nothing on.
    Ok(Box::new(Split::new(loaded)?))
}

/// Opens the file, builds tokenizer and backend within the budget, runs a warm-up pass
/// and starts the engine.
fn load(cli: &Cli, devices: &[(Device, u64)], metrics: Arc<Metrics>) -> anyhow::Result<Loaded> {
    let (path, block_size) = (cli.model.as_path(), cli.block_size);
    let file = Arc::new(
        gguf::GgufFile::open(path).with_context(|| format!("loading {}", path.display()))?,
    );
    let header = file.header();
    let config =
        ModelConfig::from_gguf(header).with_context(|| format!("model in {}", path.display()))?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(header).context("tokenizer")?);
    let tok_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_text(i))
            .unwrap_or("")
            .to_string()
    };
    let template = header
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str());
    let chat = ChatTemplate::new(
        template,
        &tok_text(tokenizer.bos),
        &tok_text(tokenizer.eos.first().copied()),
    )?;
    let max_seq_len = cli.max_seq_len.unwrap_or(config.context_length.min(4096));
    let mut backend = backend(cli, &file, &config, devices, max_seq_len, &metrics)?;
    let layout = backend.kv_layout();
    // Warm-up: one real pass touches every weight page and primes the thread pool. It
    // fits in the first KV block, whatever the block size.
    let warm_len = 8.min(config.vocab).min(block_size) as u32;
    let warm: Vec<u32> = (0..warm_len).collect();
    let warming = Instant::now();
    backend.forward(&[SeqChunk {
        tokens: &warm,
        start: 0,
        blocks: &[0],
        logits: Logits::Last,
    }])?;
    metrics.warmup_seconds.set(warming.elapsed().as_secs_f64());
    tracing::info!(
        model = %config.name,
        layers = config.n_layers,
        kv_blocks = layout.n_blocks,
        kv_tokens = layout.n_blocks * block_size,
        memory_bytes = backend.memory_bytes(),
        "backend {} ready", backend.name()
    );
    metrics
        .memory_reserved_bytes
        .set(backend.memory_bytes() as i64);
    let engine_config = EngineConfig {
        max_batch: cli.max_batch,
        max_batch_tokens: cli.max_batch_tokens,
        max_seq_len,
        queue_capacity: cli.queue_size,
        prefix_caching: cli.prefix_caching,
    };
    let (engine, _thread) =
        scheduler::start(backend, Arc::clone(&tokenizer), engine_config, metrics);
    Ok(Loaded {
        engine,
        tokenizer,
        chat,
        max_seq_len,
    })
}
