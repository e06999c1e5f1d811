//! The InferenceDeployment controller. Each pass is four steps, each a function:
//!
//! - **observe**: the deployment's replicas, the GPU inventory and the workers' load,
//!   read from reflector caches (no LIST per pass) and one scrape per ready worker;
//! - **decide**: the autoscaler's replica count, the steps that converge to it, and a
//!   placement for each replica to create (pure, over what was observed);
//! - **act**: create, drain and delete pods, apply the Service;
//! - **report**: status (with the autoscaler's memory), conditions and Events.
//!
//! Idempotent and conflict-safe: pod names are deterministic (`<name>-<index>`), so a
//! create that races another (a stale cache, a second operator) gets 409 AlreadyExists
//! and changes nothing; any other API error fails the pass, which is retried with
//! backoff. Nothing is deleted because a spec is invalid, and an object that cannot be
//! read at all is reported and skipped, never a reason to stop reconciling the others.
//!
//! The per-deployment autoscaler state lives in a slot that a pass locks and mutates in
//! place: nothing takes it out, so no error path can lose it. Its memory is also written
//! to status, from which a restarted operator or a new leader restores it.

mod act;
mod cache;
mod decide;
mod events;
mod gate;
mod model;
mod observe;
mod plan;
mod pod_store;
pub mod pods;
mod report;
mod seen;
mod status;
mod stored;
#[cfg(test)]
mod tests;

pub use cache::Cache;
use cache::Writers;
pub use model::{declared_need, probe_pod, LABEL_PROBE_OF};
pub use plan::{plan, Drain, Phase, Replica, Step, Targets, Version};
use seen::WatchedPod;
pub use seen::{ConditionStatus, Facts, PodFacts, SeenNode, SeenPod, SeenService};
pub use stored::Stored;

use act::{act, cleanup};
use decide::decide;
use observe::observe;
pub use pods::*;
use report::{patch_status, publish, publish_to, report};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::inventory::SeenInventory;
use futures::StreamExt;
use gpuscale_crds::InferenceDeployment;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tracing::{info_span, warn, Instrument};

use crate::autoscale::{Autoscaler, Memory, Params};
use crate::metrics::{Metrics, Outcome};
use crate::scrape::Scrape;

/// The finalizer that drains a deployment's replicas before it goes.
pub const FINALIZER: &str = "gpuscale.dev/drain-replicas";
/// Field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "gpuscale-operator";

/// Passes that run at once by default. Bounded, as every Kubernetes controller's work
/// is (kube-controller-manager's `--concurrent-deployment-syncs`, 5; controller-runtime's
/// `MaxConcurrentReconciles`, 1): unbounded, every deployment due at once is a pass in
/// flight holding its futures and queued scrapes (at 1,000 deployments, 58 MB of passes
/// and 25 MB of scrapes waiting for a place, by heaptrack), and a pass that a spec change
/// asks for waits in the scrape queue behind all of them. A pass spends most of its time
/// waiting for its workers' answers, so more run at once than there are cores: 64 keep
/// the scraper's places (`scrape::EXCHANGES`, 128) full at 10 replicas a deployment.
pub const DEFAULT_CONCURRENT_PASSES: u16 = 64;

/// Operator settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Image for deployments that name no worker image.
    pub worker_image: String,
    /// Pull secrets of every worker pod (in its namespace), besides its deployment's.
    pub image_pull_secrets: Vec<String>,
    /// Seconds between passes (and metric scrapes) of each deployment.
    pub scrape_interval: Duration,
    /// Passes that run at once, over all deployments (never two of one deployment).
    pub concurrent_passes: u16,
    /// How long a draining replica may take before it is deleted anyway.
    pub drain_timeout: Duration,
    /// How replica pods reach the node placement chose.
    pub scheduling: Scheduling,
    /// How replica pods get the GPUs placement chose.
    pub binding: BindingConfig,
    /// Where replicas keep http(s) models on their node.
    pub model_cache: ModelCache,
    /// The request routers whose held requests are demand (and whose request counts
    /// tell an idle deployment, for scale to zero).
    pub routers: crate::routers::Sources,
    /// GPU prices by product, for the cost in status and metrics (empty: no cost).
    pub prices: crate::cost::PriceTable,
}

/// Where replicas keep http(s) models: the worker downloads into it before loading,
/// once per node (a file lock), and maps the file where it lies.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCache {
    /// The cache volume.
    pub volume: CacheVolume,
    /// The worker evicts least recently used models beyond this size.
    pub max_bytes: Option<u64>,
    /// Whether `file://` sources (a directory of the node, mounted as a hostPath
    /// volume) are allowed. Off by default: whoever may create an InferenceDeployment
    /// could otherwise mount any directory of any node, and namespaces enforcing the
    /// baseline or restricted Pod Security level refuse such pods anyway. An
    /// administrator turns it on (chart `models.allowHostPath`).
    pub host_path_models: bool,
}

/// The volume of the model cache.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheVolume {
    /// The pod's own scratch space: a download per replica, and pods that pass the
    /// restricted Pod Security level (the default, as KServe's storage initializer).
    EmptyDir,
    /// A directory on each node (created if missing): one download per node.
    HostPath(String),
    /// A PersistentVolumeClaim of this name in each deployment's namespace (for
    /// clusters whose Pod Security level forbids hostPath).
    Claim(String),
}

impl Default for ModelCache {
    fn default() -> Self {
        ModelCache {
            volume: CacheVolume::EmptyDir,
            max_bytes: None,
            host_path_models: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            worker_image: pods::DEFAULT_WORKER_IMAGE.into(),
            image_pull_secrets: Vec::new(),
            scrape_interval: Duration::from_secs(2),
            concurrent_passes: DEFAULT_CONCURRENT_PASSES,
            drain_timeout: Duration::from_secs(120),
            scheduling: Scheduling::default(),
            binding: BindingConfig::default(),
            model_cache: ModelCache::default(),
            routers: crate::routers::Sources::default(),
            prices: crate::cost::PriceTable::default(),
        }
    }
}

/// The GPU binding modes the operator uses. A node's mode comes from what it
/// publishes: ResourceSlices of the DRA driver make it a DRA node (claims name the
/// GPUs); otherwise its GPUs are the device plugin's extended resources.
#[derive(Clone, Debug, PartialEq)]
pub struct BindingConfig {
    /// DRA, where the cluster serves resource.k8s.io/v1 (`None`: never).
    pub dra: Option<DraConfig>,
    /// The extended resource of shared GPUs on device-plugin nodes (`None`: shared
    /// replicas go only to DRA nodes).
    pub sharing_resource: Option<String>,
}

/// Which DRA driver's devices are GPUs, and the DeviceClass claims ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct DraConfig {
    /// Driver name in ResourceSlices (also the domain of its device attributes).
    pub driver: String,
    /// DeviceClass of the claims' requests.
    pub device_class: String,
}

impl Default for BindingConfig {
    /// NVIDIA's DRA driver (driver and DeviceClass `gpu.nvidia.com`) and the NVIDIA
    /// device plugin's renamed sharing resource `nvidia.com/gpu.shared`.
    fn default() -> Self {
        BindingConfig {
            dra: Some(DraConfig {
                driver: crate::inventory::NVIDIA_DRA_DRIVER.into(),
                device_class: crate::inventory::NVIDIA_DRA_DRIVER.into(),
            }),
            sharing_resource: Some("nvidia.com/gpu.shared".into()),
        }
    }
}

/// What replica pods carry for the scheduler. Pods never set `nodeName` (that skips the
/// scheduler: taints, resource fit, volume binding, DRA); they require the chosen node
/// by a node affinity on `metadata.name`, as the DaemonSet controller does
/// (<https://kubernetes.io/docs/concepts/workloads/controllers/daemonset/#how-daemon-pods-are-scheduled>).
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduling {
    /// Tolerations of every replica pod; nodes whose NoSchedule or NoExecute taints
    /// these do not tolerate are not offered to placement.
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// `runtimeClassName` of replica pods (e.g. `nvidia` where the NVIDIA container
    /// runtime is a RuntimeClass).
    pub runtime_class: Option<String>,
    /// `schedulerName` of replica pods (default: the cluster's default scheduler).
    pub scheduler_name: Option<String>,
}

impl Default for Scheduling {
    /// Tolerates `nvidia.com/gpu` (any value), the taint GPU node pools carry on GKE,
    /// AKS and clusters set up by NVIDIA's GPU Operator guides.
    fn default() -> Self {
        Scheduling {
            tolerations: vec![k8s_openapi::api::core::v1::Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }],
            runtime_class: None,
            scheduler_name: None,
        }
    }
}

impl Scheduling {
    /// A toleration from `KEY[=VALUE][:EFFECT]` (no value: `Exists`; no effect: all).
    pub fn parse_toleration(s: &str) -> Result<k8s_openapi::api::core::v1::Toleration, String> {
        let (kv, effect) = match s.rsplit_once(':') {
            Some((kv, e)) => (kv, Some(e)),
            None => (s, None),
        };
        if let Some(e) = effect {
            if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&e) {
                return Err(format!(
                    "toleration {s:?}: effect must be NoSchedule, PreferNoSchedule or NoExecute, not {e:?}"
                ));
            }
        }
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (kv, None),
        };
        if key.is_empty() {
            return Err(format!("toleration {s:?}: the key is empty"));
        }
        Ok(k8s_openapi::api::core::v1::Toleration {
            key: Some(key.into()),
            operator: Some(if value.is_some() { "Equal" } else { "Exists" }.into()),
            value: value.map(String::from),
            effect: effect.map(String::from),
            ..Default::default()
        })
    }
}

/// Where a pass gets the time: the policy is pure, so tests move time forward.
pub trait Clock: Send + Sync {
    /// The monotonic time (for the autoscaler) and the wall time (for status) now.
    fn now(&self) -> (Instant, jiff::Timestamp);
}

/// The system clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> (Instant, jiff::Timestamp) {
        (Instant::now(), jiff::Timestamp::now())
    }
}

/// What every pass shares.
pub struct Context {
    client: Client,
    config: Config,
    scraper: Arc<dyn Scrape>,
    metrics: Arc<Metrics>,
    recorder: events::Recorder,
    cache: Cache,
    /// The cache's writers until `run` starts the watches that feed them.
    writers: Mutex<Option<Writers>>,
    clock: Arc<dyn Clock>,
    /// Per deployment UID; a slot is removed only when its deployment is gone.
    state: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<DeploymentState>>>>>,
    /// Places for the passes that run at once (`Config::concurrent_passes`).
    passes: gate::Gate,
    /// The controllers' stores of deployments (one per namespace watched), for the
    /// deployment as it is when a pass gets its place.
    deployments: Mutex<Vec<reflector::Store<Stored>>>,
    /// Consecutive failed passes per deployment, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Held while a pass places and creates replicas.
    placing: tokio::sync::Mutex<()>,
    /// Which replicas lost their node or GPU (by pod), and when that was worked out:
    /// shared by every pass for `LOST_TTL` (see `Context::lost`).
    lost: Mutex<Option<(Instant, Lost)>>,
    /// For reading `http(s)://` models' headers.
    model_http: reqwest::Client,
    /// What the request routers report (filled by `run` when routers are configured).
    routers: Arc<crate::routers::RouterDemand>,
}

/// What the controller remembers of one deployment between passes.
struct DeploymentState {
    scaler: Autoscaler,
    /// Pods whose ready time was measured; `None` until the first pass has seen them
    /// (a restored state takes the ready time from status and does not count the
    /// replicas already ready again).
    seen_ready: Option<HashSet<String>>,
    /// Measured ready time came from status.
    restored_ready_time: bool,
    /// The count the last pass decided. Authoritative here: the object a pass is handed
    /// can be older than the status the previous pass wrote, and deciding against that
    /// stale count repeats a decision (and its Event). Seeded from status on restore.
    desired: Option<u32>,
    /// Nodes where the scheduler or the kubelet refused a replica of this deployment,
    /// and when:
    /// placement avoids them for `AVOID_REFUSED_NODE`, so a refusal is not retried in a
    /// loop.
    avoid: HashMap<String, Instant>,
    last_requests: Option<(Instant, f64)>,
    /// Generated tokens per second over the cost window.
    tokens: crate::cost::TokenRate,
    /// What the last pass learned of the model (status may lag it).
    model: Option<gpuscale_crds::ModelStatus>,
    /// When status's load figures were last written (see `report`).
    load_written: Option<Instant>,
    /// Replicas downloading the model (by pod UID): bytes so far, and when they last
    /// grew (a download that advances is not a stuck replica).
    downloads: HashMap<String, (f64, Instant)>,
    /// The routers' request count for the deployment, and since when it has not moved
    /// with nothing in flight: idleness, for scale to zero (restarts at zero idleness).
    activity: Option<(f64, Instant)>,
    /// The rollout as the last pass left it (authoritative, as `desired`); seeded from
    /// status, so a restarted operator resumes at the same step.
    rollout: Option<gpuscale_crds::RolloutStatus>,
    /// Where the current rollout step's window began: the routers' counts per version
    /// then. Lost with the process: a restarted operator starts the step's window
    /// again (the step itself is kept).
    window: Option<decide::WindowStart>,
}

/// How long placement avoids a node where the scheduler or kubelet refused a replica.
const AVOID_REFUSED_NODE: Duration = Duration::from_secs(120);

impl DeploymentState {
    /// The state of `d`, restored from the memory its status carries.
    fn restore(d: &InferenceDeployment, now: Instant, wall: jiff::Timestamp) -> Self {
        let params = Params::from_spec(&d.spec.scaling);
        let st = d.status.as_ref();
        let age = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| elapsed(t.0, wall);
        let ready_time = st
            .and_then(|s| s.measured_ready_seconds)
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64);
        let memory = Memory {
            recommendations: st
                .and_then(|s| s.autoscaler.as_ref())
                .map(|m| {
                    m.recommendations
                        .iter()
                        .map(|r| (age(&r.time), r.replicas))
                        .collect()
                })
                .unwrap_or_default(),
            panic_left: st
                .and_then(|s| s.autoscaler.as_ref()?.panic_until.as_ref())
                .map(|t| Duration::try_from(t.0.duration_since(wall)).unwrap_or_default())
                .filter(|d| !d.is_zero()),
            ready_time,
        };
        DeploymentState {
            scaler: Autoscaler::restore(params, &memory, now),
            seen_ready: None,
            restored_ready_time: ready_time.is_some(),
            desired: st.map(|s| s.desired_replicas).filter(|&n| n > 0),
            avoid: HashMap::new(),
            last_requests: None,
            tokens: crate::cost::TokenRate::default(),
            model: None,
            load_written: None,
            downloads: HashMap::new(),
            activity: None,
            rollout: st.and_then(|s| s.rollout.clone()),
            window: None,
        }
    }
}

/// Replicas that lost their node or GPU: why, by pod name.
type Lost = Arc<HashMap<String, String>>;

/// How long one reckoning of lost replicas serves every pass: a lost node is acted on
/// at most this much later, and the reckoning (every pod's placement against the
/// inventory) is made about once a second instead of once per pass of every
/// deployment.
const LOST_TTL: Duration = Duration::from_secs(1);

impl Context {
    /// Which replicas lost their node or GPU: `reckon`'s answer, shared by every pass
    /// for `LOST_TTL`.
    fn lost(&self, now: Instant, reckon: impl FnOnce() -> HashMap<String, String>) -> Lost {
        let mut cached = self.lost.lock().expect("lost lock");
        match cached.as_ref() {
            Some((at, lost)) if now.saturating_duration_since(*at) < LOST_TTL => lost.clone(),
            _ => {
                let lost = Arc::new(reckon());
                *cached = Some((now, lost.clone()));
                lost
            }
        }
    }

    /// A context over `client`, reading through caches that `run` fills from watches.
    pub fn new(
        client: Client,
        config: Config,
        scraper: Arc<dyn Scrape>,
        metrics: Arc<Metrics>,
    ) -> Arc<Context> {
        let (cache, writers) = Cache::watched();
        Self::build(
            client,
            config,
            scraper,
            metrics,
            cache,
            Some(writers),
            Arc::new(SystemClock),
        )
    }

    /// A context over a cache filled by the caller and a clock of its own (tests).
    pub fn with_cache(
        client: Client,
        config: Config,
        scraper: Arc<dyn Scrape>,
        metrics: Arc<Metrics>,
        cache: Cache,
        clock: Arc<dyn Clock>,
    ) -> Arc<Context> {
        Self::build(client, config, scraper, metrics, cache, None, clock)
    }

    fn build(
        client: Client,
        config: Config,
        scraper: Arc<dyn Scrape>,
        metrics: Arc<Metrics>,
        cache: Cache,
        writers: Option<Writers>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Context> {
        let passes = gate::Gate::new(config.concurrent_passes.into());
        Arc::new(Context {
            recorder: events::Recorder::new(
                client.clone(),
                FIELD_MANAGER,
                std::env::var("POD_NAME").ok(),
            ),
            client,
            config,
            scraper,
            metrics,
            cache,
            writers: Mutex::new(writers),
            clock,
            state: Arc::default(),
            passes,
            deployments: Mutex::default(),
            failures: Mutex::new(HashMap::new()),
            placing: tokio::sync::Mutex::new(()),
            lost: Mutex::new(None),
            model_http: crate::model_header::client(model::HTTP_TIMEOUT),
            routers: Arc::default(),
        })
    }

    /// The same context over another client (tests: one mocked API per pass, one state).
    #[cfg(test)]
    fn with_client(&self, client: Client) -> Arc<Context> {
        let mut ctx = Self::build(
            client,
            self.config.clone(),
            self.scraper.clone(),
            self.metrics.clone(),
            self.cache.clone(),
            None,
            self.clock.clone(),
        );
        Arc::get_mut(&mut ctx).expect("fresh").state = self.state.clone();
        ctx
    }

    /// `obj` as the controller's store holds it now (`None`: gone from it, or no
    /// controller runs).
    fn latest(&self, obj: &Stored) -> Option<Arc<Stored>> {
        let stores = self.deployments.lock().expect("deployments lock");
        stores
            .iter()
            .find_map(|store| store.get(&ObjectRef::from_obj(obj)))
    }

    /// The state slot of `d`, created (restored from its status) on first use.
    fn slot(&self, d: &InferenceDeployment) -> Arc<tokio::sync::Mutex<DeploymentState>> {
        let uid = d.uid().unwrap_or_else(|| d.name_any());
        let mut map = self.state.lock().expect("state lock");
        map.entry(uid)
            .or_insert_with(|| {
                let (now, wall) = self.clock.now();
                Arc::new(tokio::sync::Mutex::new(DeploymentState::restore(
                    d, now, wall,
                )))
            })
            .clone()
    }
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Deletion waits for replicas to drain (not a fault; retried shortly).
    #[error("waiting for {0} replica(s) to drain before deletion")]
    Draining(usize),
}

impl Error {
    /// The outcome label of a pass that ended with this error.
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::Draining(_) => Outcome::Draining,
            Error::Kube(kube::Error::Api(e)) => match e.code {
                409 => Outcome::Error("api_conflict"),
                500..=599 => Outcome::Error("api_server_error"),
                _ => Outcome::Error("api_refused"),
            },
            Error::Kube(_) => Outcome::Error("api_unreachable"),
            Error::Finalizer(_) => Outcome::Error("finalizer"),
        }
    }
}

fn key_of(obj: &impl ResourceExt) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// One pass over the object `obj` (an InferenceDeployment as the API serves it).
pub async fn reconcile(obj: Arc<Stored>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(&*obj);
    let span = info_span!("reconcile", deployment = %key, generation = obj.metadata.generation);
    async move {
        ctx.cache.ready().await;
        // A place among the passes that run at once (`gate`): a changed deployment
        // before the periodic passes, each in the order asked.
        let asked = Instant::now();
        let _place = ctx
            .passes
            .enter_as(|| gate::class_of(&ctx.latest(&obj).unwrap_or_else(|| obj.clone())))
            .await;
        // The deployment as it is now: a spec change made while this pass waited is
        // acted on in this pass, not after one more wait.
        let obj = ctx.latest(&obj).unwrap_or(obj);
        // Boxed: kube-runtime spawns a task per pass asked, a thousand wait at the gate
        // at fleet scale, and a task's cell is sized for its future's largest state
        // (inline, 10 KB a waiting pass).
        Box::pin(pass(obj, &ctx, key, asked)).await
    }
    .instrument(span)
    .await
}

/// The pass itself, once it has its place.
async fn pass(
    obj: Arc<Stored>,
    ctx: &Arc<Context>,
    key: String,
    asked: Instant,
) -> Result<Action, Error> {
    let started = Instant::now();
    tracing::debug!(
        waited_ms = started.duration_since(asked).as_millis() as u64,
        "pass placed"
    );
    let d = match obj.read() {
        Ok(d) => Arc::new(pods::with_image(d, &ctx.config)),
        Err(why) => {
            unreadable(&obj, &why, ctx).await;
            ctx.metrics
                .reconciled(started.elapsed(), Outcome::Unreadable);
            // Retried when it changes (a fixed spec), and now and then meanwhile.
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    let api: Api<InferenceDeployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let result = async {
        let Some(d) = with_finalizer_seen(&api, d, &ctx.config).await? else {
            // Deleted meanwhile: its deletion event brings the last pass.
            return Ok(Action::await_change());
        };
        finalizer(&api, FINALIZER, d, |event| async {
            match event {
                Finalizer::Apply(d) => apply(&d, ctx).await,
                Finalizer::Cleanup(d) => Box::pin(cleanup(&d, ctx)).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(Box::new(other)),
        })
    }
    .await;
    let outcome = match &result {
        Ok(_) => Outcome::Ok,
        Err(e) => e.outcome(),
    };
    ctx.metrics.reconciled(started.elapsed(), outcome);
    if result.is_ok() {
        ctx.failures.lock().expect("failures lock").remove(&key);
    }
    result
}

/// `d`, or where the cached copy lacks the finalizer, the copy the API server holds
/// now (`None`: deleted). kube-runtime's `finalizer` adds a missing finalizer with a
/// JSON patch that first tests `/metadata/finalizers` against the copy it was given;
/// a pass that runs on a cache the watch has not yet brought up to date (its own
/// finalizer patch not yet seen, or a write answered 500 after it was applied) would
/// fail that test with 422 ("value did not match") and retry on the same stale copy.
/// One GET per such pass (a new object, in the main) avoids it.
async fn with_finalizer_seen(
    api: &Api<InferenceDeployment>,
    d: Arc<InferenceDeployment>,
    config: &Config,
) -> Result<Option<Arc<InferenceDeployment>>, Error> {
    if d.finalizers().iter().any(|f| f == FINALIZER) || d.meta().deletion_timestamp.is_some() {
        return Ok(Some(d));
    }
    Ok(api
        .get_opt(&d.name_any())
        .await?
        .map(|fresh| Arc::new(pods::with_image(fresh, config))))
}

/// Reports an object that does not deserialize (stored before a CRD change, or written
/// around validation): a log line, a Warning Event on it, the metric. Nothing else.
async fn unreadable(obj: &Stored, why: &str, ctx: &Context) {
    let key = key_of(obj);
    warn!(deployment = %key, error = %why, "skipping an InferenceDeployment that cannot be read");
    let reference = obj.object_ref(&());
    let note = format!(
        "this InferenceDeployment cannot be read ({why}); it is skipped until it is fixed, and \
         nothing it owns is touched"
    );
    publish_to(
        ctx,
        &reference,
        EventType::Warning,
        "Unreadable",
        "Read",
        &note,
    )
    .await;
}

/// Retry with exponential backoff (1 s doubling to 5 min); drains are polled.
pub fn error_policy(obj: Arc<Stored>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Draining(_) = err {
        return Action::requeue(ctx.config.scrape_interval);
    }
    let key = key_of(&*obj);
    warn!(deployment = %key, error = %err, "reconcile failed; retrying");
    let mut failures = ctx.failures.lock().expect("failures lock");
    let n = failures.entry(key).or_default();
    let wait = Duration::from_secs(1u64 << (*n).min(9)).min(Duration::from_secs(300));
    *n += 1;
    Action::requeue(wait)
}

/// Runs the controller until SIGTERM, over `namespaces` (empty: all of them). Pods,
/// Services and claims are watched in those namespaces only, nodes, inventories and
/// ResourceSlices cluster-wide; every namespace's controller reads all the stores, so
/// placement counts the GPUs of every replica it manages.
pub async fn run(ctx: Arc<Context>, namespaces: Vec<String>) {
    let Some(mut writers) = ctx.writers.lock().expect("writers lock").take() else {
        tracing::error!("the controller is already running on this context");
        return;
    };
    let client = ctx.client.clone();
    // DRA only where the cluster serves it: a watch of an API that is not there would
    // keep the stores from ever being ready, and every pass waits for them.
    let dra = match &ctx.config.binding.dra {
        Some(_) => dra_served(&client).await,
        None => false,
    };
    if !dra {
        writers.without_dra();
    }
    if ctx.config.routers.any() {
        tokio::spawn(crate::routers::run(
            ctx.config.routers.clone(),
            client.clone(),
            crate::model_header::client(ctx.config.scrape_interval),
            ctx.config.scrape_interval.min(Duration::from_secs(1)),
            ctx.routers.clone(),
        ));
    }
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let metrics = ctx.metrics.clone();
    let managed =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    // Per namespace (or one for all): its controller, and the watches of the
    // namespaced kinds, each feeding that namespace's stores in the cache.
    let mut controllers = Vec::new();
    let mut scoped_feeds = Vec::new();
    for ns in scopes {
        let mut w = ctx.cache.scope();
        let inventories = writers
            .inventories
            .subscribe()
            .expect("the inventory store is shared");
        // Each pod event wakes its controller's deployment (as `Controller::owns`).
        let (pod_events, triggers) = futures::channel::mpsc::unbounded();
        controllers.push(controller(ctx.clone(), ns.clone(), triggers, inventories));
        if !dra {
            w.without_dra();
        }
        let client = client.clone();
        let (managed, metrics) = (managed.clone(), metrics.clone());
        let cache = ctx.cache.clone();
        scoped_feeds.push(async move {
            let cache::ScopeWriters {
                pods,
                services,
                claims,
            } = w;
            let health = metrics.clone();
            let pods = watcher::watcher(scoped::<WatchedPod>(&client, &ns), managed.clone())
                .default_backoff()
                .for_each(move |e| {
                    health.health().watched("pods", e.is_ok(), Instant::now());
                    if let Ok(e) = e {
                        if let Some(pod) = pods.apply(e) {
                            // After the store has the event: see `Cache::observed`.
                            cache.observed(&pod);
                            if let Some(owner) = owner_of(&pod) {
                                let _ = pod_events.unbounded_send(owner);
                            }
                        }
                    }
                    std::future::ready(())
                });
            let services = reflector::reflector(
                services,
                watcher::watcher(scoped::<SeenService>(&client, &ns), managed.clone())
                    .modify(SeenService::slim),
            );
            let claims = async {
                if dra {
                    reflector::reflector(claims, watcher::watcher(scoped(&client, &ns), managed))
                        .default_backoff()
                        .for_each(watched(metrics.clone(), "resourceclaims"))
                        .await;
                }
            };
            futures::join!(
                pods,
                services
                    .default_backoff()
                    .for_each(watched(metrics.clone(), "services")),
                claims,
            );
        });
    }
    let nodes = reflector::reflector(
        writers.nodes,
        watcher::watcher(
            Api::<SeenNode>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(SeenNode::slim),
    );
    let inventories = reflector::reflector(
        writers.inventories,
        watcher::watcher(
            Api::<SeenInventory>::all(client.clone()),
            watcher::Config::default(),
        ),
    );
    let slice_writer = writers.slices;
    let slices = async {
        if dra {
            reflector::reflector(
                slice_writer,
                watcher::watcher(
                    Api::<ResourceSlice>::all(client.clone()),
                    Default::default(),
                ),
            )
            .default_backoff()
            .for_each(watched(metrics.clone(), "resourceslices"))
            .await;
        }
    };
    let feed = async {
        futures::join!(
            futures::future::join_all(scoped_feeds),
            nodes
                .default_backoff()
                .for_each(watched(metrics.clone(), "nodes")),
            inventories
                .default_backoff()
                .for_each(watched(metrics.clone(), "gpuinventories")),
            slices,
        );
    };
    let synced = async {
        ctx.cache.ready().await;
        metrics.health().set_synced();
        futures::future::pending::<()>().await;
    };
    tokio::select! {
        _ = futures::future::join_all(controllers) => {}
        () = feed => {}
        () = synced => {}
    }
}

/// The API of a namespaced kind in namespace `ns`, or in all of them.
fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The deployment a pod event wakes: its controller, where that is an
/// InferenceDeployment (as kube-runtime's `Controller::owns` maps a child to its owner).
fn owner_of(pod: &SeenPod) -> Option<ObjectRef<Stored>> {
    let c = pod.controller()?;
    let kind = <InferenceDeployment as kube::Resource>::kind(&());
    let api_version = <InferenceDeployment as kube::Resource>::api_version(&());
    let namespace = pod.namespace_str()?;
    (*c.kind == *kind && *c.api_version == *api_version)
        .then(|| ObjectRef::new(&c.name).within(namespace))
}

/// Feeds each event of the watch `name` to the operator's health (`/healthz`).
fn watched<T>(
    metrics: Arc<Metrics>,
    name: &'static str,
) -> impl FnMut(Result<T, watcher::Error>) -> std::future::Ready<()> {
    move |e| {
        metrics.health().watched(name, e.is_ok(), Instant::now());
        std::future::ready(())
    }
}

/// What the deployment store keeps of an InferenceDeployment: no managed fields (on
/// a real API server, one entry per writer, each a tree of every field it set: the
/// operator's status writes alone mirror the whole status) and no copy of the last
/// `kubectl apply`'s input (`kubectl.kubernetes.io/last-applied-configuration`, the
/// whole object again as a string). Nothing here reads either, and nothing writes a
/// stored deployment back whole.
fn slim_deployment(d: &mut Stored) {
    d.managed_fields_mut().clear();
    d.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// Whether the API server serves DRA's resource.k8s.io/v1 (GA in Kubernetes 1.34).
async fn dra_served(client: &Client) -> bool {
    match client.list_api_group_resources("resource.k8s.io/v1").await {
        Ok(list) => ["resourceslices", "resourceclaims"]
            .iter()
            .all(|r| list.resources.iter().any(|x| x.name == *r)),
        Err(e) => {
            tracing::warn!(error = %e, "resource.k8s.io/v1 is not served: DRA is off, GPUs are bound through the device plugin only");
            false
        }
    }
}

async fn controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    pods: futures::channel::mpsc::UnboundedReceiver<ObjectRef<Stored>>,
    inventories: reflector::ReflectHandle<SeenInventory>,
) {
    let client = ctx.client.clone();
    // Kept as text until a pass reads it (`Stored`), so that one object that does not
    // fit the type cannot fail the list that carries all the others.
    let deployments: Api<Stored> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    // The controller's own reflector, as `Controller::new` makes it, with what a pass
    // never reads left out of the store (`slim_deployment`).
    let writer = reflector::store::Writer::<Stored>::default();
    let store = writer.as_reader();
    let deployments = reflector::reflector(
        writer,
        watcher::watcher(deployments, watcher::Config::default()).modify(slim_deployment),
    )
    .applied_objects();
    let controller = Controller::for_stream(deployments, store.clone());
    ctx.deployments
        .lock()
        .expect("deployments lock")
        .push(store.clone());
    controller
        .reconcile_on(pods)
        // A change of inventory can make a deployment that waits for capacity
        // placeable. Only those are woken: node agents publish often, and waking every
        // deployment on each publish made the work grow as nodes times deployments.
        // (Every deployment is requeued each scrape interval anyway.)
        .watches_shared_stream(inventories, move |_| {
            store
                .state()
                .into_iter()
                .filter(|d| d.waits_for_capacity())
                .map(|d| ObjectRef::from_obj(&*d))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

async fn apply(d: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    if let Some(n) = d.spec.resources.tensor_parallel.filter(|n| *n > 1) {
        // Stored before the rename; the API server refuses it on any new write. (1 was
        // the old schema's default, in every object stored then: it asks for nothing.)
        let message = format!(
            "resources.tensorParallel was renamed resources.gpusPerReplica: a replica's GPUs split the model by layers, not tensors; set gpusPerReplica: {n} and remove tensorParallel"
        );
        return Box::pin(invalid(d, ctx, &message)).await;
    }
    let slot = ctx.slot(d);
    // Held for the whole pass, mutated in place: an error anywhere leaves it as it is.
    let mut state = slot.lock().await;
    let (now, wall) = ctx.clock.now();
    // Each step's future is boxed: a pass's future holds only the step under way, not
    // the largest of them all. A thousand passes wait on their scrapes at once at
    // fleet scale, and with the steps inline each held 28 KB (`heaptrack`: about
    // 58 MB of the operator's 211 MB peak heap at 10,000 pods).
    let world = Box::pin(observe(d, ctx, &mut state, now, wall)).await;
    let sized = Box::pin(model::size(d, ctx, state.model.as_ref(), wall)).await?;
    let (need, d) = match sized {
        model::Sizing::Sized { need, model } => {
            state.model = Some(model.clone());
            (need, Box::pin(with_model(d, ctx, model)).await?)
        }
        model::Sizing::Probing(message) => {
            Box::pin(patch_status(
                d,
                ctx,
                &status::progressing(d, "ReadingModel", &message),
            ))
            .await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        model::Sizing::Unsized { message, model } => {
            state.model.clone_from(&model);
            let d = match model {
                Some(m) => Box::pin(with_model(d, ctx, m)).await?,
                None => std::borrow::Cow::Borrowed(d),
            };
            Box::pin(model::remove_probes(&d, ctx)).await?;
            return Box::pin(invalid(&d, ctx, &message)).await;
        }
    };
    Box::pin(model::remove_probes(&d, ctx)).await?;
    if let Err(message) = mountable(&d, &ctx.config) {
        return Box::pin(invalid(&d, ctx, &message)).await;
    }
    Box::pin(place_and_report(
        &d,
        ctx,
        &mut state,
        world,
        need,
        (now, wall),
    ))
    .await
}

/// Decide, act and report: the second half of a pass, once the model is sized.
async fn place_and_report(
    d: &InferenceDeployment,
    ctx: &Context,
    state: &mut DeploymentState,
    world: observe::World,
    need: u64,
    (now, wall): (Instant, jiff::Timestamp),
) -> Result<Action, Error> {
    // Placing and creating is one critical section across every deployment's passes
    // (the controller runs them concurrently): the ledger is rebuilt from the cache
    // and the pods created so far, so two passes never choose the same free GPU.
    let placing = ctx.placing.lock().await;
    let owned = ctx.cache.owned(&d.uid().unwrap_or_default());
    let mut ledger =
        observe::LazyLedger::new(|| observe::ledger(ctx, &ctx.cache.pods(), &world.corrections));
    let decided = decide(d, state, &world, &mut ledger, &owned, need, (now, wall));
    drop(ledger);
    let (created, acted) = Box::pin(act(d, ctx, &world, &decided, wall)).await;
    drop(placing);
    // Report even after a failed step: status then says what was decided and done, and
    // the autoscaler's memory is saved whatever happened.
    let reported = Box::pin(report(d, ctx, state, &world, &decided, &created, now, wall)).await;
    acted?;
    reported?;
    Ok(Action::requeue(ctx.config.scrape_interval))
}

/// `d` with `status.model` set to what sizing found, written to the API when it changed
/// (every status a pass builds from `d` then keeps it).
async fn with_model<'a>(
    d: &'a InferenceDeployment,
    ctx: &Context,
    model: gpuscale_crds::ModelStatus,
) -> Result<std::borrow::Cow<'a, InferenceDeployment>, Error> {
    if d.status.as_ref().and_then(|s| s.model.as_ref()) == Some(&model) {
        return Ok(std::borrow::Cow::Borrowed(d));
    }
    let api: Api<InferenceDeployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": { "model": &model } });
    api.patch_status(
        &d.name_any(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    let mut d = d.clone();
    d.status.get_or_insert_with(Default::default).model = Some(model);
    Ok(std::borrow::Cow::Owned(d))
}

/// A spec that cannot be sized or mounted is reported, not acted on.
async fn invalid(d: &InferenceDeployment, ctx: &Context, message: &str) -> Result<Action, Error> {
    publish(
        ctx,
        d,
        EventType::Warning,
        "InvalidSpec",
        "Validate",
        message,
    )
    .await;
    patch_status(d, ctx, &status::invalid(d, message)).await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn mountable(d: &InferenceDeployment, config: &Config) -> Result<(), String> {
    if d.spec.model.source.starts_with("file://") && !config.model_cache.host_path_models {
        return Err(format!(
            "model.source {} is a directory of the node, and this operator does not mount \
             node directories (an administrator allows it with the chart value \
             models.allowHostPath=true): use pvc://<claim>/<path> or an http(s):// URL",
            d.spec.model.source
        ));
    }
    match model_mount(&d.spec.model, &config.model_cache) {
        Some(_) => Ok(()),
        None => Err(format!(
            "model.source {} cannot be mounted into the worker: use file:///path, \
             pvc://<claim>/<path> or an http(s):// URL",
            d.spec.model.source
        )),
    }
}
