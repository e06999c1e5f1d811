//! The worker's command line: every option documented, and bad input (missing or corrupt
//! model, a budget below the weights) refused with a message naming the problem.

mod common;

use std::process::Command;

use inference_worker::backend::cpu::quant::WeightType;

fn worker(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .args(args)
        .args(["--port", "0", "--log-format", "text"])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn help_documents_every_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--model",
        "--port",
        "--threads",
        "--device",
        "--memory-budget",
        "--queue-size",
        "--max-batch ",
        "--max-seq-len",
        "--block-size",
        "--drain-timeout-seconds",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help:\n{help}");
    }
}

#[test]
fn missing_corrupt_and_oversized_models_fail_with_the_reason() {
    let (ok, out) = worker(&["--model", "/nonexistent/model.gguf"]);
    assert!(!ok && out.contains("/nonexistent/model.gguf"), "{out}");

    let m = common::model(WeightType::Q4_1, "llama", 9);
    let corrupt = common::write_tmp("cli-corrupt.gguf", &m.bytes[..m.bytes.len() / 2]);
    let (ok, out) = worker(&["--model", corrupt.to_str().unwrap()]);
    assert!(
        !ok && out.contains("cli-corrupt.gguf") && out.contains("truncated"),
        "{out}"
    );

    let good = common::write_tmp("cli-good.gguf", &m.bytes);
    let (ok, out) = worker(&["--model", good.to_str().unwrap(), "--memory-budget", "1KiB"]);
    assert!(!ok && out.contains("less than the weights"), "{out}");
    let (ok, out) = worker(&[
        "--model",
        good.to_str().unwrap(),
        "--memory-budget",
        "12 parsecs",
    ]);
    assert!(!ok && out.contains("unknown size unit"), "{out}");
    let (ok, out) = worker(&["--model", good.to_str().unwrap(), "--device", "gpu"]);
    assert!(
        !ok && out.contains("use auto, cpu, cuda or cuda:N"),
        "{out}"
    );
}

#[test]
fn device_selection_says_what_it_chose_and_why() {
    let m = common::model(WeightType::Q4_1, "llama", 9);
    let good = common::write_tmp("cli-device.gguf", &m.bytes);
    let model = good.to_str().unwrap();
    // The budget failure stops the worker right after it has picked the device.
    let (ok, out) = worker(&["--model", model, "--memory-budget", "1KiB"]);
    assert!(!ok && out.contains("device selected"), "{out}");
    let gpu = inference_worker::device::Probe::detect();
    if gpu.driver && gpu.gpus > 0 && gpu.nvrtc {
        assert!(out.contains("cuda:0"), "{out}");
        return;
    }
    // No GPU here: auto falls back to the CPU and names what was missing; an explicit
    // CUDA device is refused with the same reason.
    assert!(out.contains("auto: "), "{out}");
    let (ok, out) = worker(&["--model", model, "--device", "cuda:0"]);
    assert!(!ok && out.contains("--device cuda:0: "), "{out}");
    assert!(
        out.contains("no CUDA driver") || out.contains("no GPU") || out.contains("NVRTC"),
        "{out}"
    );
}

/// Every setting that could only give a worker that says ready and cannot serve is
/// refused at start, naming the flag and its valid range.
#[test]
fn meaningless_settings_are_refused_naming_the_flag_and_range() {
    let m = common::model(WeightType::Q8_0, "llama", 9);
    let path = common::write_tmp("cli-settings.gguf", &m.bytes);
    let model = path.to_str().unwrap();
    for (flag, value, range) in [
        ("--max-batch", "0", "1 to 1024"),
        ("--max-batch-tokens", "0", "1 to 1048576"),
        ("--max-seq-len", "0", "2 to 1048576"),
        ("--block-size", "0", "1 to 1024"),
        ("--threads", "0", "1 to 1024"),
        ("--queue-size", "x", "0 to 1000000"),
    ] {
        let (ok, out) = worker(&["--model", model, flag, value]);
        assert!(
            !ok && out.contains(flag) && out.contains(range),
            "{flag} {value}: {out}"
        );
    }
    let (ok, out) = worker(&["--model", model, "--memory-budget", "0"]);
    assert!(
        !ok && out.contains("--memory-budget") && out.contains("no memory"),
        "{out}"
    );
    let dir = std::env::temp_dir();
    let (ok, out) = worker(&["--model", dir.to_str().unwrap()]);
    assert!(!ok && out.contains("is a directory"), "{out}");
}

/// A layer split's settings that cannot work are refused before loading.
#[test]
fn a_split_that_cannot_work_is_refused_naming_the_flag() {
    let m = common::model(WeightType::Q8_0, "llama", 9);
    let path = common::write_tmp("cli-split.gguf", &m.bytes);
    let model = path.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--device", "auto,cpu"],
            "auto cannot be part of a list",
        ),
        (
            vec!["--device", "cpu,cpu", "--memory-budget", "1GiB,1GiB,1GiB"],
            "--memory-budget: 3 sizes for 2 device(s)",
        ),
        // The synthetic model has 2 layers.
        (
            vec!["--device", "cpu,cpu,cpu"],
            "--device: cpu gets no layer of the model's 2",
        ),
        (
            vec!["--device", "cpu,cpu", "--memory-budget", "2KiB"],
            "--memory-budget on cpu (2048 bytes) is less than the weights",
        ),
    ] {
        let mut all = vec!["--model", model];
        all.extend(args.iter().copied());
        let (ok, out) = worker(&all);
        assert!(!ok && out.contains(want), "{args:?}: {out}");
    }
}

/// A block smaller than the warm-up pass (3 tokens) loads and reports ready.
#[test]
fn a_small_kv_block_still_loads() {
    use std::io::BufRead;
    let m = common::model(WeightType::Q8_0, "llama", 9);
    let path = common::write_tmp("cli-block3.gguf", &m.bytes);
    let mut child = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .args(["--model", path.to_str().unwrap(), "--block-size", "3"])
        .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "text"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.map_while(Result::ok) {
        let ready = line.contains("warmed up; ready");
        seen.push(line);
        if ready || seen.len() > 50 {
            break;
        }
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        seen.iter().any(|l| l.contains("warmed up; ready")),
        "{seen:#?}\n{err}"
    );
}
