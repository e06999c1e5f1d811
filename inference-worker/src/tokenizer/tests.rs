//! Tokenizer tests on small synthetic vocabularies; the real SmolLM2 vocabulary is
//! checked against llama.cpp's own tokens in `tests/parity.rs`.

use super::*;
use gguf::Writer;

fn strs(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String((*s).into())).collect())
}

fn bpe() -> Tokenizer {
    // Byte-level single characters for "a", "b", "c", " " (Ġ), then merges.
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "a",
        "b",
        "c",
        "\u{120}",
        "ab",
        "\u{120}a",
        "\u{120}ab",
        "1",
        "2",
    ];
    let types = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let w = Writer::new(3)
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::String("smollm".into()))
        .kv("tokenizer.ggml.tokens", strs(&tokens))
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        )
        .kv(
            "tokenizer.ggml.merges",
            strs(&["a b", "\u{120} a", "\u{120}a b"]),
        )
        .kv("tokenizer.ggml.eos_token_id", Value::U32(0));
    Tokenizer::from_gguf(&Gguf::parse(&w.bytes()).unwrap()).unwrap()
}

#[test]
fn bpe_merges_by_rank_and_round_trips() {
    let t = bpe();
    // " ab" -> Ġab (merge chain), "abc" -> ab c
    assert_eq!(t.encode(" ab"), vec![8]);
    assert_eq!(t.encode("abc"), vec![6, 4]);
    assert_eq!(t.decode(&t.encode("abc ab")), "abc ab");
}

#[test]
fn bpe_splits_digits_and_special_tokens_first() {
    let t = bpe();
    // "12" is two digit pieces under the smollm pre-tokenizer; <|im_start|> is one token.
    assert_eq!(t.encode("12"), vec![9, 10]);
    assert_eq!(t.encode("<|im_start|>ab"), vec![1, 6]);
    // Control tokens decode to nothing.
    assert_eq!(t.decode(&[1, 6]), "ab");
    assert!(t.is_eos(0));
}

/// A SentencePiece vocabulary: byte tokens, `▁`, `h`, `i` and merges scored so that
/// `hi` merges before `▁h`.
fn spm() -> Tokenizer {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for t in ["\u{2581}", "h", "i", "\u{2581}h", "\u{2581}hi", "hi"] {
        tokens.push(t.into());
        types.push(1);
    }
    let n = tokens.len();
    let mut scores = vec![0f32; n];
    scores[n - 3] = -1.0; // ▁h
    scores[n - 2] = -0.5; // ▁hi
    scores[n - 1] = -0.1; // hi: merges first, then ▁ + hi -> ▁hi
    let w = Writer::new(3)
        .kv("tokenizer.ggml.model", Value::String("llama".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|s| Value::String(s.clone())).collect()),
        )
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        )
        .kv(
            "tokenizer.ggml.scores",
            Value::Array(scores.iter().map(|s| Value::F32(*s)).collect()),
        )
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2));
    Tokenizer::from_gguf(&Gguf::parse(&w.bytes()).unwrap()).unwrap()
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let t = spm();
    let space = t.ids["\u{2581}"];
    // BOS added; "hi" merges first (highest score), then "▁" + "hi"; never "▁h" + "i".
    assert_eq!(t.encode("hi"), vec![1, t.ids["\u{2581}hi"]]);
    assert_eq!(t.encode("ih"), vec![1, space, t.ids["i"], t.ids["h"]]);
    // "é" is not in the vocabulary: its UTF-8 bytes are used.
    let e = t.encode("é");
    assert_eq!(e, vec![1, space, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(t.decode(&e), "é");
    assert_eq!(t.decode(&t.encode("hi hi")), "hi hi");
}

#[test]
fn unsupported_models_and_bad_merges_are_named() {
    let w = Writer::new(3).kv("tokenizer.ggml.model", Value::String("rwkv".into()));
    let e = Tokenizer::from_gguf(&Gguf::parse(&w.bytes()).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("\"rwkv\" is not supported"), "{e}");
    let w = Writer::new(3)
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", strs(&["a"]))
        .kv("tokenizer.ggml.merges", strs(&["ab"]));
    let e = Tokenizer::from_gguf(&Gguf::parse(&w.bytes()).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("merge \"ab\" has no space"), "{e}");
    let w = Writer::new(3).kv("tokenizer.ggml.model", Value::String("gpt2".into()));
    let e = Tokenizer::from_gguf(&Gguf::parse(&w.bytes()).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
}

#[test]
fn chat_template_renders_with_python_methods_and_errors() {
    let src = "{% for m in messages %}{{ m.role | upper }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";
    let t = ChatTemplate::new(Some(src), "<s>", "</s>").unwrap();
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "  hi  ".into(),
        ..ChatMessage::default()
    }];
    assert_eq!(t.render(&msgs).unwrap(), "USER: hi\nASSISTANT:");
    let raising = ChatTemplate::new(
        Some("{{ raise_exception('roles must alternate') }}"),
        "",
        "",
    )
    .unwrap();
    assert!(raising
        .render(&msgs)
        .unwrap_err()
        .to_string()
        .contains("roles must alternate"));
    assert!(ChatTemplate::new(Some("{% for %}"), "", "").is_err());
}

/// The merge loop as it was written first: rescan every pair after each merge, O(n²).
/// The reference `merge_pairs` must agree with.
fn merge_by_rescanning<S: Clone, P: Ord>(
    mut syms: Vec<S>,
    merge: impl Fn(&S, &S) -> Option<(P, S)>,
) -> Vec<S> {
    loop {
        let best = syms
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| merge(&w[0], &w[1]).map(|(p, m)| (p, std::cmp::Reverse(i), m)))
            .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let Some((_, std::cmp::Reverse(i), merged)) = best else {
            return syms;
        };
        syms[i] = merged;
        syms.remove(i + 1);
    }
}

proptest::proptest! {
    /// The heap-based merge gives exactly what rescanning gives, on random merge tables
    /// over a small alphabet (so ties, chains and long runs of one symbol are common).
    #[test]
    fn merging_with_a_heap_equals_rescanning(
        input in proptest::collection::vec(0u8..4, 0..200),
        table in proptest::collection::btree_map((0u8..4, 0u8..4), (0u8..6, 0u8..4), 0..16),
    ) {
        // Symbols are strings; a pair merges when its first characters are in the table.
        let syms: Vec<String> = input.iter().map(|b| ((b'a' + b) as char).to_string()).collect();
        let merge = |a: &String, b: &String| {
            let key = (a.as_bytes()[0] - b'a', b.as_bytes()[0] - b'a');
            let (priority, _) = table.get(&key)?;
            Some((*priority, format!("{a}{b}")))
        };
        proptest::prop_assert_eq!(merge_pairs(syms.clone(), merge), merge_by_rescanning(syms, merge));
    }

    /// Splitting around special tokens finds the earliest, then longest, token anywhere
    /// in the text, as the first search loop did.
    #[test]
    fn special_tokens_split_leftmost_longest(parts in proptest::collection::vec(0usize..4, 0..40)) {
        let t = bpe();
        let words = ["<|im_start|>", "ab", "<|endoftext|>", "<|im_"];
        let text: String = parts.iter().map(|&i| words[i]).collect();
        let ids: Vec<u32> = t.split_special(&text).into_iter().filter_map(|(_, id)| id).collect();
        let expected: Vec<u32> = parts
            .iter()
            .filter_map(|&i| match i { 0 => Some(1), 2 => Some(0), _ => None })
            .collect();
        proptest::prop_assert_eq!(ids, expected);
    }
}

#[test]
fn adversarial_runs_tokenize_as_their_pieces() {
    // Long runs of one mergeable character, of a character with no token (byte
    // fallback) and of a control token: the merges still reach the longest tokens.
    let t = bpe();
    let ids = t.encode(&"ab".repeat(5000));
    assert_eq!(ids.len(), 5000);
    assert!(ids.iter().all(|&i| i == 6));
    let ids = t.encode(&"<|im_start|>".repeat(3000));
    assert_eq!(ids, vec![1; 3000]);
    let s = spm();
    let text = "日".repeat(2000);
    assert_eq!(s.decode(&s.encode(&text)), text);
    let ids = s.encode(&"hi".repeat(3000));
    assert_eq!(ids.len(), 1 + 3000, "BOS, then ▁hi and hi: {:?}", &ids[..4]);
}

#[test]
fn chat_messages_take_every_content_shape_openai_sends_and_refuse_the_rest() {
    let parse = |v: serde_json::Value| serde_json::from_value::<ChatMessage>(v);
    let parts = parse(serde_json::json!({"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}))
    .unwrap();
    assert_eq!(parts.content, "one\ntwo");
    let call = parse(serde_json::json!({"role": "assistant", "content": null,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}))
    .unwrap();
    assert_eq!(call.content, "");
    assert!(call.tool_calls.is_some());
    let tool =
        parse(serde_json::json!({"role": "tool", "content": "42", "tool_call_id": "c1"})).unwrap();
    assert_eq!(tool.tool_call_id.as_deref(), Some("c1"));
    let image = parse(serde_json::json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}))
    .unwrap_err()
    .to_string();
    assert!(image.contains("`image_url` are not supported"), "{image}");
    let unknown = parse(serde_json::json!({"role": "user", "content": "x", "mood": "happy"}))
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("unknown field `mood`"), "{unknown}");
    // The template sees tool messages with their call id.
    let t = ChatTemplate::new(
        Some(
            "{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.tool_call_id }};{% endfor %}",
        ),
        "",
        "",
    )
    .unwrap();
    assert_eq!(t.render(&[tool]).unwrap(), "tool:42:c1;");
}
