//! How much GPU memory one replica needs, computed from the model itself.
//!
//! need per GPU = the weights, KV cache and workspace of the fullest GPU's part of the
//! layer split (gguf::split, the rule the worker loads by) + runtime overhead, then the
//! spec's headroom on top. Trusting a user-declared number is how schedulers
//! OOM (HAMi #1069, KAI #2212), so the shapes come from the GGUF header when it can be
//! read, and declared values are only the fallback.

use gguf::split::{layer_ranges, PartSizes};
use gguf::{Gguf, ModelShape, ModelSummary};

/// Bytes per GiB.
pub const GIB: u64 = 1 << 30;
/// KV cache element size: the worker keeps K and V in f16.
pub const KV_BYTES_PER_ELEMENT: u64 = 2;
/// CUDA context, cuBLAS workspace and allocator slack per GPU, as measured for typical
/// runtimes (vLLM and llama.cpp both see 0.3–0.6 GiB).
pub const RUNTIME_OVERHEAD_BYTES: u64 = 512 << 20;
/// Prompt tokens processed per forward pass; bounds prefill activations.
pub const PREFILL_CHUNK: u64 = 512;

/// What the estimate needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelProfile {
    /// Transformer shape.
    pub shape: ModelShape,
    /// Vocabulary size (the logits buffer).
    pub vocab: u64,
    /// Bytes of all weights as stored, and where they are (embedding, head, blocks).
    pub sizes: PartSizes,
}

/// What a replica is configured to admit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Longest sequence.
    pub max_sequence_length: u64,
    /// Concurrent sequences.
    pub max_batch_size: u64,
    /// GPUs the replica's layers are split across.
    pub gpus: u64,
    /// Headroom in percent of the computed need.
    pub headroom_percent: u64,
}

/// The estimate, per part, for one GPU of the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VramEstimate {
    /// Weights on this GPU.
    pub weights: u64,
    /// KV cache on this GPU.
    pub kv_cache: u64,
    /// Activations and scratch on this GPU.
    pub workspace: u64,
    /// Runtime overhead.
    pub overhead: u64,
    /// Headroom.
    pub headroom: u64,
}

impl VramEstimate {
    /// Total bytes to reserve on each GPU of the replica.
    pub fn per_gpu(&self) -> u64 {
        self.weights + self.kv_cache + self.workspace + self.overhead + self.headroom
    }
}

/// Why a model cannot be sized.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// The header lacks what the estimate needs.
    #[error("cannot size the model from its header: {0}")]
    Header(#[from] gguf::Error),
    /// The replica configuration is unusable.
    #[error("invalid replica configuration: {0}")]
    Config(String),
}

impl ModelProfile {
    /// Reads the profile from a GGUF header (no weights needed).
    pub fn from_gguf(g: &Gguf) -> Result<ModelProfile, EstimateError> {
        Ok(Self::from_summary(&g.summary()?))
    }

    /// The profile of a header summary (as `inference-worker inspect` prints it).
    pub fn from_summary(s: &ModelSummary) -> ModelProfile {
        ModelProfile {
            shape: s.shape(),
            vocab: s.vocab,
            sizes: s.part_sizes(),
        }
    }

    /// KV cache bytes for one sequence of `tokens` tokens (whole model, all GPUs):
    /// 2 (K and V) x layers x kv_heads x head_dim x tokens x bytes per element.
    pub fn kv_bytes_per_sequence(&self, tokens: u64) -> u64 {
        2 * self.shape.n_layers
            * self.shape.n_kv_heads
            * self.shape.head_dim
            * tokens
            * KV_BYTES_PER_ELEMENT
    }

    /// The f32 logits of every batch slot (held by the GPU with the output head).
    fn logits_bytes(&self, cfg: &ReplicaConfig) -> u64 {
        cfg.max_batch_size.max(1) * self.vocab * 4
    }

    /// Activation and scratch bytes (whole model): f32 logits for every batch slot,
    /// hidden/MLP activations and attention scores for one prefill chunk.
    pub fn workspace_bytes(&self, cfg: &ReplicaConfig) -> u64 {
        let s = &self.shape;
        let chunk = PREFILL_CHUNK.min(cfg.max_sequence_length);
        let logits = self.logits_bytes(cfg);
        let hidden = chunk * (4 * s.embedding + 2 * s.feed_forward) * 4;
        let scores = s.n_heads * chunk * cfg.max_sequence_length * 4;
        logits + hidden + scores
    }

    /// The per-GPU estimate for a replica configuration. A replica on N GPUs is a
    /// layer split (contiguous blocks of layers per GPU, llama.cpp's default split
    /// mode, by the rule the worker loads with): each GPU holds its blocks' weights and
    /// KV cache, the first the embedding, the last the output head; every GPU holds a
    /// prompt chunk's activations and the last also the logits. The estimate is the
    /// fullest GPU's. Unlike a split by attention heads, it needs no head count
    /// divisible by N (SmolLM2 has 3 KV heads).
    pub fn estimate(&self, cfg: &ReplicaConfig) -> Result<VramEstimate, EstimateError> {
        let gpus = cfg.gpus;
        let layers = self.shape.n_layers.max(1);
        if gpus == 0 || gpus > layers {
            return Err(EstimateError::Config(format!(
                "gpusPerReplica {gpus} cannot split {layers} layers over {gpus} GPUs"
            )));
        }
        if cfg.max_sequence_length > self.shape.context_length {
            return Err(EstimateError::Config(format!(
                "maxSequenceLength {} exceeds the model's context length {}",
                cfg.max_sequence_length, self.shape.context_length
            )));
        }
        // The operator gives every GPU of a replica the same budget, so the worker's
        // shares are equal.
        let ranges = layer_ranges(layers as usize, &vec![1.0; gpus as usize]);
        let kv = self.kv_bytes_per_sequence(cfg.max_sequence_length) * cfg.max_batch_size;
        let logits = self.logits_bytes(cfg);
        let activations = self.workspace_bytes(cfg);
        let overhead = RUNTIME_OVERHEAD_BYTES;
        let (weights, kv_cache, workspace) = ranges
            .iter()
            .map(|r| {
                let last = r.end as u64 == layers;
                (
                    self.sizes.part_weight_bytes(r.clone()),
                    (u128::from(kv) * r.len() as u128).div_ceil(u128::from(layers)) as u64,
                    activations - if last { 0 } else { logits },
                )
            })
            .max_by_key(|(w, k, a)| w + k + a)
            .expect("at least one GPU");
        let base = weights + kv_cache + workspace + overhead;
        Ok(VramEstimate {
            weights,
            kv_cache,
            workspace,
            overhead,
            headroom: base * cfg.headroom_percent / 100,
        })
    }
}

/// Formats bytes as GiB with one decimal, as refusal messages show them.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3(n_layers: u64, embedding: u64, n_heads: u64, ff: u64, params: u64) -> ModelProfile {
        ModelProfile {
            shape: ModelShape {
                architecture: "llama".into(),
                n_layers,
                embedding,
                n_heads,
                n_kv_heads: 8,
                head_dim: 128,
                context_length: 8192,
                feed_forward: ff,
            },
            vocab: 128_256,
            // f16 weights: 2 bytes per parameter; where they are is not known (as in
            // a status.model stored before the per-part figures existed).
            sizes: PartSizes {
                layers: n_layers,
                weight_bytes: params * 2,
                ..PartSizes::default()
            },
        }
    }

    fn cfg(seq: u64, batch: u64, tp: u64, headroom: u64) -> ReplicaConfig {
        ReplicaConfig {
            max_sequence_length: seq,
            max_batch_size: batch,
            gpus: tp,
            headroom_percent: headroom,
        }
    }

    #[test]
    fn llama3_8b_kv_cache_is_128_kib_per_token() {
        // Published shape: 32 layers, 8 KV heads x 128 dims.
        let m = llama3(32, 4096, 32, 14336, 8_030_261_248);
        // 2 x 32 x 8 x 128 x 2 bytes = 131072 bytes per token.
        assert_eq!(m.kv_bytes_per_sequence(1), 131_072);
        // 8192 tokens x 4 sequences = 4 GiB.
        let e = m.estimate(&cfg(8192, 4, 1, 0)).unwrap();
        assert_eq!(e.kv_cache, 4 * GIB);
        assert_eq!(e.weights, 16_060_522_496);
        // logits 4 x 128256 x 4 + hidden 512 x (4x4096 + 2x14336) x 4 + scores 32 x 512 x 8192 x 4
        assert_eq!(e.workspace, 2_052_096 + 92_274_688 + 536_870_912);
        assert_eq!(
            e.per_gpu(),
            16_060_522_496 + 4 * GIB + 631_197_696 + (512 << 20)
        );
        // ~21.3 GiB: does not fit a 24 GB L4, fits a 40 GB A100.
        assert!(e.per_gpu() > 24_000_000_000 - 3 * GIB && e.per_gpu() < 40 * GIB);
    }

    #[test]
    fn llama3_70b_on_4_gpus_is_sized_by_its_fullest_part_the_last() {
        // Published shape: 80 layers, 64 heads, 8 KV heads x 128 dims, 70.55B params.
        let mut m = llama3(80, 8192, 64, 28672, 70_553_706_496);
        // In f16: a block is q, o 8192² + k, v 8192x1024 + the MLP 3 x 8192 x 28672 +
        // two norms (855,654,400 parameters); embedding and head 128256 x 8192 each.
        let (layer, embd, norm) = (855_654_400 * 2, 128_256 * 8192 * 2, 8192 * 4);
        m.sizes = PartSizes {
            layers: 80,
            weight_bytes: 80 * layer + 2 * embd + norm,
            embedding_bytes: embd,
            head_bytes: embd + norm,
            largest_layer_bytes: layer,
        };
        // 2 x 80 x 8 x 128 x 2 = 327680 bytes (320 KiB) per token.
        assert_eq!(m.kv_bytes_per_sequence(1), 327_680);
        let e = m.estimate(&cfg(8192, 32, 4, 10)).unwrap();
        // 20 layers per GPU. The last GPU holds the head (and the logits), which weighs
        // a little more than the first GPU's embedding.
        assert_eq!(e.weights, 20 * layer + embd + norm);
        // KV: 320 KiB x 8192 x 32 = 80 GiB in all, 20 GiB per GPU.
        assert_eq!(e.kv_cache, 20 * GIB);
        assert_eq!(e.overhead, 512 << 20);
        // workspace: logits 32 x 128256 x 4 + hidden 512 x (4x8192 + 2x28672) x 4
        // + scores 64 x 512 x 8192 x 4 = 1,274,707,968: every GPU runs a whole prompt
        // chunk through its layers, so none of it divides by the GPU count.
        assert_eq!(e.workspace, 1_274_707_968);
        // 36,327,555,072 + 21,474,836,480 + 1,274,707,968 + 536,870,912 = 59,613,970,432
        // plus 10% headroom: 65,575,367,475 bytes, 61.1 GiB per GPU: fits 80 GB GPUs.
        assert_eq!(e.per_gpu(), 65_575_367_475);
        // On two GPUs the weights alone take 65.7 GiB each: it does not fit 80 GB.
        assert!(m.estimate(&cfg(8192, 32, 2, 10)).unwrap().per_gpu() > 80 * GIB);
    }

    #[test]
    fn refuses_impossible_configurations() {
        let m = llama3(32, 4096, 32, 14336, 8_030_261_248);
        let e = m.estimate(&cfg(16384, 1, 1, 0)).unwrap_err();
        assert!(
            e.to_string()
                .contains("exceeds the model's context length 8192"),
            "{e}"
        );
        // A layer split needs at least one layer per GPU.
        let mut tiny = m.clone();
        tiny.shape.n_layers = 8;
        let e = tiny.estimate(&cfg(4096, 1, 16, 0)).unwrap_err();
        assert!(
            e.to_string().contains("cannot split 8 layers over 16 GPUs"),
            "{e}"
        );
        // 30 layers on 4 GPUs: the fullest holds 8, so 8/30 of the weights and KV.
        tiny.shape.n_layers = 30;
        let e = tiny.estimate(&cfg(4096, 1, 4, 0)).unwrap();
        assert_eq!(
            e.kv_cache,
            (tiny.kv_bytes_per_sequence(4096) * 8).div_ceil(30)
        );
    }

    /// SmolLM2-135M-Instruct Q4_1 as shipped: the real header, hand-computed numbers.
    #[test]
    fn smollm2_from_the_real_file() {
        let Some(path) = gguf::smollm2_fixture() else {
            return;
        };
        let f = gguf::GgufFile::open(&path).unwrap();
        let m = ModelProfile::from_gguf(f.header()).unwrap();
        assert_eq!(m.vocab, 49_152);
        // 30 layers, 3 KV heads x 64 dims: 2 x 30 x 3 x 64 x 2 = 23040 bytes per token.
        assert_eq!(m.kv_bytes_per_sequence(1), 23_040);
        let e = m.estimate(&cfg(2048, 8, 1, 10)).unwrap();
        // 23040 x 2048 x 8 = 377,487,360 bytes (360 MiB).
        assert_eq!(e.kv_cache, 377_487_360);
        // Weights as a GPU holds them, the worker's own count (gguf::split): Q4_1
        // blocks plus f32 norms, and the tied embedding twice (embedding and head).
        let exact = |r| gguf::split::part_weight_bytes(f.header(), r, 30);
        assert_eq!(e.weights, exact(0..30));
        let embd = f.header().tensor("token_embd.weight").unwrap().n_bytes();
        assert_eq!(e.weights, f.header().weight_bytes() + embd);
        // On two GPUs each holds 15 blocks; the last one the head: the estimate is what
        // the worker loads there, to the byte.
        let two = m.estimate(&cfg(2048, 8, 2, 10)).unwrap();
        assert_eq!(two.weights, exact(15..30));
        assert_eq!(two.kv_cache, 377_487_360 / 2);
        // logits 8 x 49152 x 4 + hidden 512 x (4x576 + 2x1536) x 4 + scores 9 x 512 x 2048 x 4
        assert_eq!(e.workspace, 1_572_864 + 11_010_048 + 37_748_736);
        let total = e.per_gpu() as f64 / GIB as f64;
        assert!((1.0..1.3).contains(&total), "SmolLM2 needs {total:.2} GiB");
    }
}
