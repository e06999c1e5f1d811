//! CUDA decode throughput on SmolLM2 at batch 1, 8 and 32, against PyTorch eager on the
//! same weights dequantised to f16 (scripts/bench-torch.py, run in the same process
//! tree on the same GPU), and the fraction of the HBM bandwidth roofline reached (bytes
//! a decode step must read, weights plus KV, over the step time, against the peak NVML
//! derives from the memory clock and bus width). Prints; asserts nothing about time.
//! Needs a GPU: elsewhere it prints SKIPPED and exits 0.
//!
//!     cargo bench -p gpuscale-inference-worker --bench cuda
//!
//! Environment: GPUSCALE_SMOLLM2_GGUF (model), GPUSCALE_TORCH_PYTHON (python with torch;
//! default python3).

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use inference_worker::backend::cpu::quant;
use inference_worker::backend::cuda::{self, CudaBackend, CudaOptions};
use inference_worker::backend::{Backend, KvLayout, Logits, SeqChunk};
use inference_worker::scheduler::sampling::argmax;
use nvml_wrapper::enum_wrappers::device::Clock;

const PROMPT: usize = 32;
const STEPS: usize = 64;

fn main() {
    if cuda::device_count() == 0 || !cuda::kernels::nvrtc_present() {
        println!("SKIPPED: no CUDA device or NVRTC on this machine");
        return;
    }
    let model = std::env::var("GPUSCALE_SMOLLM2_GGUF")
        .expect("set GPUSCALE_SMOLLM2_GGUF (scripts/ensure-tools.sh prints it)");
    let file = Arc::new(gguf::GgufFile::open(std::path::Path::new(&model)).unwrap());
    let block = 16;
    let per_seq = (PROMPT + STEPS).div_ceil(block);
    let kv = KvLayout {
        block_size: block,
        n_blocks: per_seq * 32,
    };
    let mut gpu = CudaBackend::load(
        Arc::clone(&file),
        kv,
        CudaOptions {
            ordinal: 0,
            max_tokens: 32 * PROMPT,
            max_seq_len: PROMPT + STEPS,
            kernel_cache: None,
            graphs: true,
            layers: None,
        },
    )
    .unwrap();
    let c = gpu.config().clone();
    let weights = file.header().weight_bytes() as f64;
    let peak = peak_bandwidth();
    println!(
        "{} on {} (peak {:.0} GB/s from NVML)",
        c.name,
        gpu.device().name,
        peak / 1e9
    );
    let dir = std::env::temp_dir().join("gpuscale-bench-torch");
    dump_f16(&file, &c, &dir);
    let python = std::env::var("GPUSCALE_TORCH_PYTHON").unwrap_or("python3".into());
    println!("\n| batch | gpuscale tok/s | PyTorch eager tok/s | ratio | HBM roofline |");
    println!("|---|---|---|---|---|");
    for batch in [1usize, 8, 32] {
        let ours = decode_rate(&mut gpu, batch, per_seq, c.vocab);
        // Bytes one step reads: every weight once, and each sequence's K and V so far
        // (the mean length over the timed steps).
        let kv_read =
            batch as f64 * (PROMPT + STEPS / 2) as f64 * KvLayout::bytes_per_token(&c) as f64;
        let step_s = batch as f64 / ours;
        let roofline = (weights + kv_read) / step_s / peak;
        let torch = std::process::Command::new(&python)
            .args(["scripts/bench-torch.py", dir.to_str().unwrap()])
            .args([
                "--batch",
                &batch.to_string(),
                "--prompt",
                &PROMPT.to_string(),
            ])
            .args(["--steps", &STEPS.to_string()])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            });
        match torch {
            Some(t) => println!(
                "| {batch} | {ours:.0} | {t:.0} | {:.2}x | {:.0}% |",
                ours / t,
                roofline * 100.0
            ),
            None => println!(
                "| {batch} | {ours:.0} | (PyTorch failed: is torch installed for {python}?) | - | {:.0}% |",
                roofline * 100.0
            ),
        }
    }
}

/// Decode tokens per second over STEPS steps of `batch` sequences after a PROMPT prefill.
fn decode_rate(gpu: &mut CudaBackend, batch: usize, per_seq: usize, vocab: usize) -> f64 {
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 100 + i * 7).collect();
    let chunks: Vec<SeqChunk> = tables
        .iter()
        .map(|t| SeqChunk {
            tokens: &prompt,
            start: 0,
            blocks: t,
            logits: Logits::Last,
        })
        .collect();
    let first = gpu.forward(&chunks).unwrap();
    let mut next: Vec<u32> = first.chunks(vocab).map(argmax).collect();
    // One untimed step captures the graph for this batch size.
    let mut pos = PROMPT;
    let step = |gpu: &mut CudaBackend, next: &mut Vec<u32>, pos: usize| {
        let toks: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
        let chunks: Vec<SeqChunk> = toks
            .iter()
            .zip(&tables)
            .map(|(t, b)| SeqChunk {
                tokens: t,
                start: pos,
                blocks: b,
                logits: Logits::Last,
            })
            .collect();
        let l = gpu.forward(&chunks).unwrap();
        *next = l.chunks(vocab).map(argmax).collect();
    };
    step(gpu, &mut next, pos);
    pos += 1;
    let t = Instant::now();
    for _ in 1..STEPS {
        step(gpu, &mut next, pos);
        pos += 1;
    }
    (batch * (STEPS - 1)) as f64 / t.elapsed().as_secs_f64()
}

/// Peak DRAM bandwidth in bytes/s: memory clock x bus width x 2 (double data rate).
fn peak_bandwidth() -> f64 {
    let nvml = nvml_wrapper::Nvml::init().expect("NVML on the GPU machine");
    let d = nvml.device_by_index(0).unwrap();
    let mhz = d.max_clock_info(Clock::Memory).unwrap() as f64;
    let bits = d.memory_bus_width().unwrap() as f64;
    mhz * 1e6 * bits / 8.0 * 2.0
}

/// Writes every tensor dequantised to f16 (weights.f16) with an index (index.json) for
/// the PyTorch peer.
fn dump_f16(
    file: &gguf::GgufFile,
    c: &inference_worker::model::ModelConfig,
    dir: &std::path::Path,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(dir.join("weights.f16")).unwrap());
    let mut index = serde_json::Map::new();
    let mut offset = 0usize;
    for spec in c.tensors() {
        let Some(t) = file.header().tensor(&spec.name) else {
            continue;
        };
        let ty = quant::WeightType::from_ggml(t.ggml_type).unwrap();
        let cols = t.dims[0] as usize;
        let rows = t.dims.get(1).copied().unwrap_or(1) as usize;
        let data = file.data(t);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            let n = ty.row_bytes(cols);
            quant::dequantize_row(ty, &data[r * n..(r + 1) * n], &mut row);
            for v in &row {
                out.write_all(&half::f16::from_f32(*v).to_le_bytes())
                    .unwrap();
            }
        }
        index.insert(spec.name.clone(), serde_json::json!([offset, [rows, cols]]));
        offset += rows * cols;
    }
    let cfg = serde_json::json!({
        "n_layers": c.n_layers, "dim": c.dim, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "ffn_dim": c.ffn_dim, "vocab": c.vocab, "norm_eps": c.norm_eps,
        "rope_base": c.rope_base, "tensors": index,
    });
    std::fs::write(dir.join("index.json"), cfg.to_string()).unwrap();
}
