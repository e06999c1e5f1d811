//! How replicas get their GPUs, end to end on the simulator: DRA claims, the device
//! plugin (whole GPUs and time-sliced shares), GFD-only nodes, under 200 random scale
//! events, with what the simulated kubelets hand out as the truth. See e2e/README.md.

use std::collections::HashMap;
use std::time::Duration;

use gpuscale_e2e::{merge, smollm, Env};
use gpuscale_operator::reconcile::{is_ready, placement_of, unschedulable};
use gpuscale_sim::nodes::{SimBinding, SimNode};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

/// A deployment of the SmolLM2 example named `name`, `replicas` fixed, with `extra`
/// merged into its spec.
fn deployment(name: &str, replicas: u32, extra: Value) -> Value {
    let mut d = smollm(json!({"metadata": {"name": name}, "spec": {
        "replicas": replicas,
        "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 4},
        "resources": {"allowCpu": false},
    }}));
    merge(&mut d["spec"], extra);
    d
}

/// What the kubelets handed out (device plugin and DRA), by pod: the truth.
fn truth(env: &mut Env) -> HashMap<String, Vec<String>> {
    let mut t: HashMap<String, Vec<String>> = env
        .sim()
        .expect("simulated")
        .kubelets()
        .iter()
        .flat_map(|k| k.assignments())
        .collect();
    for v in t.values_mut() {
        v.sort();
    }
    t
}

async fn all_pods(env: &Env) -> Vec<Pod> {
    Api::<Pod>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=gpuscale"))
        .await
        .expect("pods list")
        .items
}

/// Invariants that hold at every instant: no whole GPU is held by two pods, and (DRA)
/// every pod holds exactly the GPUs its placement names, on one NVLink island when
/// `island` says which node is the NVLink one.
fn check_now(pods: &[Pod], truth: &HashMap<String, Vec<String>>, exact: bool) {
    let mut holders: HashMap<&str, Vec<(String, bool)>> = HashMap::new();
    for pod in pods {
        let Some(p) = placement_of(pod) else { continue };
        let Some(held) = truth.get(&pod.name_any()) else {
            continue;
        };
        for g in held {
            holders
                .entry(g)
                .or_default()
                .push((pod.name_any(), p.exclusive));
        }
        if exact && p.dra {
            let mut chose = p.uuids.clone();
            chose.sort();
            assert_eq!(
                &chose,
                held,
                "{} holds other GPUs than its claim named",
                pod.name_any()
            );
        }
    }
    for (g, hs) in holders {
        if hs.iter().any(|(_, exclusive)| *exclusive) {
            assert_eq!(hs.len(), 1, "GPU {g} held by {hs:?}");
        }
    }
}

/// Waits until every replica is ready or refused by placement, then until each
/// deployment's status lists for every pod the GPUs the kubelet gave it.
async fn settle_and_compare(env: &mut Env, names: &[&str]) {
    let timeout = Duration::from_secs(180);
    let settled = env
        .wait("replicas to settle", timeout, || async {
            let pods = all_pods(env).await;
            let each_ready = pods.iter().all(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && (is_ready(p) || unschedulable(p).is_some())
            });
            for name in names {
                let d = env.deployment(name).await.ok()?;
                let have = pods
                    .iter()
                    .filter(|p| {
                        p.labels().get("gpuscale.dev/deployment") == Some(&name.to_string())
                    })
                    .count();
                let refused =
                    gpuscale_e2e::condition(&d, "Unschedulable").is_some_and(|c| c.0 == "True");
                let listed = d.status.as_ref().map_or(0, |s| s.placements.len());
                let full = have == d.spec.replicas.unwrap_or(0) as usize || refused;
                if !(full && listed == have && have > 0) {
                    return None;
                }
            }
            each_ready.then_some(())
        })
        .await;
    if let Err(e) = settled {
        let states: Vec<String> = all_pods(env)
            .await
            .iter()
            .map(|p| {
                let st = p.status.clone().unwrap_or_default();
                format!(
                    "{} {:?} ready={} node={:?} {:?}",
                    p.name_any(),
                    st.phase,
                    is_ready(p),
                    p.spec.as_ref().and_then(|s| s.node_name.clone()),
                    unschedulable(p).or(st.message)
                )
            })
            .collect();
        panic!("{e}: {states:#?}");
    }
    let mut last = String::new();
    for _ in 0..80 {
        let t = truth(env);
        let mut wrong = Vec::new();
        for name in names {
            let d = env.deployment(name).await.unwrap();
            for p in d.status.map(|s| s.placements).unwrap_or_default() {
                let mut listed = p.gpus.clone();
                listed.sort();
                // A CPU replica holds nothing, and the kubelet lists nothing for it.
                if t.get(&p.pod).cloned().unwrap_or_default() != listed {
                    wrong.push(format!(
                        "{}: status {listed:?}, kubelet {:?}",
                        p.pod,
                        t.get(&p.pod)
                    ));
                }
            }
        }
        if wrong.is_empty() {
            return;
        }
        last = wrong.join("; ");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("status never matched the kubelets: {last}");
}

/// 200 random replica counts (1 to 3) across `names`, checking `check_now` after each and the
/// status against the kubelets at events 100 and 200.
async fn churn(env: &mut Env, names: &[&str], exact: bool) {
    let api: Api<gpuscale_crds::InferenceDeployment> =
        Api::namespaced(env.client.clone(), &env.namespace);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for event in 1..=200 {
        let name = names[(next() % names.len() as u64) as usize];
        let replicas = 1 + next() % 3;
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pods = all_pods(env).await;
        check_now(&pods, &truth(env), exact);
        if event % 100 == 0 {
            settle_and_compare(env, names).await;
        }
    }
}

/// (a) A DRA cluster: every replica's claim names its GPUs, the scheduler allocates
/// exactly those, two-GPU replicas stay on the NVLink node, no GPU is held twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_replicas_hold_exactly_their_claimed_gpus_through_200_scale_events() {
    let nodes = vec![
        SimNode::new("dra-a100", 4, "NVIDIA A100-SXM4-80GB", 80, true)
            .bound(SimBinding::Dra { shareable: false }),
        SimNode::new("dra-l4", 2, "NVIDIA L4", 24, false)
            .bound(SimBinding::Dra { shareable: true }),
    ];
    let mut env = Env::start("dra", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: reads the simulated kubelets' assignments");
        return;
    }
    env.apply(&deployment("ex", 1, json!({}))).await.unwrap();
    env.apply(&deployment(
        "tp",
        1,
        json!({"resources": {"gpusPerReplica": 2}, "placement": {"requireNvlink": true}}),
    ))
    .await
    .unwrap();
    env.apply(&deployment(
        "sh",
        2,
        json!({"resources": {"sharing": "Shared"}}),
    ))
    .await
    .unwrap();
    settle_and_compare(&mut env, &["ex", "tp", "sh"]).await;
    churn(&mut env, &["ex", "tp", "sh"], true).await;
    // Tensor-parallel pairs are on the one NVLink island, the A100 node.
    for pod in env.pods("tp").await.unwrap() {
        let p = placement_of(&pod).unwrap();
        assert_eq!((p.node.as_str(), p.uuids.len()), ("dra-a100", 2), "{p:?}");
    }
    // Every DRA pod's claim is allocated and reserved for it alone.
    let claims = Api::<ResourceClaim>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    for pod in all_pods(&env).await.iter().filter(is_ready) {
        let c = claims
            .iter()
            .find(|c| c.name_any() == format!("{}-gpus", pod.name_any()))
            .unwrap_or_else(|| panic!("no claim for {}", pod.name_any()));
        let reserved = c
            .status
            .as_ref()
            .and_then(|s| s.reserved_for.clone())
            .unwrap();
        assert_eq!(reserved.len(), 1);
        assert_eq!(Some(&reserved[0].uid), pod.metadata.uid.as_ref());
    }
}

/// (b) A device-plugin cluster: the plugin picks other GPUs than placement chose
/// (highest index first); the ledger and status follow what it assigned, and no GPU is
/// held twice, through 200 scale events; shares go through `nvidia.com/gpu.shared`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_plugin_assignments_are_followed_through_200_scale_events() {
    let nodes = vec![
        SimNode::new("dp-l4-a", 3, "NVIDIA L4", 24, false),
        SimNode::new("dp-l4-b", 3, "NVIDIA L4", 24, false),
        SimNode::new("dp-sliced", 2, "NVIDIA L4", 24, false)
            .bound(SimBinding::DevicePlugin { replicas: 4 }),
    ];
    let mut env = Env::start("dp", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: reads the simulated kubelets' assignments");
        return;
    }
    env.apply(&deployment("ex", 2, json!({}))).await.unwrap();
    env.apply(&deployment("ex2", 1, json!({}))).await.unwrap();
    env.apply(&deployment(
        "sh",
        2,
        json!({"resources": {"sharing": "Shared"}}),
    ))
    .await
    .unwrap();
    settle_and_compare(&mut env, &["ex", "ex2", "sh"]).await;
    churn(&mut env, &["ex", "ex2", "sh"], false).await;
    let pods = all_pods(&env).await;
    let corrected = pods
        .iter()
        .filter_map(placement_of)
        .filter(|p| p.assigned)
        .count();
    assert!(corrected > 0, "the plugin never differed from placement");
    for pod in env.pods("sh").await.unwrap() {
        let limits = pod.spec.unwrap().containers[0]
            .resources
            .clone()
            .unwrap()
            .limits
            .unwrap();
        assert_eq!(
            limits.get("nvidia.com/gpu.shared").map(|q| q.0.as_str()),
            Some("1")
        );
    }
}

/// (e) A mixed cluster: a DRA node, a device-plugin node, a GFD-only node and a CPU
/// node; each replica is bound the way its node allows, and status says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_cluster_binds_each_replica_the_way_its_node_allows() {
    let mut cpu = SimNode::new("cpu-0", 0, "none", 1, false);
    cpu.gpus.clear();
    let nodes = vec![
        SimNode::new("mix-dra", 1, "NVIDIA L4", 24, false)
            .bound(SimBinding::Dra { shareable: false }),
        SimNode::new("mix-dp", 1, "NVIDIA L4", 24, false),
        SimNode::new("mix-gfd", 1, "NVIDIA L4", 24, false).without_agent(),
        cpu,
    ];
    let mut env = Env::start("mixed", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: builds its own mixed cluster");
        return;
    }
    // Three GPU replicas (one per GPU node) and a fourth that only the CPU node takes.
    env.apply(&deployment(
        "mix",
        4,
        json!({"resources": {"allowCpu": true}}),
    ))
    .await
    .unwrap();
    settle_and_compare(&mut env, &["mix"]).await;
    let st = env.deployment("mix").await.unwrap().status.unwrap();
    let by_node: HashMap<&str, &gpuscale_crds::ReplicaPlacement> =
        st.placements.iter().map(|p| (p.node.as_str(), p)).collect();
    use gpuscale_crds::GpuBinding::*;
    assert_eq!(by_node["mix-dra"].binding, Some(DraClaim));
    assert!(by_node["mix-dra"].claim.is_some());
    assert_eq!(by_node["mix-dp"].binding, Some(DevicePlugin));
    assert_eq!(by_node["mix-gfd"].binding, Some(DevicePlugin));
    // The GFD-only node named no UUID; the worker reported the one it got.
    assert_eq!(by_node["mix-gfd"].gpus.len(), 1);
    assert_eq!(by_node["cpu-0"].binding, None);
    assert!(st.placement_summary.unwrap().contains("DraClaim"));
    // A shared replica: only where the node can bind a share, and here none can.
    env.apply(&deployment(
        "mixsh",
        1,
        json!({"resources": {"sharing": "Shared"}}),
    ))
    .await
    .unwrap();
    let d = env
        .wait(
            "the share to be refused",
            Duration::from_secs(30),
            || async {
                let d = env.deployment("mixsh").await.ok()?;
                gpuscale_e2e::condition(&d, "Unschedulable")
                    .filter(|c| c.0 == "True")
                    .map(|c| c.1)
            },
        )
        .await
        .unwrap();
    assert_eq!(d, "BindingUnavailable");
}

/// (d) A model on a WaitForFirstConsumer claim: the scheduler picks the node, the claim
/// is provisioned there and bound, and only then the pod; the worker loads the model
/// through the claim's volume and becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_a_wait_for_first_consumer_claim_binds_and_serves() {
    use gpuscale_sim::volumes::{PROVISIONER, SELECTED_NODE};
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    use k8s_openapi::api::storage::v1::StorageClass;
    use kube::api::PostParams;
    let nodes = vec![
        SimNode::new("pvc-l4-a", 1, "NVIDIA L4", 24, false),
        SimNode::new("pvc-l4-b", 1, "NVIDIA L4", 24, false),
    ];
    let env = Env::start("pvc", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: uses the simulator's node-local provisioner");
        return;
    }
    let class: StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "sim-local"}, "provisioner": PROVISIONER,
        "volumeBindingMode": "WaitForFirstConsumer", "parameters": {"path": "/models"},
    }))
    .unwrap();
    Api::<StorageClass>::all(env.client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
        "spec": {"storageClassName": "sim-local", "accessModes": ["ReadOnlyMany"],
                 "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &env.namespace);
    claims.create(&PostParams::default(), &claim).await.unwrap();
    env.apply(&deployment(
        "onpvc",
        1,
        json!({"model": {"source": "pvc://models/SmolLM2-135M-Instruct.Q4_1.gguf"}}),
    ))
    .await
    .unwrap();
    let pods = env
        .wait_ready("onpvc", 1, Duration::from_secs(120))
        .await
        .unwrap();
    let node = pods[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    let bound = claims.get("models").await.unwrap();
    assert_eq!(bound.annotations().get(SELECTED_NODE), Some(&node));
    assert_eq!(bound.status.unwrap().phase.as_deref(), Some("Bound"));
    let pv = Api::<PersistentVolume>::all(env.client.clone())
        .get(&bound.spec.unwrap().volume_name.unwrap())
        .await
        .unwrap();
    let term = &pv
        .spec
        .unwrap()
        .node_affinity
        .unwrap()
        .required
        .unwrap()
        .node_selector_terms[0];
    assert_eq!(
        term.match_fields.as_ref().unwrap()[0].values,
        Some(vec![node.clone()]),
        "the volume was provisioned on the pod's node"
    );
}
