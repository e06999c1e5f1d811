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
        /// Requests per second of the burst, each of 48 tokens (12: about 580 tokens/s,
        /// past what one SmolLM2 worker serves at the example's target queue depth on
        /// this 2-core machine, so replicas are added).
        #[arg(long, default_value_t = 12.0)]
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
    /// The soak: steady load with a burst every five minutes through the router for
    /// MINUTES; prints every process's memory, open files and tokio tasks at the start
    /// and the end, and fails if any request was not answered in full.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
    },
    /// Fleet scale: hollow GPU nodes and pods (no worker processes; metrics from a
    /// model of load) and the operator as its own process; prints its memory, CPU per
    /// pass, spec-change latency and API requests per minute.
    Fleet {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 16)]
        gpus_per_node: usize,
        #[arg(long, default_value_t = 1000)]
        deployments: usize,
        #[arg(long, default_value_t = 10)]
        replicas: u32,
        /// Spec changes whose latency is measured.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Seconds of steady state over which CPU and requests are counted.
        #[arg(long, default_value_t = 60)]
        window_seconds: u64,
        /// The operator's --scrape-interval-seconds (its default: 2).
        #[arg(long, default_value_t = 2)]
        scrape_interval_seconds: u64,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Where `fleet` writes its kubeconfigs and the operator's log.
const FLEET_DIR: &str = "target/gpuscale-sim/fleet";

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
        Command::Soak { minutes } => {
            anyhow::ensure!(
                minutes.is_finite() && minutes >= 1.0,
                "--minutes must be at least 1"
            );
            init_tracing("warn");
            let report = rt.block_on(gpuscale_sim::soak::run(minutes))?;
            print!("{report}");
            anyhow::ensure!(
                report.summary.errors == 0,
                "{} of {} requests were not answered in full",
                report.summary.errors,
                report.summary.requests
            );
            Ok(())
        }
        Command::Fleet {
            nodes,
            gpus_per_node,
            deployments,
            replicas,
            changes,
            window_seconds,
            scrape_interval_seconds,
        } => {
            anyhow::ensure!(
                nodes > 0 && gpus_per_node > 0 && deployments > 0 && replicas > 0,
                "--nodes, --gpus-per-node, --deployments and --replicas must be at least 1"
            );
            anyhow::ensure!(
                deployments * replicas as usize <= nodes * gpus_per_node,
                "{deployments} deployments of {replicas} replicas need more than the {} GPUs of \
                 {nodes} nodes of {gpus_per_node}",
                nodes * gpus_per_node
            );
            anyhow::ensure!(
                changes <= deployments,
                "--changes {changes} is more than the {deployments} deployments: each change \
                 adds a replica to a different deployment"
            );
            anyhow::ensure!(
                window_seconds > 0 && scrape_interval_seconds > 0,
                "--window-seconds and --scrape-interval-seconds must be at least 1"
            );
            init_tracing("warn");
            let report =
                rt.block_on(gpuscale_sim::fleet::run(gpuscale_sim::fleet::FleetConfig {
                    nodes,
                    gpus_per_node,
                    deployments,
                    replicas,
                    changes,
                    window: std::time::Duration::from_secs(window_seconds),
                    scrape_interval_seconds,
                    operator: gpuscale_sim::operator_binary()?,
                    dir: FLEET_DIR.into(),
                }))?;
            print!("{report}");
            let unsteady = report.unsteady();
            anyhow::ensure!(
                unsteady.is_empty(),
                "the operator made requests in steady state that a steady fleet has no \
                 reason for: {}; its log is {FLEET_DIR}/operator.log (run again with \
                 GPUSCALE_FLEET_OPERATOR_LOG=info for each write)",
                unsteady.join(", ")
            );
            Ok(())
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
