//! `gpuscale-operator`: the operator, the node agent and the demo, one binary.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpuscale_operator::metrics::Metrics;
use gpuscale_operator::node_agent;
use gpuscale_operator::reconcile::{self, Config};
use gpuscale_operator::scrape::HttpScraper;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "gpuscale-operator",
    version,
    about = "GPU-aware placement and queue-depth autoscaling for model inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the InferenceDeployment controller against the cluster in the kubeconfig.
    Run {
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:9090")]
        metrics_addr: SocketAddr,
        /// Worker image for deployments that keep the built-in default.
        #[arg(long)]
        worker_image: Option<String>,
        /// Watch only this namespace (default: all).
        #[arg(long)]
        namespace: Option<String>,
        /// Seconds between passes over each deployment (and worker scrapes).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=300))]
        scrape_interval_seconds: u64,
        /// Seconds a draining replica may take before it is deleted anyway.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
        drain_timeout_seconds: u64,
    },
    /// Publish this node's GPU inventory (NVML) as a GpuInventory object.
    NodeAgent {
        /// This node's name (the DaemonSet passes spec.nodeName).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval_seconds: u64,
        /// Address of the /healthz endpoint.
        #[arg(long, default_value = "0.0.0.0:9091")]
        health_addr: SocketAddr,
        /// Print the inventory as JSON once and exit, without contacting the API.
        #[arg(long)]
        once: bool,
    },
    /// Start the simulated cluster demo: placement and scaling of real workers under load.
    Demo,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("GPUSCALE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn node_agent_main(
    node: String,
    interval: Duration,
    health: SocketAddr,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    let listener = tokio::net::TcpListener::bind(health)
        .await
        .with_context(|| format!("binding the health endpoint on {health}"))?;
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    node_agent::run(client, node, interval).await;
    Ok(())
}

async fn operator_main(
    addr: SocketAddr,
    config: Config,
    namespace: Option<String>,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let m = metrics.clone();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let scraper = Arc::new(HttpScraper::new(Duration::from_secs(1)));
    let ctx = reconcile::Context::new(client, config, scraper, metrics);
    tracing::info!(%addr, namespace = namespace.as_deref().unwrap_or("(all)"), "operator started");
    reconcile::run(ctx, namespace).await;
    Ok(())
}

fn not_built(what: &str, issue: &str) -> ExitCode {
    eprintln!("gpuscale-operator: {what} is not built yet (tracked by the issue \"{issue}\"); nothing was started.");
    ExitCode::from(2)
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            metrics_addr,
            worker_image,
            namespace,
            scrape_interval_seconds,
            drain_timeout_seconds,
        } => {
            init_tracing();
            let config = Config {
                worker_image,
                scrape_interval: Duration::from_secs(scrape_interval_seconds),
                drain_timeout: Duration::from_secs(drain_timeout_seconds),
            };
            tokio::runtime::Runtime::new()?.block_on(operator_main(
                metrics_addr,
                config,
                namespace,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => Ok(not_built(
            "the demo (a simulated cluster with simulated GPU nodes, this operator, SmolLM2 \
             workers and a traffic burst, shown as a live `kubectl get infd -w` table)",
            "Simulated cluster: the embedded demo and the end-to-end suite",
        )),
        Command::NodeAgent {
            node_name,
            once: true,
            ..
        } => {
            let spec = node_agent::Probe::new().collect(&node_name, None);
            println!(
                "{}",
                serde_json::to_string_pretty(&node_agent::inventory_object(spec))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::NodeAgent {
            node_name,
            interval_seconds,
            health_addr,
            once: false,
        } => {
            init_tracing();
            tokio::runtime::Runtime::new()?.block_on(node_agent_main(
                node_name,
                Duration::from_secs(interval_seconds),
                health_addr,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
