//! The CPU forward pass against a plain f32 reference, for every supported tensor type,
//! and the paged, batched forward pass against running sequences one at a time.

mod common;

use std::sync::Arc;

use common::*;
use inference_worker::backend::cpu::quant::WeightType;
use inference_worker::backend::cpu::{CpuBackend, Kernels};
use inference_worker::backend::{Backend, KvLayout, Logits, SeqChunk};
use inference_worker::model::LoadError;

fn load(m: &Synthetic, name: &str, blocks: usize) -> CpuBackend {
    let path = write_tmp(name, &m.bytes);
    let file = Arc::new(gguf::GgufFile::open(&path).unwrap());
    CpuBackend::load(
        file,
        KvLayout {
            block_size: 4,
            n_blocks: blocks,
        },
    )
    .unwrap()
}

const TOKENS: [u32; 11] = [3, 17, 42, 5, 5, 29, 0, 47, 12, 8, 33];

#[test]
fn every_tensor_type_matches_the_f32_reference() {
    for (arch, halves) in [("llama", false), ("qwen2", true)] {
        for ty in WeightType::ALL {
            let m = model(ty, arch, 7);
            let mut b = load(&m, &format!("{arch}-{ty:?}.gguf"), 8);
            let blocks = [5u32, 1, 7];
            let got = b
                .forward(&[SeqChunk {
                    tokens: &TOKENS,
                    start: 0,
                    blocks: &blocks,
                    logits: Logits::All,
                }])
                .unwrap();
            let want = reference_logits(&m, &TOKENS, halves);
            let mut worst = 0f32;
            for (p, w) in want.iter().enumerate() {
                let g = &got[p * VOCAB..(p + 1) * VOCAB];
                let spread = w.iter().fold(0f32, |a, v| a.max(v.abs()));
                let err = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / spread;
                worst = worst.max(err);
            }
            // Float weights see only the f16 KV cache (as llama.cpp keeps it); quantised
            // ones also the 8-bit activation rounding llama.cpp applies.
            let limit = if ty.is_quantized() { 0.05 } else { 2e-3 };
            println!("{arch} {ty:?}: worst relative logit error {worst:.2e} (limit {limit})");
            assert!(worst < limit, "{arch} {ty:?}: {worst}");
        }
    }
}

/// The AVX-512 VNNI tile kernels and the row kernels differ only in the order they sum
/// in: on every quantised type, over a prompt and a decode step, their logits agree to
/// float rounding (far tighter than either's distance from the f32 reference).
#[test]
fn the_tile_kernels_compute_what_the_row_kernels_compute() {
    if !inference_worker::backend::cpu::packed::available() {
        // CI's CPU has AVX-512 VNNI, so there the comparison always runs.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run on a CPU with AVX-512 VNNI"
        );
        eprintln!("skipped: this CPU lacks AVX-512 VNNI, so no backend here runs tiles");
        return;
    }
    let kv = KvLayout {
        block_size: 4,
        n_blocks: 8,
    };
    for arch in ["llama", "qwen2"] {
        for ty in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0] {
            let m = model(ty, arch, 11);
            let path = write_tmp(&format!("kernels-{arch}-{ty:?}.gguf"), &m.bytes);
            let file = Arc::new(gguf::GgufFile::open(&path).unwrap());
            let run = |k: Kernels| {
                let mut b = CpuBackend::load_with(Arc::clone(&file), kv, 0..LAYERS, k).unwrap();
                assert_eq!(b.kernels(), k);
                let mut out = b
                    .forward(&[SeqChunk {
                        tokens: &TOKENS,
                        start: 0,
                        blocks: &[5, 1, 7],
                        logits: Logits::All,
                    }])
                    .unwrap();
                out.extend(
                    b.forward(&[SeqChunk {
                        tokens: &[9],
                        start: TOKENS.len(),
                        blocks: &[5, 1, 7],
                        logits: Logits::Last,
                    }])
                    .unwrap(),
                );
                out
            };
            let (rows, tiles) = (run(Kernels::Rows), run(Kernels::Tiles));
            let spread = rows.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = rows
                .iter()
                .zip(&tiles)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
                / spread;
            println!("{arch} {ty:?}: tiles vs rows, worst relative logit difference {worst:.1e}");
            assert!(worst < 1e-4, "{arch} {ty:?}: {worst}");
        }
    }
}

#[test]
fn batched_paged_and_chunked_passes_equal_one_sequence_at_a_time() {
    let m = model(WeightType::Q4_1, "llama", 11);
    let mut alone = load(&m, "alone.gguf", 8);
    let a = &TOKENS[..];
    let b_toks = [9u32, 8, 7, 6, 5];
    let solo_a = alone
        .forward(&[SeqChunk {
            tokens: a,
            start: 0,
            blocks: &[0, 1, 2],
            logits: Logits::Last,
        }])
        .unwrap();
    let solo_b = alone
        .forward(&[SeqChunk {
            tokens: &b_toks,
            start: 0,
            blocks: &[3, 4],
            logits: Logits::Last,
        }])
        .unwrap();

    // Same two sequences in one batch, interleaved block ids, the first split into a
    // prompt chunk and then the rest (what the scheduler does with long prompts).
    let mut batched = load(&m, "batched.gguf", 8);
    let (blocks_a, blocks_b) = ([6u32, 0, 3], [2u32, 5]);
    let none = batched
        .forward(&[SeqChunk {
            tokens: &a[..6],
            start: 0,
            blocks: &blocks_a,
            logits: Logits::None,
        }])
        .unwrap();
    assert!(none.is_empty());
    let both = batched
        .forward(&[
            SeqChunk {
                tokens: &a[6..],
                start: 6,
                blocks: &blocks_a,
                logits: Logits::Last,
            },
            SeqChunk {
                tokens: &b_toks,
                start: 0,
                blocks: &blocks_b,
                logits: Logits::Last,
            },
        ])
        .unwrap();
    assert_eq!(both.len(), 2 * VOCAB);
    for (x, y) in both[..VOCAB]
        .iter()
        .zip(&solo_a)
        .chain(both[VOCAB..].iter().zip(&solo_b))
    {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

#[test]
fn bad_tokens_and_short_block_tables_are_errors_not_panics() {
    let m = model(WeightType::Q8_0, "llama", 3);
    let mut b = load(&m, "errors.gguf", 2);
    let e = b
        .forward(&[SeqChunk {
            tokens: &[999],
            start: 0,
            blocks: &[0],
            logits: Logits::Last,
        }])
        .unwrap_err();
    assert!(e.to_string().contains("token id 999"), "{e}");
    let e = b
        .forward(&[SeqChunk {
            tokens: &TOKENS,
            start: 0,
            blocks: &[0],
            logits: Logits::Last,
        }])
        .unwrap_err();
    assert!(e.to_string().contains("KV blocks do not cover"), "{e}");
    let e = b
        .forward(&[SeqChunk {
            tokens: &[1],
            start: 0,
            blocks: &[9],
            logits: Logits::Last,
        }])
        .unwrap_err();
    assert!(e.to_string().contains("KV blocks"), "{e}");
}

#[test]
fn corrupt_or_unsupported_models_are_refused_with_the_reason() {
    let m = model(WeightType::Q4_0, "llama", 5);
    // Truncated file: the GGUF reader names the tensor whose data is cut.
    let cut = write_tmp("cut.gguf", &m.bytes[..m.bytes.len() - 100]);
    let e = gguf::GgufFile::open(&cut).err().unwrap();
    assert!(
        e.to_string().contains("output.weight") || e.to_string().contains("blk.1"),
        "{e}"
    );
    // Unsupported architecture: rewrite the name in the metadata, same length.
    let mut bytes = m.bytes.clone();
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    bytes[at..at + 5].copy_from_slice(b"gpt2x");
    let p = write_tmp("arch.gguf", &bytes);
    let file = Arc::new(gguf::GgufFile::open(&p).unwrap());
    let e = CpuBackend::load(
        file,
        KvLayout {
            block_size: 4,
            n_blocks: 1,
        },
    )
    .err()
    .unwrap();
    assert!(
        matches!(e, LoadError::UnsupportedArchitecture(ref a) if a == "gpt2x"),
        "{e}"
    );
    assert!(e.to_string().contains("not supported"), "{e}");
}
