//! Tokenizer cost per byte on adversarial inputs (issue #23): long runs of one letter,
//! of one non-ASCII script, of spaces, of punctuation and of a control token, at 10k,
//! 40k and 160k characters, with SmolLM2's vocabulary. Linear time shows as a constant
//! cost per byte: the printed growth from 10k to 160k characters is about 16x for a
//! linear tokenizer and about 256x for a quadratic one (the rescanning merge loop before
//! this benchmark took 0.70 s, 2.8 s and 11.4 s for 10k, 20k and 40k `a`).
//!
//! `cargo bench -p gpuscale-inference-worker --bench tokenize` (needs
//! GPUSCALE_SMOLLM2_GGUF; `scripts/ensure-tools.sh` prints it).

use std::time::{Duration, Instant};

use inference_worker::tokenizer::Tokenizer;

/// The best of `runs` timings, to keep scheduling noise out.
fn best(runs: usize, f: impl Fn()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let Ok(path) = std::env::var("GPUSCALE_SMOLLM2_GGUF") else {
        eprintln!("SKIPPED: GPUSCALE_SMOLLM2_GGUF is not set (run scripts/ensure-tools.sh)");
        return;
    };
    let bytes = std::fs::read(&path).expect("the model file");
    let g = gguf::Gguf::parse(&bytes).expect("a GGUF file");
    let t = Tokenizer::from_gguf(&g).expect("its tokenizer");
    println!(
        "{:<14} {:>9} {:>12} {:>12} {:>12} {:>8}",
        "input", "chars", "10k ns/B", "40k ns/B", "160k ns/B", "growth"
    );
    for (name, unit) in [
        ("letter a", "a"),
        ("japanese", "日"),
        ("spaces", " "),
        ("dots", "."),
        ("digits", "7"),
        ("<|im_start|>", "<|im_start|>"),
        ("mixed", "ab1 .日"),
    ] {
        let mut per_byte = Vec::new();
        let mut times = Vec::new();
        for chars in [10_000usize, 40_000, 160_000] {
            let reps = chars / unit.chars().count();
            let text = unit.repeat(reps.max(1));
            let d = best(3, || {
                std::hint::black_box(t.encode(&text));
            });
            per_byte.push(d.as_nanos() as f64 / text.len() as f64);
            times.push(d);
        }
        let growth = times[2].as_secs_f64() / times[0].as_secs_f64().max(1e-9);
        println!(
            "{name:<14} {:>9} {:>12.1} {:>12.1} {:>12.1} {:>7.1}x",
            "10k-160k", per_byte[0], per_byte[1], per_byte[2], growth
        );
    }
    println!(
        "(16x growth from 10k to 160k is linear; 256x would be quadratic. Best of 3 runs each.)"
    );
}
