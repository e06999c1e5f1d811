//! A model split by layers over several CPU backend instances computes exactly what one
//! backend computes: bit-identical logits for prompts, paged decode and mixed batches,
//! and the same greedy tokens on SmolLM2. This proves the split logic (which layers,
//! embedding and head each part holds, the hand-off, per-part KV caches) on every
//! machine; `tests/cuda.rs` runs the same split across two contexts of one GPU.

mod common;

use std::ops::Range;
use std::sync::Arc;

use common::*;
use inference_worker::backend::cpu::quant::WeightType;
use inference_worker::backend::cpu::CpuBackend;
use inference_worker::backend::split::{Part, Split};
use inference_worker::backend::{Backend, BackendError, KvLayout, Logits, SeqChunk};

const KV: KvLayout = KvLayout {
    block_size: 4,
    n_blocks: 16,
};

fn file(bytes: &[u8], name: &str) -> Arc<gguf::GgufFile> {
    Arc::new(gguf::GgufFile::open(&write_tmp(name, bytes)).unwrap())
}

fn split(f: &Arc<gguf::GgufFile>, kv: KvLayout, ranges: &[Range<usize>]) -> Split {
    let parts: Vec<Box<dyn Part>> = ranges
        .iter()
        .map(|r| {
            Box::new(CpuBackend::load_part(Arc::clone(f), kv, r.clone()).unwrap()) as Box<dyn Part>
        })
        .collect();
    Split::new(parts).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A prompt, then decode steps of two sequences batched together, with the second's
/// prompt arriving mid-way: every pass's logits, in order.
fn script(b: &mut dyn Backend) -> Vec<Vec<f32>> {
    let a = [3u32, 17, 42, 5, 5, 29, 0];
    let c = [9u32, 8, 7, 6, 5];
    let mut out = vec![b
        .forward(&[SeqChunk {
            tokens: &a,
            start: 0,
            blocks: &[5, 1],
            logits: Logits::All,
        }])
        .unwrap()];
    let (mut ta, mut tc) = (11u32, 13u32);
    for step in 0..6 {
        let pa = a.len() + step;
        let one = [ta];
        let mut chunks = vec![SeqChunk {
            tokens: &one,
            start: pa,
            blocks: &[5, 1, 9, 2],
            logits: Logits::Last,
        }];
        let decode_c = [tc];
        match step {
            0..2 => {}
            2 => chunks.push(SeqChunk {
                tokens: &c,
                start: 0,
                blocks: &[7, 3],
                logits: Logits::Last,
            }),
            _ => chunks.push(SeqChunk {
                tokens: &decode_c,
                start: c.len() + step - 3,
                blocks: &[7, 3, 12],
                logits: Logits::Last,
            }),
        }
        let logits = b.forward(&chunks).unwrap();
        ta = (ta * 7 + 3) % VOCAB as u32;
        tc = (tc * 5 + 1) % VOCAB as u32;
        out.push(logits);
    }
    out
}

#[test]
fn two_cpu_parts_give_bit_identical_logits_for_every_type_and_layout() {
    for (arch, ty) in [
        ("llama", WeightType::Q4_0),
        ("llama", WeightType::F16),
        ("qwen2", WeightType::Q8_0),
        ("qwen2", WeightType::Q4_1),
    ] {
        let m = model(ty, arch, 5);
        let f = file(&m.bytes, &format!("split-{arch}-{ty:?}.gguf"));
        let whole = script(&mut CpuBackend::load(Arc::clone(&f), KV).unwrap());
        let halves = script(&mut split(&f, KV, &[0..1, 1..LAYERS]));
        assert_eq!(whole.len(), halves.len());
        for (step, (w, h)) in whole.iter().zip(&halves).enumerate() {
            assert!(!w.is_empty());
            assert_eq!(bits(w), bits(h), "{arch} {ty:?}: pass {step} differs");
        }
    }
}

#[test]
fn smollm2_split_three_ways_generates_the_same_tokens_and_logits() {
    let Some(path) = gguf::smollm2_fixture() else {
        return;
    };
    let f = Arc::new(gguf::GgufFile::open(&path).unwrap());
    let kv = KvLayout {
        block_size: 16,
        n_blocks: 8,
    };
    let ranges = gguf::split::layer_ranges(30, &[1.0; 3]);
    assert_eq!(ranges, vec![0..10, 10..20, 20..30]);
    let greedy = |b: &mut dyn Backend| {
        let blocks = [0u32, 1, 2, 3];
        let mut tokens = vec![1u32, 504, 3458, 282, 4649, 314, 253];
        let mut all = Vec::new();
        let mut start = 0;
        for _ in 0..24 {
            let logits = b
                .forward(&[SeqChunk {
                    tokens: &tokens[start..],
                    start,
                    blocks: &blocks,
                    logits: Logits::Last,
                }])
                .unwrap();
            start = tokens.len();
            let next = (0..logits.len())
                .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
                .unwrap();
            tokens.push(next as u32);
            all.extend(bits(&logits));
        }
        (tokens, all)
    };
    let (whole_tokens, whole_logits) = greedy(&mut CpuBackend::load(Arc::clone(&f), kv).unwrap());
    let mut parts = split(&f, kv, &ranges);
    let (split_tokens, split_logits) = greedy(&mut parts);
    println!("greedy tokens: {whole_tokens:?}");
    assert_eq!(whole_tokens, split_tokens);
    assert!(whole_logits == split_logits, "logits differ bit-wise");
    // Each part holds its layers' KV and weights only: the three add up to the whole
    // model plus the tied head's second copy of the embedding on the last part.
    let held: Vec<u64> = parts.parts().iter().map(|p| p.2).collect();
    let whole = Backend::memory_bytes(&CpuBackend::load(Arc::clone(&f), kv).unwrap());
    let embd = f.header().tensor("token_embd.weight").unwrap().n_bytes();
    assert_eq!(held.iter().sum::<u64>(), whole + embd, "{held:?}");
}

#[test]
fn parts_that_do_not_chain_are_refused_and_a_part_alone_does_not_run() {
    let m = model(WeightType::Q8_0, "llama", 9);
    let f = file(&m.bytes, "split-refusals.gguf");
    let part = |r: Range<usize>, kv: KvLayout| -> Box<dyn Part> {
        Box::new(CpuBackend::load_part(Arc::clone(&f), kv, r).unwrap())
    };
    let other = KvLayout {
        block_size: 4,
        n_blocks: 15,
    };
    for (parts, want) in [
        (vec![part(1..2, KV)], "must start at layer 0"),
        (vec![part(0..1, KV)], "the parts hold layers 0..1 of 2"),
        (
            vec![part(0..1, KV), part(0..2, KV)],
            "must start at layer 1",
        ),
        (vec![part(0..1, KV), part(1..2, other)], "has KV layout"),
    ] {
        let e = Split::new(parts).err().expect(want).to_string();
        assert!(e.contains(want), "{e}");
    }
    for bad in [0..0, 1..3] {
        let e = CpuBackend::load_part(Arc::clone(&f), KV, bad.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("are not a part of a model with 2 layers"),
            "{bad:?}: {e}"
        );
    }
    // The first half alone as a backend would hand hidden states out as logits.
    let mut first = CpuBackend::load_part(Arc::clone(&f), KV, 0..1).unwrap();
    let chunk = SeqChunk {
        tokens: &[1, 2],
        start: 0,
        blocks: &[0],
        logits: Logits::Last,
    };
    assert!(matches!(
        first.forward(&[chunk]),
        Err(BackendError::Handoff(_))
    ));
    // The second half given a hand-off of the wrong width.
    let mut second = CpuBackend::load_part(Arc::clone(&f), KV, 1..2).unwrap();
    let e = second
        .forward_part(&[chunk], Some(vec![0.0; 3]))
        .unwrap_err();
    assert!(
        e.to_string().contains("got 3 hidden values for 2 tokens"),
        "{e}"
    );
    assert!(second.forward_part(&[chunk], None).is_err());
}

/// The worker binary with `--device cpu,cpu` serves SmolLM2 split in two and answers a
/// greedy completion with the same text as with `--device cpu`; its log says which
/// layers each part holds.
#[tokio::test]
async fn the_worker_split_over_two_cpu_devices_answers_as_one() {
    let Some(path) = gguf::smollm2_fixture() else {
        return;
    };
    let body = serde_json::json!({
        "prompt": "The three primary colours are",
        "max_tokens": 24,
        "temperature": 0
    });
    let mut texts = Vec::new();
    for device in ["cpu", "cpu,cpu"] {
        let w = common::process::start_with(&path, &["--device", device]).await;
        let r: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v1/completions", w.url))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let text = r["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!text.is_empty(), "{device}: {r}");
        texts.push(text);
    }
    println!("greedy completion: {:?}", texts[0]);
    assert_eq!(texts[0], texts[1]);
}
