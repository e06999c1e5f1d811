//! `gpuscale-sim`: the simulated cluster as a command. `demo` runs the operator and real
//! workers on it under a traffic burst; `serve` runs only the cluster, for kubectl and an
//! operator started by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use gpuscale_sim::cluster::{ClusterConfig, SimCluster};
use gpuscale_sim::kubelet::KubeletConfig;
use gpuscale_sim::nodes::{default_fleet, parse_fleet};

#[derive(Parser)]
#[command(
    name = "gpuscale-sim",
    version,
    about = "A simulated Kubernetes cluster with GPU nodes, for gpuscale's demo and tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The demo: a simulated cluster, the operator, SmolLM2 workers and a burst of load.
    Demo {
        /// Requests per second of the burst (24: past what two SmolLM2 workers on one
        /// core each serve at the example's target queue depth, so replicas are added).
        #[arg(long, default_value_t = 24.0)]
        burst_rps: f64,
    },
    /// Run only the simulated cluster (API server and simulated nodes) until Ctrl-C.
    Serve {
        /// Address of the simulated API server.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Where to write the kubeconfig.
        #[arg(long, default_value = "target/gpuscale-sim/kubeconfig")]
        kubeconfig: PathBuf,
        /// Simulated nodes, as `name=COUNTxPRODUCT:GIB[:nvlink]`, comma separated
        /// (default: two 2×L4 nodes and one 4×A100 NVLink node).
        #[arg(long)]
        nodes: Option<String>,
        /// Local directory that stands for the nodes' /models.
        #[arg(long, env = "GPUSCALE_MODEL_DIR", default_value = "models")]
        models: PathBuf,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Demo { burst_rps } => {
            if !(burst_rps.is_finite() && burst_rps > 0.0) {
                anyhow::bail!("--burst-rps must be a positive number of requests per second");
            }
            init_tracing("warn");
            rt.block_on(gpuscale_sim::demo::run(burst_rps))
        }
        Command::Serve {
            addr,
            kubeconfig,
            nodes,
            models,
        } => {
            init_tracing("info");
            rt.block_on(async move {
                let cluster = SimCluster::start(ClusterConfig {
                    addr,
                    kubeconfig,
                    nodes: match nodes {
                        Some(f) => parse_fleet(&f)?,
                        None => default_fleet(),
                    },
                    kubelet: KubeletConfig::new(
                        gpuscale_sim::worker_binary()?,
                        models,
                        "target/gpuscale-sim/logs".into(),
                    ),
                })
                .await?;
                println!(
                    "simulated cluster at {}; kubeconfig {}; the nodes' /models over HTTP at {}",
                    cluster.url(),
                    cluster.kubeconfig().display(),
                    cluster.model_server().url()
                );
                tokio::signal::ctrl_c().await?;
                anyhow::Ok(())
            })
        }
    }
}
