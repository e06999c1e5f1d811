//! The boundary between the scheduler and the hardware. The scheduler decides which
//! tokens run together and which KV-cache blocks each sequence owns; a backend owns the
//! weights and the KV storage and runs one forward pass over a batch. The CPU backend is
//! the reference; the CUDA backend implements the same trait.

pub mod cpu;
pub mod cuda;
pub mod split;

use crate::model::{LoadError, ModelConfig};

/// Which logits a chunk wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last token's (generation).
    Last,
    /// Every token's (scoring, tests).
    All,
}

/// Consecutive tokens of one sequence in a batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// Token ids.
    pub tokens: &'a [u32],
    /// Position of the first token (earlier positions are already in the cache).
    pub start: usize,
    /// The sequence's KV blocks, in order; must cover `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// Logits wanted.
    pub logits: Logits,
}

/// Failures inside a forward pass.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A chunk's blocks do not cover its positions, or name a block out of range.
    #[error("KV blocks do not cover position {position} (have {blocks} blocks of {block_size})")]
    KvOutOfRange {
        /// The first position without storage.
        position: usize,
        /// Blocks given.
        blocks: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// A device error (CUDA).
    #[error("device error: {0}")]
    Device(String),
    /// Parts of a split model that do not fit together (a bug, not bad input).
    #[error("layer split: {0}")]
    Handoff(String),
}

/// Size of the paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub n_blocks: usize,
}

impl KvLayout {
    /// Bytes one token's K and V take across all layers (f16 storage).
    pub fn bytes_per_token(c: &ModelConfig) -> usize {
        Self::bytes_per_token_in(c, c.n_layers)
    }

    /// Bytes one token's K and V take in `layers` layers (one part of a split model).
    pub fn bytes_per_token_in(c: &ModelConfig, layers: usize) -> usize {
        layers * 2 * c.kv_dim() * 2
    }

    /// As many blocks as fit in `budget_bytes`.
    pub fn for_budget(c: &ModelConfig, block_size: usize, budget_bytes: u64) -> KvLayout {
        let per_block = (Self::bytes_per_token(c) * block_size) as u64;
        KvLayout {
            block_size,
            n_blocks: (budget_bytes / per_block.max(1)) as usize,
        }
    }
}

/// A batch flattened to one row per token, after checking it against the KV pool and the
/// vocabulary: what every backend's forward pass starts from.
#[derive(Debug, Default)]
pub struct Flat {
    /// Token id of each row.
    pub tokens: Vec<u32>,
    /// Position of each row in its sequence.
    pub pos: Vec<usize>,
    /// Index of the chunk each row came from.
    pub owner: Vec<usize>,
    /// Rows whose logits were asked for, in order.
    pub wanted: Vec<usize>,
}

impl Flat {
    /// Flattens `chunks`, or says which chunk does not fit `layout` or `vocab`.
    pub fn new(
        chunks: &[SeqChunk<'_>],
        layout: KvLayout,
        vocab: usize,
    ) -> Result<Flat, BackendError> {
        let bs = layout.block_size;
        let mut f = Flat::default();
        for (i, ch) in chunks.iter().enumerate() {
            let end = ch.start + ch.tokens.len();
            if end > ch.blocks.len() * bs
                || ch.blocks.iter().any(|b| *b as usize >= layout.n_blocks)
            {
                return Err(BackendError::KvOutOfRange {
                    position: end.saturating_sub(1),
                    blocks: ch.blocks.len(),
                    block_size: bs,
                });
            }
            for (j, t) in ch.tokens.iter().enumerate() {
                if *t as usize >= vocab {
                    return Err(BackendError::BadToken(*t));
                }
                let last = j + 1 == ch.tokens.len();
                if ch.logits == Logits::All || (ch.logits == Logits::Last && last) {
                    f.wanted.push(f.tokens.len());
                }
                f.tokens.push(*t);
                f.pos.push(ch.start + j);
                f.owner.push(i);
            }
        }
        Ok(f)
    }
}

/// How a backend reads a tensor by its GGUF name into its own storage.
pub(crate) trait TensorLoader {
    /// A weight matrix as the backend holds it.
    type Matrix;
    /// A vector (norm weights, biases) as the backend holds it.
    type Vector;
    /// A required matrix.
    fn matrix(&mut self, name: &str) -> Result<Self::Matrix, LoadError>;
    /// A required vector.
    fn vector(&mut self, name: &str) -> Result<Self::Vector, LoadError>;
    /// Whether the file has the tensor (biases and the output head are optional).
    fn has(&self, name: &str) -> bool;
}

/// One transformer block's weights, whatever the backend's storage.
pub(crate) struct LayerWeights<M, V> {
    pub attn_norm: V,
    pub wq: M,
    pub wk: M,
    pub wv: M,
    pub bq: Option<V>,
    pub bk: Option<V>,
    pub bv: Option<V>,
    pub wo: M,
    pub ffn_norm: V,
    pub w_gate: M,
    pub w_up: M,
    pub w_down: M,
}

impl<M, V> LayerWeights<M, V> {
    /// Block `l`'s tensors, by llama.cpp's names.
    pub(crate) fn load<L>(t: &mut L, l: usize) -> Result<Self, LoadError>
    where
        L: TensorLoader<Matrix = M, Vector = V>,
    {
        let n = |s: &str| format!("blk.{l}.{s}");
        let optional = |t: &mut L, s: &str| match t.has(&n(s)) {
            true => t.vector(&n(s)).map(Some),
            false => Ok(None),
        };
        Ok(LayerWeights {
            bq: optional(t, "attn_q.bias")?,
            bk: optional(t, "attn_k.bias")?,
            bv: optional(t, "attn_v.bias")?,
            attn_norm: t.vector(&n("attn_norm.weight"))?,
            wq: t.matrix(&n("attn_q.weight"))?,
            wk: t.matrix(&n("attn_k.weight"))?,
            wv: t.matrix(&n("attn_v.weight"))?,
            wo: t.matrix(&n("attn_output.weight"))?,
            ffn_norm: t.vector(&n("ffn_norm.weight"))?,
            w_gate: t.matrix(&n("ffn_gate.weight"))?,
            w_up: t.matrix(&n("ffn_up.weight"))?,
            w_down: t.matrix(&n("ffn_down.weight"))?,
        })
    }

    /// The output head: `output.weight`, or the embedding when tied (SmolLM2).
    pub(crate) fn output<L>(t: &mut L) -> Result<M, LoadError>
    where
        L: TensorLoader<Matrix = M, Vector = V>,
    {
        match t.has("output.weight") {
            true => t.matrix("output.weight"),
            false => t.matrix("token_embd.weight"),
        }
    }
}

/// A device that runs the model.
pub trait Backend: Send {
    /// "cpu" or "cuda".
    fn name(&self) -> &'static str;
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// The KV pool this backend allocated.
    fn kv_layout(&self) -> KvLayout;
    /// Bytes of memory the backend holds for weights and KV (what the operator budgets).
    fn memory_bytes(&self) -> u64;
    /// One forward pass. Writes each chunk's K/V at its positions and returns the
    /// requested logits rows (vocab wide), chunk by chunk, in order.
    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError>;
}
