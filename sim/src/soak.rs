//! The soak (`gpuscale-sim soak`): steady load with a burst every five minutes, through
//! the router to SmolLM2 workers on the simulated cluster, for as long as asked (30
//! minutes by default). Every process's resident memory, open file descriptors and
//! tokio tasks are sampled once the load has run a minute and again at its end, so a
//! leak shows as growth between the two; and every request must be answered in full.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use gpuscale_crds::InferenceDeployment;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};

use super::cluster::SimCluster;
use super::traffic::{self, Profile};

const EXAMPLE: &str = include_str!("../../examples/smollm.yaml");
const MODEL: &str = "smollm2-135m-instruct";

/// One process at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    pub rss_bytes: u64,
    pub fds: usize,
    /// Alive tokio tasks, from the process's `*_tokio_alive_tasks` gauge (None: not
    /// scraped, e.g. a worker that had gone).
    pub tasks: Option<u64>,
}

/// What the soak measured: each process at the start and at the end (by name:
/// `operator`, `router`, `simulator`, `worker <pod>`), and the requests.
#[derive(Debug)]
pub struct SoakReport {
    pub minutes: f64,
    pub processes: Vec<(String, Option<Usage>, Option<Usage>)>,
    pub summary: traffic::Summary,
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.summary;
        writeln!(
            f,
            "{:.0} min: {} requests ({} streamed answers cut), {} errors, p50 {:?}, p99 {:?}",
            self.minutes, s.requests, s.cut, s.errors, s.p50, s.p99
        )?;
        writeln!(
            f,
            "{:<28} {:>22} {:>12} {:>14}",
            "process (start → end)", "RSS MiB", "open fds", "tokio tasks"
        )?;
        let mib = |u: &Option<Usage>| {
            u.as_ref().map_or("-".into(), |u| {
                format!("{:.1}", u.rss_bytes as f64 / 1048576.0)
            })
        };
        let fds = |u: &Option<Usage>| u.as_ref().map_or("-".into(), |u| u.fds.to_string());
        let tasks = |u: &Option<Usage>| {
            u.as_ref()
                .and_then(|u| u.tasks)
                .map_or("-".into(), |t| t.to_string())
        };
        for (name, a, b) in &self.processes {
            writeln!(
                f,
                "{name:<28} {:>10} → {:<9} {:>5} → {:<5} {:>6} → {:<6}",
                mib(a),
                mib(b),
                fds(a),
                fds(b),
                tasks(a),
                tasks(b)
            )?;
        }
        Ok(())
    }
}

/// The `*_tokio_alive_tasks` sample of the metrics at `url`.
async fn tasks_at(http: &reqwest::Client, url: &str) -> Option<u64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| {
        let (name, v) = l.split_once(' ')?;
        name.ends_with("_tokio_alive_tasks")
            .then(|| v.trim().parse::<f64>().ok())?
            .map(|v| v as u64)
    })
}

async fn usage(http: &reqwest::Client, pid: u32, metrics: Option<&str>) -> Option<Usage> {
    let u = super::process::usage(pid)?;
    let tasks = match metrics {
        Some(url) => tasks_at(http, url).await,
        None => None,
    };
    Some(Usage {
        rss_bytes: u.rss_bytes,
        fds: u.open_fds,
        tasks,
    })
}

/// Every process now: the operator, the router, this simulator, and each worker.
async fn sample(
    http: &reqwest::Client,
    cluster: &SimCluster,
    (operator, operator_metrics): (u32, &str),
    (router, router_url): (u32, &str),
) -> Vec<(String, Option<Usage>)> {
    let mut out = vec![
        (
            "operator".to_string(),
            usage(
                http,
                operator,
                Some(&format!("http://{operator_metrics}/metrics")),
            )
            .await,
        ),
        (
            "router".to_string(),
            usage(http, router, Some(&format!("{router_url}/metrics"))).await,
        ),
    ];
    // This process: the API server, scheduler, kubelets and the load's client.
    let me = std::process::id();
    let mut own = usage(http, me, None).await;
    if let Some(u) = own.as_mut() {
        u.tasks = Some(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks() as u64,
        );
    }
    out.push(("simulator".to_string(), own));
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client(), "default")
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    for k in cluster.kubelets() {
        for (pod, pid) in k.workers() {
            let ip = pods
                .iter()
                .find(|p| kube::ResourceExt::name_any(*p) == pod)
                .and_then(|p| p.status.as_ref()?.pod_ip.clone());
            let url = ip.map(|ip| format!("http://{ip}:8080/metrics"));
            out.push((
                format!("worker {pod}"),
                usage(http, pid, url.as_deref()).await,
            ));
        }
    }
    out
}

/// Steady load (1 request/s) with a burst (4/s for a minute) every five minutes, for
/// `minutes`.
pub fn profile(minutes: f64) -> Profile {
    let end = minutes * 60.0;
    let mut steps = Vec::new();
    let mut t = 0.0;
    while t < end {
        steps.push((t, 1.0));
        if t + 240.0 < end {
            steps.push((t + 240.0, 4.0));
        }
        t += 300.0;
    }
    steps.push((end, 0.0));
    Profile(steps)
}

/// Runs the soak for `minutes`.
pub async fn run(minutes: f64) -> anyhow::Result<SoakReport> {
    let out = PathBuf::from(super::demo::OUT).join("soak");
    let (cluster, operator_bin, router_bin) = super::demo::default_cluster(&out).await?;
    let kubeconfig = cluster.kubeconfig().to_path_buf();
    let (router, router_url) = super::start_router(
        &router_bin,
        &kubeconfig,
        std::fs::File::create(out.join("router.log"))?,
    )
    .await?;
    let router_pid = router.id().context("the router has no pid")?;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = std::fs::File::create(out.join("operator.log"))?;
    let operator =
        super::operator_command_at(&operator_bin, &kubeconfig, &metrics_addr.to_string())
            .args(["--router-url", &router_url])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the operator")?;
    let operator_pid = operator.id().context("the operator has no pid")?;
    eprintln!(
        "soak: cluster {}, router {router_url}, operator pid {operator_pid}; logs in {}",
        cluster.url(),
        out.display()
    );
    let mut d: Value = serde_yaml::from_str(EXAMPLE)?;
    d["spec"]["scaling"] = json!({"minReplicas": 1, "maxReplicas": 3, "warmReplicas": 0,
        "targetQueueDepth": 1, "scaleDownWindowSeconds": 30});
    Api::<InferenceDeployment>::namespaced(cluster.client(), "default")
        .patch(
            "smollm",
            &PatchParams::apply("gpuscale-soak").force(),
            &Patch::Apply(&d),
        )
        .await?;
    // The first replica ready before the load starts.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client(), "default");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let list = pods.list(&Default::default()).await?.items;
        if list.iter().any(gpuscale_operator::reconcile::is_ready) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no replica ready within 180 s; see {}",
            out.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let load = {
        let url = router_url.clone();
        tokio::spawn(async move {
            traffic::drive_url_streaming(&url, MODEL, 24, profile(minutes)).await
        })
    };
    let http = reqwest::Client::new();
    let ids = (
        (operator_pid, metrics_addr.to_string()),
        (router_pid, router_url.clone()),
    );
    let warm = Duration::from_secs(60).min(Duration::from_secs_f64(minutes * 30.0));
    tokio::time::sleep(warm).await;
    let start = sample(
        &http,
        &cluster,
        (ids.0 .0, &ids.0 .1),
        (ids.1 .0, &ids.1 .1),
    )
    .await;
    eprintln!("soak: first sample taken; running until {minutes} min");
    let end_at =
        Duration::from_secs_f64(minutes * 60.0).saturating_sub(warm + Duration::from_secs(5));
    tokio::time::sleep(end_at).await;
    let end = sample(
        &http,
        &cluster,
        (ids.0 .0, &ids.0 .1),
        (ids.1 .0, &ids.1 .1),
    )
    .await;
    let outcomes = load.await?;
    let mut processes: Vec<(String, Option<Usage>, Option<Usage>)> = Vec::new();
    for (name, u) in start {
        let later = end
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, u)| u.clone());
        processes.push((name, u, later));
    }
    for (name, u) in end {
        if !processes.iter().any(|(n, _, _)| *n == name) {
            processes.push((name, None, u));
        }
    }
    drop(operator);
    drop(router);
    Ok(SoakReport {
        minutes,
        processes,
        summary: traffic::summary(&outcomes),
    })
}
