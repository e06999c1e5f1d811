//! `gpuscale-operator`: the operator, the node agent and capacity planning, one binary.
//! The simulated cluster and the demo are `gpuscale-sim` (sim/), never linked in here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpuscale_operator::health;
use gpuscale_operator::leader::{Elector, LeaseConfig};
use gpuscale_operator::metrics::Metrics;
use gpuscale_operator::node_agent;
use gpuscale_operator::reconcile::{
    self, BindingConfig, CacheVolume, Config, DraConfig, ModelCache, Scheduling,
};
use gpuscale_operator::replay;
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

// Parsed once at start and matched at once: the size of the `Run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the InferenceDeployment controller against the cluster in the kubeconfig.
    Run {
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:9090")]
        metrics_addr: SocketAddr,
        /// Worker image of deployments that name none (the chart sets its own version).
        #[arg(long, default_value = gpuscale_operator::reconcile::pods::DEFAULT_WORKER_IMAGE,
              value_parser = non_empty)]
        worker_image: String,
        /// A Secret (in each deployment's namespace) for pulling worker images; repeat
        /// for several.
        #[arg(long = "image-pull-secret", value_parser = non_empty)]
        image_pull_secrets: Vec<String>,
        /// Watch only this namespace; repeat for several (default: all).
        #[arg(long)]
        namespace: Vec<String>,
        /// Elect a leader on a Lease so that several operator replicas are safe.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// Namespace of the leader Lease (the operator's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the leader Lease: one per installation, so that two releases in one
        /// namespace do not elect one leader between them (the chart sets its own).
        #[arg(long, default_value = "gpuscale-operator", value_parser = non_empty)]
        lease_name: String,
        /// This replica's identity in the Lease (default: POD_NAME, else host and pid).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a leader's Lease lasts unrenewed: how long a failover can take. The
        /// renew deadline and retry period follow at client-go's proportions.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
        lease_duration_seconds: u64,
        /// Seconds between passes over each deployment (and worker scrapes).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=300))]
        scrape_interval_seconds: u64,
        /// Passes that run at once, over all deployments (a deployment never has two).
        /// Passes beyond it wait their turn in the controller's queue, which costs an
        /// entry, not a pass's memory and its queued scrapes.
        #[arg(long, default_value_t = gpuscale_operator::reconcile::DEFAULT_CONCURRENT_PASSES,
              value_parser = clap::value_parser!(u16).range(1..=4096))]
        concurrent_passes: u16,
        /// Seconds a draining replica may take before it is deleted anyway.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
        drain_timeout_seconds: u64,
        /// A toleration of every replica pod, `KEY[=VALUE][:EFFECT]` (no value: any;
        /// no effect: all); repeat for several. Nodes with a NoSchedule or NoExecute
        /// taint these do not tolerate get no replicas.
        #[arg(long = "toleration", default_value = "nvidia.com/gpu:NoSchedule",
              value_parser = Scheduling::parse_toleration)]
        tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
        /// `runtimeClassName` of replica pods (e.g. `nvidia`).
        #[arg(long)]
        runtime_class_name: Option<String>,
        /// `schedulerName` of replica pods (default: the cluster's default scheduler).
        #[arg(long)]
        scheduler_name: Option<String>,
        /// The DRA driver whose ResourceSlices describe GPUs; nodes it publishes get
        /// their GPUs through ResourceClaims naming the chosen devices. Empty: never use
        /// DRA (it is also off where the cluster does not serve resource.k8s.io/v1).
        #[arg(long, default_value = gpuscale_operator::inventory::NVIDIA_DRA_DRIVER)]
        dra_driver: String,
        /// The DeviceClass the replicas' ResourceClaims request.
        #[arg(long, default_value = gpuscale_operator::inventory::NVIDIA_DRA_DRIVER)]
        dra_device_class: String,
        /// The extended resource of GPU shares on device-plugin nodes (time-slicing or
        /// MPS with renameByDefault). Empty: shared replicas go only to DRA nodes.
        #[arg(long, default_value = "nvidia.com/gpu.shared")]
        gpu_sharing_resource: String,
        /// Cache http(s) models in this node directory (a hostPath volume, created if
        /// missing): one download per node, shared by its replicas. Unset (and no
        /// claim): each replica downloads into its own emptyDir, which namespaces that
        /// enforce the restricted Pod Security level admit.
        #[arg(long, conflicts_with = "model_cache_claim", value_parser = non_empty)]
        model_cache_host_path: Option<String>,
        /// Cache http(s) models on this PersistentVolumeClaim (in each deployment's
        /// namespace) instead of a node directory.
        #[arg(long, value_parser = non_empty)]
        model_cache_claim: Option<String>,
        /// Allow `file://` model sources: directories of the node, mounted as hostPath
        /// volumes. Anyone who may create an InferenceDeployment could then read any
        /// directory of any node; off, such deployments are refused with a message.
        #[arg(long)]
        allow_host_path_models: bool,
        /// Evict the least recently used cached models beyond this many GiB.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        model_cache_max_gib: Option<u64>,
        /// A request router's base URL (`http://host:port`), whose held requests count
        /// as demand; repeat for several. With a router, `minReplicas: 0` scales to zero.
        #[arg(long = "router-url")]
        router_urls: Vec<String>,
        /// Label selector of the router pods (in --router-namespace), scraped at their
        /// pod IP and --router-port; the chart sets it.
        #[arg(long)]
        router_selector: Option<String>,
        /// Namespace of the router pods (default: the operator's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        router_namespace: String,
        /// Port of the router pods' API and /metrics.
        #[arg(long, default_value_t = 8080)]
        router_port: u16,
        /// The hourly price of one GPU, `PRODUCT=USD` (`H100=2.49`), the product matched
        /// as a case-insensitive substring of the GPU's product name, the longest first;
        /// repeat for several. With any, status and metrics carry each deployment's
        /// $/hour and $/1M tokens.
        #[arg(long = "gpu-price")]
        gpu_prices: Vec<String>,
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
        /// The kubelet's PodResources socket, for which GPUs each pod was assigned.
        /// Empty: do not report assignments (the operator then learns them from the
        /// workers).
        #[arg(long, default_value = gpuscale_operator::pod_resources::DEFAULT_SOCKET)]
        pod_resources_socket: PathBuf,
        /// The GPU extended resources whose assignments are reported; repeat for
        /// several.
        #[arg(long = "gpu-resource", default_values = ["nvidia.com/gpu", "nvidia.com/gpu.shared"])]
        gpu_resources: Vec<String>,
    },
    /// Capacity planning: replay a request trace through a deployment's scaling policy
    /// and, on the same replicas, HPA- and KEDA-style rules; print SLO misses,
    /// GPU-seconds and cold starts (trace format: operator/src/replay/trace.rs).
    Plan {
        /// The request trace (CSV).
        #[arg(long)]
        trace: std::path::PathBuf,
        /// The InferenceDeployment whose spec.scaling and batch size are replayed.
        #[arg(long, default_value = "examples/smollm.yaml")]
        deployment: std::path::PathBuf,
        /// Prompt tokens one replica processes per second.
        #[arg(long, default_value_t = 8000.0, value_parser = positive)]
        prefill_tokens_per_second: f64,
        /// Tokens one sequence generates per second.
        #[arg(long, default_value_t = 40.0, value_parser = positive)]
        decode_tokens_per_second: f64,
        /// Seconds from pod creation to ready.
        #[arg(long, default_value_t = 45.0, value_parser = non_negative)]
        load_seconds: f64,
        /// Time-to-first-token objective in seconds.
        #[arg(long, default_value_t = 2.0, value_parser = positive)]
        ttft_slo_seconds: f64,
        /// Share of requests, in percent, that must get their first token within the
        /// objective: the planner reports the fewest maxReplicas that achieve it.
        #[arg(long, default_value_t = 99.0, value_parser = percent)]
        slo_attainment_percent: f64,
        /// Skip the sweep: by default the planner also replays each rule over a grid of
        /// its settings (gpuscale's target queue depth, warm replicas and windows; the
        /// peers' targets and windows) at five sync phases, and prints each rule's
        /// frontier of SLO misses against GPU-seconds and a setting that beats the
        /// spec's, if one does.
        #[arg(long)]
        no_frontier: bool,
    },
}

/// A finite number above 0 (a rate or a time the replay divides by or waits for).
fn positive(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a number above 0")),
    }
}

/// A finite number of seconds, 0 or more.
fn non_negative(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds, 0 or more")),
    }
}

/// A share in percent, above 0 and at most 100.
fn percent(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!("{s:?} is not a percentage above 0 and at most 100")),
    }
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
    assignments: Option<node_agent::Assignments>,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    let listener = tokio::net::TcpListener::bind(health)
        .await
        .with_context(|| format!("binding the health endpoint on {health}"))?;
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    node_agent::run(client, node, interval, assignments).await;
    Ok(())
}

/// How `run` elects its leader; `None` runs unelected (a single replica).
struct Election {
    namespace: String,
    name: String,
    identity: String,
    lease_duration: Duration,
}

async fn operator_main(
    addr: SocketAddr,
    config: Config,
    namespaces: Vec<String>,
    election: Option<Election>,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let (m, h, r) = (metrics.clone(), metrics.clone(), metrics.clone());
    let app = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(move || async move { live(&h) }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || async move { ready(&r) }),
        )
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
    let ctx = reconcile::Context::new(client.clone(), config, scraper, metrics.clone());
    let watched = if namespaces.is_empty() {
        "(all)".to_string()
    } else {
        namespaces.join(",")
    };
    tracing::info!(%addr, namespaces = %watched, "operator started");
    let work = async {
        match election {
            None => {
                metrics.set_leader(true);
                reconcile::run(ctx, namespaces).await;
                Ok(())
            }
            Some(e) => {
                let config = LeaseConfig::with_duration(
                    &e.namespace,
                    &e.name,
                    &e.identity,
                    e.lease_duration,
                );
                Elector::new(client, config)
                    .lead(&metrics, reconcile::run(ctx, namespaces))
                    .await
                    .context("leadership ended; stopping so that only one leader acts")
            }
        }
    };
    tokio::pin!(work);
    // The controller stops on SIGTERM by itself once its passes end; but a pass, a lease
    // renewal or the first list can wait on an API server that is gone. The pod must
    // stop within its grace period whatever the API does.
    tokio::select! {
        r = &mut work => r,
        () = terminated() => {
            tracing::info!("SIGTERM: stopping; passes in flight get {} s", STOP_GRACE.as_secs());
            match tokio::time::timeout(STOP_GRACE, &mut work).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("still busy (the API server may be unreachable); exiting");
                    Ok(())
                }
            }
        }
    }
}

/// `/healthz`: 503 with the reason while a watch has failed for minutes.
fn live(m: &Metrics) -> (axum::http::StatusCode, String) {
    match m
        .health()
        .live(std::time::Instant::now(), health::WATCH_FAILING_LIMIT)
    {
        Ok(()) => (axum::http::StatusCode::OK, "ok".into()),
        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// `/readyz`: 503 while this replica leads with caches that have not listed yet.
fn ready(m: &Metrics) -> (axum::http::StatusCode, String) {
    match m.health().ready() {
        Ok(what) => (axum::http::StatusCode::OK, what.into()),
        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// How long in-flight passes get after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM or Ctrl-C.
async fn terminated() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A flag value that must not be empty.
fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

/// Host name and pid: unique among replicas that share neither.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gpuscale-operator".into());
    format!("{host}-{}", std::process::id())
}

/// The operator's allocator: jemalloc, with one arena, a background thread that gives
/// freed pages back to the kernel within about a second (`dirty_decay_ms:1000`), and
/// no lazily reclaimed second stage (`muzzy_decay_ms:0`: `MADV_FREE`d pages count in
/// RSS until the kernel is short of memory). The operator's RSS follows the highest
/// its heap reaches (a placing pass's transients, a relist), so what matters is how
/// soon and how completely freed memory goes back. Measured with `gpuscale-sim fleet`
/// (10,000 pods; README, fleet scale), every build with the release profile's LTO:
/// glibc with two arenas 86.9 and 91.8 MiB in steady state (0.85 and 1.04 ms of CPU a
/// pass); jemalloc with its defaults 86.2 MiB; with these options 80.6, 81.8, 81.0 and
/// 81.5 MiB (0.64–0.71 ms a pass). Before LTO, `malloc_trim(0)` every 2 s did not lower
/// glibc's (94.8 against 95.6 MiB). This replaces glibc's two-arena cap, and with it
/// what `MALLOC_ARENA_MAX` did; a user's `_RJEM_MALLOC_CONF` is read after this string,
/// so its options win (jemalloc's options: <https://jemalloc.net/jemalloc.3.html>).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc before its first allocation (the crate builds it with the `_rjem_`
/// prefix, hence the name).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 70] =
    b"narenas:1,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            metrics_addr,
            worker_image,
            image_pull_secrets,
            namespace,
            leader_election,
            lease_namespace,
            lease_name,
            identity,
            lease_duration_seconds,
            scrape_interval_seconds,
            concurrent_passes,
            drain_timeout_seconds,
            tolerations,
            runtime_class_name,
            scheduler_name,
            dra_driver,
            dra_device_class,
            gpu_sharing_resource,
            model_cache_host_path,
            model_cache_claim,
            allow_host_path_models,
            model_cache_max_gib,
            router_urls,
            router_selector,
            router_namespace,
            router_port,
            gpu_prices,
        } => {
            let prices = gpuscale_operator::cost::PriceTable::parse(&gpu_prices)
                .map_err(anyhow::Error::msg)?;
            init_tracing();
            let election = leader_election.then(|| Election {
                namespace: lease_namespace,
                name: lease_name,
                identity: identity.unwrap_or_else(default_identity),
                lease_duration: Duration::from_secs(lease_duration_seconds),
            });
            let config = Config {
                worker_image,
                image_pull_secrets,
                scrape_interval: Duration::from_secs(scrape_interval_seconds),
                concurrent_passes,
                drain_timeout: Duration::from_secs(drain_timeout_seconds),
                scheduling: Scheduling {
                    tolerations,
                    runtime_class: runtime_class_name.filter(|s| !s.is_empty()),
                    scheduler_name: scheduler_name.filter(|s| !s.is_empty()),
                },
                binding: BindingConfig {
                    dra: (!dra_driver.is_empty()).then_some(DraConfig {
                        driver: dra_driver,
                        device_class: dra_device_class,
                    }),
                    sharing_resource: Some(gpu_sharing_resource).filter(|s| !s.is_empty()),
                },
                model_cache: ModelCache {
                    volume: match (model_cache_claim, model_cache_host_path) {
                        (Some(claim), _) => CacheVolume::Claim(claim),
                        (None, Some(dir)) => CacheVolume::HostPath(dir),
                        (None, None) => CacheVolume::EmptyDir,
                    },
                    max_bytes: model_cache_max_gib.map(|g| g << 30),
                    host_path_models: allow_host_path_models,
                },
                routers: gpuscale_operator::routers::Sources {
                    urls: router_urls,
                    pods: router_selector
                        .filter(|s| !s.is_empty())
                        .map(|s| (router_namespace, s, router_port)),
                },
                prices,
            };
            tokio::runtime::Runtime::new()?.block_on(operator_main(
                metrics_addr,
                config,
                namespace,
                election,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            trace,
            deployment,
            prefill_tokens_per_second,
            decode_tokens_per_second,
            load_seconds,
            ttft_slo_seconds,
            slo_attainment_percent,
            no_frontier,
        } => {
            let d: gpuscale_crds::InferenceDeployment = serde_yaml::from_str(
                &std::fs::read_to_string(&deployment)
                    .with_context(|| format!("reading {}", deployment.display()))?,
            )
            .with_context(|| format!("{} is not an InferenceDeployment", deployment.display()))?;
            let text = std::fs::read_to_string(&trace)
                .with_context(|| format!("reading {}", trace.display()))?;
            let trace = replay::Trace::parse_csv(&text)?;
            let params = gpuscale_operator::autoscale::Params::from_spec(&d.spec.scaling);
            let setup = replay::Setup {
                model: replay::ReplicaModel {
                    max_batch: d.spec.resources.max_batch_size,
                    queue_capacity: 64,
                    prefill_tokens_per_second,
                    decode_tokens_per_second,
                    load_seconds,
                    gpus: d.spec.resources.gpus_per_replica.max(1),
                },
                slo: replay::Slo {
                    ttft_seconds: ttft_slo_seconds,
                },
                initial_replicas: params.min.max(1),
                sample_every: 5.0,
                tick_phase: 0.0,
            };
            println!(
                "{} requests over {:.0} s; policy of {}: {}..{} replicas, {} warm, target queue depth {}",
                trace.requests.len(),
                trace.duration(),
                deployment.display(),
                params.min,
                params.max,
                params.warm,
                params.target
            );
            let (min, max, target) = (params.min.max(1), params.max, params.target);
            let attainment = slo_attainment_percent / 100.0;
            let found = replay::capacity(&trace, &setup, &params, 2.0, attainment, 1024);
            let mut rules: Vec<Box<dyn replay::ScalingRule>> = vec![
                Box::new(replay::GpuscaleRule::new(params.clone(), 2.0)),
                Box::new(replay::HpaRule::new(min, max, 0.7)),
                Box::new(replay::KedaRule::new(min, max, target)),
            ];
            let outcomes: Vec<replay::Outcome> = rules
                .iter_mut()
                .map(|r| replay::replay(&trace, &setup, r.as_mut()))
                .collect();
            println!("\n{}", replay::report::table(&outcomes));
            println!(
                "{}",
                replay::report::capacity_summary(max, &outcomes[0], &found, attainment)
            );
            if !no_frontier {
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let started = std::time::Instant::now();
                let sweep = replay::frontier::sweep(&trace, &setup, &params, threads);
                println!(
                    "\nSwept {} settings in {:.1} s (--no-frontier skips this), within the spec's bounds {}..{} replicas, gpuscale with the spec's panic window{}:\n{}",
                    sweep.gpuscale.len() + sweep.hpa.len() + sweep.keda.len(),
                    started.elapsed().as_secs_f64(),
                    min,
                    max,
                    if params.predictive { " and predictive on" } else { " and predictive off" },
                    sweep.report(replay::allowed_misses(trace.requests.len(), attainment))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::NodeAgent {
            node_name,
            once: true,
            ..
        } => {
            let spec = node_agent::Probe::new().collect(&node_name, None);
            println!(
                "{}",
                serde_json::to_string_pretty(&node_agent::inventory_object(spec, None))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::NodeAgent {
            node_name,
            interval_seconds,
            health_addr,
            once: false,
            pod_resources_socket,
            gpu_resources,
        } => {
            init_tracing();
            let assignments =
                (!pod_resources_socket.as_os_str().is_empty()).then_some(node_agent::Assignments {
                    socket: pod_resources_socket,
                    resources: gpu_resources,
                });
            tokio::runtime::Runtime::new()?.block_on(node_agent_main(
                node_name,
                Duration::from_secs(interval_seconds),
                health_addr,
                assignments,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(all(test, feature = "jemalloc", not(target_env = "msvc")))]
mod tests {
    /// One of jemalloc's `opt.*` values, read back through `mallctl`.
    fn option<T: Default>(name: &std::ffi::CStr) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: `value` is a `T` of `len` bytes, the type jemalloc's manual gives for
        // each option read below; nothing is written (null new value).
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut value as *mut T).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl({name:?}) failed");
        value
    }

    #[test]
    fn the_allocator_runs_with_the_options_main_gives_it() {
        // Options are read at jemalloc's first allocation, long past by now.
        assert_eq!(option::<u32>(c"opt.narenas"), 1);
        assert!(option::<bool>(c"opt.background_thread"));
        assert_eq!(option::<isize>(c"opt.dirty_decay_ms"), 1000);
        assert_eq!(option::<isize>(c"opt.muzzy_decay_ms"), 0);
    }
}
