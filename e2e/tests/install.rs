//! Installing and operating gpuscale as a platform engineer would (issue #24): worker
//! pods under the namespace's Pod Security level, and a cluster autoscaler adding the
//! GPU node a replica needs.

use std::time::Duration;

use gpuscale_e2e::{smollm, worker_metrics, Env, OPERATOR_USER};
use gpuscale_operator::reconcile::CacheVolume;
use gpuscale_sim::nodes::SimNode;
use gpuscale_sim::traffic::{self, Profile};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;

/// A namespace that enforces the `restricted` Pod Security level: the simulator
/// refuses a worker pod with a hostPath model cache with the admission plugin's own
/// message, which the deployment reports as a `FailedCreate` Event; with the chart's
/// default cache (each replica's emptyDir) the same deployment's pods are admitted,
/// download the model and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pods_pass_the_restricted_pod_security_level() {
    let nodes = vec![SimNode::new("sim-l4", 1, "NVIDIA L4", 24, false)];
    let mut env = Env::start("restricted", nodes).await.unwrap();
    let Some(sim) = env.sim() else {
        return; // needs the simulator's model server
    };
    let url = format!(
        "{}/SmolLM2-135M-Instruct.Q4_1.gguf",
        sim.model_server().url()
    );
    let label =
        json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    Api::<Namespace>::all(env.client.clone())
        .patch(
            &env.namespace,
            &PatchParams::default(),
            &Patch::Merge(&label),
        )
        .await
        .unwrap();
    // The simulated runs' operator caches models in a node directory (a hostPath).
    env.apply(&smollm(json!({"spec": {
        "model": {"source": url},
        "replicas": 1, "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 1},
    }})))
    .await
    .unwrap();
    let note = env
        .wait_event("smollm", "FailedCreate", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        note.contains(
            "is forbidden: violates PodSecurity \"restricted:latest\": hostPath volume (\"model-cache\")"
        ),
        "{note}"
    );
    assert!(env.pods("smollm").await.unwrap().is_empty());

    // The chart's default cache: each replica's own emptyDir.
    env.kill_operator();
    env.start_operator_with(|c| c.model_cache.volume = CacheVolume::EmptyDir);
    let pods = env
        .wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    let spec = pods[0].spec.clone().unwrap();
    let cache = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "model-cache")
        .unwrap();
    assert!(cache.empty_dir.is_some(), "{cache:?}");
    assert_eq!(
        spec.security_context.and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let outcomes = traffic::drive(
        env.client.clone(),
        &env.namespace,
        "smollm",
        "smollm2-135m-instruct",
        8,
        Profile(vec![(0.0, 2.0), (2.0, 0.0)]),
    )
    .await;
    let s = traffic::summary(&outcomes);
    assert!(s.requests >= 3 && s.errors == 0, "{s:?}");

    // The chart's alerts and dashboard name only series the components export: the
    // worker's from this live pod, the operator's and the router's from their
    // registries.
    let worker = worker_metrics(&pods[0]).await.unwrap();
    let operator = gpuscale_operator::metrics::Metrics::default().encode();
    let router = gpuscale_router::metrics::Metrics::new().encode();
    let exported = exported_names(&[&worker, &operator, &router]);
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/gpuscale");
    for file in ["templates/prometheusrule.yaml", "files/dashboard.json"] {
        let text = std::fs::read_to_string(chart.join(file)).unwrap();
        let used = referenced_names(&text);
        assert!(used.len() >= 4, "{file}: {used:?}");
        for name in used {
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which nothing exports"
            );
        }
    }
}

/// Every series name an exposition text declares (`# TYPE`), with the suffixes its
/// type adds to samples.
fn exported_names(texts: &[&str]) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    for line in texts.iter().flat_map(|t| t.lines()) {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
        names.insert(name.to_string());
    }
    names
}

/// The `gpuscale_*` series names a PromQL-bearing file refers to.
fn referenced_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("gpuscale_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..at].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The capacity request pods of `smollm`.
async fn capacity_requests(pods: &Api<Pod>) -> Option<Vec<Pod>> {
    let lp = ListParams::default().labels("gpuscale.dev/capacity-for=smollm");
    Some(pods.list(&lp).await.ok()?.items)
}

/// Issue #24 item 9: a replica that fits on no node becomes a pending pod asking for
/// `nvidia.com/gpu`, which is what Cluster Autoscaler and Karpenter add nodes for. The
/// test plays the cluster autoscaler (a node like the others, once the request pod is
/// unschedulable); the operator then places the replica on the new node's GPU and
/// removes the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_fits_nowhere_asks_for_a_node_and_lands_on_it() {
    let nodes = vec![SimNode::new("sim-l4-a", 1, "NVIDIA L4", 24, false)];
    let mut env = Env::start("capacity", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: adds a node (simulator only)");
        return;
    }
    // Whole GPUs (the default sharing): the one GPU takes one replica.
    env.apply(&smollm(json!({"spec": {
        "replicas": 2, "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 2},
    }})))
    .await
    .unwrap();
    let note = env
        .wait_event("smollm", "CapacityRequested", Duration::from_secs(90))
        .await
        .unwrap();
    assert!(
        note.contains("smollm-capacity-") && note.contains("1 nvidia.com/gpu"),
        "{note}"
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let pending = env
        .wait(
            "an unschedulable capacity request",
            Duration::from_secs(30),
            || async {
                capacity_requests(&pods).await?.into_iter().find(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .into_iter()
                        .flatten()
                        .any(|c| {
                            c.type_ == "PodScheduled"
                                && c.reason.as_deref() == Some("Unschedulable")
                        })
                })
            },
        )
        .await
        .unwrap();
    let limits = pending.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    // Never on a node there is, where it would take a GPU meant for a replica.
    let affinity = serde_json::to_value(&pending.spec.as_ref().unwrap().affinity).unwrap();
    assert_eq!(
        affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0],
        json!({"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["sim-l4-a"]})
    );
    assert!(
        env.pods("smollm").await.unwrap().len() == 1,
        "the request is not a replica"
    );

    // The cluster autoscaler's answer: a node of the same kind.
    env.sim()
        .unwrap()
        .add_node(SimNode::new("sim-l4-b", 1, "NVIDIA L4", 24, false))
        .await
        .unwrap();
    let ready = env
        .wait_ready("smollm", 2, Duration::from_secs(120))
        .await
        .unwrap();
    let mut on: Vec<String> = ready
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    on.sort();
    assert_eq!(on, ["sim-l4-a", "sim-l4-b"]);
    env.wait(
        "the capacity request removed",
        Duration::from_secs(30),
        || async { capacity_requests(&pods).await?.is_empty().then_some(()) },
    )
    .await
    .unwrap();
}

/// Issue #24 item 4: an operator that serves only some namespaces (the chart's
/// `watchNamespaces`, which then grants it Roles there and no cluster-wide access to
/// namespaced kinds) watches pods, Services and claims in those namespaces only: the
/// simulator saw no cluster-wide request to a namespaced kind. A deployment there is
/// served; one in another namespace is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_serving_some_namespaces_makes_no_cluster_wide_request() {
    let nodes = vec![SimNode::new("sim-l4", 2, "NVIDIA L4", 24, false)];
    let mut env = Env::start("namespaced", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: reads the simulator's request log");
        return;
    }
    let other: Namespace = serde_json::from_value(json!({"metadata": {"name": "team-b"}})).unwrap();
    Api::<Namespace>::all(env.client.clone())
        .create(&Default::default(), &other)
        .await
        .unwrap();
    env.serve_only(&["default"]);
    env.sim().unwrap().api().take_audit();
    env.apply(&smollm(json!({}))).await.unwrap();
    let mut elsewhere = smollm(json!({}));
    elsewhere["metadata"]["namespace"] = json!("team-b");
    Api::<gpuscale_crds::InferenceDeployment>::namespaced(env.client.clone(), "team-b")
        .create(
            &Default::default(),
            &serde_json::from_value(elsewhere).unwrap(),
        )
        .await
        .unwrap();
    env.wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    let ignored =
        Api::<gpuscale_crds::InferenceDeployment>::namespaced(env.client.clone(), "team-b")
            .get("smollm")
            .await
            .unwrap();
    assert!(ignored.status.is_none(), "{:?}", ignored.status);
    assert!(
        ignored.metadata.finalizers.is_none(),
        "{:?}",
        ignored.metadata.finalizers
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "team-b");
    assert!(pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());
    let audit = env.sim().unwrap().api().take_audit();
    let operator: Vec<_> = audit
        .iter()
        .filter(|a| a.user == OPERATOR_USER && a.cluster_wide)
        .collect();
    assert!(
        operator.is_empty(),
        "the operator's cluster-wide requests to namespaced kinds: {operator:?}"
    );
    // It was seen at all: with every namespace served, it does list pods cluster-wide.
    env.serve_only(&[]);
    let mut seen = false;
    for _ in 0..100 {
        seen |= env
            .sim()
            .unwrap()
            .api()
            .take_audit()
            .iter()
            .any(|a| a.user == OPERATOR_USER && a.cluster_wide && a.resource == "pods");
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen,
        "no cluster-wide pod watch seen from the operator serving all namespaces"
    );
}

/// (API group, resource, verb) as RBAC rules grant them.
type Grant = (String, String, String);

/// What the chart grants the operator's service account, rendered by `helm template`
/// (the release `gpuscale` in namespace `gpuscale`, whose service account the
/// operator impersonates here): its ClusterRole and its Role.
fn chart_grants() -> std::collections::BTreeSet<Grant> {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/gpuscale");
    let out = std::process::Command::new("helm")
        .args(["template", "gpuscale"])
        .arg(&chart)
        .args(["--namespace", "gpuscale"])
        .output()
        .expect("helm on PATH (scripts/test.sh puts it there)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut grants = std::collections::BTreeSet::new();
    for doc in text.split("\n---") {
        let Ok(d) = serde_yaml::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let ours = matches!(
            (d["kind"].as_str(), name),
            (Some("ClusterRole"), "gpuscale-operator") | (Some("Role"), "gpuscale-leader-election")
        );
        if !ours {
            continue;
        }
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        for rule in d["rules"].as_array().unwrap() {
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        grants.insert((g.clone(), r.clone(), v));
                    }
                }
            }
        }
    }
    grants
}

/// Issue #24 item 4: the chart grants the operator exactly the verbs it uses, derived
/// from the simulator's audit of the operator's requests over a deployment's life:
/// placed on device-plugin and DRA nodes (claims), scaled past the GPUs (a capacity
/// request, a repeated Unschedulable Event), scaled down (drain, delete), deleted
/// (the finalizer), and a leader election (the Lease). Every request must be granted,
/// and every grant used, but for two the API server checks without a request of that
/// verb (named below, with the reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_grants_the_operator_exactly_what_it_uses() {
    use gpuscale_operator::leader::{Elector, LeaseConfig};
    use gpuscale_sim::nodes::SimBinding;
    let nodes = vec![
        SimNode::new("sim-l4", 2, "NVIDIA L4", 24, false),
        SimNode::new("sim-dra", 2, "NVIDIA L4", 24, false)
            .bound(SimBinding::Dra { shareable: false }),
    ];
    let mut env = Env::start("rbac", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: reads the simulator's audit");
        return;
    }
    let replicas = |n: u32| {
        smollm(json!({"spec": {"replicas": n,
            "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 8}}}))
    };
    env.apply(&replicas(4)).await.unwrap();
    env.wait_ready("smollm", 4, Duration::from_secs(180))
        .await
        .unwrap();
    env.apply(&replicas(5)).await.unwrap();
    env.wait_event("smollm", "CapacityRequested", Duration::from_secs(60))
        .await
        .unwrap();
    // A few passes repeat the Unschedulable Event (a series: a patch).
    tokio::time::sleep(Duration::from_secs(4)).await;
    env.apply(&replicas(1)).await.unwrap();
    env.wait("one replica left", Duration::from_secs(120), || async {
        (env.pods("smollm").await.ok()?.len() == 1).then_some(())
    })
    .await
    .unwrap();
    let api: Api<gpuscale_crds::InferenceDeployment> =
        Api::namespaced(env.client.clone(), &env.namespace);
    api.delete("smollm", &Default::default()).await.unwrap();
    env.wait("the deployment gone", Duration::from_secs(120), || async {
        api.get_opt("smollm").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    // Leader election, as the operator's replicas hold it, in the release namespace.
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "gpuscale"}})).unwrap();
    Api::<Namespace>::all(env.client.clone())
        .create(&Default::default(), &ns)
        .await
        .unwrap();
    let metrics = gpuscale_operator::metrics::Metrics::default();
    let lease = LeaseConfig::with_duration(
        "gpuscale",
        "gpuscale-operator",
        "test",
        Duration::from_secs(3),
    );
    Elector::new(env.operator_client(), lease)
        .lead(&metrics, tokio::time::sleep(Duration::from_secs(2)))
        .await
        .unwrap();

    let used: std::collections::BTreeSet<Grant> = env
        .sim()
        .unwrap()
        .api()
        .take_audit()
        .into_iter()
        .filter(|a| a.user == OPERATOR_USER)
        .map(|a| (a.group, a.resource, a.verb))
        .collect();
    let granted = chart_grants();
    let g = |group: &str, resource: &str, verb: &str| -> Grant {
        (group.into(), resource.into(), verb.into())
    };
    // Checked by the API server with no request of that verb:
    let implied = [
        // Server-side apply that creates a missing object is authorized as create.
        g("", "services", "create"),
        // blockOwnerDeletion in the replicas' owner references needs update on the
        // owner's finalizers (OwnerReferencesPermissionEnforcement).
        g("gpuscale.dev", "inferencedeployments/finalizers", "update"),
    ];
    let missing: Vec<&Grant> = used.difference(&granted).collect();
    assert!(missing.is_empty(), "used but not granted: {missing:?}");
    let extra: Vec<&Grant> = granted
        .difference(&used)
        .filter(|x| !implied.contains(x))
        .collect();
    assert!(
        extra.is_empty(),
        "granted but never used: {extra:?}; used: {used:?}"
    );
    for i in &implied {
        assert!(granted.contains(i), "{i:?} must stay granted");
    }
}
