//! Inputs the fuzzers (`scripts/fuzz.sh`) found, kept as regression tests.

use inference_worker::tokenizer::Tokenizer;

fn smollm2() -> Option<Tokenizer> {
    let path = gguf::smollm2_fixture()?;
    let file = gguf::GgufFile::open(&path).unwrap();
    Some(Tokenizer::from_gguf(file.header()).unwrap())
}

/// Found by `scripts/fuzz.sh` (tokenizer): "\x01\x04\x01" decoded as "\x01\x01".
/// SmolLM2's vocabulary has no token for byte 0x04, and a byte without a token is
/// dropped, as llama.cpp's BPE tokenizer drops it (`llm_tokenizer_bpe_session`: a
/// symbol not in the vocabulary falls back to its bytes' tokens, skipping those it
/// lacks). So the round trip holds for the bytes the vocabulary can represent.
#[test]
fn bytes_without_a_token_are_dropped_as_llama_cpp_drops_them() {
    let Some(t) = smollm2() else {
        return;
    };
    assert_eq!(t.byte_token(0x04), None);
    assert!(t.byte_token(0x01).is_some());
    let ids = t.encode("\u{1}\u{4}\u{1}");
    assert_eq!(ids, t.encode("\u{1}\u{1}"));
    assert_eq!(t.decode(&ids), "\u{1}\u{1}");
}
