//! What the sampling features cost per decoded token, through the real engine on SmolLM2
//! (one stream, 2 threads): plain greedy decoding against the same request with
//! penalties and logit bias, with log-probabilities (5 alternatives), and constrained to
//! a JSON schema. Each setting runs three times, alternating, so the spread between runs
//! of one setting is the noise. Unused, each feature is one `Option`/flag check per token on
//! the plain path. Asserts nothing about time.
//!
//!     cargo bench -p gpuscale-inference-worker --bench sampling
//!
//! Environment: GPUSCALE_SMOLLM2_GGUF (model), BENCH_THREADS (2).

mod common;

use std::sync::Arc;
use std::time::Instant;

use inference_worker::backend::cpu::CpuBackend;
use inference_worker::backend::KvLayout;
use inference_worker::metrics::Metrics;
use inference_worker::scheduler::grammar::Grammars;
use inference_worker::scheduler::sampling::Sampling;
use inference_worker::scheduler::{self, EngineConfig, Event, GenerateRequest, Handle};
use inference_worker::tokenizer::Tokenizer;

const TOKENS: usize = 256;
const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Setting {
    Plain,
    Penalties,
    Logprobs,
    Json,
}

/// Decoded tokens per second for one request of `setting`.
fn decode(engine: &Handle, tok: &Tokenizer, grammars: &Grammars, setting: Setting) -> f64 {
    let prompt = tok.encode("<|im_start|>user\nDescribe your favourite city in detail.<|im_end|>\n<|im_start|>assistant\n");
    let sampling = match setting {
        Setting::Penalties => Sampling {
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            repetition_penalty: 1.1,
            logit_bias: vec![(28, -5.0), (30, 2.0), (198, -1.0)],
            ..Sampling::greedy()
        },
        _ => Sampling::greedy(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    engine
        .submit(GenerateRequest {
            id: "bench".into(),
            prompt,
            max_tokens: TOKENS,
            sampling,
            seed: 0,
            stop: Vec::new(),
            logprobs: (setting == Setting::Logprobs).then_some(5),
            prompt_logprobs: None,
            constraint: (setting == Setting::Json).then(|| {
                grammars
                    .json_schema(serde_json::json!({"type": "object"}))
                    .unwrap()
            }),
            ignore_eos: false,
            events: tx,
        })
        .unwrap();
    let mut first = None;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Text { .. } => {
                first.get_or_insert_with(Instant::now);
            }
            Event::Done {
                completion_tokens, ..
            } => {
                // Decode only: from the first token on.
                let from = first.unwrap_or(started);
                return (completion_tokens.saturating_sub(1)) as f64 / from.elapsed().as_secs_f64();
            }
            Event::Failed(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    panic!("the engine stopped");
}

fn main() {
    let common::Setup {
        threads, file, tok, ..
    } = common::setup();
    let t0 = Instant::now();
    let grammars = Grammars::new(&tok).unwrap();
    println!(
        "SmolLM2-135M-Instruct Q4_1, {threads} threads, one stream, {TOKENS} tokens; vocabulary indexed for llguidance in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    let backend = CpuBackend::load(
        Arc::clone(&file),
        KvLayout {
            block_size: 16,
            n_blocks: 64,
        },
    )
    .unwrap();
    let (engine, _t) = scheduler::start(
        Box::new(backend),
        Arc::clone(&tok),
        EngineConfig {
            max_batch: 1,
            max_batch_tokens: 512,
            max_seq_len: 1024,
            queue_capacity: 4,
            prefix_caching: false,
        },
        Arc::new(Metrics::new()),
    );
    let settings = [
        (Setting::Plain, "plain greedy"),
        (Setting::Penalties, "penalties and logit bias"),
        (Setting::Logprobs, "logprobs, 5 alternatives"),
        (Setting::Json, "JSON object grammar"),
    ];
    decode(&engine, &tok, &grammars, Setting::Plain); // warm-up
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    for _ in 0..ROUNDS {
        for (i, (s, _)) in settings.iter().enumerate() {
            runs[i].push(decode(&engine, &tok, &grammars, *s));
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let plain = mean(&runs[0]);
    println!(
        "{:<28} {:>26} {:>10} {:>8}",
        "", "decode tok/s (runs)", "vs plain", "spread"
    );
    for (i, (_, name)) in settings.iter().enumerate() {
        let (lo, hi) = runs[i]
            .iter()
            .fold((f64::MAX, f64::MIN), |a, &x| (a.0.min(x), a.1.max(x)));
        let each: Vec<String> = runs[i].iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "{name:<28} {:>26} {:>9.3}x {:>7.1}%",
            each.join(", "),
            mean(&runs[i]) / plain,
            (hi - lo) / lo * 100.0
        );
    }
}
