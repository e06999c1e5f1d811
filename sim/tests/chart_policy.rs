//! The chart's ValidatingAdmissionPolicy that keeps each node agent to its own node's
//! GpuInventory (issue #24 item 2), evaluated with the CEL engine the simulator uses
//! for DRA selectors. The simulator does not run admission policies; this checks the
//! policy's expression against what the API server gives it: `object` and
//! `request.userInfo`, whose `extra` carries the node a pod-bound service account
//! token names (`authentication.kubernetes.io/node-name`, Kubernetes 1.30+).

use gpuscale_crds::validate::to_cel;
use serde_json::{json, Value};

/// The policy's validation expression, as the template writes it (a folded scalar).
fn expression() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/gpuscale/templates/rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text
        .find("  validations:\n")
        .expect("a policy with validations");
    let block = &text[start..];
    let body = block
        .split_once("- expression: >-\n")
        .expect("a folded expression")
        .1;
    body.lines()
        .take_while(|l| !l.trim_start().starts_with("messageExpression"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

fn admits(node_of_token: Option<&str>, object_name: &str) -> bool {
    let program = cel::Program::compile(&expression()).expect("the expression compiles");
    let extra = match node_of_token {
        Some(n) => json!({"authentication.kubernetes.io/node-name": [n]}),
        None => json!({}),
    };
    let request: Value = json!({"userInfo": {
        "username": "system:serviceaccount:gpuscale:gpuscale-node-agent", "extra": extra}});
    let object: Value = json!({"metadata": {"name": object_name}});
    let mut ctx = cel::Context::default();
    ctx.add_variable_from_value("request", to_cel(&request));
    ctx.add_variable_from_value("object", to_cel(&object));
    matches!(program.execute(&ctx), Ok(cel::Value::Bool(true)))
}

#[test]
fn a_node_agent_writes_only_its_own_node_s_inventory() {
    assert!(admits(Some("gpu-a"), "gpu-a"));
    assert!(!admits(Some("gpu-a"), "gpu-b"), "another node's inventory");
    assert!(!admits(None, "gpu-a"), "a token that names no node");
}
