//! `gpuscale-sim demo`: a simulated cluster, the real operator binary, SmolLM2 workers,
//! a traffic burst and a broken canary, with a live table, a summary and an SVG plot.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gpuscale_crds::InferenceDeployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};

use super::cluster::{ClusterConfig, SimCluster};
use super::kubelet::KubeletConfig;
use super::nodes::default_fleet;
use super::plot::{self, Mark, Sample};
use super::traffic::{self, Profile};

const EXAMPLE: &str = include_str!("../../examples/smollm.yaml");

/// Where the demo writes: kubeconfig, logs, plot.
pub const OUT: &str = "target/gpuscale-sim";

/// Seconds of light load before the burst.
const BURST_START: f64 = 15.0;

/// When, in the burst, the broken version is applied.
const ROLLOUT_AT: f64 = 28.0;

/// The events the plot marks.
const MARKED: [&str; 6] = [
    "ScaledUp",
    "ScaledDown",
    "RolloutStarted",
    "RolloutStep",
    "RolloutPromoted",
    "RolledBack",
];

/// The model file: `GPUSCALE_SMOLLM2_GGUF`, else fetched by `scripts/ensure-tools.sh`.
fn model_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("GPUSCALE_SMOLLM2_GGUF") {
        return Ok(p.into());
    }
    let script = Path::new("scripts/ensure-tools.sh");
    if !script.is_file() {
        bail!("set GPUSCALE_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf, or run from the repository root");
    }
    eprintln!("fetching SmolLM2 into ~/.cache/gpuscale (scripts/ensure-tools.sh)...");
    let out = std::process::Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export GPUSCALE_SMOLLM2_GGUF="))
        .map(|p| PathBuf::from(p.trim_matches('"')))
        .context("scripts/ensure-tools.sh did not report GPUSCALE_SMOLLM2_GGUF")
}

/// The operator and worker binaries. From a checkout they are (re)built in release
/// first, so the demo never runs a stale operator; `GPUSCALE_OPERATOR_BIN` and
/// `GPUSCALE_WORKER_BIN` override both.
fn binaries() -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let overridden = std::env::var_os("GPUSCALE_OPERATOR_BIN").is_some()
        && std::env::var_os("GPUSCALE_WORKER_BIN").is_some();
    if !overridden && Path::new("Cargo.toml").is_file() {
        eprintln!("building the operator and the worker (cargo build --release)...");
        let ok = std::process::Command::new("cargo")
            .args([
                "build",
                "--release",
                "-p",
                "gpuscale-operator",
                "-p",
                "gpuscale-inference-worker",
                "-p",
                "gpuscale-router",
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("could not build them; run cargo build --release -p gpuscale-operator -p gpuscale-inference-worker -p gpuscale-router");
        }
    }
    Ok((
        super::operator_binary()?,
        super::worker_binary()?,
        super::router_binary()?,
    ))
}

/// The demo's cluster (the default fleet, SmolLM2's directory as the nodes' `/models`,
/// kubeconfig and logs under `out`), with the operator and router binaries to run
/// against it.
pub(crate) async fn default_cluster(out: &Path) -> anyhow::Result<(SimCluster, PathBuf, PathBuf)> {
    let model = model_path()?;
    let (operator_bin, worker_bin, router_bin) = binaries()?;
    let cluster = SimCluster::start(ClusterConfig {
        addr: "127.0.0.1:0".parse()?,
        kubeconfig: out.join("kubeconfig"),
        nodes: default_fleet(),
        kubelet: KubeletConfig::new(
            worker_bin,
            model.parent().context("model path")?.into(),
            out.join("logs"),
        ),
    })
    .await?;
    Ok((cluster, operator_bin, router_bin))
}

/// Runs the demo. `burst_rps` is the request rate of the burst.
pub async fn run(burst_rps: f64) -> anyhow::Result<()> {
    let out = PathBuf::from(OUT);
    let (cluster, operator_bin, router_bin) = default_cluster(&out).await?;
    let kubeconfig = cluster.kubeconfig().to_path_buf();
    println!(
        "simulated cluster: {} (nodes: 2×L4, 2×L4, 4×A100 NVLink; simulated GPUs, workers on CPU)",
        cluster.url()
    );
    println!(
        "watch it from another terminal:  kubectl --kubeconfig {} get infd -w",
        kubeconfig.display()
    );
    let (mut router, router_url) = super::start_router(
        &router_bin,
        &kubeconfig,
        std::fs::File::create(out.join("router.log"))?,
    )
    .await?;
    println!(
        "router: {router_url} (the one OpenAI endpoint; log {OUT}/router.log, a JSON line per request)"
    );
    let log = std::fs::File::create(out.join("operator.log"))?;
    // The operator logs at info whatever the demo's own level: its log is the record of
    // every decision the run made.
    let mut operator = super::operator_command(&operator_bin, &kubeconfig)
        .args(["--drain-timeout-seconds", "30", "--router-url", &router_url])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the operator")?;
    println!(
        "operator: pid {} (log {}/operator.log)",
        operator.id().unwrap_or(0),
        OUT
    );

    // examples/smollm.yaml from zero: no replica until the first request, back to zero
    // 20 s after the last; a 30 s scale-down window so the demo ends in minutes.
    let mut d: Value = serde_yaml::from_str(EXAMPLE)?;
    d["spec"]["scaling"]["minReplicas"] = json!(0);
    d["spec"]["scaling"]["warmReplicas"] = json!(0);
    d["spec"]["scaling"]["scaleToZeroAfterSeconds"] = json!(20);
    d["spec"]["scaling"]["scaleDownWindowSeconds"] = json!(30);
    d["spec"]["rollout"] = json!({"stepSeconds": 30, "minRequests": 10});
    let client = cluster.client();
    let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), "default");
    api.patch(
        "smollm",
        &PatchParams::apply("gpuscale-demo").force(),
        &Patch::Apply(&d),
    )
    .await?;
    println!(
        "applied examples/smollm.yaml with minReplicas 0, warmReplicas 0, scaleToZeroAfterSeconds 20, \
         scaleDownWindowSeconds 30, rollout stepSeconds 30 and minRequests 10"
    );
    println!(
        "at {ROLLOUT_AT:.0} s a new version whose workers fail half their requests \
         (--fail-percent 50) is rolled out: a canary the router gives 10% of the traffic\n"
    );

    let profile = Profile(vec![
        (0.0, 0.3),
        (BURST_START, burst_rps),
        (60.0, 0.3),
        (120.0, 0.0),
    ]);
    // Traffic starts once the model is sized (a probe pod reads its header), so the
    // first request's wait is a replica's start, not the sizing.
    let sized = Instant::now();
    while api
        .get("smollm")
        .await?
        .status
        .and_then(|s| s.model)
        .and_then(|m| m.header)
        .is_none()
    {
        if sized.elapsed() > Duration::from_secs(60) {
            bail!("the model was not sized within 60 s; see {OUT}/operator.log");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let start = Instant::now();
    let start_wall = jiff::Timestamp::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut broken_applied = false;
    let load = tokio::spawn({
        let (url, profile) = (router_url.clone(), profile.clone());
        async move { traffic::drive_url(&url, "smollm2-135m-instruct", 48, profile).await }
    });
    println!(
        "{:>6}  {:>9}  {:>9}  {:>7}  {:>5}  {:<16}  REASON",
        "TIME", "LOAD", "READY", "DESIRED", "QUEUE", "ROLLOUT"
    );
    let mut samples = Vec::new();
    let mut settled_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = start.elapsed().as_secs_f64();
        if t >= ROLLOUT_AT && !broken_applied {
            let mut broken = d.clone();
            broken["spec"]["model"]["version"] = json!("2-broken");
            broken["spec"]["worker"] =
                json!({"env": [{"name": "GPUSCALE_FAIL_PERCENT", "value": "50"}]});
            api.patch(
                "smollm",
                &PatchParams::apply("gpuscale-demo").force(),
                &Patch::Apply(&broken),
            )
            .await?;
            broken_applied = true;
        }
        let st = api.get("smollm").await?.status.unwrap_or_default();
        let sent = profile.rate_at(t);
        let (stable_ready, canary_ready) = ready_by_version(&pods, &st).await?;
        let rollout = st.rollout.as_ref().map_or(String::new(), |r| {
            format!("{:?} {}%", r.phase, r.canary_weight)
        });
        println!(
            "{:>5.0}s  {:>6.1}/s  {:>4}+{:<4}  {:>7}  {:>5}  {:<16}  {}",
            t,
            sent,
            stable_ready,
            canary_ready,
            st.desired_replicas,
            st.queue_depth,
            rollout,
            st.last_scale_reason.clone().unwrap_or_default()
        );
        samples.push(Sample {
            t,
            sent_per_s: sent,
            queue: st.queue_depth,
            desired: st.desired_replicas,
            stable: stable_ready,
            canary: canary_ready,
        });
        if let Ok(Some(status)) = operator.try_wait() {
            bail!("the operator exited ({status}); see {OUT}/operator.log");
        }
        if let Ok(Some(status)) = router.try_wait() {
            bail!("the router exited ({status}); see {OUT}/router.log");
        }
        // Done when the deployment is back at zero after the traffic.
        let done = t > profile.end() && st.desired_replicas == 0 && st.replicas == 0;
        settled_since = if done {
            settled_since.or(Some(Instant::now()))
        } else {
            None
        };
        if settled_since.is_some_and(|s| s.elapsed() > Duration::from_secs(4)) || t > 400.0 {
            break;
        }
    }
    let outcomes = load.await?;
    let s = traffic::summary(&outcomes);
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let mut marked: Vec<Event> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| MARKED.contains(&e.reason.as_deref().unwrap_or("")))
        .collect();
    let at = |e: &Event| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.deprecated_first_timestamp.as_ref().map(|t| t.0))
            .map_or(0.0, |t| t.duration_since(start_wall).as_secs_f64())
    };
    marked.sort_by(|a, b| at(a).total_cmp(&at(b)));
    let describe = |e: &Event| {
        format!(
            "{:>5.0}s {}: {}",
            at(e),
            e.reason.clone().unwrap_or_default(),
            e.note.clone().unwrap_or_default()
        )
    };
    let is_scale = |e: &&Event| matches!(e.reason.as_deref(), Some("ScaledUp" | "ScaledDown"));
    let scale_events: Vec<String> = marked.iter().filter(is_scale).map(describe).collect();
    let rollout_events: Vec<String> = marked
        .iter()
        .filter(|e| !is_scale(e))
        .map(describe)
        .collect();
    let marks: Vec<Mark> = marked
        .iter()
        .map(|e| Mark {
            t: at(e),
            reason: e.reason.clone().unwrap_or_default(),
        })
        .collect();
    println!("\nsummary");
    println!(
        "  requests {}  errors {}  p50 {:.2}s  p99 {:.2}s",
        s.requests,
        s.errors,
        s.p50.as_secs_f64(),
        s.p99.as_secs_f64()
    );
    println!(
        "  peak replicas {}",
        samples
            .iter()
            .map(|x| x.stable + x.canary)
            .max()
            .unwrap_or(0)
    );
    println!("  scale events ({}):", scale_events.len());
    for e in &scale_events {
        println!("    {e}");
    }
    println!(
        "  rollout events ({}); the errors above are the broken canary's answers while its gate watched it:",
        rollout_events.len()
    );
    for e in &rollout_events {
        println!("    {e}");
    }
    if let Some(first) = outcomes.first() {
        println!(
            "  first request (sent at zero replicas, held by the router): {} after {:.2} s",
            first
                .status
                .map_or("no answer".to_string(), |c| c.to_string()),
            first.latency.as_secs_f64()
        );
    }
    let page = reqwest::get(format!("{router_url}/metrics"))
        .await?
        .text()
        .await?;
    println!("  router picks: {}", picks(&page));
    let plot = out.join("demo.svg");
    plot::draw(&plot, &samples, &marks)?;
    println!("  plot: {}", plot.display());
    operator.kill().await.ok();
    router.kill().await.ok();
    Ok(())
}

/// The router's picks by reason, from its exposition: `least-loaded 700, prefix 3`.
fn picks(page: &str) -> String {
    let mut by: std::collections::BTreeMap<String, f64> = Default::default();
    for line in page
        .lines()
        .filter(|l| l.starts_with("gpuscale_router_picks_total{"))
    {
        let reason = line
            .split("reason=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by.entry(reason.to_string()).or_default() += n;
    }
    by.iter()
        .map(|(r, n)| format!("{r} {n:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ready replicas of the stable version and of a rollout's canary, from the pods'
/// template labels.
async fn ready_by_version(
    pods: &Api<Pod>,
    st: &gpuscale_crds::InferenceDeploymentStatus,
) -> anyhow::Result<(u32, u32)> {
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "{}=smollm",
            gpuscale_operator::reconcile::LABEL_DEPLOYMENT
        )))
        .await?;
    let stable = st.rollout.as_ref().map(|r| r.stable.name.clone());
    let (mut s, mut c) = (0, 0);
    for p in list.items.iter().filter(|p| {
        p.metadata.deletion_timestamp.is_none() && gpuscale_operator::reconcile::is_ready(p)
    }) {
        let template = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(gpuscale_operator::reconcile::LABEL_TEMPLATE));
        if stable.is_none() || template == stable.as_ref() {
            s += 1;
        } else {
            c += 1;
        }
    }
    Ok((s, c))
}
