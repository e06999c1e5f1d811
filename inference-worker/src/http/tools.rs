//! Tool calling for any model, as llama.cpp's generic chat format does it
//! (`common/chat.cpp`, `common_chat_params_init_generic`): the tools are described in a
//! system message, the answer is constrained by the grammar engine to JSON that either
//! calls tools, `{"tool_calls": [{"name": …, "arguments": {…}}]}`, or answers,
//! `{"response": "…"}`, and that JSON is read back into OpenAI's `tool_calls` or
//! `content`. Each call's `arguments` are constrained to its function's `parameters`
//! schema, so they always parse and match it. Earlier tool calls in the conversation are
//! shown to the model in the same JSON, so it sees its own format.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::tokenizer::ChatMessage;

/// One entry of `tools`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// Only "function".
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: Function,
}

/// A function the model may call.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// What it does (shown to the model).
    pub description: Option<String>,
    /// The JSON schema of its arguments (any object when absent).
    pub parameters: Option<Value>,
    /// Whether the arguments must match `parameters` exactly: they always do here.
    pub strict: Option<bool>,
}

/// What `tool_choice` asks.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// Tools are not offered: a plain answer.
    None,
    /// The model calls tools or answers.
    Auto,
    /// The model calls one or more tools.
    Required,
    /// The model calls this function.
    Named(String),
}

impl ToolChoice {
    /// `tool_choice` as sent (absent: `auto` when there are tools, as OpenAI's default).
    pub fn parse(v: Option<&Value>) -> Result<ToolChoice, String> {
        match v {
            None => Ok(ToolChoice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                other => Err(format!(
                    "tool_choice {other:?} is not none, auto, required or a function"
                )),
            },
            Some(v) => match (
                v.get("type").and_then(Value::as_str),
                v.pointer("/function/name").and_then(Value::as_str),
            ) {
                (Some("function"), Some(name)) => Ok(ToolChoice::Named(name.to_string())),
                _ => Err(
                    "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}"
                        .into(),
                ),
            },
        }
    }
}

/// How a request with tools is served: the schema its answer must match and the
/// system text that tells the model about the tools.
#[derive(Debug)]
pub struct Plan {
    /// The JSON schema of the answer.
    pub schema: Value,
    /// Describes the tools and the answer's format.
    pub system: String,
}

/// The plan for `tools` under `choice` (not `None`); `parallel` allows several calls.
pub fn plan(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Result<Plan, String> {
    if tools.is_empty() {
        return Err("tools must not be empty".into());
    }
    if let Some(t) = tools.iter().find(|t| t.kind != "function") {
        return Err(format!(
            "tool type {:?} is not supported: only \"function\"",
            t.kind
        ));
    }
    let offered: Vec<&Tool> = match choice {
        ToolChoice::Named(name) => {
            let t = tools
                .iter()
                .find(|t| &t.function.name == name)
                .ok_or_else(|| {
                    format!("tool_choice names {name:?}, which is not among the tools")
                })?;
            vec![t]
        }
        _ => tools.iter().collect(),
    };
    let calls: Vec<Value> = offered
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters.clone().unwrap_or(json!({"type": "object"})),
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let item = match calls.as_slice() {
        [one] => one.clone(),
        _ => json!({"anyOf": calls}),
    };
    let mut list = json!({"type": "array", "items": item, "minItems": 1});
    if !parallel {
        list["maxItems"] = json!(1);
    }
    let call = json!({
        "type": "object",
        "properties": {"tool_calls": list},
        "required": ["tool_calls"],
        "additionalProperties": false,
    });
    let answer = json!({
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": false,
    });
    let described: Vec<Value> = offered
        .iter()
        .map(|t| {
            json!({"name": t.function.name, "description": t.function.description,
                   "parameters": t.function.parameters})
        })
        .collect();
    let tools_json = serde_json::to_string_pretty(&described).expect("JSON serializes");
    let (schema, how) = match choice {
        ToolChoice::Auto => (
            json!({"anyOf": [call, answer]}),
            "Respond in JSON, either with `tool_calls` (a request to call tools) or with `response` (your reply to the user).",
        ),
        _ => (
            call,
            "Respond in JSON with `tool_calls`: a request to call tools.",
        ),
    };
    Ok(Plan {
        schema,
        system: format!("You can call these tools:\n{tools_json}\n{how}"),
    })
}

/// `messages` as the model is shown them: the plan's system text first (added to the
/// first system message, or as one), and earlier assistant tool calls as the JSON the
/// model answers in.
pub fn messages(mut messages: Vec<ChatMessage>, plan: &Plan) -> Vec<ChatMessage> {
    for m in &mut messages {
        let Some(calls) = m.tool_calls.as_ref().and_then(Value::as_array) else {
            continue;
        };
        if !m.content.is_empty() {
            continue;
        }
        let calls: Vec<Value> = calls
            .iter()
            .map(|c| {
                let args = c.pointer("/function/arguments");
                // OpenAI sends arguments as a JSON string; show them as JSON.
                let args = match args {
                    Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(json!(s)),
                    Some(v) => v.clone(),
                    None => json!({}),
                };
                json!({"name": c.pointer("/function/name"), "arguments": args})
            })
            .collect();
        m.content = json!({"tool_calls": calls}).to_string();
    }
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{}\n\n{}", m.content, plan.system),
        _ => messages.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content: plan.system.clone(),
                ..ChatMessage::default()
            },
        ),
    }
    messages
}

/// What a finished answer said.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Tool calls: each function's name and its arguments as a JSON string.
    Calls(Vec<(String, String)>),
    /// A reply to the user.
    Text(String),
}

/// Reads a complete constrained answer back. Only fails on text the grammar did not
/// produce (a bug): the caller reports it.
pub fn read(text: &str) -> Result<Answer, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))?;
    if let Some(calls) = v.get("tool_calls").and_then(Value::as_array) {
        return calls
            .iter()
            .map(
                |c| match (c.get("name").and_then(Value::as_str), c.get("arguments")) {
                    (Some(n), Some(a)) => Ok((n.to_string(), a.to_string())),
                    _ => Err(format!("a tool call without name or arguments: {c}")),
                },
            )
            .collect::<Result<_, _>>()
            .map(Answer::Calls);
    }
    match v.get("response").and_then(Value::as_str) {
        Some(r) => Ok(Answer::Text(r.to_string())),
        None => Err(format!("neither tool_calls nor response: {text}")),
    }
}

/// OpenAI's `tool_calls` for `calls`, ids made from `id` (the response's).
pub fn openai_calls(id: &str, choice: usize, calls: &[(String, String)]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(j, (name, args))| {
            json!({"id": format!("call_{id}_{choice}_{j}"), "type": "function",
                   "function": {"name": name, "arguments": args}})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        serde_json::from_value(json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}))
        .unwrap()
    }

    #[test]
    fn choices_parse_and_plans_constrain_what_they_should() {
        assert_eq!(ToolChoice::parse(None), Ok(ToolChoice::Auto));
        assert_eq!(
            ToolChoice::parse(Some(
                &json!({"type": "function", "function": {"name": "f"}})
            )),
            Ok(ToolChoice::Named("f".into()))
        );
        assert!(ToolChoice::parse(Some(&json!("sometimes"))).is_err());
        let tools = [weather()];
        let auto = plan(&tools, &ToolChoice::Auto, true).unwrap();
        assert_eq!(auto.schema["anyOf"].as_array().unwrap().len(), 2);
        assert!(auto.system.contains("get_weather"));
        let one = plan(&tools, &ToolChoice::Required, false).unwrap();
        assert_eq!(one.schema["properties"]["tool_calls"]["maxItems"], 1);
        assert!(plan(&tools, &ToolChoice::Named("nope".into()), true)
            .unwrap_err()
            .contains("not among the tools"));
    }

    #[test]
    fn history_calls_become_the_models_own_json_and_answers_read_back() {
        let p = plan(&[weather()], &ToolChoice::Auto, true).unwrap();
        let history: Vec<ChatMessage> = serde_json::from_value(json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c"},
        ]))
        .unwrap();
        let shown = messages(history, &p);
        assert_eq!(shown[0].role, "system");
        let shown_call: Value = serde_json::from_str(&shown[2].content).unwrap();
        assert_eq!(
            shown_call,
            json!({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
        );
        assert_eq!(
            read(r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo"}}]}"#),
            Ok(Answer::Calls(vec![(
                "get_weather".into(),
                r#"{"city":"Oslo"}"#.into()
            )]))
        );
        assert_eq!(read(r#"{"response":"hi"}"#), Ok(Answer::Text("hi".into())));
        assert!(read("{").is_err());
    }
}
