//! The rollout policy: how a new version (a new pod template) replaces the stable one.
//! Pure: what the pass observed and the time come in, the next rollout status and the
//! event to publish come out; the reconcile loop keeps the status and carries it out.
//!
//! - A change of the template (model, resources or worker) starts a rollout: the new
//!   version is the **canary**; each step of `rollout.steps` (default 10 → 50 → 100 %)
//!   asks for the canary's share of the replicas (`split`), and routes its share of the
//!   traffic to it once those replicas are ready (the request routers read
//!   `status.rollout.canaryWeight`).
//! - Each step holds `stepSeconds` and is judged on what the routers measured over the
//!   same window for both versions, as Argo Rollouts' and Flagger's analyses do: the
//!   canary's error ratio against `rollbackErrorPercent` (early, as soon as it has
//!   `minRequests` answers), and its p95 TTFT and inter-token latency against the
//!   stable version's times `1 + rollbackLatencyPercent / 100`. Replicas that crash,
//!   or are not ready within `readyTimeoutSeconds`, fail the step too.
//! - A failed step **rolls back**: the canary's share goes to 0 and its replicas go;
//!   the stable version stays pinned (`RolledBack`) until the spec changes again. The
//!   last step passed **promotes** the canary: it becomes the stable version.
//! - Without routers nothing can split traffic or measure it: the new version then
//!   replaces the old as its replicas become ready (a plain surge), and status says so.

use gpuscale_crds::{Revision, RolloutPhase, RolloutSpec, RolloutStatus};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// What the routers saw of one version over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    /// Answers relayed from its replicas.
    pub requests: f64,
    /// Of those, 5xx answers and answers cut short.
    pub errors: f64,
    /// p95 time to first byte, seconds (`None`: no answer in the window).
    pub ttft_p95: Option<f64>,
    /// p95 time between streamed chunks, seconds (`None`: nothing streamed).
    pub itl_p95: Option<f64>,
}

impl Measured {
    fn error_percent(&self) -> f64 {
        if self.requests > 0.0 {
            100.0 * self.errors / self.requests
        } else {
            0.0
        }
    }
}

/// Both versions over the same window, since `since`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub stable: Measured,
    pub canary: Measured,
    pub since: Timestamp,
}

/// What one pass observed.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The version the spec asks for now.
    pub revision: &'a Revision,
    /// Replicas the autoscaler wants, both versions together.
    pub desired: u32,
    /// Ready replicas of the canary.
    pub canary_ready: u32,
    /// A canary replica that failed on its own (crashed, never started): why.
    pub canary_failure: Option<String>,
    /// The routers' measurements since the step's window began (`None`: no complete
    /// reading of every router).
    pub window: Option<Window>,
    /// Whether routers carry the traffic (and so can split and measure it).
    pub routed: bool,
    pub now: Timestamp,
}

/// What to tell the user about a pass's change, as an Event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// `RolloutStarted`, `RolloutStep`, `RolloutPromoted`, `RolledBack`, `RolloutAbandoned`.
    pub reason: &'static str,
    pub message: String,
    pub warning: bool,
}

/// The rollout's status after a pass, and the event it calls for.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub status: RolloutStatus,
    pub event: Option<Event>,
}

/// How many replicas of each version: `(stable, canary)` for `desired` replicas with
/// the canary at `percent` of the traffic. Each version gets replicas in proportion to
/// its share, rounded up (the canary at least one while it has any share), and the
/// canary more where rounding would make its replicas busier than the stable ones: up
/// to an even split a canary replica never carries more than a stable one, so their
/// latencies are compared under like load. The two together stay within
/// `desired + max_surge`, the stable version giving way. With `max_surge` 0 they add up to `desired`: the stable version gives up
/// a replica before the canary gets one (replace in place). While a canary starts, the
/// plan keeps the stable replicas it is to lose until the canary is ready, so capacity
/// does not fall below `desired`.
pub fn split(desired: u32, percent: u32, max_surge: u32) -> (u32, u32) {
    if desired == 0 {
        return (0, 0);
    }
    let percent = percent.min(100);
    let stable_share = (desired * (100 - percent)).div_ceil(100);
    // Enough canaries that none carries more than a stable replica: percent / canary
    // ≤ (100 - percent) / stable.
    let fair = if percent < 100 {
        (percent * stable_share).div_ceil(100 - percent)
    } else {
        desired
    };
    let canary = (desired * percent)
        .div_ceil(100)
        .max(fair)
        .clamp(1, desired);
    let stable = stable_share.min(desired + max_surge - canary);
    (stable, canary)
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn secs_since(t: Option<&Time>, now: Timestamp) -> f64 {
    t.map_or(0.0, |t| now.duration_since(t.0).as_secs_f64().max(0.0))
}

/// The stable status of `revision` alone.
pub fn stable(revision: &Revision) -> RolloutStatus {
    RolloutStatus {
        phase: RolloutPhase::Stable,
        stable: revision.clone(),
        canary: None,
        step: 0,
        canary_weight: 0,
        step_asked_at: None,
        step_started_at: None,
        message: None,
    }
}

/// The canary's target share of traffic at the status's step.
pub fn step_percent(spec: &RolloutSpec, status: &RolloutStatus) -> u32 {
    spec.steps.get(status.step as usize).copied().unwrap_or(100)
}

/// One pass of the policy.
pub fn advance(spec: &RolloutSpec, prev: Option<&RolloutStatus>, obs: &Observed) -> Outcome {
    let rev = obs.revision;
    let Some(prev) = prev else {
        return Outcome {
            status: stable(rev),
            event: None,
        };
    };
    let same = |r: &Option<Revision>| r.as_ref().is_some_and(|c| c.name == rev.name);
    if rev.name == prev.stable.name {
        // Back to (or still at) the stable version. Its size may have been read since.
        let mut status = stable(rev);
        let event = (prev.phase == RolloutPhase::Progressing).then(|| Event {
            reason: "RolloutAbandoned",
            message: format!(
                "the spec is back to version {}: the canary {} is removed",
                rev.name,
                prev.canary.as_ref().map_or("", |c| c.name.as_str())
            ),
            warning: false,
        });
        if prev.phase == RolloutPhase::Stable {
            status.message.clone_from(&prev.message);
        }
        return Outcome { status, event };
    }
    if prev.phase == RolloutPhase::RolledBack && same(&prev.canary) {
        // Pinned: the version rolled back stays away until the spec changes again.
        return Outcome {
            status: prev.clone(),
            event: None,
        };
    }
    if prev.phase != RolloutPhase::Progressing || !same(&prev.canary) {
        let steps: Vec<String> = spec.steps.iter().map(|s| format!("{s}%")).collect();
        let message = if obs.routed {
            format!(
                "rolling out version {} over {} in steps of {} (each held {} s)",
                rev.name,
                prev.stable.name,
                steps.join(" → "),
                spec.step_seconds
            )
        } else {
            format!(
                "rolling out version {} over {}: no request router, so no traffic steps; \
                 it replaces the old version as its replicas become ready",
                rev.name, prev.stable.name
            )
        };
        return Outcome {
            status: RolloutStatus {
                phase: RolloutPhase::Progressing,
                stable: prev.stable.clone(),
                canary: Some(rev.clone()),
                step: 0,
                canary_weight: 0,
                step_asked_at: Some(time(obs.now)),
                step_started_at: None,
                message: Some(message.clone()),
            },
            event: Some(Event {
                reason: "RolloutStarted",
                message,
                warning: false,
            }),
        };
    }
    progress(spec, prev, obs)
}

/// A rollout in progress: readiness, then the step's window, then its verdict.
fn progress(spec: &RolloutSpec, prev: &RolloutStatus, obs: &Observed) -> Outcome {
    let mut status = prev.clone();
    // The canary's own revision is the spec's: keep its latest sizing.
    status.canary = Some(obs.revision.clone());
    let percent = step_percent(spec, prev);
    let (_, wanted) = split(obs.desired, percent, spec.max_surge);
    if let Some(why) = &obs.canary_failure {
        return rollback(
            prev,
            format!("a replica of version {} failed: {why}", obs.revision.name),
        );
    }
    let stay = |status: RolloutStatus| Outcome {
        status,
        event: None,
    };
    if !obs.routed {
        // Nothing splits or measures traffic: promote once every replica wanted is of
        // the new version and ready.
        if obs.canary_ready >= obs.desired.max(1) {
            return promote(
                prev,
                obs,
                "its replicas are ready (no router measured them)".into(),
            );
        }
        return stay(status);
    }
    if obs.canary_ready < wanted || wanted == 0 {
        if wanted == 0 {
            // Scaled to zero: nothing to wait for; the timeout starts when replicas are
            // wanted again.
            status.step_asked_at = Some(time(obs.now));
        } else if secs_since(prev.step_asked_at.as_ref(), obs.now)
            > f64::from(spec.ready_timeout_seconds)
        {
            return rollback(
                prev,
                format!(
                    "{} of {wanted} replicas of version {} ready after {} s (rollout.readyTimeoutSeconds)",
                    obs.canary_ready, obs.revision.name, spec.ready_timeout_seconds
                ),
            );
        }
        return stay(status);
    }
    if prev.canary_weight != percent || prev.step_started_at.is_none() {
        // The step's replicas are ready: route its share; its window begins.
        status.canary_weight = percent;
        status.step_started_at = Some(time(obs.now));
        let message = format!(
            "step {} of {}: version {} takes {percent}% of the traffic",
            prev.step + 1,
            spec.steps.len(),
            obs.revision.name
        );
        status.message = Some(message.clone());
        return Outcome {
            status,
            event: Some(Event {
                reason: "RolloutStep",
                message,
                warning: false,
            }),
        };
    }
    // No complete reading of the routers: no verdict either way.
    let Some(w) = obs.window else {
        return stay(status);
    };
    let (c, s) = (w.canary, w.stable);
    let enough = c.requests >= f64::from(spec.min_requests);
    let started = prev.step_started_at.as_ref().map_or(w.since, |t| t.0);
    let held =
        obs.now.duration_since(started.max(w.since)).as_secs_f64() >= f64::from(spec.step_seconds);
    let error_limit = f64::from(spec.rollback_error_percent);
    if (enough || held) && c.errors > 0.0 && c.error_percent() > error_limit {
        return rollback(
            prev,
            format!(
                "version {} failed {:.0} of {:.0} requests ({:.1}%, above rollout.rollbackErrorPercent {}%) at {}% of the traffic; version {} failed {:.1}% in the same window",
                obs.revision.name,
                c.errors,
                c.requests,
                c.error_percent(),
                spec.rollback_error_percent,
                percent,
                prev.stable.name,
                s.error_percent()
            ),
        );
    }
    let factor = 1.0 + f64::from(spec.rollback_latency_percent) / 100.0;
    let baseline_enough = s.requests >= f64::from(spec.min_requests);
    if enough && baseline_enough {
        for (what, canary, stable) in [
            ("p95 time to first token", c.ttft_p95, s.ttft_p95),
            ("p95 inter-token latency", c.itl_p95, s.itl_p95),
        ] {
            if let (Some(cv), Some(sv)) = (canary, stable) {
                if cv > sv * factor {
                    return rollback(
                        prev,
                        format!(
                            "version {} {what} {:.0} ms is more than {factor:.2}x version {}'s {:.0} ms over the same window (rollout.rollbackLatencyPercent {}%)",
                            obs.revision.name,
                            cv * 1e3,
                            prev.stable.name,
                            sv * 1e3,
                            spec.rollback_latency_percent
                        ),
                    );
                }
            }
        }
    }
    if !held {
        return stay(status);
    }
    let numbers = format!(
        "{:.0} requests, {:.1}% errors, p95 TTFT {}",
        c.requests,
        c.error_percent(),
        c.ttft_p95
            .map_or("n/a".into(), |t| format!("{:.0} ms", t * 1e3))
    );
    if (prev.step as usize) + 1 >= spec.steps.len() {
        return promote(prev, obs, format!("every step passed; the last: {numbers}"));
    }
    status.step += 1;
    status.step_asked_at = Some(time(obs.now));
    status.step_started_at = None;
    let message = format!(
        "step {} of {} passed ({numbers}); next: {}%",
        prev.step + 1,
        spec.steps.len(),
        step_percent(spec, &status)
    );
    status.message = Some(message.clone());
    Outcome {
        status,
        event: Some(Event {
            reason: "RolloutStep",
            message,
            warning: false,
        }),
    }
}

fn promote(prev: &RolloutStatus, obs: &Observed, why: String) -> Outcome {
    let message = format!(
        "version {} promoted over {}: {why}",
        obs.revision.name, prev.stable.name
    );
    let mut status = stable(obs.revision);
    status.message = Some(message.clone());
    Outcome {
        status,
        event: Some(Event {
            reason: "RolloutPromoted",
            message,
            warning: false,
        }),
    }
}

fn rollback(prev: &RolloutStatus, why: String) -> Outcome {
    let message = format!(
        "rolled back to version {}: {why}; the stable version stays until the spec changes again",
        prev.stable.name
    );
    let mut status = prev.clone();
    status.phase = RolloutPhase::RolledBack;
    status.canary_weight = 0;
    status.step_started_at = None;
    status.message = Some(message.clone());
    Outcome {
        status,
        event: Some(Event {
            reason: "RolledBack",
            message,
            warning: true,
        }),
    }
}

#[cfg(test)]
mod tests;
