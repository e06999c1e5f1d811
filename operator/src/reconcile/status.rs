//! The status a pass writes, and its conditions. Pure.

use std::time::Duration;

use gpuscale_crds::{
    AutoscalerMemory, InferenceDeployment, InferenceDeploymentStatus, Recommendation,
    ReplicaPlacement, RolloutPhase, RolloutStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::autoscale::{Decision, Direction, Memory};
use crate::estimate::GIB;
use crate::placement::Refusal;

/// What a pass saw and decided.
pub struct Observed<'a> {
    pub ready: u32,
    pub active: u32,
    pub desired: u32,
    pub demand: Option<f64>,
    pub request_rate: Option<f64>,
    /// What the replicas cost (`None`: no price table).
    pub cost: Option<gpuscale_crds::CostStatus>,
    /// The measured ready time (`None` until a replica became ready).
    pub ready_time: Option<Duration>,
    /// Replicas fetching the model, described (`smollm-0: 45% of 96.6 MB`).
    pub downloads: Vec<String>,
    pub decision: Option<&'a Decision>,
    pub refusal: Option<&'a Refusal>,
    pub placements: Vec<ReplicaPlacement>,
    /// The autoscaler's memory, as status keeps it.
    pub memory: Option<AutoscalerMemory>,
    /// The rollout after the pass.
    pub rollout: Option<&'a RolloutStatus>,
    /// The wall time of the pass.
    pub now: jiff::Timestamp,
}

/// The autoscaler's memory with its ages turned into times before `now` (to the
/// second, as Kubernetes keeps times); `None` when there is nothing to remember.
pub fn memory(m: &Memory, now: jiff::Timestamp) -> Option<AutoscalerMemory> {
    let at = |age: Duration| -> Time {
        let t = now
            .checked_sub(jiff::SignedDuration::try_from(age).unwrap_or_default())
            .unwrap_or(now);
        Time(t.round(jiff::Unit::Second).unwrap_or(t))
    };
    let out = AutoscalerMemory {
        recommendations: m
            .recommendations
            .iter()
            .map(|&(age, replicas)| Recommendation {
                replicas,
                time: at(age),
            })
            .collect(),
        panic_until: m.panic_left.map(|left| {
            let t = now
                .checked_add(jiff::SignedDuration::try_from(left).unwrap_or_default())
                .unwrap_or(now);
            Time(t.round(jiff::Unit::Second).unwrap_or(t))
        }),
    };
    (out != AutoscalerMemory::default()).then_some(out)
}

/// The status after a pass.
pub fn build(d: &InferenceDeployment, o: &Observed) -> InferenceDeploymentStatus {
    let prev = d.status.clone().unwrap_or_default();
    let generation = d.metadata.generation;
    let mut st = InferenceDeploymentStatus {
        replicas: o.active,
        ready_replicas: o.ready,
        desired_replicas: o.desired,
        queue_depth: o.demand.unwrap_or(0.0).round() as u32,
        request_rate: o.request_rate.map(|r| (r * 100.0).round() / 100.0),
        cost: o.cost.clone(),
        // What was measured, never the default the autoscaler assumes before that
        // (a measurement restored after a restart stays until a new one).
        measured_ready_seconds: o
            .ready_time
            .map(|t| t.as_secs_f64().round())
            .or(prev.measured_ready_seconds),
        observed_generation: generation,
        selector: Some(super::selector_string(&d.name_any())),
        autoscaler: o.memory.clone(),
        conditions: prev.conditions.clone(),
        last_scale_time: prev.last_scale_time.clone(),
        last_scale_reason: prev.last_scale_reason.clone(),
        model: prev.model.clone(),
        rollout: o.rollout.cloned().or(prev.rollout.clone()),
        ..InferenceDeploymentStatus::default()
    };
    let target = f64::from(d.spec.scaling.target_queue_depth.max(1));
    let needed = (o.demand.unwrap_or(0.0) / target).ceil() as u32;
    st.warm_replicas = o
        .ready
        .saturating_sub(needed)
        .min(d.spec.scaling.warm_replicas);
    let gpus: u32 = o.placements.iter().map(|p| p.gpu_count).sum();
    let bytes: u64 = o
        .placements
        .iter()
        .map(|p| p.vram_reserved_bytes * u64::from(p.gpu_count.max(1)))
        .sum();
    st.gpu_summary = Some(format!("{gpus} / {:.1}Gi", bytes as f64 / GIB as f64));
    st.placement_summary = (!o.placements.is_empty()).then(|| {
        o.placements
            .iter()
            .map(|p| {
                let held = if p.gpus.len() as u32 == p.gpu_count {
                    p.gpus.join(",")
                } else {
                    // Counted out by a plugin that has not told which yet (GFD-only).
                    format!("{} unknown", p.gpu_count)
                };
                let how = p.binding.map_or("CPU".to_string(), |b| format!("{b:?}"));
                format!("{} {} [{held}] {how}", p.pod, p.node)
            })
            .collect::<Vec<_>>()
            .join("; ")
    });
    st.placements = o.placements.clone();
    if let Some(dec) = o.decision.filter(|d| d.direction != Direction::Hold) {
        st.last_scale_time = Some(Time(o.now));
        st.last_scale_reason = Some(dec.reason.to_string());
    } else if o.decision.is_none() && prev.desired_replicas != o.desired {
        st.last_scale_time = Some(Time(o.now));
        st.last_scale_reason = Some(format!("spec.replicas pinned to {}", o.desired));
    }

    let available = o.ready >= 1 || o.desired == 0;
    set(
        &mut st.conditions,
        generation,
        "Available",
        available,
        if available {
            "ReplicasReady"
        } else {
            "NoReadyReplica"
        },
        &format!("{} of {} replicas ready", o.ready, o.desired),
    );
    let progressing = o.ready != o.desired || o.active != o.desired;
    let (reason, message) = if o.downloads.is_empty() {
        (
            if progressing { "Scaling" } else { "Stable" },
            format!("{} replicas exist, {} desired", o.active, o.desired),
        )
    } else {
        (
            "DownloadingModel",
            format!("downloading the model: {}", o.downloads.join("; ")),
        )
    };
    set(
        &mut st.conditions,
        generation,
        "Progressing",
        progressing,
        reason,
        &message,
    );
    match o.refusal {
        Some(r) => set(
            &mut st.conditions,
            generation,
            "Unschedulable",
            true,
            r.reason.as_str(),
            &r.message,
        ),
        None => set(
            &mut st.conditions,
            generation,
            "Unschedulable",
            false,
            "Placed",
            "every replica is placed",
        ),
    }
    set(
        &mut st.conditions,
        generation,
        "InvalidSpec",
        false,
        "Valid",
        "the spec is valid",
    );
    let (ready, reason, message) = ready(o);
    set(
        &mut st.conditions,
        generation,
        "Ready",
        ready,
        reason,
        &message,
    );
    // Promoted: the spec's version serves all traffic. Its reason and message say where
    // a rollout stands, with the numbers its last verdict was made on.
    if let Some(r) = o.rollout {
        let (on, reason) = match r.phase {
            RolloutPhase::Stable => (true, "Promoted"),
            RolloutPhase::Progressing => (false, "CanaryStep"),
            RolloutPhase::RolledBack => (false, "RolledBack"),
        };
        let message = r
            .message
            .clone()
            .unwrap_or_else(|| format!("version {} serves", r.stable.name));
        set(
            &mut st.conditions,
            generation,
            "Promoted",
            on,
            reason,
            &message,
        );
    }
    st
}

/// `Ready`: the spec is carried out (every desired replica ready, of the spec's version,
/// or none wanted), as `kubectl wait --for=condition=Ready` and GitOps health checks
/// (Flux's kstatus, Argo CD) read it; otherwise why not.
fn ready(o: &Observed) -> (bool, &'static str, String) {
    let counts = format!("{} of {} replicas ready", o.ready, o.desired);
    let rollout = o.rollout.filter(|r| r.phase != RolloutPhase::Stable);
    match (o.refusal, rollout) {
        (Some(r), _) if o.ready < o.desired => (false, "Unschedulable", r.message.clone()),
        (_, Some(r)) => (
            false,
            match r.phase {
                RolloutPhase::RolledBack => "RolledBack",
                _ => "RolloutProgressing",
            },
            r.message.clone().unwrap_or(counts),
        ),
        _ if o.desired == 0 => (
            true,
            "ScaledToZero",
            "no replica is wanted now; a request starts one".into(),
        ),
        _ if o.ready < o.desired => (false, "ReplicasStarting", counts),
        _ => (true, "ReplicasReady", counts),
    }
}

/// The status when the spec cannot be acted on: everything else kept as it was.
pub fn invalid(d: &InferenceDeployment, message: &str) -> InferenceDeploymentStatus {
    let mut st = with_condition(d, "InvalidSpec", "InvalidSpec", message);
    set(
        &mut st.conditions,
        d.metadata.generation,
        "Ready",
        false,
        "InvalidSpec",
        message,
    );
    st
}

/// The status while something must finish before the pass can act (the model's header
/// being read): `Progressing` with `reason` and `message`.
pub fn progressing(
    d: &InferenceDeployment,
    reason: &str,
    message: &str,
) -> InferenceDeploymentStatus {
    let mut st = with_condition(d, "Progressing", reason, message);
    // Replicas already serving stay ready while the model's header is read again.
    if st.ready_replicas == 0 {
        set(
            &mut st.conditions,
            d.metadata.generation,
            "Ready",
            false,
            reason,
            message,
        );
    }
    st
}

/// `d`'s status as it is, with condition `type_` true for `reason`.
fn with_condition(
    d: &InferenceDeployment,
    type_: &str,
    reason: &str,
    message: &str,
) -> InferenceDeploymentStatus {
    let mut st = d.status.clone().unwrap_or_default();
    st.observed_generation = d.metadata.generation;
    st.selector = Some(super::selector_string(&d.name_any()));
    set(
        &mut st.conditions,
        d.metadata.generation,
        type_,
        true,
        reason,
        message,
    );
    st
}

/// Sets a condition, keeping its transition time when the status did not change.
fn set(
    conds: &mut Vec<Condition>,
    generation: Option<i64>,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
) {
    let status = if on { "True" } else { "False" };
    if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = Time(jiff::Timestamp::now());
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message.into();
        c.observed_generation = generation;
        return;
    }
    conds.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(jiff::Timestamp::now()),
    });
}
