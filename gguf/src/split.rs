//! How one replica's model is split over several devices: contiguous blocks of layers,
//! one block per device (llama.cpp's `--split-mode layer`, its default), the token
//! embedding with the first block and the output head with the last. The worker loads
//! its parts by these ranges and the operator sizes each GPU by them, so both use this
//! one rule.

use std::ops::Range;

use crate::Gguf;

/// Contiguous layer ranges, one per device, sized by `shares` (any positive weights,
/// e.g. each device's memory budget). The rule is llama.cpp's (`llama_model::load_tensors`):
/// layer `il` goes to the first device whose cumulative share exceeds `il / n_layers`,
/// so equal shares give every device `floor` or `ceil` of `n_layers / devices`, the
/// larger blocks first. A device may get no layer when its share is tiny; callers
/// refuse that (a device that holds nothing is a meaningless setting).
pub fn layer_ranges(n_layers: usize, shares: &[f64]) -> Vec<Range<usize>> {
    let total: f64 = shares.iter().sum();
    let mut cumulative = Vec::with_capacity(shares.len());
    let mut acc = 0.0;
    for s in shares {
        acc += s / total;
        cumulative.push(acc);
    }
    // Layers with il / n_layers < cumulative share: ceil(share * n_layers), less a
    // rounding margin so that 0.2 + 0.2 + 0.2 counts as 0.6.
    let mut ranges = Vec::with_capacity(shares.len());
    let mut start = 0;
    for (d, c) in cumulative.iter().enumerate() {
        let end = match d + 1 == shares.len() {
            true => n_layers,
            false => ((c * n_layers as f64 - 1e-9).ceil().max(0.0) as usize).clamp(start, n_layers),
        };
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// Bytes of the tensors one part of the model holds, from the header: the blocks in
/// `layers`, the token embedding when it holds layer 0, and the output head (the
/// embedding again when the model ties them) with the final norm when it holds the
/// last layer.
pub fn part_weight_bytes(g: &Gguf, layers: Range<usize>, n_layers: usize) -> u64 {
    let bytes = |name: &str| g.tensor(name).map_or(0, |t| t.n_bytes());
    let mut total: u64 = layers.clone().map(|l| layer_bytes(g, l)).sum();
    if layers.start == 0 {
        total += bytes("token_embd.weight");
    }
    if layers.end == n_layers {
        total += head_bytes(g);
    }
    total
}

/// What a header summary knows of where the weights are: enough to bound each part's
/// share without the tensor table (the operator sizes GPUs from a stored summary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartSizes {
    /// Transformer blocks.
    pub layers: u64,
    /// Bytes of all tensors.
    pub weight_bytes: u64,
    /// Bytes of the token embedding.
    pub embedding_bytes: u64,
    /// Bytes of the output head (the embedding again when tied) and final norm.
    pub head_bytes: u64,
    /// Bytes of the largest block.
    pub largest_layer_bytes: u64,
}

impl PartSizes {
    /// Bytes of weights the part holding `layers` holds, at most (every block counted
    /// as the largest; [`part_weight_bytes`] is exact from the header). Without the
    /// per-part figures (summaries stored before they existed: zero) the whole model's
    /// share by layer count stands in.
    pub fn part_weight_bytes(&self, layers: Range<usize>) -> u64 {
        let n = self.layers.max(1) as usize;
        if self.largest_layer_bytes == 0 {
            return (u128::from(self.weight_bytes) * layers.len() as u128).div_ceil(n as u128)
                as u64;
        }
        let mut total = layers.len() as u64 * self.largest_layer_bytes;
        if layers.start == 0 {
            total += self.embedding_bytes;
        }
        if layers.end == n {
            total += self.head_bytes;
        }
        total
    }
}

/// Bytes of block `l`'s tensors.
pub(crate) fn layer_bytes(g: &Gguf, l: usize) -> u64 {
    let prefix = format!("blk.{l}.");
    g.tensors()
        .iter()
        .filter(|t| t.name.starts_with(&prefix))
        .map(|t| t.n_bytes())
        .sum()
}

/// Bytes of the output head as a device holds it: `output.weight` (the embedding when
/// the model has none) and `output_norm.weight`.
pub(crate) fn head_bytes(g: &Gguf) -> u64 {
    let bytes = |name: &str| g.tensor(name).map_or(0, |t| t.n_bytes());
    let output = match g.tensor("output.weight") {
        Some(t) => t.n_bytes(),
        None => bytes("token_embd.weight"),
    };
    output + bytes("output_norm.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_shares_give_llama_cpp_s_blocks() {
        // 30 layers on 4 devices: il/30 < 0.25 up to il = 7, < 0.5 up to 14, ...
        assert_eq!(
            layer_ranges(30, &[1.0; 4]),
            vec![0..8, 8..15, 15..23, 23..30]
        );
        assert_eq!(
            layer_ranges(80, &[1.0; 4]),
            vec![0..20, 20..40, 40..60, 60..80]
        );
        assert_eq!(layer_ranges(5, &[1.0]), vec![0..5]);
        assert_eq!(layer_ranges(2, &[1.0, 1.0]), vec![0..1, 1..2]);
    }

    #[test]
    fn shares_follow_the_weights_and_cover_every_layer_once() {
        assert_eq!(layer_ranges(30, &[3.0, 1.0]), vec![0..23, 23..30]);
        for n in 1..40 {
            for parts in 1..6 {
                let shares: Vec<f64> = (0..parts).map(|i| 1.0 + i as f64 * 0.7).collect();
                let r = layer_ranges(n, &shares);
                assert_eq!(r.len(), parts);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[parts - 1].end, n);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{n} layers, {parts} parts: {r:?}");
                }
                if parts <= n {
                    let equal = layer_ranges(n, &vec![1.0; parts]);
                    let most = equal.iter().map(|r| r.len()).max().unwrap();
                    assert_eq!(most, n.div_ceil(parts), "{equal:?}");
                    assert!(equal.iter().all(|r| !r.is_empty()), "{equal:?}");
                }
            }
        }
    }
}
