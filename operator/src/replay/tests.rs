use super::*;

/// Wants `n` replicas from each listed time on.
struct Schedule(Vec<(f64, u32)>);

impl ScalingRule for Schedule {
    fn name(&self) -> String {
        "schedule".into()
    }
    fn interval(&self) -> f64 {
        1.0
    }
    fn desired(&mut self, now: f64, _: &[ReplicaView]) -> u32 {
        self.0
            .iter()
            .rev()
            .find(|(t, _)| *t <= now)
            .map_or(1, |&(_, n)| n)
    }
}

fn setup(max_batch: u32, queue: u32) -> Setup {
    Setup {
        model: ReplicaModel {
            max_batch,
            queue_capacity: queue,
            prefill_tokens_per_second: 1000.0,
            decode_tokens_per_second: 10.0,
            load_seconds: 30.0,
            gpus: 2,
        },
        slo: Slo { ttft_seconds: 1.0 },
        initial_replicas: 1,
        sample_every: 5.0,
        tick_phase: 0.0,
    }
}

fn trace(rows: &[(f64, u32, u32)]) -> Trace {
    Trace {
        requests: rows
            .iter()
            .map(|&(at, p, g)| TraceRequest {
                at,
                prompt_tokens: p,
                generated_tokens: g,
            })
            .collect(),
    }
}

#[test]
fn a_queued_request_waits_for_a_batch_slot() {
    // One slot: the second request waits for the first (0.5 s prefill + 2 s decode).
    let t = trace(&[(0.0, 500, 20), (0.5, 500, 20)]);
    let o = replay(&t, &setup(1, 4), &mut Schedule(vec![]));
    assert_eq!((o.refused, o.cold_starts), (0, 0));
    assert!((o.ttft_p50 - 0.5).abs() < 1e-9, "{o:?}");
    // Starts at 2.5 s, first token at 3.0 s, arrived at 0.5 s.
    assert!((o.ttft_p99 - 2.5).abs() < 1e-9, "{o:?}");
    assert_eq!(o.slo_misses, 1);
    // One replica of two GPUs for 5 s (the second request ends at 5.0 s).
    assert!((o.gpu_seconds - 10.0).abs() < 1e-9, "{}", o.gpu_seconds);
}

#[test]
fn a_full_queue_refuses_and_counts_a_miss() {
    let t = trace(&[(0.0, 10, 10), (0.0, 10, 10), (0.0, 10, 10)]);
    let o = replay(&t, &setup(1, 1), &mut Schedule(vec![]));
    assert_eq!(o.refused, 1);
    assert_eq!(
        o.slo_misses, 2,
        "the refused one and the one that waited 1 s"
    );
}

#[test]
fn scale_up_is_a_cold_start_that_serves_only_once_loaded() {
    // Ask for two replicas at 0 s; the second is ready at 30 s.
    let t = trace(&[(10.0, 10, 200), (20.0, 10, 10), (40.0, 10, 10)]);
    let o = replay(&t, &setup(1, 8), &mut Schedule(vec![(0.0, 2)]));
    assert_eq!(o.cold_starts, 1);
    // The request at 20 s waited for the first (busy until 30.01 s).
    assert!(o.ttft_p99 > 10.0, "{o:?}");
    assert_eq!(o.peak_replicas, 2);
}

#[test]
fn scale_down_drains_and_loses_nothing() {
    // Two replicas from the start; down to one at 3 s while both are busy.
    let mut s = setup(1, 8);
    s.initial_replicas = 2;
    let t = trace(&[(0.0, 10, 50), (0.0, 10, 100), (1.0, 10, 10)]);
    let o = replay(&t, &s, &mut Schedule(vec![(0.0, 2), (3.0, 1)]));
    assert_eq!(o.refused, 0);
    assert_eq!(o.scale_downs, 1);
    // The drained replica held its request to the end (5.01 s); the other served the
    // queued request after 10.01 s, then the 1.0 s one... all three were served.
    let served = o.requests - o.refused;
    assert_eq!(served, 3);
    assert!(
        o.gpu_seconds > 2.0 * (5.0 + 10.0),
        "draining time is paid: {}",
        o.gpu_seconds
    );
}

#[test]
fn the_timeline_records_load_and_replicas() {
    let t = trace(&[(0.0, 10, 10), (1.0, 10, 10), (12.0, 10, 10)]);
    let o = replay(&t, &setup(4, 8), &mut Schedule(vec![]));
    assert_eq!(o.timeline[0].at, 0.0);
    assert!(
        (o.timeline[1].arrival_rate - 2.0 / 5.0).abs() < 1e-9,
        "{:?}",
        o.timeline
    );
    assert!(o.timeline.iter().all(|s| s.replicas == 1 && s.ready == 1));
}

#[test]
fn a_replica_removed_within_five_minutes_of_its_start_is_a_flap() {
    // Requests every 10 s for 20 minutes keep the replay going.
    let rows: Vec<(f64, u32, u32)> = (0..120).map(|i| (f64::from(i) * 10.0, 100, 5)).collect();
    let t = trace(&rows);
    // Two extra replicas from 10 s to 100 s: two flaps. The initial one never counts.
    let o = replay(&t, &setup(4, 4), &mut Schedule(vec![(10.0, 3), (100.0, 1)]));
    assert_eq!((o.cold_starts, o.flaps), (2, 2), "{o:?}");
    assert!((o.flaps_per_hour() - 2.0 * 3600.0 / o.duration).abs() < 1e-9);
    // Kept 400 s: cold starts, but not flaps.
    let o = replay(&t, &setup(4, 4), &mut Schedule(vec![(10.0, 3), (410.0, 1)]));
    assert_eq!((o.cold_starts, o.flaps), (2, 0), "{o:?}");
}

/// A replica ready since 0 with `waiting` requests queued.
fn view(id: u64, waiting: u32) -> ReplicaView {
    ReplicaView {
        id,
        created: 0.0,
        ready_since: Some(0.0),
        waiting,
        running: 0,
        busy_seconds: 0.0,
    }
}

#[test]
fn the_keda_rule_is_the_hpa_on_an_average_value_every_15_seconds() {
    let mut k = KedaRule::new(1, 20, 8.0);
    assert_eq!(k.interval(), 15.0);
    // 17 over 2 replicas at 8 each: a ratio of 1.06, inside the 10% tolerance.
    assert_eq!(k.desired(0.0, &[view(0, 9), view(1, 8)]), 2);
    // 40: ceil(40 / 8) = 5, within the scale-up limit max(2 x 2, 2 + 4).
    assert_eq!(k.desired(15.0, &[view(0, 20), view(1, 20)]), 5);
    // 100 on one replica: 13 wanted, at most max(2, 1 + 4) = 5 in one sync.
    let mut k = KedaRule::new(1, 20, 8.0);
    assert_eq!(k.desired(0.0, &[view(0, 100)]), 5);
    // Lower demand waits out the 300 s stabilisation window.
    let five: Vec<ReplicaView> = (0..5).map(|i| view(i, 0)).collect();
    assert_eq!(k.desired(15.0, &five), 5);
    assert_eq!(k.desired(316.0, &five), 1);
}

#[test]
fn a_scale_up_stabilisation_window_lets_the_peers_ride_out_a_spike() {
    // 30 s: scale up to the lowest recommendation of the last 30 s.
    let mut k = KedaRule::new(1, 20, 8.0).with_up_window(30.0);
    assert_eq!(k.desired(0.0, &[view(0, 4)]), 1);
    // A spike of 24 asks for 3; the quiet sample 15 s ago still holds it at 1.
    assert_eq!(k.desired(15.0, &[view(0, 24)]), 1);
    assert_eq!(k.desired(30.0, &[view(0, 24)]), 1);
    // Held for the whole window (the quiet sample is now 45 s old): up to 3.
    assert_eq!(k.desired(45.0, &[view(0, 24)]), 3);
    // The default has none: the same spike scales at once.
    let mut k = KedaRule::new(1, 20, 8.0);
    assert_eq!(k.desired(0.0, &[view(0, 4)]), 1);
    assert_eq!(k.desired(15.0, &[view(0, 24)]), 3);
}

#[test]
fn the_planner_finds_the_fewest_max_replicas_that_meet_the_objective() {
    use crate::autoscale::Params;
    use std::time::Duration;
    // Ten minutes at 6 requests/s of 4 s each (24 in flight on average); batch 4.
    let rows: Vec<(f64, u32, u32)> = (0..3600).map(|i| (f64::from(i) / 6.0, 100, 40)).collect();
    let t = trace(&rows);
    let s = setup(4, 64);
    let params = Params {
        min: 1,
        max: 2,
        warm: 0,
        target: 4.0,
        up_window: Duration::ZERO,
        down_window: Duration::from_secs(300),
        panic_window: Duration::from_secs(6),
        to_zero_after: None,
        predictive: false,
        learn_window: true,
    };
    let c = capacity(&t, &s, &params, 2.0, 0.9, 256).unwrap();
    assert!(c.outcome.slo_misses <= 360, "{:?}", c.outcome.slo_misses);
    // One replica fewer misses the objective: the bound is the fewest that works.
    let fewer = Params {
        max: c.max_replicas - 1,
        ..params.clone()
    };
    let o = replay(&t, &s, &mut GpuscaleRule::new(fewer, 2.0));
    assert!(
        o.slo_misses > 360,
        "{} replicas: {} misses",
        c.max_replicas - 1,
        o.slo_misses
    );
    // At least 24 / 4 replicas are busy on average.
    assert!(c.max_replicas >= 6, "{}", c.max_replicas);
    // A prompt that takes longer than the SLO to prefill cannot be helped by replicas.
    let slow = trace(&[(0.0, 5000, 1), (1.0, 5000, 1)]);
    let e = capacity(&slow, &s, &params, 2.0, 0.9, 64).unwrap_err();
    assert_eq!((e.max_replicas, e.outcome.slo_misses), (64, 2));
}

/// Records when it is asked.
struct Clock(Vec<f64>);

impl ScalingRule for Clock {
    fn name(&self) -> String {
        "clock".into()
    }
    fn interval(&self) -> f64 {
        10.0
    }
    fn desired(&mut self, now: f64, _: &[ReplicaView]) -> u32 {
        self.0.push(now);
        1
    }
}

#[test]
fn the_first_decision_falls_at_the_phase_of_the_rules_interval() {
    let t = trace(&[(0.0, 10, 10), (25.0, 10, 10)]);
    let mut at_start = Clock(Vec::new());
    replay(&t, &setup(1, 4), &mut at_start);
    assert_eq!(at_start.0[..3], [0.0, 10.0, 20.0]);
    let mut halfway = Clock(Vec::new());
    let shifted = Setup {
        tick_phase: 0.5,
        ..setup(1, 4)
    };
    replay(&t, &shifted, &mut halfway);
    assert_eq!(halfway.0[..3], [5.0, 15.0, 25.0]);
}
