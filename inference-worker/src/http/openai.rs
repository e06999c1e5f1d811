//! OpenAI API wire types: requests as clients send them (unknown fields ignored, as
//! OpenAI's own server does), responses and stream chunks as clients parse them, and the
//! error body every 4xx/5xx carries.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::tokenizer::ChatMessage;

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Fields common to completions and chat completions.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Params {
    /// Model name; must match the served model when given.
    pub model: Option<String>,
    /// Completion tokens at most.
    pub max_tokens: Option<u64>,
    /// Newer name for max_tokens (chat).
    pub max_completion_tokens: Option<u64>,
    /// 0..=2; 0 is greedy.
    pub temperature: Option<f32>,
    /// (0, 1].
    pub top_p: Option<f32>,
    /// Choices per request; only 1 is served.
    pub n: Option<u32>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Stream options (`include_usage`).
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Seed for sampling.
    pub seed: Option<u64>,
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt (one string, or a list holding one).
    pub prompt: OneOrMany,
    /// The rest.
    #[serde(flatten)]
    pub params: Params,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// The rest.
    #[serde(flatten)]
    pub params: Params,
}

/// Token counts.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Completion tokens.
    pub completion_tokens: usize,
    /// Sum.
    pub total_tokens: usize,
}

/// Which endpoint a response is for (object names and shapes differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// /v1/completions
    Completion,
    /// /v1/chat/completions
    Chat,
}

/// Identity of one response, repeated in every chunk.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// `cmpl-...` or `chatcmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Endpoint.
    pub kind: Kind,
}

impl Envelope {
    /// The whole (non-streamed) response.
    pub fn response(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
        };
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice], "usage": usage})
    }

    /// One stream chunk: text (or the role opener for chat), or the finish.
    pub fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = match (first, text) {
                    (true, _) => json!({"role": "assistant", "content": ""}),
                    (false, Some(t)) => json!({"content": t}),
                    (false, None) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// The usage-only last chunk (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut v = self.chunk(None, None, false);
        v["choices"] = json!([]);
        v["usage"] = serde_json::to_value(usage).expect("usage serializes");
        v
    }
}

/// OpenAI's error body.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}
