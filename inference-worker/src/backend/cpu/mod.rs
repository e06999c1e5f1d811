//! The CPU backend: the whole Llama forward pass, top to bottom, over a batch of tokens
//! from any number of sequences. Weights stay in the memory-mapped file; matmuls quantise
//! activations to 8 bits and run integer dot products (see `quant`), split across a rayon
//! pool by output rows so every weight row is read once per batch, not once per token.

pub mod quant;

use std::ops::Range;
use std::sync::Arc;

use gguf::GgufFile;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::split::Part;
use super::{Backend, BackendError, Flat, KvLayout, LayerWeights, SeqChunk, TensorLoader};
use crate::model::{LoadError, ModelConfig, RopeStyle};
use quant::{Q8Row, WeightType};

/// A weight matrix: `rows` rows of `cols` elements, stored as in the file.
struct Matrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    offset: usize,
}

impl Matrix {
    fn row<'a>(&self, data: &'a [u8], r: usize) -> &'a [u8] {
        let n = self.ty.row_bytes(self.cols);
        &data[self.offset + r * n..self.offset + (r + 1) * n]
    }
}

type Layer = LayerWeights<Matrix, Vec<f32>>;

/// Paged KV storage: per layer, `n_blocks * block_size` slots of `kv_dim` halves. f16,
/// as llama.cpp stores it: half the memory of f32, and the same rounding as the peer.
struct KvCache {
    layout: KvLayout,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

/// The CPU backend: the whole model ([`CpuBackend::load`]) or one part of a model
/// split by layers ([`CpuBackend::load_part`], run through [`super::split::Split`]).
pub struct CpuBackend {
    file: Arc<GgufFile>,
    config: ModelConfig,
    /// The blocks this instance holds; `layers[i]` is block `range.start + i`.
    range: Range<usize>,
    /// With layer 0: the token embedding.
    embed: Option<Matrix>,
    /// With the last layer: the output head and the final norm.
    head: Option<(Matrix, Vec<f32>)>,
    layers: Vec<Layer>,
    kv: KvCache,
    inv_freq: Vec<f32>,
}

impl CpuBackend {
    /// Checks every tensor against the metadata and allocates the KV pool. Weights are
    /// not copied: they are read from the map as the forward pass needs them.
    pub fn load(file: Arc<GgufFile>, kv: KvLayout) -> Result<CpuBackend, LoadError> {
        let n = ModelConfig::from_gguf(file.header())?.n_layers;
        Self::load_part(file, kv, 0..n)
    }

    /// Loads blocks `range` only (with the embedding when it starts at 0 and the output
    /// head when it ends at the last block), with a KV pool for those layers.
    pub fn load_part(
        file: Arc<GgufFile>,
        kv: KvLayout,
        range: Range<usize>,
    ) -> Result<CpuBackend, LoadError> {
        let config = ModelConfig::from_gguf(file.header())?;
        check_tensors(&file, &config)?;
        check_range(&config, &range)?;
        let mut loader = Loader { file: &file };
        let layers = range
            .clone()
            .map(|l| Layer::load(&mut loader, l))
            .collect::<Result<Vec<_>, _>>()?;
        let embed = match range.start == 0 {
            true => Some(loader.matrix("token_embd.weight")?),
            false => None,
        };
        let head = match range.end == config.n_layers {
            true => Some((
                Layer::output(&mut loader)?,
                loader.vector("output_norm.weight")?,
            )),
            false => None,
        };
        let inv_freq = (0..config.rope_dims / 2)
            .map(|i| {
                config
                    .rope_base
                    .powf(-2.0 * i as f32 / config.rope_dims as f32)
            })
            .collect();
        let slots = kv.n_blocks * kv.block_size * config.kv_dim();
        // Zeroed by the allocator (calloc): pages are mapped when a block is first
        // written, so a worker holds the memory its sequences use, not its whole
        // budget. (`vec![f16::ZERO; n]` wrote every page up front: 1 GiB resident per
        // worker from the start.)
        let zeroed = || {
            use half::vec::HalfBitsVecExt;
            vec![0u16; slots].reinterpret_into::<f16>()
        };
        let kv = KvCache {
            layout: kv,
            k: range.clone().map(|_| zeroed()).collect(),
            v: range.clone().map(|_| zeroed()).collect(),
        };
        Ok(CpuBackend {
            file,
            config,
            range,
            embed,
            head,
            layers,
            kv,
            inv_freq,
        })
    }
}

/// A part must hold at least one block, within the model.
pub(crate) fn check_range(c: &ModelConfig, range: &Range<usize>) -> Result<(), LoadError> {
    if range.is_empty() || range.end > c.n_layers {
        return Err(LoadError::Invalid(format!(
            "layers {}..{} are not a part of a model with {} layers",
            range.start, range.end, c.n_layers
        )));
    }
    Ok(())
}

struct Loader<'a> {
    file: &'a GgufFile,
}

/// Checks every tensor the forward pass reads against the dims the metadata implies and
/// the types the backends compute with (both backends index weights by these shapes).
pub(crate) fn check_tensors(file: &GgufFile, config: &ModelConfig) -> Result<(), LoadError> {
    for spec in config.tensors() {
        check(file, &spec.name, &spec.dims, spec.optional)?;
    }
    Ok(())
}

fn check(file: &GgufFile, name: &str, dims: &[u64], optional: bool) -> Result<(), LoadError> {
    let Some(t) = file.header().tensor(name) else {
        return if optional {
            Ok(())
        } else {
            Err(LoadError::MissingTensor(name.into()))
        };
    };
    if t.dims != dims {
        return Err(LoadError::WrongShape {
            tensor: name.into(),
            found: t.dims.clone(),
            expected: dims.to_vec(),
        });
    }
    let ty = WeightType::from_ggml(t.ggml_type).ok_or_else(|| LoadError::UnsupportedType {
        tensor: name.into(),
        ty: t.ggml_type,
    })?;
    if ty.is_quantized() && !(dims[0] as usize).is_multiple_of(quant::QK) {
        return Err(LoadError::Invalid(format!(
            "{name}: rows of {} are not whole blocks",
            dims[0]
        )));
    }
    Ok(())
}

impl TensorLoader for Loader<'_> {
    type Matrix = Matrix;
    type Vector = Vec<f32>;

    fn matrix(&mut self, name: &str) -> Result<Matrix, LoadError> {
        let t = self
            .file
            .header()
            .tensor(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        let ty = WeightType::from_ggml(t.ggml_type).ok_or_else(|| LoadError::UnsupportedType {
            tensor: name.into(),
            ty: t.ggml_type,
        })?;
        let data = self.file.data(t);
        let offset = data.as_ptr() as usize - self.file.bytes().as_ptr() as usize;
        Ok(Matrix {
            ty,
            cols: t.dims[0] as usize,
            rows: t.dims.get(1).copied().unwrap_or(1) as usize,
            offset,
        })
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>, LoadError> {
        let m = self.matrix(name)?;
        let mut out = vec![0f32; m.cols];
        quant::dequantize_row(m.ty, m.row(self.file.bytes(), 0), &mut out);
        Ok(out)
    }

    fn has(&self, name: &str) -> bool {
        self.file.header().tensor(name).is_some()
    }
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * w;
    }
}

/// Y[t, r] = W[r, :] · X[t, :] for every token t and output row r.
fn matmul(data: &[u8], w: &Matrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    debug_assert_eq!(x.len(), n_tokens * cols);
    let quantized: Vec<Q8Row> = if w.ty.is_quantized() {
        x.par_chunks(cols)
            .map(|xr| {
                let mut q = Q8Row::default();
                q.quantize_from(xr);
                q
            })
            .collect()
    } else {
        vec![Q8Row::default(); n_tokens]
    };
    // Work in row blocks small enough to balance across threads and large enough to keep
    // the per-task overhead (about a microsecond) small; each task reads its rows once.
    let per_task = (rows / (rayon::current_num_threads() * 2)).clamp(16, 1024);
    if n_tokens == 1 {
        y.par_chunks_mut(per_task).enumerate().for_each(|(c, ys)| {
            for (i, out) in ys.iter_mut().enumerate() {
                *out = quant::dot(w.ty, w.row(data, c * per_task + i), x, &quantized[0]);
            }
        });
        return;
    }
    // Per-token views, made once per matmul rather than once per weight row.
    let xs: Vec<&[f32]> = x.chunks(cols).collect();
    let qs: Vec<&Q8Row> = quantized.iter().collect();
    // Transposed result (rows x tokens) so each task owns a contiguous slice.
    let mut yt = vec![0f32; rows * n_tokens];
    yt.par_chunks_mut(per_task * n_tokens)
        .enumerate()
        .for_each(|(c, ys)| {
            for (i, out_row) in ys.chunks_mut(n_tokens).enumerate() {
                let wr = w.row(data, c * per_task + i);
                // Four tokens per pass over the row: the unpacked weights are reused.
                for (g, outs) in out_row.chunks_mut(4).enumerate() {
                    let ts = g * 4..g * 4 + outs.len();
                    quant::dot_many(w.ty, wr, &xs[ts.clone()], &qs[ts], outs);
                }
            }
        });
    for t in 0..n_tokens {
        for r in 0..rows {
            y[t * rows + r] = yt[r * n_tokens + t];
        }
    }
}

fn add_bias(y: &mut [f32], bias: &Option<Vec<f32>>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
}

fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32], style: RopeStyle) {
    for head in x.chunks_mut(head_dim) {
        for (i, f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + inv_freq.len()),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

/// Where the K/V of position `pos` lives in the pool, in units of slots.
fn slot(blocks: &[u32], block_size: usize, pos: usize) -> usize {
    blocks[pos / block_size] as usize * block_size + pos % block_size
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.kv.layout
    }

    fn memory_bytes(&self) -> u64 {
        let kv: usize = self
            .kv
            .k
            .iter()
            .chain(&self.kv.v)
            .map(|l| l.len() * 2)
            .sum();
        let weights = match self.range == (0..self.config.n_layers) {
            // One map: a tied head reads the embedding's pages.
            true => self.file.header().weight_bytes(),
            false => gguf::split::part_weight_bytes(
                self.file.header(),
                self.range.clone(),
                self.config.n_layers,
            ),
        };
        weights + kv as u64
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
        super::split::forward_whole(self, chunks)
    }
}

impl Part for CpuBackend {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn layers(&self) -> Range<usize> {
        self.range.clone()
    }

    fn forward_part(
        &mut self,
        chunks: &[SeqChunk<'_>],
        hidden: Option<Vec<f32>>,
    ) -> Result<Vec<f32>, BackendError> {
        let c = &self.config;
        let (dim, qd, kvd, hd, ffd) = (c.dim, c.q_dim(), c.kv_dim(), c.head_dim, c.ffn_dim);
        let bs = self.kv.layout.block_size;
        let Flat {
            tokens,
            pos,
            owner,
            wanted,
        } = Flat::new(chunks, self.kv.layout, c.vocab)?;
        let n = tokens.len();
        let file = Arc::clone(&self.file);
        let data = file.bytes();
        // 1. The residual stream: the tokens' embeddings, or the previous part's output.
        super::split::check_handoff(&self.range, self.embed.is_some(), hidden.as_deref(), n, dim)?;
        let mut x = match (&self.embed, hidden) {
            (Some(embed), _) => {
                let mut x = vec![0f32; n * dim];
                for (row, t) in x.chunks_mut(dim).zip(&tokens) {
                    quant::dequantize_row(embed.ty, embed.row(data, *t as usize), row);
                }
                x
            }
            (None, h) => h.expect("checked above"),
        };
        let mut xb = vec![0f32; n * dim];
        let mut q = vec![0f32; n * qd];
        let mut k = vec![0f32; n * kvd];
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut gate = vec![0f32; n * ffd];
        let mut up = vec![0f32; n * ffd];
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            for (o, i) in xb.chunks_mut(dim).zip(x.chunks(dim)) {
                rmsnorm(i, &layer.attn_norm, c.norm_eps, o);
            }
            matmul(data, &layer.wq, &xb, n, &mut q);
            matmul(data, &layer.wk, &xb, n, &mut k);
            matmul(data, &layer.wv, &xb, n, &mut v);
            add_bias(&mut q, &layer.bq);
            add_bias(&mut k, &layer.bk);
            add_bias(&mut v, &layer.bv);
            for t in 0..n {
                rope(
                    &mut q[t * qd..(t + 1) * qd],
                    hd,
                    pos[t],
                    &self.inv_freq,
                    c.rope_style,
                );
                rope(
                    &mut k[t * kvd..(t + 1) * kvd],
                    hd,
                    pos[t],
                    &self.inv_freq,
                    c.rope_style,
                );
                let s = slot(chunks[owner[t]].blocks, bs, pos[t]) * kvd;
                self.kv.k[l][s..s + kvd].convert_from_f32_slice(&k[t * kvd..(t + 1) * kvd]);
                self.kv.v[l][s..s + kvd].convert_from_f32_slice(&v[t * kvd..(t + 1) * kvd]);
            }
            // Causal attention: each (token, head) over its own sequence's positions 0..=pos.
            let (kc, vc) = (&self.kv.k[l], &self.kv.v[l]);
            att.par_chunks_mut(hd).enumerate().for_each(|(i, out)| {
                let (t, h) = (i / c.n_heads, i % c.n_heads);
                let kvh = h / group;
                // Q meets the f16 cache at f16 precision, as in llama.cpp.
                let qh: Vec<f32> = q[t * qd + h * hd..t * qd + (h + 1) * hd]
                    .iter()
                    .map(|v| f16::from_f32(*v).to_f32())
                    .collect();
                let blocks = chunks[owner[t]].blocks;
                let mut kf = vec![0f32; hd];
                let mut scores: Vec<f32> = (0..=pos[t])
                    .map(|p| {
                        let s = slot(blocks, bs, p) * kvd + kvh * hd;
                        kc[s..s + hd].convert_to_f32_slice(&mut kf);
                        qh.iter().zip(&kf).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                scores.iter_mut().for_each(|s| {
                    *s = (*s - max).exp();
                    sum += *s;
                });
                out.fill(0.0);
                for (p, w) in scores.iter().enumerate() {
                    let s = slot(blocks, bs, p) * kvd + kvh * hd;
                    let w = f16::from_f32(w / sum).to_f32();
                    vc[s..s + hd].convert_to_f32_slice(&mut kf);
                    out.iter_mut().zip(&kf).for_each(|(o, v)| *o += w * v);
                }
            });
            matmul(data, &layer.wo, &att, n, &mut xb);
            x.iter_mut().zip(&xb).for_each(|(a, b)| *a += b);
            for (o, i) in xb.chunks_mut(dim).zip(x.chunks(dim)) {
                rmsnorm(i, &layer.ffn_norm, c.norm_eps, o);
            }
            matmul(data, &layer.w_gate, &xb, n, &mut gate);
            matmul(data, &layer.w_up, &xb, n, &mut up);
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            matmul(data, &layer.w_down, &gate, n, &mut xb);
            x.iter_mut().zip(&xb).for_each(|(a, b)| *a += b);
        }
        // A part before the last hands its residual stream on.
        let Some((output, output_norm)) = &self.head else {
            return Ok(x);
        };
        // Only the rows whose logits were asked for go through the (large) output head.
        let mut normed = vec![0f32; wanted.len() * dim];
        for (o, t) in normed.chunks_mut(dim).zip(&wanted) {
            rmsnorm(&x[t * dim..(t + 1) * dim], output_norm, c.norm_eps, o);
        }
        let mut logits = vec![0f32; wanted.len() * c.vocab];
        if !wanted.is_empty() {
            matmul(data, output, &normed, wanted.len(), &mut logits);
        }
        Ok(logits)
    }
}
