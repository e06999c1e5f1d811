//! The InferenceDeployment controller: each pass reads the deployment's pods, the GPU
//! inventory and the workers' load, asks the autoscaler for a replica count, places and
//! creates missing replicas, drains and deletes extra ones, and writes the status.
//!
//! Idempotent and conflict-safe: pod names are deterministic (`<name>-<index>`), so a
//! create that races another (a stale list, a second operator) gets 409 AlreadyExists
//! and changes nothing; any other API error fails the pass, which is retried with
//! backoff. Nothing is deleted because a spec is invalid.

mod plan;
pub mod pods;
mod status;
#[cfg(test)]
mod tests;

pub use plan::{plan, Phase, Replica, Step};
pub use pods::*;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpuscale_crds::{InferenceDeployment, ReplicaPlacement, ReplicaState};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, info_span, warn, Instrument};

use crate::autoscale::{Autoscaler, Direction, Observation, Params};
use crate::estimate::{ModelProfile, GIB, RUNTIME_OVERHEAD_BYTES};
use crate::inventory::{from_gfd_labels, from_gpu_inventory, Inventory};
use crate::metrics::Metrics;
use crate::placement::{self, Engine, Placement, ReplicaId};
use crate::scrape::Scrape;

/// The finalizer that drains a deployment's replicas before it goes.
pub const FINALIZER: &str = "gpuscale.dev/drain-replicas";
/// Field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "gpuscale-operator";

/// Operator settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Image for deployments that keep the default worker image.
    pub worker_image: Option<String>,
    /// Seconds between passes (and metric scrapes) of each deployment.
    pub scrape_interval: Duration,
    /// How long a draining replica may take before it is deleted anyway.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            worker_image: None,
            scrape_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(120),
        }
    }
}

/// What every pass shares.
pub struct Context {
    client: Client,
    config: Config,
    scraper: Arc<dyn Scrape>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    state: Mutex<HashMap<String, DeploymentState>>,
    /// Consecutive failed passes per deployment, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

struct DeploymentState {
    scaler: Autoscaler,
    seen_ready: HashSet<String>,
    last_requests: Option<(Instant, f64)>,
}

impl Context {
    /// A context over `client`.
    pub fn new(
        client: Client,
        config: Config,
        scraper: Arc<dyn Scrape>,
        metrics: Arc<Metrics>,
    ) -> Arc<Context> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            scraper,
            metrics,
            state: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        })
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

/// One pass over `d`.
pub async fn reconcile(d: Arc<InferenceDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
    let started = Instant::now();
    let api: Api<InferenceDeployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let span = info_span!("reconcile", deployment = %key);
    let result = finalizer(&api, FINALIZER, d, |event| async {
        match event {
            Finalizer::Apply(d) => apply(&d, &ctx).await,
            Finalizer::Cleanup(d) => cleanup(&d, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled(started.elapsed(), result.is_ok());
    if result.is_ok() {
        ctx.failures.lock().expect("failures lock").remove(&key);
    }
    result
}

/// Retry with exponential backoff (1 s doubling to 5 min); drains are polled.
pub fn error_policy(d: Arc<InferenceDeployment>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Draining(_) = err {
        return Action::requeue(ctx.config.scrape_interval);
    }
    let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
    warn!(deployment = %key, error = %err, "reconcile failed; retrying");
    let mut failures = ctx.failures.lock().expect("failures lock");
    let n = failures.entry(key).or_default();
    let wait = Duration::from_secs(1u64 << (*n).min(9)).min(Duration::from_secs(300));
    *n += 1;
    Action::requeue(wait)
}

/// Runs the controller until SIGTERM, over `namespaces` (empty: all of them).
pub async fn run(ctx: Arc<Context>, namespaces: Vec<String>) {
    if namespaces.is_empty() {
        return run_one(ctx, None).await;
    }
    // One controller per namespace: a namespaced operator needs no cluster-wide list.
    futures::future::join_all(
        namespaces
            .into_iter()
            .map(|ns| run_one(ctx.clone(), Some(ns))),
    )
    .await;
}

async fn run_one(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (deployments, pods): (Api<InferenceDeployment>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let inventories: Api<gpuscale_crds::GpuInventory> = Api::all(client.clone());
    let controller = Controller::new(deployments, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(
            pods,
            watcher::Config::default()
                .labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
        )
        // A change of inventory can make any deployment placeable.
        .watches(inventories, watcher::Config::default(), move |_| {
            store
                .state()
                .into_iter()
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

/// A replica pod with what the pass learned of it.
struct Seen {
    pod: Pod,
    index: u32,
    phase: Phase,
    outdated: bool,
    placement: Option<PodPlacement>,
    url: Option<String>,
    load: Option<crate::scrape::WorkerLoad>,
    failure: Option<String>,
}

async fn apply(d: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let key = format!("{ns}/{name}");
    let client = &ctx.client;
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let all_pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")))
        .await?;
    let inventories = Api::<gpuscale_crds::GpuInventory>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let (inventory, cpu_nodes) = build_inventory(&inventories.items, &nodes.items, &all_pods.items);

    // Everything already placed, ours and other deployments'.
    let mut engine = Engine::new(&inventory);
    let mut lost: HashMap<String, String> = HashMap::new();
    for pod in &all_pods.items {
        let (Some(p), Some(index), Some(dep)) = (
            placement_of(pod),
            index_of(pod),
            pod.labels().get(LABEL_DEPLOYMENT),
        ) else {
            continue;
        };
        if p.gpus.is_empty() {
            if !cpu_nodes.contains(&p.node) {
                lost.insert(pod.name_any(), format!("node {} is gone", p.node));
            }
            continue;
        }
        let placed = Placement {
            replica: ReplicaId {
                deployment: format!("{}/{dep}", pod.namespace().unwrap_or_default()),
                index,
            },
            node: p.node.clone(),
            gpus: p.gpus.clone(),
            gpu_uuids: p.uuids.clone(),
            bytes_per_gpu: p.bytes_per_gpu,
            exclusive: p.exclusive,
            nvlink: true,
        };
        if let Err(e) = engine.adopt(placed) {
            lost.insert(pod.name_any(), e.to_string());
        }
    }

    let hash = template_hash(d);
    let mut state = ctx
        .state
        .lock()
        .expect("state lock")
        .remove(&key)
        .unwrap_or_else(|| DeploymentState {
            scaler: Autoscaler::new(Params::from_spec(&d.spec.scaling)),
            seen_ready: HashSet::new(),
            last_requests: None,
        });
    state.scaler.set_params(Params::from_spec(&d.spec.scaling));
    let now_wall = jiff::Timestamp::now();
    let mut seen: Vec<Seen> = Vec::new();
    for pod in all_pods.items.iter().filter(|p| owned_by(p, d)) {
        let Some(index) = index_of(pod) else { continue };
        if pod.metadata.deletion_timestamp.is_some() {
            // Terminating (SIGTERM drain); it only keeps its index until it is gone.
            seen.push(Seen {
                pod: pod.clone(),
                index,
                phase: Phase::Draining { timed_out: false },
                outdated: true,
                placement: placement_of(pod),
                url: None,
                load: None,
                failure: None,
            });
            continue;
        }
        let age = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Duration::ZERO, |t| elapsed(t.0, now_wall));
        let mut failure = lost
            .get(&pod.name_any())
            .cloned()
            .or_else(|| pods::failure(pod));
        let phase = if pod.labels().get(LABEL_SERVING).map(String::as_str) == Some("false") {
            let drained = drained_for(pod, now_wall).unwrap_or_default();
            Phase::Draining {
                timed_out: drained > ctx.config.drain_timeout || failure.is_some(),
            }
        } else if failure.is_some() {
            Phase::Failed
        } else if is_ready(pod) {
            Phase::Ready
        } else if state.scaler.is_stuck(age) {
            failure = Some(format!(
                "not ready after {} s (expected about {} s)",
                age.as_secs(),
                state.scaler.ready_time().as_secs()
            ));
            Phase::Failed
        } else {
            Phase::Loading
        };
        let url = worker_url(pod, d.spec.worker.port);
        seen.push(Seen {
            pod: pod.clone(),
            index,
            phase,
            outdated: pod.labels().get(LABEL_TEMPLATE) != Some(&hash),
            placement: placement_of(pod),
            url,
            load: None,
            failure,
        });
    }

    // Scrape ready and draining workers, all at once.
    let scrapes = seen.iter().map(|s| async {
        match (&s.url, s.phase) {
            (Some(url), Phase::Ready | Phase::Draining { .. }) => ctx.scraper.load(url).await.ok(),
            _ => None,
        }
    });
    let loads = futures::future::join_all(scrapes).await;
    for (s, l) in seen.iter_mut().zip(loads) {
        s.load = l;
    }

    // Learn load times from replicas that became ready.
    for s in seen.iter().filter(|s| s.phase == Phase::Ready) {
        let uid = s.pod.uid().unwrap_or_else(|| s.pod.name_any());
        if state.seen_ready.insert(uid) {
            if let Some(took) = ready_took(&s.pod) {
                state.scaler.observe_ready(took);
            }
        }
    }

    let ready: Vec<&Seen> = seen.iter().filter(|s| s.phase == Phase::Ready).collect();
    let loading = seen.iter().filter(|s| s.phase == Phase::Loading).count() as u32;
    let scraped: Vec<f64> = ready
        .iter()
        .filter_map(|s| s.load.map(|l| l.in_flight()))
        .collect();
    let demand = (!scraped.is_empty()).then(|| scraped.iter().sum::<f64>());
    let requests_total: f64 = ready
        .iter()
        .filter_map(|s| s.load.map(|l| l.requests_total))
        .sum();
    let now = Instant::now();
    let request_rate = match state.last_requests.replace((now, requests_total)) {
        Some((t, prev)) if requests_total >= prev && now > t => {
            Some((requests_total - prev) / now.duration_since(t).as_secs_f64())
        }
        _ => None,
    };
    let active = ready.len() as u32 + loading;
    let status = d.status.clone().unwrap_or_default();
    let current = if status.desired_replicas > 0 {
        status.desired_replicas
    } else {
        active.max(d.spec.scaling.min_replicas)
    };
    let scaling = &d.spec.scaling;
    let (desired, decision) = if scaling.autoscale {
        let dec = state.scaler.decide(
            now,
            &Observation {
                demand,
                ready: ready.len() as u32,
                loading,
                current,
            },
        );
        (dec.desired, Some(dec))
    } else {
        (d.spec.replicas.unwrap_or(scaling.min_replicas), None)
    };

    // A spec that cannot be sized or mounted is reported, not acted on.
    let need = match replica_need(d).and_then(|n| match model_volume(&d.spec.model.source) {
        Some(_) => Ok(n),
        None => Err(format!(
            "model.source {} cannot be mounted into the worker yet: use file:// or pvc://",
            d.spec.model.source
        )),
    }) {
        Ok(n) => n,
        Err(message) => {
            ctx.state
                .lock()
                .expect("state lock")
                .insert(key.clone(), state);
            let st = status::invalid(d, &message);
            publish(
                ctx,
                d,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                &message,
            )
            .await;
            patch_status(d, ctx, &st).await?;
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };

    let replicas: Vec<Replica> = seen
        .iter()
        .filter(|s| s.pod.metadata.deletion_timestamp.is_none())
        .map(|s| Replica {
            index: s.index,
            phase: s.phase,
            outdated: s.outdated,
            in_flight: s.load.map(|l| l.in_flight()),
        })
        .collect();
    let mut refusal: Option<placement::Refusal> = None;
    let mut created = Vec::new();
    for step in plan(&replicas, desired, d.spec.rollout.max_surge) {
        match step {
            Step::Create(index) => {
                if refusal.is_some() {
                    continue;
                }
                let req = placement::request(&key, index, &d.spec, need);
                let p = match engine.place(&req) {
                    Ok(p) => PodPlacement {
                        node: p.node,
                        gpus: p.gpus,
                        uuids: p.gpu_uuids,
                        bytes_per_gpu: p.bytes_per_gpu,
                        exclusive: p.exclusive,
                    },
                    Err(r) => match cpu_placement(d, &cpu_nodes, &all_pods.items, &created, need) {
                        Some(p) => p,
                        None => {
                            refusal = Some(r);
                            continue;
                        }
                    },
                };
                let Some(pod) = replica_pod(
                    d,
                    index,
                    &p,
                    ctx.config.worker_image.as_deref(),
                    ctx.config.drain_timeout.as_secs(),
                ) else {
                    continue; // unmountable sources were refused above
                };
                match pods_api.create(&PostParams::default(), &pod).await {
                    Ok(_) => {
                        info!(pod = %pod.name_any(), node = %p.node, gpus = ?p.gpus, "created replica");
                        created.push((index, p));
                    }
                    // Someone (a stale pass, another operator) already made it.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Step::Drain(index) => {
                let name = pod_name(&name, index);
                let patch = drain_patch(now_wall);
                pods_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                info!(pod = %name, "draining replica");
            }
            Step::Delete(index) => {
                let name = pod_name(&name, index);
                let why = seen
                    .iter()
                    .find(|s| s.index == index)
                    .and_then(|s| s.failure.clone());
                if let Some(why) = &why {
                    let note = format!("replica {name} failed: {why}; replacing it");
                    publish(
                        ctx,
                        d,
                        EventType::Warning,
                        "ReplicaFailed",
                        "Replace",
                        &note,
                    )
                    .await;
                }
                match pods_api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => info!(pod = %name, "deleted replica"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    let svc = service(d);
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &ns)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&svc),
        )
        .await?;

    if let Some(dec) = &decision {
        if dec.direction != Direction::Hold {
            let note = format!("{} → {}: {}", current, dec.desired, dec.reason);
            let reason = if dec.direction == Direction::Up {
                "ScaledUp"
            } else {
                "ScaledDown"
            };
            ctx.metrics.scaled(&key, dec.direction);
            publish(ctx, d, EventType::Normal, reason, "Scale", &note).await;
        }
    }
    if let Some(r) = &refusal {
        publish(
            ctx,
            d,
            EventType::Warning,
            "Unschedulable",
            "Place",
            &r.message,
        )
        .await;
    }

    let mut placements: Vec<ReplicaPlacement> = seen
        .iter()
        .filter_map(|s| {
            let state = match s.phase {
                Phase::Loading => ReplicaState::Loading,
                Phase::Ready => ReplicaState::Ready,
                Phase::Draining { .. } => ReplicaState::Draining,
                Phase::Failed => ReplicaState::Failed,
            };
            Some(replica_placement(
                s.pod.name_any(),
                s.placement.as_ref()?,
                state,
            ))
        })
        .collect();
    for (index, p) in &created {
        placements.push(replica_placement(
            pod_name(&name, *index),
            p,
            ReplicaState::Loading,
        ));
    }
    placements.sort_by(|a, b| a.pod.cmp(&b.pod));
    let observed = status::Observed {
        ready: ready.len() as u32,
        active: active + created.len() as u32,
        desired,
        demand,
        request_rate,
        ready_time: state.scaler.ready_time(),
        decision: decision.as_ref(),
        refusal: refusal.as_ref(),
        placements,
    };
    let st = status::build(d, &observed);
    ctx.state.lock().expect("state lock").insert(key, state);
    patch_status(d, ctx, &st).await?;
    Ok(Action::requeue(ctx.config.scrape_interval))
}

/// On deletion: drain every replica, delete each once it is empty, then let the
/// finalizer go (the owner references then collect the Service).
async fn cleanup(d: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = d.namespace().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={}", d.name_any())))
        .await?;
    let mut remaining = 0;
    for pod in pods.items.iter().filter(|p| owned_by(p, d)) {
        if pod.metadata.deletion_timestamp.is_some() {
            remaining += 1;
            continue;
        }
        let name = pod.name_any();
        let serving = pod.labels().get(LABEL_SERVING).map(String::as_str) != Some("false");
        let now = jiff::Timestamp::now();
        if serving && is_ready(pod) {
            let patch = drain_patch(now);
            pods_api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            remaining += 1;
            continue;
        }
        let load = match worker_url(pod, d.spec.worker.port) {
            Some(url) if is_ready(pod) => ctx.scraper.load(&url).await.ok(),
            _ => None,
        };
        let timed_out = drained_for(pod, now).is_some_and(|t| t > ctx.config.drain_timeout);
        if !is_ready(pod) || timed_out || load.is_some_and(|l| l.in_flight() == 0.0) {
            match pods_api.delete(&name, &DeleteParams::default()).await {
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
        }
        remaining += 1;
    }
    if remaining > 0 {
        return Err(Error::Draining(remaining));
    }
    let key = format!("{ns}/{}", d.name_any());
    ctx.state.lock().expect("state lock").remove(&key);
    ctx.metrics.forget(&key);
    info!(deployment = %key, "all replicas drained; releasing");
    Ok(Action::await_change())
}

async fn patch_status(
    d: &InferenceDeployment,
    ctx: &Context,
    st: &gpuscale_crds::InferenceDeploymentStatus,
) -> Result<(), Error> {
    if d.status.as_ref() == Some(st) {
        return Ok(());
    }
    let api: Api<InferenceDeployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": st });
    api.patch_status(
        &d.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    d: &InferenceDeployment,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1024).collect()),
        action: action.into(),
        secondary: None,
    };
    // An event lost is not worth failing the pass for.
    if let Err(e) = ctx.recorder.publish(&ev, &d.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish an event");
    }
}

fn replica_placement(pod: String, p: &PodPlacement, state: ReplicaState) -> ReplicaPlacement {
    ReplicaPlacement {
        pod,
        node: p.node.clone(),
        gpus: p.uuids.clone(),
        vram_reserved_bytes: p.bytes_per_gpu,
        state,
    }
}

/// Time from pod creation to its Ready condition.
fn ready_took(pod: &Pod) -> Option<Duration> {
    let created = pod.metadata.creation_timestamp.as_ref()?.0;
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()?
        .0;
    Some(elapsed(created, ready))
}

/// The inventory placement sees, and the CPU-only nodes. Nodes that are not Ready or
/// are cordoned offer nothing; a node's agent inventory wins over its GFD labels.
fn build_inventory(
    inventories: &[gpuscale_crds::GpuInventory],
    nodes: &[Node],
    pods: &[Pod],
) -> (Inventory, HashSet<String>) {
    let usable = |n: &Node| {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let cordoned = n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        ready && !cordoned
    };
    let usable_nodes: HashMap<String, &Node> = nodes
        .iter()
        .filter(|n| usable(n))
        .map(|n| (n.name_any(), n))
        .collect();
    // Bytes our running replicas reserved per GPU UUID (NVML counts them as used).
    let mut reserved: HashMap<String, u64> = HashMap::new();
    for p in pods.iter().filter_map(placement_of) {
        for u in &p.uuids {
            *reserved.entry(u.clone()).or_default() += p.bytes_per_gpu;
        }
    }
    let mut out = Inventory::default();
    let mut with_gpus: HashSet<String> = HashSet::new();
    for inv in inventories {
        if usable_nodes.contains_key(&inv.spec.node) && !inv.spec.gpus.is_empty() {
            with_gpus.insert(inv.spec.node.clone());
            out.nodes.push(from_gpu_inventory(&inv.spec, &reserved));
        }
    }
    let mut cpu = HashSet::new();
    for (name, n) in &usable_nodes {
        if with_gpus.contains(name) {
            continue;
        }
        let allocatable = n
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get("nvidia.com/gpu"))
            .and_then(|q| q.0.parse().ok());
        match from_gfd_labels(name, n.labels(), allocatable) {
            Some(g) => out.nodes.push(g),
            None => {
                cpu.insert(name.clone());
            }
        }
    }
    (out, cpu)
}

/// Where a replica may run on the CPU backend (`resources.allowCpu`): the CPU node
/// holding the fewest gpuscale replicas.
fn cpu_placement(
    d: &InferenceDeployment,
    cpu_nodes: &HashSet<String>,
    pods: &[Pod],
    created: &[(u32, PodPlacement)],
    need: u64,
) -> Option<PodPlacement> {
    if !d.spec.resources.allow_cpu {
        return None;
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    // Replicas created earlier in this pass count too, so one pass spreads them.
    let placed: Vec<PodPlacement> = pods
        .iter()
        .filter_map(placement_of)
        .chain(created.iter().map(|(_, p)| p.clone()))
        .collect();
    for p in &placed {
        *count.entry(p.node.as_str()).or_default() += 1;
    }
    let load = |n: &str| count.get(n).copied().unwrap_or(0);
    let node = cpu_nodes
        .iter()
        .min_by(|a, b| load(a).cmp(&load(b)).then(a.cmp(b)))?;
    Some(PodPlacement {
        node: node.clone(),
        gpus: Vec::new(),
        uuids: Vec::new(),
        bytes_per_gpu: need,
        exclusive: false,
    })
}

/// Bytes one replica needs on each of its GPUs: from the model file's header when the
/// operator can read it, else from the declared parameter count and weight type.
pub fn replica_need(d: &InferenceDeployment) -> Result<u64, String> {
    let m = &d.spec.model;
    let cfg = placement::replica_config(&d.spec);
    if let Some(path) = m.source.strip_prefix("file://") {
        if let Ok(file) = gguf::GgufFile::open(std::path::Path::new(path)) {
            let profile = ModelProfile::from_gguf(file.header()).map_err(|e| e.to_string())?;
            return profile
                .estimate(&cfg)
                .map(|e| e.per_gpu())
                .map_err(|e| e.to_string());
        }
    }
    let (Some(params), Some(dtype)) = (m.parameters, m.dtype) else {
        return Err(format!(
            "the operator cannot read the model header at {} and spec.model.parameters and \
             spec.model.dtype are not both set; mount the model where the operator can read it \
             or declare them",
            m.source
        ));
    };
    use gpuscale_crds::WeightType as W;
    let bits: u64 = match dtype {
        W::F32 => 32,
        W::F16 | W::Bf16 => 16,
        W::Q8_0 => 9,
        W::Q4_0 => 5,
        W::Q4_1 => 6,
    };
    // Without the shapes, KV bytes per token is bounded from the parameter count:
    // 2·sqrt(params) is above Llama-3 8B (128 KiB), 70B (320 KiB) and SmolLM2 (23 KiB).
    let kv_per_token = 2 * (params as f64).sqrt() as u64;
    let tp = cfg.tensor_parallel.max(1);
    let kv = kv_per_token * cfg.max_sequence_length * cfg.max_batch_size;
    let base = (params * bits / 8 + kv).div_ceil(tp) + RUNTIME_OVERHEAD_BYTES;
    let need = base + base * cfg.headroom_percent / 100;
    Ok(need.max(GIB / 4))
}
