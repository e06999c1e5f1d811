//! Flags with a meaningless value are refused before anything starts, naming the flag
//! and the range it takes.

use std::process::Command;

#[test]
fn no_passes_at_once_is_refused_naming_the_flag_and_its_range() {
    for value in ["0", "4097", "many"] {
        let out = Command::new(env!("CARGO_BIN_EXE_gpuscale-operator"))
            .args(["run", "--concurrent-passes", value])
            // Nothing must be reached: the refusal comes before any client is made.
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
        assert!(
            stderr.contains("--concurrent-passes"),
            "{value}: the message names the flag: {stderr}"
        );
        if value == "0" {
            assert!(stderr.contains("1..=4096"), "the range is said: {stderr}");
        }
    }
}
