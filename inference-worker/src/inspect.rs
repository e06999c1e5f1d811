//! `inference-worker inspect MODEL [--json] [--termination-log PATH]`: prints what
//! sizing a replica needs, from the model's header ([`gguf::ModelSummary`]).
//!
//! The operator runs it in a short-lived probe pod on a node that can mount the model
//! (a `file://` or `pvc://` source lives on the nodes, where the operator's own pod
//! cannot look) and reads the result from the container's termination message: the
//! kubelet copies the file at `terminationMessagePath` into the pod's status, up to
//! 4096 bytes (<https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/>),
//! so no log access is needed. A failure is written there too, as `{"error": "..."}`.

use std::path::{Path, PathBuf};

use clap::Parser;

/// Prints the header facts placement needs: architecture, parameters, layers, KV heads,
/// head size, context length, vocabulary, tensor bytes by type, tokenizer.
#[derive(Parser, Debug)]
#[command(name = "inference-worker inspect")]
pub struct InspectCli {
    /// The GGUF file.
    pub model: PathBuf,
    /// Print JSON (the operator's format) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON (or the error) to this file: a container's
    /// terminationMessagePath, usually /dev/termination-log.
    #[arg(long)]
    pub termination_log: Option<PathBuf>,
}

/// The most a termination message holds; the kubelet truncates beyond it.
const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Reads the model's summary: the whole file is mapped so that a file cut short (a
/// tensor past its end) is found here, not when a replica loads it.
pub fn summarize(model: &Path) -> anyhow::Result<gguf::ModelSummary> {
    if model.is_dir() {
        anyhow::bail!("{}: is a directory; give a GGUF file", model.display());
    }
    let file = gguf::GgufFile::open(model)?;
    Ok(file.header().summary()?)
}

/// Runs the subcommand; the process exits 0 with the summary, 1 with the error.
pub fn run(cli: &InspectCli) -> anyhow::Result<()> {
    let result = summarize(&cli.model);
    if let Some(path) = &cli.termination_log {
        let text = match &result {
            Ok(s) => serde_json::to_string(s)?,
            Err(e) => {
                // Within the limit even for a long error (a summary is a few hundred bytes).
                let error: String = format!("{e:#}")
                    .chars()
                    .take(TERMINATION_MESSAGE_LIMIT / 2)
                    .collect();
                serde_json::json!({ "error": error }).to_string()
            }
        };
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("--termination-log {}: {e}", path.display()))?;
    }
    let s = result?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("architecture    {}", s.architecture);
        println!("parameters      {}", s.parameters);
        println!(
            "layers          {} (heads {}, KV heads {}, head size {})",
            s.layers, s.heads, s.kv_heads, s.head_dim
        );
        println!("embedding       {} (MLP {})", s.embedding, s.feed_forward);
        println!("context length  {}", s.context_length);
        println!("vocabulary      {}", s.vocab);
        println!("weights         {} bytes", s.weight_bytes);
        for (ty, bytes) in &s.tensor_bytes {
            println!("  {ty:<13} {bytes} bytes");
        }
        println!(
            "tokenizer       {} (chat template: {})",
            s.tokenizer.as_deref().unwrap_or("none"),
            if s.chat_template { "yes" } else { "no" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_termination_log_holds_the_summary_or_the_error() {
        let dir = std::env::temp_dir().join(format!("inspect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("termination-log");
        let bad = dir.join("bad.gguf");
        std::fs::write(&bad, b"GGUF\x03\0\0\0").unwrap();
        let cli = InspectCli {
            model: bad.clone(),
            json: true,
            termination_log: Some(log.clone()),
        };
        let e = run(&cli).unwrap_err();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
        assert_eq!(written["error"].as_str().unwrap(), format!("{e:#}"));
        assert!(format!("{e:#}").contains("truncated GGUF"), "{e:#}");
        let dir_err = summarize(&dir).unwrap_err().to_string();
        assert!(dir_err.contains("is a directory"), "{dir_err}");
        if let Some(model) = gguf::smollm2_fixture() {
            run(&InspectCli {
                model,
                json: true,
                termination_log: Some(log.clone()),
            })
            .unwrap();
            let s: gguf::ModelSummary =
                serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
            assert_eq!((s.layers, s.kv_heads), (30, 3));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
