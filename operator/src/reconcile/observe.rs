//! Observe: what exists and how loaded it is, from the caches and the workers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuscale_crds::InferenceDeployment;
use k8s_openapi::api::core::v1::{Taint, Toleration};
use kube::ResourceExt;

use super::pods::{self, *};
use super::{
    ConditionStatus, Context, DeploymentState, Drain, Phase, PodFacts, Replica, SeenNode, SeenPod,
    Version,
};
use crate::autoscale::Params;
use crate::inventory::{
    from_gfd_labels, from_gpu_inventory, from_resource_slices, Binding, Inventory, NodeGpus,
    SeenInventory, SeenInventorySpec,
};
use crate::placement::{Engine, Placement, Present, ReplicaId};
use crate::scrape::WorkerLoad;
use k8s_openapi::api::resource::v1::ResourceSlice;

/// A replica pod with what the pass learned of it.
pub(super) struct Seen {
    pub(super) pod: Arc<SeenPod>,
    pub(super) index: u32,
    pub(super) phase: Phase,
    pub(super) outdated: bool,
    /// The version it runs (its pod-template hash label).
    pub(super) revision: Option<String>,
    pub(super) placement: Option<PodPlacement>,
    pub(super) load: Option<WorkerLoad>,
    pub(super) failure: Option<String>,
}

impl Seen {
    /// The replica the plan reads, as running `version`: its exit priority is set
    /// later, where a scale-down asks for one.
    pub(super) fn replica(&self, version: Version) -> Replica {
        Replica {
            index: self.index,
            phase: self.phase,
            version,
            in_flight: self.load.as_ref().map(WorkerLoad::in_flight),
            exit_priority: 0,
        }
    }
}

/// What one pass observed of its deployment. (What the whole cluster holds is the
/// `Ledger`, built again under the placement lock when the pass places.)
pub(super) struct World {
    /// This deployment's replicas.
    pub(super) seen: Vec<Seen>,
    pub(super) ready: u32,
    pub(super) loading: u32,
    /// Waiting plus running requests over the ready replicas (`None`: none scraped).
    pub(super) demand: Option<f64>,
    /// Placements corrected to what the device plugin assigned: (pod, placement).
    pub(super) corrections: Vec<(String, PodPlacement)>,
    /// Replicas the scheduler refused, or the chosen node's kubelet at admission: (the
    /// node placement chose, who refused and why).
    pub(super) refusals: Vec<(String, String)>,
    /// Pending DRA replicas whose ResourceClaim is missing (the operator stopped between
    /// creating the pod and its claim): `act` makes them.
    pub(super) missing_claims: Vec<(Arc<SeenPod>, PodPlacement)>,
    pub(super) request_rate: Option<f64>,
    /// Generated tokens per second over the cost window.
    pub(super) tokens_per_second: Option<f64>,
    /// Replicas fetching the model into their node's cache.
    pub(super) downloads: Vec<Download>,
    /// Nodes holding the model (a ready replica of the current spec runs there).
    pub(super) warm_nodes: HashSet<String>,
    /// How long the deployment has had no request (`None`: not known).
    pub(super) idle_for: Option<Duration>,
    /// Whether request routers carry the traffic.
    pub(super) routed: bool,
    /// What the routers saw of each version, cumulative (`None`: no complete reading).
    pub(super) versions: Option<HashMap<String, crate::routers::VersionCounts>>,
}

/// A replica fetching an http(s) model.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Download {
    pub(super) pod: String,
    pub(super) done: f64,
    pub(super) total: f64,
    /// First seen by this pass.
    pub(super) started: bool,
}

impl Download {
    /// `smollm-0: 45% of 96.6 MB`.
    pub(super) fn describe(&self) -> String {
        format!(
            "{}: {:.0}% of {:.1} MB",
            self.pod,
            100.0 * self.done / self.total,
            self.total / 1e6
        )
    }
}

/// Whether `pod`'s model download advanced within the ready timeout's floor.
fn downloading_lately(state: &DeploymentState, pod: &SeenPod, now: Instant) -> bool {
    let uid = pod.uid().unwrap_or_else(|| pod.name_any());
    state
        .downloads
        .get(&uid)
        .is_some_and(|&(_, at)| now.duration_since(at) < crate::autoscale::READY_TIMEOUT_FLOOR)
}

/// Observe: the deployment's replicas and their phases, the inventory with every
/// existing placement, and the workers' load.
pub(super) async fn observe(
    d: &InferenceDeployment,
    ctx: &Context,
    state: &mut DeploymentState,
    now: Instant,
    wall: jiff::Timestamp,
) -> World {
    // Only which replicas lost their node or GPU; placing uses a fresh ledger.
    let lost = ctx.lost(now, || self::lost(ctx, &ctx.cache.pods()));

    state.scaler.set_params(Params::from_spec(&d.spec.scaling));
    let hash = template_hash(d);
    let mut seen: Vec<Seen> = Vec::new();
    let mut refusals: Vec<(String, String)> = Vec::new();
    let mut maybe_stuck: Vec<(usize, String)> = Vec::new();
    for pod in &ctx.cache.owned(&d.uid().unwrap_or_default()) {
        let Some(index) = index_of(pod) else { continue };
        let refused = pods::unschedulable(pod);
        let by_node = pods::refused_at_admission(pod);
        if let Some(p) = placement_of(pod) {
            if let Some(message) = &refused {
                let why = format!("the scheduler refused {}: {message}", pod.name_any());
                refusals.push((p.node.clone(), why));
            }
            if let Some(message) = &by_node {
                let why = format!(
                    "the kubelet of {} refused {}: {message}",
                    p.node,
                    pod.name_any()
                );
                refusals.push((p.node, why));
            }
        }
        let failure = lost
            .get(&pod.name_any())
            .cloned()
            .or_else(|| pods::failure(pod))
            .or_else(|| refused.map(|m| format!("the scheduler cannot place it: {m}")));
        let phase = if pod.deletion_timestamp().is_some() {
            // Terminating (SIGTERM drain); it only keeps its index until it is gone.
            Phase::Draining(Drain::Out)
        } else if pod.labels().get(LABEL_SERVING) == Some("false") {
            match failure {
                Some(_) => Phase::Draining(Drain::TimedOut),
                None => Phase::Draining(drain_stage(pod, wall, ctx.config.drain_timeout)),
            }
        } else if failure.is_some() {
            Phase::Failed
        } else if is_ready(pod) {
            Phase::Ready
        } else {
            let age = pod
                .creation_timestamp()
                .map_or(Duration::ZERO, |t| elapsed(t.0, wall));
            // Failed unless its model download advances (known once the workers are
            // scraped below): a long download is not a stuck replica.
            if state.scaler.is_stuck(age) {
                maybe_stuck.push((
                    seen.len(),
                    format!(
                        "not ready after {} s (expected about {} s)",
                        age.as_secs(),
                        state.scaler.ready_time().as_secs()
                    ),
                ));
            }
            Phase::Loading
        };
        seen.push(Seen {
            pod: pod.clone(),
            index,
            phase,
            outdated: pod.deletion_timestamp().is_some()
                || pod.labels().get(LABEL_TEMPLATE) != Some(hash.as_str()),
            revision: pod.labels().get(LABEL_TEMPLATE).map(String::from),
            placement: placement_of(pod),
            load: None,
            failure,
        });
    }

    // Scrape ready, draining and loading workers, all at once (a loading worker
    // answers /metrics while it fetches and loads the model).
    let port = d.spec.worker.port;
    let scrapes = seen.iter().map(|s| async move {
        let url = worker_url(&s.pod, port)?;
        let live = s.pod.deletion_timestamp().is_none();
        match s.phase {
            Phase::Ready | Phase::Draining(_) | Phase::Loading if live => {
                ctx.scraper.load(&url).await.ok()
            }
            _ => None,
        }
    });
    let loads = futures::future::join_all(scrapes).await;
    for (s, l) in seen.iter_mut().zip(loads) {
        s.load = l;
    }
    // Downloads under way, and when each last advanced.
    let mut downloads = Vec::new();
    let mut progress = HashMap::new();
    for s in seen.iter().filter(|s| s.phase == Phase::Loading) {
        let Some((done, total)) = s.load.as_ref().and_then(|l| l.startup.downloading()) else {
            continue;
        };
        let uid = s.pod.uid().unwrap_or_else(|| s.pod.name_any());
        let before = state.downloads.get(&uid).copied();
        let advanced = match before {
            Some((bytes, at)) if bytes >= done => at,
            _ => now,
        };
        progress.insert(uid, (done, advanced));
        downloads.push(Download {
            pod: s.pod.name_any(),
            done,
            total,
            started: before.is_none(),
        });
    }
    state.downloads = progress;
    for (i, message) in maybe_stuck {
        if !downloading_lately(state, &seen[i].pod, now) {
            seen[i].phase = Phase::Failed;
            seen[i].failure = Some(message);
        }
    }

    // What the device plugin really assigned, where the kubelet (the node agent's
    // PodResources listing) or else the worker reports other GPUs than placement
    // recorded: the placement is corrected (and written back by `act`).
    let inventories = ctx.cache.inventories();
    let ns = d.namespace().unwrap_or_default();
    let mut corrections = Vec::new();
    for s in seen.iter_mut() {
        let Some(p) = s.placement.as_ref().filter(|p| !p.gpus.is_empty()) else {
            continue;
        };
        let listed = inventories
            .iter()
            .filter(|i| i.spec.node == p.node)
            .flat_map(|i| &i.spec.assignments)
            .find(|a| a.namespace == ns && a.pod == s.pod.name_any())
            .map(|a| a.gpus.clone());
        let reported = s.load.as_ref().map(|l| l.gpus.clone());
        let Some(truth) = listed.or(reported).filter(|g| !g.is_empty()) else {
            continue;
        };
        let mut recorded = p.uuids.clone();
        recorded.sort();
        if recorded == truth {
            continue;
        }
        let fixed = assigned(p, &truth, &inventories);
        tracing::info!(pod = %s.pod.name_any(), chose = ?p.uuids, assigned = ?truth,
                       "the device plugin assigned other GPUs than placement chose; following it");
        corrections.push((s.pod.name_any(), fixed.clone()));
        s.placement = Some(fixed);
    }

    // Learn load times from replicas that became ready, and how each start was spent.
    // A state restored with a measured time does not count the replicas that were
    // ready before it again.
    let first = state.seen_ready.is_none();
    let known = state.seen_ready.get_or_insert_with(HashSet::new);
    for s in seen.iter().filter(|s| s.phase == Phase::Ready) {
        let uid = s.pod.uid().unwrap_or_else(|| s.pod.name_any());
        if known.insert(uid) && !(first && state.restored_ready_time) {
            if let Some(took) = ready_took(&s.pod) {
                // Whether the model was in the node's cache: only an http(s) model is
                // fetched, so only its starts are warm or cold.
                let warm = fetched(d)
                    .then(|| s.load.as_ref().map(|l| l.startup.cache_hit))
                    .flatten();
                state.scaler.observe_start(took, warm);
                let start = cold_start(&s.pod, took, s.load.as_ref());
                tracing::info!(pod = %s.pod.name_any(), ?start, "replica ready");
                ctx.metrics.started(&super::key_of(d), &start);
            }
        }
    }

    let missing_claims = seen
        .iter()
        .filter(|s| s.pod.deletion_timestamp().is_none() && s.pod.uid().is_some())
        .filter(|s| {
            s.pod
                .spec
                .as_ref()
                .and_then(|p| p.node_name.as_ref())
                .is_none()
        })
        .filter_map(|s| Some((s.pod.clone(), s.placement.clone().filter(|p| p.dra)?)))
        .filter(|(pod, _)| !ctx.cache.has_claim(&ns, &claim_name(&pod.name_any())))
        .collect();

    // Nodes that hold the model now: those with a ready replica of the current spec
    // (the cache file outlives the replica, but not necessarily eviction).
    let warm_nodes = seen
        .iter()
        .filter(|s| s.phase == Phase::Ready && !s.outdated)
        .filter_map(|s| Some(s.placement.as_ref()?.node.clone()))
        .collect();
    let ready = seen.iter().filter(|s| s.phase == Phase::Ready);
    let scraped: Vec<&WorkerLoad> = ready.clone().filter_map(|s| s.load.as_ref()).collect();
    let ready_count = ready.clone().count();
    let on_workers: Option<f64> =
        (!scraped.is_empty()).then(|| scraped.iter().map(|l| l.in_flight()).sum());
    let routed = ctx
        .config
        .routers
        .any()
        .then(|| ctx.routers.get(&ns, &d.name_any(), now))
        .flatten();
    let (demand, idle_for) = demand_and_idleness(state, on_workers, ready_count, routed, now);
    let requests_total: f64 = scraped.iter().map(|l| l.requests_total).sum();
    let request_rate = match state.last_requests.replace((now, requests_total)) {
        Some((t, prev)) if requests_total >= prev && now > t => {
            Some((requests_total - prev) / now.duration_since(t).as_secs_f64())
        }
        _ => None,
    };
    let generated: f64 = scraped.iter().map(|l| l.generated_tokens_total).sum();
    let tokens_per_second = state.tokens.observe(now, generated);
    World {
        tokens_per_second,
        corrections,
        refusals,
        missing_claims,
        downloads,
        warm_nodes,
        ready: ready_count as u32,
        loading: seen.iter().filter(|s| s.phase == Phase::Loading).count() as u32,
        seen,
        demand,
        request_rate,
        idle_for,
        routed: ctx.config.routers.any(),
        versions: ctx
            .config
            .routers
            .any()
            .then(|| ctx.routers.versions(&ns, &d.name_any(), now))
            .flatten(),
    }
}

/// Demand: what the workers hold plus what the routers hold for want of a replica; and
/// how long the deployment has had no request (`None` when not known: no router, or a
/// ready replica that could not be scraped).
pub(super) fn demand_and_idleness(
    state: &mut DeploymentState,
    on_workers: Option<f64>,
    ready: usize,
    routed: Option<crate::routers::Reported>,
    now: Instant,
) -> (Option<f64>, Option<Duration>) {
    let demand = match (on_workers, routed) {
        (Some(w), r) => Some(w + r.map_or(0.0, |r| r.held)),
        // No replica to scrape: the routers' count is all the demand there is.
        (None, Some(r)) if ready == 0 => Some(r.held),
        (None, _) => None,
    };
    let idle_for = routed.and_then(|r| {
        let workers_busy = match on_workers {
            Some(w) => w > 0.0,
            None if ready == 0 => false,
            // A ready replica that could not be read may be busy.
            None => return None,
        };
        let busy = r.held > 0.0 || workers_busy;
        match state.activity {
            Some((count, since)) if count == r.requests && !busy => {
                Some(now.saturating_duration_since(since))
            }
            _ => {
                state.activity = Some((r.requests, now));
                Some(Duration::ZERO)
            }
        }
    });
    (demand, idle_for)
}

/// `p` with the GPUs the worker reported: their indices from the node's inventory
/// (kept as they were where the inventory names no UUIDs, as on GFD-only nodes).
fn assigned(
    p: &PodPlacement,
    uuids: &[String],
    inventories: &[Arc<SeenInventory>],
) -> PodPlacement {
    let node = inventories.iter().find(|i| i.spec.node == p.node);
    let indices: Option<Vec<u32>> = uuids
        .iter()
        .map(|u| {
            node?
                .spec
                .gpus
                .iter()
                .find(|g| *g.uuid == **u)
                .map(|g| g.index)
        })
        .collect();
    let mut fixed = p.clone();
    if let Some(mut ix) = indices {
        ix.sort_unstable();
        fixed.gpus = ix;
    }
    fixed.uuids = uuids.to_vec();
    fixed.assigned = true;
    fixed
}

/// What placement starts from: the inventory, with every existing placement (ours and
/// other deployments') adopted.
pub(super) struct Ledger {
    pub(super) engine: Engine,
    pub(super) cpu_nodes: HashSet<String>,
    /// Replicas placed on each node (CPU placement spreads by it).
    pub(super) replicas_on: HashMap<String, usize>,
    /// Pods whose placement cannot be adopted (their node or GPU is gone), and why.
    pub(super) lost: HashMap<String, String>,
}

/// The ledger, built on first use: most passes place nothing, and building it reads
/// every pod's placement and every node (at fleet scale, 10,000 pods and 1,000 nodes:
/// most of a pass's CPU when it was built on every pass).
pub(super) struct LazyLedger<'a> {
    make: Option<Box<dyn FnOnce() -> Ledger + Send + 'a>>,
    built: Option<Ledger>,
}

impl<'a> LazyLedger<'a> {
    pub(super) fn new(make: impl FnOnce() -> Ledger + Send + 'a) -> Self {
        Self {
            make: Some(Box::new(make)),
            built: None,
        }
    }

    /// The ledger, built now if it was not yet.
    pub(super) fn get(&mut self) -> &mut Ledger {
        if self.built.is_none() {
            let make = self.make.take().expect("an unbuilt ledger keeps its maker");
            self.built = Some(make());
        }
        self.built.as_mut().expect("built above")
    }
}

/// The ledger over `pods` and the cached inventory; `corrected` placements (by pod
/// name) replace what those pods record.
pub(super) fn ledger(
    ctx: &Context,
    pods: &[Arc<SeenPod>],
    corrected: &[(String, PodPlacement)],
) -> Ledger {
    reckon(ctx, pods, corrected, Adopt::Placements)
}

/// The pods whose recorded node or GPU is gone, and why: the ledger's `lost`, worked
/// out without adopting any placement. It is worked out once a second for every
/// pass (`Context::lost`), and a ledger's placements held at once with a placing
/// pass's own doubled its memory at fleet scale (heaptrack at 10,000 pods: two of
/// about 11 MB each at the peak). Every pod's placement is checked, where the ledger
/// adopts the first pod of a replica index and does not look at a second (there
/// should be none; if there is, it is lost too when its node is gone).
pub(super) fn lost(ctx: &Context, pods: &[Arc<SeenPod>]) -> HashMap<String, String> {
    reckon(ctx, pods, &[], Adopt::LostOnly).lost
}

/// What [`reckon`] keeps of the placements it reads.
#[derive(Clone, Copy, PartialEq)]
enum Adopt {
    /// Every placement, adopted into the engine: a ledger to place against.
    Placements,
    /// None: only which pods lost their node or GPU.
    LostOnly,
}

/// What [`reckon`] checks each recorded placement against.
enum Against {
    /// An engine that adopts it ([`Adopt::Placements`]).
    Engine(Engine),
    /// Only the nodes and GPUs that exist ([`Adopt::LostOnly`]).
    Present(Present),
}

fn reckon(
    ctx: &Context,
    pods: &[Arc<SeenPod>],
    corrected: &[(String, PodPlacement)],
    adopt: Adopt,
) -> Ledger {
    let (inventories, slices, nodes) = (
        ctx.cache.inventories(),
        ctx.cache.slices(),
        ctx.cache.nodes(),
    );
    let (mut against, cpu_nodes) = match adopt {
        // The engine keeps what it needs of the inventory, which goes before the
        // placements are adopted: at fleet scale (16,000 GPUs) it is about 4 MB, and
        // the two held together were the ledger's peak.
        Adopt::Placements => {
            let mut inventory = Inventory::default();
            let cpu = read_inventory(&inventories, &slices, &nodes, pods, &ctx.config, |n| {
                inventory.nodes.push(n)
            });
            (Against::Engine(Engine::new(&inventory)), cpu)
        }
        // The lost check keeps only names and indices, node by node, and needs no
        // reservations (which would parse every pod's placement once more).
        Adopt::LostOnly => {
            let mut present = Present::default();
            let cpu = read_inventory(&inventories, &slices, &nodes, &[], &ctx.config, |n| {
                present.add(&n)
            });
            (Against::Present(present), cpu)
        }
    };
    let mut lost: HashMap<String, String> = HashMap::new();
    let mut replicas_on: HashMap<String, usize> = HashMap::new();
    for pod in pods {
        let fixed = corrected
            .iter()
            .find(|(name, _)| *name == pod.name_any())
            .map(|(_, p)| p.clone());
        // Parsed once: the ledger reads every pod's annotation, and once a second.
        let recorded = placement_of(pod);
        // Only a ledger to place against counts replicas per node (CPU placement
        // spreads by it); the lost check keeps only `lost`.
        if let (Adopt::Placements, Some(p)) = (adopt, &recorded) {
            *replicas_on.entry(p.node.clone()).or_default() += 1;
        }
        let (Some(p), Some(index), Some(dep)) = (
            fixed.or(recorded),
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
        let engine = match &mut against {
            Against::Engine(engine) => engine,
            Against::Present(present) => {
                if let Err(e) = present.adoptable(&p.node, &p.gpus) {
                    lost.insert(pod.name_any(), e.to_string());
                }
                continue;
            }
        };
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
            dra: p.dra,
            product: p.product.clone().unwrap_or_default(),
        };
        if let Err(e) = engine.adopt(placed) {
            lost.insert(pod.name_any(), e.to_string());
        }
    }
    Ledger {
        engine: match against {
            Against::Engine(engine) => engine,
            // The lost check keeps only `lost`: an engine over nothing stands in.
            Against::Present(_) => Engine::new(&Inventory::default()),
        },
        cpu_nodes,
        replicas_on,
        lost,
    }
}

/// Whether `tol` tolerates `taint`, by the rules of the Kubernetes documentation: an
/// empty key with `Exists` matches every taint, an empty effect every effect.
fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    let exists = tol.operator.as_deref() == Some("Exists");
    let key = match tol.key.as_deref() {
        None | Some("") => exists,
        Some(k) => k == taint.key,
    };
    let value =
        exists || tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
    let effect = tol
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    key && value && effect
}

/// Time from pod creation to its Ready condition.
/// Whether `d`'s replicas fetch the model into their node's cache (an http(s) source).
pub(super) fn fetched(d: &InferenceDeployment) -> bool {
    let source = &d.spec.model.source;
    source.starts_with("http://") || source.starts_with("https://")
}

/// How a replica's start of `took` was spent: the scheduler's binding from the pod's
/// `PodScheduled` condition, fetching, loading and warming up from the worker's own
/// metrics (zeros where it could not be scraped).
fn cold_start(
    pod: &SeenPod,
    took: Duration,
    load: Option<&WorkerLoad>,
) -> crate::metrics::ColdStart {
    let created = pod.creation_timestamp().map(|t| t.0);
    let scheduled = pod
        .facts()
        .scheduled
        .filter(|c| c.status == ConditionStatus::True)
        .and_then(|c| c.since);
    let scheduling = match (created, scheduled) {
        (Some(c), Some(s)) => elapsed(c, s).as_secs_f64(),
        _ => 0.0,
    };
    let st = load.map(|l| l.startup.clone()).unwrap_or_default();
    crate::metrics::ColdStart {
        scheduling,
        download: st.download_seconds,
        load: (st.load_seconds - st.warmup_seconds).max(0.0),
        warmup: st.warmup_seconds,
        total: took.as_secs_f64(),
    }
}

fn ready_took(pod: &SeenPod) -> Option<Duration> {
    let created = pod.creation_timestamp()?.0;
    let ready = pod
        .facts()
        .ready
        .filter(|c| c.status == ConditionStatus::True)?
        .since?;
    Some(elapsed(created, ready))
}

/// The inventory placement sees, each node given to `node` as it is read (so a caller
/// that keeps little of it never holds all of it); returns the CPU-only nodes. Nodes
/// that are not Ready or are cordoned offer nothing; a node's agent inventory wins over
/// its GFD labels. `pods` give what our running replicas reserved on each GPU
/// (`Gpu::used_outside_bytes` leaves it out); with none, all memory in use counts as
/// used outside.
fn read_inventory(
    inventories: &[Arc<SeenInventory>],
    slices: &[Arc<ResourceSlice>],
    nodes: &[Arc<SeenNode>],
    pods: &[Arc<SeenPod>],
    config: &super::Config,
    mut node: impl FnMut(NodeGpus),
) -> HashSet<String> {
    let tolerations = &config.scheduling.tolerations;
    let usable = |n: &SeenNode| {
        let ready = n.status.as_ref().is_some_and(|s| s.ready);
        let cordoned = n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        // A taint the replica pods do not tolerate keeps them off the node
        // (https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/):
        // placing there would only earn a refusal from the scheduler.
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| {
                ts.iter().any(|t| {
                    matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
                        && !tolerations.iter().any(|tol| tolerates(tol, t))
                })
            });
        ready && !cordoned && !tainted
    };
    let usable_nodes: HashMap<String, &SeenNode> = nodes
        .iter()
        .filter(|n| usable(n))
        .map(|n| (n.name_any(), &**n))
        .collect();
    // Bytes our running replicas reserved per GPU UUID (NVML counts them as used).
    let mut reserved: HashMap<String, u64> = HashMap::new();
    for p in pods.iter().filter_map(placement_of) {
        for u in &p.uuids {
            *reserved.entry(u.clone()).or_default() += p.bytes_per_gpu;
        }
    }
    let slices: Vec<&ResourceSlice> = slices.iter().map(|s| &**s).collect();
    let mut cpu = HashSet::new();
    // By node, once: a search per node made the build quadratic in the fleet.
    let mut agents: HashMap<&str, &SeenInventorySpec> = HashMap::new();
    for i in inventories
        .iter()
        .map(|i| &i.spec)
        .filter(|i| !i.gpus.is_empty())
    {
        agents.entry(i.node.as_str()).or_insert(i);
    }
    for (name, n) in &usable_nodes {
        let agent = agents.get(name.as_str()).copied();
        // DRA first: where the driver publishes the node's GPUs, claims can name them.
        if let Some(dra) = &config.binding.dra {
            if let Some(g) = from_resource_slices(name, &dra.driver, &slices, agent, &reserved) {
                node(g);
                continue;
            }
        }
        // Otherwise the device plugin's extended resources.
        let allocatable =
            |r: &str| -> Option<u32> { n.status.as_ref()?.allocatable.get(r)?.0.parse().ok() };
        let whole = allocatable("nvidia.com/gpu");
        let binding = Binding::DevicePlugin {
            whole: whole.unwrap_or(0) > 0,
            sharing: config
                .binding
                .sharing_resource
                .clone()
                .filter(|r| allocatable(r).unwrap_or(0) > 0),
        };
        let found = match agent {
            Some(a) => Some(from_gpu_inventory(a, &reserved, binding)),
            None => from_gfd_labels(name, n.labels(), whole.filter(|&w| w > 0), binding),
        };
        match found {
            Some(g) => node(g),
            None => {
                cpu.insert(name.clone());
            }
        }
    }
    cpu
}
