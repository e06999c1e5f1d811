//! Decide: the replica count, the steps towards it, and where each new replica goes.
//! Pure: it reads what `observe` found and the clock it is given.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use gpuscale_crds::InferenceDeployment;
use k8s_openapi::api::core::v1::Pod;

use super::observe::{Ledger, World};
use super::pods::*;
use super::{key_of, plan, DeploymentState, Replica, Step, AVOID_REFUSED_NODE};
use crate::autoscale::{self, Observation};
use crate::placement;

/// What one pass decided.
pub(super) struct Decided {
    pub(super) desired: u32,
    /// The autoscaler's decision (`None` with `autoscale: false`).
    pub(super) scaling: Option<autoscale::Decision>,
    /// The count the decision was made against.
    pub(super) current: u32,
    pub(super) todo: Vec<Todo>,
    pub(super) refusal: Option<placement::Refusal>,
}

/// One API step of a pass.
pub(super) enum Todo {
    Create(u32, PodPlacement),
    Drain(u32),
    Delete(u32, Option<String>),
}

/// Decide: the replica count, the steps towards it, and where each new replica goes.
pub(super) fn decide(
    d: &InferenceDeployment,
    state: &mut DeploymentState,
    world: &World,
    ledger: &mut Ledger,
    pods: &[Arc<Pod>],
    need: u64,
    now: Instant,
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
                let node = ledger.engine.place(&req).ok()?.node;
                ledger.engine.release(&req.replica);
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

    let replicas: Vec<Replica> = world
        .seen
        .iter()
        .map(|s| Replica {
            index: s.index,
            phase: s.phase,
            outdated: s.outdated,
            in_flight: s.load.as_ref().map(|l| l.in_flight()),
        })
        .collect();
    let mut refusal = None;
    let mut todo = Vec::new();
    let mut created: Vec<PodPlacement> = Vec::new();
    for step in plan(&replicas, desired, d.spec.rollout.max_surge) {
        match step {
            Step::Create(index) => {
                if refusal.is_some() {
                    continue;
                }
                let mut req = placement::request(&key, index, &d.spec, need);
                req.avoid_nodes = avoid.clone();
                let p = match ledger.engine.place(&req) {
                    Ok(p) => PodPlacement {
                        node: p.node,
                        gpus: p.gpus,
                        uuids: p.gpu_uuids,
                        bytes_per_gpu: p.bytes_per_gpu,
                        exclusive: p.exclusive,
                        assigned: false,
                        dra: p.dra,
                    },
                    Err(r) => match cpu_placement(d, &ledger.cpu_nodes, pods, &created, need) {
                        Some(p) => p,
                        None => {
                            refusal = Some(r);
                            continue;
                        }
                    },
                };
                created.push(p.clone());
                todo.push(Todo::Create(index, p));
            }
            Step::Drain(index) => todo.push(Todo::Drain(index)),
            Step::Delete(index) => {
                let why = world
                    .seen
                    .iter()
                    .find(|s| s.index == index)
                    .and_then(|s| s.failure.clone());
                todo.push(Todo::Delete(index, why));
            }
        }
    }
    state.desired = Some(desired);
    // The scheduler's own words explain more than a placement refusal they caused.
    if !world.refusals.is_empty() {
        let pods: Vec<&str> = world.refusals.iter().map(|(_, m)| m.as_str()).collect();
        refusal = Some(placement::Refusal {
            reason: placement::RefusalReason::SchedulerRejected,
            message: format!(
                "the scheduler refused {} (placed elsewhere for the next {} s)",
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
    }
}

/// Where a replica may run on the CPU backend (`resources.allowCpu`): the CPU node
/// holding the fewest gpuscale replicas.
fn cpu_placement(
    d: &InferenceDeployment,
    cpu_nodes: &HashSet<String>,
    pods: &[Arc<Pod>],
    created: &[PodPlacement],
    need: u64,
) -> Option<PodPlacement> {
    if !d.spec.resources.allow_cpu {
        return None;
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    // Replicas created earlier in this pass count too, so one pass spreads them.
    let placed: Vec<PodPlacement> = pods
        .iter()
        .filter_map(|p| placement_of(p))
        .chain(created.iter().cloned())
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
        assigned: false,
        dra: false,
    })
}
