//! The operator binary stops on SIGTERM within its grace even when its API server is
//! gone (it used to need a second SIGTERM): a pod being deleted must stop in time.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigterm_stops_the_operator_even_with_the_api_server_gone() {
    let dir = std::env::temp_dir().join(format!("gpuscale-stop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // An API server address where nothing listens.
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {server: 'http://127.0.0.1:9'}\n\
         contexts:\n- name: gone\n  context: {cluster: gone, user: nobody}\ncurrent-context: gone\n\
         users:\n- name: nobody\n  user: {}\n",
    )
    .unwrap();
    for leader_election in ["true", "false"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpuscale-operator"))
            .args(["run", "--metrics-addr", "127.0.0.1:0"])
            .args(["--leader-election", leader_election])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it start and begin failing against the missing API server.
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            child.try_wait().unwrap().is_none(),
            "it should still be running"
        );
        let sent = Instant::now();
        assert!(Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let deadline = sent + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("leader election {leader_election}: still running 15 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "leader election {leader_election}: {status}"
        );
        eprintln!(
            "leader election {leader_election}: stopped {:?} after SIGTERM",
            sent.elapsed()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
