//! The CPU backend: the whole Llama forward pass, top to bottom, over a batch of tokens
//! from any number of sequences. Matmuls quantise activations to 8 bits and run integer
//! dot products, split across a rayon pool by output rows so every weight row is read
//! once per batch, not once per token. Where the CPU has AVX-512 VNNI the quantised
//! weights are repacked at load into four-row tiles (`packed`); elsewhere they stay in
//! the memory-mapped file and go row by row through AVX2 or scalar code (`quant`).

mod attention;
pub mod packed;
pub mod quant;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gguf::GgufFile;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::split::Part;
use super::{Backend, BackendError, Flat, KvLayout, LayerWeights, SeqChunk, TensorLoader};
use crate::model::{LoadError, ModelConfig, RopeStyle};
use packed::{Packed, TILE};
use quant::{Q8Row, WeightType};

/// Which matmul kernels a backend runs, chosen at load from what the CPU offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// Rows as mapped from the file, through the AVX2 dot products where the CPU has
    /// AVX2, FMA and F16C, else the scalar reference.
    Rows,
    /// Quantised weights repacked into four-row tiles, through AVX-512 VNNI.
    Tiles,
}

impl Kernels {
    /// The fastest this CPU runs (`GPUSCALE_NO_SIMD` set: the scalar rows).
    pub fn best() -> Kernels {
        match packed::available() {
            true => Kernels::Tiles,
            false => Kernels::Rows,
        }
    }

    /// `GPUSCALE_CPU_KERNELS` (`rows` or `tiles`) when set, to compare them; else
    /// [`Kernels::best`].
    pub fn from_env() -> Result<Kernels, LoadError> {
        Self::parse(std::env::var("GPUSCALE_CPU_KERNELS").ok().as_deref())
    }

    fn parse(v: Option<&str>) -> Result<Kernels, LoadError> {
        match v {
            None => Ok(Self::best()),
            Some("rows") => Ok(Kernels::Rows),
            Some("tiles") => Ok(Kernels::Tiles),
            Some(other) => Err(LoadError::Invalid(format!(
                "GPUSCALE_CPU_KERNELS={other:?}: expected `rows` or `tiles`"
            ))),
        }
    }

    /// What a benchmark prints.
    pub fn describe(self) -> &'static str {
        match self {
            Kernels::Tiles => "AVX-512 VNNI, four-row tiles",
            Kernels::Rows if quant::simd_available() => "AVX2, rows",
            Kernels::Rows => "scalar, rows",
        }
    }
}

/// Where a backend's forward passes have spent their time, summed since load: what the
/// worker benchmark reports as the share of a decode step outside matmuls and attention.
#[derive(Clone, Copy, Debug, Default)]
pub struct Profile {
    /// Forward passes.
    pub passes: u64,
    /// Wall time of the passes.
    pub total: Duration,
    /// Of which in matmuls (activation quantisation included).
    pub matmul: Duration,
    /// Of which in attention over the KV cache.
    pub attention: Duration,
}

impl Profile {
    fn time<R>(slot: &mut Duration, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        *slot += t.elapsed();
        r
    }
}

/// A weight matrix: `rows` rows of `cols` elements, stored as in the file (`offset`),
/// and repacked into tiles when the backend runs [`Kernels::Tiles`].
struct Matrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    offset: usize,
    packed: Option<Packed>,
}

impl Matrix {
    fn row<'a>(&self, data: &'a [u8], r: usize) -> &'a [u8] {
        let n = self.ty.row_bytes(self.cols);
        &data[self.offset + r * n..self.offset + (r + 1) * n]
    }
}

type Layer = LayerWeights<Matrix, Vec<f32>>;

/// With the tile kernels, a layer's Q, K and V weights as one matrix and its gate and up
/// weights as another: one parallel step over one quantised input instead of three and
/// two (each step costs the threads a hand-off, and at decode those add up).
struct Fused {
    qkv: Option<Matrix>,
    gate_up: Option<Matrix>,
}

impl Fused {
    /// Takes the parts' tiles where they can be joined (all tiled, same type and width,
    /// whole tiles); parts that cannot be joined keep their own.
    fn take(l: &mut Layer) -> Fused {
        Fused {
            qkv: Self::join(&mut [&mut l.wq, &mut l.wk, &mut l.wv]),
            gate_up: Self::join(&mut [&mut l.w_gate, &mut l.w_up]),
        }
    }

    fn join(ms: &mut [&mut Matrix]) -> Option<Matrix> {
        if ms.iter().any(|m| m.packed.is_none()) {
            return None;
        }
        let parts = ms.iter_mut().filter_map(|m| m.packed.take()).collect();
        match Packed::concat(parts) {
            Ok(p) => Some(Matrix {
                ty: ms[0].ty,
                rows: p.rows(),
                cols: ms[0].cols,
                offset: 0,
                packed: Some(p),
            }),
            Err(back) => {
                ms.iter_mut()
                    .zip(back)
                    .for_each(|(m, p)| m.packed = Some(p));
                None
            }
        }
    }
}

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
    /// Per layer, its joined matrices (tile kernels only).
    fused: Vec<Fused>,
    kv: KvCache,
    inv_freq: Vec<f32>,
    kernels: Kernels,
    profile: Profile,
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
        Self::load_with(file, kv, range, Kernels::from_env()?)
    }

    /// [`CpuBackend::load_part`] with the kernels named (tests compare them).
    pub fn load_with(
        file: Arc<GgufFile>,
        kv: KvLayout,
        range: Range<usize>,
        kernels: Kernels,
    ) -> Result<CpuBackend, LoadError> {
        if kernels == Kernels::Tiles && !packed::available() {
            return Err(LoadError::Invalid(
                "this CPU lacks AVX-512 VNNI, which the tile kernels need".into(),
            ));
        }
        let config = ModelConfig::from_gguf(file.header())?;
        check_tensors(&file, &config)?;
        check_range(&config, &range)?;
        let mut loader = Loader {
            file: &file,
            kernels,
        };
        let mut layers = range
            .clone()
            .map(|l| Layer::load(&mut loader, l))
            .collect::<Result<Vec<_>, _>>()?;
        let fused = layers.iter_mut().map(Fused::take).collect();
        let embed = match range.start == 0 {
            // Read a row per token from the map, never through a matmul: not packed.
            true => Some(loader.locate("token_embd.weight")?),
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
            fused,
            kv,
            inv_freq,
            kernels,
            profile: Profile::default(),
        })
    }

    /// The kernels this backend runs.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Where the forward passes since load spent their time.
    pub fn profile(&self) -> Profile {
        self.profile
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
    kernels: Kernels,
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
        let mut m = self.locate(name)?;
        if self.kernels == Kernels::Tiles && Packed::supports(m.ty) {
            let t = self.file.header().tensor(name).expect("located above");
            m.packed = Some(Packed::pack(m.ty, m.rows, m.cols, self.file.data(t)));
            // The copy is what the kernels read; the embedding's lookups (the same
            // tensor when the head is tied) fault in just the rows they read.
            self.file.release(t);
        }
        Ok(m)
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>, LoadError> {
        let m = self.locate(name)?;
        let mut out = vec![0f32; m.cols];
        quant::dequantize_row(m.ty, m.row(self.file.bytes(), 0), &mut out);
        Ok(out)
    }

    fn has(&self, name: &str) -> bool {
        self.file.header().tensor(name).is_some()
    }
}

impl Loader<'_> {
    /// Where tensor `name` lies in the map, checked against the types computed with.
    fn locate(&self, name: &str) -> Result<Matrix, LoadError> {
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
            packed: None,
        })
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
    let quantize = |xr: &[f32]| {
        let mut q = Q8Row::default();
        q.quantize_from(xr);
        q
    };
    let quantized: Vec<Q8Row> = if w.ty.is_quantized() {
        // A few rows take less than handing work to another thread costs.
        match n_tokens < 8 {
            true => x.chunks(cols).map(quantize).collect(),
            false => x.par_chunks(cols).map(quantize).collect(),
        }
    } else {
        vec![Q8Row::default(); n_tokens]
    };
    if let Some(p) = &w.packed {
        return matmul_tiles(p, &quantized, y);
    }
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

/// [`matmul`] on a tiled matrix: each task owns whole tiles, and the activations go
/// through each tile eight at a time, so a tile's unpacked weights serve eight tokens.
fn matmul_tiles(p: &Packed, qs: &[Q8Row], y: &mut [f32]) {
    let (rows, n, tiles) = (p.rows(), qs.len(), p.tiles());
    let per_task = (tiles / (rayon::current_num_threads() * 2)).clamp(4, 256);
    let refs: Vec<&Q8Row> = qs.iter().collect();
    // Transposed result (tile rows x tokens) so each task owns a contiguous slice.
    let mut yt = vec![0f32; tiles * TILE * n];
    yt.par_chunks_mut(per_task * TILE * n)
        .enumerate()
        .for_each(|(c, ys)| {
            let mut out = [[0f32; TILE]; 8];
            for (j, yg) in ys.chunks_mut(TILE * n).enumerate() {
                for t0 in (0..n).step_by(8) {
                    let k = (n - t0).min(8);
                    p.dot_tile(c * per_task + j, &refs[t0..t0 + k], &mut out);
                    for (kk, o) in out[..k].iter().enumerate() {
                        for (i, v) in o.iter().enumerate() {
                            yg[i * n + t0 + kk] = *v;
                        }
                    }
                }
            }
        });
    for t in 0..n {
        for r in 0..rows {
            y[t * rows + r] = yt[r * n + t];
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

/// The rotation of each frequency at `pos`: (sin, cos), computed once per token and
/// forward pass rather than once per head and layer (that was 11k `sin_cos` a token).
fn rope_angles(pos: usize, inv_freq: &[f32]) -> Vec<(f32, f32)> {
    inv_freq
        .iter()
        .map(|f| (pos as f32 * f).sin_cos())
        .collect()
}

fn rope(x: &mut [f32], head_dim: usize, angles: &[(f32, f32)], style: RopeStyle) {
    for head in x.chunks_mut(head_dim) {
        for (i, &(sin, cos)) in angles.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + angles.len()),
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
        // The whole pass runs on a thread of the pool: each of its ~450 parallel
        // steps then hands work to the other threads through their queues. Called from
        // outside the pool (the engine's thread), every step would instead be injected
        // and waited for on a lock, two futex wake-ups each.
        let mut profile = std::mem::take(&mut self.profile);
        let t = Instant::now();
        let out = rayon::scope(|_| self.forward_in_pool(chunks, hidden, &mut profile));
        profile.total += t.elapsed();
        profile.passes += 1;
        self.profile = profile;
        out
    }
}

impl CpuBackend {
    fn forward_in_pool(
        &mut self,
        chunks: &[SeqChunk<'_>],
        hidden: Option<Vec<f32>>,
        prof: &mut Profile,
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
        // Sized on first use: `up` only where gate and up are separate matrices,
        // `joined` (a joined matrix's output, before it is split) only where joined.
        let mut up = Vec::new();
        let mut joined = Vec::new();
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let angles: Vec<_> = pos
            .iter()
            .map(|&p| rope_angles(p, &self.inv_freq))
            .collect();
        let mut mm = |w: &Matrix, x: &[f32], n: usize, y: &mut [f32]| {
            Profile::time(&mut prof.matmul, || matmul(data, w, x, n, y))
        };
        for (l, layer) in self.layers.iter().enumerate() {
            for (o, i) in xb.chunks_mut(dim).zip(x.chunks(dim)) {
                rmsnorm(i, &layer.attn_norm, c.norm_eps, o);
            }
            match &self.fused[l].qkv {
                Some(qkv) => {
                    joined.resize(joined.len().max(n * (qd + 2 * kvd)), 0.0);
                    mm(qkv, &xb, n, &mut joined[..n * (qd + 2 * kvd)]);
                    for (t, r) in joined.chunks(qd + 2 * kvd).take(n).enumerate() {
                        q[t * qd..][..qd].copy_from_slice(&r[..qd]);
                        k[t * kvd..][..kvd].copy_from_slice(&r[qd..qd + kvd]);
                        v[t * kvd..][..kvd].copy_from_slice(&r[qd + kvd..]);
                    }
                }
                None => {
                    mm(&layer.wq, &xb, n, &mut q);
                    mm(&layer.wk, &xb, n, &mut k);
                    mm(&layer.wv, &xb, n, &mut v);
                }
            }
            add_bias(&mut q, &layer.bq);
            add_bias(&mut k, &layer.bk);
            add_bias(&mut v, &layer.bv);
            for t in 0..n {
                rope(&mut q[t * qd..(t + 1) * qd], hd, &angles[t], c.rope_style);
                rope(&mut k[t * kvd..(t + 1) * kvd], hd, &angles[t], c.rope_style);
                let s = slot(chunks[owner[t]].blocks, bs, pos[t]) * kvd;
                self.kv.k[l][s..s + kvd].convert_from_f32_slice(&k[t * kvd..(t + 1) * kvd]);
                self.kv.v[l][s..s + kvd].convert_from_f32_slice(&v[t * kvd..(t + 1) * kvd]);
            }
            // Causal attention: each (token, head) over its own sequence's positions 0..=pos.
            let (kc, vc) = (&self.kv.k[l], &self.kv.v[l]);
            let started = Instant::now();
            att.par_chunks_mut(hd).enumerate().for_each(|(i, out)| {
                let (t, h) = (i / c.n_heads, i % c.n_heads);
                let head = attention::Head {
                    k: kc,
                    v: vc,
                    blocks: chunks[owner[t]].blocks,
                    block_size: bs,
                    kv_dim: kvd,
                    offset: h / group * hd,
                };
                head.attend(&q[t * qd + h * hd..][..hd], pos[t], scale, out);
            });
            prof.attention += started.elapsed();
            mm(&layer.wo, &att, n, &mut xb);
            x.iter_mut().zip(&xb).for_each(|(a, b)| *a += b);
            for (o, i) in xb.chunks_mut(dim).zip(x.chunks(dim)) {
                rmsnorm(i, &layer.ffn_norm, c.norm_eps, o);
            }
            let silu = |g: f32| g / (1.0 + (-g).exp());
            match &self.fused[l].gate_up {
                Some(gate_up) => {
                    joined.resize(joined.len().max(n * 2 * ffd), 0.0);
                    mm(gate_up, &xb, n, &mut joined[..n * 2 * ffd]);
                    for (o, r) in gate.chunks_mut(ffd).zip(joined.chunks(2 * ffd)) {
                        let (g, u) = r.split_at(ffd);
                        o.iter_mut()
                            .zip(g.iter().zip(u))
                            .for_each(|(o, (g, u))| *o = silu(*g) * u);
                    }
                }
                None => {
                    up.resize(n * ffd, 0.0);
                    mm(&layer.w_gate, &xb, n, &mut gate);
                    mm(&layer.w_up, &xb, n, &mut up);
                    gate.iter_mut()
                        .zip(&up)
                        .for_each(|(g, u)| *g = silu(*g) * u);
                }
            }
            mm(&layer.w_down, &gate, n, &mut xb);
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
            mm(output, &normed, wanted.len(), &mut logits);
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RoPE's two pairings, checked on values derived by hand: llama's rotates
    /// neighbours (0, 1), (2, 3); qwen2's (llama.cpp's NEOX mode) rotates element i with
    /// i + half. Head of 4, frequencies 1 and 1/100, position 2: angles 2 and 0.02.
    #[test]
    fn rope_rotates_the_pairs_each_architecture_names() {
        let angles = rope_angles(2, &[1.0, 0.01]);
        let (s0, c0, s1, c1) = (2f32.sin(), 2f32.cos(), 0.02f32.sin(), 0.02f32.cos());
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut llama = x;
        rope(&mut llama, 4, &angles, RopeStyle::Interleaved);
        let want = [
            c0 - 2.0 * s0,
            s0 + 2.0 * c0,
            3.0 * c1 - 4.0 * s1,
            3.0 * s1 + 4.0 * c1,
        ];
        let mut qwen = x;
        rope(&mut qwen, 4, &angles, RopeStyle::Halves);
        let want_qwen = [
            c0 - 3.0 * s0,
            2.0 * c1 - 4.0 * s1,
            s0 + 3.0 * c0,
            2.0 * s1 + 4.0 * c1,
        ];
        for i in 0..4 {
            assert!(
                (llama[i] - want[i]).abs() < 1e-6,
                "llama {i}: {llama:?} {want:?}"
            );
            assert!(
                (qwen[i] - want_qwen[i]).abs() < 1e-6,
                "qwen2 {i}: {qwen:?} {want_qwen:?}"
            );
        }
    }

    #[test]
    fn the_kernel_setting_names_rows_or_tiles_and_refuses_anything_else() {
        assert_eq!(Kernels::parse(None).unwrap(), Kernels::best());
        assert_eq!(Kernels::parse(Some("rows")).unwrap(), Kernels::Rows);
        assert_eq!(Kernels::parse(Some("tiles")).unwrap(), Kernels::Tiles);
        let e = Kernels::parse(Some("avx512")).unwrap_err().to_string();
        assert!(
            e.contains("GPUSCALE_CPU_KERNELS=\"avx512\"") && e.contains("`rows` or `tiles`"),
            "{e}"
        );
    }
}
