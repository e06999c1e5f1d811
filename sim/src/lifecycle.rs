//! The part of the kube-controller-manager's node lifecycle controller the simulator
//! plays when a node is cut off or comes back (`SimCluster::partition_node`,
//! `heal_node`), as <https://kubernetes.io/docs/concepts/architecture/nodes/#condition>
//! and <https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/#taint-based-evictions>
//! describe it.

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// The taint key the controller puts on a node whose kubelet stopped posting status.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// Sets the node's Ready condition (the only condition the simulated kubelet posts).
async fn set_ready(
    nodes: &Api<Node>,
    name: &str,
    status: &str,
    reason: &str,
    message: &str,
) -> kube::Result<()> {
    let now = super::now_rfc3339();
    let ready = json!({"type": "Ready", "status": status, "reason": reason, "message": message,
                       "lastHeartbeatTime": now, "lastTransitionTime": now});
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [ready]}})),
        )
        .await?;
    Ok(())
}

/// Replaces the node's unreachable taints with `add`, keeping the others.
async fn set_taints(nodes: &Api<Node>, name: &str, add: &[Taint]) -> kube::Result<()> {
    let node = nodes.get(name).await?;
    let mut taints: Vec<Taint> = node
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != UNREACHABLE)
        .collect();
    taints.extend_from_slice(add);
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": taints}})),
        )
        .await?;
    Ok(())
}

/// The node's Ready condition becomes `Unknown`, the unreachable taints go on, and
/// every pod bound to it is marked not Ready (the controller's `MarkPodsNotReady`).
pub async fn mark_unreachable(client: &Client, name: &str) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    set_ready(
        &nodes,
        name,
        "Unknown",
        "NodeStatusUnknown",
        "Kubelet stopped posting node status.",
    )
    .await?;
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    let taint = |effect: &str| Taint {
        key: UNREACHABLE.into(),
        effect: effect.into(),
        time_added: (effect == "NoExecute").then(|| now.clone()),
        value: None,
    };
    set_taints(&nodes, name, &[taint("NoSchedule"), taint("NoExecute")]).await?;
    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
        .await?;
    for p in on_node.items {
        let api: Api<Pod> = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
        api.patch_status(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "NodeNotReady",
                 "lastTransitionTime": super::now_rfc3339()}]}})),
        )
        .await?;
    }
    Ok(())
}

/// The node's kubelet posts Ready again and the controller lifts the unreachable
/// taints.
pub async fn mark_reachable(client: &Client, name: &str) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    set_ready(
        &nodes,
        name,
        "True",
        "KubeletReady",
        "simulated kubelet is posting ready status",
    )
    .await?;
    set_taints(&nodes, name, &[]).await
}
