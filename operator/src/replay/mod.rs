//! Trace replay: a discrete-event model of replicas serving a request trace under a
//! scaling rule, for the autoscaler benchmark and capacity planning. Pure: no clock,
//! no I/O; an hour of traffic replays in milliseconds.
//!
//! The model of a replica: it loads for `load_seconds` (a cold start), then runs up
//! to `max_batch` requests at once, each for `prompt / prefill rate` (its time to first
//! token) plus `generated / decode rate`; more wait in its queue of `queue_capacity`,
//! and beyond that are refused (429). Requests go to the ready replica with the fewest
//! in flight. A replica chosen for scale-down takes no new requests, finishes what it
//! holds (drain) and only then goes. GPU-seconds count every replica from creation to
//! removal, loading and draining included. A replica started during the replay and
//! removed within [`FLAP_SECONDS`] of its creation is a flap: a cold start that bought
//! almost nothing.

pub mod frontier;
pub mod report;
mod rules;
pub mod synthetic;
mod trace;

pub use rules::{GpuscaleRule, HpaRule, KedaRule};
pub use trace::{Trace, TraceError, TraceRequest};

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// A replica started and removed within this many seconds is a flap. Five minutes:
/// the scale-down stabilisation window of the HorizontalPodAutoscaler's default
/// behaviour, so a flap is a replica that did not outlive one window.
pub const FLAP_SECONDS: f64 = 300.0;

/// How one replica performs.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaModel {
    /// Requests run at once.
    pub max_batch: u32,
    /// Requests that may wait; more are refused.
    pub queue_capacity: u32,
    /// Prompt tokens per second for one request.
    pub prefill_tokens_per_second: f64,
    /// Generated tokens per second for one request.
    pub decode_tokens_per_second: f64,
    /// Seconds from creation to ready.
    pub load_seconds: f64,
    /// GPUs per replica (GPU-seconds are replica-seconds times this).
    pub gpus: u32,
}

/// What a scaling rule sees of one replica at a tick.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaView {
    /// Stable id.
    pub id: u64,
    /// When it was created.
    pub created: f64,
    /// When it became ready (`None` while loading).
    pub ready_since: Option<f64>,
    /// Requests waiting.
    pub waiting: u32,
    /// Requests running.
    pub running: u32,
    /// Seconds it has had at least one request running (a GPU-utilisation counter).
    pub busy_seconds: f64,
}

/// A scaling rule under replay: asked for a replica count every `interval` seconds.
pub trait ScalingRule {
    /// Name for the report.
    fn name(&self) -> String;
    /// Seconds between ticks.
    fn interval(&self) -> f64;
    /// Replicas wanted at `now`, given the replicas that are not draining.
    fn desired(&mut self, now: f64, replicas: &[ReplicaView]) -> u32;
}

/// A boxed rule is a rule: a sweep can keep how to make each of its settings, whatever
/// the rule, and replay them again.
impl<R: ScalingRule + ?Sized> ScalingRule for Box<R> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn interval(&self) -> f64 {
        (**self).interval()
    }
    fn desired(&mut self, now: f64, replicas: &[ReplicaView]) -> u32 {
        (**self).desired(now, replicas)
    }
}

/// The latency objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    /// Time to first token a request must not exceed.
    pub ttft_seconds: f64,
}

/// One point of the timeline, for plots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds.
    pub at: f64,
    /// Requests that arrived since the previous sample, per second.
    pub arrival_rate: f64,
    /// Waiting plus running requests.
    pub demand: u32,
    /// Ready replicas.
    pub ready: u32,
    /// Replicas in existence (loading and draining included).
    pub replicas: u32,
}

/// What a replay measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// The rule.
    pub rule: String,
    /// Requests in the trace.
    pub requests: usize,
    /// Refused: queue full, or no ready replica.
    pub refused: usize,
    /// Served later than the SLO, or refused.
    pub slo_misses: usize,
    /// Median time to first token of served requests.
    pub ttft_p50: f64,
    /// 99th percentile time to first token of served requests.
    pub ttft_p99: f64,
    /// GPU-seconds used.
    pub gpu_seconds: f64,
    /// Replicas started after the start (each a model load).
    pub cold_starts: usize,
    /// Scale-down decisions.
    pub scale_downs: usize,
    /// Replicas started during the replay and removed within [`FLAP_SECONDS`].
    pub flaps: usize,
    /// Seconds replayed (until the last request finished).
    pub duration: f64,
    /// Most replicas at once.
    pub peak_replicas: u32,
    /// The timeline, one sample per `sample_every` seconds.
    pub timeline: Vec<Sample>,
}

impl Outcome {
    /// Flaps per hour replayed.
    pub fn flaps_per_hour(&self) -> f64 {
        self.flaps as f64 * 3600.0 / self.duration.max(1.0)
    }
}

/// Replay settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Setup {
    /// The replica.
    pub model: ReplicaModel,
    /// The objective.
    pub slo: Slo,
    /// Ready replicas at the start.
    pub initial_replicas: u32,
    /// Timeline resolution in seconds.
    pub sample_every: f64,
    /// Where the rule's first decision falls, as a fraction of its interval (0: at the
    /// start, and every interval after). A controller's sync is not aligned with the
    /// traffic, and where a few replicas decide the outcome, a burst seen at one sync
    /// and missed at the next moves a replay's result: the frontier benchmark replays
    /// each setting at several phases and reports their mean and spread.
    pub tick_phase: f64,
}

#[derive(Debug)]
enum State {
    Loading,
    Ready,
    Draining,
}

#[derive(Debug)]
struct Replica {
    id: u64,
    created: f64,
    ready_since: Option<f64>,
    state: State,
    queue: VecDeque<usize>,
    running: u32,
    busy: f64,
    busy_since: Option<f64>,
}

impl Replica {
    fn in_flight(&self) -> u32 {
        self.running + self.queue.len() as u32
    }

    fn view(&self, now: f64) -> ReplicaView {
        ReplicaView {
            id: self.id,
            created: self.created,
            ready_since: self.ready_since,
            waiting: self.queue.len() as u32,
            running: self.running,
            busy_seconds: self.busy + self.busy_since.map_or(0.0, |s| now - s),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Ready(u64),
    Finish(u64),
    Tick,
    Sample,
}

/// Event time with a total order.
#[derive(Clone, Copy, Debug, PartialEq)]
struct At(f64);
impl Eq for At {}
impl PartialOrd for At {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for At {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

struct Run<'a> {
    setup: &'a Setup,
    trace: &'a Trace,
    now: f64,
    next_id: u64,
    replicas: Vec<Replica>,
    events: BinaryHeap<Reverse<(At, u64, Event)>>,
    seq: u64,
    gpu_seconds: f64,
    ttft: Vec<f64>,
    out: Outcome,
    arrivals_since_sample: usize,
}

/// Replays `trace` under `rule` and measures the outcome.
pub fn replay(trace: &Trace, setup: &Setup, rule: &mut dyn ScalingRule) -> Outcome {
    let mut run = Run {
        setup,
        trace,
        now: 0.0,
        next_id: 0,
        replicas: Vec::new(),
        events: BinaryHeap::new(),
        seq: 0,
        gpu_seconds: 0.0,
        ttft: Vec::with_capacity(trace.requests.len()),
        out: Outcome {
            rule: rule.name(),
            requests: trace.requests.len(),
            ..Outcome::default()
        },
        arrivals_since_sample: 0,
    };
    for _ in 0..setup.initial_replicas {
        run.add_replica();
        let r = run.replicas.last_mut().expect("just added");
        r.state = State::Ready;
        r.ready_since = Some(0.0);
    }
    run.schedule(
        setup.tick_phase.clamp(0.0, 1.0) * rule.interval(),
        Event::Tick,
    );
    run.schedule(0.0, Event::Sample);
    let mut next_arrival = 0;
    loop {
        let arrival = trace.requests.get(next_arrival).map(|r| r.at);
        let event = run.events.peek().map(|Reverse((At(t), _, _))| *t);
        let busy =
            next_arrival < trace.requests.len() || run.replicas.iter().any(|r| r.in_flight() > 0);
        if !busy {
            break;
        }
        // Events at the same instant go first: a sample at t counts the arrivals before t.
        if let Some(a) = arrival.filter(|&a| event.is_none_or(|e| a < e)) {
            run.now = a;
            run.arrive(next_arrival);
            next_arrival += 1;
            continue;
        }
        let Some(Reverse((At(t), _, ev))) = run.events.pop() else {
            break;
        };
        run.now = t;
        match ev {
            Event::Ready(id) => run.ready(id),
            Event::Finish(id) => run.finish(id),
            Event::Tick => {
                run.tick(rule);
                run.schedule(run.now + rule.interval(), Event::Tick);
            }
            Event::Sample => {
                run.sample();
                run.schedule(run.now + setup.sample_every, Event::Sample);
            }
        }
    }
    for r in &run.replicas {
        run.gpu_seconds += (run.now - r.created) * f64::from(setup.model.gpus);
    }
    let mut out = run.out;
    out.gpu_seconds = run.gpu_seconds;
    out.duration = run.now;
    let mut t = run.ttft;
    t.sort_by(f64::total_cmp);
    // Nearest-rank percentiles.
    let pct = |p: f64| {
        let rank = (p * t.len() as f64).ceil() as usize;
        t.get(rank.max(1) - 1).copied().unwrap_or(0.0)
    };
    out.ttft_p50 = pct(0.5);
    out.ttft_p99 = pct(0.99);
    out
}

/// What a trace needs under gpuscale's policy: the capacity planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Capacity {
    /// The fewest `maxReplicas` with which the policy meets the objective.
    pub max_replicas: u32,
    /// The replay with that bound.
    pub outcome: Outcome,
}

/// Why no `maxReplicas` meets the objective.
#[derive(Clone, Debug, PartialEq)]
pub struct Unreachable {
    /// The bound tried.
    pub max_replicas: u32,
    /// The replay with it: the misses no number of replicas removes (a prompt that
    /// takes longer than the SLO to prefill, or a cold start at the very beginning).
    pub outcome: Box<Outcome>,
}

/// How many of `requests` may miss the SLO when `attainment` (a share, 0..=1) of them
/// must meet it.
pub fn allowed_misses(requests: usize, attainment: f64) -> usize {
    ((1.0 - attainment) * requests as f64).floor() as usize
}

/// The fewest `maxReplicas` (at most `ceiling`) with which gpuscale's policy (`params`,
/// deciding every `interval` seconds) serves at least `attainment` (0..=1) of the
/// trace's requests within the SLO. Found by bisection between `params.min` and the
/// peak the policy reaches when bounded only by `ceiling`, which takes the misses to
/// be non-increasing in the bound (more room never makes the policy scale later).
pub fn capacity(
    trace: &Trace,
    setup: &Setup,
    params: &crate::autoscale::Params,
    interval: f64,
    attainment: f64,
    ceiling: u32,
) -> Result<Capacity, Unreachable> {
    let allowed = allowed_misses(trace.requests.len(), attainment);
    let run = |max: u32| {
        let p = crate::autoscale::Params {
            max,
            ..params.clone()
        };
        replay(trace, setup, &mut GpuscaleRule::new(p, interval))
    };
    let open = run(ceiling);
    if open.slo_misses > allowed {
        return Err(Unreachable {
            max_replicas: ceiling,
            outcome: Box::new(open),
        });
    }
    // Bounded by its own unbounded peak, the policy decides exactly as without a bound.
    let (mut lo, mut hi) = (params.min.max(1), open.peak_replicas.clamp(1, ceiling));
    let mut best = open;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let o = run(mid);
        if o.slo_misses <= allowed {
            (hi, best) = (mid, o);
        } else {
            lo = mid + 1;
        }
    }
    Ok(Capacity {
        max_replicas: hi,
        outcome: best,
    })
}

impl Run<'_> {
    fn schedule(&mut self, at: f64, ev: Event) {
        self.seq += 1;
        self.events.push(Reverse((At(at), self.seq, ev)));
    }

    fn add_replica(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.replicas.push(Replica {
            id,
            created: self.now,
            ready_since: None,
            state: State::Loading,
            queue: VecDeque::new(),
            running: 0,
            busy: 0.0,
            busy_since: None,
        });
        id
    }

    fn index(&self, id: u64) -> Option<usize> {
        self.replicas.iter().position(|r| r.id == id)
    }

    fn remove(&mut self, i: usize) {
        let r = self.replicas.remove(i);
        let started_here = r.id >= u64::from(self.setup.initial_replicas);
        if started_here && self.now - r.created < FLAP_SECONDS {
            self.out.flaps += 1;
        }
        self.gpu_seconds += (self.now - r.created) * f64::from(self.setup.model.gpus);
    }

    fn arrive(&mut self, req: usize) {
        self.arrivals_since_sample += 1;
        let target = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r.state, State::Ready))
            .min_by_key(|(_, r)| (r.in_flight(), r.id))
            .map(|(i, _)| i);
        let Some(i) = target else {
            self.refuse();
            return;
        };
        let m = &self.setup.model;
        if self.replicas[i].running < m.max_batch {
            self.start(i, req);
        } else if (self.replicas[i].queue.len() as u32) < m.queue_capacity {
            self.replicas[i].queue.push_back(req);
        } else {
            self.refuse();
        }
    }

    fn refuse(&mut self) {
        self.out.refused += 1;
        self.out.slo_misses += 1;
    }

    fn start(&mut self, i: usize, req: usize) {
        let m = &self.setup.model;
        let r = &self.trace.requests[req];
        let prefill = f64::from(r.prompt_tokens) / m.prefill_tokens_per_second;
        let decode = f64::from(r.generated_tokens) / m.decode_tokens_per_second;
        let ttft = self.now + prefill - r.at;
        self.ttft.push(ttft);
        if ttft > self.setup.slo.ttft_seconds {
            self.out.slo_misses += 1;
        }
        let rep = &mut self.replicas[i];
        rep.running += 1;
        if rep.busy_since.is_none() {
            rep.busy_since = Some(self.now);
        }
        let id = rep.id;
        self.schedule(self.now + prefill + decode, Event::Finish(id));
    }

    fn finish(&mut self, id: u64) {
        let Some(i) = self.index(id) else { return };
        let now = self.now;
        self.replicas[i].running -= 1;
        if let Some(next) = self.replicas[i].queue.pop_front() {
            self.start(i, next);
        }
        let rep = &mut self.replicas[i];
        if rep.running == 0 {
            if let Some(s) = rep.busy_since.take() {
                rep.busy += now - s;
            }
            if matches!(rep.state, State::Draining) {
                self.remove(i);
            }
        }
    }

    fn ready(&mut self, id: u64) {
        let Some(i) = self.index(id) else { return };
        let r = &mut self.replicas[i];
        if matches!(r.state, State::Loading) {
            r.state = State::Ready;
            r.ready_since = Some(self.now);
        }
    }

    fn tick(&mut self, rule: &mut dyn ScalingRule) {
        let now = self.now;
        let views: Vec<ReplicaView> = self
            .replicas
            .iter()
            .filter(|r| !matches!(r.state, State::Draining))
            .map(|r| r.view(now))
            .collect();
        let current = views.len() as u32;
        let desired = rule.desired(now, &views);
        for _ in current..desired {
            let id = self.add_replica();
            self.out.cold_starts += 1;
            self.schedule(now + self.setup.model.load_seconds, Event::Ready(id));
        }
        if desired < current {
            self.out.scale_downs += 1;
        }
        for _ in desired..current {
            // A loading replica first (nothing to drain), the newest; then the ready
            // replica with the least in flight.
            let pick = self
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r.state, State::Loading))
                .max_by_key(|(_, r)| r.id)
                .or_else(|| {
                    self.replicas
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| matches!(r.state, State::Ready))
                        .min_by_key(|(_, r)| (r.in_flight(), Reverse(r.id)))
                })
                .map(|(i, _)| i);
            let Some(i) = pick else { break };
            if matches!(self.replicas[i].state, State::Loading) || self.replicas[i].in_flight() == 0
            {
                self.remove(i);
            } else {
                self.replicas[i].state = State::Draining;
            }
        }
        let n = self.replicas.len() as u32;
        self.out.peak_replicas = self.out.peak_replicas.max(n);
    }

    fn sample(&mut self) {
        let s = Sample {
            at: self.now,
            arrival_rate: self.arrivals_since_sample as f64 / self.setup.sample_every,
            demand: self.replicas.iter().map(Replica::in_flight).sum(),
            ready: self
                .replicas
                .iter()
                .filter(|r| matches!(r.state, State::Ready))
                .count() as u32,
            replicas: self.replicas.len() as u32,
        };
        self.arrivals_since_sample = 0;
        self.out.timeline.push(s);
    }
}

#[cfg(test)]
mod tests;
