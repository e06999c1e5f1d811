//! Structured output on the real binary serving SmolLM2: every answer to a
//! `json_schema` request parses and validates against its schema (nested objects, enums,
//! arrays, patterns), streamed or not, greedy or sampled; `json_object` gives an object;
//! a schema that cannot be finished within `max_tokens` ends with `length`, never with
//! `stop`; a schema llguidance cannot compile is the client's 400.

mod common;

use common::process::start;
use serde_json::{json, Value};

async fn chat(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn person() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "role", "tags", "address"],
        "additionalProperties": false
    })
}

fn asks(content: &str, temperature: f32, schema: &Value) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 400,
        "temperature": temperature,
        "seed": 11,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_always_matches_its_schema() {
    let Some(model) = gguf::smollm2_fixture() else {
        return;
    };
    let w = start(&model).await;
    let schema = person();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for (content, temperature) in [
        ("Describe the admin of our app as JSON.", 0.0),
        ("Invent a person who lives in Paris.", 0.8),
        ("Who are you?", 1.2),
    ] {
        let (st, b) = chat(&w.url, asks(content, temperature, &schema)).await;
        assert_eq!(st, 200, "{b}");
        let choice = &b["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{b}");
        let text = choice["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(validator.is_valid(&v), "{text} does not match the schema");
        println!("T={temperature}: {text}");
    }

    // Streamed: the deltas join into a valid answer.
    let mut body = asks("Describe a guest.", 0.7, &schema);
    body["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", w.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let text: String = r
        .text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(validator.is_valid(&v), "{text}");

    // JSON mode: any object.
    let (st, b) = chat(
        &w.url,
        json!({"messages": [{"role": "user", "content": "List three colours as JSON."}],
               "max_tokens": 200, "temperature": 0, "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let text = b["choices"][0]["message"]["content"].as_str().unwrap();
    if b["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.is_object(), "{text}");
    } else {
        assert_eq!(b["choices"][0]["finish_reason"], "length", "{b}");
    }

    // Forty required digits cannot fit in 8 tokens: the answer ends with `length`.
    let long = json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[0-9]{40}$"}},
                      "required": ["code"], "additionalProperties": false});
    let mut body = asks("Give me a code.", 0.0, &long);
    body["max_tokens"] = json!(8);
    let (st, b) = chat(&w.url, body).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"][0]["finish_reason"], "length", "{b}");
    let text = b["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");

    // Schemas llguidance refuses, and malformed formats, are the client's error.
    for (format, needle) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
            "cannot be used",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
            "name is required",
        ),
        (json!({"type": "json_schema"}), "needs an object"),
        (
            json!({"type": "yaml"}),
            "must be text, json_object or json_schema",
        ),
        (
            json!({"type": "json_object", "schema": {}}),
            "unknown field response_format.schema",
        ),
    ] {
        let (st, b) = chat(
            &w.url,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "response_format": format}),
        )
        .await;
        assert_eq!(st, 400, "{format}: {b}");
        assert_eq!(b["error"]["param"], "response_format", "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(needle),
            "{b}"
        );
    }
}
