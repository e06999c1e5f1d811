//! End-to-end scenarios: the operator, the API (simulated, or a real cluster through
//! `GPUSCALE_E2E_KUBECONFIG`) and real SmolLM2 workers. See e2e/README.md.

use std::time::Duration;

use gpuscale_e2e::{condition, names, smollm, worker_metric, Env};
use gpuscale_sim::nodes::SimNode;
use gpuscale_sim::traffic::{self, Profile};
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const MODEL: &str = "smollm2-135m-instruct";

/// Requests of `tokens` tokens to the `smollm` Service at the rates of `profile`, sent
/// in the background until `profile` ends or `true` is sent on the returned sender; the
/// handle gives every request's outcome.
fn background_load(
    env: &Env,
    tokens: u32,
    profile: Profile,
) -> (
    tokio::task::JoinHandle<Vec<traffic::Outcome>>,
    tokio::sync::watch::Sender<bool>,
) {
    let (client, ns) = (env.client.clone(), env.namespace.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        traffic::drive_until(client, &ns, "smollm", MODEL, tokens, profile, stopped).await
    });
    (load, stop)
}

/// Waits (up to `within`) for deployment `name` to report `Unschedulable=True`, and
/// checks the reason is a shortage of GPU memory or GPUs.
async fn assert_unschedulable_for_vram(env: &Env, name: &str, within: Duration) {
    let (status, reason, message) = env
        .wait(&format!("{name} Unschedulable"), within, || async {
            let c = condition(&env.deployment(name).await.ok()?, "Unschedulable")?;
            (c.0 == "True").then_some(c)
        })
        .await
        .unwrap();
    assert_eq!(status, "True");
    assert!(
        ["InsufficientVRAM", "InsufficientGPUsOnNode"].contains(&reason.as_str()),
        "{reason}: {message}"
    );
}

fn two_l4_nodes() -> Vec<SimNode> {
    vec![
        SimNode::new("sim-l4-a", 2, "NVIDIA L4", 24, false),
        SimNode::new("sim-l4-b", 2, "NVIDIA L4", 24, false),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_becomes_available_and_serves() {
    let env = Env::start("available", two_l4_nodes()).await.unwrap();
    env.apply(&smollm(json!({}))).await.unwrap();
    let pods = env
        .wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    let placed_on = pods[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    assert!(placed_on.starts_with("sim-l4-"), "{placed_on}");
    let d = env
        .wait("Available=True", Duration::from_secs(30), || async {
            let d = env.deployment("smollm").await.ok()?;
            (condition(&d, "Available")?.0 == "True").then_some(d)
        })
        .await
        .unwrap();
    // What `kubectl wait --for=condition=Ready` and GitOps health checks read.
    let (ready, reason, _) = condition(&d, "Ready").expect("a Ready condition");
    assert_eq!((ready.as_str(), reason.as_str()), ("True", "ReplicasReady"));
    let status = d.status.unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (1, 1));
    assert_eq!(status.placements.len(), 1);
    assert_eq!(status.observed_generation, d.metadata.generation);
    // The example declares no size: the operator (which cannot open the nodes' /models)
    // had a probe pod read the header there, kept it in status, and removed the probe.
    let model = status.model.expect("status.model");
    assert_eq!(
        model.sized_from,
        gpuscale_crds::SizedFrom::Header,
        "{model:?}"
    );
    let by = model.read_by.clone().unwrap_or_default();
    assert!(
        by.starts_with("probe pod smollm-model-probe on sim-l4-"),
        "{model:?}"
    );
    let header = model.header.unwrap();
    assert_eq!(
        (header.layers, header.kv_heads, header.vocab),
        (30, 3, 49_152)
    );
    let pods_api: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client.clone(), &env.namespace);
    env.wait("the probe pod gone", Duration::from_secs(30), || async {
        pods_api
            .get_opt("smollm-model-probe")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap();
    let svc: Api<Service> = Api::namespaced(env.client.clone(), &env.namespace);
    let selector = svc
        .get("smollm")
        .await
        .unwrap()
        .spec
        .unwrap()
        .selector
        .unwrap();
    assert_eq!(selector["gpuscale.dev/serving"], "true");
    let outcomes = traffic::drive(
        env.client.clone(),
        &env.namespace,
        "smollm",
        MODEL,
        8,
        Profile(vec![(0.0, 2.0), (2.0, 0.0)]),
    )
    .await;
    let s = traffic::summary(&outcomes);
    assert!(s.requests >= 3, "{s:?}");
    assert_eq!(s.errors, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_up_then_down_without_losing_a_request() {
    let env = Env::start("burst", two_l4_nodes()).await.unwrap();
    // The burst starts panic mode, which forbids scaling down for the 60 s stable
    // window after it last held (Knative's rule): the trickle outlasts that.
    let d = smollm(json!({"spec": {"scaling": {
        "minReplicas": 1, "maxReplicas": 3, "warmReplicas": 0, "targetQueueDepth": 1,
        "scaleDownWindowSeconds": 15}}}));
    env.apply(&d).await.unwrap();
    env.wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    // The load is sized by what one replica does alone here, measured first: a
    // simulated worker computes on one thread of a shared two-core machine, so a
    // 96-token answer took 2.3-2.8 s with the machine otherwise idle and about 3 s
    // under CI's other scenarios, and a fixed rate (this scenario sent 4/s) queued up
    // to 100 s of work there, which drained too late for the scale-down to come by a
    // fixed deadline (three CI runs of four failed so, 2026-12-06).
    let probe = traffic::drive(
        env.client.clone(),
        &env.namespace,
        "smollm",
        MODEL,
        96,
        Profile(vec![(0.0, 1.0), (1.5, 0.0)]),
    )
    .await;
    assert!(
        probe.len() == 1 && probe[0].status == Some(200),
        "{probe:?}"
    );
    let alone = probe[0].latency.as_secs_f64();
    // A burst of three times what one replica answers alone (one request per `alone`
    // seconds) for 15 s: past one replica even batched, so at a target of 1 in flight
    // per replica it needs 2 to 3. Then a trickle keeping about half a request in
    // flight, light enough for one, that goes on while replicas drain and for about
    // four requests after the scale-down, however long the machine takes to get there.
    let (burst, trickle) = (3.0 / alone, 0.5 / alone);
    let (load, stop) = background_load(
        &env,
        96,
        Profile(vec![(0.0, burst), (15.0, trickle), (600.0, 0.0)]),
    );
    let t0 = std::time::Instant::now();
    // Two or more replicas ready and serving while the burst lasts.
    let serving = env
        .wait("two ready replicas", Duration::from_secs(40), || async {
            let st = env.deployment("smollm").await.ok()?.status?;
            (st.ready_replicas >= 2).then(|| t0.elapsed())
        })
        .await
        .unwrap();
    assert!(
        serving < Duration::from_secs(15),
        "two replicas were ready only after the burst, at {serving:?}"
    );
    // While requests flow, status says what the replicas cost (the simulator's price
    // table: 0.80 USD per L4-hour) and per million tokens generated.
    let cost = env
        .wait(
            "a cost per million tokens",
            Duration::from_secs(40),
            || async {
                let c = env.deployment("smollm").await.ok()?.status?.cost?;
                c.dollars_per_million_tokens.is_some().then_some(c)
            },
        )
        .await
        .unwrap();
    let gpus = cost.dollars_per_hour / 0.8;
    assert!(
        gpus >= 1.0 && (gpus - gpus.round()).abs() < 1e-6 && cost.unpriced_gpus == 0,
        "{cost:?}"
    );
    assert!(cost.tokens_per_second > 0.0, "{cost:?}");
    eprintln!("cost during the burst: {cost:?}");
    // A scale-down while the trickle flows: after the burst's backlog has drained, the
    // 60 s stable window and the 15 s scale-down window. The deadline is generous
    // because the backlog's drain depends on the machine; the order is what is checked.
    let down = env
        .wait("a scale-down", Duration::from_secs(240), || async {
            let ev = env.events("smollm").await.ok()?;
            ev.iter()
                .any(|e| e.reason.as_deref() == Some("ScaledDown"))
                .then(|| t0.elapsed())
        })
        .await
        .unwrap();
    eprintln!(
        "one request alone took {alone:.2} s; burst {burst:.2}/s, trickle {trickle:.2}/s; \
         two ready replicas at {serving:?}, scaled down at {down:?}"
    );
    // The trickle goes on for about four more requests (at least 20 s).
    tokio::time::sleep(Duration::from_secs_f64((4.0 / trickle).max(20.0))).await;
    stop.send(true).unwrap();
    let outcomes = load.await.unwrap();
    let s = traffic::summary(&outcomes);
    // Every request sent has an outcome: at least the burst's.
    let least = (burst * 15.0).floor() as usize;
    assert!(
        s.requests >= least,
        "only {} requests sent: {s:?}",
        s.requests
    );
    let after = outcomes
        .iter()
        .filter(|o| o.at > down.as_secs_f64())
        .count();
    assert!(after >= 2, "{after} requests flowed through the scale-down");
    assert_eq!(
        s.errors, 0,
        "every request answered 200 through scale-up and scale-down ({after} after the scale-down): {s:?}"
    );
    env.wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    let events = env.events("smollm").await.unwrap();
    let reasons: Vec<&str> = events.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert!(reasons.contains(&"ScaledUp"), "{reasons:?}");
    assert!(reasons.contains(&"ScaledDown"), "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_scale_leaves_no_duplicate_or_orphan() {
    let mut env = Env::start("restart", two_l4_nodes()).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: needs to kill the operator (simulator only)");
        return;
    }
    // The API server lets the first pod create through and holds the second: the
    // operator is killed with that create in flight, between two creations.
    let gate = env.sim().unwrap().api().gate_creates("pods", 1);
    let d = smollm(json!({"spec": {"replicas": 3, "scaling": {"autoscale": false}}}));
    let created = env.apply(&d).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), gate.held())
        .await
        .expect("the operator never tried a second pod");
    env.kill_operator();
    // The held create completes after its client is gone, as on a real API server.
    gate.release();
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.start_operator();
    let pods = env
        .wait_ready("smollm", 3, Duration::from_secs(150))
        .await
        .unwrap();
    assert_eq!(names(&pods), ["smollm-0", "smollm-1", "smollm-2"]);
    // Every pod in the namespace, with no selector: no copy under another name.
    let all =
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(env.client.clone(), &env.namespace)
            .list(&Default::default())
            .await
            .unwrap()
            .items;
    assert_eq!(names(&all), ["smollm-0", "smollm-1", "smollm-2"]);
    for p in &pods {
        let owner = &p.owner_references()[0];
        assert_eq!(Some(&owner.uid), created.metadata.uid.as_ref());
    }
    // Deleting the deployment drains and removes every replica (finalizer, owner GC).
    let api: Api<gpuscale_crds::InferenceDeployment> =
        Api::namespaced(env.client.clone(), &env.namespace);
    api.delete("smollm", &DeleteParams::default())
        .await
        .unwrap();
    env.wait(
        "the deployment and its pods gone",
        Duration::from_secs(90),
        || async {
            let gone = api.get_opt("smollm").await.ok()?.is_none();
            let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(
                env.client.clone(),
                &env.namespace,
            )
            .list(&Default::default())
            .await
            .ok()?;
            let svc = Api::<Service>::namespaced(env.client.clone(), &env.namespace)
                .get_opt("smollm")
                .await
                .ok()?;
            (gone && pods.items.is_empty() && svc.is_none()).then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_has_its_replica_placed_again() {
    let nodes = vec![
        SimNode::new("sim-l4-a", 1, "NVIDIA L4", 24, false),
        SimNode::new("sim-l4-b", 1, "NVIDIA L4", 24, false),
        SimNode::new("sim-l4-c", 1, "NVIDIA L4", 24, false),
    ];
    let mut env = Env::start("nodeloss", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: needs to kill a node (simulator only)");
        return;
    }
    // Whole GPUs (the default sharing): one replica per single-GPU node.
    let d = smollm(json!({"spec": {"replicas": 2, "scaling": {"autoscale": false}}}));
    env.apply(&d).await.unwrap();
    let pods = env
        .wait_ready("smollm", 2, Duration::from_secs(120))
        .await
        .unwrap();
    let lost = pods[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    env.sim().unwrap().lose_node(&lost).await.unwrap();
    let pods = env
        .wait(
            "2 ready replicas off the lost node",
            Duration::from_secs(120),
            || async {
                let pods = env
                    .wait_ready("smollm", 2, Duration::from_millis(1))
                    .await
                    .ok()?;
                pods.iter()
                    .all(|p| {
                        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(lost.as_str())
                    })
                    .then_some(pods)
            },
        )
        .await
        .unwrap();
    assert_eq!(pods.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_reported_as_a_condition_and_an_event() {
    let env = Env::start("invalid", two_l4_nodes()).await.unwrap();
    let d = smollm(json!({"metadata": {"name": "unsized"},
        "spec": {"model": {"source": "file:///models/missing.gguf", "parameters": null, "dtype": null}}}));
    env.apply(&d).await.unwrap();
    let (status, reason, message) = env
        .wait("InvalidSpec", Duration::from_secs(30), || async {
            condition(&env.deployment("unsized").await.ok()?, "InvalidSpec")
        })
        .await
        .unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(message.contains("spec.model.parameters"), "{message}");
    let d = env.deployment("unsized").await.unwrap();
    let (ready, reason, _) = condition(&d, "Ready").expect("a Ready condition");
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    let events = env.events("unsized").await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidSpec")),
        "{events:?}"
    );
    assert!(env.pods("unsized").await.unwrap().is_empty());
}

/// A scale-down wave defragments the fleet. Two nodes of one L4 (24 GiB, shareable
/// through DRA); `small`, four replicas of about 10 GiB placed with Spread, alternates
/// between them, so neither GPU has room for `big` (about 19.5 GiB), which is reported
/// Unschedulable. Scaled to two, `small` loses both replicas of one GPU, the
/// defragmenting order, and `big` is placed there. (Scoring each exit alone, every
/// replica frees the same 14 GiB and the two highest indices, one per GPU, would go.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_wave_makes_room_for_a_model_that_did_not_fit() {
    use gpuscale_sim::nodes::SimBinding;
    let nodes = ["sim-l4-a", "sim-l4-b"].map(|n| {
        SimNode::new(n, 1, "NVIDIA L4", 24, false).bound(SimBinding::Dra { shareable: true })
    });
    let env = Env::start("defragment", nodes.to_vec()).await.unwrap();
    // KV for 48 (and 96) sequences of SmolLM2's whole 8192-token context: the estimate
    // is 10.1 GiB (and 19.5 GiB) a replica; the CPU workers touch only what they use.
    let sized = |name: &str, batch: u32, replicas: u32, strategy: &str| {
        smollm(json!({"metadata": {"name": name},
            "spec": {"replicas": replicas, "scaling": {"autoscale": false},
                     "placement": {"strategy": strategy},
                     "resources": {"maxSequenceLength": 8192, "maxBatchSize": batch,
                                   "sharing": "Shared", "allowCpu": false}}}))
    };
    env.apply(&sized("small", 48, 4, "Spread")).await.unwrap();
    let pods = env
        .wait_ready("small", 4, Duration::from_secs(180))
        .await
        .unwrap();
    let node_of = |p: &k8s_openapi::api::core::v1::Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default()
    };
    let mut on: Vec<String> = pods.iter().map(node_of).collect();
    on.sort();
    assert_eq!(
        on,
        ["sim-l4-a", "sim-l4-a", "sim-l4-b", "sim-l4-b"],
        "Spread alternates"
    );
    env.apply(&sized("big", 96, 1, "BinPack")).await.unwrap();
    assert_unschedulable_for_vram(&env, "big", Duration::from_secs(60)).await;
    // The wave: two of the four go at once.
    let api: Api<gpuscale_crds::InferenceDeployment> =
        Api::namespaced(env.client.clone(), &env.namespace);
    api.patch(
        "small",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    let big = env
        .wait_ready("big", 1, Duration::from_secs(180))
        .await
        .unwrap();
    let small = env
        .wait("small at two replicas", Duration::from_secs(60), || async {
            let pods = env.pods("small").await.ok()?;
            (pods.len() == 2).then_some(pods)
        })
        .await
        .unwrap();
    let (a, b) = (node_of(&small[0]), node_of(&small[1]));
    assert_eq!(a, b, "the wave emptied one GPU: {:?}", names(&small));
    assert_ne!(node_of(&big[0]), a, "big went to the emptied GPU");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_model_is_reported_with_its_reason() {
    let env = Env::start("unschedulable", two_l4_nodes()).await.unwrap();
    let d = smollm(json!({"metadata": {"name": "huge"},
        // No file to read: the declared size (400B parameters) is what placement uses.
        "spec": {"model": {"name": "huge", "source": "file:///models/huge-400b.gguf",
                           "parameters": 400_000_000_000u64, "dtype": "f16"},
                 "resources": {"allowCpu": false}}}));
    env.apply(&d).await.unwrap();
    assert_unschedulable_for_vram(&env, "huge", Duration::from_secs(30)).await;
    assert!(env.pods("huge").await.unwrap().is_empty());
}

/// Two operator processes with leader election; the leader is killed (SIGKILL) in the
/// middle of a burst that put the autoscaler in panic mode. The new leader restores the
/// autoscaler's memory from status: it neither scales down inside the window the old
/// leader was holding nor forgets the panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_the_scale_down_window_and_the_panic() {
    use k8s_openapi::api::coordination::v1::Lease;
    let mut env = Env::start("failover", two_l4_nodes()).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: kills an operator process (simulator only)");
        return;
    }
    env.kill_operator();
    let kubeconfig = env.sim().unwrap().kubeconfig().to_path_buf();
    let operator = gpuscale_sim::operator_binary().unwrap();
    let start = |id: &str| {
        gpuscale_sim::operator_command(&operator, &kubeconfig)
            .args([
                "--lease-duration-seconds",
                "3",
                "--lease-namespace",
                "default",
            ])
            .env("POD_NAME", id)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let holder = |leases: Api<Lease>| async move {
        leases
            .get_opt("gpuscale-operator")
            .await
            .ok()??
            .spec?
            .holder_identity
    };
    let mut a = start("op-a");
    env.wait("op-a leads", Duration::from_secs(30), || async {
        (holder(leases.clone()).await.as_deref() == Some("op-a")).then_some(())
    })
    .await
    .unwrap();
    let mut b = start("op-b");

    let d = smollm(json!({"spec": {"scaling": {
        "minReplicas": 1, "maxReplicas": 3, "warmReplicas": 0, "targetQueueDepth": 2,
        "scaleDownWindowSeconds": 90}}}));
    env.apply(&d).await.unwrap();
    env.wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    // 6 requests/s of 128 tokens (768 tokens/s): past what one worker decodes here.
    let (load, _) = background_load(&env, 128, Profile(vec![(0.0, 6.0), (40.0, 0.0)]));
    let before = env
        .wait("panic mode", Duration::from_secs(40), || async {
            let st = env.deployment("smollm").await.ok()?.status?;
            let panic = st.autoscaler.as_ref()?.panic_until.clone()?;
            (st.desired_replicas > 1).then_some((st.desired_replicas, panic))
        })
        .await
        .unwrap();
    a.kill().await.unwrap();
    load.abort();
    env.wait("op-b takes over", Duration::from_secs(30), || async {
        (holder(leases.clone()).await.as_deref() == Some("op-b")).then_some(())
    })
    .await
    .unwrap();
    // op-b now acts alone on an idle deployment. For 20 s (inside the 90 s window the
    // old leader's recommendations hold) the count stays, and the panic deadline with it.
    let (desired, panic_until) = before;
    let watch_until = std::time::Instant::now() + Duration::from_secs(20);
    let mut saw_idle = false;
    while std::time::Instant::now() < watch_until {
        let st = env.deployment("smollm").await.unwrap().status.unwrap();
        assert!(
            st.desired_replicas >= desired,
            "the new leader scaled down early: {} → {} ({:?})",
            desired,
            st.desired_replicas,
            st.last_scale_reason
        );
        if jiff::Timestamp::now() < panic_until.0 {
            let kept = st.autoscaler.as_ref().and_then(|m| m.panic_until.clone());
            assert!(
                kept.as_ref().is_some_and(|k| k.0 >= panic_until.0),
                "the panic was dropped: {kept:?} < {panic_until:?}"
            );
        }
        saw_idle |= st.queue_depth == 0;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        saw_idle,
        "op-b never reported the idle queue: it did not reconcile"
    );
    b.kill().await.ok();
}

/// Pods reach their node through the scheduler, which checks taints: a node whose
/// taint the replica pods do not tolerate gets no replica, a GPU node tainted
/// `nvidia.com/gpu` (tolerated by default) does, and no pod carries a nodeName the
/// operator set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tainted_gpu_node_gets_no_replica_the_tolerated_one_does() {
    use k8s_openapi::api::core::v1::Node;
    let env = Env::start("taints", two_l4_nodes()).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: taints simulated nodes");
        return;
    }
    let nodes: Api<Node> = Api::all(env.client.clone());
    for (node, taint) in [
        (
            "sim-l4-a",
            json!({"key": "maintenance", "value": "true", "effect": "NoSchedule"}),
        ),
        (
            "sim-l4-b",
            json!({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}),
        ),
    ] {
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": [taint]}})),
            )
            .await
            .unwrap();
    }
    let d = smollm(json!({"spec": {"replicas": 2, "scaling": {"autoscale": false}}}));
    env.apply(&d).await.unwrap();
    let pods = env
        .wait_ready("smollm", 2, Duration::from_secs(120))
        .await
        .unwrap();
    for p in &pods {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(
            spec.node_name.as_deref(),
            Some("sim-l4-b"),
            "{}",
            p.name_any()
        );
        assert!(
            spec.affinity.is_some(),
            "pinned by affinity, bound by the scheduler"
        );
    }
}

/// The GpuInventory shows GPUs the scheduler cannot hand out (the device plugin has not
/// registered on that node: allocatable `nvidia.com/gpu` is 0). The scheduler refuses
/// the pod; the operator reports its words, releases the placement and places the
/// replica on the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_refusal_is_reported_and_the_replica_placed_elsewhere() {
    use k8s_openapi::api::core::v1::Node;
    let nodes = vec![
        SimNode::new("sim-l4-a", 1, "NVIDIA L4", 24, false),
        SimNode::new("sim-l4-b", 1, "NVIDIA L4", 24, false),
    ];
    let env = Env::start("refusal", nodes).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: edits a simulated node's allocatable");
        return;
    }
    // Placement prefers the first node by name; make that one full in a way only the
    // scheduler sees (no pod slots left), so it refuses the replica placement chose.
    let api: Api<Node> = Api::all(env.client.clone());
    api.patch_status(
        "sim-l4-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"allocatable": {"pods": "0"}}})),
    )
    .await
    .unwrap();
    let d = smollm(json!({"spec": {"replicas": 1, "scaling": {"autoscale": false}}}));
    env.apply(&d).await.unwrap();
    // The condition says SchedulerRejected only until the replica is placed elsewhere
    // (a pass or two); the Event is the lasting record.
    let note = env
        .wait_event("smollm", "ReplicaFailed", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        note.contains("the scheduler cannot place it: 0/2 nodes are available")
            && note.contains("Too many pods"),
        "{note}"
    );
    let pods = env
        .wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(
        pods[0].spec.as_ref().unwrap().node_name.as_deref(),
        Some("sim-l4-b")
    );
}

/// Exclusive replicas ask the device plugin for a count; the simulated plugin picks the
/// devices by its own rule (highest index first), not placement's (lowest first). The
/// status and the operator's ledger converge to what the plugin assigned, and no GPU is
/// held by two pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_the_gpus_the_device_plugin_assigned() {
    let mut env = Env::start("deviceplugin", two_l4_nodes()).await.unwrap();
    if !env.simulated() {
        eprintln!("skipped: reads the simulated kubelets' assignments");
        return;
    }
    let d = smollm(json!({"spec": {"replicas": 3, "scaling": {"autoscale": false}}}));
    env.apply(&d).await.unwrap();
    env.wait_ready("smollm", 3, Duration::from_secs(150))
        .await
        .unwrap();
    let assigned: std::collections::HashMap<String, Vec<String>> = env
        .sim()
        .unwrap()
        .kubelets()
        .iter()
        .flat_map(|k| k.assignments())
        .collect();
    let mut all: Vec<&String> = assigned.values().flatten().collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        (n, all.len()),
        (3, 3),
        "three GPUs, none twice: {assigned:?}"
    );
    let st = env
        .wait(
            "status to follow the plugin",
            Duration::from_secs(30),
            || async {
                let st = env.deployment("smollm").await.ok()?.status?;
                st.placements
                    .iter()
                    .all(|p| assigned.get(&p.pod) == Some(&p.gpus))
                    .then_some(st)
            },
        )
        .await
        .unwrap();
    assert_eq!(st.placements.len(), 3);
    // The plugin's rule differs from placement's, so at least one was corrected.
    let corrected = env
        .pods("smollm")
        .await
        .unwrap()
        .iter()
        .filter(|p| {
            p.annotations()
                .get("gpuscale.dev/placement")
                .is_some_and(|a| a.contains("\"assigned\":true"))
        })
        .count();
    assert!(
        corrected >= 1,
        "no placement differed from the plugin's choice"
    );
}

/// An http(s) model is sized from its header, read with range requests by the operator
/// itself: a bounded prefix of the file, never the weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_model_is_sized_from_its_header_by_range_requests() {
    let mut env = Env::start("http-header", two_l4_nodes()).await.unwrap();
    let Some(sim) = env.sim() else {
        return; // needs the simulator's model server
    };
    let file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let url = format!("{}/{file}", sim.model_server().url());
    // No replica: a worker would download the whole file, and this is about what the
    // operator reads (it sizes the model whatever the replica count).
    env.apply(&smollm(
        json!({"spec": {"model": {"source": url}, "replicas": 0,
        "scaling": {"autoscale": false, "minReplicas": 0}}}),
    ))
    .await
    .unwrap();
    let model = env
        .wait("status.model", Duration::from_secs(30), || async {
            env.deployment("smollm").await.ok()?.status?.model
        })
        .await
        .unwrap();
    assert_eq!(
        model.sized_from,
        gpuscale_crds::SizedFrom::Header,
        "{model:?}"
    );
    assert_eq!(model.read_by.as_deref(), Some("http range requests"));
    assert_eq!(model.header.unwrap().kv_heads, 3);
    let sim = env.sim().unwrap();
    let ranges: Vec<String> = sim
        .model_server()
        .requests()
        .into_iter()
        .map(|(f, r)| {
            assert_eq!(f, file);
            r.expect("every request is a range request")
        })
        .collect();
    let last_byte: u64 = ranges
        .iter()
        .filter_map(|r| r.rsplit('-').next()?.parse().ok())
        .max()
        .unwrap();
    let size = std::fs::metadata(std::env::var("GPUSCALE_SMOLLM2_GGUF").unwrap())
        .unwrap()
        .len();
    assert!(last_byte < size / 10, "{ranges:?} of {size} bytes");
}

/// An http(s) model is fetched into the node's cache before the worker loads it: the
/// download is watched (Event, condition, metric), resumes after the connection breaks,
/// is verified against model.sha256, and a second replica on the node uses the cache;
/// a model that does not match its sha256 is never served, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_model_is_downloaded_once_per_node_resumed_and_verified() {
    use sha2::Digest;
    let nodes = vec![SimNode::new("sim-l4", 3, "NVIDIA L4", 24, false)];
    let mut env = Env::start("download", nodes).await.unwrap();
    let Some(sim) = env.sim() else {
        return; // needs the simulator's model server
    };
    let file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let url = format!("{}/{file}", sim.model_server().url());
    let model = std::fs::read(std::env::var("GPUSCALE_SMOLLM2_GGUF").unwrap()).unwrap();
    let sha: String = sha2::Sha256::digest(&model)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // 40 MB/s: a 97 MB download takes a few seconds, long enough to be watched; the
    // connection breaks 30 MB in.
    sim.model_server().pace(40_000_000);
    sim.model_server().cut_next(30_000_000);
    env.apply(&smollm(json!({"spec": {
        "model": {"source": url, "sha256": sha},
        "replicas": 1, "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 2},
    }})))
    .await
    .unwrap();
    let note = env
        .wait_event("smollm", "DownloadingModel", Duration::from_secs(60))
        .await
        .unwrap();
    let of = format!("% of {:.1} MB", model.len() as f64 / 1e6);
    assert!(note.contains("smollm-0: ") && note.contains(&of), "{note}");
    let pods = env
        .wait_ready("smollm", 1, Duration::from_secs(120))
        .await
        .unwrap();
    // Resumed from where the break left the partial file, not from the start.
    let downloads: Vec<Option<String>> = env
        .sim()
        .unwrap()
        .model_server()
        .requests()
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.as_deref().is_none_or(|r| r.ends_with('-')))
        .collect();
    assert_eq!(downloads.len(), 2, "{downloads:?}");
    assert_eq!(downloads[0], None);
    let resumed_at: u64 = downloads[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap();
    // (What the client had received when the connection broke: the last chunk in
    // flight may be lost with it.)
    assert!(
        (30_000_000 - (1 << 20)..=30_000_000).contains(&resumed_at),
        "{resumed_at}"
    );
    assert_eq!(
        worker_metric(&pods[0], "gpuscale_worker_model_cache_hit").await,
        Some(0.0)
    );
    let cached = std::env::temp_dir()
        .join(format!("gpuscale-e2e-download-{}", std::process::id()))
        .join("nodes/sim-l4/var/cache/gpuscale/models")
        .join(format!("sha256-{sha}.gguf"));
    assert_eq!(
        std::fs::metadata(&cached).unwrap().len(),
        model.len() as u64
    );

    // A second replica on the node: the cache, no download.
    let api: Api<gpuscale_crds::InferenceDeployment> =
        Api::namespaced(env.client.clone(), &env.namespace);
    api.patch(
        "smollm",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    let pods = env
        .wait_ready("smollm", 2, Duration::from_secs(120))
        .await
        .unwrap();
    let second = pods.iter().find(|p| p.name_any() == "smollm-1").unwrap();
    assert_eq!(
        worker_metric(second, "gpuscale_worker_model_cache_hit").await,
        Some(1.0)
    );
    let full_gets = env
        .sim()
        .unwrap()
        .model_server()
        .requests()
        .iter()
        .filter(|(_, r)| r.as_deref().is_none_or(|r| r.ends_with('-')))
        .count();
    assert_eq!(full_gets, 2, "the second replica downloaded nothing");
    let d = env.deployment("smollm").await.unwrap();
    assert!(d.status.unwrap().measured_ready_seconds.is_some());

    // A model that is not what its sha256 says is never served, and the failure says why.
    env.apply(&smollm(json!({"metadata": {"name": "bad"}, "spec": {
        "model": {"source": format!("{url}?copy=2"), "format": "gguf", "sha256": "0".repeat(64)},
        "replicas": 1, "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 1},
    }})))
    .await
    .unwrap();
    let why = env
        .wait_event("bad", "ReplicaFailed", Duration::from_secs(90))
        .await
        .unwrap();
    assert!(
        why.contains("SHA-256 mismatch") && why.contains(&sha),
        "{why}"
    );
    assert!(env
        .pods("bad")
        .await
        .unwrap()
        .iter()
        .all(|p| !gpuscale_operator::reconcile::is_ready(p)));
}
