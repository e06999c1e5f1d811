//! Report: Events for what a pass decided, and the status it writes (with the
//! autoscaler's memory). The status itself is built, purely, in `status.rs`.

use std::time::Instant;

use gpuscale_crds::{GpuBinding, InferenceDeployment, ReplicaPlacement, ReplicaState};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::decide::Decided;
use super::observe::World;
use super::pods::*;
use super::{key_of, status, Context, DeploymentState, Error, Phase};
use crate::autoscale::Direction;

/// Report: Events for the decision and any refusal, and the status with the
/// autoscaler's memory.
#[allow(clippy::too_many_arguments)]
pub(super) async fn report(
    d: &InferenceDeployment,
    ctx: &Context,
    state: &mut DeploymentState,
    world: &World,
    decided: &Decided,
    created: &[(u32, PodPlacement)],
    now: Instant,
    wall: jiff::Timestamp,
) -> Result<(), Error> {
    let key = key_of(d);
    let (done, total) = world
        .downloads
        .iter()
        .fold((0.0, 0.0), |(a, b), dl| (a + dl.done, b + dl.total));
    ctx.metrics
        .downloading(&key, (total > 0.0).then(|| done / total));

    let name = d.name_any();
    let mut placements: Vec<ReplicaPlacement> = world
        .seen
        .iter()
        .filter_map(|s| {
            let state = match s.phase {
                Phase::Loading => ReplicaState::Loading,
                Phase::Ready => ReplicaState::Ready,
                Phase::Draining(_) => ReplicaState::Draining,
                Phase::Failed => ReplicaState::Failed,
            };
            Some(replica_placement(
                s.pod.name_any(),
                s.placement.as_ref()?,
                state,
            ))
        })
        .collect();
    for (index, p) in created {
        let pod = pod_name(&name, *index);
        if !placements.iter().any(|x| x.pod == pod) {
            placements.push(replica_placement(pod, p, ReplicaState::Loading));
        }
    }
    placements.sort_by(|a, b| a.pod.cmp(&b.pod));
    let live = world
        .seen
        .iter()
        .filter(|s| matches!(s.phase, Phase::Loading | Phase::Ready))
        .count();
    let fresh = created
        .iter()
        .filter(|(i, _)| !world.seen.iter().any(|s| s.index == *i))
        .count();
    let active = (live + fresh) as u32;
    ctx.metrics.replicas(
        &key,
        crate::metrics::Replicas {
            desired: decided.desired,
            ready: world.ready,
            max: d.spec.scaling.max_replicas,
            unschedulable: if decided.refusal.is_some() {
                decided.desired.saturating_sub(active)
            } else {
                0
            },
        },
    );
    let cost = crate::cost::cost(&placements, &ctx.config.prices, world.tokens_per_second);
    ctx.metrics.cost(&key, cost.as_ref());
    let observed = status::Observed {
        cost,
        ready: world.ready,
        active,
        desired: decided.desired,
        demand: world.demand,
        request_rate: world.request_rate,
        ready_time: state.scaler.measured_ready_time(),
        downloads: world.downloads.iter().map(|dl| dl.describe()).collect(),
        decision: decided.scaling.as_ref(),
        refusal: decided.refusal.as_ref(),
        placements,
        memory: status::memory(&state.scaler.memory(now), wall),
        rollout: Some(&decided.rollout.status),
        now: wall,
    };
    let mut st = status::build(d, &observed);
    // The load figures change with every scrape; written each pass they made a status
    // write (and the watch event it causes, and another pass) per deployment per
    // scrape interval: 2,200 writes a minute for 50 deployments in `gpuscale-sim
    // fleet`. They are refreshed at most every `LOAD_STATUS_PERIOD`, the HPA's
    // sync period, unless something else in status changes anyway.
    let recent = state
        .load_written
        .is_some_and(|at| now.saturating_duration_since(at) < LOAD_STATUS_PERIOD);
    if let Some(old) = d.status.as_ref().filter(|_| recent) {
        // Only the load changed: the stored figures stay.
        let held = gpuscale_crds::InferenceDeploymentStatus {
            queue_depth: old.queue_depth,
            request_rate: old.request_rate,
            cost: old.cost.clone(),
            ..st.clone()
        };
        if &held == old {
            st = held;
        }
    }
    let load_changed = d.status.as_ref().is_none_or(|old| {
        (old.queue_depth, old.request_rate, &old.cost)
            != (st.queue_depth, st.request_rate, &st.cost)
    });
    let written = patch_status(d, ctx, &st).await;
    if written.is_ok() && load_changed {
        state.load_written = Some(now);
    }
    // The Events after the status: a client that sees one reads a status that already
    // says it (an e2e scenario read the rollout's phase right after its `RolledBack`
    // Event and found the step before). Published even when the write failed, as they
    // were before it: what they report (pods created or deleted, a verdict) happened.
    announce(d, ctx, &key, world, decided).await;
    written
}

/// The pass's Events: a scaling move, a rollout's step or verdict, a refusal, a model
/// download begun.
async fn announce(
    d: &InferenceDeployment,
    ctx: &Context,
    key: &str,
    world: &World,
    decided: &Decided,
) {
    if let Some(dec) = decided.scaling.as_ref() {
        if dec.direction != Direction::Hold {
            let note = format!("{} → {}: {}", decided.current, dec.desired, dec.reason);
            let reason = if dec.direction == Direction::Up {
                "ScaledUp"
            } else {
                "ScaledDown"
            };
            ctx.metrics.scaled(key, dec.direction);
            info!(from = decided.current, to = dec.desired, reason = %dec.reason, "scaling");
            publish(ctx, d, EventType::Normal, reason, "Scale", &note).await;
        }
    }
    if let Some(e) = &decided.rollout.event {
        info!(reason = e.reason, message = %e.message, "rollout");
        ctx.metrics.rollout(key, e.reason);
        let type_ = if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, d, type_, e.reason, "Rollout", &e.message).await;
    }
    if let Some(r) = &decided.refusal {
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

    for dl in world.downloads.iter().filter(|dl| dl.started) {
        let note = format!(
            "downloading the model into the node's cache: {}",
            dl.describe()
        );
        publish(ctx, d, EventType::Normal, "DownloadingModel", "Load", &note).await;
    }
}

/// How often status's load figures (`queueDepth`, `requestRate`) are refreshed when
/// nothing else in status changes: the HPA's default sync period
/// (<https://kubernetes.io/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale/#how-does-a-horizontalpodautoscaler-work>).
const LOAD_STATUS_PERIOD: std::time::Duration = std::time::Duration::from_secs(15);

pub(super) async fn patch_status(
    d: &InferenceDeployment,
    ctx: &Context,
    st: &gpuscale_crds::InferenceDeploymentStatus,
) -> Result<(), Error> {
    if d.status.as_ref() == Some(st) {
        return Ok(());
    }
    let api: Api<InferenceDeployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let mut patch = serde_json::json!({ "status": st });
    // A merge patch keeps every key it does not name: the rollout's versions are
    // written with a null for each key the stored ones have and the new ones lack, so
    // a promoted version never keeps a field of the one it replaced.
    if let (Some(old), Some(new)) = (
        d.status.as_ref().and_then(|s| s.rollout.as_ref()),
        st.rollout.as_ref(),
    ) {
        let old = serde_json::to_value(old).unwrap_or_default();
        let new = serde_json::to_value(new).unwrap_or_default();
        patch["status"]["rollout"] = replacing(&old, &new);
    }
    api.patch_status(
        &d.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// The merge patch (RFC 7386) that turns `old` into `new`: `new`, with a null for each
/// object key only `old` has.
fn replacing(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, v) in n {
                let v = o.get(k).map_or_else(|| v.clone(), |ov| replacing(ov, v));
                out.insert(k.clone(), v);
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

pub(super) async fn publish(
    ctx: &Context,
    d: &InferenceDeployment,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    publish_to(ctx, &d.object_ref(&()), type_, reason, action, note).await;
}

pub(super) async fn publish_to(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    // An event lost is not worth failing the pass for.
    let note: String = note.chars().take(1024).collect();
    if let Err(e) = ctx
        .recorder
        .publish(reference, type_, reason, action, &note)
        .await
    {
        warn!(error = %e, reason, "could not publish an event");
    }
}

fn replica_placement(pod: String, p: &PodPlacement, state: ReplicaState) -> ReplicaPlacement {
    let binding = (!p.gpus.is_empty()).then_some(match (p.dra, p.exclusive) {
        (true, true) => GpuBinding::DraClaim,
        (true, false) => GpuBinding::DraSharedClaim,
        (false, true) => GpuBinding::DevicePlugin,
        (false, false) => GpuBinding::SharingResource,
    });
    ReplicaPlacement {
        claim: (p.dra && !p.gpus.is_empty()).then(|| claim_name(&pod)),
        pod,
        node: p.node.clone(),
        gpus: p.uuids.clone(),
        gpu_count: p.gpus.len() as u32,
        vram_reserved_bytes: p.bytes_per_gpu,
        state,
        binding,
        product: p.product.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::replacing;
    use serde_json::json;

    #[test]
    fn a_merge_patch_that_replaces_drops_the_keys_only_the_old_value_had() {
        let old = json!({"phase": "Progressing", "canary": {"name": "b", "model": {"version": "2"}},
            "stable": {"name": "a", "model": {"version": "1", "parameters": 7}}});
        let new = json!({"phase": "Stable", "stable": {"name": "b", "model": {"version": "2"}}});
        let patch = replacing(&old, &new);
        assert_eq!(
            patch,
            json!({"phase": "Stable", "canary": null,
                "stable": {"name": "b", "model": {"version": "2", "parameters": null}}})
        );
        let mut merged = old.clone();
        json_merge(&mut merged, &patch);
        assert_eq!(merged, new);
    }

    /// RFC 7386, as the API server applies it.
    fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }
}
