//! The simulated cluster: an API server, GPU nodes and a kubelet that runs the real
//! `inference-worker`, so that the operator and kubectl run end to end on a machine with
//! no Kubernetes. It is a simulator, not a Kubernetes: it serves the subset of the API
//! gpuscale and kubectl use, and the production path never depends on it.

pub mod api;
pub mod cluster;
pub mod demo;
pub mod kubelet;
pub mod nodes;

use std::path::PathBuf;

/// Now, to the second, as Kubernetes writes timestamps (`2026-01-01T12:00:00Z`).
pub(crate) fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    now.round(jiff::Unit::Second).unwrap_or(now).to_string()
}

/// The `inference-worker` binary built beside the running one (`target/<profile>/`),
/// or where `GPUSCALE_WORKER_BIN` points.
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("GPUSCALE_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // Test binaries live one level down, in target/<profile>/deps.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("inference-worker");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "no inference-worker binary beside {} (build it: cargo build -p gpuscale-inference-worker, \
         with --release for the demo), and GPUSCALE_WORKER_BIN is not set",
        exe.display()
    )
}
pub mod traffic;
