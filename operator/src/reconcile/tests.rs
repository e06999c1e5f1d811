//! The reconciler against a mocked API server (kube-rs's tower-test pattern, as in
//! kube-rs/controller-rs): each test scripts the requests a pass must make, in order,
//! and the answers; Events are answered whenever they come and recorded.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};

use super::*;
use crate::scrape::{ScrapeError, WorkerLoad};

/// Loads by worker URL; a worker not listed fails to scrape.
struct Loads(HashMap<String, f64>);

impl Scrape for Loads {
    fn load<'a>(&'a self, base: &'a str) -> BoxFuture<'a, Result<WorkerLoad, ScrapeError>> {
        let r = self
            .0
            .get(base)
            .map(|&v| WorkerLoad {
                waiting: 0.0,
                running: v,
                requests_total: 0.0,
            })
            .ok_or(ScrapeError::Http {
                url: base.into(),
                message: "connection refused".into(),
            });
        Box::pin(async move { r })
    }
}

/// One expected request: method, a piece of the path, and the answer.
struct Expect(Method, &'static str, u16, Value);

/// What the mock saw: every request with its body, events included.
type Seen = Vec<(Method, String, Value)>;

fn context(
    loads: &[(&str, f64)],
) -> (
    Arc<Context>,
    tokio::task::JoinHandle<Seen>,
    tokio::sync::mpsc::UnboundedSender<Vec<Expect>>,
) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Expect>>();
    let server = tokio::spawn(async move {
        let mut script: std::collections::VecDeque<Expect> =
            rx.recv().await.unwrap_or_default().into();
        let mut seen = Seen::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let path = req.uri().to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen.push((method.clone(), path.clone(), body.clone()));
            if path.contains("/events") {
                let reply = Response::builder()
                    .status(201)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()));
                send.send_response(reply.unwrap());
                continue;
            }
            let Some(Expect(m, p, code, answer)) = script.pop_front() else {
                panic!("unexpected request {method} {path}");
            };
            assert_eq!(
                (&method, path.contains(p)),
                (&m, true),
                "expected {m} {p}, got {method} {path}"
            );
            let answer = if answer.is_null() { body } else { answer };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            if script.is_empty() {
                break;
            }
        }
        assert!(
            script.is_empty(),
            "requests never made: {:?}",
            script.iter().map(|e| e.1).collect::<Vec<_>>()
        );
        seen
    });
    let loads = Loads(loads.iter().map(|(k, v)| (k.to_string(), *v)).collect());
    let ctx = Context::new(
        client,
        Config::default(),
        Arc::new(loads),
        Arc::new(Metrics::default()),
    );
    (ctx, server, tx)
}

fn deployment(scaling: Value) -> InferenceDeployment {
    serde_json::from_value(json!({
        "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
        "metadata": {"name": "smollm", "namespace": "default", "uid": "uid-1", "generation": 1,
                     "finalizers": [FINALIZER], "resourceVersion": "1"},
        "spec": {
            "model": {"name": "smollm2", "source": "file:///nowhere/smollm2.gguf",
                      "parameters": 135_000_000u64, "dtype": "q4_1"},
            "resources": {"maxSequenceLength": 2048, "maxBatchSize": 8},
            "scaling": scaling,
        }
    }))
    .unwrap()
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn inventory() -> Value {
    list(
        "GpuInventoryList",
        vec![json!({
            "apiVersion": "gpuscale.dev/v1alpha1", "kind": "GpuInventory",
            "metadata": {"name": "gpu-a"},
            "spec": {"node": "gpu-a", "gpuCount": 3, "gpus": [
                {"index": 0, "uuid": "GPU-0", "product": "NVIDIA L4", "memoryTotalBytes": 24u64 << 30, "memoryFreeBytes": 24u64 << 30},
                {"index": 1, "uuid": "GPU-1", "product": "NVIDIA L4", "memoryTotalBytes": 24u64 << 30, "memoryFreeBytes": 24u64 << 30},
                {"index": 2, "uuid": "GPU-2", "product": "NVIDIA L4", "memoryTotalBytes": 24u64 << 30, "memoryFreeBytes": 24u64 << 30}
            ]}
        })],
    )
}

fn nodes() -> Value {
    list(
        "NodeList",
        vec![json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-a"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        })],
    )
}

/// A ready replica pod of `d` at GPU `gpu` with IP `ip`.
fn pod(d: &InferenceDeployment, index: u32, gpu: u32, ip: &str, extra_labels: Value) -> Value {
    let mut labels = json!({
        "app.kubernetes.io/managed-by": "gpuscale", LABEL_DEPLOYMENT: "smollm",
        LABEL_REPLICA: index.to_string(), LABEL_TEMPLATE: template_hash(d), LABEL_SERVING: "true",
    });
    for (k, v) in extra_labels.as_object().unwrap() {
        labels[k] = v.clone();
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("smollm-{index}"), "namespace": "default", "uid": format!("pod-{index}"),
            "labels": labels,
            "annotations": {ANNOTATION_PLACEMENT: json!({"node": "gpu-a", "gpus": [gpu], "uuids": [format!("GPU-{gpu}")],
                "bytesPerGpu": 2u64 << 30, "exclusive": true}).to_string()},
            "ownerReferences": [{"apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
                "name": "smollm", "uid": "uid-1", "controller": true}],
            "creationTimestamp": "2026-11-24T10:00:00Z"},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True",
            "lastTransitionTime": "2026-11-24T10:00:40Z"}]}
    })
}

fn reads(pods: Vec<Value>, inv: Value) -> Vec<Expect> {
    vec![
        Expect(Method::GET, "/api/v1/pods?", 200, list("PodList", pods)),
        Expect(Method::GET, "/gpuinventories", 200, inv),
        Expect(Method::GET, "/api/v1/nodes", 200, nodes()),
    ]
}

fn writes_after(d: &InferenceDeployment, mut steps: Vec<Expect>) -> Vec<Expect> {
    steps.push(Expect(Method::PATCH, "/services/smollm", 200, Value::Null));
    steps.push(status_write(d));
    steps
}

fn status_write(d: &InferenceDeployment) -> Expect {
    let obj = serde_json::to_value(d).unwrap();
    Expect(
        Method::PATCH,
        "/inferencedeployments/smollm/status",
        200,
        obj,
    )
}

fn status_of(seen: &Seen) -> Value {
    seen.iter()
        .rev()
        .find(|(m, p, _)| *m == Method::PATCH && p.contains("/status"))
        .map(|s| s.2["status"].clone())
        .expect("a status patch")
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn create_places_a_pinned_owned_pod_and_a_service() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let (ctx, server, tx) = context(&[]);
    let mut script = reads(vec![], inventory());
    script.push(Expect(
        Method::POST,
        "/namespaces/default/pods",
        201,
        Value::Null,
    ));
    tx.send(writes_after(&d, script)).unwrap();
    let action = reconcile(Arc::new(d), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    let seen = server.await.unwrap();
    let pod: Pod = serde_json::from_value(seen[3].2.clone()).unwrap();
    assert_eq!(pod.name_any(), "smollm-0");
    let spec = pod.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("gpu-a"));
    let c = &spec.containers[0];
    assert_eq!(
        c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0,
        "1"
    );
    let args = c.args.clone().unwrap().join(" ");
    assert!(
        args.contains("--model=/nowhere/smollm2.gguf") && args.contains("--device=cuda"),
        "{args}"
    );
    assert!(args.contains("--memory-budget="), "{args}");
    assert_eq!(pod.metadata.owner_references.unwrap()[0].uid, "uid-1");
    let svc = &seen[4].2;
    assert_eq!(svc["spec"]["selector"][LABEL_SERVING], "true");
    let status = status_of(&seen);
    assert_eq!(status["desiredReplicas"], 1);
    assert_eq!(status["placements"][0]["node"], "gpu-a");
    assert_eq!(condition(&status, "Unschedulable")["status"], "False");
}

#[tokio::test]
async fn a_409_on_create_is_someone_else_s_copy_not_an_error_or_a_duplicate() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let (ctx, server, tx) = context(&[]);
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "pods \"smollm-0\" already exists", "reason": "AlreadyExists", "code": 409});
    let mut script = reads(vec![], inventory());
    script.push(Expect(Method::POST, "/pods", 409, conflict));
    tx.send(writes_after(&d, script)).unwrap();
    reconcile(Arc::new(d), ctx).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(
        seen.iter()
            .filter(|s| s.0 == Method::POST && s.1.contains("/pods"))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_500_fails_the_pass_and_backs_off() {
    let d = Arc::new(deployment(json!({"minReplicas": 1, "maxReplicas": 4})));
    let (ctx, server, tx) = context(&[]);
    let err = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "etcdserver: leader changed", "reason": "InternalError", "code": 500});
    tx.send(vec![Expect(Method::GET, "/api/v1/pods?", 500, err)])
        .unwrap();
    let e = reconcile(d.clone(), ctx.clone()).await.unwrap_err();
    assert!(e.to_string().contains("etcdserver: leader changed"), "{e}");
    server.await.unwrap();
    let first = error_policy(d.clone(), &e, ctx.clone());
    let second = error_policy(d, &e, ctx);
    assert_ne!(first, second, "the retry interval grows");
}

#[tokio::test]
async fn missing_inventory_is_reported_as_unschedulable_with_the_reason() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let (ctx, server, tx) = context(&[]);
    let mut script = vec![
        Expect(Method::GET, "/api/v1/pods?", 200, list("PodList", vec![])),
        Expect(
            Method::GET,
            "/gpuinventories",
            200,
            list("GpuInventoryList", vec![]),
        ),
        Expect(Method::GET, "/api/v1/nodes", 200, list("NodeList", vec![])),
    ];
    script = writes_after(&d, script);
    tx.send(script).unwrap();
    reconcile(Arc::new(d), ctx).await.unwrap();
    let seen = server.await.unwrap();
    assert!(
        !seen
            .iter()
            .any(|s| s.0 == Method::POST && s.1.contains("/pods")),
        "no pod without a place"
    );
    let cond = condition(&status_of(&seen), "Unschedulable");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("True"), Some("NoGPUs"))
    );
    let event = seen
        .iter()
        .find(|s| s.1.contains("/events"))
        .expect("an Unschedulable event");
    assert_eq!(event.2["reason"], "Unschedulable");
}

#[tokio::test]
async fn queue_depth_scales_up_and_says_why() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4}));
    let (ctx, server, tx) = context(&[("http://10.0.0.1:8080", 20.0)]);
    let mut script = reads(vec![pod(&d, 0, 0, "10.0.0.1", json!({}))], inventory());
    script.push(Expect(Method::POST, "/pods", 201, Value::Null));
    script.push(Expect(Method::POST, "/pods", 201, Value::Null));
    tx.send(writes_after(&d, script)).unwrap();
    reconcile(Arc::new(d), ctx).await.unwrap();
    let seen = server.await.unwrap();
    let created: Vec<String> = seen
        .iter()
        .filter(|s| s.0 == Method::POST && s.1.contains("/pods"))
        .map(|s| s.2["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        created,
        ["smollm-1", "smollm-2"],
        "20 in flight / 4 per replica, capped at max 3"
    );
    let gpus: Vec<&Value> = seen
        .iter()
        .filter(|s| s.0 == Method::POST && s.1.contains("/pods"))
        .map(|s| &s.2["spec"]["nodeName"])
        .collect();
    assert_eq!(gpus.len(), 2);
    let status = status_of(&seen);
    assert_eq!(status["desiredReplicas"], 3);
    assert_eq!(status["queueDepth"], 20);
    assert!(
        status["lastScaleReason"]
            .as_str()
            .unwrap()
            .contains("queue depth"),
        "{status}"
    );
    let ev = seen
        .iter()
        .find(|s| s.1.contains("/events"))
        .expect("a scale event");
    assert_eq!(ev.2["reason"], "ScaledUp");
}

#[tokio::test]
async fn scale_down_drains_first_and_deletes_only_when_empty() {
    let d = deployment(json!({"autoscale": false, "minReplicas": 1, "maxReplicas": 3}));
    let busy = ("http://10.0.0.1:8080", 3.0);
    let (ctx, server, tx) = context(&[busy, ("http://10.0.0.2:8080", 1.0)]);
    let pods = vec![
        pod(&d, 0, 0, "10.0.0.1", json!({})),
        pod(&d, 1, 1, "10.0.0.2", json!({})),
    ];
    let mut script = reads(pods, inventory());
    script.push(Expect(
        Method::PATCH,
        "/pods/smollm-1",
        200,
        pod(&d, 1, 1, "10.0.0.2", json!({})),
    ));
    tx.send(writes_after(&d, script)).unwrap();
    reconcile(Arc::new(d.clone()), ctx).await.unwrap();
    let seen = server.await.unwrap();
    let drain = seen
        .iter()
        .find(|s| s.1.contains("/pods/smollm-1"))
        .unwrap();
    assert_eq!(
        drain.2["metadata"]["labels"][LABEL_SERVING], "false",
        "taken out of the Service"
    );
    assert!(!seen.iter().any(|s| s.0 == Method::DELETE));

    // Next pass: still one request in flight: nothing deleted. Then empty: deleted.
    for (in_flight, deletes) in [(1.0, false), (0.0, true)] {
        let (ctx, server, tx) = context(&[busy, ("http://10.0.0.2:8080", in_flight)]);
        let draining = pod(&d, 1, 1, "10.0.0.2", json!({LABEL_SERVING: "false"}));
        let pods = vec![pod(&d, 0, 0, "10.0.0.1", json!({})), draining];
        let mut script = reads(pods, inventory());
        if deletes {
            script.push(Expect(
                Method::DELETE,
                "/pods/smollm-1",
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ));
        }
        tx.send(writes_after(&d, script)).unwrap();
        reconcile(Arc::new(d.clone()), ctx).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(
            seen.iter().any(|s| s.0 == Method::DELETE),
            deletes,
            "in flight {in_flight}"
        );
    }
}

#[tokio::test]
async fn a_spec_change_surges_a_new_replica_before_draining_the_old() {
    let d = deployment(json!({"autoscale": false, "minReplicas": 1, "maxReplicas": 3}));
    let (ctx, server, tx) = context(&[("http://10.0.0.1:8080", 0.0)]);
    let old = pod(&d, 0, 0, "10.0.0.1", json!({LABEL_TEMPLATE: "0000000000"}));
    let mut script = reads(vec![old], inventory());
    script.push(Expect(Method::POST, "/pods", 201, Value::Null));
    tx.send(writes_after(&d, script)).unwrap();
    reconcile(Arc::new(d), ctx).await.unwrap();
    let seen = server.await.unwrap();
    let created = seen
        .iter()
        .find(|s| s.0 == Method::POST && s.1.contains("/pods"))
        .unwrap();
    assert_eq!(created.2["metadata"]["name"], "smollm-1");
    assert_eq!(created.2["spec"]["nodeName"], "gpu-a");
    assert!(
        !seen.iter().any(|s| s.1.contains("/pods/smollm-0")),
        "the old replica serves on"
    );
}

#[tokio::test]
async fn delete_drains_every_replica_before_the_finalizer_goes() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    d.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now(),
    ));
    let (ctx, server, tx) = context(&[("http://10.0.0.1:8080", 2.0)]);
    tx.send(vec![
        Expect(
            Method::GET,
            "/namespaces/default/pods?",
            200,
            list("PodList", vec![pod(&d, 0, 0, "10.0.0.1", json!({}))]),
        ),
        Expect(Method::PATCH, "/pods/smollm-0", 200, Value::Null),
    ])
    .unwrap();
    let e = reconcile(Arc::new(d.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Draining(1)), "{e}");
    assert_eq!(
        error_policy(Arc::new(d), &e, ctx),
        Action::requeue(Duration::from_secs(2))
    );
    let seen = server.await.unwrap();
    assert_eq!(seen[1].2["metadata"]["labels"][LABEL_SERVING], "false");
}

#[tokio::test]
async fn an_unsizeable_model_is_an_invalid_spec_condition_and_nothing_is_touched() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    d.spec.model.parameters = None;
    let (ctx, server, tx) = context(&[("http://10.0.0.1:8080", 0.0)]);
    let mut script = reads(vec![pod(&d, 0, 0, "10.0.0.1", json!({}))], inventory());
    script.push(status_write(&d));
    tx.send(script).unwrap();
    reconcile(Arc::new(d), ctx).await.unwrap();
    let seen = server.await.unwrap();
    assert!(!seen
        .iter()
        .any(|s| s.0 == Method::DELETE || (s.0 == Method::POST && s.1.contains("/pods"))));
    let cond = condition(&status_of(&seen), "InvalidSpec");
    assert_eq!(cond["status"], "True");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("spec.model.parameters"),
        "{cond}"
    );
}
