//! Worker vs llama.cpp on the same GGUF and thread count, on this machine: prompt
//! processing, single-stream decode, and aggregate throughput with 8 concurrent streams
//! (through the real continuous-batching engine). llama.cpp runs through
//! scripts/bench-llama-cpp.py with the llama-cpp-python that scripts/ensure-llama-cpp.sh
//! builds. Prints tokens/s for both and the ratio; asserts nothing about time. Also:
//! single-stream decode against this machine's memory-bandwidth limit (bytes a token
//! reads ÷ read bandwidth measured here), and where a decode step's time goes (matmuls,
//! attention, the rest of the pass, the engine around it).
//!
//!     cargo bench -p gpuscale-inference-worker --bench worker
//!
//! Environment: GPUSCALE_SMOLLM2_GGUF (model), GPUSCALE_LLAMA_PYTHON (python with
//! llama_cpp; default ~/.cache/gpuscale/llama-venv/bin/python), BENCH_THREADS (2).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inference_worker::backend::cpu::{CpuBackend, Kernels};
use inference_worker::backend::{Backend, BackendError, KvLayout, Logits, SeqChunk};
use inference_worker::metrics::Metrics;
use inference_worker::model::ModelConfig;
use inference_worker::scheduler::sampling::argmax;
use inference_worker::scheduler::sampling::Sampling;
use inference_worker::scheduler::{self, EngineConfig, Event, GenerateRequest};
use rayon::prelude::*;

const DECODE: usize = 128;
const STREAMS: usize = 8;
const STREAM_TOKENS: usize = 64;

fn main() {
    let common::Setup {
        model,
        threads,
        file,
        tok,
    } = common::setup();
    let home = std::env::var("HOME").unwrap_or_default();
    let python = std::env::var("GPUSCALE_LLAMA_PYTHON")
        .unwrap_or(format!("{home}/.cache/gpuscale/llama-venv/bin/python"));

    let text = "The history of the city begins with a small settlement on the river, where farmers and traders met every week to exchange grain, wool and tools. ".repeat(8);
    let mut prompt = tok.encode(&text);
    prompt.truncate(256);
    let stream_prompt =
        tok.encode("Write a short story about a lighthouse keeper who finds a message");
    let layout = KvLayout {
        block_size: 16,
        n_blocks: 256,
    };

    // Ours: prompt processing and single-stream decode on the backend directly.
    let mut b = CpuBackend::load(Arc::clone(&file), layout).unwrap();
    let blocks: Vec<u32> = (0..256).collect();
    b.forward(&[SeqChunk {
        tokens: &prompt[..8],
        start: 0,
        blocks: &blocks,
        logits: Logits::Last,
    }])
    .unwrap();
    let t0 = Instant::now();
    b.forward(&[SeqChunk {
        tokens: &prompt,
        start: 0,
        blocks: &blocks,
        logits: Logits::Last,
    }])
    .unwrap();
    let prompt_tps = prompt.len() as f64 / t0.elapsed().as_secs_f64();
    let short = &prompt[..8];
    let mut next = argmax(
        &b.forward(&[SeqChunk {
            tokens: short,
            start: 0,
            blocks: &blocks,
            logits: Logits::Last,
        }])
        .unwrap(),
    );
    let before = b.profile();
    let t0 = Instant::now();
    for i in 0..DECODE {
        next = argmax(
            &b.forward(&[SeqChunk {
                tokens: &[next],
                start: short.len() + i,
                blocks: &blocks,
                logits: Logits::Last,
            }])
            .unwrap(),
        );
    }
    let decode_tps = DECODE as f64 / t0.elapsed().as_secs_f64();
    let after = b.profile();
    let pass = (after.total - before.total).as_secs_f64();
    let share = |d: Duration| 100.0 * d.as_secs_f64() / pass;
    let (mm, att) = (
        share(after.matmul - before.matmul),
        share(after.attention - before.attention),
    );
    // What one decode token reads: every weight matrix (the tied head reads the whole
    // embedding; the embedding lookup one row) and, on average, half the KV written.
    let kv_per_pos = KvLayout::bytes_per_token(b.config());
    let bytes_per_token =
        file.header().weight_bytes() as f64 + ((short.len() + DECODE / 2) * kv_per_pos) as f64;
    drop(b);
    let bandwidth = read_bandwidth();
    let limit = bandwidth / bytes_per_token;

    // Ours: 8 concurrent requests through the engine (continuous batching).
    let spent = Arc::new(Mutex::new(Duration::ZERO));
    let backend = Timed {
        inner: CpuBackend::load(Arc::clone(&file), layout).unwrap(),
        spent: Arc::clone(&spent),
    };
    let config = EngineConfig {
        max_batch: STREAMS,
        max_batch_tokens: 512,
        max_seq_len: 1024,
        queue_capacity: 64,
        // llama.cpp computes each stream's prompt: so do we, for a like comparison.
        prefix_caching: false,
    };
    let (engine, _t) = scheduler::start(
        Box::new(backend),
        Arc::clone(&tok),
        config,
        Arc::new(Metrics::new()),
    );
    let t0 = Instant::now();
    let mut rxs = Vec::new();
    for i in 0..STREAMS {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = GenerateRequest {
            id: format!("bench-{i}"),
            prompt: stream_prompt.clone(),
            max_tokens: STREAM_TOKENS,
            sampling: Sampling::greedy(),
            seed: 0,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            constraint: None,
            // llama.cpp's side decodes a fixed number of tokens: so do we.
            ignore_eos: true,
            events: tx,
        };
        engine.submit(req).unwrap();
        rxs.push(rx);
    }
    let mut generated = 0;
    for mut rx in rxs {
        while let Some(ev) = rx.blocking_recv() {
            if let Event::Done {
                completion_tokens, ..
            } = ev
            {
                generated += completion_tokens;
                break;
            }
        }
    }
    let wall = t0.elapsed();
    let aggregate_tps = generated as f64 / wall.as_secs_f64();
    let in_forward = spent.lock().unwrap().as_secs_f64() / wall.as_secs_f64();

    // llama.cpp, same tokens, same threads.
    let mut peer_note = None;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench-llama-cpp.py");
    let run_peer = |extra_bufts: bool| {
        let cfg = serde_json::json!({
            "model": model, "threads": threads, "prompt": prompt, "decode_tokens": DECODE,
            "streams": STREAMS, "stream_prompt": stream_prompt, "stream_tokens": STREAM_TOKENS,
            "extra_bufts": extra_bufts,
        });
        std::process::Command::new(&python)
            .arg(script)
            .arg(cfg.to_string())
            .output()
    };
    let mut out = run_peer(true);
    if let Ok(o) = &out {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = o.status.signal() {
            // llama.cpp's AMX path segfaults on some AMX hosts (ggml-org/llama.cpp#20824;
            // seen here on 2026-12-05): its plain CPU path is the peer there, and says so.
            eprintln!(
                "llama.cpp with its default weight repacking died of signal {signal}; \
                 running it again without (use_extra_bufts = false)"
            );
            out = run_peer(false);
            peer_note = Some("llama.cpp without weight repacking (use_extra_bufts = false): its AMX path crashed here");
        }
    }
    let peer: Option<serde_json::Value> = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
        Ok(o) => {
            // llama.cpp logs every tensor; the reason is at the end.
            let err = String::from_utf8_lossy(&o.stderr);
            let lines: Vec<&str> = err.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            eprintln!("llama.cpp run failed ({}):\n{}", o.status, tail.join("\n"));
            None
        }
        Err(e) => {
            eprintln!("cannot run {python} ({e}); build it with scripts/ensure-llama-cpp.sh");
            None
        }
    };
    println!(
        "SmolLM2-135M-Instruct Q4_1, {threads} threads, CPU ({} kernels)",
        Kernels::from_env()
            .expect("GPUSCALE_CPU_KERNELS")
            .describe()
    );
    if let Some(p) = &peer {
        println!(
            "peer: llama-cpp-python {}{}",
            p["version"].as_str().unwrap_or("?"),
            peer_note.map_or(String::new(), |n| format!(", {n}"))
        );
    }
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "", "gpuscale", "llama.cpp", "ratio"
    );
    for (name, ours, key) in [
        (
            format!("prompt processing ({} tokens), tok/s", prompt.len()),
            prompt_tps,
            "prompt_tps",
        ),
        (
            format!("single-stream decode ({DECODE} tokens), tok/s"),
            decode_tps,
            "decode_tps",
        ),
        (
            format!("aggregate, {STREAMS} streams x {STREAM_TOKENS} tokens, tok/s"),
            aggregate_tps,
            "aggregate_tps",
        ),
    ] {
        match peer.as_ref().and_then(|p| p[key].as_f64()) {
            Some(theirs) => println!(
                "{name:<44} {ours:>12.1} {theirs:>12.1} {:>7.2}x",
                ours / theirs
            ),
            None => println!("{name:<44} {ours:>12.1} {:>12} {:>8}", "-", "-"),
        }
    }
    println!(
        "single-stream decode reads {:.1} MB a token; read bandwidth here {:.1} GB/s ({threads} threads, 1 GiB, best of 3) -> limit {limit:.0} tok/s; decode reached {:.0}% of it",
        bytes_per_token / 1e6,
        bandwidth / 1e9,
        100.0 * decode_tps / limit
    );
    println!(
        "decode step ({DECODE} tokens): {mm:.0}% matmuls, {att:.0}% attention, {:.0}% the rest of the pass (norms, RoPE, KV writes, embedding, hand-offs between threads)",
        100.0 - mm - att
    );
    println!(
        "engine, {STREAMS} streams: {:.0}% of the wall time in forward passes, {:.0}% in the scheduler around them (planning, sampling, detokenising, streaming)",
        100.0 * in_forward,
        100.0 * (1.0 - in_forward)
    );
}

/// Read bandwidth of this machine's memory with the pool's threads: the best of three
/// sums over 1 GiB (far past any cache), as bytes per second.
fn read_bandwidth() -> f64 {
    let words = vec![1u64; 1 << 27];
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let sum: u64 = words
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, w| a.wrapping_add(*w)))
                .sum();
            assert_eq!(sum, words.len() as u64);
            (words.len() * 8) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// The engine's backend, timed: how much of the wall time the forward passes take.
struct Timed {
    inner: CpuBackend,
    spent: Arc<Mutex<Duration>>,
}

impl Backend for Timed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn kv_layout(&self) -> KvLayout {
        self.inner.kv_layout()
    }
    fn memory_bytes(&self) -> u64 {
        self.inner.memory_bytes()
    }
    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
        let t = Instant::now();
        let out = self.inner.forward(chunks);
        *self.spent.lock().unwrap() += t.elapsed();
        out
    }
}
