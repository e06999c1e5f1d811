//! One replica over several devices, split by layers (llama.cpp's `--split-mode layer`,
//! its default): each device holds a contiguous block of transformer layers and the KV
//! cache of those layers; the first also holds the token embedding, the last the output
//! head. A forward pass runs the parts in order and hands the residual stream (one row
//! of `dim` floats per token) from each to the next. Every part computes exactly what
//! the whole model would for its layers, so the split changes where the work runs,
//! never the result: a model split over two CPU parts gives bit-identical logits to
//! one CPU backend (tested), which proves the split logic on every machine.
//!
//! Devices run one after another, not at once: with one batch in flight, a layer split
//! buys memory (a model larger than one device), not speed; llama.cpp's pipeline
//! parallelism over several batches is not implemented.

use std::ops::Range;

use super::{Backend, BackendError, KvLayout, SeqChunk};
use crate::model::{LoadError, ModelConfig};

/// One device's part of a split model: a backend (its `kv_layout` is the pool of its
/// own layers, its `memory_bytes` what it holds on its device) that can also run only
/// its blocks.
pub trait Part: Backend {
    /// The device, for logs and messages ("cpu", "cuda:1 (H100)").
    fn device(&self) -> String;
    /// The blocks this part holds.
    fn layers(&self) -> Range<usize>;
    /// Runs this part's layers over the batch. `hidden` is `None` for the part holding
    /// layer 0 (it embeds the tokens), else the previous part's output, one row of `dim`
    /// per token in batch order. Returns that output for the next part, or, from the
    /// part holding the last layer, the requested logits (as [`Backend::forward`]).
    fn forward_part(
        &mut self,
        chunks: &[SeqChunk<'_>],
        hidden: Option<Vec<f32>>,
    ) -> Result<Vec<f32>, BackendError>;
}

/// [`Backend::forward`] of a part: only a part that holds the whole model runs alone
/// (a part before the last would hand hidden states out as logits).
pub(crate) fn forward_whole<P: Part>(
    p: &mut P,
    chunks: &[SeqChunk<'_>],
) -> Result<Vec<f32>, BackendError> {
    let layers = p.layers();
    if layers != (0..p.config().n_layers) {
        return Err(BackendError::Handoff(format!(
            "this {} backend holds layers {layers:?} only; run it as a part of a split",
            p.name()
        )));
    }
    p.forward_part(chunks, None)
}

/// Checks what a part is handed: nothing for the part with the embedding, else
/// `tokens` rows of `dim`.
pub(crate) fn check_handoff(
    layers: &Range<usize>,
    embeds: bool,
    hidden: Option<&[f32]>,
    tokens: usize,
    dim: usize,
) -> Result<(), BackendError> {
    match (embeds, hidden) {
        (true, None) => Ok(()),
        (false, Some(h)) if h.len() == tokens * dim => Ok(()),
        (_, h) => Err(BackendError::Handoff(format!(
            "layers {layers:?} got {} hidden values for {tokens} tokens of {dim}",
            h.map_or(0, <[f32]>::len)
        ))),
    }
}

/// A model split over several parts; a [`Backend`] to the scheduler.
pub struct Split {
    parts: Vec<Box<dyn Part>>,
}

impl Split {
    /// Chains `parts`, which must cover the model's layers in order, once each, with one
    /// KV layout (the scheduler's block ids name a slot on every part).
    pub fn new(parts: Vec<Box<dyn Part>>) -> Result<Split, LoadError> {
        let Some(first) = parts.first() else {
            return Err(LoadError::Invalid("a split needs at least one part".into()));
        };
        let (n, layout) = (first.config().n_layers, first.kv_layout());
        let mut next = 0;
        for p in &parts {
            let r = p.layers();
            if r.start != next || r.is_empty() {
                return Err(LoadError::Invalid(format!(
                    "{} holds layers {r:?}, but the next part must start at layer {next}",
                    p.device()
                )));
            }
            if p.kv_layout() != layout {
                return Err(LoadError::Invalid(format!(
                    "{} has KV layout {:?}, the first part {layout:?}",
                    p.device(),
                    p.kv_layout()
                )));
            }
            next = r.end;
        }
        if next != n {
            return Err(LoadError::Invalid(format!(
                "the parts hold layers 0..{next} of {n}"
            )));
        }
        Ok(Split { parts })
    }

    /// What each part holds: (device, layers, bytes).
    pub fn parts(&self) -> Vec<(String, Range<usize>, u64)> {
        self.parts
            .iter()
            .map(|p| (p.device(), p.layers(), p.memory_bytes()))
            .collect()
    }
}

impl Backend for Split {
    /// The backend's kind when the model is on one device, else "split".
    fn name(&self) -> &'static str {
        match self.parts.as_slice() {
            [one] => one.name(),
            _ => "split",
        }
    }

    fn config(&self) -> &ModelConfig {
        self.parts[0].config()
    }

    fn kv_layout(&self) -> KvLayout {
        self.parts[0].kv_layout()
    }

    fn memory_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.memory_bytes()).sum()
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
        let mut hidden = None;
        for p in &mut self.parts {
            hidden = Some(p.forward_part(chunks, hidden)?);
        }
        Ok(hidden.expect("a split has at least one part"))
    }
}
