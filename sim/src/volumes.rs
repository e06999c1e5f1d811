//! PersistentVolumeClaims as the simulator serves them: kube-scheduler's VolumeBinding
//! plugin and a node-local dynamic provisioner
//! (<https://kubernetes.io/docs/concepts/storage/storage-classes/#volume-binding-mode>,
//! <https://kubernetes.io/docs/concepts/storage/persistent-volumes/>).
//!
//! - A pod whose claim does not exist is not scheduled (`persistentvolumeclaim "x" not
//!   found`); nor is one whose claim is unbound under an `Immediate` StorageClass (`pod
//!   has unbound immediate PersistentVolumeClaims`).
//! - A bound claim's PersistentVolume confines the pod to the nodes its node affinity
//!   allows (`node(s) had volume node affinity conflict`).
//! - An unbound claim under `WaitForFirstConsumer` lets the scheduler choose the node;
//!   it then marks the claim `volume.kubernetes.io/selected-node` and binds the pod only
//!   once the claim is bound. The provisioner (`PROVISIONER`) answers the mark with a
//!   PersistentVolume on that node (a host path from the StorageClass's `path`
//!   parameter, node affinity to the node) and binds the two, as the PV controller
//!   does.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

/// The provisioner name of the simulated node-local StorageClass.
pub const PROVISIONER: &str = "gpuscale.dev/sim-local-path";
/// The annotation the scheduler puts on a WaitForFirstConsumer claim.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// A pod's claim as VolumeBinding sees it.
#[derive(Clone, Debug)]
pub enum ClaimState {
    /// Bound to this volume.
    Bound(Box<PersistentVolume>),
    /// Unbound, waiting for the first consumer to pick a node.
    WaitingForConsumer(Box<PersistentVolumeClaim>),
}

/// PreFilter: the state of each claim the pod mounts, or why the pod cannot be
/// scheduled anywhere.
pub fn prefilter(
    pod: &Pod,
    claims: &[std::sync::Arc<PersistentVolumeClaim>],
    volumes: &[std::sync::Arc<PersistentVolume>],
    classes: &[std::sync::Arc<StorageClass>],
) -> Result<Vec<ClaimState>, String> {
    let ns = pod.namespace().unwrap_or_default();
    let mut out = Vec::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let Some(src) = &v.persistent_volume_claim else {
            continue;
        };
        let name = &src.claim_name;
        let Some(pvc) = claims
            .iter()
            .find(|c| c.namespace().as_deref() == Some(ns.as_str()) && c.name_any() == *name)
        else {
            return Err(format!("persistentvolumeclaim \"{name}\" not found"));
        };
        let bound_to = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
        if let Some(pv) = bound_to.and_then(|n| volumes.iter().find(|v| v.name_any() == n)) {
            out.push(ClaimState::Bound(Box::new((**pv).clone())));
            continue;
        }
        let class = pvc
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .and_then(|c| classes.iter().find(|s| s.name_any() == c));
        match class.and_then(|c| c.volume_binding_mode.as_deref()) {
            Some("WaitForFirstConsumer") => {
                out.push(ClaimState::WaitingForConsumer(Box::new((**pvc).clone())))
            }
            _ => return Err("pod has unbound immediate PersistentVolumeClaims".into()),
        }
    }
    Ok(out)
}

/// Filter: a bound volume's node affinity must allow `node`.
pub fn filter(states: &[ClaimState], node: &Node) -> Result<(), String> {
    for s in states {
        let ClaimState::Bound(pv) = s else { continue };
        let Some(required) = pv
            .spec
            .as_ref()
            .and_then(|s| s.node_affinity.as_ref())
            .and_then(|a| a.required.as_ref())
        else {
            continue;
        };
        if !crate::scheduler::matches_selector(required, node) {
            return Err("node(s) had volume node affinity conflict".into());
        }
    }
    Ok(())
}

/// PreBind: marks each waiting claim with the chosen node. Whether every claim is
/// bound, so the pod may be bound now.
pub async fn prebind(client: &Client, states: &[ClaimState], node: &str) -> bool {
    let mut all_bound = true;
    for s in states {
        let ClaimState::WaitingForConsumer(pvc) = s else {
            continue;
        };
        all_bound = false;
        if pvc.annotations().get(SELECTED_NODE).map(String::as_str) == Some(node) {
            continue;
        }
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(client.clone(), &pvc.namespace().unwrap_or_default());
        let patch = json!({"metadata": {"annotations": {SELECTED_NODE: node}}});
        if let Err(e) = api
            .patch(
                &pvc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::debug!(claim = %pvc.name_any(), error = %e, "selected-node not written");
        }
    }
    all_bound
}

/// A running provisioner; stops when dropped.
pub struct Provisioner {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Provisioner {
    /// Starts provisioning the claims of `PROVISIONER` StorageClasses on `client`'s cluster.
    pub fn start(client: Client) -> Provisioner {
        Provisioner {
            task: tokio::spawn(provision(client)),
        }
    }
}

async fn provision(client: Client) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let mut stream = watcher::watcher(claims, watcher::Config::default()).boxed();
    while let Some(ev) = stream.next().await {
        let pvc = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "provisioner watch");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Err(e) = provision_one(&client, &pvc).await {
            tracing::warn!(claim = %pvc.name_any(), error = %e, "provisioning failed");
        }
    }
}

/// Provisions and binds one claim, if it is ours, unbound and has a selected node.
async fn provision_one(client: &Client, pvc: &PersistentVolumeClaim) -> anyhow::Result<()> {
    let spec = pvc.spec.clone().unwrap_or_default();
    let (Some(node), None) = (pvc.annotations().get(SELECTED_NODE), &spec.volume_name) else {
        return Ok(());
    };
    let Some(class_name) = spec.storage_class_name.clone() else {
        return Ok(());
    };
    let class = Api::<StorageClass>::all(client.clone())
        .get(&class_name)
        .await?;
    if class.provisioner != PROVISIONER {
        return Ok(());
    }
    let path = class
        .parameters
        .as_ref()
        .and_then(|p| p.get("path"))
        .cloned()
        .unwrap_or_else(|| "/models".into());
    let ns = pvc.namespace().unwrap_or_default();
    let pv_name = format!("pvc-{}", pvc.uid().unwrap_or_default());
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map_or_else(|| "1Gi".to_string(), |q| q.0.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": storage},
            "accessModes": spec.access_modes.clone().unwrap_or_default(),
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": class_name,
            "hostPath": {"path": path, "type": "Directory"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [node]}]}]}},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns,
                         "name": pvc.name_any(), "uid": pvc.uid()},
        },
    }))?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    pvs.patch_status(
        &pv_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Bound"}})),
    )
    .await?;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    api.patch(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"volumeName": pv_name}})),
    )
    .await?;
    api.patch_status(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Bound",
            "accessModes": spec.access_modes, "capacity": {"storage": storage}}})),
    )
    .await?;
    tracing::info!(claim = %pvc.name_any(), %node, volume = %pv_name, "provisioned and bound");
    Ok(())
}

/// The host path behind a pod's claim `claim`, through its bound PersistentVolume (what
/// the kubelet mounts).
pub async fn host_path_of(client: &Client, namespace: &str, claim: &str) -> Result<String, String> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get(claim)
        .await
        .map_err(|e| format!("persistentvolumeclaim {claim}: {e}"))?;
    let volume = pvc
        .spec
        .and_then(|s| s.volume_name)
        .ok_or_else(|| format!("persistentvolumeclaim {claim} is not bound"))?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&volume)
        .await
        .map_err(|e| format!("persistentvolume {volume}: {e}"))?;
    pv.spec
        .and_then(|s| s.host_path)
        .map(|h| h.path)
        .ok_or_else(|| format!("persistentvolume {volume} is no host path volume (not simulated)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pod() -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c"}],
                     "volumes": [{"name": "m", "persistentVolumeClaim": {"claimName": "models"}}]}}))
        .unwrap()
    }

    fn pvc(class: &str, bound: Option<&str>) -> Arc<PersistentVolumeClaim> {
        Arc::new(
            serde_json::from_value(
                json!({"metadata": {"name": "models", "namespace": "default"},
                "spec": {"storageClassName": class, "volumeName": bound}}),
            )
            .unwrap(),
        )
    }

    fn class(name: &str, mode: &str) -> Arc<StorageClass> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name},
                "provisioner": PROVISIONER, "volumeBindingMode": mode}))
            .unwrap(),
        )
    }

    fn node(name: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
    }

    #[test]
    fn volume_binding_follows_the_binding_mode_and_the_volume_s_node() {
        let classes = [
            class("wffc", "WaitForFirstConsumer"),
            class("now", "Immediate"),
        ];
        let e = prefilter(&pod(), &[], &[], &classes).unwrap_err();
        assert_eq!(e, "persistentvolumeclaim \"models\" not found");
        let e = prefilter(&pod(), &[pvc("now", None)], &[], &classes).unwrap_err();
        assert_eq!(e, "pod has unbound immediate PersistentVolumeClaims");
        let waiting = prefilter(&pod(), &[pvc("wffc", None)], &[], &classes).unwrap();
        assert!(matches!(waiting[0], ClaimState::WaitingForConsumer(_)));
        assert!(filter(&waiting, &node("any")).is_ok());
        let pv: Arc<PersistentVolume> = Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "pv1"}, "spec": {
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": ["a"]}]}]}}}}))
            .unwrap(),
        );
        let bound = prefilter(&pod(), &[pvc("wffc", Some("pv1"))], &[pv], &classes).unwrap();
        assert!(filter(&bound, &node("a")).is_ok());
        assert_eq!(
            filter(&bound, &node("b")).unwrap_err(),
            "node(s) had volume node affinity conflict"
        );
    }
}
