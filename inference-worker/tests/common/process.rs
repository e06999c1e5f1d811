//! The real worker binary as a child process, serving SmolLM2 on loopback.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Worker {
    child: Child,
    pub url: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn start(model: &std::path::Path) -> Worker {
    start_with(model, &[]).await
}

pub async fn start_with(model: &std::path::Path, extra: &[&str]) -> Worker {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .args(["--model", model.to_str().unwrap(), "--host", "127.0.0.1"])
        .args([
            "--port",
            &port.to_string(),
            "--threads",
            "2",
            "--max-seq-len",
            "2048",
        ])
        .args(["--memory-budget", "400MiB"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let w = Worker {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{}/readyz", w.url))
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "the worker never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w
}
