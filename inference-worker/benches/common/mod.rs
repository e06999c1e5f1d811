//! What every SmolLM2 benchmark of the worker starts from: the model named by
//! GPUSCALE_SMOLLM2_GGUF (scripts/ensure-tools.sh prints it), opened with its tokenizer,
//! and rayon's pool sized to BENCH_THREADS (default 2, this machine's cores).
#![allow(dead_code)]

use std::sync::Arc;

use inference_worker::tokenizer::Tokenizer;

pub struct Setup {
    /// The GGUF file's path (for peers that open it themselves).
    pub model: String,
    pub threads: usize,
    pub file: Arc<gguf::GgufFile>,
    pub tok: Arc<Tokenizer>,
}

pub fn setup() -> Setup {
    let model = std::env::var("GPUSCALE_SMOLLM2_GGUF")
        .expect("set GPUSCALE_SMOLLM2_GGUF (scripts/ensure-tools.sh prints it)");
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let file = Arc::new(gguf::GgufFile::open(std::path::Path::new(&model)).unwrap());
    let tok = Arc::new(Tokenizer::from_gguf(file.header()).unwrap());
    Setup {
        model,
        threads,
        file,
        tok,
    }
}
