//! GGUF reader tests: synthetic files written here byte by byte as llama.cpp lays them
//! out, the real SmolLM2 file, and corrupt input that must error, never panic.

use gpuscale_gguf::{Error, GgmlType, Gguf, GgufFile, Value};
use proptest::prelude::*;

/// Synthetic files through the crate's own writer, with filler tensor data.
struct Writer(gpuscale_gguf::Writer);

impl Writer {
    fn new(version: u32) -> Self {
        Writer(gpuscale_gguf::Writer::new(version))
    }
    fn kv_u32(self, k: &str, v: u32) -> Self {
        Writer(self.0.kv(k, Value::U32(v)))
    }
    fn kv_str(self, k: &str, v: &str) -> Self {
        Writer(self.0.kv(k, Value::String(v.into())))
    }
    fn kv_str_array(self, k: &str, items: &[&str]) -> Self {
        let items = items.iter().map(|s| Value::String((*s).into())).collect();
        Writer(self.0.kv(k, Value::Array(items)))
    }
    fn alignment(self, a: u32) -> Self {
        self.kv_u32("general.alignment", a)
    }
    fn tensor(self, name: &str, dims: &[u64], t: GgmlType) -> Self {
        let n: u64 = dims.iter().product();
        let data = (0..t.row_bytes(n)).map(|i| (i * 7 % 251) as u8).collect();
        Writer(self.0.tensor(name, dims, t, data))
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.bytes()
    }
}

fn llama_like() -> Writer {
    Writer::new(3)
        .kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 2)
        .kv_u32("llama.embedding_length", 64)
        .kv_u32("llama.attention.head_count", 4)
        .kv_u32("llama.attention.head_count_kv", 2)
        .kv_u32("llama.context_length", 256)
        .kv_u32("llama.feed_forward_length", 128)
        .kv_str_array("tokenizer.ggml.tokens", &["<s>", "a", "b"])
        .tensor("token_embd.weight", &[64, 3], GgmlType::F16)
        .tensor("blk.0.attn_q.weight", &[64, 64], GgmlType::Q4_0)
        .tensor("blk.0.attn_k.weight", &[64, 32], GgmlType::Q4_1)
        .tensor("blk.0.ffn_up.weight", &[64, 128], GgmlType::Q8_0)
        .tensor("output_norm.weight", &[64], GgmlType::F32)
}

fn write_tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gpuscale-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn parses_metadata_tensors_and_shape_of_a_synthetic_file() {
    for version in [2, 3] {
        let mut w = llama_like();
        w.0.version = version;
        let g = Gguf::parse(&w.bytes()).unwrap();
        assert_eq!(g.version(), version);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(
            g.get("tokenizer.ggml.tokens")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(g.tensors().len(), 5);
        let k = g.tensor("blk.0.attn_k.weight").unwrap();
        assert_eq!(k.ggml_type, GgmlType::Q4_1);
        assert_eq!(k.n_bytes(), 64 * 32 / 32 * 20);
        let shape = g.shape().unwrap();
        assert_eq!(
            (
                shape.n_layers,
                shape.n_heads,
                shape.n_kv_heads,
                shape.head_dim
            ),
            (2, 4, 2, 16)
        );
    }
}

#[test]
fn memory_maps_tensor_data_at_the_declared_offsets() {
    let w = llama_like().alignment(64);
    let path = write_tmp("aligned.gguf", &w.bytes());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.header().alignment(), 64);
    assert_eq!(f.header().data_offset() % 64, 0);
    for t in f.tensors() {
        // The filler the test writer puts in every tensor, found at the declared offset.
        let expected: Vec<u8> = (0..t.n_bytes()).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(f.data(t), &expected[..], "{}", t.name);
    }
}

#[test]
fn rejects_bad_magic_versions_and_types_with_clear_errors() {
    let mut b = llama_like().bytes();
    b[0] = b'X';
    assert!(matches!(Gguf::parse(&b), Err(Error::BadMagic(_))));

    let mut w = llama_like();
    w.0.version = 1;
    let e = Gguf::parse(&w.bytes()).unwrap_err();
    assert!(e.to_string().contains("unsupported GGUF version 1"), "{e}");

    let mut b = llama_like().bytes();
    b[4..8].copy_from_slice(&3u32.to_be_bytes()); // a big-endian file's version
    assert!(Gguf::parse(&b)
        .unwrap_err()
        .to_string()
        .contains("big-endian"));

    let b = Writer::new(3).tensor("x", &[32], GgmlType::F32).bytes();
    let mut bad = b.clone();
    // The type id sits right before the 8-byte offset at the end of the tensor entry.
    let ty_at = 24 + 8 + 1 + 4 + 8;
    bad[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = Gguf::parse(&bad).unwrap_err();
    assert!(e.to_string().contains("unknown ggml type id 99"), "{e}");
}

#[test]
fn rejects_misaligned_overlapping_and_out_of_file_tensors() {
    let b = Writer::new(3)
        .tensor("a", &[32], GgmlType::F32)
        .tensor("b", &[32], GgmlType::F32)
        .bytes();
    // Second tensor's offset field: move it to 8 (misaligned) then to 0 (overlap).
    let entry = |name_len: usize| 8 + name_len + 4 + 8 + 4 + 8;
    let off_at = 24 + entry(1) + entry(1) - 8;
    let mut bad = b.clone();
    bad[off_at..off_at + 8].copy_from_slice(&8u64.to_le_bytes());
    assert!(Gguf::parse(&bad)
        .unwrap_err()
        .to_string()
        .contains("not aligned"));
    bad[off_at..off_at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert!(Gguf::parse(&bad)
        .unwrap_err()
        .to_string()
        .contains("overlap"));

    let path = write_tmp("short.gguf", &b[..b.len() - 10]);
    let e = GgufFile::open(&path).err().expect("truncated data refused");
    assert!(e.to_string().contains("tensor \"b\" data"), "{e}");

    let e = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");
}

/// Found by `scripts/fuzz.sh` (gguf_header, dev build): a tensor whose dimensions fit
/// a u64 but whose bytes do not overflowed `row_bytes` (a panic with overflow checks, a
/// wrapped size without them).
#[test]
fn a_tensor_whose_bytes_overflow_is_refused() {
    let b = Writer::new(3).tensor("a", &[32], GgmlType::F32).bytes();
    // The tensor's first dimension: 8 (magic, version) + 16 (counts) + 8 + 1 (name) + 4.
    let dim_at = 24 + 8 + 1 + 4;
    assert_eq!(b[dim_at..dim_at + 8], 32u64.to_le_bytes());
    for dim in [1u64 << 62, 1 << 59, u64::MAX / 4 + 1] {
        let mut bad = b.clone();
        bad[dim_at..dim_at + 8].copy_from_slice(&dim.to_le_bytes());
        let e = Gguf::parse(&bad).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        assert!(e.to_string().contains("ends past any file"), "{e}");
    }
    assert!(Gguf::parse(&b).is_ok());
}

#[test]
fn every_truncation_of_the_header_is_an_error() {
    let b = llama_like().bytes();
    let header_len = Gguf::parse(&b).unwrap().data_offset() as usize;
    for cut in 0..header_len - 31 {
        match Gguf::parse(&b[..cut]) {
            Err(Error::Truncated { .. }) => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]
    /// Corrupting any byte of the header gives Ok or an error, never a panic or a
    /// runaway allocation.
    #[test]
    fn corrupt_headers_never_panic(pos in 0usize..400, byte in any::<u8>()) {
        let mut b = llama_like().bytes();
        let p = pos % b.len();
        b[p] = byte;
        let _ = Gguf::parse(&b);
    }
}

/// The real SmolLM2-135M-Instruct Q4_1 file (fetched by scripts/ensure-tools.sh).
/// Runs whenever the file is there; CI always fetches it, so it cannot silently skip.
#[test]
fn reads_the_real_smollm2_file() {
    let Some(path) = gpuscale_gguf::smollm2_fixture() else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let g = f.header();
    assert_eq!(g.version(), 3);
    let shape = g.shape().unwrap();
    assert_eq!(shape.architecture, "llama");
    assert_eq!(
        (
            shape.n_layers,
            shape.embedding,
            shape.n_heads,
            shape.n_kv_heads,
            shape.head_dim,
            shape.feed_forward
        ),
        (30, 576, 9, 3, 64, 1536)
    );
    assert_eq!(
        g.get("tokenizer.ggml.model").and_then(Value::as_str),
        Some("gpt2")
    );
    assert_eq!(
        g.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        49152
    );
    assert_eq!(g.tensors().len(), 272);
    assert!(g.tensors().iter().any(|t| t.ggml_type == GgmlType::Q4_1));
    // 134.5M parameters as published for SmolLM2-135M (tied embeddings).
    assert!(
        (134_000_000..135_000_000).contains(&g.parameter_count()),
        "{}",
        g.parameter_count()
    );
}
