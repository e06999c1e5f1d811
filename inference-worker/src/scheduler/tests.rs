//! Scheduler behaviour with a scripted backend whose next token is "the letter after the
//! last one": batching, joining and leaving, preemption, limits, stop strings, cancels.

use super::*;
use crate::backend::{BackendError, KvLayout};
use crate::model::{ModelConfig, RopeStyle};
use gguf::{Gguf, Value, Writer};
use std::time::Duration;

const EOS: u32 = 26;

/// Tokens "a".."z" (0..26) and the control token "</s>" (26).
fn tokenizer() -> Arc<Tokenizer> {
    let mut tokens: Vec<Value> = (b'a'..=b'z')
        .map(|c| Value::String((c as char).to_string()))
        .collect();
    tokens.push(Value::String("</s>".into()));
    let mut types = vec![Value::I32(1); 26];
    types.push(Value::I32(3));
    let w = Writer::new(3)
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(tokens))
        .kv("tokenizer.ggml.token_type", Value::Array(types))
        .kv("tokenizer.ggml.merges", Value::Array(vec![]))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(EOS));
    Arc::new(Tokenizer::from_gguf(&Gguf::parse(&w.bytes()).unwrap()).unwrap())
}

/// Records every batch as (start, len) per chunk.
type Log = Arc<Mutex<Vec<Vec<(usize, usize)>>>>;

struct Scripted {
    config: ModelConfig,
    layout: KvLayout,
    log: Log,
    step_delay: Duration,
}

impl Backend for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn kv_layout(&self) -> KvLayout {
        self.layout
    }
    fn memory_bytes(&self) -> u64 {
        0
    }
    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
        std::thread::sleep(self.step_delay);
        self.log
            .lock()
            .unwrap()
            .push(chunks.iter().map(|c| (c.start, c.tokens.len())).collect());
        let mut out = Vec::new();
        for c in chunks {
            let end = c.start + c.tokens.len();
            assert!(
                end <= c.blocks.len() * self.layout.block_size,
                "blocks must cover the chunk"
            );
            if c.logits == Logits::Last {
                let next = (c.tokens.last().unwrap() + 1).min(EOS);
                out.extend((0..27).map(|t| if t == next { 1.0 } else { 0.0 }));
            }
        }
        Ok(out)
    }
}

fn engine(blocks: usize, config: EngineConfig, delay_ms: u64) -> (Handle, Log, Arc<Metrics>) {
    let log: Log = Arc::default();
    let metrics = Arc::new(Metrics::new());
    let backend = Scripted {
        config: ModelConfig {
            architecture: "scripted".into(),
            name: "scripted".into(),
            n_layers: 1,
            dim: 32,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 32,
            ffn_dim: 32,
            vocab: 27,
            context_length: 64,
            norm_eps: 1e-5,
            rope_base: 1e4,
            rope_dims: 32,
            rope_style: RopeStyle::Interleaved,
        },
        layout: KvLayout {
            block_size: 4,
            n_blocks: blocks,
        },
        log: Arc::clone(&log),
        step_delay: Duration::from_millis(delay_ms),
    };
    let (h, _thread) = start(Box::new(backend), tokenizer(), config, Arc::clone(&metrics));
    (h, log, metrics)
}

fn config() -> EngineConfig {
    EngineConfig {
        max_batch: 4,
        max_batch_tokens: 8,
        max_seq_len: 40,
        queue_capacity: 2,
        prefix_caching: true,
    }
}

fn request(
    prompt: &str,
    max_tokens: usize,
    stop: &[&str],
) -> (GenerateRequest, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tok = tokenizer();
    let req = GenerateRequest {
        id: prompt.into(),
        prompt: tok.encode(prompt),
        max_tokens,
        sampling: Sampling::greedy(),
        seed: 0,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        logprobs: None,
        prompt_logprobs: None,
        constraint: None,
        ignore_eos: false,
        events: tx,
    };
    (req, rx)
}

/// Collects text until Done; returns (text, finish reason, completion tokens).
fn collect(rx: &mut mpsc::UnboundedReceiver<Event>) -> (String, FinishReason, usize) {
    let mut text = String::new();
    loop {
        match rx
            .blocking_recv()
            .expect("engine ended the stream without Done")
        {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Done {
                reason,
                completion_tokens,
                ..
            } => return (text, reason, completion_tokens),
            Event::Failed(e) => panic!("failed: {e}"),
            Event::PromptLogprobs(_) => panic!("prompt logprobs were not asked for"),
        }
    }
}

#[test]
fn concurrent_requests_share_forward_passes_and_finish_independently() {
    let (h, log, _) = engine(32, config(), 2);
    let (a, mut ra) = request("abcdefghij", 6, &[]);
    let (b, mut rb) = request("m", 3, &[]);
    h.submit(a).unwrap();
    h.submit(b).unwrap();
    assert_eq!(collect(&mut ra), ("klmnop".into(), FinishReason::Length, 6));
    assert_eq!(collect(&mut rb), ("nop".into(), FinishReason::Length, 3));
    let log = log.lock().unwrap();
    // The 10-token prompt is cut to the 8-token budget; some passes carry both sequences.
    assert!(
        log.iter()
            .all(|b| b.iter().map(|c| c.1).sum::<usize>() <= 8),
        "{log:?}"
    );
    assert!(log.iter().any(|b| b.len() == 2), "{log:?}");
    // Decode steps are one token per sequence.
    assert!(
        log.iter().flatten().filter(|c| c.0 >= 10).all(|c| c.1 == 1),
        "{log:?}"
    );
}

#[test]
fn a_request_joins_a_running_batch_and_leaves_before_it() {
    let (h, log, _) = engine(32, config(), 5);
    let (a, mut ra) = request("a", 20, &[]);
    h.submit(a).unwrap();
    // Wait for A's third token, then add B: it must run alongside A, not after it.
    let mut got = 0;
    while got < 3 {
        if let Some(Event::Text { .. }) = ra.blocking_recv() {
            got += 1;
        }
    }
    let (b, mut rb) = request("x", 2, &[]);
    h.submit(b).unwrap();
    assert_eq!(collect(&mut rb).0, "yz");
    let mut rest = collect(&mut ra);
    rest.0.insert_str(0, "bcd");
    assert_eq!(rest.0, "bcdefghijklmnopqrstuvwxyz"[..20]);
    let log = log.lock().unwrap();
    let together = log.iter().filter(|b| b.len() == 2).count();
    assert!(together >= 2, "B joined A's batch: {log:?}");
    // After B left, A continued alone.
    assert!(log.last().unwrap().len() == 1, "{log:?}");
}

#[test]
fn requests_for_free_batch_slots_are_never_refused_as_queued() {
    // No queue at all: the two batch slots still take two requests, whether or not the
    // engine has admitted the first yet; the third has neither a slot nor a place.
    let cfg = EngineConfig {
        max_batch: 2,
        queue_capacity: 0,
        prefix_caching: true,
        ..config()
    };
    let (h, _, _) = engine(32, cfg, 20);
    let mut keep = Vec::new();
    for _ in 0..2 {
        let (r, rx) = request("a", 30, &[]);
        h.submit(r).unwrap();
        keep.push(rx);
    }
    let (r, _rx) = request("a", 30, &[]);
    assert!(matches!(h.submit(r), Err(SubmitError::QueueFull(_))));
}

#[test]
fn full_queue_long_requests_and_draining_are_refused_clearly() {
    let cfg = EngineConfig {
        max_batch: 1,
        ..config()
    };
    let (h, _, _) = engine(32, cfg, 20);
    let mut keep = Vec::new();
    for _ in 0..3 {
        let (r, rx) = request("a", 10, &[]);
        h.submit(r).unwrap();
        keep.push(rx);
    }
    // One running, two waiting: the queue (capacity 2) is full.
    std::thread::sleep(Duration::from_millis(50));
    let (r, _rx) = request("a", 10, &[]);
    assert_eq!(h.submit(r).unwrap_err(), SubmitError::QueueFull(2));
    let (r, _rx) = request("abc", 38, &[]);
    let e = h.submit(r).unwrap_err().to_string();
    assert!(
        e.contains("maximum context length is 40 tokens") && e.contains("41 in all"),
        "{e}"
    );
    h.drain();
    let (r, _rx) = request("a", 1, &[]);
    assert_eq!(h.submit(r).unwrap_err(), SubmitError::Draining);
    // Draining does not drop what was admitted.
    for mut rx in keep {
        assert_eq!(collect(&mut rx).2, 10);
    }
}

#[test]
fn eos_and_stop_strings_end_a_completion() {
    let (h, _, _) = engine(32, config(), 0);
    let (r, mut rx) = request("w", 10, &[]);
    h.submit(r).unwrap();
    // x y z then EOS (not shown, not counted as text).
    let (text, reason, n) = collect(&mut rx);
    assert_eq!((text.as_str(), reason, n), ("xyz", FinishReason::Stop, 4));
    let (r, mut rx) = request("a", 10, &["def"]);
    h.submit(r).unwrap();
    let (text, reason, _) = collect(&mut rx);
    assert_eq!((text.as_str(), reason), ("bc", FinishReason::Stop));
}

#[test]
fn ignore_eos_goes_on_to_max_tokens_and_shows_no_eos_text() {
    let (h, _, _) = engine(32, config(), 0);
    let (mut r, mut rx) = request("w", 10, &[]);
    r.ignore_eos = true;
    h.submit(r).unwrap();
    // x y z, then the scripted model repeats EOS: each counted, none shown.
    let (text, reason, n) = collect(&mut rx);
    assert_eq!(
        (text.as_str(), reason, n),
        ("xyz", FinishReason::Length, 10)
    );
}

#[test]
fn kv_pressure_preempts_and_recomputes_without_changing_output() {
    // 6 blocks of 4 = 24 slots; two sequences growing to 4 + 16 = 20 tokens each.
    let (h, _, metrics) = engine(6, config(), 1);
    let (a, mut ra) = request("abcd", 16, &[]);
    let (b, mut rb) = request("efgh", 16, &[]);
    h.submit(a).unwrap();
    h.submit(b).unwrap();
    assert_eq!(collect(&mut ra).0, "efghijklmnopqrstuvwxyz"[..16]);
    assert_eq!(collect(&mut rb).0, "ijklmnopqrstuvwxyz"[..16]);
    assert!(
        metrics.preemptions.get() > 0,
        "the pool was too small for both at once"
    );
}

#[test]
fn a_client_that_disconnects_frees_its_sequence_and_blocks() {
    let (h, _, metrics) = engine(32, config(), 2);
    let (r, mut rx) = request("a", 30, &[]);
    h.submit(r).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Text { .. })));
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "sequence still held after disconnect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(metrics.kv_usage.get(), 0.0);
    assert!(metrics
        .encode()
        .contains("gpuscale_worker_requests_total{status=\"499\"} 1"));
}
