//! The operator and kubectl against the simulated API server where no worker needs to
//! run: admission of InferenceDeployments as a real API server does it, a bad object in
//! the namespace, and what the controller costs the API at 100 deployments.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gpuscale_crds::InferenceDeployment;
use gpuscale_e2e::{condition, smollm, Env};
use gpuscale_sim::cluster::{ClusterConfig, SimCluster};
use gpuscale_sim::kubelet::KubeletConfig;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A simulated cluster with no node (so no worker process).
async fn bare_cluster(name: &str) -> SimCluster {
    let dir = std::env::temp_dir().join(format!("gpuscale-e2e-{name}-{}", std::process::id()));
    SimCluster::start(ClusterConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        kubeconfig: dir.join("kubeconfig"),
        nodes: Vec::new(),
        kubelet: KubeletConfig::new("/nonexistent/worker".into(), dir.clone(), dir.join("logs")),
    })
    .await
    .unwrap()
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl is on PATH (scripts/test.sh installs it into ~/.cache/gpuscale/bin)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `kubectl wait --for=condition=Ready` and `kubectl get all` work on an
/// InferenceDeployment (the operator's status is written here by hand, as it writes
/// it); one condition of each type, as the API server enforces for `listType: map`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_waits_for_ready_and_lists_deployments_under_all() {
    let cluster = bare_cluster("kubectl-ready").await;
    let kc = cluster.kubeconfig().to_path_buf();
    let example = repo().join("examples/smollm.yaml");
    let (ok, out, err) = kubectl(&kc, &["apply", "-f", example.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let api: Api<InferenceDeployment> = Api::namespaced(cluster.client(), "default");
    let cond = |status: &str, reason: &str| {
        json!({"type": "Ready", "status": status, "reason": reason, "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"})
    };
    let set = |conditions: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch_status(
                "smollm",
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"conditions": conditions}})),
            )
            .await
        }
    };
    set(json!([cond("False", "ReplicasStarting")]))
        .await
        .unwrap();
    let wait = [
        "wait",
        "--for=condition=Ready",
        "infd/smollm",
        "--timeout=2s",
    ];
    let (ok, _, err) = kubectl(&kc, &wait);
    assert!(!ok, "Ready=False satisfied kubectl wait: {err}");
    set(json!([cond("True", "ReplicasReady")])).await.unwrap();
    let (ok, out, err) = kubectl(&kc, &wait);
    assert!(ok && out.contains("condition met"), "{out}{err}");
    let (ok, out, err) = kubectl(&kc, &["get", "infd"]);
    assert!(
        ok && out.contains("STATUS") && out.contains("ReplicasReady"),
        "{out}{err}"
    );
    // The cost, as the operator writes it with a price table, in `-o wide`.
    api.patch_status(
        "smollm",
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"cost": {"dollarsPerHour": 2.49,
            "dollarsPerMillionTokens": 1.2345, "tokensPerSecond": 560.3,
            "windowSeconds": 300, "unpricedGpus": 0}}})),
    )
    .await
    .unwrap();
    let (ok, out, err) = kubectl(&kc, &["get", "infd", "-o", "wide"]);
    assert!(
        ok && out.contains("USD/H") && out.contains("USD/1M-TOKENS"),
        "{out}{err}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("smollm"))
        .unwrap_or_default();
    assert!(row.contains("2.49") && row.contains("1.2345"), "{out}");
    // The only kind in this namespace, so kubectl prints its table without a prefix.
    let (ok, out, err) = kubectl(&kc, &["get", "all"]);
    assert!(ok && out.contains("smollm2-135m-instruct"), "{out}{err}");
    let twice = set(json!([cond("True", "ReplicasReady"), cond("False", "X")])).await;
    let Err(kube::Error::Api(e)) = twice else {
        panic!("two Ready conditions were admitted: {twice:?}");
    };
    assert!(
        e.code == 422 && e.message.contains("status.conditions[1]: Duplicate value"),
        "{e:?}"
    );
}

/// `kubectl apply` of every example: the valid ones are created (no `--validate=false`),
/// every file in `examples/invalid/` is refused with its `# expect:` message, as a real
/// API server words it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_admits_the_examples_and_refuses_every_invalid_one() {
    let cluster = bare_cluster("kubectl").await;
    let kc = cluster.kubeconfig().to_path_buf();
    let valid = yaml_files(&repo().join("examples"));
    for f in &valid {
        let (ok, out, err) = kubectl(&kc, &["apply", "-f", f.to_str().unwrap()]);
        assert!(ok && out.contains("created"), "{}: {out}{err}", f.display());
    }
    let invalid = yaml_files(&repo().join("examples/invalid"));
    assert!(invalid.len() >= 8);
    for f in &invalid {
        let text = std::fs::read_to_string(f).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap();
        let (ok, out, err) = kubectl(&kc, &["apply", "-f", f.to_str().unwrap()]);
        assert!(!ok, "{} was accepted: {out}", f.display());
        assert!(
            err.contains("is invalid") && err.contains(expect),
            "{}: expected {expect:?} in kubectl's error, got {err}",
            f.display()
        );
        println!("refused {}: {}", f.display(), err.trim());
    }
    // Unknown fields: kubectl asks for strict field validation, and gets it.
    let typo = repo().join("target/gpuscale-e2e-typo.yaml");
    std::fs::write(
        &typo,
        "apiVersion: gpuscale.dev/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: typo}\n\
         spec:\n  model: {name: m, source: 'file:///m.gguf'}\n  scaling: {maxReplica: 3}\n",
    )
    .unwrap();
    let (ok, _, err) = kubectl(&kc, &["apply", "-f", typo.to_str().unwrap()]);
    assert!(!ok, "a misspelt field was accepted");
    assert!(
        err.contains("unknown field \"spec.scaling.maxReplica\""),
        "{err}"
    );
    // Defaults are the API server's: the short example comes back complete.
    let (ok, out, err) = kubectl(&kc, &["get", "infd", "smollm", "-o", "json"]);
    assert!(ok, "{err}");
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["spec"]["placement"]["strategy"], "BinPack");
    // A patch that breaks a rule is refused like a create.
    let (ok, _, err) = kubectl(
        &kc,
        &[
            "patch",
            "infd",
            "smollm",
            "--type=merge",
            "-p",
            r#"{"spec":{"scaling":{"minReplicas":9}}}"#,
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("spec.scaling.minReplicas: Invalid value: \"object\": scaling.minReplicas must not exceed scaling.maxReplicas"),
        "{err}"
    );
}

/// An object the current schema refuses (stored before the CRD changed) is reported and
/// skipped; the valid deployment beside it is reconciled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreadable_deployment_does_not_stall_the_others() {
    let mut env = Env::start("unreadable", Vec::new()).await.unwrap();
    let Some(sim) = env.sim() else {
        eprintln!("skipped: stores an object around validation (simulator only)");
        return;
    };
    let mut bad = smollm(json!({"metadata": {"name": "no-model", "namespace": "default"}}));
    bad["spec"].as_object_mut().unwrap().remove("model");
    sim.api().create_unchecked(bad).unwrap();
    // No node runs the model probe: the test answers it.
    let probes = gpuscale_e2e::answer_probes(env.client.clone(), "default").unwrap();
    env.apply(&smollm(json!({"metadata": {"name": "good"},
        "spec": {"resources": {"allowCpu": false}}})))
        .await
        .unwrap();
    let (status, reason, _) = env
        .wait(
            "the good one reconciled",
            Duration::from_secs(30),
            || async { condition(&env.deployment("good").await.ok()?, "Unschedulable") },
        )
        .await
        .unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "NoGPUs"));
    let events = env
        .wait("an Unreadable event", Duration::from_secs(30), || async {
            let ev = env.events("no-model").await.ok()?;
            (!ev.is_empty()).then_some(ev)
        })
        .await
        .unwrap();
    let note = events[0].note.clone().unwrap_or_default();
    assert_eq!(events[0].reason.as_deref(), Some("Unreadable"));
    assert!(note.contains("missing field `model`"), "{note}");
    assert!(env.pods("no-model").await.unwrap().is_empty());
    probes.abort();
}

/// 100 deployments on 100 simulated GPUs (no kubelet: the replicas stay Pending, so the
/// load is the controller's alone). Once every replica is placed, the API sees watches
/// and nothing else: no LIST per pass, no write of an unchanged Service or status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_deployments_cost_the_api_no_list_per_pass() {
    let mut env = Env::start("requests", Vec::new()).await.unwrap();
    let Some(sim) = env.sim() else {
        eprintln!("skipped: counts requests at the simulated API server");
        return;
    };
    for n in 0..25 {
        let node = format!("gpu-{n}");
        sim.api()
            .create(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}],
                           "allocatable": {"nvidia.com/gpu": "4", "cpu": "64", "memory": "512Gi", "pods": "110"}}}))
            .unwrap();
        let gpus: Vec<_> = (0..4)
            .map(|i| {
                json!({"index": i, "uuid": format!("GPU-{n}-{i}"), "product": "NVIDIA A100",
                            "memoryTotalBytes": 80u64 << 30, "memoryFreeBytes": 80u64 << 30})
            })
            .collect();
        sim.api()
            .create(
                json!({"apiVersion": "gpuscale.dev/v1alpha1", "kind": "GpuInventory",
                "metadata": {"name": node}, "spec": {"node": node, "gpuCount": 4, "gpus": gpus}}),
            )
            .unwrap();
    }
    let api: Api<InferenceDeployment> = Api::namespaced(env.client.clone(), "default");
    // No kubelet runs the model probes: the test answers them (and its requests are
    // counted only while placing).
    let probes = gpuscale_e2e::answer_probes(env.client.clone(), "default").unwrap();
    env.sim().unwrap().api().take_request_counts();
    let setup = Instant::now();
    for i in 0..100 {
        let d = smollm(json!({"metadata": {"name": format!("m{i}")},
            "spec": {"replicas": 1, "scaling": {"autoscale": false},
                     "resources": {"allowCpu": false}}}));
        api.patch(
            &format!("m{i}"),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&d),
        )
        .await
        .unwrap();
    }
    env.wait("100 placed replicas", Duration::from_secs(120), || async {
        let all = api.list(&ListParams::default()).await.ok()?;
        let placed = all
            .items
            .iter()
            .filter(|d| d.status.as_ref().is_some_and(|s| s.placements.len() == 1))
            .count();
        (placed == 100).then_some(())
    })
    .await
    .unwrap();
    // Placed concurrently by many passes, yet no GPU twice: the scheduler, which
    // counts nvidia.com/gpu per node itself, bound every pod and refused none.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), "default");
    env.wait("100 bound pods", Duration::from_secs(60), || async {
        let all = pods.list(&ListParams::default()).await.ok()?.items;
        let bound = all
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count();
        (all.len() == 100 && bound == 100).then_some(())
    })
    .await
    .unwrap();
    probes.abort();
    let sim = env.sim().unwrap();
    let placing = sim.api().take_request_counts();
    println!(
        "API requests while 100 deployments were created and placed ({:.0} s, the test's own \
         applies and polls included):",
        setup.elapsed().as_secs_f64()
    );
    for ((verb, what), n) in &placing {
        println!("  {verb:>8} {what:<32} {n:>8}");
    }
    // Settle, then count over a window of passes (one pass per deployment every 1 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim.api().take_request_counts();
    let window = Duration::from_secs(20);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let counts = sim.api().take_request_counts();
    let per_min = 60.0 / start.elapsed().as_secs_f64();
    println!(
        "API requests per minute, 100 deployments, steady state ({} in all):",
        counts.values().sum::<u64>()
    );
    for ((verb, what), n) in &counts {
        println!("  {verb:>8} {what:<32} {:>8.1}", *n as f64 * per_min);
    }
    let lists: u64 = counts
        .iter()
        .filter(|((v, _), _)| v == "list")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(lists, 0, "a LIST in steady state: {counts:?}");
    let writes: Vec<_> = counts
        .iter()
        .filter(|((v, _), _)| !["watch", "get"].contains(&v.as_str()))
        .collect();
    assert!(
        writes.is_empty(),
        "writes with nothing changing: {writes:?}"
    );
}

/// Fleet scale in small (`gpuscale-sim fleet` runs the same code at 1,000 nodes and
/// 10,000 pods; its figures are in the README): hollow nodes and pods, the operator
/// as its own process, every replica placed and Ready, every spec change followed by
/// its pod, and no LIST in steady state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hollow_fleet_is_placed_and_costs_no_list_in_steady_state() {
    if gpuscale_e2e::real_cluster().is_some() {
        eprintln!("skipped: hollow nodes exist on the simulator only");
        return;
    }
    let dir = std::env::temp_dir().join(format!("gpuscale-e2e-fleet-{}", std::process::id()));
    let report = gpuscale_sim::fleet::run(gpuscale_sim::fleet::FleetConfig {
        nodes: 20,
        gpus_per_node: 8,
        deployments: 20,
        replicas: 5,
        changes: 10,
        window: Duration::from_secs(10),
        scrape_interval_seconds: 2,
        operator: gpuscale_sim::operator_binary().unwrap(),
        dir,
    })
    .await
    .unwrap();
    print!("{report}");
    assert_eq!(report.pods, 100);
    assert_eq!(report.lists(), 0.0, "a LIST in steady state: {report}");
    // The operator's own requests were counted (the lease is renewed every few s).
    assert!(
        report.per_minute.keys().any(|(_, r)| r == "leases"),
        "{report}"
    );
}

/// Requests a real API server refuses are refused with a Status: a watch from a
/// resourceVersion that is not one (400), a body over the 3 MiB request limit (413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_api_server_s_status() {
    let cluster = bare_cluster("malformed").await;
    let http = reqwest::Client::new();
    let url = cluster.url();
    let r = http
        .get(format!(
            "{url}/api/v1/namespaces/default/pods?watch=true&resourceVersion=abc"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let status: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(status["kind"], "Status");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("invalid resource version"),
        "{status}"
    );

    // Each write: its status code and the Status (or object) it answered.
    let post = |path: &str, content_type: &'static str, body: Vec<u8>| {
        let request = http
            .post(format!("{url}{path}"))
            .header("content-type", content_type)
            .body(body);
        async move {
            let r = request.send().await.unwrap();
            let code = r.status().as_u16();
            let answer: serde_json::Value =
                serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            (code, answer)
        }
    };
    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"x":"{}"}}}}"#,
        "a".repeat(5 << 20)
    );
    let configmaps = "/api/v1/namespaces/default/configmaps";
    let (code, status) = post(configmaps, "application/json", big.into_bytes()).await;
    assert_eq!(code, 413);
    assert_eq!(status["reason"], "RequestEntityTooLarge", "{status}");

    // A body in a media type not decoded here (protobuf, as kubectl's `create service`
    // sends): 415 naming the types taken, nothing created. YAML is taken, as by the
    // API server.
    let services = "/api/v1/namespaces/default/services";
    let protobuf = b"k8s\x00\x0a\x0f".to_vec();
    let (code, status) = post(services, "application/vnd.kubernetes.protobuf", protobuf).await;
    assert_eq!(code, 415);
    assert_eq!(status["reason"], "UnsupportedMediaType", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("accepted media types include: application/json, application/yaml"),
        "{status}"
    );
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: from-yaml\nspec:\n  ports:\n  - port: 80\n";
    let (code, created) = post(services, "application/yaml", yaml.into()).await;
    assert_eq!(code, 201, "{created}");
    let list: serde_json::Value = http
        .get(format!("{url}{services}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["from-yaml"], "{list}");
}

/// A delete with `preconditions` deletes only the object they name, as the API server
/// does: another object of the same name (made again after a delete) or a newer
/// version of it answers 409 and is kept. The kubelet and the operator delete pods by
/// UID this way, so a stale delete never removes the replica made in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_with_preconditions_spares_another_object_of_the_same_name() {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{DeleteParams, PostParams, Preconditions};
    use kube::ResourceExt;
    let cluster = bare_cluster("preconditions").await;
    let api: Api<Service> = Api::namespaced(cluster.client(), "default");
    let make = || async {
        let svc: Service = serde_json::from_value(
            json!({"metadata": {"name": "x"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .unwrap();
        api.create(&PostParams::default(), &svc).await.unwrap()
    };
    let first = make().await;
    api.delete("x", &DeleteParams::default()).await.unwrap();
    let second = make().await;
    let by = |uid: Option<String>, rv: Option<String>| DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: rv,
        }),
        ..DeleteParams::default()
    };

    let stale = api.delete("x", &by(first.uid(), None)).await.unwrap_err();
    let kube::Error::Api(e) = stale else {
        panic!("{stale}")
    };
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"), "{e:?}");
    assert!(
        e.message.contains(&format!(
            "Precondition failed: UID in precondition: {}, UID in object meta: {}",
            first.uid().unwrap(),
            second.uid().unwrap()
        )),
        "{}",
        e.message
    );
    let old_version = by(None, second.resource_version());
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "2"}}})),
    )
    .await
    .unwrap();
    let stale = api.delete("x", &old_version).await.unwrap_err();
    assert!(
        matches!(&stale, kube::Error::Api(e) if e.code == 409 && e.message.contains("ResourceVersion in precondition")),
        "{stale}"
    );
    assert_eq!(api.get("x").await.unwrap().uid(), second.uid(), "kept");

    api.delete("x", &by(second.uid(), None)).await.unwrap();
    assert!(api.get_opt("x").await.unwrap().is_none());
}

/// `propagationPolicy` does what the garbage collection page says
/// (<https://kubernetes.io/docs/concepts/architecture/garbage-collection/#cascading-deletion>):
/// Foreground keeps the owner, marked deleted and held by `foregroundDeletion`, until
/// the dependents with `blockOwnerDeletion: true` are gone; Orphan keeps the
/// dependents and removes their reference to the owner; another value is refused (422),
/// as `ValidateDeleteOptions` refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_waits_for_blocking_dependents_and_orphan_keeps_them() {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{DeleteParams, PostParams};
    use kube::ResourceExt;
    let cluster = bare_cluster("propagation").await;
    let api: Api<Service> = Api::namespaced(cluster.client(), "default");
    let make = |name: &str, meta: serde_json::Value| {
        let api = api.clone();
        let mut m = meta;
        m["name"] = json!(name);
        async move {
            let svc: Service =
                serde_json::from_value(json!({"metadata": m, "spec": {"ports": [{"port": 80}]}}))
                    .unwrap();
            api.create(&PostParams::default(), &svc).await.unwrap()
        }
    };
    let owner_ref = |o: &Service, block: bool| {
        json!([{"apiVersion": "v1", "kind": "Service", "name": o.name_any(),
                "uid": o.uid().unwrap(), "blockOwnerDeletion": block}])
    };

    let owner = make("owner", json!({})).await;
    // A blocking dependent that a finalizer keeps a while after it is deleted, and one
    // that does not block.
    make(
        "blocker",
        json!({"ownerReferences": owner_ref(&owner, true), "finalizers": ["example.com/hold"]}),
    )
    .await;
    make(
        "plain",
        json!({"ownerReferences": owner_ref(&owner, false)}),
    )
    .await;

    let marked = api
        .delete("owner", &DeleteParams::foreground())
        .await
        .unwrap()
        .left()
        .expect("the owner is kept while it waits");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.finalizers(), ["foregroundDeletion"]);
    assert!(
        api.get_opt("plain").await.unwrap().is_none(),
        "dependents go first"
    );
    let blocker = api.get("blocker").await.unwrap();
    assert!(
        blocker.metadata.deletion_timestamp.is_some(),
        "deleted, held by its finalizer"
    );
    assert_eq!(
        api.get("owner").await.unwrap().finalizers(),
        ["foregroundDeletion"],
        "the owner waits for its blocking dependent"
    );
    let late = api
        .patch(
            "owner",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["foregroundDeletion", "example.com/late"]}}),
            ),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&late, kube::Error::Api(e) if e.code == 422
            && e.message.contains("no new finalizers can be added if the object is being deleted")),
        "{late}"
    );
    api.patch(
        "blocker",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(api.get_opt("blocker").await.unwrap().is_none());
    assert!(
        api.get_opt("owner").await.unwrap().is_none(),
        "with its blocking dependent gone, the owner goes"
    );

    let owner = make("owner2", json!({})).await;
    make("kept", json!({"ownerReferences": owner_ref(&owner, true)})).await;
    api.delete("owner2", &DeleteParams::orphan()).await.unwrap();
    assert!(api.get_opt("owner2").await.unwrap().is_none());
    let kept = api.get("kept").await.unwrap();
    assert!(kept.metadata.deletion_timestamp.is_none(), "{kept:?}");
    assert!(kept.owner_references().is_empty(), "{kept:?}");

    let r = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/namespaces/default/services/kept",
            cluster.url()
        ))
        .header("content-type", "application/json")
        .body(r#"{"propagationPolicy": "Sometimes"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let status: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains(r#"propagationPolicy: Unsupported value: "Sometimes""#),
        "{status}"
    );
    assert!(
        api.get_opt("kept").await.unwrap().is_some(),
        "a refused delete deletes nothing"
    );
}

/// Writes that carry a UID are refused (409) when it is not the object's, as the
/// kubelet's status patches and kube-scheduler's bindings carry it: a status or a
/// binding decided for a pod since deleted never lands on a new pod of its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_patch_or_binding_for_an_earlier_pod_of_the_name_is_refused() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{DeleteParams, PostParams};
    use kube::ResourceExt;
    let cluster = bare_cluster("uid-writes").await;
    let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let make = || async {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
        api.create(&PostParams::default(), &pod).await.unwrap()
    };
    let first = make().await;
    api.delete("p", &DeleteParams::default()).await.unwrap();
    let second = make().await;
    let conflict = |r: Result<serde_json::Value, kube::Error>| match r {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 409, "{e:?}");
            assert!(
                e.message
                    .contains("Precondition failed: UID in precondition"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    };
    let status =
        |uid: Option<String>| json!({"metadata": {"uid": uid}, "status": {"phase": "Running"}});
    conflict(
        api.patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(status(first.uid())),
        )
        .await
        .map(|p| serde_json::to_value(p).unwrap()),
    );
    let binding = |uid: Option<String>| {
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p", "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": "n"}})
    };
    conflict(
        api.create_subresource::<_, serde_json::Value>(
            "binding",
            "p",
            &PostParams::default(),
            &binding(first.uid()),
        )
        .await,
    );
    let kept = api.get("p").await.unwrap();
    assert_eq!(kept.status.and_then(|s| s.phase), Some("Pending".into()));
    assert!(kept.spec.unwrap().node_name.is_none(), "not bound");

    let ok = api
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(status(second.uid())),
        )
        .await
        .unwrap();
    assert_eq!(ok.status.and_then(|s| s.phase), Some("Running".into()));
}

/// The scheduler reports a pod it cannot place on that pod, as kube-scheduler does
/// (`PodScheduled=False`, reason `Unschedulable`), and again on a pod made under the
/// same name after the first is deleted: another pod, whatever its name (the operator
/// deletes and makes capacity request pods again under one name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_pod_made_again_under_its_name_is_reported_again() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{DeleteParams, PostParams};
    let cluster = bare_cluster("unschedulable-again").await;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "nowhere"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap();
    let reported = |uid: String| {
        let pods = pods.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let p = pods.get("nowhere").await.unwrap();
                let cond = p
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c.type_ == "PodScheduled");
                if p.metadata.uid.as_deref() == Some(&uid)
                    && cond.is_some_and(|c| {
                        c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
                    })
                {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "pod {uid} never reported unschedulable"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let first = pods.create(&PostParams::default(), &pod).await.unwrap();
    reported(first.metadata.uid.unwrap()).await;
    // Deleted (a pod on no node goes at once) and made again at once, within one
    // round of the scheduler.
    pods.delete("nowhere", &DeleteParams::default())
        .await
        .unwrap();
    let second = pods.create(&PostParams::default(), &pod).await.unwrap();
    reported(second.metadata.uid.unwrap()).await;
}
