//! The harness of the end-to-end scenarios. By default each scenario starts its own
//! simulated cluster (API server, simulated GPU nodes, kubelets running the real
//! `inference-worker`) and runs the operator's controller against it through kube-rs,
//! exactly as against a cluster. With `GPUSCALE_E2E_KUBECONFIG=<path>` the scenarios
//! run against that cluster instead, where gpuscale must already be installed (`helm
//! install`); each then works in a namespace of its own, and the scenarios that need
//! to kill the operator or a node are skipped there.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gpuscale_crds::InferenceDeployment;
use gpuscale_operator::metrics::Metrics;
use gpuscale_operator::reconcile::{self, Config};
use gpuscale_operator::scrape::HttpScraper;
use gpuscale_sim::cluster::{client_as, client_for, ClusterConfig, SimCluster};
use gpuscale_sim::kubelet::KubeletConfig;
use gpuscale_sim::nodes::SimNode;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

/// The environment variable that points the scenarios at a real cluster.
pub const REAL_CLUSTER_ENV: &str = "GPUSCALE_E2E_KUBECONFIG";

/// The SmolLM2 example every scenario starts from.
pub const SMOLLM: &str = include_str!("../../examples/smollm.yaml");

/// One scenario's cluster, namespace and (on the simulator) operator.
pub struct Env {
    pub client: Client,
    pub namespace: String,
    sim: Option<SimCluster>,
    operator: Option<tokio::task::JoinHandle<()>>,
    /// The request router's base URL, once started; the operator reads its demand.
    router: Option<String>,
    /// The namespaces the operator serves (empty: all).
    operator_namespaces: Vec<String>,
    /// The operator's client: on the simulator it impersonates the chart's service
    /// account, so the simulator's request log tells the operator's requests apart.
    operator_client: Client,
}

/// Whom the operator's requests come from on the simulator.
pub use gpuscale_sim::OPERATOR_USER;

/// The environment variable with the base URL of a real cluster's router (reachable
/// from where the scenarios run, e.g. through `kubectl port-forward`).
pub const REAL_ROUTER_ENV: &str = "GPUSCALE_E2E_ROUTER_URL";

/// The kubeconfig of a real cluster, when one is given.
pub fn real_cluster() -> Option<PathBuf> {
    std::env::var_os(REAL_CLUSTER_ENV).map(PathBuf::from)
}

impl Env {
    /// A fresh simulated cluster with `nodes` and the operator running, or the real
    /// cluster with a new namespace.
    pub async fn start(scenario: &str, nodes: Vec<SimNode>) -> anyhow::Result<Env> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        if let Some(kc) = real_cluster() {
            let client = client_for(&kc).await?;
            let namespace = format!("gpuscale-e2e-{scenario}-{}", std::process::id());
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &ns)
                .await?;
            return Ok(Env {
                operator_client: client.clone(),
                client,
                namespace,
                sim: None,
                operator: None,
                router: None,
                operator_namespaces: Vec::new(),
            });
        }
        let model = std::env::var("GPUSCALE_SMOLLM2_GGUF").context(
            "GPUSCALE_SMOLLM2_GGUF is not set: run the tests through scripts/test.sh, which fetches SmolLM2",
        )?;
        let models = PathBuf::from(model)
            .parent()
            .context("the model path has no directory")?
            .to_path_buf();
        let dir =
            std::env::temp_dir().join(format!("gpuscale-e2e-{scenario}-{}", std::process::id()));
        let sim = SimCluster::start(ClusterConfig {
            addr: "127.0.0.1:0".parse()?,
            kubeconfig: dir.join("kubeconfig"),
            nodes,
            kubelet: KubeletConfig::new(gpuscale_sim::worker_binary()?, models, dir.join("logs")),
        })
        .await?;
        let operator_client = client_as(sim.kubeconfig(), Some(OPERATOR_USER)).await?;
        let mut env = Env {
            operator_client,
            client: sim.client(),
            namespace: "default".into(),
            sim: Some(sim),
            operator: None,
            router: None,
            operator_namespaces: Vec::new(),
        };
        env.start_operator();
        Ok(env)
    }

    /// Whether this runs on the simulator (where the operator and nodes can be killed).
    pub fn simulated(&self) -> bool {
        self.sim.is_some()
    }

    /// The simulated cluster.
    pub fn sim(&mut self) -> Option<&mut SimCluster> {
        self.sim.as_mut()
    }

    /// Starts the operator's controller (simulator only; a real cluster runs its own).
    pub fn start_operator(&mut self) {
        self.start_operator_with(|_| {});
    }

    /// The client the operator uses (on the simulator: as [`OPERATOR_USER`]).
    pub fn operator_client(&self) -> Client {
        self.operator_client.clone()
    }

    /// Restarts the operator serving only `namespaces` (`--namespace`).
    pub fn serve_only(&mut self, namespaces: &[&str]) {
        self.operator_namespaces = namespaces.iter().map(|s| s.to_string()).collect();
        self.kill_operator();
        self.start_operator();
    }

    /// Starts the operator's controller with `change` made to the settings the
    /// simulated runs use.
    pub fn start_operator_with(&mut self, change: impl FnOnce(&mut Config)) {
        if self.sim.is_none() {
            return;
        }
        let mut config = Config {
            scrape_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            routers: gpuscale_operator::routers::Sources {
                urls: self.router.iter().cloned().collect(),
                pods: None,
            },
            // As `gpuscale_sim::operator_command` runs it: node models allowed, a
            // model cache per node.
            model_cache: gpuscale_operator::reconcile::ModelCache {
                volume: gpuscale_operator::reconcile::CacheVolume::HostPath(
                    "/var/cache/gpuscale/models".into(),
                ),
                max_bytes: None,
                host_path_models: true,
            },
            prices: gpuscale_operator::cost::PriceTable::parse(gpuscale_sim::GPU_PRICES)
                .expect("the simulator's price table parses"),
            ..Config::default()
        };
        change(&mut config);
        let ctx = reconcile::Context::new(
            self.operator_client.clone(),
            config,
            Arc::new(HttpScraper::new(Duration::from_secs(1))),
            Arc::new(Metrics::default()),
        );
        let namespaces = self.operator_namespaces.clone();
        self.operator = Some(tokio::spawn(reconcile::run(ctx, namespaces)));
    }

    /// Starts the request router (on the simulator, in this process, watching the
    /// cluster through kube-rs as `gpuscale-router` does) and restarts the operator so
    /// that it reads the router's held requests. Returns the router's base URL.
    pub async fn start_router(&mut self) -> anyhow::Result<String> {
        if self.sim.is_none() {
            return std::env::var(REAL_ROUTER_ENV).with_context(|| {
                format!("{REAL_ROUTER_ENV} is not set: give the installed router's URL")
            });
        }
        use gpuscale_router::{discovery, proxy, HoldConfig, Router};
        let router = Router::new(HoldConfig {
            timeout: Duration::from_secs(300),
            max_held: 1000,
        });
        let http = reqwest::Client::new();
        tokio::spawn(discovery::watch(
            self.client.clone(),
            Vec::new(),
            router.clone(),
        ));
        tokio::spawn(discovery::scrape_workers(
            router.clone(),
            http.clone(),
            Duration::from_millis(500),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, proxy::app(router, http)).await });
        self.router = Some(url.clone());
        self.kill_operator();
        self.start_operator();
        Ok(url)
    }

    /// Kills the operator at once, mid-pass if it is in one (no cleanup runs).
    pub fn kill_operator(&mut self) {
        if let Some(op) = self.operator.take() {
            op.abort();
        }
    }

    /// Applies an InferenceDeployment (server-side apply, as `kubectl apply
    /// --server-side` does) into this scenario's namespace.
    pub async fn apply(&self, d: &Value) -> anyhow::Result<InferenceDeployment> {
        let api: Api<InferenceDeployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = d["metadata"]["name"]
            .as_str()
            .context("the deployment has no name")?;
        Ok(api
            .patch(
                name,
                &PatchParams::apply("gpuscale-e2e").force(),
                &Patch::Apply(d),
            )
            .await?)
    }

    /// The deployment now.
    pub async fn deployment(&self, name: &str) -> anyhow::Result<InferenceDeployment> {
        let api: Api<InferenceDeployment> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(api.get(name).await?)
    }

    /// The deployment's replica pods now.
    pub async fn pods(&self, name: &str) -> anyhow::Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let lp = ListParams::default().labels(&format!("gpuscale.dev/deployment={name}"));
        Ok(api.list(&lp).await?.items)
    }

    /// Events about the deployment.
    pub async fn events(&self, name: &str) -> anyhow::Result<Vec<Event>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect())
    }

    /// Polls `check` every 250 ms until it gives a value or `timeout` passes.
    pub async fn wait<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = check().await {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.snapshot().await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// What the namespace holds, for a failed wait: each pod (node, phase, whether
    /// terminating or ready, why unscheduled) and the last Events, so that a run that
    /// timed out in CI says where it stood.
    pub async fn snapshot(&self) -> String {
        let mut out = String::from("pods:\n");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        match pods.list(&ListParams::default()).await {
            Ok(list) => {
                for p in list.items {
                    let st = p.status.clone().unwrap_or_default();
                    let unscheduled = st
                        .conditions
                        .iter()
                        .flatten()
                        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                        .and_then(|c| c.message.clone());
                    out.push_str(&format!(
                        "  {} node={:?} phase={:?} ready={} terminating={} unscheduled={:?}\n",
                        p.name_any(),
                        p.spec.as_ref().and_then(|s| s.node_name.clone()),
                        st.phase,
                        gpuscale_operator::reconcile::is_ready(&p),
                        p.metadata.deletion_timestamp.is_some(),
                        unscheduled,
                    ));
                }
            }
            Err(e) => out.push_str(&format!("  (list failed: {e})\n")),
        }
        out.push_str("events (last 15):\n");
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Ok(list) = events.list(&ListParams::default()).await {
            let n = list.items.len();
            for e in list.items.into_iter().skip(n.saturating_sub(15)) {
                out.push_str(&format!(
                    "  {:?} {:?} {:?}: {}\n",
                    e.regarding.and_then(|r| r.name),
                    e.type_,
                    e.reason,
                    e.note.unwrap_or_default()
                ));
            }
        }
        out
    }

    /// Waits for an Event about `name` with `reason`, and returns its note.
    pub async fn wait_event(
        &self,
        name: &str,
        reason: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        self.wait(&format!("a {reason} event"), timeout, || async {
            self.events(name)
                .await
                .ok()?
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))?
                .note
        })
        .await
    }

    /// Waits until `name` has `n` ready replicas and no others (nor terminating pods).
    pub async fn wait_ready(
        &self,
        name: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Pod>> {
        self.wait(
            &format!("{n} ready replicas of {name}"),
            timeout,
            || async {
                let pods = self.pods(name).await.ok()?;
                let settled = pods.len() == n
                    && pods.iter().all(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && gpuscale_operator::reconcile::is_ready(p)
                    });
                settled.then_some(pods)
            },
        )
        .await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_operator();
    }
}

/// The worker's `/metrics` text, scraped from the pod.
pub async fn worker_metrics(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    reqwest::get(format!("http://{ip}:8080/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The worker's own metric `name` (an unlabelled sample), scraped from the pod.
pub async fn worker_metric(pod: &Pod, name: &str) -> Option<f64> {
    let text = worker_metrics(pod).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

/// The example deployment with `change` merged into it (a JSON merge patch).
pub fn smollm(change: Value) -> Value {
    let mut d: Value = serde_yaml::from_str(SMOLLM).expect("the example is valid YAML");
    merge(&mut d, change);
    d
}

/// Acts as the kubelet for model probe pods where no kubelet runs (tests of the control
/// plane alone): each probe is finished as `inference-worker inspect` finishes it, with
/// SmolLM2's header in its termination message. Abort the task to stop.
pub fn answer_probes(
    client: Client,
    namespace: &str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let model =
        std::env::var("GPUSCALE_SMOLLM2_GGUF").context("GPUSCALE_SMOLLM2_GGUF is not set")?;
    let summary = gguf::GgufFile::open(std::path::Path::new(&model))?
        .header()
        .summary()?;
    let message = serde_json::to_string(&summary)?;
    let api: Api<Pod> = Api::namespaced(client, namespace);
    Ok(tokio::spawn(async move {
        let lp = ListParams::default().labels(reconcile::LABEL_PROBE_OF);
        loop {
            for p in api.list(&lp).await.map(|l| l.items).unwrap_or_default() {
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded") {
                    continue;
                }
                let patch = json!({"status": {"phase": "Succeeded", "containerStatuses": [{
                    "name": "inspect", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}}}]}});
                let _ = api
                    .patch_status(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }))
}

/// Merges `b` into `a` as a JSON merge patch does (objects key by key, anything else
/// replaced).
pub fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// The status of condition `kind`, with its reason and message.
pub fn condition(d: &InferenceDeployment, kind: &str) -> Option<(String, String, String)> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Names of pods, sorted.
pub fn names(pods: &[Pod]) -> Vec<String> {
    let mut n: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    n.sort();
    n
}
