//! The table the autoscaler benchmark and `gpuscale-operator plan` print.

use std::fmt::Write as _;

use super::Outcome;

/// One row per rule: requests over the SLO, refused, TTFT p50/p99, GPU-seconds, cold
/// starts, peak replicas; then each peer against the first row.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "{:<62} {:>9} {:>8} {:>9} {:>9} {:>11} {:>6} {:>5}\n",
        "rule", "over SLO", "refused", "TTFT p50", "TTFT p99", "GPU-seconds", "cold", "peak"
    );
    for o in outcomes {
        let _ = writeln!(
            out,
            "{:<62} {:>9} {:>8} {:>8.2}s {:>8.2}s {:>11.0} {:>6} {:>5}",
            o.rule,
            o.slo_misses,
            o.refused,
            o.ttft_p50,
            o.ttft_p99,
            o.gpu_seconds,
            o.cold_starts,
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
