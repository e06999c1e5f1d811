//! SmolLM2's chat template (minijinja) rendering arbitrary messages: it renders or
//! refuses, never panics, and a rendered prompt holds every message's content.
#![no_main]
use std::sync::OnceLock;

use inference_worker::tokenizer::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var("GPUSCALE_SMOLLM2_GGUF").expect("GPUSCALE_SMOLLM2_GGUF");
        let file = gguf::GgufFile::open(std::path::Path::new(&path)).expect("the model");
        let source = file
            .header()
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        ChatTemplate::new(source.as_deref(), "", "<|im_end|>").expect("the template")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(messages) = serde_json::from_slice::<Vec<ChatMessage>>(data) else {
        return;
    };
    if let Ok(prompt) = template().render(&messages) {
        for m in &messages {
            assert!(prompt.contains(&m.content), "{m:?} missing from {prompt:?}");
        }
    }
});
