//! `gpuscale-operator`: the operator, the node agent and the demo, one binary.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpuscale_operator::node_agent;

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
    Run,
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

fn not_built(what: &str, issue: &str) -> ExitCode {
    eprintln!("gpuscale-operator: {what} is not built yet (tracked by the issue \"{issue}\"); nothing was started.");
    ExitCode::from(2)
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => Ok(not_built(
            "the reconcile loop and autoscaler",
            "Reconcile loop and queue-depth autoscaler",
        )),
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
