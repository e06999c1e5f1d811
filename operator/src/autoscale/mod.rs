//! The queue-depth autoscaling policy. Pure: time and scraped metrics are passed in, a
//! replica count and the reason for it come out.
//!
//! - **Demand** is waiting plus running requests summed over ready replicas. One
//!   replica should carry `targetQueueDepth` of it; `warmReplicas` more are kept loaded
//!   on top, so a burst does not wait for weights to load.
//! - **Scale-up** acts on the mean demand over a 60 s stable window (Knative's), at
//!   once unless `scaleUpWindowSeconds` asks for demand to hold first.
//! - **Panic**: when the mean over the short panic window already exceeds what ready
//!   *and loading* replicas can carry and is still growing, the policy scales for the
//!   demand projected over the replica load time (measured, and at most the panic
//!   window), at once unless `scaleUpWindowSeconds` is set: that window bounds panic
//!   scale-ups too, as the field says (the lowest recommendation of the window).
//!   Loading replicas count as capacity on the way, so a queue that piles up while
//!   they load is not read as new load (the overshoot of Knative serving#4344).
//! - **Scale-down** takes the highest recommendation of the scale-down window
//!   (default 300 s), as Kubernetes' HPA stabilisation does: no flapping under
//!   oscillating load.
//! - **Learned scale-down window** (`scaleDownWindowMode: Adaptive`, the default): a
//!   scale-down that a scale-up reverses within five minutes was a needless cold start.
//!   The policy then holds scale-downs long enough to have bridged that dip (up to five
//!   minutes, for an hour): the keep-alive is chosen from the idle times seen, as
//!   Shahrad et al. do for serverless functions (`Autoscaler::bridge`). The spec's
//!   window stays the floor. `Fixed` keeps exactly the spec's window, as the HPA does:
//!   cheaper on bursty load, for more flaps (the frontier benchmark has both).
//! - **Panic mode** (Knative's): once the panic condition fires, the policy stays in
//!   panic for the stable window after the last time it held; meanwhile it never scales
//!   down.
//! - **No metrics, no scale-down**: a scrape that failed is never read as zero demand.
//! - **Memory** (`Memory`): what must survive an operator restart or a leader change
//!   (the recommendations that still bound a scale-down, the panic deadline, the
//!   measured ready time) is small enough to live in the deployment's status, and
//!   `Autoscaler::restore` rebuilds the policy from it, erring towards holding.

#[cfg(test)]
mod tests;

pub mod forecast;

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use gpuscale_crds::{ScaleDownWindowMode, ScalingSpec};

/// Used for the cold-start lead time until a replica of the deployment has been seen
/// becoming ready.
pub const DEFAULT_READY_TIME: Duration = Duration::from_secs(30);
/// Demand is averaged over this window (Knative's stable window): a spike shorter
/// than a replica's load time cannot be served by scaling up, only paid for.
pub const STABLE_WINDOW: Duration = Duration::from_secs(60);
/// A replica still loading after this long (or after three measured ready times,
/// whichever is longer) has failed: it stops counting as capacity and is replaced.
pub const READY_TIMEOUT_FLOOR: Duration = Duration::from_secs(300);

/// A replica removed and then needed again within this long was a needless cold start
/// (the HPA's default scale-down window: five minutes). Also the most the learned hold
/// (`Autoscaler::bridge`) lengthens the scale-down window to.
pub const REGRET_HORIZON: Duration = Duration::from_secs(300);
/// How long a regretted scale-down is remembered: the hold it teaches lasts this long
/// after the last one.
pub const REGRET_MEMORY: Duration = Duration::from_secs(3600);

/// An even mix of the last measurement and the history: quick to learn, not thrown by
/// one slow node.
fn mix(avg: &mut Option<Duration>, took: Duration) {
    *avg = Some(match *avg {
        None => took,
        Some(prev) => (prev + took) / 2,
    });
}

/// The policy's bounds and windows, from `spec.scaling`.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Fewest replicas.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Idle replicas kept loaded on top of demand.
    pub warm: u32,
    /// Demand one replica should carry.
    pub target: f64,
    /// Demand must hold this long before a scale-up, panic or not: the scale-up goes to
    /// the lowest recommendation of this window (the HPA's scale-up stabilisation).
    pub up_window: Duration,
    /// Lower demand must hold this long before a scale-down.
    pub down_window: Duration,
    /// Window of the demand mean and of the growth measurement.
    pub panic_window: Duration,
    /// With `minReplicas: 0`, how long a deployment must have had no request before its
    /// last replica goes (`None`: it never goes to zero).
    pub to_zero_after: Option<Duration>,
    /// `scaling.predictive`: also scale for the demand forecast over the cold start
    /// ([`forecast`]), never below what the reactive rule asks.
    pub predictive: bool,
    /// Whether the scale-down window lengthens after scale-downs that were reversed
    /// ([`Autoscaler::bridge`]): `scaleDownWindowMode: Adaptive`.
    pub learn_window: bool,
}

/// Idleness before the last replica goes, when `scaleToZeroAfterSeconds` is not set
/// (KEDA's default cooldown period).
pub const DEFAULT_SCALE_TO_ZERO_AFTER: Duration = Duration::from_secs(300);

impl Params {
    /// The parameters of a deployment's `spec.scaling`.
    pub fn from_spec(s: &ScalingSpec) -> Params {
        Params {
            min: s.min_replicas,
            max: s.max_replicas.max(s.min_replicas),
            warm: s.warm_replicas,
            target: f64::from(s.target_queue_depth.max(1)),
            up_window: Duration::from_secs(s.scale_up_window_seconds.into()),
            down_window: Duration::from_secs(s.scale_down_window_seconds.into()),
            panic_window: Duration::from_secs(s.panic_window_seconds.max(1).into()),
            predictive: s.predictive,
            learn_window: s.scale_down_window_mode == ScaleDownWindowMode::Adaptive,
            to_zero_after: (s.min_replicas == 0).then(|| {
                s.scale_to_zero_after_seconds
                    .map_or(DEFAULT_SCALE_TO_ZERO_AFTER, |n| {
                        Duration::from_secs(n.into())
                    })
            }),
        }
    }

    fn bound(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }
}

/// What the controller saw at one tick.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// Waiting plus running requests over the ready replicas; `None` when no ready
    /// replica could be scraped.
    pub demand: Option<f64>,
    /// Replicas serving.
    pub ready: u32,
    /// Replicas created and still loading (failed ones excluded).
    pub loading: u32,
    /// The replica count the controller is converging to now.
    pub current: u32,
    /// Whether the next replica would start on a node that holds the model already
    /// (an http(s) model in the node's cache); `None` where it makes no difference or
    /// is not known. Picks the lead time a burst is projected over.
    pub next_warm: Option<bool>,
    /// How long the deployment has had no request at all, counted by the request
    /// router, which holds requests while a replica starts; `None` without a router
    /// (then it never goes to zero: nothing would hold the first request).
    pub idle_for: Option<Duration>,
}

/// Which way a decision goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// More replicas.
    Up,
    /// Fewer replicas.
    Down,
    /// No change.
    Hold,
}

/// The outcome of one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Replicas wanted.
    pub desired: u32,
    /// Compared with the current count.
    pub direction: Direction,
    /// Whether panic mode (queue outgrowing capacity) drove the decision.
    pub panic: bool,
    /// Why, with the numbers, for status, Events and logs.
    pub reason: Reason,
}

/// Why the policy chose what it chose.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// Demand needs this many replicas.
    Demand {
        /// Mean demand over the panic window.
        demand: f64,
        /// Replicas the demand needs, before warm ones and bounds.
        needed: u32,
        /// Idle replicas kept loaded on top.
        warm: u32,
    },
    /// Demand outgrows capacity: scaled for the demand projected at ready time.
    Panic {
        /// Demand now.
        demand: f64,
        /// Growth in requests per second.
        growth: f64,
        /// Demand expected once a new replica is ready.
        projected: f64,
        /// The lead time used.
        ready_time: Duration,
    },
    /// `scaling.predictive`: the demand forecast over the cold start needs more than
    /// the demand now.
    Predicted {
        /// Mean demand now.
        demand: f64,
        /// Its trend, per second.
        trend: f64,
        /// The demand expected when a replica started now is ready.
        forecast: f64,
        /// The cold start it looks ahead.
        lead: Duration,
    },
    /// Lower demand held for the whole scale-down window.
    Stabilised {
        /// The scale-down window.
        window: Duration,
        /// Whether the window is the learned one (longer than the spec's, after
        /// scale-downs that were reversed; [`Autoscaler::bridge`]).
        learned: bool,
    },
    /// Kept where it was: demand fits, or a scale-down is still inside its window.
    Steady,
    /// In panic mode, which forbids scaling down until it ends.
    PanicHold {
        /// Until panic mode ends (if the panic condition does not fire again).
        left: Duration,
    },
    /// The bounds changed (or were never met).
    Bounds,
    /// No ready replica could be scraped: holding.
    NoMetrics,
    /// Going to zero waits for the deployment to be idle long enough (`left`), or for
    /// a router to count requests (`None`).
    AwaitingIdle {
        /// Idleness still needed; `None` when no router reports on the deployment.
        left: Option<Duration>,
    },
    /// No request for the whole `scaleToZeroAfterSeconds`: the last replica goes.
    Idle {
        /// How long it was idle.
        idle: Duration,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Demand {
                demand,
                needed,
                warm: 0,
            } => write!(f, "queue depth {demand:.1} needs {needed} replica(s)"),
            Reason::Demand {
                demand,
                needed,
                warm,
            } => write!(
                f,
                "queue depth {demand:.1} needs {needed} replica(s), plus {warm} warm"
            ),
            Reason::Panic {
                demand,
                growth,
                projected,
                ready_time,
            } => write!(
                f,
                "panic: queue depth {demand:.0} growing {growth:.1}/s past capacity; \
                 {projected:.0} expected in the {:.0} s a replica takes to load",
                ready_time.as_secs_f64()
            ),
            Reason::Predicted {
                demand,
                trend,
                forecast,
                lead,
            } => write!(
                f,
                "predictive: queue depth {demand:.1} rising {trend:.2}/s, {forecast:.1} expected in the {:.0} s a replica takes to load",
                lead.as_secs_f64()
            ),
            Reason::Stabilised {
                window,
                learned: false,
            } => write!(
                f,
                "lower demand held for the {} s scale-down window",
                window.as_secs()
            ),
            Reason::Stabilised {
                window,
                learned: true,
            } => write!(
                f,
                "lower demand held for {} s, a scale-down window lengthened after recent scale-downs were reversed",
                window.as_secs()
            ),
            Reason::Steady => write!(f, "demand fits the current replicas"),
            Reason::PanicHold { left } => write!(
                f,
                "panic mode: no scale-down for another {:.0} s",
                left.as_secs_f64()
            ),
            Reason::Bounds => write!(f, "minReplicas/maxReplicas bound"),
            Reason::NoMetrics => write!(f, "no metrics from ready replicas; holding"),
            Reason::AwaitingIdle { left: Some(left) } => write!(
                f,
                "minReplicas 0: the last replica goes after another {:.0} s without requests",
                left.as_secs_f64()
            ),
            Reason::AwaitingIdle { left: None } => write!(
                f,
                "minReplicas 0: keeping one replica, since no request router reports on this \
                 deployment (a router holds the first request while a replica starts; \
                 give the operator --router-url or --router-selector)"
            ),
            Reason::Idle { idle } => write!(
                f,
                "no request for {:.0} s: scaled to zero",
                idle.as_secs_f64()
            ),
        }
    }
}

/// The autoscaler of one deployment: the policy plus the history it needs.
#[derive(Clone, Debug)]
pub struct Autoscaler {
    params: Params,
    /// Demand samples within the stable window.
    samples: VecDeque<(Instant, f64)>,
    /// Recommendations within the longer of the two stabilisation windows.
    recs: VecDeque<(Instant, u32)>,
    /// Smoothed time from pod creation to ready.
    ready_time: Option<Duration>,
    /// The same, of replicas whose node held the model already (warm) and of those
    /// that fetched it (cold).
    ready_warm: Option<Duration>,
    ready_cold: Option<Duration>,
    /// Panic mode lasts until then.
    panic_until: Option<Instant>,
    /// The demand forecast (`scaling.predictive`).
    holt: forecast::Holt,
    /// Recent scale-downs: when, the count after, and the window that had held.
    removals: VecDeque<(Instant, u32, Duration)>,
    /// Regretted scale-downs (the replicas removed were asked for again within
    /// [`REGRET_HORIZON`]): when it was found, and how long lower demand had lasted
    /// (the window held before the scale-down, then the time until the scale-up).
    regrets: VecDeque<(Instant, Duration)>,
}

/// What the policy must not forget when the operator restarts or the leader changes:
/// ages are relative to the moment the memory was taken.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// The recommendations that can still bound a scale-down, oldest first, each higher
    /// than every later one, as `(age, replicas)`. The last is the current one, with the
    /// age of its first tick: it is taken as still current when restored (the holding
    /// side of not knowing when it stopped). Steady load therefore gives the same memory
    /// every tick, so remembering costs no status write.
    pub recommendations: Vec<(Duration, u32)>,
    /// How much longer panic mode lasts.
    pub panic_left: Option<Duration>,
    /// The measured time a replica takes to become ready.
    pub ready_time: Option<Duration>,
}

impl Autoscaler {
    /// A policy with no history.
    pub fn new(params: Params) -> Autoscaler {
        Autoscaler {
            params,
            samples: VecDeque::new(),
            recs: VecDeque::new(),
            ready_time: None,
            ready_warm: None,
            ready_cold: None,
            panic_until: None,
            holt: forecast::Holt::default(),
            removals: VecDeque::new(),
            regrets: VecDeque::new(),
        }
    }

    /// A policy with the history of `memory`, taken `memory`'s ages before `now`.
    pub fn restore(params: Params, memory: &Memory, now: Instant) -> Autoscaler {
        let mut a = Autoscaler::new(params);
        let n = memory.recommendations.len();
        for (i, &(age, r)) in memory.recommendations.iter().enumerate() {
            let t = if i + 1 == n {
                now
            } else {
                now.checked_sub(age).unwrap_or(now)
            };
            a.recs.push_back((t, r));
        }
        a.panic_until = memory.panic_left.map(|left| now + left);
        a.ready_time = memory.ready_time;
        a
    }

    /// What must survive a restart (see `Memory`).
    pub fn memory(&self, now: Instant) -> Memory {
        let mut recommendations = Vec::new();
        if let Some(&(_, last)) = self.recs.back() {
            // The current run of equal recommendations, by its first tick.
            let mut newest = self.recs.iter().rev().take_while(|(_, r)| *r == last);
            let first = newest.by_ref().last().map_or(now, |&(t, _)| t);
            recommendations.push((now.saturating_duration_since(first), last));
            let mut max = last;
            for &(t, r) in self.recs.iter().rev().skip_while(|(_, r)| *r == last) {
                if r > max {
                    recommendations.push((now.saturating_duration_since(t), r));
                    max = r;
                }
            }
            recommendations.reverse();
        }
        Memory {
            recommendations,
            panic_left: self
                .panic_until
                .filter(|&u| u > now)
                .map(|u| u.saturating_duration_since(now)),
            ready_time: self.ready_time,
        }
    }

    /// Whether panic mode holds at `now`.
    pub fn panicking(&self, now: Instant) -> bool {
        self.panic_until.is_some_and(|u| now < u)
    }

    /// The current parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Takes new parameters (a spec change), keeping the history.
    pub fn set_params(&mut self, params: Params) {
        self.params = params;
    }

    /// Records how long a replica took from creation to ready.
    pub fn observe_ready(&mut self, took: Duration) {
        mix(&mut self.ready_time, took);
    }

    /// Records a replica's start and whether its node held the model already
    /// (`None`: no model to fetch, as for a node path).
    pub fn observe_start(&mut self, took: Duration, warm: Option<bool>) {
        self.observe_ready(took);
        match warm {
            Some(true) => mix(&mut self.ready_warm, took),
            Some(false) => mix(&mut self.ready_cold, took),
            None => {}
        }
    }

    /// How long the next replica will take to become ready: the measured start of its
    /// kind (warm or cold node cache) where known, else the overall one.
    pub fn lead_time(&self, next_warm: Option<bool>) -> Duration {
        let by_kind = match next_warm {
            Some(true) => self.ready_warm,
            Some(false) => self.ready_cold,
            None => None,
        };
        by_kind.unwrap_or_else(|| self.ready_time())
    }

    /// The measured time a replica takes to become ready (a default until measured).
    pub fn ready_time(&self) -> Duration {
        self.ready_time.unwrap_or(DEFAULT_READY_TIME)
    }

    /// The ready time measured so far (`None` before any replica became ready).
    pub fn measured_ready_time(&self) -> Option<Duration> {
        self.ready_time
    }

    /// Whether a replica still loading after `age` has failed to become ready.
    pub fn is_stuck(&self, age: Duration) -> bool {
        // Against the slower kind of start: a cold one is not a stuck warm one.
        let slowest = self.ready_time().max(self.ready_cold.unwrap_or_default());
        age > READY_TIMEOUT_FLOOR.max(slowest * 3)
    }

    /// The scale-down window learned from regretted scale-downs: long enough to have
    /// bridged the longest dip of the last [`REGRET_MEMORY`] that ended in a scale-up
    /// back through the removed replicas (plus a quarter, as a margin), at most
    /// [`REGRET_HORIZON`]. A dip counts from when lower demand began: the window that
    /// held before the scale-down, then the time to the scale-up.
    ///
    /// A keep-alive chosen from the idle times seen, as "Serverless in the Wild"
    /// (Shahrad et al., USENIX ATC 2020) picks one per application; and the ski-rental
    /// rule behind it: keeping a replica through a dip shorter than a cold start costs
    /// less than the cold start, and a cold start also costs the requests that wait.
    pub fn bridge(&self, now: Instant) -> Duration {
        if !self.params.learn_window {
            return Duration::ZERO;
        }
        self.regrets
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= REGRET_MEMORY)
            .map(|&(_, dip)| dip.mul_f64(1.25).min(REGRET_HORIZON))
            .max()
            .unwrap_or_default()
    }

    /// Scale-downs reversed within [`REGRET_HORIZON`] (needless cold starts) found over
    /// the last [`REGRET_MEMORY`].
    pub fn regretted(&self) -> usize {
        self.regrets.len()
    }

    /// Learns from the policy's own moves (not a change of the bounds): remembers a
    /// scale-down with the window that held before it (its reason's), or finds the
    /// recent scale-downs a scale-up reverses.
    fn learn(&mut self, now: Instant, dec: &Decision) {
        while self
            .removals
            .front()
            .is_some_and(|&(t, _, _)| now.saturating_duration_since(t) > REGRET_HORIZON)
        {
            self.removals.pop_front();
        }
        while self
            .regrets
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > REGRET_MEMORY)
        {
            self.regrets.pop_front();
        }
        let to = dec.desired;
        match (dec.direction, &dec.reason) {
            (Direction::Down, Reason::Stabilised { window, .. }) => {
                self.removals.push_back((now, to, *window));
            }
            (Direction::Up, reason) if *reason != Reason::Bounds => {
                // A scale-up to `to` regrets every recent scale-down that went below
                // it; the longest dip among them is kept.
                let mut longest = None;
                self.removals.retain(|&(t, after, window)| {
                    let reversed = after < to;
                    if reversed {
                        let dip = window + now.saturating_duration_since(t);
                        longest = longest.max(Some(dip));
                    }
                    !reversed
                });
                if let Some(dip) = longest {
                    self.regrets.push_back((now, dip));
                }
            }
            _ => {}
        }
    }

    /// One tick: the replica count wanted at `now`.
    pub fn decide(&mut self, now: Instant, obs: &Observation) -> Decision {
        let dec = self.decide_inner(now, obs);
        self.learn(now, &dec);
        dec
    }

    fn decide_inner(&mut self, now: Instant, obs: &Observation) -> Decision {
        let dec = self.decide_by_demand(now, obs);
        if dec.desired > 0 || obs.current == 0 {
            return dec;
        }
        // The last replica goes only after the deployment has been idle long enough,
        // and only where a router will hold the next request while a replica starts.
        let left = match (self.params.to_zero_after, obs.idle_for) {
            (Some(after), Some(idle)) if idle >= after => {
                return Decision {
                    reason: Reason::Idle { idle },
                    ..dec
                }
            }
            (Some(after), Some(idle)) => Some(after - idle),
            _ => None,
        };
        let keep = decision(obs.current, 1, dec.panic, Reason::AwaitingIdle { left });
        if keep.direction == Direction::Down {
            Decision {
                reason: dec.reason,
                ..keep
            }
        } else {
            keep
        }
    }

    fn decide_by_demand(&mut self, now: Instant, obs: &Observation) -> Decision {
        let p = self.params.clone();
        let Some(latest) = obs.demand else {
            let desired = p.bound(obs.current);
            return decision(obs.current, desired, false, Reason::NoMetrics);
        };
        let latest = latest.max(0.0);
        self.samples.push_back((now, latest));
        let stable = STABLE_WINDOW.max(p.panic_window);
        trim(&mut self.samples, now, stable);
        let mean = mean_since(&self.samples, now, stable);
        let short = mean_since(&self.samples, now, p.panic_window);
        let growth = slope(&self.samples, now, p.panic_window);
        let capacity = f64::from(obs.ready + obs.loading) * p.target;
        let panic = short > capacity && growth > 0.0;
        if panic {
            self.panic_until = Some(now + stable);
        }
        let in_panic = self.panicking(now);
        let (demand, panic_reason) = if panic {
            // Project over the lead time, but no further than the growth was measured:
            // a longer extrapolation of a noisy slope buys replicas for spikes that are
            // gone before they load.
            let ready_time = self.lead_time(obs.next_warm);
            let lead = ready_time.min(p.panic_window).as_secs_f64();
            let projected = short + growth * lead;
            let reason = Reason::Panic {
                demand: short,
                growth,
                projected,
                ready_time,
            };
            (projected, Some(reason))
        } else {
            (mean, None)
        };
        let mut needed = (demand / p.target).ceil().min(f64::from(u32::MAX)) as u32;
        let mut reason = panic_reason.unwrap_or(Reason::Demand {
            demand: mean,
            needed,
            warm: p.warm,
        });
        if p.predictive {
            // Replicas for the demand expected once one started now is ready, when that
            // is more than the reactive rule asks (and only then: never fewer).
            self.holt.observe(now, short);
            let lead = self.lead_time(obs.next_warm);
            if let Some((forecast, trend)) = self.holt.forecast(lead) {
                let ahead = (forecast / p.target).ceil().min(f64::from(u32::MAX)) as u32;
                if ahead > needed {
                    needed = ahead;
                    reason = Reason::Predicted {
                        demand: mean,
                        trend,
                        forecast,
                        lead,
                    };
                }
            }
        }
        let rec = p.bound(needed.saturating_add(p.warm));

        // One signal for both directions, so the two never disagree and flap. After a
        // burst the scale-down steps down as the mean decays: gradual, like the HPA's.
        self.recs.push_back((now, rec));
        let down_window = p.down_window.max(self.bridge(now));
        let keep = p.up_window.max(down_window);
        while self
            .recs
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > keep)
        {
            self.recs.pop_front();
        }
        let in_window = |w: Duration| {
            self.recs
                .iter()
                .filter(move |(t, _)| now.saturating_duration_since(*t) <= w)
                .map(|&(_, r)| p.bound(r))
        };
        // `scaleUpWindowSeconds` bounds panic scale-ups too: the field says demand must
        // hold that long, and a user who sets it is buying fewer replicas for spikes
        // shorter than it (the frontier benchmark's cheap end) with the misses they
        // cause. At 0, the default, panic acts at once, as Knative's does.
        let up = if p.up_window.is_zero() {
            rec
        } else {
            in_window(p.up_window).min().unwrap_or(rec)
        };
        let down = in_window(down_window).max().unwrap_or(rec);

        let current = obs.current;
        if up > current {
            decision(current, up, in_panic, reason)
        } else if in_panic && down < current && current <= p.max {
            let left = self
                .panic_until
                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
            decision(current, current, true, Reason::PanicHold { left })
        } else if down < current {
            let why = if current > p.max {
                Reason::Bounds
            } else {
                Reason::Stabilised {
                    window: down_window,
                    learned: down_window > p.down_window,
                }
            };
            decision(current, down, false, why)
        } else if current < p.min {
            decision(current, p.min, false, Reason::Bounds)
        } else {
            decision(current, current, false, Reason::Steady)
        }
    }
}

fn decision(current: u32, desired: u32, panic: bool, reason: Reason) -> Decision {
    let direction = match desired.cmp(&current) {
        std::cmp::Ordering::Greater => Direction::Up,
        std::cmp::Ordering::Less => Direction::Down,
        std::cmp::Ordering::Equal => Direction::Hold,
    };
    let reason = match (direction, &reason) {
        (
            Direction::Hold,
            Reason::NoMetrics | Reason::PanicHold { .. } | Reason::AwaitingIdle { .. },
        ) => reason,
        (Direction::Hold, _) => Reason::Steady,
        _ => reason,
    };
    Decision {
        desired,
        direction,
        panic,
        reason,
    }
}

/// Drops samples older than `window`.
fn trim(samples: &mut VecDeque<(Instant, f64)>, now: Instant, window: Duration) {
    while samples
        .front()
        .is_some_and(|&(t, _)| now.saturating_duration_since(t) > window)
    {
        samples.pop_front();
    }
}

fn recent(
    samples: &VecDeque<(Instant, f64)>,
    now: Instant,
    window: Duration,
) -> impl Iterator<Item = (f64, f64)> + Clone + '_ {
    samples
        .iter()
        .filter(move |(t, _)| now.saturating_duration_since(*t) <= window)
        .map(move |&(t, v)| (-(now.saturating_duration_since(t).as_secs_f64()), v))
}

/// Mean of the samples within `window` (0 with none).
fn mean_since(samples: &VecDeque<(Instant, f64)>, now: Instant, window: Duration) -> f64 {
    let (n, sum) = recent(samples, now, window).fold((0.0, 0.0), |(n, s), (_, v)| (n + 1.0, s + v));
    if n == 0.0 {
        0.0
    } else {
        sum / n
    }
}

/// Least-squares growth of the samples within `window`, per second (0 with fewer than
/// two distinct times).
fn slope(samples: &VecDeque<(Instant, f64)>, now: Instant, window: Duration) -> f64 {
    let points = recent(samples, now, window);
    let n = points.clone().count() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.clone().map(|p| p.0).sum::<f64>() / n;
    let my = points.clone().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}
