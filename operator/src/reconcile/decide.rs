//! Decide: the replica count, the steps towards it, and where each new replica goes.
//! Pure: it reads what `observe` found and the clock it is given.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use gpuscale_crds::{InferenceDeployment, Revision, RolloutPhase, RolloutStatus};

use super::observe::{LazyLedger, Ledger, World};
use super::pods::*;
use super::{key_of, plan, DeploymentState, Phase, Replica, Step, Targets, Version};
use super::{SeenPod, AVOID_REFUSED_NODE};
use crate::autoscale::{self, Observation};
use crate::routers::VersionCounts;
use crate::{placement, rollout};

/// What one pass decided.
pub(super) struct Decided {
    pub(super) desired: u32,
    /// The autoscaler's decision (`None` with `autoscale: false`).
    pub(super) scaling: Option<autoscale::Decision>,
    /// The count the decision was made against.
    pub(super) current: u32,
    pub(super) todo: Vec<Todo>,
    pub(super) refusal: Option<placement::Refusal>,
    /// Replicas that fit on no node as the cluster is, but would on a new GPU node:
    /// (index, whole GPUs), each asked of a cluster autoscaler by a pending pod.
    pub(super) capacity: Vec<(u32, u32)>,
    /// The rollout's status after this pass, and the event it calls for.
    pub(super) rollout: rollout::Outcome,
    /// The deployment as each version's pods are built: the stable one, and the canary.
    pub(super) views: (InferenceDeployment, Option<InferenceDeployment>),
}

impl Decided {
    /// The deployment as `version`'s pods are built.
    pub(super) fn view(&self, version: Version) -> &InferenceDeployment {
        match (version, &self.views.1) {
            (Version::Canary, Some(c)) => c,
            _ => &self.views.0,
        }
    }
}

/// Where a rollout step's window began: the routers' counts per version then.
pub(super) struct WindowStart {
    /// The canary, step and share the window is for.
    step: (String, u32, u32),
    since: jiff::Timestamp,
    counts: HashMap<String, VersionCounts>,
}

/// One API step of a pass.
pub(super) enum Todo {
    Create(u32, PodPlacement, Version),
    /// The replica's pod as this pass saw it (drained by UID, as it is deleted).
    Drain(Arc<SeenPod>),
    /// The replica's pod as this pass saw it, and why it failed (if it did).
    Delete(Arc<SeenPod>, Option<String>),
}

/// Decide: the replica count, the steps towards it, and where each new replica goes.
pub(super) fn decide(
    d: &InferenceDeployment,
    state: &mut DeploymentState,
    world: &World,
    ledger: &mut LazyLedger,
    owned: &[Arc<SeenPod>],
    need: u64,
    (now, wall): (Instant, jiff::Timestamp),
) -> Decided {
    let active = world.ready + world.loading;
    let current = state
        .desired
        .unwrap_or_else(|| active.max(d.spec.scaling.min_replicas));
    let key = key_of(d);
    for (node, _) in &world.refusals {
        state.avoid.insert(node.clone(), now);
    }
    state
        .avoid
        .retain(|_, at| now.saturating_duration_since(*at) < AVOID_REFUSED_NODE);
    let mut avoid: Vec<String> = state.avoid.keys().cloned().collect();
    avoid.sort();
    let (desired, scaling) = if d.spec.scaling.autoscale {
        // Where the next replica would go decides how soon it could serve: from the
        // node's model cache, or after fetching the model.
        let next_warm = super::observe::fetched(d)
            .then(|| {
                let mut req = placement::request(&key, u32::MAX, &d.spec, need);
                req.avoid_nodes = avoid.clone();
                let engine = &mut ledger.get().engine;
                let node = engine.place(&req).ok()?.node;
                engine.release(&req.replica);
                Some(world.warm_nodes.contains(&node))
            })
            .flatten();
        let dec = state.scaler.decide(
            now,
            &Observation {
                demand: world.demand,
                ready: world.ready,
                loading: world.loading,
                current,
                next_warm,
                idle_for: world.idle_for,
            },
        );
        (dec.desired, Some(dec))
    } else {
        (d.spec.replicas.unwrap_or(d.spec.scaling.min_replicas), None)
    };

    // The rollout: which versions, how many of each.
    let spec_rev = Revision {
        name: template_hash(d),
        model: d.spec.model.clone(),
        resources: d.spec.resources.clone(),
        worker: d.spec.worker.clone(),
        need_bytes: need,
    };
    let prev = state.rollout.clone();
    let canary = prev
        .as_ref()
        .filter(|r| r.phase == RolloutPhase::Progressing)
        .and_then(|r| r.canary.as_ref())
        .map(|c| c.name.clone());
    let of_canary: Vec<_> = world
        .seen
        .iter()
        .filter(|s| canary.is_some() && s.revision == canary)
        .collect();
    let observed = rollout::Observed {
        revision: &spec_rev,
        desired,
        canary_ready: of_canary.iter().filter(|s| s.phase == Phase::Ready).count() as u32,
        canary_failure: of_canary.iter().find_map(|s| {
            let f = failure(&s.pod).filter(|f| own_failure(f))?;
            Some(format!("{}: {f}", s.pod.name_any()))
        }),
        window: window(state, prev.as_ref(), world.versions.as_ref(), wall),
        routed: world.routed,
        now: wall,
    };
    let outcome = rollout::advance(&d.spec.rollout, prev.as_ref(), &observed);
    state.rollout = Some(outcome.status.clone());
    let st = &outcome.status;
    let surge = d.spec.rollout.max_surge;
    let canary = st
        .canary
        .as_ref()
        .filter(|_| st.phase == RolloutPhase::Progressing);
    let targets = match canary {
        Some(_) => {
            // Without routers the canary takes all traffic it can get: a plain surge.
            let percent = if world.routed {
                rollout::step_percent(&d.spec.rollout, st)
            } else {
                100
            };
            let (stable, canary) = rollout::split(desired, percent, surge);
            Targets {
                desired,
                stable,
                canary,
                surge,
            }
        }
        None => Targets::stable(desired, surge),
    };
    let views = (view(d, &st.stable), canary.map(|c| view(d, c)));
    let version_of = |rev: &Option<String>| match rev {
        Some(r) if *r == st.stable.name => Version::Stable,
        Some(r) if canary.is_some_and(|c| c.name == *r) => Version::Canary,
        Some(r)
            if st.phase == RolloutPhase::RolledBack
                && st.canary.as_ref().is_some_and(|c| c.name == *r) =>
        {
            Version::RolledBack
        }
        _ => Version::Outdated,
    };

    let mut replicas: Vec<Replica> = world
        .seen
        .iter()
        .map(|s| s.replica(version_of(&s.revision)))
        .collect();
    // Which replica a scale-down removes depends on what its exit frees for the
    // fleet: read from the ledger, built only when some replica is in excess.
    let active = replicas
        .iter()
        .filter(|r| matches!(r.phase, Phase::Loading | Phase::Ready))
        .count() as u32;
    if active > targets.desired.max(targets.stable + targets.canary) {
        // Asked in the plan's own tie-break order, so where exits free the same the
        // plan's choice stands.
        let mut by_tie: Vec<&Replica> = replicas.iter().collect();
        by_tie.sort_by(|a, b| plan::tie_break(a, b));
        let ids: Vec<_> = by_tie
            .iter()
            .map(|r| placement::ReplicaId {
                deployment: key.clone(),
                index: r.index,
            })
            .collect();
        let order: Vec<u32> = ledger
            .get()
            .engine
            .defragmenting_order(&ids)
            .iter()
            .map(|r| r.index)
            .collect();
        plan::rank_exits(&mut replicas, &order);
    }
    let mut refusal = None;
    let mut capacity = Vec::new();
    // The most memory any one GPU of the fleet offers when empty (`None`: no GPU),
    // read once per pass and only if a replica is refused.
    let mut largest: Option<Option<u64>> = None;
    let mut largest_gpu = |ledger: &mut LazyLedger| {
        *largest.get_or_insert_with(|| ledger.get().engine.gpu_usage().map(|g| g.3).max())
    };
    let mut todo = Vec::new();
    let mut created: Vec<PodPlacement> = Vec::new();
    for step in plan(&replicas, &targets) {
        match step {
            Step::Create(index, version) => {
                let (v, need) = match (version, canary) {
                    (Version::Canary, Some(c)) => {
                        (views.1.as_ref().unwrap_or(&views.0), c.need_bytes)
                    }
                    _ => (&views.0, st.stable.need_bytes),
                };
                let mut req = placement::request(&key, index, &v.spec, need);
                req.avoid_nodes = avoid.clone();
                if let Some(r) = &refusal {
                    if more_gpus_would_do(r, largest_gpu(ledger), &req) {
                        capacity.push((index, req.gpus));
                    }
                    continue;
                }
                let p = match ledger.get().engine.place(&req) {
                    Ok(p) => PodPlacement {
                        node: p.node,
                        gpus: p.gpus,
                        uuids: p.gpu_uuids,
                        bytes_per_gpu: p.bytes_per_gpu,
                        exclusive: p.exclusive,
                        assigned: false,
                        dra: p.dra,
                        product: Some(p.product),
                    },
                    Err(r) => match cpu_placement(v, ledger.get(), &created, need) {
                        Some(p) => p,
                        None => {
                            if more_gpus_would_do(&r, largest_gpu(ledger), &req) {
                                capacity.push((index, req.gpus));
                            }
                            refusal = Some(r);
                            continue;
                        }
                    },
                };
                // Its capacity request still holds (or may be bound to) the GPU this
                // placement found, maybe on the node added for it: the request goes
                // this pass (`act`), the replica the pass after, once it is gone.
                if owned.iter().any(|c| capacity_index(c) == Some(index)) {
                    ledger.get().engine.release(&req.replica);
                    continue;
                }
                created.push(p.clone());
                todo.push(Todo::Create(index, p, version));
            }
            Step::Drain(index) => {
                if let Some(s) = world.seen.iter().find(|s| s.index == index) {
                    todo.push(Todo::Drain(s.pod.clone()));
                }
            }
            // The pod seen, not its name: it is deleted by UID (`act::delete_pod`).
            Step::Delete(index) => {
                if let Some(s) = world.seen.iter().find(|s| s.index == index) {
                    todo.push(Todo::Delete(s.pod.clone(), s.failure.clone()));
                }
            }
        }
    }
    state.desired = Some(desired);
    // The scheduler's (or kubelet's) own words explain more than a placement refusal
    // they caused.
    if !world.refusals.is_empty() {
        let pods: Vec<&str> = world.refusals.iter().map(|(_, m)| m.as_str()).collect();
        refusal = Some(placement::Refusal {
            reason: placement::RefusalReason::SchedulerRejected,
            message: format!(
                "{} (placed elsewhere for the next {} s)",
                pods.join("; "),
                AVOID_REFUSED_NODE.as_secs()
            ),
        });
    }
    Decided {
        desired,
        scaling,
        current,
        todo,
        refusal,
        capacity,
        rollout: outcome,
        views,
    }
}

/// Whether a new GPU node would take replica `req`, which placement refused with `r`:
/// not when the scheduler or the binding refused it (those are about nodes that
/// exist), nor when it needs more memory per GPU than `largest_gpu`, the most any GPU
/// of the fleet has when empty (a node like those would not hold it either; a cluster
/// with no GPU yet always asks).
fn more_gpus_would_do(
    r: &placement::Refusal,
    largest_gpu: Option<u64>,
    req: &placement::Request,
) -> bool {
    use placement::RefusalReason::*;
    let capacity_reason = matches!(
        r.reason,
        NoGpus
            | NoMatchingGpu
            | UnhealthyGpus
            | InsufficientVram
            | InsufficientGpusOnNode
            | NvlinkUnavailable
    );
    capacity_reason && largest_gpu.is_none_or(|usable| req.need_per_gpu <= usable)
}

/// `d` as the pods of `rev` are built: its model, resources and worker.
fn view(d: &InferenceDeployment, rev: &Revision) -> InferenceDeployment {
    let mut v = d.clone();
    v.spec.model = rev.model.clone();
    v.spec.resources = rev.resources.clone();
    v.spec.worker = rev.worker.clone();
    v
}

/// A failure the version itself causes (its container cannot start or keeps
/// crashing), not one that happens to it (eviction, a lost node).
fn own_failure(f: &str) -> bool {
    [
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
    ]
    .iter()
    .any(|r| f.starts_with(r))
}

/// What the routers measured for both versions since the step's window began; starts
/// the window when the step (or its share) is new, or when a router restarted.
fn window(
    state: &mut DeploymentState,
    prev: Option<&RolloutStatus>,
    counts: Option<&HashMap<String, VersionCounts>>,
    wall: jiff::Timestamp,
) -> Option<rollout::Window> {
    let r = prev.filter(|r| r.phase == RolloutPhase::Progressing && r.canary_weight > 0)?;
    let canary = r.canary.as_ref()?.name.clone();
    let counts = counts?;
    let step = (canary.clone(), r.step, r.canary_weight);
    let measured = |w: &WindowStart, rev: &str| -> Option<rollout::Measured> {
        let zero = VersionCounts::default();
        counts
            .get(rev)
            .unwrap_or(&zero)
            .since(w.counts.get(rev).unwrap_or(&zero))
    };
    if let Some(w) = state.window.as_ref().filter(|w| w.step == step) {
        if let (Some(stable), Some(canary)) = (measured(w, &r.stable.name), measured(w, &canary)) {
            return Some(rollout::Window {
                stable,
                canary,
                since: w.since,
            });
        }
    }
    state.window = Some(WindowStart {
        step,
        since: wall,
        counts: counts.clone(),
    });
    Some(rollout::Window {
        stable: rollout::Measured::default(),
        canary: rollout::Measured::default(),
        since: wall,
    })
}

/// Where a replica may run on the CPU backend (`resources.allowCpu`): the CPU node
/// holding the fewest gpuscale replicas.
fn cpu_placement(
    d: &InferenceDeployment,
    ledger: &Ledger,
    created: &[PodPlacement],
    need: u64,
) -> Option<PodPlacement> {
    if !d.spec.resources.allow_cpu {
        return None;
    }
    // Replicas created earlier in this pass count too, so one pass spreads them.
    let load = |n: &str| {
        ledger.replicas_on.get(n).copied().unwrap_or(0)
            + created.iter().filter(|p| p.node == n).count()
    };
    let node = ledger
        .cpu_nodes
        .iter()
        .min_by(|a, b| load(a).cmp(&load(b)).then(a.cmp(b)))?;
    Some(PodPlacement {
        node: node.clone(),
        gpus: Vec::new(),
        uuids: Vec::new(),
        bytes_per_gpu: need,
        exclusive: false,
        assigned: false,
        dra: false,
        product: None,
    })
}
