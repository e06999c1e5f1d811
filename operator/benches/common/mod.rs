//! What the autoscaler benches share: the trace they replay and the replica it runs on.

use gpuscale_operator::replay::{ReplicaModel, Setup, Slo, Trace};

/// The trace named by the first non-flag argument, else the Azure code trace in
/// `../shared/traces/`, with its path.
pub fn trace_from_args() -> anyhow::Result<(String, Trace)> {
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/traces/azure-llm-inference-2023-code.csv"
            )
            .to_string()
        });
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading the trace {path}: {e}"))?;
    let trace = Trace::parse_csv(&text)?;
    Ok((path, trace))
}

/// An 8B-class model on one GPU: 8k prompt tokens/s, 40 generated tokens/s per
/// sequence, 8 sequences at once, 45 s from pod creation to ready; TTFT SLO 2 s.
pub fn replica_setup(initial_replicas: u32) -> Setup {
    Setup {
        model: ReplicaModel {
            max_batch: 8,
            queue_capacity: 64,
            prefill_tokens_per_second: 8000.0,
            decode_tokens_per_second: 40.0,
            load_seconds: 45.0,
            gpus: 1,
        },
        slo: Slo { ttft_seconds: 2.0 },
        initial_replicas,
        sample_every: 5.0,
        tick_phase: 0.0,
    }
}
