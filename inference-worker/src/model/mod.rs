//! The model as the worker understands it: a Llama-family decoder described by the
//! GGUF metadata, and the names of its tensors. Backends load the weights they need
//! from these names; nothing here depends on how a backend computes.

use gguf::{GgmlType, Gguf};

/// Why a model file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not valid GGUF (or cannot be read).
    #[error(transparent)]
    Gguf(#[from] gguf::Error),
    /// `general.architecture` is not one this worker runs.
    #[error("architecture {0:?} is not supported (supported: llama, qwen2, mistral)")]
    UnsupportedArchitecture(String),
    /// A tensor the architecture needs is missing.
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    /// A tensor has the wrong dimensions.
    #[error("tensor {tensor:?} has dims {found:?}, expected {expected:?}")]
    WrongShape {
        /// Tensor name.
        tensor: String,
        /// Dims in the file (innermost first).
        found: Vec<u64>,
        /// Dims the metadata implies.
        expected: Vec<u64>,
    },
    /// A tensor's element type has no kernel in this backend.
    #[error("tensor {tensor:?} has type {ty:?}, which this worker cannot compute with (supported: F32, F16, Q4_0, Q4_1, Q8_0)")]
    UnsupportedType {
        /// Tensor name.
        tensor: String,
        /// Its type.
        ty: GgmlType,
    },
    /// Metadata is inconsistent (e.g. heads that do not divide the embedding).
    #[error("invalid model metadata: {0}")]
    Invalid(String),
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's Llama conversion permutes Q/K for this.
    Interleaved,
    /// Halves (i, i + d/2), as GPT-NeoX and Qwen2 lay them out.
    Halves,
}

/// The decoder's hyper-parameters, read from GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, or the architecture.
    pub name: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Hidden size.
    pub dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// MLP inner size.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Trained context length.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// Dimensions of each head that are rotated.
    pub rope_dims: usize,
    /// Pairing of rotated dimensions.
    pub rope_style: RopeStyle,
}

impl ModelConfig {
    /// Reads and checks the hyper-parameters.
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig, LoadError> {
        let arch = g.get_str("general.architecture")?.to_string();
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Halves,
            _ => return Err(LoadError::UnsupportedArchitecture(arch)),
        };
        let shape = g.shape()?;
        let key = |k: &str| format!("{arch}.{k}");
        let f = |k: &str, default: f64| g.get(&key(k)).and_then(|v| v.as_f64()).unwrap_or(default);
        let embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| LoadError::MissingTensor("token_embd.weight".into()))?;
        let vocab = *embd.dims.get(1).unwrap_or(&0) as usize;
        let c = ModelConfig {
            name: g
                .get("general.name")
                .and_then(|v| v.as_str())
                .unwrap_or(&arch)
                .to_string(),
            n_layers: shape.n_layers as usize,
            dim: shape.embedding as usize,
            n_heads: shape.n_heads as usize,
            n_kv_heads: shape.n_kv_heads as usize,
            head_dim: shape.head_dim as usize,
            ffn_dim: shape.feed_forward as usize,
            vocab,
            context_length: shape.context_length as usize,
            norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5) as f32,
            rope_base: f("rope.freq_base", 10_000.0) as f32,
            rope_dims: g
                .get(&key("rope.dimension_count"))
                .and_then(|v| v.as_u64())
                .unwrap_or(shape.head_dim) as usize,
            rope_style,
            architecture: arch,
        };
        if c.n_heads == 0 || c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(LoadError::Invalid(format!(
                "{} query heads cannot be grouped over {} key/value heads",
                c.n_heads, c.n_kv_heads
            )));
        }
        if c.rope_dims > c.head_dim || !c.rope_dims.is_multiple_of(2) || vocab == 0 {
            return Err(LoadError::Invalid(format!(
                "rope dims {} / head dim {} / vocab {}",
                c.rope_dims, c.head_dim, vocab
            )));
        }
        Ok(c)
    }

    /// Width of the K (and V) projection.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of the Q projection.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// The tensors the forward pass reads, with the dims (innermost first) each must have.
    /// Optional ones (biases, a separate output matrix) are marked.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (d, q, kv, ff) = (
            self.dim as u64,
            self.q_dim() as u64,
            self.kv_dim() as u64,
            self.ffn_dim as u64,
        );
        let mut v = vec![
            TensorSpec::new("token_embd.weight", &[d, self.vocab as u64]),
            TensorSpec::new("output_norm.weight", &[d]),
            TensorSpec::optional("output.weight", &[d, self.vocab as u64]),
        ];
        for l in 0..self.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            v.extend([
                TensorSpec::new(&n("attn_norm.weight"), &[d]),
                TensorSpec::new(&n("attn_q.weight"), &[d, q]),
                TensorSpec::new(&n("attn_k.weight"), &[d, kv]),
                TensorSpec::new(&n("attn_v.weight"), &[d, kv]),
                TensorSpec::optional(&n("attn_q.bias"), &[q]),
                TensorSpec::optional(&n("attn_k.bias"), &[kv]),
                TensorSpec::optional(&n("attn_v.bias"), &[kv]),
                TensorSpec::new(&n("attn_output.weight"), &[q, d]),
                TensorSpec::new(&n("ffn_norm.weight"), &[d]),
                TensorSpec::new(&n("ffn_gate.weight"), &[d, ff]),
                TensorSpec::new(&n("ffn_up.weight"), &[d, ff]),
                TensorSpec::new(&n("ffn_down.weight"), &[ff, d]),
            ]);
        }
        v
    }
}

/// A tensor the forward pass reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// GGUF tensor name.
    pub name: String,
    /// Expected dims, innermost first.
    pub dims: Vec<u64>,
    /// Whether the model may leave it out.
    pub optional: bool,
}

impl TensorSpec {
    fn new(name: &str, dims: &[u64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            optional: false,
        }
    }
    fn optional(name: &str, dims: &[u64]) -> TensorSpec {
        TensorSpec {
            optional: true,
            ..TensorSpec::new(name, dims)
        }
    }
}
