//! The gpuscale inference worker: loads a GGUF model, batches requests continuously over
//! a paged KV cache, and serves an OpenAI-compatible HTTP API with Prometheus metrics.

pub mod backend;
pub mod budget;
pub mod device;
pub mod fetch;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod scheduler;
pub mod telemetry;
pub mod tokenizer;
