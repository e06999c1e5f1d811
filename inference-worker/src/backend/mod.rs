//! The boundary between the scheduler and the hardware. The scheduler decides which
//! tokens run together and which KV-cache blocks each sequence owns; a backend owns the
//! weights and the KV storage and runs one forward pass over a batch. The CPU backend is
//! the reference; the CUDA backend implements the same trait.

pub mod cpu;
pub mod cuda;

use crate::model::ModelConfig;

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
        c.n_layers * 2 * c.kv_dim() * 2
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
