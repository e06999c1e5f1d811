//! Prefix caching changes nothing but the work done: the same requests through an engine
//! with the cache and one without give bit-identical tokens and log-probabilities, also
//! when the pool is small enough that cached blocks are evicted and sequences preempted.

mod common;

use std::sync::Arc;

use inference_worker::backend::cpu::quant::WeightType;
use inference_worker::backend::cpu::CpuBackend;
use inference_worker::backend::KvLayout;
use inference_worker::metrics::Metrics;
use inference_worker::scheduler::sampling::{Sampling, TokenLogprobs};
use inference_worker::scheduler::{self, EngineConfig, Event, GenerateRequest, Handle};
use inference_worker::tokenizer::Tokenizer;
use tokio::sync::mpsc;

struct Engine {
    handle: Handle,
    metrics: Arc<Metrics>,
    tokenizer: Arc<Tokenizer>,
}

fn engine(caching: bool, n_blocks: usize, tag: &str) -> Engine {
    let m = common::model(WeightType::Q8_0, "llama", 33);
    let path = common::write_tmp(&format!("prefix-{tag}-{caching}.gguf"), &m.bytes);
    let file = Arc::new(gguf::GgufFile::open(&path).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_gguf(file.header()).unwrap());
    let backend = CpuBackend::load(
        file,
        KvLayout {
            block_size: 4,
            n_blocks,
        },
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let (handle, _) = scheduler::start(
        Box::new(backend),
        Arc::clone(&tokenizer),
        EngineConfig {
            max_batch: 4,
            max_batch_tokens: 24,
            max_seq_len: 256,
            queue_capacity: 64,
            prefix_caching: caching,
        },
        Arc::clone(&metrics),
    );
    Engine {
        handle,
        metrics,
        tokenizer,
    }
}

/// What one request produced: text, and every token's log-probabilities.
type Output = (String, Vec<TokenLogprobs>);

/// Submits every prompt of a wave at once, then reads all of them to the end.
fn wave(e: &Engine, prompts: &[(&str, Sampling)]) -> Vec<Output> {
    let rxs: Vec<mpsc::UnboundedReceiver<Event>> = prompts
        .iter()
        .enumerate()
        .map(|(i, (p, sampling))| {
            let (tx, rx) = mpsc::unbounded_channel();
            e.handle
                .submit(GenerateRequest {
                    id: format!("r{i}"),
                    prompt: e.tokenizer.encode(p),
                    max_tokens: 12,
                    sampling: sampling.clone(),
                    seed: i as u64,
                    stop: Vec::new(),
                    logprobs: Some(2),
                    prompt_logprobs: None,
                    constraint: None,
                    ignore_eos: false,
                    events: tx,
                })
                .unwrap();
            rx
        })
        .collect();
    rxs.into_iter()
        .map(|mut rx| {
            let (mut text, mut lps) = (String::new(), Vec::new());
            loop {
                match rx.blocking_recv().expect("the engine ends every request") {
                    Event::Text { text: t, logprobs } => {
                        text.push_str(&t);
                        lps.extend(logprobs);
                    }
                    Event::Done { .. } => return (text, lps),
                    other => panic!("{other:?}"),
                }
            }
        })
        .collect()
}

const SYSTEM: &str = "you are a careful assistant. answer briefly, and say so when unsure: ";

fn waves() -> Vec<Vec<(String, Sampling)>> {
    let greedy = Sampling::greedy;
    let warm = || Sampling {
        temperature: 0.9,
        ..Sampling::default()
    };
    let q = |s: &str| format!("{SYSTEM}{s}");
    vec![
        vec![(q("what is rust?"), greedy())],
        // The same prefix again, alone and with others at once; one identical prompt.
        vec![
            (q("what is a gpu?"), greedy()),
            (q("what is rust?"), greedy()),
            (q("why, sky?"), warm()),
            ("an unrelated prompt".to_string(), greedy()),
        ],
        vec![
            (q("what is rust?"), warm()),
            (q("what is a gpu? and a tpu?"), greedy()),
        ],
    ]
}

fn run(e: &Engine) -> Vec<Output> {
    waves()
        .iter()
        .flat_map(|w| {
            let w: Vec<(&str, Sampling)> = w.iter().map(|(p, s)| (p.as_str(), s.clone())).collect();
            wave(e, &w)
        })
        .collect()
}

#[test]
fn output_is_bit_identical_with_the_cache_on_and_off() {
    let on = engine(true, 128, "roomy");
    let off = engine(false, 128, "roomy");
    let (with, without) = (run(&on), run(&off));
    assert_eq!(with, without, "tokens and log-probabilities, bit for bit");
    let hits = on.metrics.prefix_cache_hits.get();
    let queries = on.metrics.prefix_cache_queries.get();
    // The system prompt is 69 one-character tokens: 17 full blocks of 4, reused by the
    // 6 later prompts that start with it.
    assert!(hits >= 6 * 16, "hits {hits} of {queries} prompt tokens");
    assert_eq!(queries, off.metrics.prefix_cache_queries.get());
    assert_eq!(off.metrics.prefix_cache_hits.get(), 0);
    assert!(on.metrics.prefix_cache_blocks.get() > 0);
    assert_eq!(off.metrics.prefix_cache_blocks.get(), 0);
}

#[test]
fn a_small_pool_evicts_and_preempts_with_the_same_output() {
    // 28 blocks of 4 tokens: one 106-token sequence fits, two do not unless they share,
    // so sequences are preempted and cached blocks evicted while the cache is shared.
    let on = engine(true, 28, "tight");
    let off = engine(false, 28, "tight");
    let (with, without) = (run(&on), run(&off));
    assert_eq!(with, without);
    let (preempted, hits) = (
        on.metrics.preemptions.get(),
        on.metrics.prefix_cache_hits.get(),
    );
    println!("preemptions {preempted}, prefix-cache hits {hits} tokens");
    assert!(preempted > 0, "the pool was meant to run dry");
    assert!(hits > 0);
}
