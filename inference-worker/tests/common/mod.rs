//! Synthetic Llama models for tests: random weights written as GGUF in any tensor type.
#![allow(dead_code)]

pub mod process;

use gguf::{GgmlType, Value, Writer};
use inference_worker::backend::cpu::quant::{dequantize_row, quantize_row, WeightType};
use rand::{Rng, SeedableRng};

/// Hyper-parameters of the synthetic model.
pub const DIM: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = DIM / HEADS;
pub const FFN: usize = 96;
pub const VOCAB: usize = 48;
pub const LAYERS: usize = 2;

/// One tensor: name, dims (innermost first), f32 values as decoded from the file.
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub values: Vec<f32>,
}

pub struct Synthetic {
    pub bytes: Vec<u8>,
    pub tensors: Vec<Tensor>,
}

impl Synthetic {
    pub fn get(&self, name: &str) -> &[f32] {
        &self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name}"))
            .values
    }
}

fn ggml(t: WeightType) -> GgmlType {
    match t {
        WeightType::F32 => GgmlType::F32,
        WeightType::F16 => GgmlType::F16,
        WeightType::Q4_0 => GgmlType::Q4_0,
        WeightType::Q4_1 => GgmlType::Q4_1,
        WeightType::Q8_0 => GgmlType::Q8_0,
    }
}

/// A two-layer llama (or qwen2, with biases) with matrices of type `ty`.
pub fn model(ty: WeightType, arch: &str, seed: u64) -> Synthetic {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    // Byte-level single characters (space is GPT-2's "Ġ"), then an end-of-sequence token.
    let mut vocab: Vec<String> = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()"
        .chars()
        .map(String::from)
        .collect();
    vocab.push("\u{120}".into());
    vocab.push("</s>".into());
    assert_eq!(vocab.len(), VOCAB);
    let mut types = vec![Value::I32(1); VOCAB - 1];
    types.push(Value::I32(3));
    let mut w = Writer::new(3)
        .kv("general.architecture", Value::String(arch.into()))
        .kv(&format!("{arch}.block_count"), Value::U32(LAYERS as u32))
        .kv(&format!("{arch}.embedding_length"), Value::U32(DIM as u32))
        .kv(
            &format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        )
        .kv(
            &format!("{arch}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        )
        .kv(&format!("{arch}.context_length"), Value::U32(256))
        .kv(
            &format!("{arch}.feed_forward_length"),
            Value::U32(FFN as u32),
        )
        .kv(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        )
        .kv(&format!("{arch}.rope.freq_base"), Value::F32(10000.0))
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(vocab.iter().map(|t| Value::String(t.clone())).collect()),
        )
        .kv("tokenizer.ggml.token_type", Value::Array(types))
        .kv("tokenizer.ggml.merges", Value::Array(vec![]))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(VOCAB as u32 - 1));
    let mut tensors = Vec::new();
    let (d, kv, ff, v) = (
        DIM as u64,
        (KV_HEADS * HEAD_DIM) as u64,
        FFN as u64,
        VOCAB as u64,
    );
    let mut specs: Vec<(String, Vec<u64>, bool)> = vec![
        ("token_embd.weight".into(), vec![d, v], true),
        ("output_norm.weight".into(), vec![d], false),
        ("output.weight".into(), vec![d, v], true),
    ];
    for l in 0..LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}");
        specs.extend([
            (n("attn_norm.weight"), vec![d], false),
            (n("attn_q.weight"), vec![d, d], true),
            (n("attn_k.weight"), vec![d, kv], true),
            (n("attn_v.weight"), vec![d, kv], true),
            (n("attn_output.weight"), vec![d, d], true),
            (n("ffn_norm.weight"), vec![d], false),
            (n("ffn_gate.weight"), vec![d, ff], true),
            (n("ffn_up.weight"), vec![d, ff], true),
            (n("ffn_down.weight"), vec![ff, d], true),
        ]);
        if arch == "qwen2" {
            specs.extend([
                (n("attn_q.bias"), vec![d], false),
                (n("attn_k.bias"), vec![kv], false),
                (n("attn_v.bias"), vec![kv], false),
            ]);
        }
    }
    for (name, dims, is_matrix) in specs {
        let n: usize = dims.iter().product::<u64>() as usize;
        let scale = if is_matrix {
            1.0 / (dims[0] as f32).sqrt()
        } else {
            0.2
        };
        let raw: Vec<f32> = (0..n)
            .map(|_| {
                if is_matrix || name.contains("bias") {
                    rng.random_range(-1.7f32..1.7) * scale
                } else {
                    1.0 + rng.random_range(-0.2f32..0.2)
                }
            })
            .collect();
        let t = if is_matrix { ty } else { WeightType::F32 };
        let data = quantize_row(t, &raw);
        let mut values = vec![0f32; n];
        dequantize_row(t, &data, &mut values);
        w = w.tensor(&name, &dims, ggml(t), data);
        tensors.push(Tensor { name, dims, values });
    }
    Synthetic {
        bytes: w.bytes(),
        tensors,
    }
}

/// A dense f32 forward pass over the decoded weights, written as plainly as possible:
/// the reference the backend is compared with. Returns logits for every position.
pub fn reference_logits(m: &Synthetic, tokens: &[u32], halves_rope: bool) -> Vec<Vec<f32>> {
    let kvd = KV_HEADS * HEAD_DIM;
    let matvec = |w: &[f32], rows: usize, cols: usize, x: &[f32]| -> Vec<f32> {
        (0..rows)
            .map(|r| (0..cols).map(|c| w[r * cols + c] * x[c]).sum())
            .collect()
    };
    let norm = |x: &[f32], w: &[f32]| -> Vec<f32> {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        x.iter()
            .zip(w)
            .map(|(v, w)| v / (ms + 1e-5).sqrt() * w)
            .collect()
    };
    let rope = |x: &mut [f32], pos: usize| {
        for h in x.chunks_mut(HEAD_DIM) {
            for i in 0..HEAD_DIM / 2 {
                let theta = pos as f32 * 10000f32.powf(-2.0 * i as f32 / HEAD_DIM as f32);
                let (a, b) = if halves_rope {
                    (i, i + HEAD_DIM / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * theta.cos() - x1 * theta.sin();
                h[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    };
    let bias = |name: String, x: &mut Vec<f32>| {
        if let Some(t) = m.tensors.iter().find(|t| t.name == name) {
            x.iter_mut().zip(&t.values).for_each(|(a, b)| *a += b);
        }
    };
    let mut keys: Vec<Vec<Vec<f32>>> = vec![Vec::new(); LAYERS];
    let mut vals: Vec<Vec<Vec<f32>>> = vec![Vec::new(); LAYERS];
    let mut out = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let mut x =
            m.get("token_embd.weight")[tok as usize * DIM..(tok as usize + 1) * DIM].to_vec();
        for l in 0..LAYERS {
            let g = |s: &str| m.get(&format!("blk.{l}.{s}"));
            let h = norm(&x, g("attn_norm.weight"));
            let mut q = matvec(g("attn_q.weight"), DIM, DIM, &h);
            let mut k = matvec(g("attn_k.weight"), kvd, DIM, &h);
            let mut v = matvec(g("attn_v.weight"), kvd, DIM, &h);
            bias(format!("blk.{l}.attn_q.bias"), &mut q);
            bias(format!("blk.{l}.attn_k.bias"), &mut k);
            bias(format!("blk.{l}.attn_v.bias"), &mut v);
            rope(&mut q, pos);
            rope(&mut k, pos);
            keys[l].push(k);
            vals[l].push(v);
            let mut att = vec![0f32; DIM];
            for head in 0..HEADS {
                let kh = head / (HEADS / KV_HEADS);
                let qh = &q[head * HEAD_DIM..(head + 1) * HEAD_DIM];
                let s: Vec<f32> = keys[l]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kh * HEAD_DIM..])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (HEAD_DIM as f32).sqrt()
                    })
                    .collect();
                let max = s.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (p, w) in e.iter().enumerate() {
                    for i in 0..HEAD_DIM {
                        att[head * HEAD_DIM + i] += w / sum * vals[l][p][kh * HEAD_DIM + i];
                    }
                }
            }
            let o = matvec(g("attn_output.weight"), DIM, DIM, &att);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = norm(&x, g("ffn_norm.weight"));
            let gate = matvec(g("ffn_gate.weight"), FFN, DIM, &h);
            let up = matvec(g("ffn_up.weight"), FFN, DIM, &h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(g("ffn_down.weight"), DIM, FFN, &act);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let h = norm(&x, m.get("output_norm.weight"));
        out.push(matvec(m.get("output.weight"), VOCAB, DIM, &h));
    }
    out
}

pub fn write_tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gpuscale-worker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}
