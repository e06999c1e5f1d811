//! Rollouts end to end on the simulator (issue #18): a change of version starts a
//! canary that the router gives a rising share of the traffic; each step is judged on
//! what the router measured for both versions. Real SmolLM2 workers serve every
//! request; a bad version fails a share of them by the worker's `--fail-percent`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuscale_crds::RolloutPhase;
use gpuscale_e2e::{condition, smollm, Env};
use gpuscale_operator::reconcile::LABEL_TEMPLATE;
use gpuscale_sim::nodes::SimNode;
use kube::ResourceExt;
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";

/// What one request got: its status and the pod that answered (from the router's
/// `x-gpuscale-route` header).
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    pod: String,
}

/// Clients sending requests through the router until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, answers, url) = (stop.clone(), answers.clone(), url.to_string());
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let resp = http
                            .post(format!("{url}/v1/completions"))
                            .json(&json!({"model": MODEL, "max_tokens": 4,
                                "prompt": format!("Client {c} counts to {i}:")}))
                            .send()
                            .await
                            .expect("the router answers");
                        let pod = resp
                            .headers()
                            .get("x-gpuscale-route")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|r| r.strip_prefix("pod="))
                            .and_then(|r| r.split(';').next())
                            .unwrap_or("")
                            .to_string();
                        let status = resp.status().as_u16();
                        let _ = resp.bytes().await;
                        answers.lock().unwrap().push(Answer { status, pod });
                    }
                })
            })
            .collect();
        Load {
            stop,
            answers,
            tasks,
        }
    }

    fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.answers.lock().unwrap().clone()
    }
}

fn node() -> Vec<SimNode> {
    vec![SimNode::new("sim-l4-a", 4, "NVIDIA L4", 24, false)]
}

/// Two replicas pinned (no autoscaling, so the counts are the rollout's alone), with
/// short steps.
fn deployment(rollout: Value, change: Value) -> Value {
    let mut d = smollm(json!({"spec": {
        "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 4, "warmReplicas": 0},
        "replicas": 2,
        "rollout": rollout}}));
    gpuscale_e2e::merge(&mut d, change);
    d
}

/// The version (template hash) each pod of `smollm` runs, by pod name.
async fn versions(env: &Env) -> HashMap<String, String> {
    env.pods("smollm")
        .await
        .unwrap()
        .iter()
        .map(|p| {
            (
                p.name_any(),
                p.labels().get(LABEL_TEMPLATE).cloned().unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits until `smollm` has its two replicas, both of version `stable`.
async fn only_stable_pods(env: &Env, stable: &str, what: &str) {
    env.wait(what, Duration::from_secs(60), || async {
        let v = versions(env).await;
        (v.len() == 2 && v.values().all(|t| t == stable)).then_some(())
    })
    .await
    .unwrap();
}

async fn rollout(env: &Env) -> Option<gpuscale_crds::RolloutStatus> {
    env.deployment("smollm").await.ok()?.status?.rollout
}

/// A cluster with the router, `smollm` serving two ready replicas with `steps`, and
/// three clients sending through the router; returns the stable version's name.
async fn serving(scenario: &str, steps: &Value) -> (Env, String, Load) {
    let mut env = Env::start(scenario, node()).await.unwrap();
    let url = env.start_router().await.unwrap();
    env.apply(&deployment(steps.clone(), json!({})))
        .await
        .unwrap();
    env.wait_ready("smollm", 2, Duration::from_secs(120))
        .await
        .unwrap();
    let stable = rollout(&env).await.expect("status.rollout").stable.name;
    let load = Load::start(&url, 3);
    (env, stable, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_version_is_promoted_step_by_step_across_an_operator_restart_losing_nothing() {
    // The latency gate is the unit tests' (`rollout/tests.rs`): here a p95 of a few
    // answers on two shared cores would judge noise, so it allows 4x.
    let steps = json!({"steps": [10, 50, 100], "stepSeconds": 4, "minRequests": 5,
        "readyTimeoutSeconds": 120, "rollbackLatencyPercent": 300});
    let (mut env, old, load) = serving("rollout-good", &steps).await;

    env.apply(&deployment(
        steps,
        json!({"spec": {"model": {"version": "2"}}}),
    ))
    .await
    .unwrap();
    let started = env
        .wait_event("smollm", "RolloutStarted", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(started.contains("10% → 50% → 100%"), "{started}");
    // Step 2 (50%) begins: the canary took 10% and passed.
    env.wait("step 2 routed", Duration::from_secs(120), || async {
        let r = rollout(&env).await?;
        (r.step == 1 && r.canary_weight == 50).then_some(())
    })
    .await
    .unwrap();
    // (d) The operator dies mid-rollout; a new one resumes at the same step.
    env.kill_operator();
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.start_operator();
    let seen_steps = Mutex::new(Vec::new());
    let last = Mutex::new(None);
    let promoted = env
        .wait("promotion", Duration::from_secs(240), || async {
            let r = rollout(&env).await?;
            seen_steps.lock().unwrap().push((r.phase, r.step));
            *last.lock().unwrap() = Some(r.clone());
            (r.phase == RolloutPhase::Stable).then_some(r)
        })
        .await;
    let promoted = match promoted {
        Ok(r) => r,
        Err(e) => {
            let pods = versions(&env).await;
            let last = last.lock().unwrap().clone();
            panic!("{e}; the rollout last read {last:?}; pods and versions {pods:?}")
        }
    };
    let seen_steps = seen_steps.into_inner().unwrap();
    assert!(
        seen_steps
            .iter()
            .all(|(p, s)| *p == RolloutPhase::Stable || *s >= 1),
        "the restarted operator went back a step: {seen_steps:?}"
    );
    assert_ne!(promoted.stable.name, old);
    let note = env
        .wait_event("smollm", "RolloutPromoted", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(note.contains("requests"), "{note}");
    let pods = env
        .wait_ready("smollm", 2, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(pods
        .iter()
        .all(|p| p.labels().get(LABEL_TEMPLATE) == Some(&promoted.stable.name)));
    let d = env.deployment("smollm").await.unwrap();
    assert_eq!(condition(&d, "Promoted").unwrap().0, "True");
    // (a) No client saw a failure, and the new version served some of them.
    let answers = load.stop().await;
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(answers.len() > 20, "{} requests", answers.len());
    println!("good version: {} requests, none failed", answers.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_never_ready_versions_are_rolled_back_touching_only_the_canary_share() {
    // A long hold: a verdict must come from the error ratio as soon as the canary has
    // minRequests answers, not from the hold ending.
    let steps = json!({"steps": [10, 50, 100], "stepSeconds": 120, "minRequests": 5,
        "rollbackErrorPercent": 5, "readyTimeoutSeconds": 60});
    let (env, stable, load) = serving("rollout-bad", &steps).await;

    // (b) A version whose worker fails 40% of requests.
    let failing = json!({"spec": {"model": {"version": "2-bad"},
        "worker": {"env": [{"name": "GPUSCALE_FAIL_PERCENT", "value": "40"}]}}});
    env.apply(&deployment(steps.clone(), failing))
        .await
        .unwrap();
    let canary_pods = env
        .wait("the canary serving", Duration::from_secs(120), || async {
            let r = rollout(&env).await?;
            (r.canary_weight == 10).then_some(())?;
            let v = versions(&env).await;
            Some(
                v.into_iter()
                    .filter(|(_, t)| *t != stable)
                    .map(|(p, _)| p)
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap();
    let note = env
        .wait_event("smollm", "RolledBack", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(note.contains("rollout.rollbackErrorPercent"), "{note}");
    let r = rollout(&env).await.unwrap();
    assert_eq!(
        (r.phase, r.step, r.canary_weight),
        (RolloutPhase::RolledBack, 0, 0)
    );
    assert_eq!(r.stable.name, stable);
    // The failing version's pods go; the stable version is pinned.
    only_stable_pods(&env, &stable, "only stable pods").await;
    let at_rollback = load.answers();
    let failed: Vec<&Answer> = at_rollback.iter().filter(|a| a.status != 200).collect();
    let on_canary = at_rollback
        .iter()
        .filter(|a| canary_pods.contains(&a.pod))
        .count();
    println!(
        "failing version: {} requests, {} to the canary, {} failed, all on the canary",
        at_rollback.len(),
        on_canary,
        failed.len()
    );
    assert!(!failed.is_empty(), "the failing version failed nothing");
    assert!(
        failed.iter().all(|a| canary_pods.contains(&a.pod)),
        "a failure outside the canary: {failed:?} (canary pods {canary_pods:?})"
    );
    assert!(
        on_canary * 100 < at_rollback.len() * 30,
        "the canary took more than its share: {on_canary} of {}",
        at_rollback.len()
    );

    // (c) A version whose model is corrupt never becomes ready: rolled back, and the
    // stable version's traffic untouched.
    let before = load.answers().len();
    let gguf = std::env::var("GPUSCALE_SMOLLM2_GGUF").unwrap();
    let name = format!("gpuscale-e2e-truncated-{}.gguf", std::process::id());
    let corrupt = std::path::Path::new(&gguf).parent().unwrap().join(&name);
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 3]).unwrap();
    let broken = json!({"spec": {"model": {"version": "3-corrupt",
        "source": format!("file:///models/{name}"), "parameters": 135_000_000u64, "dtype": "q4_1"}}});
    env.apply(&deployment(steps, broken)).await.unwrap();
    let note = env
        .wait("a second rollback", Duration::from_secs(120), || async {
            let r = rollout(&env).await?;
            (r.phase == RolloutPhase::RolledBack
                && r.canary.as_ref()?.model.version.as_deref() == Some("3-corrupt"))
            .then_some(r.message?)
        })
        .await
        .unwrap();
    std::fs::remove_file(&corrupt).ok();
    assert!(
        note.contains("failed") || note.contains("ready after"),
        "{note}"
    );
    only_stable_pods(&env, &stable, "only stable pods again").await;
    let answers = load.stop().await;
    let after: Vec<&Answer> = answers[before..].iter().collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|a| a.status == 200),
        "stable traffic failed while the corrupt version was tried: {:?}",
        after.iter().filter(|a| a.status != 200).collect::<Vec<_>>()
    );
    println!(
        "corrupt version: rolled back ({note}); {} requests meanwhile, none failed",
        after.len()
    );
}

/// Replaces the InferenceDeployment CRD with `yaml`, as `helm upgrade` does with the
/// chart's CRD template.
async fn replace_crd(env: &Env, yaml: &str) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(env.client.clone());
    let mut crd: CustomResourceDefinition = serde_yaml::from_str(yaml).unwrap();
    let name = crd.name_any();
    crd.metadata.resource_version = api.get(&name).await.unwrap().metadata.resource_version;
    api.replace(&name, &Default::default(), &crd).await.unwrap();
}

/// Issue #24 item 3: an upgrade from chart 0.1.0 on a cluster with a deployment
/// serving. Chart 0.1.0's CRD stored its worker image default (`:0.1.0`) in every
/// object; the upgrade replaces the CRD (the chart now templates it) and restarts the
/// operator with the new chart's worker image. The stored default is read as "no image
/// named", so the workers roll to the new image as a canary, through the router, and
/// no request is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_from_chart_0_1_0_rolls_the_workers_to_the_new_image_losing_nothing() {
    const OLD: &str = "ghcr.io/gpuscale/inference-worker:0.1.0";
    const NEW: &str = "ghcr.io/gpuscale/inference-worker:0.2.0";
    let mut env = Env::start("upgrade", node()).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: replaces the CRD and restarts the operator (simulator only)");
        return;
    }
    let url = env.start_router().await.unwrap();
    // The cluster as chart 0.1.0 left it: its CRD, its operator's worker image.
    replace_crd(
        &env,
        include_str!("../fixtures/chart-0.1.0-inferencedeployments.gpuscale.dev.yaml"),
    )
    .await;
    env.kill_operator();
    env.start_operator_with(|c| c.worker_image = OLD.into());
    let steps = json!({"steps": [50, 100], "stepSeconds": 4, "minRequests": 5,
        "readyTimeoutSeconds": 120, "rollbackLatencyPercent": 300});
    env.apply(&deployment(steps, json!({}))).await.unwrap();
    let stored = env.deployment("smollm").await.unwrap();
    assert_eq!(
        stored.spec.worker.image.as_deref(),
        Some(OLD),
        "the 0.1.0 CRD stores its default"
    );
    let pods = env
        .wait_ready("smollm", 2, Duration::from_secs(120))
        .await
        .unwrap();
    let image = |p: &k8s_openapi::api::core::v1::Pod| {
        p.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    assert!(pods.iter().all(|p| image(p) == OLD));
    let old = rollout(&env).await.expect("status.rollout").stable.name;
    let load = Load::start(&url, 3);

    // helm upgrade: the new CRD, the new operator.
    let (_, crd) = gpuscale_crds::crd_manifests()
        .into_iter()
        .find(|(f, _)| f.starts_with("inferencedeployments"))
        .unwrap();
    replace_crd(&env, &crd).await;
    env.kill_operator();
    env.start_operator_with(|c| c.worker_image = NEW.into());
    let started = env
        .wait_event("smollm", "RolloutStarted", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(started.contains("50% → 100%"), "{started}");
    let promoted = env
        .wait("promotion", Duration::from_secs(240), || async {
            let r = rollout(&env).await?;
            (r.phase == RolloutPhase::Stable && r.stable.name != old).then_some(r)
        })
        .await
        .unwrap();
    assert_eq!(promoted.stable.worker.image.as_deref(), Some(NEW));
    only_stable_pods(&env, &promoted.stable.name, "only new pods").await;
    let pods = env.pods("smollm").await.unwrap();
    assert!(
        pods.iter().all(|p| image(p) == NEW),
        "{:?}",
        pods.iter().map(image).collect::<Vec<_>>()
    );
    let answers = load.stop().await;
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(answers.len() >= 20, "{} requests", answers.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        answers.len()
    );
    // The object still names no image of its own beyond the old default: a later
    // operator upgrade rolls it again.
    let d = env.deployment("smollm").await.unwrap();
    assert_eq!(d.spec.worker.image.as_deref(), Some(OLD));
}
