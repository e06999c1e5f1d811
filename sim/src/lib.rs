//! The simulated cluster: an API server, GPU nodes and a kubelet that runs the real
//! `inference-worker`, so that the operator and kubectl run end to end on a machine with
//! no Kubernetes. It is a simulator, not a Kubernetes: it serves the subset of the API
//! gpuscale and kubectl use, and the production path never depends on it (this crate
//! depends on the operator, never the other way round, so the compiler enforces that).

pub mod api;
pub mod cluster;
pub mod demo;
pub mod dra;
pub mod fleet;
pub mod kubelet;
pub mod lifecycle;
pub mod models;
pub mod nodes;
pub mod plot;
pub mod process;
pub mod scheduler;
pub mod soak;
pub mod volumes;

use std::path::PathBuf;

/// Whom the operator's requests come from, where the simulator's request log must
/// tell them apart (the chart's service account for a release `gpuscale` in namespace
/// `gpuscale`).
pub const OPERATOR_USER: &str = "system:serviceaccount:gpuscale:gpuscale";

/// Now, to the second, as Kubernetes writes timestamps (`2026-01-01T12:00:00Z`).
pub(crate) fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    now.round(jiff::Unit::Second).unwrap_or(now).to_string()
}

/// The `inference-worker` binary built beside the running one (`target/<profile>/`),
/// or where `GPUSCALE_WORKER_BIN` points.
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    sibling_binary(
        "inference-worker",
        "GPUSCALE_WORKER_BIN",
        "gpuscale-inference-worker",
    )
}

/// The `gpuscale-operator` binary built beside the running one, or where
/// `GPUSCALE_OPERATOR_BIN` points.
pub fn operator_binary() -> anyhow::Result<PathBuf> {
    sibling_binary(
        "gpuscale-operator",
        "GPUSCALE_OPERATOR_BIN",
        "gpuscale-operator",
    )
}

/// The `gpuscale-router` binary built beside the running one, or where
/// `GPUSCALE_ROUTER_BIN` points.
pub fn router_binary() -> anyhow::Result<PathBuf> {
    sibling_binary("gpuscale-router", "GPUSCALE_ROUTER_BIN", "gpuscale-router")
}

/// `gpuscale-router` against the cluster of `kubeconfig`, on a free loopback port
/// (it prints `listening on ADDR` first on its standard output), logging JSON to `log`.
/// Returns the process and its base URL.
pub async fn start_router(
    binary: &std::path::Path,
    kubeconfig: &std::path::Path,
    log: std::fs::File,
) -> anyhow::Result<(tokio::process::Child, String)> {
    use anyhow::Context as _;
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(binary)
        .args(["--listen", "127.0.0.1:0", "--scrape-interval-ms", "500"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("the router's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .context("the router did not say where it listens within 30 s")??
        .context("the router exited before listening")?;
    let addr = first
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line from the router: {first}"))?;
    // Its later lines (JSON logs go to stderr) are drained so it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, format!("http://{addr}")))
}

/// `gpuscale-operator run` (the binary at `binary`) against the cluster of
/// `kubeconfig`, with the settings every simulated run uses: metrics on any free port,
/// one pass a second, and the models of the simulated nodes' `/models` directory
/// allowed (`file://`, which an administrator enables; the examples use it) with a
/// model cache per node. The caller adds its own flags and environment.
pub fn operator_command(
    binary: &std::path::Path,
    kubeconfig: &std::path::Path,
) -> tokio::process::Command {
    operator_command_at(binary, kubeconfig, "127.0.0.1:0")
}

/// The GPU price table every simulated run gives its operator (`--gpu-price`), in US
/// dollars per GPU-hour: illustrative on-demand cloud prices, so status and metrics
/// carry a cost as they do on a cluster with the chart's `pricing.gpuHourlyUSD`.
pub const GPU_PRICES: &[&str] = &["L4=0.8", "A100=1.79", "H100=2.49", "V100=0.9"];

/// [`operator_command`] with its metrics served at `metrics_addr`.
pub fn operator_command_at(
    binary: &std::path::Path,
    kubeconfig: &std::path::Path,
    metrics_addr: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args([
        "run",
        "--metrics-addr",
        metrics_addr,
        "--scrape-interval-seconds",
        "1",
        "--allow-host-path-models",
        "--model-cache-host-path",
        "/var/cache/gpuscale/models",
    ])
    .args(GPU_PRICES.iter().map(|p| format!("--gpu-price={p}")))
    .env("KUBECONFIG", kubeconfig)
    .kill_on_drop(true);
    cmd
}

/// A binary of this workspace: `env` when set, else `name` beside the running one.
fn sibling_binary(name: &str, env: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // Test binaries live one level down, in target/<profile>/deps.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "no {name} binary beside {} (build it: cargo build -p {package}, with --release for \
         the demo), and {env} is not set",
        exe.display()
    )
}
pub mod traffic;
