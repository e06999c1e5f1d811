//! Continuous batching. One engine thread owns the backend and, every step, runs a single
//! forward pass over all running sequences: one token for each sequence that is
//! generating, and chunks of prompt for sequences still prefilling, up to a token budget.
//! Sequences join when a batch slot and KV blocks are free and leave the moment they
//! finish, so a long request never holds a short one back. KV memory is paged in
//! fixed-size blocks; when the pool runs dry the youngest sequence is preempted and later
//! recomputed, as vLLM does. Full blocks are kept after their sequence ends and reused
//! by any later sequence whose tokens begin the same way (automatic prefix caching, see
//! `kv`), so a thousand chats that share a system prompt compute it once. Admission is a
//! bounded queue: full means 429, draining 503.

pub mod grammar;
pub mod kv;
pub mod sampling;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::backend::{Backend, Logits, SeqChunk};
use crate::metrics::Metrics;
use crate::tokenizer::Tokenizer;
use kv::BlockAllocator;
use sampling::{Sampler, Sampling, TokenLogprobs};

/// Limits of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// Most tokens in one forward pass (prompt chunks are cut to fit).
    pub max_batch_tokens: usize,
    /// Longest sequence, prompt plus completion.
    pub max_seq_len: usize,
    /// Requests that may wait for a batch slot before new ones get 429.
    pub queue_capacity: usize,
    /// Keep full KV blocks for reuse by later sequences with the same leading tokens.
    pub prefix_caching: bool,
}

/// What a request asks the engine to do.
pub struct GenerateRequest {
    /// Request id (for logs).
    pub id: String,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Completion tokens at most.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: Sampling,
    /// Random seed.
    pub seed: u64,
    /// Strings that end the completion (not included in it).
    pub stop: Vec<String>,
    /// Log-probabilities of each completion token, with this many alternatives.
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt's tokens (after the first), with this many
    /// alternatives: the whole prompt's logits are computed, so only on request.
    pub prompt_logprobs: Option<usize>,
    /// A grammar the completion must follow (structured output); it ends the completion
    /// when complete.
    pub constraint: Option<grammar::Constraint>,
    /// Go on past the end-of-sequence token until `max_tokens` (vLLM's and llama.cpp's
    /// `ignore_eos`, for benchmarks that need a fixed length); the token shows no text.
    pub ignore_eos: bool,
    /// Where the engine sends text and the end; dropping the receiver cancels.
    pub events: mpsc::UnboundedSender<Event>,
}

/// Why a completion ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// max_tokens or the maximum sequence length.
    Length,
}

impl FinishReason {
    /// The OpenAI string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Something the engine tells a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// More completion text, with the log-probabilities of the tokens it completes
    /// (when asked for; a token whose text ends in a later event is listed there).
    Text {
        /// The text.
        text: String,
        /// One entry per token.
        logprobs: Vec<TokenLogprobs>,
    },
    /// The prompt's log-probabilities (asked for with `prompt_logprobs`), one per prompt
    /// token after the first, before any text.
    PromptLogprobs(Vec<TokenLogprobs>),
    /// The end.
    Done {
        /// Why it ended.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Completion tokens.
        completion_tokens: usize,
    },
    /// The engine failed this request.
    Failed(String),
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The admission queue is full.
    #[error("the server is at capacity ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The worker is shutting down.
    #[error("the server is shutting down")]
    Draining,
    /// The request can never fit.
    #[error("{0}")]
    Invalid(String),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
}

struct Waiting {
    seq: Seq,
    /// Preempted sequences keep their place at the front.
    preempted: bool,
}

struct State {
    waiting: VecDeque<Waiting>,
    running: usize,
    shutdown: bool,
    /// Every request in flight is to end now, with this error.
    abort: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    draining: AtomicBool,
    config: EngineConfig,
    kv_capacity_tokens: usize,
    metrics: Arc<Metrics>,
}

/// The engine's front door: cheap to clone, used by the HTTP handlers.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

/// One sequence in the engine.
struct Seq {
    req: GenerateRequest,
    tokens: Vec<u32>,
    n_prompt: usize,
    /// Positions whose K/V are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Chained hashes of the leading full blocks, as far as they are computed.
    hashes: Vec<u64>,
    sampler: Sampler,
    started: Instant,
    first_token: Option<Instant>,
    /// Bytes of a UTF-8 character not yet complete.
    partial: Vec<u8>,
    /// Text decoded but held back because it may begin a stop string.
    held: String,
    /// Log-probabilities of tokens whose text is not sent yet, each with the offset in
    /// `held` where its text begins.
    pending_logprobs: Vec<(usize, TokenLogprobs)>,
    /// The prompt's log-probabilities, while they are being computed.
    prompt_logprobs: Vec<TokenLogprobs>,
    /// Whether the prompt's log-probabilities were sent (a preempted sequence does
    /// not compute them again).
    prompt_logprobs_sent: bool,
    finished: Option<FinishReason>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }

    /// Ends the sequence with an error its client is told.
    fn fail(&mut self, message: String) {
        let _ = self.req.events.send(Event::Failed(message));
        self.finished = Some(FinishReason::Stop);
    }
}

/// Starts the engine thread on `backend`. Returns the handle and the thread.
pub fn start(
    backend: Box<dyn Backend>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> (Handle, std::thread::JoinHandle<()>) {
    let layout = backend.kv_layout();
    metrics.kv_blocks_total.set(layout.n_blocks as i64);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            waiting: VecDeque::new(),
            running: 0,
            shutdown: false,
            abort: None,
        }),
        wake: Condvar::new(),
        draining: AtomicBool::new(false),
        kv_capacity_tokens: layout.n_blocks * layout.block_size,
        config: config.clone(),
        metrics,
    });
    let model = backend.config();
    let root = kv::root(&format!("{}/{}", model.architecture, model.name));
    let engine = Engine {
        shared: Arc::clone(&shared),
        backend,
        tokenizer,
        alloc: BlockAllocator::new(layout.block_size, layout.n_blocks, config.prefix_caching),
        root,
        masked: Vec::new(),
        running: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run())
        .expect("spawning the engine thread");
    (Handle { shared }, thread)
}

impl Handle {
    /// The longest sequence this engine can hold: its `max_seq_len`, or less when the
    /// KV cache holds fewer tokens.
    pub fn max_context(&self) -> usize {
        self.shared
            .config
            .max_seq_len
            .min(self.shared.kv_capacity_tokens)
    }

    /// Queues a request, or says why not.
    pub fn submit(&self, req: GenerateRequest) -> Result<(), SubmitError> {
        let c = &self.shared.config;
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let limit = c.max_seq_len.min(self.shared.kv_capacity_tokens);
        if req.prompt.len() + req.max_tokens > limit {
            return Err(SubmitError::Invalid(format!(
                "this model's maximum context length is {limit} tokens; the request has {} prompt tokens and max_tokens {} ({} in all); shorten the prompt or lower max_tokens",
                req.prompt.len(),
                req.max_tokens,
                req.prompt.len() + req.max_tokens
            )));
        }
        let mut st = self.shared.state.lock().expect("engine state");
        // A request that a free batch slot will take at the next step is not queued:
        // only requests beyond the free slots count against the queue.
        let free_slots = c.max_batch.saturating_sub(st.running);
        if st.waiting.len() >= c.queue_capacity + free_slots {
            return Err(SubmitError::QueueFull(st.waiting.len()));
        }
        let seq = Seq {
            tokens: req.prompt.clone(),
            n_prompt: req.prompt.len(),
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            sampler: Sampler::new(req.sampling.clone(), req.seed, &req.prompt),
            started: Instant::now(),
            first_token: None,
            partial: Vec::new(),
            held: String::new(),
            pending_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            prompt_logprobs_sent: req.prompt_logprobs.is_none(),
            finished: None,
            req,
        };
        self.shared
            .metrics
            .prompt_tokens
            .inc_by(seq.n_prompt as u64);
        st.waiting.push_back(Waiting {
            seq,
            preempted: false,
        });
        self.shared.metrics.queue_depth.set(st.waiting.len() as i64);
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Stops admitting: new requests get [`SubmitError::Draining`].
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Handle::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Requests waiting or running.
    pub fn in_flight(&self) -> usize {
        let st = self.shared.state.lock().expect("engine state");
        st.waiting.len() + st.running
    }

    /// Requests waiting for a slot.
    pub fn queue_depth(&self) -> usize {
        self.shared
            .state
            .lock()
            .expect("engine state")
            .waiting
            .len()
    }

    /// Ends every request in flight (running or waiting) with the error `reason`, at the
    /// end of the current step: a drain that timed out closes its streams properly
    /// instead of cutting them.
    pub fn abort_all(&self, reason: &str) {
        let mut st = self.shared.state.lock().expect("engine state");
        st.abort = Some(reason.to_string());
        for w in st.waiting.drain(..) {
            let _ = w.seq.req.events.send(Event::Failed(reason.to_string()));
        }
        drop(st);
        self.shared.wake.notify_all();
    }

    /// Ends the engine thread once nothing is in flight.
    pub fn shutdown(&self) {
        self.shared.state.lock().expect("engine state").shutdown = true;
        self.shared.wake.notify_all();
    }
}

struct Engine {
    shared: Arc<Shared>,
    backend: Box<dyn Backend>,
    tokenizer: Arc<Tokenizer>,
    alloc: BlockAllocator,
    /// Where every block hash chain starts (the model).
    root: u64,
    /// Logits masked by a grammar (reused between tokens).
    masked: Vec<f32>,
    running: Vec<Seq>,
}

impl Engine {
    fn run(mut self) {
        loop {
            if !self.admit() {
                return;
            }
            self.step();
            self.retire();
        }
    }

    /// Moves waiting requests into the batch while slots and KV blocks allow. Blocks
    /// while there is nothing to do; `false` when shut down.
    fn admit(&mut self) -> bool {
        let mut st = self.shared.state.lock().expect("engine state");
        while st.waiting.is_empty() && self.running.is_empty() {
            if st.shutdown {
                return false;
            }
            st = self.shared.wake.wait(st).expect("engine state");
        }
        while self.running.len() < self.shared.config.max_batch {
            let Some(front) = st.waiting.front() else {
                break;
            };
            if front.seq.req.events.is_closed() {
                // The client left while queued.
                st.waiting.pop_front();
                self.shared
                    .metrics
                    .requests
                    .get_or_create(&crate::metrics::StatusLabel { status: 499 })
                    .inc();
                continue;
            }
            // Leading blocks already cached, then room for the rest of the prompt (or
            // recomputed sequence) plus one token.
            let (found, hashes) = self.cached_prefix(&front.seq);
            let need = self.alloc.blocks_for(front.seq.tokens.len() + 1) - found.len();
            if need > self.alloc.free() - self.alloc.idle_among(&found) {
                break;
            }
            let mut w = st.waiting.pop_front().expect("front exists");
            let s = &mut w.seq;
            self.alloc.share(&found, &mut s.blocks);
            s.computed = found.len() * self.alloc.block_size();
            s.hashes = hashes;
            s.hashes.truncate(found.len());
            if !w.preempted {
                let m = &self.shared.metrics;
                m.prefix_cache_queries.inc_by(s.n_prompt as u64);
                m.prefix_cache_hits.inc_by(s.computed as u64);
                tracing::debug!(request_id = %s.req.id, prompt_tokens = s.n_prompt, cached_tokens = s.computed, "admitted");
            }
            self.running.push(w.seq);
        }
        st.running = self.running.len();
        self.shared.metrics.queue_depth.set(st.waiting.len() as i64);
        self.shared.metrics.running.set(self.running.len() as i64);
        true
    }

    /// The cached blocks that hold `seq`'s leading tokens, and the hashes of the full
    /// blocks looked up. The last token is always left to compute (its logits are
    /// needed), and a prompt scored in full (`prompt_logprobs`) reuses nothing.
    fn cached_prefix(&self, seq: &Seq) -> (Vec<u32>, Vec<u64>) {
        let bs = self.alloc.block_size();
        let reusable = if seq.prompt_logprobs_sent {
            (seq.tokens.len() - 1) / bs
        } else {
            0
        };
        let blocks: Vec<&[u32]> = seq.tokens[..reusable * bs].chunks_exact(bs).collect();
        let mut parent = self.root;
        let hashes: Vec<u64> = blocks
            .iter()
            .map(|b| {
                parent = kv::chain(parent, b);
                parent
            })
            .collect();
        let found = self
            .alloc
            .lookup(self.root, hashes.iter().copied().zip(blocks));
        (found, hashes)
    }

    /// Plans and runs one forward pass, then samples.
    fn step(&mut self) {
        // Generating sequences first (one token each), then prompt chunks in the rest of
        // the token budget.
        let mut budget = self.shared.config.max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens)
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].tokens.len() - self.running[i].computed > 1);
        for i in order {
            let s = &self.running[i];
            let n = (s.tokens.len() - s.computed).min(budget);
            if n == 0 {
                continue;
            }
            budget -= n;
            plan.push((i, n));
        }
        // KV blocks for every planned token; preempt the youngest sequences if short.
        let mut p = 0;
        while p < plan.len() {
            let (i, n) = plan[p];
            let need = self.running[i].computed + n;
            if self.alloc.grow(&mut self.running[i].blocks, need) {
                p += 1;
                continue;
            }
            let victim = (0..self.running.len())
                .rev()
                .find(|&v| v != i && !self.running[v].blocks.is_empty());
            match victim {
                Some(v) => {
                    self.preempt(v);
                    plan.retain(|(j, _)| *j != v);
                    // Indices after v shifted down by one.
                    plan.iter_mut().for_each(|(j, _)| *j -= usize::from(*j > v));
                    p = plan
                        .iter()
                        .position(|(j, _)| *j == i - usize::from(i > v))
                        .unwrap_or(plan.len());
                }
                None => {
                    let s = &mut self.running[i];
                    let _ = s
                        .req
                        .events
                        .send(Event::Failed("KV cache too small for this sequence".into()));
                    s.finished = Some(FinishReason::Length);
                    plan.remove(p);
                }
            }
        }
        if plan.is_empty() {
            return;
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let last = s.computed + n == s.tokens.len();
                let logits = if !s.prompt_logprobs_sent {
                    Logits::All
                } else if last {
                    Logits::Last
                } else {
                    Logits::None
                };
                SeqChunk {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start: s.computed,
                    blocks: &s.blocks,
                    logits,
                }
            })
            .collect();
        let wants: Vec<Logits> = chunks.iter().map(|c| c.logits).collect();
        let result = self.backend.forward(&chunks);
        drop(chunks);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for &(i, _) in &plan {
                    self.running[i].fail(format!("inference failed: {e}"));
                }
                return;
            }
        };
        let vocab = self.backend.config().vocab;
        let mut row = 0;
        for (&(i, n), want) in plan.iter().zip(wants) {
            let s = &mut self.running[i];
            let start = s.computed;
            s.computed += n;
            let last = s.computed == s.tokens.len();
            // Blocks this pass filled can now be shared.
            let bs = self.alloc.block_size();
            while s.hashes.len() < s.computed / bs {
                let k = s.hashes.len();
                let parent = s.hashes.last().copied().unwrap_or(self.root);
                let hash =
                    self.alloc
                        .register(s.blocks[k], parent, &s.tokens[k * bs..(k + 1) * bs]);
                s.hashes.push(hash);
            }
            if want == Logits::All {
                // Row j predicts position start + j + 1: score the prompt's tokens.
                let top = s.req.prompt_logprobs.unwrap_or(0);
                for j in 0..n {
                    let next = start + j + 1;
                    if next < s.n_prompt {
                        let r = &logits[(row + j) * vocab..(row + j + 1) * vocab];
                        s.prompt_logprobs
                            .push(sampling::logprobs(r, s.tokens[next], top));
                    }
                }
                row += n;
                if s.computed >= s.n_prompt {
                    s.prompt_logprobs_sent = true;
                    let lp = std::mem::take(&mut s.prompt_logprobs);
                    let _ = s.req.events.send(Event::PromptLogprobs(lp));
                }
                if last {
                    self.sample(i, &logits[(row - 1) * vocab..row * vocab]);
                }
            } else if want == Logits::Last {
                self.sample(i, &logits[row * vocab..(row + 1) * vocab]);
                row += 1;
            }
        }
    }

    /// Samples sequence `i`'s next token from its last row of logits, among the tokens
    /// its grammar allows when it has one.
    fn sample(&mut self, i: usize, logits: &[f32]) {
        let s = &mut self.running[i];
        let (next, complete) = match s.req.constraint.as_mut() {
            None => (s.sampler.sample(logits), false),
            Some(c) => {
                self.masked.clear();
                self.masked.extend_from_slice(logits);
                let chosen = c.mask(&mut self.masked).and_then(|()| {
                    let next = s.sampler.sample(&self.masked);
                    c.advance(next).map(|complete| (next, complete))
                });
                match chosen {
                    Ok(chosen) => chosen,
                    Err(e) => {
                        s.fail(format!("structured output failed: {e}"));
                        return;
                    }
                }
            }
        };
        let lp = s
            .req
            .logprobs
            .map(|top| sampling::logprobs(logits, next, top));
        self.accept(i, next, lp, complete);
    }

    /// Appends a sampled token, streams its text, and decides whether the sequence ends.
    fn accept(&mut self, i: usize, token: u32, logprobs: Option<TokenLogprobs>, complete: bool) {
        let tok = &self.tokenizer;
        let s = &mut self.running[i];
        if s.first_token.is_none() {
            s.first_token = Some(Instant::now());
            self.shared
                .metrics
                .ttft_seconds
                .observe(s.started.elapsed().as_secs_f64());
        }
        self.shared.metrics.tokens_generated.inc();
        s.tokens.push(token);
        let max_len = self.shared.config.max_seq_len;
        let eos = tok.is_eos(token);
        if eos && !s.req.ignore_eos {
            s.finished = Some(FinishReason::Stop);
        } else {
            if let Some(lp) = logprobs {
                // Its text begins after what is held, including an incomplete character.
                s.pending_logprobs.push((s.held.len(), lp));
            }
            if !eos {
                s.partial.extend_from_slice(tok.token_bytes(token));
            }
            let valid = match std::str::from_utf8(&s.partial) {
                Ok(v) => v.len(),
                Err(e) if e.error_len().is_some() => s.partial.len(), // invalid: emit lossily
                Err(e) => e.valid_up_to(),
            };
            let text: Vec<u8> = s.partial.drain(..valid).collect();
            s.held.push_str(&String::from_utf8_lossy(&text));
            if let Some(at) = s
                .req
                .stop
                .iter()
                .filter_map(|st| s.held.find(st.as_str()))
                .min()
            {
                s.held.truncate(at);
                // Tokens of the stop string are not part of the completion.
                s.pending_logprobs.retain(|(from, _)| *from < at);
                s.finished = Some(FinishReason::Stop);
            }
        }
        if s.finished.is_none() && complete {
            // The grammar allows nothing more: the structured answer is whole.
            s.finished = Some(FinishReason::Stop);
        }
        if s.finished.is_none() && (s.generated() >= s.req.max_tokens || s.tokens.len() >= max_len)
        {
            s.finished = Some(FinishReason::Length);
        }
        // Hold back text that could still turn into a stop string.
        let keep = if s.finished.is_some() {
            0
        } else {
            s.req
                .stop
                .iter()
                .map(|st| st.len().saturating_sub(1))
                .max()
                .unwrap_or(0)
        };
        let mut cut = s.held.len().saturating_sub(keep);
        while !s.held.is_char_boundary(cut) {
            cut -= 1;
        }
        let ending = s.finished.is_some();
        if cut > 0 || (ending && !s.pending_logprobs.is_empty()) {
            let out: String = s.held.drain(..cut).collect();
            // A token goes with the text where its own text begins.
            let n = if ending {
                s.pending_logprobs.len()
            } else {
                s.pending_logprobs.partition_point(|(from, _)| *from < cut)
            };
            let logprobs = s.pending_logprobs.drain(..n).map(|(_, lp)| lp).collect();
            s.pending_logprobs
                .iter_mut()
                .for_each(|(from, _)| *from -= cut);
            if s.req
                .events
                .send(Event::Text {
                    text: out,
                    logprobs,
                })
                .is_err()
            {
                // Client disconnected: free the sequence now.
                s.finished = Some(FinishReason::Stop);
            }
        }
    }

    fn preempt(&mut self, v: usize) {
        let mut s = self.running.remove(v);
        self.alloc.release(&mut s.blocks);
        s.computed = 0;
        s.hashes.clear();
        // Recomputed from the start: a partial prompt score is scored again.
        s.prompt_logprobs.clear();
        self.shared.metrics.preemptions.inc();
        tracing::debug!(request_id = %s.req.id, "preempted for KV space; will recompute");
        let mut st = self.shared.state.lock().expect("engine state");
        st.waiting.push_front(Waiting {
            seq: s,
            preempted: true,
        });
    }

    /// Removes finished and abandoned sequences, returning their blocks; with an abort
    /// pending, every running sequence ends with its error.
    fn retire(&mut self) {
        let abort = self
            .shared
            .state
            .lock()
            .expect("engine state")
            .abort
            .clone();
        if let Some(reason) = abort {
            for mut s in self.running.drain(..) {
                self.alloc.release(&mut s.blocks);
                let _ = s.req.events.send(Event::Failed(reason.clone()));
                self.shared
                    .metrics
                    .requests
                    .get_or_create(&crate::metrics::StatusLabel { status: 503 })
                    .inc();
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let abandoned = s.req.events.is_closed();
            if s.finished.is_none() && !abandoned {
                i += 1;
                continue;
            }
            let mut s = self.running.remove(i);
            self.alloc.release(&mut s.blocks);
            let completion = s.generated();
            let status = if abandoned { 499 } else { 200 };
            if let Some(reason) = s.finished.filter(|_| !abandoned) {
                let _ = s.req.events.send(Event::Done {
                    reason,
                    prompt_tokens: s.n_prompt,
                    completion_tokens: completion,
                });
            }
            let m = &self.shared.metrics;
            m.request_seconds.observe(s.started.elapsed().as_secs_f64());
            m.requests
                .get_or_create(&crate::metrics::StatusLabel { status })
                .inc();
            tracing::debug!(request_id = %s.req.id, completion_tokens = completion, status, "sequence left the batch");
        }
        let used = self.alloc.total() - self.alloc.free();
        let m = &self.shared.metrics;
        m.kv_usage
            .set(used as f64 / self.alloc.total().max(1) as f64);
        m.prefix_cache_blocks.set(self.alloc.cached() as i64);
        let mut st = self.shared.state.lock().expect("engine state");
        st.running = self.running.len();
        self.shared.metrics.running.set(self.running.len() as i64);
    }
}

#[cfg(test)]
mod tests;
