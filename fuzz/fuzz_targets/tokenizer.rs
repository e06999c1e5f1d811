//! SmolLM2's byte-level BPE tokenizer on arbitrary text: encoding never panics, every
//! token is in the vocabulary, and decoding gives the text back, less the bytes the
//! vocabulary has no token for (dropped, as llama.cpp drops them).
#![no_main]
use std::sync::OnceLock;

use inference_worker::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var("GPUSCALE_SMOLLM2_GGUF").expect("GPUSCALE_SMOLLM2_GGUF");
        let file = gguf::GgufFile::open(std::path::Path::new(&path)).expect("the model");
        Tokenizer::from_gguf(file.header()).expect("its tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let t = tokenizer();
    let ids = t.encode(text);
    assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
    let kept: Vec<u8> = text
        .bytes()
        .filter(|&b| t.byte_token(b).is_some())
        .collect();
    assert_eq!(t.decode(&ids), String::from_utf8_lossy(&kept));
});
