//! Prefix caching on a shared-system-prompt workload: a few long system prompts, many
//! users with short questions, through the real engine on SmolLM2, with the cache on and
//! off in the same process (each twice, alternating, so the spread between two runs of
//! one setting is the noise). Prints time to first token (p50, p99), prompt throughput
//! (prompt tokens answered per second of wall time) and the hit ratio; asserts nothing
//! about time.
//!
//!     cargo bench -p gpuscale-inference-worker --bench prefix
//!
//! Environment: GPUSCALE_SMOLLM2_GGUF (model), BENCH_THREADS (2).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use inference_worker::backend::cpu::CpuBackend;
use inference_worker::backend::KvLayout;
use inference_worker::metrics::Metrics;
use inference_worker::scheduler::sampling::Sampling;
use inference_worker::scheduler::{self, EngineConfig, Event, GenerateRequest};
use inference_worker::tokenizer::Tokenizer;

/// Users per system prompt, and users asking at once.
const USERS: usize = 6;
const CONCURRENT: usize = 4;
const ANSWER_TOKENS: usize = 4;

struct Run {
    ttft: Vec<Duration>,
    prompt_tokens: usize,
    wall: Duration,
    hit_ratio: f64,
}

fn run(
    file: &Arc<gguf::GgufFile>,
    tok: &Arc<Tokenizer>,
    prompts: &[Vec<u32>],
    caching: bool,
) -> Run {
    let backend = CpuBackend::load(
        Arc::clone(file),
        KvLayout {
            block_size: 16,
            n_blocks: 512,
        },
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let (engine, _t) = scheduler::start(
        Box::new(backend),
        Arc::clone(tok),
        EngineConfig {
            max_batch: CONCURRENT,
            max_batch_tokens: 512,
            max_seq_len: 2048,
            queue_capacity: 256,
            prefix_caching: caching,
        },
        Arc::clone(&metrics),
    );
    let t0 = Instant::now();
    let mut ttft = Vec::new();
    // Users arrive CONCURRENT at a time; each wave waits for the previous one.
    for wave in prompts.chunks(CONCURRENT) {
        let submitted: Vec<_> = wave
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                engine
                    .submit(GenerateRequest {
                        id: format!("u{i}"),
                        prompt: p.clone(),
                        max_tokens: ANSWER_TOKENS,
                        sampling: Sampling::greedy(),
                        seed: 0,
                        stop: Vec::new(),
                        logprobs: None,
                        prompt_logprobs: None,
                        constraint: None,
                        ignore_eos: false,
                        events: tx,
                    })
                    .unwrap();
                (Instant::now(), rx)
            })
            .collect();
        for (at, mut rx) in submitted {
            let mut first = None;
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    Event::Text { .. } => {
                        first.get_or_insert_with(|| at.elapsed());
                    }
                    Event::Done { .. } => break,
                    Event::Failed(e) => panic!("{e}"),
                    Event::PromptLogprobs(_) => {}
                }
            }
            ttft.push(first.unwrap_or_else(|| at.elapsed()));
        }
    }
    let wall = t0.elapsed();
    let queries = metrics.prefix_cache_queries.get() as f64;
    Run {
        ttft,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        wall,
        hit_ratio: metrics.prefix_cache_hits.get() as f64 / queries.max(1.0),
    }
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let common::Setup {
        threads, file, tok, ..
    } = common::setup();
    // Two products' support bots: long system prompts, then each user's question,
    // rendered through the model's chat template as the HTTP API would.
    let chat = inference_worker::tokenizer::ChatTemplate::new(
        file.header()
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str()),
        "",
        "<|im_end|>",
    )
    .unwrap();
    let systems = [
        "You are the support assistant of a cloud GPU provider. Answer in two sentences. "
            .repeat(12),
        "You help users of a home automation app. Be friendly, concise, and precise. ".repeat(12),
    ];
    let questions = [
        "How do I reset my password?",
        "Why is my bill higher this month?",
        "Can I move my data to another region?",
        "What does error 503 mean?",
        "How do I add a second user?",
        "Is there an API for this?",
    ];
    let mut prompts = Vec::new();
    for u in 0..USERS {
        for s in &systems {
            let messages = [
                inference_worker::tokenizer::ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                    ..Default::default()
                },
                inference_worker::tokenizer::ChatMessage {
                    role: "user".into(),
                    content: questions[u % questions.len()].into(),
                    ..Default::default()
                },
            ];
            prompts.push(tok.encode(&chat.render(&messages).unwrap()));
        }
    }
    let mean_prompt = prompts.iter().map(Vec::len).sum::<usize>() / prompts.len();
    println!(
        "SmolLM2-135M-Instruct Q4_1, {threads} threads; {} requests ({} system prompts x {USERS} users, {CONCURRENT} at a time), {mean_prompt} prompt tokens on average, {ANSWER_TOKENS} answer tokens",
        prompts.len(),
        systems.len()
    );
    let mut results: Vec<(bool, Run)> = Vec::new();
    for caching in [true, false, true, false] {
        results.push((caching, run(&file, &tok, &prompts, caching)));
    }
    println!(
        "{:<10} {:>12} {:>12} {:>16} {:>10}",
        "cache", "TTFT p50 ms", "TTFT p99 ms", "prompt tok/s", "hit ratio"
    );
    let summary = |caching: bool| {
        let runs: Vec<&Run> = results
            .iter()
            .filter(|r| r.0 == caching)
            .map(|r| &r.1)
            .collect();
        let mut tps = Vec::new();
        let mut p50s = Vec::new();
        for r in &runs {
            let t = r.prompt_tokens as f64 / r.wall.as_secs_f64();
            let p50 = pct(r.ttft.clone(), 0.5);
            println!(
                "{:<10} {:>12.1} {:>12.1} {:>16.1} {:>10.2}",
                if caching { "on" } else { "off" },
                p50,
                pct(r.ttft.clone(), 0.99),
                t,
                r.hit_ratio
            );
            tps.push(t);
            p50s.push(p50);
        }
        let spread = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |a, &x| (a.0.min(x), a.1.max(x)));
            (hi - lo) / lo * 100.0
        };
        println!(
            "           run-to-run spread: TTFT p50 {:.0}%, throughput {:.0}%",
            spread(&p50s),
            spread(&tps)
        );
        (
            p50s.iter().sum::<f64>() / p50s.len() as f64,
            tps.iter().sum::<f64>() / tps.len() as f64,
        )
    };
    let (on_ttft, on_tps) = summary(true);
    let (off_ttft, off_tps) = summary(false);
    println!(
        "cache on vs off (means of two runs): TTFT p50 {:.2}x lower, prompt throughput {:.2}x higher",
        off_ttft / on_ttft,
        on_tps / off_tps
    );
}
