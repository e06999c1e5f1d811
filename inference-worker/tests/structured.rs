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
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "description": "a person"}}),
            "put the instructions in the messages",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}),
            "strict must be true or false",
        ),
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

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "The local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"], "additionalProperties": false}}}
    ])
}

/// Checks every tool call of a message: a known function, arguments (a JSON string)
/// that match its parameters. Returns the names called.
fn check_calls(message: &Value) -> Vec<String> {
    assert!(message["content"].is_null(), "{message}");
    let tools = weather_tools();
    let calls = message["tool_calls"].as_array().expect("tool_calls");
    assert!(!calls.is_empty());
    calls
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function");
            assert!(c["id"].as_str().unwrap().starts_with("call_"), "{c}");
            let name = c["function"]["name"].as_str().unwrap();
            let tool = tools
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["function"]["name"] == name)
                .unwrap_or_else(|| panic!("unknown function {name}"));
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            let schema = &tool["function"]["parameters"];
            assert!(
                jsonschema::is_valid(schema, &args),
                "{args} does not match {schema}"
            );
            name.to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_name_a_tool_and_match_its_parameters() {
    let Some(model) = gguf::smollm2_fixture() else {
        return;
    };
    let w = start(&model).await;
    let ask = |choice: Value, extra: Value| {
        let mut body = json!({
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": weather_tools(), "tool_choice": choice, "max_tokens": 200, "temperature": 0,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    // A named function: exactly that one, arguments matching its parameters.
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (st, b) = chat(&w.url, ask(named.clone(), json!({}))).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"][0]["finish_reason"], "tool_calls", "{b}");
    let names = check_calls(&b["choices"][0]["message"]);
    assert!(names.iter().all(|n| n == "get_weather"), "{names:?}");
    println!("named: {}", b["choices"][0]["message"]["tool_calls"]);

    // Required, one call at most: one call of either function.
    let (st, b) = chat(
        &w.url,
        ask(
            json!("required"),
            json!({"parallel_tool_calls": false, "temperature": 0.8, "seed": 5}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"][0]["finish_reason"], "tool_calls", "{b}");
    assert_eq!(check_calls(&b["choices"][0]["message"]).len(), 1);

    // Auto: tool calls or a reply, each well formed.
    let (st, b) = chat(&w.url, ask(json!("auto"), json!({}))).await;
    assert_eq!(st, 200, "{b}");
    match b["choices"][0]["finish_reason"].as_str().unwrap() {
        "tool_calls" => {
            check_calls(&b["choices"][0]["message"]);
        }
        // A reply, whole or cut by max_tokens (SmolLM2 replies at length here).
        "stop" | "length" => assert!(b["choices"][0]["message"]["content"].is_string(), "{b}"),
        other => panic!("{other}: {b}"),
    }

    // None: a plain answer, no tool calls.
    let (st, b) = chat(&w.url, ask(json!("none"), json!({"max_tokens": 8}))).await;
    assert_eq!(st, 200, "{b}");
    assert!(b["choices"][0]["message"]["tool_calls"].is_null(), "{b}");
    assert!(b["choices"][0]["message"]["content"].is_string(), "{b}");

    // Streamed: one delta carries the calls, then the finish, then [DONE].
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", w.url))
        .json(&ask(named, json!({"stream": true})))
        .send()
        .await
        .unwrap();
    let chunks: Vec<String> = r
        .text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect();
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let delta = parsed
        .iter()
        .find(|c| c["choices"][0]["delta"]["tool_calls"].is_array())
        .expect("a tool_calls delta");
    let calls = &delta["choices"][0]["delta"]["tool_calls"];
    assert_eq!(calls[0]["index"], 0);
    check_calls(&json!({"content": null, "tool_calls": calls}));
    assert_eq!(
        parsed.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // The conversation goes on with the tool's answer.
    let (st, b) = chat(
        &w.url,
        json!({"messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"celsius\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}],
            "tools": weather_tools(), "max_tokens": 60, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{b}");

    // What cannot be served is refused, naming the field.
    for (body, param, needle) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}),
            "tool_choice",
            "needs tools",
        ),
        (
            ask(
                json!({"type": "function", "function": {"name": "fly"}}),
                json!({}),
            ),
            "tools",
            "not among the tools",
        ),
        (
            ask(json!("sometimes"), json!({})),
            "tool_choice",
            "is not none, auto, required",
        ),
        (
            ask(
                json!("auto"),
                json!({"response_format": {"type": "json_object"}}),
            ),
            "response_format",
            "cannot be combined with tools",
        ),
        (
            ask(json!("auto"), json!({"logprobs": true})),
            "logprobs",
            "cannot be combined with tools",
        ),
        (
            ask(
                json!("auto"),
                json!({"tools": [{"type": "retrieval", "function": {"name": "r"}}]}),
            ),
            "tools",
            "only \"function\"",
        ),
    ] {
        let (st, b) = chat(&w.url, body.clone()).await;
        assert_eq!(st, 400, "{body}: {b}");
        assert_eq!(b["error"]["param"], param, "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(needle),
            "{b}"
        );
    }
}
