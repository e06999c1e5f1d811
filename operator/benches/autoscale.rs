//! The autoscaler against the rules users reach for today, on a real production trace:
//! the Azure LLM inference trace (code completion, 2023; Patel et al., "Splitwise",
//! ISCA 2024, CC-BY 4.0) replayed through gpuscale's policy, an HPA-style GPU
//! utilisation rule and a KEDA-style queue threshold, with the same replicas.
//! Prints requests over the latency SLO, GPU-seconds and cold starts for each.
//!
//! `cargo bench -p gpuscale-operator --bench autoscale [-- path/to/trace.csv]`

use std::time::{Duration, Instant};

use gpuscale_operator::autoscale::Params;
use gpuscale_operator::replay::{
    replay, report, GpuscaleRule, HpaRule, KedaRule, Outcome, ScalingRule,
};

mod common;

const MIN: u32 = 1;
const MAX: u32 = 8;
/// Waiting plus running requests one replica should carry: one full batch (KEDA's
/// threshold too, in the like-for-like row).
const TARGET: u32 = 8;
/// Replicas kept loaded on top of demand.
const WARM: u32 = 2;

fn main() -> anyhow::Result<()> {
    let (path, trace) = common::trace_from_args()?;
    let setup = common::replica_setup(MIN);
    println!(
        "trace: {path}\n  {} requests over {:.0} s, replayed as recorded (no time scaling)",
        trace.requests.len(),
        trace.duration()
    );
    println!(
        "replica: batch {}, queue {}, {} prompt tok/s, {} generated tok/s per sequence, {} s cold start; \
         {}..{} replicas; SLO: time to first token <= {} s",
        setup.model.max_batch,
        setup.model.queue_capacity,
        setup.model.prefill_tokens_per_second,
        setup.model.decode_tokens_per_second,
        setup.model.load_seconds,
        MIN,
        MAX,
        setup.slo.ttft_seconds
    );

    let params = |warm: u32, target: u32, predictive: bool| Params {
        min: MIN,
        max: MAX,
        warm,
        target: f64::from(target),
        up_window: Duration::ZERO,
        down_window: Duration::from_secs(300),
        panic_window: Duration::from_secs(6),
        to_zero_after: None,
        predictive,
        learn_window: true,
    };
    let mut rules: Vec<Box<dyn ScalingRule>> = vec![
        Box::new(GpuscaleRule::new(params(WARM, TARGET, false), 2.0)),
        Box::new(GpuscaleRule::new(params(0, 6, false), 2.0)),
        // scaling.predictive: the same settings, with the Holt forecast.
        Box::new(GpuscaleRule::new(params(WARM, TARGET, true), 2.0)),
        Box::new(GpuscaleRule::new(params(0, 6, true), 2.0)),
        Box::new(HpaRule::new(MIN, MAX, 0.7)),
        Box::new(KedaRule::new(MIN, MAX, f64::from(TARGET))),
        // KEDA's threshold with the fewest misses on this trace (the frontier bench
        // sweeps them all): the strongest peer, not a strawman.
        Box::new(KedaRule::new(MIN, MAX, 3.0)),
    ];
    let mut outcomes = Vec::new();
    for rule in &mut rules {
        let started = Instant::now();
        let o = replay(&trace, &setup, rule.as_mut());
        let took = started.elapsed();
        outcomes.push((o, took));
    }

    for (o, took) in &outcomes {
        println!("replayed {} in {:.1} ms", o.rule, took.as_secs_f64() * 1e3);
    }
    let rows: Vec<Outcome> = outcomes.into_iter().map(|(o, _)| o).collect();
    println!("\n{}", report::table(&rows));
    Ok(())
}
