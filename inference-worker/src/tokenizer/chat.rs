//! Chat requests rendered through the model's own Jinja chat template
//! (`tokenizer.chat_template`), with minijinja and its Python-compatibility methods, so
//! templates written for Hugging Face's transformers (`.strip()`, `raise_exception`) work.

use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// One chat message as OpenAI's clients send it. `content` may be a string, a list of
/// text parts (joined with newlines, as vLLM joins them) or null (an assistant turn that
/// only calls tools); other part types and unknown fields are refused, never dropped.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// system, developer, user, assistant or tool.
    pub role: String,
    /// The text (empty for null content: templates concatenate it).
    #[serde(default, deserialize_with = "content")]
    pub content: String,
    /// The participant's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's tool calls, handed to the template as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool message's answer to this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// One part of an array `content`.
#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

fn content<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<serde_json::Value>),
        Null(()),
    }
    use serde::de::Error;
    match Content::deserialize(d)? {
        Content::Text(t) => Ok(t),
        Content::Null(()) => Ok(String::new()),
        Content::Parts(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                let p: Part = serde_json::from_value(p).map_err(D::Error::custom)?;
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => texts.push(t),
                    ("text", None) => return Err(D::Error::custom("a text part needs `text`")),
                    (other, _) => {
                        return Err(D::Error::custom(format!(
                            "content parts of type `{other}` are not supported: this worker serves a text-only model; send `text` parts"
                        )))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

/// ChatML, for models whose file carries no template.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    /// Compiles `source` (the file's template, or ChatML when `None`).
    pub fn new(source: Option<&str>, bos: &str, eos: &str) -> Result<ChatTemplate, TokenizerError> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_string())
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// The prompt for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
