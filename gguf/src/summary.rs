//! What sizing a replica needs from a model, read from the header alone: the shape,
//! the vocabulary, and the bytes of the weights by element type. The worker prints it
//! (`inference-worker inspect MODEL --json`), the operator's probe pods and HTTP range
//! reads produce it, and the InferenceDeployment's `status.model` stores it, so the one
//! type is the contract between them (with the `serde` feature, in camelCase).

use std::collections::BTreeMap;

use crate::{Gguf, Result};

/// A model's header facts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema),
    serde(rename_all = "camelCase")
)]
pub struct ModelSummary {
    /// `general.architecture` (llama, qwen2, ...).
    pub architecture: String,
    /// Parameters: elements of every tensor.
    pub parameters: u64,
    /// Transformer blocks.
    pub layers: u64,
    /// Hidden size.
    pub embedding: u64,
    /// Query heads.
    pub heads: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// Dimension of one head.
    pub head_dim: u64,
    /// MLP inner size.
    pub feed_forward: u64,
    /// Context length the model was trained for.
    pub context_length: u64,
    /// Vocabulary size (tokens in the tokenizer, else `<arch>.vocab_size`).
    pub vocab: u64,
    /// Bytes of all tensor data.
    pub weight_bytes: u64,
    /// Bytes of tensor data by ggml element type (`Q4_1`, `F32`, ...).
    pub tensor_bytes: BTreeMap<String, u64>,
    /// Bytes of the token embedding (`token_embd.weight`): what the first device of a
    /// split replica holds beyond its layers.
    #[cfg_attr(feature = "serde", serde(default))]
    pub embedding_bytes: u64,
    /// Bytes of the output head and final norm (the embedding again when the model ties
    /// them): what the last device holds beyond its layers.
    #[cfg_attr(feature = "serde", serde(default))]
    pub head_bytes: u64,
    /// Bytes of the largest transformer block (blocks differ only when a quantisation
    /// mixes types by layer).
    #[cfg_attr(feature = "serde", serde(default))]
    pub largest_layer_bytes: u64,
    /// `tokenizer.ggml.model` (`gpt2`, `llama`), when the file carries a tokenizer.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub tokenizer: Option<String>,
    /// Whether the file carries a chat template.
    #[cfg_attr(feature = "serde", serde(default))]
    pub chat_template: bool,
}

impl Gguf {
    /// The summary of this header; fails when the shape keys are missing or corrupt.
    pub fn summary(&self) -> Result<ModelSummary> {
        let shape = self.shape()?;
        let vocab = match self.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(tokens) => tokens.len() as u64,
            None => self.get_u64(&format!("{}.vocab_size", shape.architecture))?,
        };
        let mut tensor_bytes = BTreeMap::new();
        for t in self.tensors() {
            *tensor_bytes
                .entry(format!("{:?}", t.ggml_type))
                .or_default() += t.n_bytes();
        }
        Ok(ModelSummary {
            parameters: self.parameter_count(),
            layers: shape.n_layers,
            embedding: shape.embedding,
            heads: shape.n_heads,
            kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            feed_forward: shape.feed_forward,
            context_length: shape.context_length,
            vocab,
            weight_bytes: self.weight_bytes(),
            tensor_bytes,
            embedding_bytes: self.tensor("token_embd.weight").map_or(0, |t| t.n_bytes()),
            head_bytes: crate::split::head_bytes(self),
            largest_layer_bytes: (0..shape.n_layers as usize)
                .map(|l| crate::split::layer_bytes(self, l))
                .max()
                .unwrap_or(0),
            tokenizer: self
                .get("tokenizer.ggml.model")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            chat_template: self.get("tokenizer.chat_template").is_some(),
            architecture: shape.architecture,
        })
    }
}

impl ModelSummary {
    /// Where the weights are, for sizing each part of a split replica.
    pub fn part_sizes(&self) -> crate::split::PartSizes {
        crate::split::PartSizes {
            layers: self.layers,
            weight_bytes: self.weight_bytes,
            embedding_bytes: self.embedding_bytes,
            head_bytes: self.head_bytes,
            largest_layer_bytes: self.largest_layer_bytes,
        }
    }

    /// The transformer shape the summary describes.
    pub fn shape(&self) -> crate::ModelShape {
        crate::ModelShape {
            architecture: self.architecture.clone(),
            n_layers: self.layers,
            embedding: self.embedding,
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            context_length: self.context_length,
            feed_forward: self.feed_forward,
        }
    }
}

impl crate::Error {
    /// For a header cut short, how long a prefix would hold what was being read: a
    /// reader of a remote file fetches at least that much and parses again.
    pub fn prefix_needed(&self) -> Option<u64> {
        match self {
            // A corrupt count can claim any length: saturate, never overflow.
            crate::Error::Truncated { offset, needed, .. } => Some(offset.saturating_add(*needed)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn smollm2_summary_matches_its_published_shape() {
        let Some(path) = crate::smollm2_fixture() else {
            return;
        };
        let f = crate::GgufFile::open(&path).unwrap();
        let s = f.header().summary().unwrap();
        assert_eq!(
            (
                s.architecture.as_str(),
                s.layers,
                s.heads,
                s.kv_heads,
                s.head_dim
            ),
            ("llama", 30, 9, 3, 64)
        );
        assert_eq!((s.embedding, s.feed_forward, s.vocab), (576, 1536, 49_152));
        assert_eq!(s.parameters, 134_515_008);
        assert_eq!(s.tensor_bytes.values().sum::<u64>(), s.weight_bytes);
        assert!(s.tensor_bytes.contains_key("Q4_1"), "{:?}", s.tensor_bytes);
        assert_eq!(s.tokenizer.as_deref(), Some("gpt2"));
        assert!(s.chat_template);
        // Tied embeddings: the last device of a split holds the embedding again as its
        // head, with the f32 final norm.
        assert_eq!(s.head_bytes, s.embedding_bytes + 576 * 4);
        let exact = |r: std::ops::Range<usize>| crate::split::part_weight_bytes(f.header(), r, 30);
        assert_eq!(exact(0..30), s.weight_bytes + s.embedding_bytes);
        for parts in crate::split::layer_ranges(30, &[1.0; 4]) {
            assert!(s.part_sizes().part_weight_bytes(parts.clone()) >= exact(parts.clone()));
        }
        assert_eq!(exact(0..15) + exact(15..30), exact(0..30));
    }

    /// Found by `scripts/fuzz.sh` (gguf_header): an array claiming u64::MAX elements
    /// overflowed `prefix_needed`.
    #[test]
    fn an_absurd_array_length_saturates_the_prefix_needed() {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // tensors
        b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&9u32.to_le_bytes()); // array
        b.extend_from_slice(&0u32.to_le_bytes()); // of u8
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        let e = crate::Gguf::parse(&b).unwrap_err();
        assert_eq!(e.prefix_needed(), Some(u64::MAX));
    }

    #[test]
    fn a_cut_header_says_how_much_more_it_needs() {
        let Some(path) = crate::smollm2_fixture() else {
            return;
        };
        let bytes = std::fs::read(&path).unwrap();
        let full = crate::Gguf::parse(&bytes).unwrap().summary().unwrap();
        // Grow a prefix as a range reader does, from 4 KiB: each error names a longer
        // prefix, and the parse of the grown prefix gives the same summary.
        let mut len = 4096usize;
        let mut rounds = 0;
        let got = loop {
            rounds += 1;
            match crate::Gguf::parse(&bytes[..len]) {
                Ok(g) => break g.summary().unwrap(),
                Err(e) => {
                    let need = e.prefix_needed().expect("only truncation") as usize;
                    assert!(need > len, "{need} <= {len}");
                    len = need.max(len * 2).min(bytes.len());
                }
            }
        };
        assert_eq!(got, full);
        assert!(
            rounds > 1 && len < bytes.len() / 10,
            "{rounds} rounds, {len} bytes"
        );
    }
}
