//! The CUDA backend: the same Llama forward pass as the CPU backend, as a sequence of
//! kernels from `kernels/` on one stream. Weights are copied to the device in their file
//! format (Q4_0, Q4_1, Q8_0, F16, F32) and dequantised inside the matmuls; the KV cache is
//! paged f16, like the CPU's, so the scheduler's block tables mean the same thing here.
//!
//! Small batches (decode) are captured once per shape as a CUDA graph and replayed: a
//! 30-layer model is ~400 kernel launches per token, which would otherwise leave a small
//! model launch-bound.

pub mod kernels;

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DriverError,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use gguf::GgufFile;

use super::cpu::quant::{self, WeightType};
use super::split::Part;
use super::{Backend, BackendError, Flat, KvLayout, LayerWeights, SeqChunk, TensorLoader};
use crate::model::{LoadError, ModelConfig, RopeStyle};

/// Batches of at most this many tokens are captured and replayed as CUDA graphs.
const GRAPH_MAX_TOKENS: usize = 64;
/// Rows of logits computed per pass of the output head (its scratch is vocab wide).
const LOGIT_ROWS: usize = 64;
/// Tokens per matmul launch along y, and rows per block (see kernels/matmul.cu).
const MM_TOKENS: usize = 8;
const MM_ROWS: usize = 4;

/// How to start the CUDA backend.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal (`cuda:N`).
    pub ordinal: usize,
    /// Most tokens in one forward pass (the scheduler's `max_batch_tokens`).
    pub max_tokens: usize,
    /// Longest sequence (sizes the attention kernel's shared memory).
    pub max_seq_len: usize,
    /// Where compiled kernels are cached (none: compile every start).
    pub kernel_cache: Option<PathBuf>,
    /// Capture and replay decode steps as CUDA graphs.
    pub graphs: bool,
    /// The blocks to hold, for one part of a model split by layers (see
    /// [`super::split`]); `None`: the whole model.
    pub layers: Option<Range<usize>>,
}

/// What the device is: for logs, metrics and the budget.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Ordinal.
    pub ordinal: usize,
    /// Product name.
    pub name: String,
    /// Compute capability as major * 10 + minor (90 for H100).
    pub arch: u32,
    /// Free and total memory, bytes.
    pub free: u64,
    /// Total memory, bytes.
    pub total: u64,
}

fn dev(e: DriverError) -> BackendError {
    BackendError::Device(e.to_string())
}

fn load_dev(what: &str) -> impl Fn(DriverError) -> LoadError + '_ {
    move |e| LoadError::Invalid(format!("CUDA: {what}: {e}"))
}

/// Whether a CUDA driver can be loaded and reports at least one device.
pub fn device_count() -> usize {
    // SAFETY: only tries to dlopen libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Opens device `ordinal` and describes it.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo, LoadError> {
    let ctx = CudaContext::new(ordinal).map_err(load_dev("opening the device"))?;
    describe(&ctx)
}

fn describe(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, LoadError> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(load_dev("compute capability"))?;
    let (free, total) = ctx.mem_get_info().map_err(load_dev("memory info"))?;
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().unwrap_or_else(|_| "CUDA device".into()),
        arch: (major * 10 + minor) as u32,
        free: free as u64,
        total: total as u64,
    })
}

/// The compiled kernels.
struct Kernels {
    _modules: Vec<Arc<CudaModule>>,
    f: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    fn load(
        ctx: &Arc<CudaContext>,
        arch: u32,
        cache: Option<&std::path::Path>,
    ) -> Result<Kernels, LoadError> {
        let mut modules = Vec::new();
        let mut f = HashMap::new();
        let mut hits = 0;
        for src in kernels::SOURCES {
            let (ptx, hit) = kernels::load_or_compile(src, arch, cache)
                .map_err(|e| LoadError::Invalid(e.to_string()))?;
            hits += hit as usize;
            let m = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(load_dev(src.file))?;
            for name in src.functions {
                f.insert(*name, m.load_function(name).map_err(load_dev(name))?);
            }
            modules.push(m);
        }
        tracing::info!(
            arch,
            files = kernels::SOURCES.len(),
            cached = hits,
            "CUDA kernels ready"
        );
        Ok(Kernels {
            _modules: modules,
            f,
        })
    }

    fn get(&self, name: &str) -> &CudaFunction {
        &self.f[name]
    }
}

/// A weight matrix on the device, in its file format.
struct DMatrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    data: CudaSlice<u8>,
}

type DLayer = LayerWeights<DMatrix, CudaSlice<f32>>;

/// Activations and per-batch inputs, sized once for `max_tokens`: fixed addresses are
/// what lets a captured graph be replayed with new inputs.
struct Scratch {
    tokens: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    table: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    wanted: CudaSlice<i32>,
    x: CudaSlice<f32>,
    xb: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    // The activation being multiplied, quantised to 8 bits per block of 32.
    qd: CudaSlice<f32>,
    qs: CudaSlice<f32>,
    qq: CudaSlice<i8>,
    normed: CudaSlice<f32>,
    logits: CudaSlice<f32>,
}

/// A captured decode step.
struct Graph(CudaGraph);

// SAFETY: a graph exec is a driver handle with no thread affinity; launching binds the
// context to the calling thread, and the backend (its only owner) is used by one thread
// at a time (`Backend: Send`, not `Sync`).
unsafe impl Send for Graph {}

/// The CUDA backend. Create with [`CudaBackend::load`].
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    k: Kernels,
    config: ModelConfig,
    layout: KvLayout,
    info: DeviceInfo,
    opts: CudaOptions,
    /// The blocks held; `layers[i]` is block `range.start + i`.
    range: Range<usize>,
    /// With layer 0: the token embedding.
    embed: Option<DMatrix>,
    /// With the last layer: the output head and the final norm.
    head: Option<(DMatrix, CudaSlice<f32>)>,
    layers: Vec<DLayer>,
    k_cache: Vec<CudaSlice<u16>>,
    v_cache: Vec<CudaSlice<u16>>,
    inv_freq: CudaSlice<f32>,
    s: Scratch,
    max_blocks: usize,
    graphs: HashMap<(usize, usize), Graph>,
    reserved: u64,
}

/// Bytes the backend will hold on the device beyond weights and KV: activations, the
/// quantised copy of one activation matrix, and the output head's logits.
pub fn scratch_bytes(
    c: &ModelConfig,
    max_tokens: usize,
    max_seq_len: usize,
    block_size: usize,
) -> u64 {
    let t = max_tokens as u64;
    let widest = c.dim.max(c.ffn_dim).max(c.q_dim()) as u64;
    let floats = t * (2 * c.dim + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.ffn_dim) as u64
        + LOGIT_ROWS as u64 * (c.dim + c.vocab) as u64
        + t * widest / 32 * 2;
    let ints = t * 4 + t * max_seq_len.div_ceil(block_size) as u64;
    floats * 4 + t * widest + ints * 4
}

impl CudaBackend {
    /// Opens the device, compiles (or loads cached) kernels, copies the weights and
    /// allocates the KV pool. Fails with the sizes involved when they do not fit.
    pub fn load(
        file: Arc<GgufFile>,
        kv: KvLayout,
        opts: CudaOptions,
    ) -> Result<CudaBackend, LoadError> {
        let config = ModelConfig::from_gguf(file.header())?;
        super::cpu::check_tensors(&file, &config)?;
        let range = opts.layers.clone().unwrap_or(0..config.n_layers);
        super::cpu::check_range(&config, &range)?;
        let ctx = CudaContext::new(opts.ordinal).map_err(load_dev("opening the device"))?;
        // One stream, no cross-stream events: nothing to track, and graph capture needs a
        // stream other than the legacy default one.
        // SAFETY: this backend uses a single stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(load_dev("creating a stream"))?;
        let info = describe(&ctx)?;
        // What this part uploads: its blocks, the embedding with layer 0 and the head
        // (a second copy of a tied embedding) with the last.
        let weights = gguf::split::part_weight_bytes(file.header(), range.clone(), config.n_layers);
        let kv_bytes = (KvLayout::bytes_per_token_in(&config, range.len())
            * kv.block_size
            * kv.n_blocks) as u64;
        let scratch = scratch_bytes(&config, opts.max_tokens, opts.max_seq_len, kv.block_size);
        let need = weights + kv_bytes + scratch;
        if need > info.free {
            return Err(LoadError::Invalid(format!(
                "cuda:{} ({}) has {} MiB free; the model needs {} MiB of weights + {} MiB of KV cache + {} MiB of activations = {} MiB",
                info.ordinal,
                info.name,
                info.free >> 20,
                weights >> 20,
                kv_bytes >> 20,
                scratch >> 20,
                need >> 20
            )));
        }
        let smem = (opts.max_seq_len + config.head_dim) * 4;
        if smem > 48 * 1024 {
            return Err(LoadError::Invalid(format!(
                "--max-seq-len {} is longer than the CUDA attention kernel holds in shared memory ({} positions)",
                opts.max_seq_len,
                48 * 1024 / 4 - config.head_dim
            )));
        }
        let k = Kernels::load(&ctx, info.arch, opts.kernel_cache.as_deref())?;

        let mut up = Uploader {
            file: &file,
            stream: &stream,
        };
        let layers = range
            .clone()
            .map(|l| DLayer::load(&mut up, l))
            .collect::<Result<Vec<_>, _>>()?;
        let embed = match range.start == 0 {
            true => Some(up.matrix("token_embd.weight")?),
            false => None,
        };
        let head = match range.end == config.n_layers {
            true => Some((DLayer::output(&mut up)?, up.vector("output_norm.weight")?)),
            false => None,
        };
        let inv: Vec<f32> = (0..config.rope_dims / 2)
            .map(|i| {
                config
                    .rope_base
                    .powf(-2.0 * i as f32 / config.rope_dims as f32)
            })
            .collect();
        let inv_freq = stream.clone_htod(&inv).map_err(load_dev("rope table"))?;
        let slots = kv.n_blocks * kv.block_size * config.kv_dim();
        let alloc = |what: &'static str| move |e| load_dev(what)(e);
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in range.clone() {
            k_cache.push(
                stream
                    .alloc_zeros::<u16>(slots)
                    .map_err(alloc("KV cache"))?,
            );
            v_cache.push(
                stream
                    .alloc_zeros::<u16>(slots)
                    .map_err(alloc("KV cache"))?,
            );
        }
        let t = opts.max_tokens;
        let max_blocks = opts.max_seq_len.div_ceil(kv.block_size);
        let widest = config.dim.max(config.ffn_dim).max(config.q_dim());
        let f = |n: usize| stream.alloc_zeros::<f32>(n).map_err(alloc("activations"));
        let i = |n: usize| stream.alloc_zeros::<i32>(n).map_err(alloc("batch inputs"));
        let s = Scratch {
            tokens: i(t)?,
            pos: i(t)?,
            table: i(t)?,
            tables: i(t * max_blocks)?,
            wanted: i(t)?,
            x: f(t * config.dim)?,
            xb: f(t * config.dim)?,
            q: f(t * config.q_dim())?,
            k: f(t * config.kv_dim())?,
            v: f(t * config.kv_dim())?,
            att: f(t * config.q_dim())?,
            gate: f(t * config.ffn_dim)?,
            up: f(t * config.ffn_dim)?,
            qd: f(t * widest / 32)?,
            qs: f(t * widest / 32)?,
            qq: stream
                .alloc_zeros::<i8>(t * widest)
                .map_err(alloc("activations"))?,
            normed: f(LOGIT_ROWS * config.dim)?,
            logits: f(LOGIT_ROWS * config.vocab)?,
        };
        stream
            .synchronize()
            .map_err(load_dev("uploading the model"))?;
        let after = ctx.mem_get_info().map_err(load_dev("memory info"))?.0 as u64;
        let reserved = info.free.saturating_sub(after);
        tracing::info!(
            device = %info.name,
            ordinal = info.ordinal,
            arch = info.arch,
            reserved_mib = reserved >> 20,
            planned_mib = need >> 20,
            "CUDA backend loaded"
        );
        Ok(CudaBackend {
            stream,
            k,
            config,
            layout: kv,
            info,
            opts,
            range,
            embed,
            head,
            layers,
            k_cache,
            v_cache,
            inv_freq,
            s,
            max_blocks,
            graphs: HashMap::new(),
            reserved,
        })
    }

    /// The device this backend runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// Device memory this backend reserved (measured as the drop in free memory).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved
    }

    /// Runs the kernels of one pass over `n` rows already uploaded to the scratch inputs,
    /// leaving `w` rows of logits in `s.logits`.
    fn run(&mut self, n: usize, w: usize) -> Result<(), DriverError> {
        let c = &self.config;
        let (dim, qd, kvd, ffd) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let st = &self.stream;
        let k = &self.k;
        let s = &mut self.s;
        let ni = n as i32;
        // A part after the first finds the previous part's output in `s.x` (window).
        if let Some(e) = &self.embed {
            embed(st, k, e, &s.tokens, n, &mut s.x)?;
        }
        for (l, layer) in self.layers.iter().enumerate() {
            rmsnorm(st, k, &s.x, &layer.attn_norm, n, dim, c.norm_eps, &mut s.xb)?;
            quantize(st, k, &s.xb, dim, n, &mut s.qd, &mut s.qs, &mut s.qq)?;
            matmul(st, k, &layer.wq, &s.xb, (&s.qd, &s.qs, &s.qq), n, &mut s.q)?;
            matmul(st, k, &layer.wk, &s.xb, (&s.qd, &s.qs, &s.qq), n, &mut s.k)?;
            matmul(st, k, &layer.wv, &s.xb, (&s.qd, &s.qs, &s.qq), n, &mut s.v)?;
            for (b, y, width) in [
                (&layer.bq, &mut s.q, qd),
                (&layer.bk, &mut s.k, kvd),
                (&layer.bv, &mut s.v, kvd),
            ] {
                if let Some(b) = b {
                    let mut a = st.launch_builder(k.get("add_bias"));
                    let wi = width as i32;
                    a.arg(y).arg(b).arg(&wi).arg(&ni);
                    // SAFETY: y holds n rows of `width`, b holds `width`.
                    unsafe { a.launch(LaunchConfig::for_num_elems((n * width) as u32)) }?;
                }
            }
            {
                let mut a = st.launch_builder(k.get("rope"));
                let (h, kh, hd) = (c.n_heads as i32, c.n_kv_heads as i32, c.head_dim as i32);
                let pairs = (c.rope_dims / 2) as i32;
                let style = i32::from(c.rope_style == RopeStyle::Halves);
                a.arg(&mut s.q)
                    .arg(&mut s.k)
                    .arg(&s.pos)
                    .arg(&self.inv_freq);
                a.arg(&h).arg(&kh).arg(&hd).arg(&pairs).arg(&style);
                // SAFETY: q, k hold n rows; pos holds n positions; inv_freq holds `pairs`.
                unsafe { a.launch(grid1(n, 128)) }?;
            }
            {
                let mut a = st.launch_builder(k.get("store_kv"));
                let (bs, kvdi) = (self.layout.block_size as i32, kvd as i32);
                a.arg(&s.k)
                    .arg(&s.v)
                    .arg(&s.pos)
                    .arg(&s.table)
                    .arg(&s.tables);
                a.arg(&bs)
                    .arg(&kvdi)
                    .arg(&mut self.k_cache[l])
                    .arg(&mut self.v_cache[l]);
                // SAFETY: the block tables were checked against the pool (Flat::new).
                unsafe { a.launch(grid1(n, 256)) }?;
            }
            {
                let mut a = st.launch_builder(k.get("attention"));
                let bs = self.layout.block_size as i32;
                let (h, kh, hd) = (c.n_heads as i32, c.n_kv_heads as i32, c.head_dim as i32);
                let scale = 1.0 / (c.head_dim as f32).sqrt();
                a.arg(&s.q).arg(&self.k_cache[l]).arg(&self.v_cache[l]);
                a.arg(&s.pos).arg(&s.table).arg(&s.tables);
                a.arg(&bs)
                    .arg(&h)
                    .arg(&kh)
                    .arg(&hd)
                    .arg(&scale)
                    .arg(&mut s.att);
                let cfg = LaunchConfig {
                    grid_dim: (c.n_heads as u32, n as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: ((self.opts.max_seq_len + c.head_dim) * 4) as u32,
                };
                // SAFETY: positions are below max_seq_len, which sized the shared memory.
                unsafe { a.launch(cfg) }?;
            }
            quantize(st, k, &s.att, qd, n, &mut s.qd, &mut s.qs, &mut s.qq)?;
            matmul(
                st,
                k,
                &layer.wo,
                &s.att,
                (&s.qd, &s.qs, &s.qq),
                n,
                &mut s.xb,
            )?;
            add_inplace(st, k, &mut s.x, &s.xb, n * dim)?;
            rmsnorm(st, k, &s.x, &layer.ffn_norm, n, dim, c.norm_eps, &mut s.xb)?;
            quantize(st, k, &s.xb, dim, n, &mut s.qd, &mut s.qs, &mut s.qq)?;
            matmul(
                st,
                k,
                &layer.w_gate,
                &s.xb,
                (&s.qd, &s.qs, &s.qq),
                n,
                &mut s.gate,
            )?;
            matmul(
                st,
                k,
                &layer.w_up,
                &s.xb,
                (&s.qd, &s.qs, &s.qq),
                n,
                &mut s.up,
            )?;
            {
                let mut a = st.launch_builder(k.get("silu_mul"));
                let total = (n * ffd) as i32;
                a.arg(&mut s.gate).arg(&s.up).arg(&total);
                // SAFETY: gate and up hold n rows of ffn_dim.
                unsafe { a.launch(LaunchConfig::for_num_elems(total as u32)) }?;
            }
            quantize(st, k, &s.gate, ffd, n, &mut s.qd, &mut s.qs, &mut s.qq)?;
            matmul(
                st,
                k,
                &layer.w_down,
                &s.gate,
                (&s.qd, &s.qs, &s.qq),
                n,
                &mut s.xb,
            )?;
            add_inplace(st, k, &mut s.x, &s.xb, n * dim)?;
        }
        if let (true, Some((output, norm))) = (w > 0, &self.head) {
            head(st, k, s, norm, output, c, w)?;
        }
        Ok(())
    }

    /// One pass over at most `max_tokens` rows (`rows` of `flat`), replayed from a
    /// captured graph when the shape allows.
    fn window(
        &mut self,
        flat: &Flat,
        rows: std::ops::Range<usize>,
        chunks: &[SeqChunk<'_>],
        hidden: Option<&[f32]>,
        out: &mut Vec<f32>,
    ) -> Result<(), DriverError> {
        let n = rows.len();
        // Block tables of the chunks this window touches, concatenated.
        let mut tables: Vec<i32> = Vec::new();
        let mut offset: HashMap<usize, i32> = HashMap::new();
        let mut table = Vec::with_capacity(n);
        for r in rows.clone() {
            let o = flat.owner[r];
            let off = *offset.entry(o).or_insert_with(|| {
                let at = tables.len() as i32;
                tables.extend(chunks[o].blocks.iter().map(|b| *b as i32));
                at
            });
            table.push(off);
        }
        let tokens: Vec<i32> = flat.tokens[rows.clone()]
            .iter()
            .map(|t| *t as i32)
            .collect();
        let pos: Vec<i32> = flat.pos[rows.clone()].iter().map(|p| *p as i32).collect();
        // Only the part with the head computes logits.
        let wanted: Vec<usize> = match self.head {
            Some(_) => flat
                .wanted
                .iter()
                .filter(|w| rows.contains(w))
                .map(|w| w - rows.start)
                .collect(),
            None => Vec::new(),
        };
        let st = Arc::clone(&self.stream);
        st.memcpy_htod(&tokens, &mut self.s.tokens)?;
        st.memcpy_htod(&pos, &mut self.s.pos)?;
        st.memcpy_htod(&table, &mut self.s.table)?;
        st.memcpy_htod(&tables, &mut self.s.tables)?;
        let dim = self.config.dim;
        if let Some(h) = hidden {
            // Outside any captured graph: the graph reads `s.x` where this leaves it.
            st.memcpy_htod(&h[rows.start * dim..rows.end * dim], &mut self.s.x)?;
        }
        // The output head runs over LOGIT_ROWS rows at a time.
        let groups: Vec<&[usize]> = if wanted.is_empty() {
            vec![&[]]
        } else {
            wanted.chunks(LOGIT_ROWS).collect()
        };
        for (g, group) in groups.iter().enumerate() {
            let idx: Vec<i32> = group.iter().map(|w| *w as i32).collect();
            if !idx.is_empty() {
                st.memcpy_htod(&idx, &mut self.s.wanted)?;
            }
            if g == 0 {
                self.body(n, idx.len())?;
            } else {
                self.head_only(idx.len())?;
            }
            if !idx.is_empty() {
                let logits =
                    st.clone_dtoh(&self.s.logits.slice(..idx.len() * self.config.vocab))?;
                out.extend_from_slice(&logits);
            }
        }
        if self.head.is_none() {
            out.extend_from_slice(&st.clone_dtoh(&self.s.x.slice(..n * dim))?);
        }
        Ok(())
    }

    /// The whole pass: from a graph when enabled and small, else launched directly.
    fn body(&mut self, n: usize, w: usize) -> Result<(), DriverError> {
        if !self.opts.graphs || n > GRAPH_MAX_TOKENS {
            return self.run(n, w);
        }
        if !self.graphs.contains_key(&(n, w)) {
            self.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let ran = self.run(n, w);
            let graph = self.stream.end_capture(
                CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            );
            ran?;
            match graph? {
                Some(g) => {
                    tracing::debug!(tokens = n, logits = w, "captured a CUDA graph");
                    self.graphs.insert((n, w), Graph(g));
                }
                None => return self.run(n, w),
            }
        }
        self.graphs[&(n, w)].0.launch()
    }

    /// The output head alone, for wanted rows beyond the first LOGIT_ROWS.
    fn head_only(&mut self, w: usize) -> Result<(), DriverError> {
        let (st, k, c) = (&self.stream, &self.k, &self.config);
        match &self.head {
            Some((output, norm)) => head(st, k, &mut self.s, norm, output, c, w),
            None => Ok(()),
        }
    }

    /// Picks each row's next token on the device from logits the caller supplies:
    /// greedy where `temperature[i] <= 0`, else top-p with uniform `u[i]`. Only the
    /// token ids come back.
    pub fn sample(
        &mut self,
        logits: &[f32],
        temperature: &[f32],
        top_p: &[f32],
        u: &[f32],
    ) -> Result<Vec<u32>, BackendError> {
        let vocab = self.config.vocab;
        let rows = logits.len() / vocab;
        let st = &self.stream;
        let dl = st.clone_htod(logits).map_err(dev)?;
        let mut out = st.alloc_zeros::<i32>(rows).map_err(dev)?;
        let greedy = temperature.iter().all(|t| *t <= 0.0);
        let v = vocab as i32;
        if greedy {
            let mut a = st.launch_builder(self.k.get("argmax"));
            a.arg(&dl).arg(&v).arg(&mut out);
            // SAFETY: rows x vocab logits, rows outputs.
            unsafe { a.launch(grid1(rows, 256)) }.map_err(dev)?;
        } else {
            let t = st.clone_htod(temperature).map_err(dev)?;
            let p = st.clone_htod(top_p).map_err(dev)?;
            let uu = st.clone_htod(u).map_err(dev)?;
            let mut a = st.launch_builder(self.k.get("sample_top_p"));
            a.arg(&dl).arg(&v).arg(&t).arg(&p).arg(&uu).arg(&mut out);
            // SAFETY: one temperature, top_p and u per row.
            unsafe { a.launch(grid1(rows, 256)) }.map_err(dev)?;
        }
        let ids = st.clone_dtoh(&out).map_err(dev)?;
        st.synchronize().map_err(dev)?;
        Ok(ids.into_iter().map(|i| i as u32).collect())
    }
}

/// Copies tensors from the map to the device.
struct Uploader<'a> {
    file: &'a GgufFile,
    stream: &'a Arc<CudaStream>,
}

impl TensorLoader for Uploader<'_> {
    type Matrix = DMatrix;
    type Vector = CudaSlice<f32>;

    fn matrix(&mut self, name: &str) -> Result<DMatrix, LoadError> {
        let (t, ty) = self.tensor(name)?;
        let data = self
            .stream
            .clone_htod(self.file.data(t))
            .map_err(load_dev("uploading weights"))?;
        Ok(DMatrix {
            ty,
            cols: t.dims[0] as usize,
            rows: t.dims.get(1).copied().unwrap_or(1) as usize,
            data,
        })
    }

    fn vector(&mut self, name: &str) -> Result<CudaSlice<f32>, LoadError> {
        let (t, ty) = self.tensor(name)?;
        let mut v = vec![0f32; t.dims[0] as usize];
        quant::dequantize_row(ty, self.file.data(t), &mut v);
        self.stream
            .clone_htod(&v)
            .map_err(load_dev("uploading weights"))
    }

    fn has(&self, name: &str) -> bool {
        self.file.header().tensor(name).is_some()
    }
}

impl<'a> Uploader<'a> {
    fn tensor(&self, name: &str) -> Result<(&'a gguf::TensorInfo, WeightType), LoadError> {
        let t = self
            .file
            .header()
            .tensor(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        let ty = WeightType::from_ggml(t.ggml_type).ok_or_else(|| LoadError::UnsupportedType {
            tensor: name.into(),
            ty: t.ggml_type,
        })?;
        Ok((t, ty))
    }
}

fn grid1(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The output head over the `w` rows of `s.x` listed in `s.wanted`: gather, final
/// RMSNorm, and the vocabulary matmul into `s.logits`.
fn head(
    st: &Arc<CudaStream>,
    k: &Kernels,
    s: &mut Scratch,
    norm: &CudaSlice<f32>,
    output: &DMatrix,
    c: &ModelConfig,
    w: usize,
) -> Result<(), DriverError> {
    let mut a = st.launch_builder(k.get("gather_rows"));
    let d = c.dim as i32;
    a.arg(&s.x).arg(&s.wanted).arg(&d).arg(&mut s.xb);
    // SAFETY: wanted holds w row indices of the pass just run.
    unsafe { a.launch(grid1(w, 256)) }?;
    rmsnorm(st, k, &s.xb, norm, w, c.dim, c.norm_eps, &mut s.normed)?;
    quantize(st, k, &s.normed, c.dim, w, &mut s.qd, &mut s.qs, &mut s.qq)?;
    matmul(
        st,
        k,
        output,
        &s.normed,
        (&s.qd, &s.qs, &s.qq),
        w,
        &mut s.logits,
    )
}

fn embed(
    st: &Arc<CudaStream>,
    k: &Kernels,
    e: &DMatrix,
    tokens: &CudaSlice<i32>,
    n: usize,
    x: &mut CudaSlice<f32>,
) -> Result<(), DriverError> {
    let mut a = st.launch_builder(k.get("embed"));
    let (ty, dim) = (type_code(e.ty), e.cols as i32);
    a.arg(&e.data).arg(&ty).arg(&dim).arg(tokens).arg(x);
    // SAFETY: token ids were checked against the vocabulary (Flat::new).
    unsafe { a.launch(grid1(n, 256)) }.map(|_| ())
}

#[allow(clippy::too_many_arguments)]
fn rmsnorm(
    st: &Arc<CudaStream>,
    k: &Kernels,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    n: usize,
    dim: usize,
    eps: f32,
    out: &mut CudaSlice<f32>,
) -> Result<(), DriverError> {
    let mut a = st.launch_builder(k.get("rmsnorm"));
    let d = dim as i32;
    a.arg(x).arg(w).arg(&d).arg(&eps).arg(out);
    // SAFETY: x and out hold n rows of dim.
    unsafe { a.launch(grid1(n, 256)) }.map(|_| ())
}

fn add_inplace(
    st: &Arc<CudaStream>,
    k: &Kernels,
    x: &mut CudaSlice<f32>,
    y: &CudaSlice<f32>,
    n: usize,
) -> Result<(), DriverError> {
    let mut a = st.launch_builder(k.get("add_inplace"));
    let ni = n as i32;
    a.arg(x).arg(y).arg(&ni);
    // SAFETY: both hold n floats.
    unsafe { a.launch(LaunchConfig::for_num_elems(n as u32)) }.map(|_| ())
}

/// The 8-bit copy of the activation the next matmuls read (see kernels/matmul.cu).
type Q8<'a> = (&'a CudaSlice<f32>, &'a CudaSlice<f32>, &'a CudaSlice<i8>);

/// Quantises `x` (n rows of `cols`) into the scratch's 8-bit buffers.
#[allow(clippy::too_many_arguments)]
fn quantize(
    st: &Arc<CudaStream>,
    k: &Kernels,
    x: &CudaSlice<f32>,
    cols: usize,
    n: usize,
    qd: &mut CudaSlice<f32>,
    qs: &mut CudaSlice<f32>,
    qq: &mut CudaSlice<i8>,
) -> Result<(), DriverError> {
    let blocks = n * cols / 32;
    let mut a = st.launch_builder(k.get("quantize_q8"));
    let b = blocks as i32;
    a.arg(x).arg(&b).arg(qd).arg(qs).arg(qq);
    // SAFETY: x holds `blocks` blocks of 32; the outputs were sized for the widest row.
    unsafe {
        a.launch(LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map(|_| ())
}

fn type_code(t: WeightType) -> i32 {
    match t {
        WeightType::F32 => 0,
        WeightType::F16 => 1,
        WeightType::Q4_0 => 2,
        WeightType::Q4_1 => 3,
        WeightType::Q8_0 => 4,
    }
}

/// y = x W^T for n rows: the integer kernels read `q8` (x quantised), the float
/// kernels read `x`.
fn matmul(
    st: &Arc<CudaStream>,
    k: &Kernels,
    w: &DMatrix,
    x: &CudaSlice<f32>,
    q8: Q8<'_>,
    n: usize,
    y: &mut CudaSlice<f32>,
) -> Result<(), DriverError> {
    let cfg = LaunchConfig {
        grid_dim: (
            w.rows.div_ceil(MM_ROWS) as u32,
            n.div_ceil(MM_TOKENS) as u32,
            1,
        ),
        block_dim: (32, MM_ROWS as u32, 1),
        shared_mem_bytes: 0,
    };
    let (rows, cols, ni) = (w.rows as i32, w.cols as i32, n as i32);
    let name = match w.ty {
        WeightType::Q4_0 => "mul_mat_q4_0",
        WeightType::Q4_1 => "mul_mat_q4_1",
        WeightType::Q8_0 => "mul_mat_q8_0",
        WeightType::F16 => "mul_mat_f16",
        WeightType::F32 => "mul_mat_f32",
    };
    let mut a = st.launch_builder(k.get(name));
    a.arg(&w.data).arg(&rows).arg(&cols);
    if w.ty.is_quantized() {
        a.arg(q8.0).arg(q8.1).arg(q8.2);
    } else {
        a.arg(x);
    }
    a.arg(&ni).arg(y);
    // SAFETY: shapes as documented in kernels/matmul.cu.
    unsafe { a.launch(cfg) }.map(|_| ())
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn memory_bytes(&self) -> u64 {
        self.reserved
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
        super::split::forward_whole(self, chunks)
    }
}

impl Part for CudaBackend {
    fn device(&self) -> String {
        format!("cuda:{} ({})", self.info.ordinal, self.info.name)
    }

    fn layers(&self) -> Range<usize> {
        self.range.clone()
    }

    fn forward_part(
        &mut self,
        chunks: &[SeqChunk<'_>],
        hidden: Option<Vec<f32>>,
    ) -> Result<Vec<f32>, BackendError> {
        let flat = Flat::new(chunks, self.layout, self.config.vocab)?;
        let n = flat.tokens.len();
        let dim = self.config.dim;
        super::split::check_handoff(&self.range, self.embed.is_some(), hidden.as_deref(), n, dim)?;
        if let Some(ch) = chunks.iter().find(|c| c.blocks.len() > self.max_blocks) {
            return Err(BackendError::KvOutOfRange {
                position: ch.start + ch.tokens.len(),
                blocks: ch.blocks.len(),
                block_size: self.layout.block_size,
            });
        }
        let mut out = Vec::with_capacity(flat.wanted.len() * self.config.vocab);
        let mut start = 0;
        while start < n {
            let end = (start + self.opts.max_tokens).min(n);
            self.window(&flat, start..end, chunks, hidden.as_deref(), &mut out)
                .map_err(dev)?;
            start = end;
        }
        self.stream.synchronize().map_err(dev)?;
        Ok(out)
    }
}
