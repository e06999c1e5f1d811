//! The policy over simulated time: a toy cluster whose replicas become ready a fixed
//! time after they are asked for, driven by a demand curve, one tick every 2 s.

use proptest::prelude::{prop, prop_assert, proptest, ProptestConfig};

use super::*;

const TICK: Duration = Duration::from_secs(2);

fn params(min: u32, max: u32, warm: u32) -> Params {
    Params {
        min,
        max,
        warm,
        target: 4.0,
        up_window: Duration::ZERO,
        down_window: Duration::from_secs(300),
        panic_window: Duration::from_secs(6),
        to_zero_after: None,
        predictive: false,
        learn_window: true,
    }
}

struct Sim {
    t0: Instant,
    now: Instant,
    policy: Autoscaler,
    ready: u32,
    /// When each loading replica becomes ready (`None`: never).
    loading: Vec<Option<Instant>>,
    load_time: Option<Duration>,
    log: Vec<(f64, Decision)>,
}

impl Sim {
    fn new(p: Params) -> Sim {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            ready: p.min,
            policy: Autoscaler::new(p),
            loading: Vec::new(),
            load_time: Some(Duration::from_secs(20)),
            log: Vec::new(),
        }
    }

    fn secs(&self) -> f64 {
        self.now.duration_since(self.t0).as_secs_f64()
    }

    fn current(&self) -> u32 {
        self.ready + self.loading.len() as u32
    }

    /// One tick with `demand` observed (or no metrics).
    fn tick(&mut self, demand: Option<f64>) -> Decision {
        let now = self.now;
        let before = self.loading.len();
        self.loading.retain(|r| r.is_none_or(|at| at > now));
        let became_ready = before - self.loading.len();
        for _ in 0..became_ready {
            self.policy.observe_ready(self.load_time.unwrap());
        }
        self.ready += became_ready as u32;
        let obs = Observation {
            demand,
            ready: self.ready,
            loading: self.loading.len() as u32,
            current: self.current(),
            next_warm: None,
            idle_for: None,
        };
        let d = self.policy.decide(now, &obs);
        while self.current() < d.desired {
            self.loading.push(self.load_time.map(|l| now + l));
        }
        while self.current() > d.desired {
            if self.loading.pop().is_none() {
                self.ready -= 1;
            }
        }
        self.log.push((self.secs(), d.clone()));
        self.now += TICK;
        d
    }

    /// Runs `f(t)` as the demand for `seconds` (t counts from the start of the run).
    fn run(&mut self, seconds: u64, f: impl Fn(f64) -> f64) {
        for _ in 0..seconds / TICK.as_secs() {
            let t = self.secs();
            self.tick(Some(f(t)));
        }
    }

    fn count(&self, dir: Direction) -> usize {
        self.log.iter().filter(|(_, d)| d.direction == dir).count()
    }
}

#[test]
fn a_burst_scales_up_on_the_next_tick_in_panic_mode() {
    let mut sim = Sim::new(params(1, 10, 0));
    sim.run(60, |_| 2.0);
    assert_eq!(sim.current(), 1);
    let d = sim.tick(Some(40.0));
    assert_eq!(d.direction, Direction::Up);
    assert!(d.panic, "{d:?}");
    assert_eq!(d.desired, 10, "40 waiting / 4 per replica");
    assert!(
        d.reason.to_string().starts_with("panic: queue depth"),
        "{}",
        d.reason
    );
}

#[test]
fn a_scale_up_window_holds_back_panic_until_the_demand_has_lasted_it() {
    let mut p = params(1, 10, 0);
    p.up_window = Duration::from_secs(20);
    let mut sim = Sim::new(p);
    sim.run(60, |_| 2.0);
    // The burst that scales at once without the window (the test above) is held while
    // it is younger than the window, so a spike shorter than 20 s starts nothing...
    let start = sim.secs();
    sim.run(40, |_| 40.0);
    let ups: Vec<_> = sim
        .log
        .iter()
        .filter(|(_, d)| d.direction == Direction::Up)
        .collect();
    let (at, d) = ups
        .first()
        .expect("scales up once the demand has held 20 s");
    // ...and one that outlasts it scales within a tick of the window.
    assert!(
        (20.0..=22.0).contains(&(at - start)),
        "{at} {start}: {ups:?}"
    );
    assert!(d.desired > 1, "{d:?}");
}

#[test]
fn a_slow_ramp_is_tracked_without_overshoot_or_any_scale_down() {
    let mut sim = Sim::new(params(1, 20, 0));
    sim.run(600, |t| 0.05 * t);
    assert_eq!(sim.count(Direction::Down), 0);
    for (t, d) in &sim.log {
        let demand = 0.05 * t;
        let needed = (demand / 4.0).ceil().max(1.0) as u32;
        assert!(
            d.desired + 1 >= needed && d.desired <= needed + 1,
            "at {t} s demand {demand:.1} needs {needed}, desired {}",
            d.desired
        );
    }
    assert_eq!(sim.current(), 8, "30 requests at the end / 4");
}

/// 20 requests for a minute, then 2 for a minute, for `seconds`.
fn minute_bursts(t: f64) -> f64 {
    if (t as u64 / 60).is_multiple_of(2) {
        20.0
    } else {
        2.0
    }
}

#[test]
fn a_scale_down_that_is_reversed_teaches_a_window_that_bridges_the_dip() {
    let p = Params {
        down_window: Duration::from_secs(30),
        ..params(1, 10, 0)
    };
    let mut sim = Sim::new(p);
    sim.run(1200, minute_bursts);
    // The first dips are cut after the spec's 30 s and reversed by the next burst; each
    // reversal lengthens the window, until it bridges the minute-long dips (the stable
    // window's mean decays over a minute, so lower demand shows for longer than the
    // dip itself). After that, nothing is removed to be started again.
    let regretted = sim.policy.regretted();
    assert!((1..=4).contains(&regretted), "{regretted} regrets");
    let learned = sim.policy.bridge(sim.now);
    assert!(
        learned > Duration::from_secs(60) && learned <= REGRET_HORIZON,
        "{learned:?}"
    );
    let downs: Vec<f64> = sim
        .log
        .iter()
        .filter(|(_, d)| d.direction == Direction::Down)
        .map(|(t, _)| *t)
        .collect();
    assert!(
        !downs.is_empty() && downs.iter().all(|t| *t < 400.0),
        "{downs:?}"
    );

    // `scaleDownWindowMode: Fixed` keeps the spec's window: every dip is cut after 30 s
    // and reversed by the next burst, and no reason claims a lengthened window.
    let spec = ScalingSpec {
        max_replicas: 10,
        target_queue_depth: 4,
        scale_down_window_seconds: 30,
        scale_down_window_mode: ScaleDownWindowMode::Fixed,
        ..ScalingSpec::default()
    };
    let fixed = Params::from_spec(&spec);
    assert!(!fixed.learn_window);
    let mut sim = Sim::new(fixed);
    sim.run(1200, minute_bursts);
    let downs: Vec<&Decision> = sim
        .log
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d.direction == Direction::Down)
        .collect();
    assert!(downs.len() >= 8, "{} scale-downs", downs.len());
    assert!(
        downs.iter().all(|d| d.reason
            == Reason::Stabilised {
                window: Duration::from_secs(30),
                learned: false
            }),
        "{downs:?}"
    );
    assert_eq!(sim.policy.bridge(sim.now), Duration::ZERO);
    // The default is the adaptive window.
    assert!(Params::from_spec(&ScalingSpec::default()).learn_window);
}

#[test]
fn a_learned_window_is_said_in_the_reason_and_forgotten_after_an_hour() {
    let mut sim = Sim::new(Params {
        down_window: Duration::from_secs(30),
        ..params(1, 10, 0)
    });
    sim.run(240, minute_bursts);
    assert!(sim.policy.bridge(sim.now) > Duration::from_secs(30));
    // Low demand for good: the scale-down waits for the learned window and says so.
    sim.run(200, |_| 2.0);
    let (_, down) = sim
        .log
        .iter()
        .rev()
        .find(|(_, d)| d.direction == Direction::Down)
        .expect("a scale-down");
    assert!(
        down.reason
            .to_string()
            .contains("lengthened after recent scale-downs were reversed"),
        "{}",
        down.reason
    );
    sim.run(3700, |_| 2.0);
    assert_eq!(sim.policy.bridge(sim.now), Duration::ZERO);
}

#[test]
fn a_dip_longer_than_the_horizon_teaches_nothing() {
    let mut sim = Sim::new(Params {
        down_window: Duration::from_secs(30),
        ..params(1, 10, 0)
    });
    // A burst, ten quiet minutes, a burst: the scale-down was right.
    sim.run(1500, |t| {
        if !(60.0..660.0).contains(&t) {
            20.0
        } else {
            2.0
        }
    });
    assert!(sim.count(Direction::Down) >= 1);
    assert_eq!(sim.policy.regretted(), 0);
    assert_eq!(sim.policy.bridge(sim.now), Duration::ZERO);
}

#[test]
fn oscillating_load_does_not_flap() {
    let mut sim = Sim::new(params(1, 10, 0));
    // 20 requests for a minute, 2 for a minute, for 20 minutes.
    sim.run(1200, |t| {
        if (t as u64 / 60).is_multiple_of(2) {
            20.0
        } else {
            2.0
        }
    });
    assert_eq!(sim.count(Direction::Down), 0, "held through every trough");
    assert_eq!(sim.count(Direction::Up), 1, "one step up to the peak");
    assert_eq!(sim.current(), 5);
}

#[test]
fn scale_down_waits_for_the_window_then_goes_to_min_plus_warm() {
    let mut sim = Sim::new(params(1, 10, 1));
    sim.run(60, |_| 30.0);
    assert_eq!(sim.current(), 9, "ceil(30/4) + 1 warm");
    let quiet_from = sim.secs();
    sim.run(420, |_| 0.0);
    let downs: Vec<&(f64, Decision)> = sim
        .log
        .iter()
        .filter(|(_, d)| d.direction == Direction::Down)
        .collect();
    let first = downs.first().expect("scaled down").0 - quiet_from;
    let last = downs.last().unwrap().0 - quiet_from;
    // Not before the window has passed; then down with the 60 s mean, to the floor.
    assert!(
        (300.0..=310.0).contains(&first),
        "first scale-down {first} s after load ended"
    );
    assert!(
        last <= 300.0 + 62.0,
        "last scale-down {last} s after load ended"
    );
    assert!(
        matches!(downs[0].1.reason, Reason::Stabilised { .. }),
        "{downs:?}"
    );
    assert_eq!(
        sim.current(),
        1,
        "no demand: one warm replica, which min 1 covers"
    );
    assert_eq!(sim.count(Direction::Up), 1);
}

#[test]
fn warm_replicas_sit_on_top_of_demand_within_bounds() {
    let mut sim = Sim::new(params(2, 4, 1));
    sim.run(30, |_| 8.0);
    assert_eq!(sim.current(), 3, "8/4 = 2 plus 1 warm");
    sim.run(30, |_| 100.0);
    assert_eq!(sim.current(), 4, "capped at max");
    let mut idle = Sim::new(params(2, 4, 1));
    idle.run(30, |_| 0.0);
    assert_eq!(idle.current(), 2, "min covers the warm replica when idle");
}

#[test]
fn missing_metrics_never_scale_down() {
    let mut sim = Sim::new(params(1, 10, 0));
    sim.run(30, |_| 20.0);
    let before = sim.current();
    for _ in 0..500 {
        let d = sim.tick(None);
        assert_eq!(d.direction, Direction::Hold);
        assert_eq!(d.reason, Reason::NoMetrics);
    }
    assert_eq!(sim.current(), before);
}

#[test]
fn a_queue_that_piles_up_while_replicas_load_is_not_read_as_new_load() {
    let mut sim = Sim::new(params(1, 20, 0));
    sim.load_time = Some(Duration::from_secs(60));
    // A step to 16 asks for 4 replicas; the queue then stays at 16 while they load.
    sim.run(50, |_| 16.0);
    assert_eq!(sim.ready, 1, "still loading");
    assert_eq!(sim.current(), 4);
    assert_eq!(sim.count(Direction::Up), 1);
}

#[test]
fn the_panic_projection_uses_the_measured_ready_time() {
    let burst = |ready: Duration| {
        let mut a = Autoscaler::new(params(1, 100, 0));
        a.observe_ready(ready);
        let t0 = Instant::now();
        let mut last = None;
        for i in 0..4u32 {
            let obs = Observation {
                demand: Some(f64::from(8 + 4 * i)),
                ready: 1,
                loading: 0,
                current: 1,
                next_warm: None,
                idle_for: None,
            };
            last = Some(a.decide(t0 + TICK * i, &obs));
        }
        last.unwrap()
    };
    let fast = burst(Duration::from_secs(2));
    let slow = burst(Duration::from_secs(120));
    assert!(fast.panic && slow.panic);
    // 8, 12, 16, 20 over 6 s: mean 14 growing 2/s. Replicas that load in 2 s need
    // 18 covered; slow ones 26 (the projection stops at the 6 s panic window).
    assert_eq!(fast.desired, 5);
    assert_eq!(slow.desired, 7);
}

/// The lead time is the measured start of the kind of start the next replica will
/// have: from its node's model cache (warm) or fetching the model (cold).
#[test]
fn the_panic_projection_uses_the_next_replica_s_cold_or_warm_start() {
    let burst = |next_warm: Option<bool>| {
        let mut a = Autoscaler::new(params(1, 100, 0));
        a.observe_start(Duration::from_secs(2), Some(true));
        a.observe_start(Duration::from_secs(120), Some(false));
        let t0 = Instant::now();
        let mut last = None;
        for i in 0..4u32 {
            let obs = Observation {
                demand: Some(f64::from(8 + 4 * i)),
                ready: 1,
                loading: 0,
                current: 1,
                next_warm,
                idle_for: None,
            };
            last = Some(a.decide(t0 + TICK * i, &obs));
        }
        (last.unwrap(), a)
    };
    let (warm, a) = burst(Some(true));
    let (cold, _) = burst(Some(false));
    // As in the test above: 5 replicas for a 2 s start, 7 for a slow one.
    assert_eq!((warm.desired, cold.desired), (5, 7));
    // Unknown: the mix of both (61 s), a slow start too.
    assert_eq!(burst(None).0.desired, 7);
    assert_eq!(a.lead_time(Some(true)), Duration::from_secs(2));
    assert_eq!(a.lead_time(Some(false)), Duration::from_secs(120));
    // A cold start is not taken for a stuck replica: three cold starts.
    assert!(!a.is_stuck(Duration::from_secs(359)));
    assert!(a.is_stuck(Duration::from_secs(361)));
}

#[test]
fn a_replica_that_never_becomes_ready_is_declared_failed() {
    let mut a = Autoscaler::new(params(1, 4, 0));
    assert!(!a.is_stuck(Duration::from_secs(299)));
    assert!(
        a.is_stuck(Duration::from_secs(301)),
        "the floor applies before any measurement"
    );
    a.observe_ready(Duration::from_secs(200));
    assert!(!a.is_stuck(Duration::from_secs(599)));
    assert!(
        a.is_stuck(Duration::from_secs(601)),
        "three measured ready times"
    );

    // Counted out of capacity, the failed replica no longer hides the demand.
    let mut sim = Sim::new(params(1, 4, 0));
    sim.load_time = None;
    sim.run(20, |_| 8.0);
    assert_eq!((sim.ready, sim.current()), (1, 2));
    sim.loading.clear(); // the controller deleted the failed pod
    let d = sim.tick(Some(8.0));
    assert_eq!(
        (d.desired, d.direction),
        (2, Direction::Up),
        "asks for the replica back"
    );
}

#[test]
fn lowered_bounds_apply_at_once() {
    let mut sim = Sim::new(params(1, 10, 0));
    sim.run(20, |_| 40.0);
    assert_eq!(sim.current(), 10);
    sim.policy.set_params(params(1, 3, 0));
    let d = sim.tick(Some(40.0));
    assert_eq!((d.desired, d.direction), (3, Direction::Down));
    assert_eq!(d.reason, Reason::Bounds);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the demand, the count stays in bounds and never goes down within the
    /// scale-down window of the last scale-up.
    #[test]
    fn bounds_hold_and_nothing_flaps(
        min in 1u32..4,
        extra in 0u32..8,
        warm in 0u32..3,
        demand in prop::collection::vec(prop::option::weighted(0.95, 0.0f64..80.0), 1..400),
    ) {
        let p = params(min, min + extra, warm);
        let down_window = p.down_window.as_secs_f64();
        let mut sim = Sim::new(p);
        let mut last_up: Option<f64> = None;
        for d in demand {
            let dec = sim.tick(d);
            let t = sim.secs() - TICK.as_secs_f64();
            prop_assert!(dec.desired >= min && dec.desired <= min + extra, "{dec:?}");
            match dec.direction {
                Direction::Up => last_up = Some(t),
                Direction::Down => {
                    if let Some(u) = last_up {
                        prop_assert!(t - u >= down_window, "down at {t} after up at {u}");
                    }
                }
                Direction::Hold => {}
            }
        }
    }
}

/// The policy after a restart at `sim.now` from the memory the old one left.
fn restarted(sim: &Sim) -> Autoscaler {
    let memory = sim.policy.memory(sim.now);
    Autoscaler::restore(sim.policy.params().clone(), &memory, sim.now)
}

#[test]
fn memory_is_a_short_staircase_and_stable_under_steady_load() {
    let mut sim = Sim::new(params(1, 10, 0));
    sim.run(20, |_| 30.0); // 8 replicas
    sim.run(20, |_| 14.0); // the mean decays through 7, 6, 5, 4
    sim.run(40, |_| 4.0);
    let m = sim.policy.memory(sim.now);
    let values: Vec<u32> = m.recommendations.iter().map(|r| r.1).collect();
    assert!(values.windows(2).all(|w| w[0] > w[1]), "{values:?}");
    assert_eq!(values.first(), Some(&8), "the peak still bounds");
    assert!(m.recommendations.len() <= 8, "{m:?}");
    // Steady load: the same memory, in wall-clock terms, tick after tick.
    sim.run(60, |_| 4.0);
    let a = sim.policy.memory(sim.now);
    sim.tick(Some(4.0));
    let b = sim.policy.memory(sim.now);
    let wall = |m: &Memory, now: Instant| -> Vec<(Instant, u32)> {
        m.recommendations
            .iter()
            .map(|&(age, r)| (now - age, r))
            .collect()
    };
    assert_eq!(wall(&a, sim.now - TICK), wall(&b, sim.now));
}

#[test]
fn a_restored_policy_holds_the_scale_down_window_it_remembers() {
    let mut sim = Sim::new(params(1, 10, 0));
    sim.run(20, |_| 30.0);
    assert_eq!(sim.current(), 8);
    sim.run(100, |_| 0.5); // inside the 300 s window: still 8
    assert_eq!(sim.current(), 8);
    // A fresh policy (state lost) would drop to 1 at once; the restored one holds.
    let mut fresh = Autoscaler::new(sim.policy.params().clone());
    let obs = Observation {
        demand: Some(0.5),
        ready: 8,
        loading: 0,
        current: 8,
        next_warm: None,
        idle_for: None,
    };
    assert_eq!(fresh.decide(sim.now, &obs).desired, 1);
    sim.policy = restarted(&sim);
    let d = sim.tick(Some(0.5));
    assert_eq!(d.desired, 8, "{d:?}");
    // ... until the window that started with the peak has passed.
    sim.run(220, |_| 0.5);
    assert!(sim.current() < 8, "{}", sim.current());
}

#[test]
fn panic_mode_forbids_scale_down_and_survives_a_restart() {
    let mut sim = Sim::new(params(1, 10, 0));
    sim.run(60, |_| 2.0);
    let d = sim.tick(Some(40.0));
    assert!(d.panic && d.direction == Direction::Up, "{d:?}");
    sim.policy = restarted(&sim);
    assert!(
        sim.policy.panicking(sim.now),
        "panic kept across the restart"
    );
    // Lower bounds would allow a scale-down at once; panic mode forbids it.
    let mut p = sim.policy.params().clone();
    p.down_window = Duration::ZERO;
    sim.policy.set_params(p);
    sim.now += TICK;
    let d = sim.tick(Some(1.0));
    assert_eq!(d.direction, Direction::Hold, "{d:?}");
    assert!(
        d.reason
            .to_string()
            .starts_with("panic mode: no scale-down"),
        "{}",
        d.reason
    );
    sim.run(70, |_| 1.0);
    assert!(!sim.policy.panicking(sim.now));
    assert!(sim.current() < 10, "scales down once panic mode ends");
}

#[test]
fn ready_time_is_remembered() {
    let mut a = Autoscaler::new(params(1, 4, 0));
    a.observe_ready(Duration::from_secs(42));
    let now = Instant::now();
    let b = Autoscaler::restore(a.params().clone(), &a.memory(now), now);
    assert_eq!(b.ready_time(), Duration::from_secs(42));
}

fn to_zero(current: u32, demand: f64, idle: Option<u64>) -> Observation {
    Observation {
        demand: Some(demand),
        ready: current,
        loading: 0,
        current,
        next_warm: None,
        idle_for: idle.map(Duration::from_secs),
    }
}

#[test]
fn the_last_replica_goes_only_after_the_idle_period_and_only_with_a_router() {
    let mut p = params(0, 4, 0);
    p.down_window = Duration::from_secs(30);
    p.to_zero_after = Some(Duration::from_secs(120));
    let mut a = Autoscaler::new(p);
    let t0 = Instant::now();
    // Idle, but the scale-down window has not passed: steady.
    let d = a.decide(t0, &to_zero(1, 0.0, Some(0)));
    assert_eq!(d.desired, 1, "{d:?}");
    // Past the scale-down window but idle for only 60 s of 120: kept at one.
    let d = a.decide(t0 + Duration::from_secs(60), &to_zero(1, 0.0, Some(60)));
    assert_eq!((d.desired, d.direction), (1, Direction::Hold), "{d:?}");
    assert!(
        d.reason.to_string().contains("after another 60 s"),
        "{}",
        d.reason
    );
    // No router reports on the deployment: never to zero, and status says why.
    let d = a.decide(t0 + Duration::from_secs(200), &to_zero(1, 0.0, None));
    assert_eq!(d.desired, 1);
    assert!(
        d.reason.to_string().contains("--router-url"),
        "{}",
        d.reason
    );
    // Idle long enough: zero.
    let d = a.decide(t0 + Duration::from_secs(201), &to_zero(1, 0.0, Some(121)));
    assert_eq!((d.desired, d.direction), (0, Direction::Down), "{d:?}");
    assert_eq!(d.reason.to_string(), "no request for 121 s: scaled to zero");
    // Two replicas on the way down stop at one until the idle period is over.
    let mut b = Autoscaler::new(a.params().clone());
    let d = b.decide(t0 + Duration::from_secs(300), &to_zero(2, 0.0, Some(10)));
    assert_eq!((d.desired, d.direction), (1, Direction::Down), "{d:?}");
}

#[test]
fn a_held_request_at_zero_replicas_brings_the_first_one_at_once() {
    let mut p = params(0, 4, 0);
    p.to_zero_after = Some(Duration::from_secs(120));
    let mut a = Autoscaler::new(p);
    let t0 = Instant::now();
    let d = a.decide(t0, &to_zero(0, 0.0, Some(500)));
    assert_eq!((d.desired, d.direction), (0, Direction::Hold), "{d:?}");
    // One request held by the router: demand 1, one replica now.
    let d = a.decide(t0 + TICK, &to_zero(0, 1.0, Some(0)));
    assert_eq!((d.desired, d.direction), (1, Direction::Up), "{d:?}");
}

#[test]
fn predictive_starts_replicas_for_the_demand_a_cold_start_ahead_and_never_fewer() {
    let predictive = Params {
        predictive: true,
        ..params(1, 40, 0)
    };
    // A ramp of 0.1/s: reactive scaling has the replicas for now; predictive for the
    // demand 20 s (the cold start) ahead.
    let ramp = |t: f64| 0.1 * t;
    let mut ahead = Sim::new(predictive.clone());
    ahead.run(600, ramp);
    let mut reactive = Sim::new(params(1, 40, 0));
    reactive.run(600, ramp);
    let mut earlier = 0;
    for ((t, p), (_, r)) in ahead.log.iter().zip(&reactive.log).skip(30) {
        let later = (ramp(t + 20.0) * 0.9 / 4.0).ceil() as u32;
        assert!(p.desired >= later, "at {t} s: {} for {later}", p.desired);
        assert!(
            p.desired >= r.desired,
            "at {t} s: {} < reactive {}",
            p.desired,
            r.desired
        );
        earlier += usize::from(p.desired > r.desired);
    }
    assert!(
        earlier > 100,
        "ahead of the reactive rule on {earlier} ticks"
    );
    assert!(ahead
        .log
        .iter()
        .any(|(_, d)| d.reason.to_string().starts_with("predictive: queue depth")));
    // Flat demand: nothing to forecast, the same decisions as without.
    let mut flat = Sim::new(predictive);
    flat.run(600, |_| 12.0);
    let mut plain = Sim::new(params(1, 40, 0));
    plain.run(600, |_| 12.0);
    let desired = |s: &Sim| s.log.iter().map(|(_, d)| d.desired).collect::<Vec<_>>();
    assert_eq!(desired(&flat), desired(&plain));
}
