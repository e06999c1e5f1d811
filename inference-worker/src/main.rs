//! `inference-worker`: serves one model over an OpenAI-compatible HTTP API.

use clap::Parser;

/// Serves a GGUF model over an OpenAI-compatible HTTP API.
#[derive(Parser)]
#[command(name = "inference-worker", version)]
struct Cli {
    /// Path to the model file (GGUF).
    #[arg(long)]
    model: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let file = gguf::GgufFile::open(&cli.model)?;
    eprintln!(
        "inference-worker: {} ({} tensors) read; serving is not built yet (tracked by the issue \"Inference worker: serve a real model on CPU\").",
        cli.model.display(),
        file.tensors().len()
    );
    std::process::exit(2)
}
