//! `gpuscale-router`: the cluster's OpenAI endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gpuscale_router::{discovery, proxy, HoldConfig, Router};

#[derive(Parser, Debug)]
#[command(name = "gpuscale-router", version, about)]
struct Cli {
    /// Address of the OpenAI API (and `/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value = "0.0.0.0:8080", env = "GPUSCALE_ROUTER_LISTEN")]
    listen: SocketAddr,
    /// A namespace whose deployments the router serves; repeat for several. None: every
    /// namespace (the router then needs cluster-wide list/watch of pods).
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// How long a request may wait for a replica (none ready, all saturated) before it
    /// gets 503: long enough for a GPU replica's cold start.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=3600))]
    hold_timeout_seconds: u64,
    /// Requests held per deployment before more get 429.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_held: u64,
    /// How often each replica's queue depth is scraped (milliseconds).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    scrape_interval_ms: u64,
    /// Log format: `json` (one object per line, one line per request) or `text`.
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr: stdout carries only the `listening on ADDR` line that tells a
    // parent process (the demo, tests) where the router listens.
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in cluster, or KUBECONFIG)")?;
    let router = Router::new(HoldConfig {
        timeout: Duration::from_secs(cli.hold_timeout_seconds),
        max_held: cli.max_held as usize,
    });
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    // The bound address (a port of 0 picks one): the simulator reads it from here.
    println!("listening on {}", listener.local_addr()?);
    tracing::info!(addr = %listener.local_addr()?, namespaces = ?cli.namespaces, "router serving");

    let watch = tokio::spawn(discovery::watch(client, cli.namespaces, router.clone()));
    tokio::spawn(discovery::scrape_workers(
        router.clone(),
        http.clone(),
        Duration::from_millis(cli.scrape_interval_ms),
    ));
    let app = proxy::app(router, http);
    // On SIGTERM (a pod deleted) or SIGINT: stop accepting, let the requests in flight
    // and held finish (the chart's grace period covers the hold timeout).
    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: finishing the requests in flight");
    });
    tokio::select! {
        r = serve => r.context("serving")?,
        r = watch => r.context("watch task")??,
    }
    Ok(())
}
