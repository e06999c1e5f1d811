//! Fleet scale, as kubemark measures the control plane (<https://github.com/kubernetes/community/blob/master/contributors/devel/sig-scalability/kubemark-guide.md>):
//! hollow nodes and hollow pods. The nodes register and publish their GPU inventory
//! but run nothing; one hollow kubelet marks every pod bound to them Running and Ready
//! with an address of its own (`127.x.y.z`: all of 127/8 is loopback on Linux), and
//! one HTTP server answers every hollow pod's `/metrics` (which pod, from the `Host`
//! the scrape was sent to) from a model of load. The operator runs as its own process
//! (`gpuscale-operator run`, as deployed), so its memory and CPU are its own.
//!
//! What it prints: the operator's resident memory, CPU per reconcile pass, the latency
//! from a spec change to the new pod's creation (p50, p99), and the operator's API
//! requests per minute in steady state (where there must be no LIST).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::api::ApiServer;
use super::nodes::SimNode;
use super::OPERATOR_USER;

/// How big a fleet, and how long to measure.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub deployments: usize,
    pub replicas: u32,
    /// Spec changes whose latency is measured (one deployment each, one more
    /// replica).
    pub changes: usize,
    /// The steady-state window over which requests and CPU are counted.
    pub window: Duration,
    /// The operator's seconds between passes of each deployment.
    pub scrape_interval_seconds: u64,
    /// The `gpuscale-operator` binary.
    pub operator: PathBuf,
    /// Where the kubeconfigs and the operator's log go.
    pub dir: PathBuf,
}

/// What was measured.
#[derive(Clone, Debug)]
pub struct FleetReport {
    pub pods: usize,
    /// From the first apply to every pod Ready.
    pub setup: Duration,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// Operator CPU seconds per reconcile pass, in the steady window.
    pub cpu_per_pass: Duration,
    pub passes_per_second: f64,
    /// Operator CPU used over the window (1.0: one core).
    pub cores: f64,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
    pub latency_max: Duration,
    /// The operator's requests per minute in the window, by (verb, resource).
    pub per_minute: BTreeMap<(String, String), f64>,
}

impl FleetReport {
    /// LISTs per minute in steady state (the goal is none).
    pub fn lists(&self) -> f64 {
        self.per_minute
            .iter()
            .filter(|((v, _), _)| v == "list")
            .map(|(_, n)| n)
            .sum()
    }

    /// The requests of the steady window that a steady fleet gives the operator no
    /// reason to make: anything but renewing its Lease, patching deployment statuses
    /// and opening a watch again (a pod deleted or created with nothing changing is a
    /// fault, and its load makes the window's figures no measure of a steady
    /// operator). A watch is opened again each time the API server ends it:
    /// kube-runtime's watcher asks for 290 s (`watcher::Config::timeout`), so a slow
    /// run's window can hold one of each kind; a relist would be a `list`.
    pub fn unsteady(&self) -> Vec<String> {
        let steady = |verb: &str, what: &str| {
            matches!(
                (verb, what),
                ("get" | "update", "leases")
                    | ("patch", "inferencedeployments/status")
                    | ("watch", _)
            )
        };
        self.per_minute
            .iter()
            .filter(|((verb, what), _)| !steady(verb, what))
            .map(|((verb, what), n)| format!("{verb} {what} ({n:.1} a minute)"))
            .collect()
    }
}

impl std::fmt::Display for FleetReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "{} pods Ready {:.1} s after the first apply",
            self.pods,
            self.setup.as_secs_f64()
        )?;
        writeln!(
            f,
            "operator RSS {:.1} MiB (peak {:.1} MiB)",
            mib(self.rss_bytes),
            mib(self.peak_rss_bytes)
        )?;
        writeln!(
            f,
            "operator CPU {:.2} cores in steady state: {:.1} passes/s, {:.2} ms CPU per pass",
            self.cores,
            self.passes_per_second,
            self.cpu_per_pass.as_secs_f64() * 1e3
        )?;
        writeln!(
            f,
            "spec change to pod created: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.latency_p50.as_secs_f64() * 1e3,
            self.latency_p99.as_secs_f64() * 1e3,
            self.latency_max.as_secs_f64() * 1e3
        )?;
        writeln!(f, "operator API requests per minute in steady state:")?;
        for ((verb, what), n) in &self.per_minute {
            writeln!(f, "  {verb:>8} {what:<36} {n:>10.1}")?;
        }
        Ok(())
    }
}

/// The hollow pods' addresses, by pod (namespace/name), and back.
#[derive(Default)]
struct Addresses {
    next: u32,
    by_pod: HashMap<String, Ipv4Addr>,
    deployment_of: HashMap<Ipv4Addr, String>,
}

impl Addresses {
    fn assign(&mut self, pod: &str, deployment: &str) -> Ipv4Addr {
        if let Some(ip) = self.by_pod.get(pod) {
            return *ip;
        }
        // 127.1.0.0 upwards: clear of 127.0.0.1, where everything else listens.
        self.next += 1;
        let n = self.next;
        let ip = Ipv4Addr::new(127, 1 + (n >> 16) as u8, (n >> 8) as u8, n as u8);
        self.by_pod.insert(pod.to_string(), ip);
        self.deployment_of.insert(ip, deployment.to_string());
        ip
    }
}

/// A hollow worker's `/metrics`: the three series the operator reads, from a model
/// of load: each deployment's in-flight requests follow a slow sine of its own phase
/// (0 to 2 per replica, a minute's period), so the figures change between scrapes as
/// a live fleet's do.
fn hollow_metrics(deployment: &str, started: Instant) -> String {
    let phase = deployment.bytes().map(u64::from).sum::<u64>() as f64;
    let t = started.elapsed().as_secs_f64();
    let load = 1.0 + (t / 60.0 * std::f64::consts::TAU + phase).sin();
    let running = load.round();
    let requests = (t * load.max(0.1)) as u64;
    format!(
        "# TYPE gpuscale_worker_queue_depth gauge\ngpuscale_worker_queue_depth 0\n\
         # TYPE gpuscale_worker_running_sequences gauge\ngpuscale_worker_running_sequences {running}\n\
         # TYPE gpuscale_worker_requests_total counter\ngpuscale_worker_requests_total{{status=\"ok\"}} {requests}\n\
         # EOF\n"
    )
}

/// Serves every hollow pod's `/metrics` on `port` of every loopback address.
async fn serve_metrics(
    addresses: Arc<Mutex<Addresses>>,
) -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    use axum::extract::State;
    use axum::http::HeaderMap;
    // Every address: the pods' 127.x.y.z are loopback, and only a wildcard bind
    // accepts them all.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .context("binding the hollow pods' metrics server")?;
    let port = listener.local_addr()?.port();
    let started = Instant::now();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                move |State(a): State<Arc<Mutex<Addresses>>>, headers: HeaderMap| async move {
                    let host = headers
                        .get(axum::http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .and_then(|h| h.rsplit_once(':').map(|(ip, _)| ip.to_string()))
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
                    let dep = host.and_then(|ip| {
                        a.lock().expect("addresses").deployment_of.get(&ip).cloned()
                    });
                    match dep {
                        Some(d) => (axum::http::StatusCode::OK, hollow_metrics(&d, started)),
                        None => (axum::http::StatusCode::NOT_FOUND, "no such pod\n".into()),
                    }
                },
            ),
        )
        .with_state(addresses);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((port, task))
}

/// What `inference-worker inspect --json` prints for Llama-3-8B in Q4_0 (the hollow
/// model every fleet deployment serves), for the hollow model probes.
const LLAMA_8B_Q4_0: &str = r#"{"architecture":"llama","parameters":8030261248,"layers":32,"embedding":4096,"heads":32,"kvHeads":8,"headDim":128,"feedForward":14336,"contextLength":8192,"vocab":128256,"weightBytes":4661211136,"tensorBytes":{"F32":1068105728,"Q4_0":3593105408},"tokenizer":"gpt2","chatTemplate":true}"#;

/// The hollow kubelet of every hollow node: a pod bound to one is marked Running and
/// Ready at once with its own address (the container "starts" instantly); a deleted
/// one is finished (no process to stop).
async fn hollow_kubelet(client: Client, addresses: Arc<Mutex<Addresses>>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let marked: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = events.next().await {
        let pods = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
            Err(e) => {
                tracing::warn!(error = %e, "hollow kubelet: pod watch failed; watching again");
                continue;
            }
            _ => continue,
        };
        for pod in pods {
            let Some(_node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let uid = pod.uid().unwrap_or_default();
            let terminating = pod.metadata.deletion_timestamp.is_some();
            if !terminating && !marked.lock().expect("marked").insert(uid) {
                continue;
            }
            let ns = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let name = pod.name_any();
            let deployment = pod
                .labels()
                .get(gpuscale_operator::reconcile::LABEL_DEPLOYMENT)
                .cloned()
                .unwrap_or_default();
            let ip = addresses
                .lock()
                .expect("addresses")
                .assign(&format!("{ns}/{name}"), &deployment);
            let probe = pod
                .labels()
                .contains_key(gpuscale_operator::reconcile::LABEL_PROBE_OF);
            let permit = limit.clone().acquire_owned().await;
            tokio::spawn(async move {
                let _permit = permit;
                if terminating {
                    let _ = api.delete(&name, &crate::kubelet::stopped(&pod)).await;
                    return;
                }
                if probe {
                    // A model probe ends at once, as `inference-worker inspect` ends
                    // on a Llama-3-8B Q4_0 file.
                    // Each status patch names the pod's UID, as the kubelet's do (see
                    // `Store::update`): this event may be of a pod made again since.
                    let status = json!({"metadata": {"uid": pod.uid()}, "status": {"phase": "Succeeded", "containerStatuses": [{
                        "name": "inspect", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                        "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                            "message": LLAMA_8B_Q4_0}}}]}});
                    let _ = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await;
                    return;
                }
                let now = super::now_rfc3339();
                let container = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                let status = json!({"metadata": {"uid": pod.uid()}, "status": {
                    "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                    "hostIP": "127.0.0.1", "startTime": now,
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                        {"type": "Ready", "status": "True", "lastTransitionTime": now}],
                    "containerStatuses": [{"name": container, "ready": true, "started": true,
                        "restartCount": 0, "image": "gpuscale/inference-worker (hollow)", "imageID": "",
                        "state": {"running": {"startedAt": now}}}]}});
                // A kubelet retries its status update until it lands: a pod the patch
                // missed (the API server busy, a timeout) would stay Pending for good.
                for attempt in 1.. {
                    match api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                    {
                        Ok(_) => break,
                        // Gone, or another pod of its name now (409: the UID).
                        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => break,
                        Err(e) => {
                            tracing::warn!(pod = %name, attempt, error = %e, "hollow kubelet: status update failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200 * attempt.min(10))).await;
                        }
                    }
                }
            });
        }
    }
}

/// The deployment `name`: a Llama-8B-sized model (declared, so no probe runs) at
/// `replicas`, a fixed count, scraped at the hollow pods' port.
fn deployment(name: &str, replicas: u32, port: u16) -> serde_json::Value {
    json!({"apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"name": name, "source": "file:///models/llama-8b-q4_0.gguf", "parameters": 8_000_000_000u64,
                      "dtype": "q4_0"},
            "replicas": replicas,
            "scaling": {"autoscale": false},
            "resources": {"allowCpu": false},
            "worker": {"port": port}}})
}

/// The sum of the operator's reconcile pass counter, from its metrics.
async fn passes(metrics: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("gpuscale_operator_reconciles_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// The deployments whose pods in the API are not `replicas` (at most 20), each with
/// the pods it has and its status's replica count and Available message: where the
/// operator's view and the cluster part, for the next person to look.
async fn short_of(
    deployments: &Api<gpuscale_crds::InferenceDeployment>,
    pods: &Api<Pod>,
    replicas: u32,
) -> anyhow::Result<Vec<String>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in pods.list(&Default::default()).await?.items {
        if let Some(d) = p
            .labels()
            .get(gpuscale_operator::reconcile::LABEL_DEPLOYMENT)
        {
            by.entry(d.clone()).or_default().push(p.name_any());
        }
    }
    let mut out = Vec::new();
    for d in deployments.list(&Default::default()).await?.items {
        let have = by.remove(&d.name_any()).unwrap_or_default();
        if have.len() == replicas as usize {
            continue;
        }
        let status = d.status.as_ref();
        let available = status
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Available"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        out.push(format!(
            "{} has {:?}, status {} replicas ({available})",
            d.name_any(),
            have,
            status.map_or(0, |s| s.replicas)
        ));
        if out.len() == 20 {
            break;
        }
    }
    Ok(out)
}

/// Runs the fleet and measures the operator.
pub async fn run(cfg: FleetConfig) -> anyhow::Result<FleetReport> {
    anyhow::ensure!(
        cfg.changes <= cfg.deployments,
        "{} changes for {} deployments: each change adds a replica to a different deployment",
        cfg.changes,
        cfg.deployments
    );
    std::fs::create_dir_all(&cfg.dir)?;
    let api = ApiServer::start("127.0.0.1:0".parse()?).await?;
    api.register_crds()?;
    let admin = cfg.dir.join("kubeconfig");
    let operator_kc = cfg.dir.join("kubeconfig-operator");
    api.write_kubeconfig(&admin)?;
    api.write_kubeconfig_as(&operator_kc, Some(OPERATOR_USER))?;
    let client = super::cluster::client_for(&admin).await?;
    // Hollow nodes: Node objects and inventories straight into the store.
    for n in 0..cfg.nodes {
        let node = SimNode::new(
            &format!("hollow-{n:04}"),
            cfg.gpus_per_node as u32,
            "Tesla V100-SXM3-32GB",
            32,
            true,
        );
        api.create(super::kubelet::node_object(&node))
            .map_err(|e| anyhow::anyhow!("creating node {}: {e}", node.name))?;
        let inv = json!({"apiVersion": "gpuscale.dev/v1alpha1", "kind": "GpuInventory",
            "metadata": {"name": node.name},
            "spec": serde_json::to_value(super::kubelet::inventory(&node))?});
        api.create(inv)
            .map_err(|e| anyhow::anyhow!("creating the inventory of {}: {e}", node.name))?;
    }
    let addresses: Arc<Mutex<Addresses>> = Arc::default();
    let (port, _metrics) = serve_metrics(addresses.clone()).await?;
    let _scheduler = super::scheduler::Scheduler::start(client.clone());
    let kubelet = tokio::spawn(hollow_kubelet(client.clone(), addresses.clone()));

    // The operator, as deployed, its metrics on a port picked here.
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let log = std::fs::File::create(cfg.dir.join("operator.log"))?;
    let mut operator = tokio::process::Command::new(&cfg.operator)
        .args([
            "run",
            "--metrics-addr",
            &metrics_addr.to_string(),
            "--scrape-interval-seconds",
            &cfg.scrape_interval_seconds.to_string(),
            "--allow-host-path-models",
        ])
        .env("KUBECONFIG", &operator_kc)
        .env(
            "RUST_LOG",
            std::env::var("GPUSCALE_FLEET_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", cfg.operator.display()))?;
    let pid = operator.id().context("the operator has no pid")?;

    // Every pod's first sighting, for the latency of spec changes.
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = {
        let created = created.clone();
        let pods: Api<Pod> = Api::all(client.clone());
        tokio::spawn(async move {
            let mut w = watcher(pods, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = w.next().await {
                if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev {
                    created
                        .lock()
                        .expect("created")
                        .entry(p.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };

    let deployments: Api<gpuscale_crds::InferenceDeployment> =
        Api::namespaced(client.clone(), "default");
    let ssa = PatchParams::apply("fleet").force();
    let start = Instant::now();
    for i in 0..cfg.deployments {
        let name = format!("m{i:04}");
        deployments
            .patch(
                &name,
                &ssa,
                &Patch::Apply(deployment(&name, cfg.replicas, port)),
            )
            .await
            .with_context(|| format!("applying {name}"))?;
    }
    let want = cfg.deployments * cfg.replicas as usize;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ready_count = || async {
        let all = pods.list(&Default::default()).await?.items;
        let ready = all
            .iter()
            .filter(gpuscale_operator::reconcile::is_ready)
            .count();
        anyhow::Ok((all.len(), ready))
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut told = Instant::now();
    loop {
        let (all, ready) = ready_count().await?;
        if told.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "{:>5.0} s: {all} pods, {ready} Ready",
                start.elapsed().as_secs_f64()
            );
            told = Instant::now();
        }
        if ready == want && all == want {
            break;
        }
        if let Ok(Some(status)) = operator.try_wait() {
            anyhow::bail!(
                "the operator exited ({status}); see {}",
                cfg.dir.join("operator.log").display()
            );
        }
        if Instant::now() >= deadline {
            let short = short_of(&deployments, &pods, cfg.replicas).await?;
            anyhow::bail!(
                "only {ready} of {want} pods Ready ({all} exist) after 600 s; deployments \
                 without {} pods, and what their status says: {}",
                cfg.replicas,
                short.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let setup = start.elapsed();
    eprintln!(
        "{want} pods Ready after {:.1} s; settling",
        setup.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;

    // Steady state: requests, CPU and passes over the window.
    api.take_request_counts();
    let gone = || anyhow::anyhow!("the operator (pid {pid}) is gone");
    let cpu0 = super::process::usage(pid).ok_or_else(gone)?.cpu_seconds;
    let p0 = passes(&metrics_addr.to_string()).await?;
    let w0 = Instant::now();
    tokio::time::sleep(cfg.window).await;
    let end = super::process::usage(pid).ok_or_else(gone)?;
    let (rss, peak, cpu1) = (end.rss_bytes, end.peak_rss_bytes, end.cpu_seconds);
    let p1 = passes(&metrics_addr.to_string()).await?;
    let elapsed = w0.elapsed().as_secs_f64();
    let per_minute = api
        .take_audit_counts()
        .into_iter()
        .filter(|(a, _)| a.user == OPERATOR_USER)
        .fold(BTreeMap::new(), |mut m, (a, n)| {
            *m.entry((a.verb, a.resource)).or_insert(0.0) += n as f64 * 60.0 / elapsed;
            m
        });
    let pass_count = (p1 - p0).max(1.0);

    // Spec changes, one deployment at a time: one more replica each.
    let mut latencies = Vec::new();
    for i in 0..cfg.changes {
        let name = format!("m{i:04}");
        let new_pod = format!("{name}-{}", cfg.replicas);
        let at = Instant::now();
        deployments
            .patch(
                &name,
                &ssa,
                &Patch::Apply(deployment(&name, cfg.replicas + 1, port)),
            )
            .await?;
        let deadline = at + Duration::from_secs(60);
        loop {
            if let Some(t) = created.lock().expect("created").get(&new_pod) {
                let took = t.saturating_duration_since(at);
                if took > Duration::from_secs(1) {
                    // With the time it was asked, to be found in the operator's log.
                    eprintln!(
                        "{name}: pod created {} ms after the change made at {}",
                        took.as_millis(),
                        jiff::Timestamp::now()
                            - jiff::SignedDuration::try_from(at.elapsed()).unwrap_or_default()
                    );
                }
                latencies.push(took);
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{new_pod} not created within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    seen.abort();
    kubelet.abort();
    let _ = operator.kill().await;
    Ok(FleetReport {
        pods: want,
        setup,
        rss_bytes: rss,
        peak_rss_bytes: peak,
        cpu_per_pass: Duration::from_secs_f64((cpu1 - cpu0) / pass_count),
        passes_per_second: pass_count / elapsed,
        cores: (cpu1 - cpu0) / elapsed,
        latency_p50: super::traffic::percentile(&latencies, 0.5),
        latency_p99: super::traffic::percentile(&latencies, 0.99),
        latency_max: latencies.last().copied().unwrap_or_default(),
        per_minute,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(requests: &[(&str, &str, f64)]) -> FleetReport {
        FleetReport {
            pods: 0,
            setup: Duration::ZERO,
            rss_bytes: 0,
            peak_rss_bytes: 0,
            cpu_per_pass: Duration::ZERO,
            passes_per_second: 0.0,
            cores: 0.0,
            latency_p50: Duration::ZERO,
            latency_p99: Duration::ZERO,
            latency_max: Duration::ZERO,
            per_minute: requests
                .iter()
                .map(|(v, w, n)| ((v.to_string(), w.to_string()), *n))
                .collect(),
        }
    }

    #[test]
    fn only_lease_renewals_status_patches_and_new_watches_are_steady() {
        let steady = [
            ("get", "leases", 29.0),
            ("update", "leases", 29.0),
            ("patch", "inferencedeployments/status", 3413.1),
            ("watch", "pods", 2.0),
        ];
        assert!(report(&steady).unsteady().is_empty());
        let mut storm = steady.to_vec();
        storm.push(("delete", "pods", 17630.0));
        storm.push(("list", "pods", 2.0));
        assert_eq!(
            report(&storm).unsteady(),
            ["delete pods (17630.0 a minute)", "list pods (2.0 a minute)"]
        );
    }
}
