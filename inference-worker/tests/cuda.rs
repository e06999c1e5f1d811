//! The CUDA backend against the CPU reference. Every test here is `#[ignore]`d, so a
//! machine without a GPU counts them as ignored rather than passed; on the GPU machine
//! they are run explicitly, and there a missing device, NVRTC or model fails them
//! (see kernels/README.md):
//!
//!   cargo test --release -p gpuscale-inference-worker --test cuda -- --ignored --nocapture
//!
//! - every weight type and both RoPE layouts: prompt logits and paged decode steps equal
//!   the CPU backend's within rounding (this runs every kernel: embedding, RMSNorm, the
//!   quantise + matmul kernels of each type, RoPE, KV store, attention, SiLU, residuals,
//!   biases, gather);
//! - graphs on and off give identical logits;
//! - device sampling: argmax equals the CPU's; top-p picks only inside the nucleus;
//! - SmolLM2: 32 greedy tokens per prompt identical to the CPU backend's;
//! - a layer split over two contexts of the one GPU gives the same logits, bit for bit,
//!   as the whole model on it (`tests/split.rs` proves the same on the CPU everywhere).

mod common;

use std::sync::Arc;

use common::*;
use inference_worker::backend::cpu::quant::WeightType;
use inference_worker::backend::cpu::CpuBackend;
use inference_worker::backend::cuda::{self, CudaBackend, CudaOptions};
use inference_worker::backend::{Backend, KvLayout, Logits, SeqChunk};
use inference_worker::scheduler::sampling::argmax;

/// Run with `--ignored` where there is no GPU, a test fails and says why.
fn require_gpu() {
    assert!(
        cuda::device_count() > 0 && cuda::kernels::nvrtc_present(),
        "no usable CUDA device (driver reports {} GPU(s), NVRTC found: {}): these tests run on the GPU machine",
        cuda::device_count(),
        cuda::kernels::nvrtc_present()
    );
}

fn opts(graphs: bool) -> CudaOptions {
    CudaOptions {
        ordinal: 0,
        max_tokens: 16,
        max_seq_len: 64,
        kernel_cache: None,
        graphs,
        layers: None,
    }
}

const KV: KvLayout = KvLayout {
    block_size: 4,
    n_blocks: 16,
};

fn pair(m: &Synthetic, name: &str, graphs: bool) -> (CpuBackend, CudaBackend) {
    let path = write_tmp(name, &m.bytes);
    let file = Arc::new(gguf::GgufFile::open(&path).unwrap());
    let cpu = CpuBackend::load(Arc::clone(&file), KV).unwrap();
    let gpu = CudaBackend::load(file, KV, opts(graphs)).unwrap();
    (cpu, gpu)
}

/// Largest |a - b| relative to the largest |a| of each row.
fn worst(a: &[f32], b: &[f32], width: usize) -> f32 {
    assert_eq!(a.len(), b.len());
    a.chunks(width)
        .zip(b.chunks(width))
        .map(|(x, y)| {
            let spread = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / spread
        })
        .fold(0.0, f32::max)
}

const PROMPT: [u32; 11] = [3, 17, 42, 5, 5, 29, 0, 47, 12, 8, 33];

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn every_weight_type_matches_the_cpu_backend_for_prompt_and_decode() {
    require_gpu();
    for arch in ["llama", "qwen2"] {
        for ty in WeightType::ALL {
            let m = model(ty, arch, 7);
            let (mut cpu, mut gpu) = pair(&m, &format!("cuda-{arch}-{ty:?}.gguf"), true);
            // Scrambled blocks: the paging is exercised, not just contiguous slots.
            let blocks = [9u32, 2, 14, 5];
            let chunk = |toks: &'static [u32], start| SeqChunk {
                tokens: toks,
                start,
                blocks: &blocks,
                logits: Logits::All,
            };
            let want = cpu.forward(&[chunk(&PROMPT, 0)]).unwrap();
            let got = gpu.forward(&[chunk(&PROMPT, 0)]).unwrap();
            let prompt_err = worst(&want, &got, VOCAB);
            // Three decode steps over the cache each backend wrote itself.
            let mut decode_err = 0f32;
            for (i, t) in [&[7u32][..], &[19], &[44]].into_iter().enumerate() {
                let w = cpu.forward(&[chunk(t, PROMPT.len() + i)]).unwrap();
                let g = gpu.forward(&[chunk(t, PROMPT.len() + i)]).unwrap();
                decode_err = decode_err.max(worst(&w, &g, VOCAB));
            }
            println!("{arch} {ty:?}: prompt {prompt_err:.2e}, decode {decode_err:.2e}");
            // Same integer dot products and f16 roundings as the CPU; only the order
            // of float sums differs.
            assert!(prompt_err < 2e-3, "{arch} {ty:?} prompt: {prompt_err}");
            assert!(decode_err < 2e-3, "{arch} {ty:?} decode: {decode_err}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn a_mixed_batch_with_graphs_equals_it_without() {
    require_gpu();
    let m = model(WeightType::Q4_1, "llama", 11);
    let (_, mut plain) = pair(&m, "cuda-nograph.gguf", false);
    let (_, mut graphed) = pair(&m, "cuda-graph.gguf", true);
    let (a, b) = ([1u32, 2, 3, 4, 5], [9u32, 8, 7]);
    let batch = |blocks_a: &'static [u32], blocks_b: &'static [u32]| {
        vec![
            SeqChunk {
                tokens: &a[..],
                start: 0,
                blocks: blocks_a,
                logits: Logits::Last,
            },
            SeqChunk {
                tokens: &b[..],
                start: 0,
                blocks: blocks_b,
                logits: Logits::Last,
            },
        ]
    };
    // The same shape twice: the second replays the captured graph with new inputs.
    for _ in 0..2 {
        let x = plain.forward(&batch(&[0, 1], &[2])).unwrap();
        let y = graphed.forward(&batch(&[0, 1], &[2])).unwrap();
        assert_eq!(x, y, "graph replay must compute exactly the same kernels");
    }
    let x = plain.forward(&batch(&[3, 4], &[5])).unwrap();
    let y = graphed.forward(&batch(&[3, 4], &[5])).unwrap();
    assert_eq!(x, y);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn device_sampling_agrees_with_the_cpu() {
    require_gpu();
    let m = model(WeightType::Q8_0, "llama", 3);
    let (_, mut gpu) = pair(&m, "cuda-sample.gguf", false);
    let mut logits = Vec::new();
    for r in 0..8u32 {
        logits.extend((0..VOCAB as u32).map(|i| ((i * 7919 + r * 104_729) % 1000) as f32 / 100.0));
    }
    let rows = logits.len() / VOCAB;
    let greedy = gpu
        .sample(
            &logits,
            &vec![0.0; rows],
            &vec![1.0; rows],
            &vec![0.5; rows],
        )
        .unwrap();
    for (r, g) in greedy.iter().enumerate() {
        let row = &logits[r * VOCAB..(r + 1) * VOCAB];
        assert_eq!(*g, argmax(row), "row {r}");
    }
    // Top-p 0.5 at temperature 1: every pick lies in the smallest set of top tokens
    // holding half the mass.
    let us: Vec<f32> = (0..rows).map(|i| i as f32 / rows as f32).collect();
    let picks = gpu
        .sample(&logits, &vec![1.0; rows], &vec![0.5; rows], &us)
        .unwrap();
    for (r, p) in picks.iter().enumerate() {
        let row = &logits[r * VOCAB..(r + 1) * VOCAB];
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        let mut probs: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        let mut sorted = probs.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let (mut mass, mut threshold) = (0.0, 0.0);
        for p in sorted {
            mass += p;
            threshold = p;
            if mass >= 0.5 {
                break;
            }
        }
        assert!(
            probs[*p as usize] >= threshold * 0.999,
            "row {r}: {p} outside the nucleus"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn smollm2_greedy_tokens_equal_the_cpu_backend() {
    require_gpu();
    let path = std::env::var("GPUSCALE_SMOLLM2_GGUF")
        .expect("GPUSCALE_SMOLLM2_GGUF must name the model (eval \"$(scripts/ensure-tools.sh)\")");
    let file = Arc::new(gguf::GgufFile::open(std::path::Path::new(&path)).unwrap());
    let kv = KvLayout {
        block_size: 16,
        n_blocks: 64,
    };
    let mut cpu = CpuBackend::load(Arc::clone(&file), kv).unwrap();
    let mut gpu = CudaBackend::load(
        file,
        kv,
        CudaOptions {
            max_tokens: 64,
            max_seq_len: 1024,
            ..opts(true)
        },
    )
    .unwrap();
    let vocab = cpu.config().vocab;
    // Token ids of a few SmolLM2 prompts (the tokenizer is tested separately).
    let tok = inference_worker::tokenizer::Tokenizer::from_gguf(
        gguf::GgufFile::open(std::path::Path::new(&path))
            .unwrap()
            .header(),
    )
    .unwrap();
    for prompt in [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
    ] {
        let ids = tok.encode(prompt);
        let blocks: Vec<u32> = (0..4).collect();
        let mut seqs = [ids.clone(), ids.clone()];
        for (s, b) in seqs
            .iter_mut()
            .zip([&mut cpu as &mut dyn Backend, &mut gpu])
        {
            let mut next = argmax(
                &b.forward(&[SeqChunk {
                    tokens: s,
                    start: 0,
                    blocks: &blocks,
                    logits: Logits::Last,
                }])
                .unwrap()[..vocab],
            );
            for _ in 0..32 {
                s.push(next);
                let at = s.len() - 1;
                next = argmax(
                    &b.forward(&[SeqChunk {
                        tokens: &s[at..],
                        start: at,
                        blocks: &blocks,
                        logits: Logits::Last,
                    }])
                    .unwrap(),
                );
            }
        }
        println!(
            "{prompt:?}\n  cpu:  {:?}\n  cuda: {:?}",
            tok.decode(&seqs[0]),
            tok.decode(&seqs[1])
        );
        assert_eq!(seqs[0], seqs[1], "{prompt:?}: greedy tokens differ");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn a_split_over_two_contexts_of_one_gpu_equals_the_whole_model_on_it() {
    use inference_worker::backend::split::{Part, Split};
    require_gpu();
    for (arch, ty) in [("llama", WeightType::Q4_0), ("qwen2", WeightType::Q8_0)] {
        let m = model(ty, arch, 21);
        let path = write_tmp(&format!("cuda-split-{arch}.gguf"), &m.bytes);
        let file = Arc::new(gguf::GgufFile::open(&path).unwrap());
        let mut whole = CudaBackend::load(Arc::clone(&file), KV, opts(true)).unwrap();
        let parts: Vec<Box<dyn Part>> = [0..1, 1..LAYERS]
            .into_iter()
            .map(|r| {
                let o = CudaOptions {
                    layers: Some(r),
                    ..opts(true)
                };
                Box::new(CudaBackend::load(Arc::clone(&file), KV, o).unwrap()) as Box<dyn Part>
            })
            .collect();
        let mut split = Split::new(parts).unwrap();
        let prompt = SeqChunk {
            tokens: &PROMPT,
            start: 0,
            blocks: &[3, 0, 9],
            logits: Logits::All,
        };
        let a = whole.forward(&[prompt]).unwrap();
        let b = split.forward(&[prompt]).unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{arch}: prompt"
        );
        for step in 0..4u32 {
            let t = [step * 5 % VOCAB as u32];
            let chunk = SeqChunk {
                tokens: &t,
                start: PROMPT.len() + step as usize,
                blocks: &[3, 0, 9, 4],
                logits: Logits::Last,
            };
            let a = whole.forward(&[chunk]).unwrap();
            let b = split.forward(&[chunk]).unwrap();
            assert_eq!(a.len(), VOCAB);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{arch}: step {step}"
            );
        }
        println!("{arch} {ty:?}: split over two contexts of cuda:0 = whole model, bit for bit");
    }
}
