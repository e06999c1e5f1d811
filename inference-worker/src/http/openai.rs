//! OpenAI API wire types: which request fields are served and which are refused (a
//! field is never accepted and ignored), requests as typed values, responses and stream
//! chunks as clients parse them, log-probabilities in both endpoints' shapes, and the
//! error body every 4xx/5xx carries.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::scheduler::sampling::TokenLogprobs;
use crate::tokenizer::{ChatMessage, Tokenizer};

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

/// Which endpoint a request or response is for (fields, object names and shapes differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// /v1/completions
    Completion,
    /// /v1/chat/completions
    Chat,
}

/// Fields both endpoints serve.
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "user",
    // vLLM's and llama.cpp's extensions, served as they define them.
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
];
const CHAT: &[&str] = &[
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_completion_tokens",
    "top_logprobs",
    "response_format",
    "store",
];
const COMPLETION: &[&str] = &["prompt", "echo", "best_of"];

/// OpenAI fields this worker knows and does not implement, with why: refused by name.
const REFUSED: &[(&str, &str)] = &[
    ("functions", "it is deprecated: send `tools`"),
    ("function_call", "it is deprecated: send `tool_choice`"),
    ("suffix", "fill-in-the-middle (suffix) is not implemented"),
    ("modalities", "this worker serves text only"),
    ("audio", "this worker serves text only"),
    ("prediction", "predicted outputs are not implemented"),
    ("reasoning_effort", "this worker serves no reasoning model"),
    ("web_search_options", "this worker has no web search"),
    ("metadata", "nothing is stored, so there is nothing to tag"),
    ("service_tier", "this worker has one service tier"),
];

/// Refuses any field that is not served: a known but unimplemented one with the
/// reason, anything else with OpenAI's own wording. Returns `(param, message)`.
pub fn check_fields(kind: Kind, body: &Map<String, Value>) -> Result<(), (String, String)> {
    let own = match kind {
        Kind::Chat => CHAT,
        Kind::Completion => COMPLETION,
    };
    for key in body.keys() {
        if COMMON.contains(&key.as_str()) || own.contains(&key.as_str()) {
            continue;
        }
        let message = match REFUSED.iter().find(|(k, _)| k == key) {
            Some((_, why)) => format!("`{key}` is not supported by this worker: {why}"),
            None => format!("Unrecognized request argument supplied: {key}"),
        };
        return Err((key.clone(), message));
    }
    Ok(())
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
    /// Choices per request.
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
    /// [-2, 2].
    pub presence_penalty: Option<f32>,
    /// [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// Keep the k most likely tokens; 0 or -1 keep all.
    pub top_k: Option<i64>,
    /// [0, 1].
    pub min_p: Option<f32>,
    /// (0, 10]; 1 is off.
    pub repetition_penalty: Option<f32>,
    /// Generate past the end-of-sequence token, to `max_tokens`.
    pub ignore_eos: Option<bool>,
    /// The end user, written to the request's log line.
    pub user: Option<String>,
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Log-probabilities of each token with this many alternatives (0..=20).
    pub logprobs: Option<u32>,
    /// The prompt is returned before the completion (with its log-probabilities when
    /// `logprobs` is set).
    #[serde(default)]
    pub echo: bool,
    /// Candidates generated; only `n` (all of them returned) is served.
    pub best_of: Option<u32>,
    /// The rest.
    #[serde(flatten)]
    pub params: Params,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Log-probabilities of each token.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token (0..=20), with `logprobs`.
    pub top_logprobs: Option<u32>,
    /// Only `{"type": "text"}` (the default) is served.
    pub response_format: Option<Value>,
    /// Only `false`: nothing is stored.
    pub store: Option<bool>,
    /// Functions the model may call.
    pub tools: Option<Vec<super::tools::Tool>>,
    /// `none`, `auto`, `required`, or a function by name.
    pub tool_choice: Option<Value>,
    /// Several calls in one answer (the default), or one.
    pub parallel_tool_calls: Option<bool>,
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

/// One finished choice of a whole (non-streamed) response.
#[derive(Clone, Debug)]
pub struct Choice {
    /// Its index.
    pub index: usize,
    /// Its text.
    pub text: String,
    /// Why it ended.
    pub finish: &'static str,
    /// Its log-probabilities in the endpoint's shape, when asked for.
    pub logprobs: Option<Value>,
    /// Its tool calls (chat), in place of text.
    pub tool_calls: Option<Value>,
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
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The whole (non-streamed) response.
    pub fn response(&self, choices: &[Choice], usage: Usage) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .map(|c| match self.kind {
                Kind::Completion => {
                    json!({"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish})
                }
                Kind::Chat => {
                    let message = match &c.tool_calls {
                        Some(calls) => {
                            json!({"role": "assistant", "content": null, "tool_calls": calls})
                        }
                        None => json!({"role": "assistant", "content": c.text}),
                    };
                    json!({"index": c.index, "message": message, "logprobs": c.logprobs, "finish_reason": c.finish})
                }
            })
            .collect();
        json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model, "choices": choices, "usage": usage})
    }

    /// One stream chunk of choice `index`: text (or the role opener for chat, when
    /// `first`), its log-probabilities, or the finish.
    pub fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        finish: Option<&str>,
        first: bool,
        logprobs: Option<Value>,
    ) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = match (first, text) {
                    (true, _) => json!({"role": "assistant", "content": ""}),
                    (false, Some(t)) => json!({"content": t}),
                    (false, None) => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// A chat stream chunk of choice `index` that carries whole tool `calls`.
    pub fn tool_calls_chunk(&self, index: usize, calls: &Value) -> Value {
        let deltas: Vec<Value> = calls
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(j, c)| {
                let mut c = c.clone();
                c["index"] = json!(j);
                c
            })
            .collect();
        let mut v = self.chunk(index, None, None, false, None);
        v["choices"][0]["delta"] = json!({"tool_calls": deltas});
        v
    }

    /// The usage-only last chunk (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut v = self.chunk(0, None, None, false, None);
        v["choices"] = json!([]);
        v["usage"] = serde_json::to_value(usage).expect("usage serializes");
        v
    }
}

/// A token's text as OpenAI shows it (bytes of an incomplete character lossily).
fn token_text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tok.token_bytes(id)).into_owned()
}

/// Chat's `logprobs` object for `tokens`: `{"content": [{token, logprob, bytes,
/// top_logprobs}], "refusal": null}`.
pub fn chat_logprobs(tok: &Tokenizer, tokens: &[TokenLogprobs]) -> Value {
    let entry = |id: u32, logprob: f32| json!({"token": token_text(tok, id), "logprob": logprob, "bytes": tok.token_bytes(id)});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' `logprobs` object: `tokens`, `token_logprobs`, `top_logprobs` (a map
/// that always holds the chosen token too, as OpenAI's does) and `text_offset`, counted
/// in characters from `offset`, which it advances. `first` is a leading token with no
/// log-probability (the prompt's first, when echoed).
pub fn completion_logprobs(
    tok: &Tokenizer,
    first: Option<u32>,
    tokens: &[TokenLogprobs],
    offset: &mut usize,
) -> Value {
    let mut out =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    let mut push = |id: u32, lp: Option<&TokenLogprobs>| {
        let text = token_text(tok, id);
        out["tokens"]
            .as_array_mut()
            .expect("array")
            .push(json!(text));
        out["text_offset"]
            .as_array_mut()
            .expect("array")
            .push(json!(*offset));
        *offset += text.chars().count();
        out["token_logprobs"]
            .as_array_mut()
            .expect("array")
            .push(json!(lp.map(|l| l.logprob)));
        let top = lp.map(|l| {
            let mut m: Map<String, Value> = l
                .top
                .iter()
                .map(|&(id, p)| (token_text(tok, id), json!(p)))
                .collect();
            m.entry(token_text(tok, l.token))
                .or_insert(json!(l.logprob));
            Value::Object(m)
        });
        out["top_logprobs"]
            .as_array_mut()
            .expect("array")
            .push(json!(top));
    };
    if let Some(id) = first {
        push(id, None);
    }
    for t in tokens {
        push(t.token, Some(t));
    }
    out
}

/// OpenAI's error body.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_served_or_refused_by_name() {
        let body = |v: Value| v.as_object().unwrap().clone();
        assert!(check_fields(
            Kind::Chat,
            &body(json!({"messages": [], "top_logprobs": 2, "top_k": 5}))
        )
        .is_ok());
        let (param, msg) =
            check_fields(Kind::Chat, &body(json!({"messages": [], "functions": []}))).unwrap_err();
        assert_eq!(param, "functions");
        assert!(msg.contains("deprecated: send `tools`"), "{msg}");
        let (param, msg) =
            check_fields(Kind::Chat, &body(json!({"messages": [], "frobnicate": 1}))).unwrap_err();
        assert_eq!(param, "frobnicate");
        assert_eq!(msg, "Unrecognized request argument supplied: frobnicate");
        // Each endpoint's own fields are refused on the other.
        assert_eq!(
            check_fields(
                Kind::Completion,
                &body(json!({"prompt": "a", "top_logprobs": 1}))
            )
            .unwrap_err()
            .0,
            "top_logprobs"
        );
        assert_eq!(
            check_fields(Kind::Chat, &body(json!({"messages": [], "echo": true})))
                .unwrap_err()
                .0,
            "echo"
        );
    }
}
