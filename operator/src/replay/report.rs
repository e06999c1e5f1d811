//! The table the autoscaler benchmark and `gpuscale-operator plan` print.

use std::fmt::Write as _;

use super::{Capacity, Outcome, Unreachable};

/// One row per rule: requests over the SLO, refused, TTFT p50/p99, GPU-seconds, cold
/// starts, flaps per hour, peak replicas; then each peer against the first row.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "{:<62} {:>9} {:>8} {:>9} {:>9} {:>11} {:>6} {:>8} {:>5}\n",
        "rule",
        "over SLO",
        "refused",
        "TTFT p50",
        "TTFT p99",
        "GPU-seconds",
        "cold",
        "flaps/h",
        "peak"
    );
    for o in outcomes {
        let _ = writeln!(
            out,
            "{:<62} {:>9} {:>8} {:>8.2}s {:>8.2}s {:>11.0} {:>6} {:>8.1} {:>5}",
            o.rule,
            o.slo_misses,
            o.refused,
            o.ttft_p50,
            o.ttft_p99,
            o.gpu_seconds,
            o.cold_starts,
            o.flaps_per_hour(),
            o.peak_replicas,
        );
    }
    if let Some((ours, peers)) = outcomes.split_first() {
        out.push('\n');
        for peer in peers.iter().filter(|p| !p.rule.starts_with("gpuscale")) {
            let _ = writeln!(
                out,
                "gpuscale vs {}: SLO misses {} vs {} ({:.2}x), GPU-seconds {:.0} vs {:.0} ({:.2}x), cold starts {} vs {}",
                peer.rule,
                ours.slo_misses,
                peer.slo_misses,
                ours.slo_misses as f64 / peer.slo_misses.max(1) as f64,
                ours.gpu_seconds,
                peer.gpu_seconds,
                ours.gpu_seconds / peer.gpu_seconds,
                ours.cold_starts,
                peer.cold_starts
            );
        }
    }
    out
}

/// The capacity planner's answer in words: how the spec's bound does (and whether the
/// policy saturates at it), and the `maxReplicas` and GPU-hours the objective needs.
pub fn capacity_summary(
    spec_max: u32,
    with_spec: &Outcome,
    found: &Result<Capacity, Unreachable>,
    attainment: f64,
) -> String {
    let share = |o: &Outcome| 100.0 * o.slo_misses as f64 / o.requests.max(1) as f64;
    let allowed = ((1.0 - attainment) * with_spec.requests as f64).floor() as usize;
    let mut out = format!(
        "With the spec's maxReplicas {spec_max}: {} of {} requests over the SLO ({:.1}%), peak {} replicas",
        with_spec.slo_misses,
        with_spec.requests,
        share(with_spec),
        with_spec.peak_replicas
    );
    if with_spec.peak_replicas >= spec_max && with_spec.slo_misses > allowed {
        out.push_str(": saturated, the policy held maxReplicas and still missed the objective");
    }
    out.push_str(".\n");
    let pct = attainment * 100.0;
    match found {
        Ok(c) => {
            let o = &c.outcome;
            let hours = o.gpu_seconds / 3600.0;
            let _ = write!(
                out,
                "To serve {pct}% of requests within the SLO: maxReplicas {}, {hours:.2} GPU-hours over the {:.0} s replayed ({:.1} GPUs on average), {} over the SLO, {:.1} flaps/h",
                c.max_replicas,
                o.duration,
                o.gpu_seconds / o.duration.max(1.0),
                o.slo_misses,
                o.flaps_per_hour()
            );
            if c.max_replicas > spec_max {
                let _ = write!(
                    out,
                    ": raise maxReplicas from {spec_max} to {}.",
                    c.max_replicas
                );
            } else {
                out.push_str(": the spec's bound is enough.");
            }
        }
        Err(e) => {
            let _ = write!(
                out,
                "No maxReplicas up to {} serves {pct}% of requests within the SLO: {} still miss it \
                 (prompts that take longer than the SLO to prefill, or arrivals before a first \
                 replica is ready): change the SLO, the model or the hardware, not the bound.",
                e.max_replicas, e.outcome.slo_misses
            );
        }
    }
    out
}
