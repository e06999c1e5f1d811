//! `gpuscale-operator plan` as a user runs it: a trace file and a deployment in, the
//! capacity answer and each rule's frontier out; a trace that does not parse is refused
//! with the line that is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpuscale_operator::replay::synthetic::Bursty;

/// Two minutes of the bursty process as a `time_s` CSV, in a fresh directory.
fn trace_file(name: &str, rows: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpuscale-plan-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut csv = String::from("time_s,prompt_tokens,generated_tokens\n");
    match rows {
        Some(rows) => csv.push_str(rows),
        None => {
            let trace = Bursty {
                duration: 120.0,
                ..Bursty::default()
            }
            .trace();
            for r in &trace.requests {
                csv.push_str(&format!(
                    "{},{},{}\n",
                    r.at, r.prompt_tokens, r.generated_tokens
                ));
            }
        }
    }
    let path = dir.join("trace.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

fn plan(trace: &Path, extra: &[&str]) -> Output {
    let deployment = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/smollm.yaml");
    Command::new(env!("CARGO_BIN_EXE_gpuscale-operator"))
        .arg("plan")
        .arg("--trace")
        .arg(trace)
        .arg("--deployment")
        .arg(deployment)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn plan_prints_the_capacity_answer_and_each_rules_frontier_on_the_users_trace() {
    let trace = trace_file("sweep", None);
    let out = plan(&trace, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "To serve 99% of requests within the SLO",
        "Swept 3750 settings",
        "within the spec's bounds 1..4 replicas",
        "gpuscale frontier (3060 settings, each the mean of 5 sync phases):",
        "HPA-style frontier (180 settings",
        "KEDA-style frontier (510 settings",
        // examples/smollm.yaml: targetQueueDepth 4, warmReplicas 1, the default windows.
        "The spec's setting (targetQueueDepth 4, warmReplicas 1, scaleDownWindowSeconds 300, scaleUpWindowSeconds 0)",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    assert!(
        stdout.contains("does better on this trace") || stdout.contains("no setting of the grid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("The cheapest setting of the grid that meets the objective")
            || stdout.contains("No setting of the grid meets the objective"),
        "{stdout}"
    );

    // --no-frontier: the capacity answer alone.
    let out = plan(&trace, &["--no-frontier"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("To serve 99% of requests within the SLO"),
        "{stdout}"
    );
    assert!(!stdout.contains("frontier ("), "{stdout}");
    std::fs::remove_dir_all(trace.parent().unwrap()).unwrap();
}

#[test]
fn a_trace_row_that_does_not_parse_is_refused_with_its_line() {
    let trace = trace_file("bad", Some("0.5,100,10\n1.0,many,3\n"));
    let out = plan(&trace, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("line 3"), "the line is named: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing is planned: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_dir_all(trace.parent().unwrap()).unwrap();
}
