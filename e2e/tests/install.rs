//! Installing and operating gpuscale as a platform engineer would (issue #24): worker
//! pods under the namespace's Pod Security level.

use std::time::Duration;

use gpuscale_e2e::{smollm, Env};
use gpuscale_operator::reconcile::CacheVolume;
use gpuscale_sim::nodes::SimNode;
use gpuscale_sim::traffic::{self, Profile};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams};
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
}
