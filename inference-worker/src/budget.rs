//! How the worker's memory budget splits into weights, activations and KV-cache blocks,
//! and the refusal to start when the model cannot serve within it. Pure: the caller
//! passes the device's free memory (VRAM on CUDA, none on CPU).

use crate::backend::KvLayout;
use crate::model::ModelConfig;

/// What the budget buys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The KV pool.
    pub layout: KvLayout,
    /// Bytes of weights.
    pub weights: u64,
    /// Bytes of the KV pool.
    pub kv: u64,
    /// Bytes of activations and other scratch.
    pub overhead: u64,
}

impl Plan {
    /// Everything the backend will hold.
    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.overhead
    }
}

/// Why the model cannot be served within the budget.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The weights and activations alone exceed the budget.
    #[error("{limit} ({}) is less than the weights ({}) plus activations ({}); raise it or use a smaller model or quantisation", size(*budget), size(*weights), size(*overhead))]
    WeightsDoNotFit {
        /// Which limit: the flag or the device's free memory.
        limit: String,
        /// Bytes available.
        budget: u64,
        /// Bytes of weights.
        weights: u64,
        /// Bytes of activations.
        overhead: u64,
    },
    /// Too little is left for the KV cache to hold the sequences the worker promises.
    #[error("{limit} leaves room for {tokens} KV tokens after {} of weights and {} of activations; at least {needed} are needed ({per_token} bytes each); raise it or lower --max-seq-len", size(*weights), size(*overhead))]
    KvTooSmall {
        /// Which limit.
        limit: String,
        /// Tokens that fit.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
        /// Bytes per token.
        per_token: usize,
        /// Bytes of weights.
        weights: u64,
        /// Bytes of activations.
        overhead: u64,
    },
}

/// Bytes for people: exact below 1 MiB, else MiB or GiB with one decimal.
pub fn size(b: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    match b {
        0..1_048_576 => format!("{b} bytes"),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b as f64 / MIB),
        _ => format!("{:.1} GiB", b as f64 / MIB / 1024.0),
    }
}

/// Splits `budget` bytes (the `--memory-budget` flag), capped by `free` bytes of device
/// memory when the device has its own (CUDA). The KV pool gets what remains after
/// weights and `overhead`, and must hold at least `min_tokens`.
pub fn plan(
    c: &ModelConfig,
    weights: u64,
    overhead: u64,
    budget: u64,
    free: Option<(&str, u64)>,
    block_size: usize,
    min_tokens: usize,
) -> Result<Plan, BudgetError> {
    let part = Part {
        device: free.map_or("", |f| f.0),
        layers: c.n_layers,
        weights,
        overhead,
        budget,
        free: free.map(|f| f.1),
    };
    plan_parts(c, &[part], block_size, min_tokens).map(|mut p| p.remove(0))
}

/// One device's part of a replica split by layers, as the budget sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part<'a> {
    /// The device, for messages ("cuda:1 (H100)", "cpu").
    pub device: &'a str,
    /// Transformer blocks it holds (its KV cache holds these layers only).
    pub layers: usize,
    /// Bytes of weights it holds.
    pub weights: u64,
    /// Bytes of activations and scratch it holds.
    pub overhead: u64,
    /// Its `--memory-budget`.
    pub budget: u64,
    /// Its free memory, when it has its own (CUDA).
    pub free: Option<u64>,
}

/// Plans every part of a split replica. Every part holds the same KV blocks (the
/// scheduler's block ids name one slot on every device, for that device's layers), so
/// the pool is as many blocks as the tightest part affords; each part is then told what
/// it holds. A single part is the whole model on one device.
pub fn plan_parts(
    c: &ModelConfig,
    parts: &[Part<'_>],
    block_size: usize,
    min_tokens: usize,
) -> Result<Vec<Plan>, BudgetError> {
    let single = parts.len() == 1;
    let limit_of = |p: &Part<'_>| {
        let (limit, usable) = match p.free {
            Some(f) if f < p.budget => (format!("free memory on {}", p.device), f),
            _ if single => ("--memory-budget".to_string(), p.budget),
            _ => (format!("--memory-budget on {}", p.device), p.budget),
        };
        (limit, usable)
    };
    let mut tightest: Option<(usize, KvLayout)> = None;
    for (i, p) in parts.iter().enumerate() {
        let (limit, usable) = limit_of(p);
        let Some(kv_budget) = usable.checked_sub(p.weights + p.overhead) else {
            return Err(BudgetError::WeightsDoNotFit {
                limit,
                budget: usable,
                weights: p.weights,
                overhead: p.overhead,
            });
        };
        let per_block = (KvLayout::bytes_per_token_in(c, p.layers) * block_size) as u64;
        let n_blocks = (kv_budget / per_block.max(1)) as usize;
        if tightest.is_none_or(|(_, t)| n_blocks < t.n_blocks) {
            tightest = Some((
                i,
                KvLayout {
                    block_size,
                    n_blocks,
                },
            ));
        }
    }
    let (at, layout) = tightest.expect("a replica has at least one part");
    let tokens = layout.n_blocks * block_size;
    if tokens < min_tokens {
        let p = &parts[at];
        return Err(BudgetError::KvTooSmall {
            limit: limit_of(p).0,
            tokens,
            needed: min_tokens,
            per_token: KvLayout::bytes_per_token_in(c, p.layers),
            weights: p.weights,
            overhead: p.overhead,
        });
    }
    Ok(parts
        .iter()
        .map(|p| Plan {
            layout,
            weights: p.weights,
            kv: (KvLayout::bytes_per_token_in(c, p.layers) * tokens) as u64,
            overhead: p.overhead,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RopeStyle;

    /// SmolLM2-135M's shape: 30 layers, 3 KV heads of 64 (23,040 bytes per token).
    fn smollm() -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            name: "smollm".into(),
            n_layers: 30,
            dim: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_dim: 1536,
            vocab: 49152,
            context_length: 8192,
            norm_eps: 1e-5,
            rope_base: 1e5,
            rope_dims: 64,
            rope_style: RopeStyle::Interleaved,
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn what_is_left_after_weights_and_activations_becomes_kv_blocks() {
        let c = smollm();
        assert_eq!(KvLayout::bytes_per_token(&c), 23_040);
        let p = plan(&c, 86 * MIB, 10 * MIB, 1024 * MIB, None, 16, 2048).unwrap();
        let kv_budget = (1024 - 96) * MIB;
        assert_eq!(p.layout.n_blocks as u64, kv_budget / (23_040 * 16));
        assert!(p.total() <= 1024 * MIB);
        assert!(
            p.total() + 23_040 * 16 > 1024 * MIB,
            "no whole block is left over"
        );
    }

    #[test]
    fn free_vram_below_the_flag_is_the_limit_and_is_named() {
        let c = smollm();
        let p = plan(
            &c,
            86 * MIB,
            10 * MIB,
            80 << 30,
            Some(("cuda:0 (H100)", 200 * MIB)),
            16,
            256,
        )
        .unwrap();
        assert!(p.total() <= 200 * MIB);
        let e = plan(
            &c,
            86 * MIB,
            10 * MIB,
            80 << 30,
            Some(("cuda:0 (H100)", 50 * MIB)),
            16,
            256,
        )
        .unwrap_err();
        assert!(matches!(e, BudgetError::WeightsDoNotFit { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("free memory on cuda:0 (H100) (50.0 MiB)"),
            "{msg}"
        );
        assert!(msg.contains("weights (86.0 MiB)"), "{msg}");
        // Free memory above the flag: the flag rules.
        let e = plan(
            &c,
            86 * MIB,
            10 * MIB,
            90 * MIB,
            Some(("cuda:0", 80 << 30)),
            16,
            256,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("--memory-budget (90.0 MiB)"),
            "{e}"
        );
        assert_eq!(size(1000), "1000 bytes");
        assert_eq!(size(80 << 30), "80.0 GiB");
    }

    #[test]
    fn a_budget_too_small_for_the_promised_sequence_is_refused() {
        let c = smollm();
        // 100 MiB: 4 MiB of KV is 182 tokens, short of one 2048-token sequence.
        let e = plan(&c, 86 * MIB, 10 * MIB, 100 * MIB, None, 16, 2048).unwrap_err();
        match &e {
            BudgetError::KvTooSmall {
                tokens,
                needed,
                per_token,
                ..
            } => {
                assert_eq!(*needed, 2048);
                assert_eq!(*per_token, 23_040);
                assert!(*tokens < 2048 && tokens % 16 == 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("lower --max-seq-len"));
    }

    #[test]
    fn a_split_replica_gets_the_blocks_its_tightest_device_affords() {
        let c = smollm();
        let part = |device, layers, weights, budget| Part {
            device,
            layers,
            weights,
            overhead: 10 * MIB,
            budget,
            free: None,
        };
        // 15 layers each: half the KV bytes per token of the whole model.
        let parts = [
            part("cpu#0", 15, 40 * MIB, 200 * MIB),
            part("cpu#1", 15, 60 * MIB, 200 * MIB),
        ];
        let plans = plan_parts(&c, &parts, 16, 256).unwrap();
        let per_block = 23_040 / 2 * 16;
        assert_eq!(plans[0].layout, plans[1].layout);
        assert_eq!(plans[0].layout.n_blocks as u64, (130 * MIB) / per_block);
        for (p, part) in plans.iter().zip(&parts) {
            assert!(p.total() <= part.budget, "{p:?}");
            assert_eq!(p.kv, plans[0].layout.n_blocks as u64 * per_block);
        }
        // Too little on the second device: the message names it.
        let short = [parts[0], part("cpu#1", 15, 60 * MIB, 71 * MIB)];
        let e = plan_parts(&c, &short, 16, 256).unwrap_err().to_string();
        assert!(
            e.starts_with("--memory-budget on cpu#1 leaves room for 80 KV tokens"),
            "{e}"
        );
    }
}
