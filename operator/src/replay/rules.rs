//! The scaling rules a replay compares: gpuscale's policy, and the two rules users
//! reach for today, modelled on their documented defaults.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{ReplicaView, ScalingRule};
use crate::autoscale::{Autoscaler, Observation, Params};

/// gpuscale's policy ([`crate::autoscale`]), ticking at the operator's scrape interval.
pub struct GpuscaleRule {
    scaler: Autoscaler,
    interval: f64,
    origin: Instant,
    seen_ready: HashSet<u64>,
}

impl GpuscaleRule {
    /// The policy with `params`, scraping every `interval` seconds.
    pub fn new(params: Params, interval: f64) -> GpuscaleRule {
        GpuscaleRule {
            scaler: Autoscaler::new(params),
            interval,
            origin: Instant::now(),
            seen_ready: HashSet::new(),
        }
    }
}

impl ScalingRule for GpuscaleRule {
    fn name(&self) -> String {
        let p = self.scaler.params();
        format!(
            "gpuscale{} (queue {} per replica, {} warm, {} s scrape)",
            if p.predictive { " predictive" } else { "" },
            p.target,
            p.warm,
            self.interval
        )
    }

    fn interval(&self) -> f64 {
        self.interval
    }

    fn desired(&mut self, now: f64, replicas: &[ReplicaView]) -> u32 {
        let mut demand = 0;
        let mut ready = 0;
        for r in replicas {
            if let Some(at) = r.ready_since {
                ready += 1;
                demand += r.waiting + r.running;
                if self.seen_ready.insert(r.id) && r.created > 0.0 {
                    self.scaler
                        .observe_ready(Duration::from_secs_f64(at - r.created));
                }
            }
        }
        let obs = Observation {
            demand: Some(f64::from(demand)),
            ready,
            loading: replicas.len() as u32 - ready,
            current: replicas.len() as u32,
            next_warm: None,
            idle_for: None,
        };
        let at = self.origin + Duration::from_secs_f64(now);
        self.scaler.decide(at, &obs).desired
    }
}

/// Kubernetes' HorizontalPodAutoscaler on GPU utilisation (the DCGM "GPU busy"
/// fraction): `desired = ceil(ready x utilisation / target)`, 10% tolerance, a sync
/// every 15 s, scale-up limited to max(double, +4) per sync, scale-down stabilised
/// over 300 s, no scale-up stabilisation unless one is set.
pub struct HpaRule {
    hpa: Hpa,
    target_utilisation: f64,
    last_busy: HashMap<u64, (f64, f64)>,
}

impl HpaRule {
    /// An HPA with the documented defaults and a `target_utilisation` (0.7 for 70%).
    pub fn new(min: u32, max: u32, target_utilisation: f64) -> HpaRule {
        HpaRule {
            hpa: Hpa::new(min, max),
            target_utilisation,
            last_busy: HashMap::new(),
        }
    }
}

impl HpaRule {
    /// The same rule with another scale-down stabilisation window (the frontier sweep).
    pub fn with_window(mut self, seconds: f64) -> HpaRule {
        self.hpa.window = seconds;
        self
    }

    /// The same rule with a scale-up stabilisation window
    /// (`behavior.scaleUp.stabilizationWindowSeconds`; the frontier sweep).
    pub fn with_up_window(mut self, seconds: f64) -> HpaRule {
        self.hpa.up_window = seconds;
        self
    }
}

impl ScalingRule for HpaRule {
    fn name(&self) -> String {
        format!(
            "HPA-style (GPU utilisation {:.0}%, {} s sync, {} s scale-up, {} s scale-down)",
            self.target_utilisation * 100.0,
            self.hpa.sync,
            self.hpa.up_window,
            self.hpa.window
        )
    }

    fn interval(&self) -> f64 {
        self.hpa.sync
    }

    fn desired(&mut self, now: f64, replicas: &[ReplicaView]) -> u32 {
        let current = replicas.len() as u32;
        let mut utils = Vec::new();
        for r in replicas.iter().filter(|r| r.ready_since.is_some()) {
            let (t, busy) = self
                .last_busy
                .insert(r.id, (now, r.busy_seconds))
                .unwrap_or((r.ready_since.unwrap_or(now), 0.0));
            if now > t {
                utils.push(((r.busy_seconds - busy) / (now - t)).clamp(0.0, 1.0));
            }
        }
        let wanted = if utils.is_empty() {
            None
        } else {
            let util = utils.iter().sum::<f64>() / utils.len() as f64;
            let ratio = util / self.target_utilisation;
            ((ratio - 1.0).abs() > 0.1).then(|| (utils.len() as f64 * ratio).ceil() as u32)
        };
        self.hpa.decide(now, current, wanted)
    }
}

/// KEDA's Prometheus scaler on queue depth, as KEDA runs it with one or more replicas:
/// KEDA serves the metric, and the HorizontalPodAutoscaler it creates (an External
/// metric with target type AverageValue = the threshold) reads it at every HPA sync,
/// 15 s: `desired = ceil(total queue / threshold)`, with the HPA's 10% tolerance, its
/// default scale-up limit (the larger of doubling and +4 pods per sync) and its 300 s
/// scale-down stabilisation. KEDA's own `pollingInterval` (30 s) decides only
/// activation between 0 and 1 replica, and `cooldownPeriod` (300 s) only the step to
/// 0; the replays keep at least one replica, so neither arises. Sources: KEDA,
/// "Scaling Deployments, StatefulSets & Custom Resources" (pollingInterval,
/// cooldownPeriod; <https://keda.sh/docs/2.16/reference/scaledobject-spec/>);
/// Kubernetes, "Horizontal Pod Autoscaling", algorithm details and default behavior
/// (<https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/>).
pub struct KedaRule {
    hpa: Hpa,
    threshold: f64,
}

impl KedaRule {
    /// KEDA with its documented defaults and a per-replica queue `threshold`.
    pub fn new(min: u32, max: u32, threshold: f64) -> KedaRule {
        KedaRule {
            hpa: Hpa::new(min, max),
            threshold,
        }
    }

    /// The same rule with another scale-down stabilisation window (the frontier sweep).
    pub fn with_window(mut self, seconds: f64) -> KedaRule {
        self.hpa.window = seconds;
        self
    }

    /// The same rule with a scale-up stabilisation window on the HPA KEDA creates
    /// (`advanced.horizontalPodAutoscalerConfig.behavior.scaleUp`; the frontier sweep).
    pub fn with_up_window(mut self, seconds: f64) -> KedaRule {
        self.hpa.up_window = seconds;
        self
    }
}

impl ScalingRule for KedaRule {
    fn name(&self) -> String {
        format!(
            "KEDA-style (queue {} per replica, {} s HPA sync, {} s scale-up, {} s scale-down)",
            self.threshold, self.hpa.sync, self.hpa.up_window, self.hpa.window
        )
    }

    fn interval(&self) -> f64 {
        self.hpa.sync
    }

    fn desired(&mut self, now: f64, replicas: &[ReplicaView]) -> u32 {
        let current = replicas.len() as u32;
        let queue: u32 = replicas.iter().map(|r| r.waiting + r.running).sum();
        // AverageValue: the usage ratio is the per-replica average over the target.
        let ratio = f64::from(queue) / f64::from(current.max(1)) / self.threshold;
        let within = current > 0 && (ratio - 1.0).abs() <= 0.1;
        let wanted = (!within).then(|| (f64::from(queue) / self.threshold).ceil() as u32);
        self.hpa.decide(now, current, wanted)
    }
}

/// What the HorizontalPodAutoscaler does with a metric's replica count, for both
/// peers: its sync period, its default scale-up limit (the larger of doubling and +4
/// pods per sync), the replica bounds, and the stabilisation of [`stabilised`].
struct Hpa {
    min: u32,
    max: u32,
    sync: f64,
    /// Scale-down stabilisation (`behavior.scaleDown.stabilizationWindowSeconds`).
    window: f64,
    /// Scale-up stabilisation (`behavior.scaleUp.stabilizationWindowSeconds`).
    up_window: f64,
    recs: VecDeque<(f64, u32)>,
}

impl Hpa {
    /// The documented defaults: 15 s sync, 300 s scale-down window, none for scale-up.
    fn new(min: u32, max: u32) -> Hpa {
        Hpa {
            min,
            max,
            sync: 15.0,
            window: 300.0,
            up_window: 0.0,
            recs: VecDeque::new(),
        }
    }

    /// The replica count at `now` for a metric that asks `wanted` replicas (`None`:
    /// within the 10% tolerance, or nothing to read, so the current count).
    fn decide(&mut self, now: f64, current: u32, wanted: Option<u32>) -> u32 {
        let rec = wanted
            .map_or(current, |n| {
                n.min(current.saturating_mul(2).max(current + 4))
            })
            .clamp(self.min, self.max);
        stabilised(
            &mut self.recs,
            now,
            (self.up_window, self.window),
            rec,
            current,
        )
    }
}

/// Kubernetes' stabilisation of the HPA's recommendation
/// (`stabilizeRecommendationWithBehaviors` in `pkg/controller/podautoscaler/horizontal.go`):
/// scale up to the lowest recommendation of the last `up` seconds (at once when `up` is
/// 0, the default), and down to the highest of the last `down` seconds; otherwise hold.
/// Source: Kubernetes, "Horizontal Pod Autoscaling", configurable scaling behavior,
/// stabilization window (<https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#stabilization-window>).
fn stabilised(
    recs: &mut VecDeque<(f64, u32)>,
    now: f64,
    (up, down): (f64, f64),
    rec: u32,
    current: u32,
) -> u32 {
    recs.push_back((now, rec));
    while recs.front().is_some_and(|&(t, _)| now - t > up.max(down)) {
        recs.pop_front();
    }
    let within = |w: f64| {
        recs.iter()
            .filter(move |&&(t, _)| now - t <= w)
            .map(|&(_, r)| r)
    };
    let up_rec = within(up).min().unwrap_or(rec);
    let down_rec = within(down).max().unwrap_or(rec);
    current.max(up_rec).min(down_rec)
}
