//! The reconciler against a mocked API server (kube-rs's tower-test pattern, as in
//! kube-rs/controller-rs). Reads come from caches the test fills; each test scripts the
//! writes a pass must make, in order, matched on the method, the exact path, the parsed
//! query and the content type, with the answers. Any request not in the script fails the
//! test, also after the script ends; Events are answered whenever they come, and
//! recorded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};

use super::pods::with_image;
use super::*;
use crate::scrape::{ScrapeError, WorkerLoad};
use gpuscale_crds::GpuInventory;
use k8s_openapi::api::core::v1::{LocalObjectReference, Node};

/// Loads by worker URL, and the GPUs each worker reports; a worker not listed fails to
/// scrape.
#[derive(Default)]
struct Loads(
    Mutex<HashMap<String, f64>>,
    Mutex<HashMap<String, Vec<String>>>,
    /// How each worker reports its start (a download under way).
    Mutex<HashMap<String, crate::scrape::Startup>>,
);

impl Loads {
    fn set<'a>(&self, loads: impl IntoIterator<Item = (&'a str, f64)>) {
        *self.0.lock().unwrap() = loads.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    }
}

impl Scrape for Loads {
    fn load<'a>(&'a self, base: &'a str) -> BoxFuture<'a, Result<WorkerLoad, ScrapeError>> {
        let r = self
            .0
            .lock()
            .unwrap()
            .get(base)
            .map(|&v| WorkerLoad {
                waiting: 0.0,
                running: v,
                requests_total: 0.0,
                generated_tokens_total: 0.0,
                gpus: self
                    .1
                    .lock()
                    .unwrap()
                    .get(base)
                    .cloned()
                    .unwrap_or_default(),
                startup: self
                    .2
                    .lock()
                    .unwrap()
                    .get(base)
                    .cloned()
                    .unwrap_or_default(),
            })
            .ok_or(ScrapeError::Http {
                url: base.into(),
                message: "connection refused".into(),
            });
        Box::pin(async move { r })
    }
}

/// A clock the test moves.
struct TestClock {
    start: (Instant, jiff::Timestamp),
    offset: Mutex<Duration>,
}

impl TestClock {
    fn new() -> Arc<TestClock> {
        Arc::new(TestClock {
            start: (Instant::now(), jiff::Timestamp::now()),
            offset: Mutex::new(Duration::ZERO),
        })
    }

    fn set(&self, secs: u64) {
        *self.offset.lock().unwrap() = Duration::from_secs(secs);
    }
}

impl Clock for TestClock {
    fn now(&self) -> (Instant, jiff::Timestamp) {
        let o = *self.offset.lock().unwrap();
        let wall = self
            .start
            .1
            .checked_add(jiff::SignedDuration::try_from(o).unwrap())
            .unwrap();
        (self.start.0 + o, wall)
    }
}

const POD_PATH: &str = "/api/v1/namespaces/default/pods";
const DEPLOYMENT_PATH: &str =
    "/apis/gpuscale.dev/v1alpha1/namespaces/default/inferencedeployments/smollm";
const STATUS_PATH: &str =
    "/apis/gpuscale.dev/v1alpha1/namespaces/default/inferencedeployments/smollm/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

/// One expected request and its answer (`Null`: echo the request body).
struct Expect {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<&'static str>,
    code: u16,
    answer: Value,
}

fn expect(method: Method, path: &str, content_type: Option<&'static str>) -> Expect {
    Expect {
        method,
        path: path.into(),
        query: BTreeMap::new(),
        content_type,
        code: 200,
        answer: Value::Null,
    }
}

impl Expect {
    fn query(mut self, q: &[(&str, &str)]) -> Self {
        self.query = q
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }

    fn reply(mut self, code: u16, answer: Value) -> Self {
        self.code = code;
        self.answer = answer;
        self
    }
}

/// A request as the mock saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    body: Value,
}

/// What the mock saw: the scripted requests and the Events.
#[derive(Debug, Default)]
struct Log {
    requests: Vec<Seen>,
    events: Vec<Value>,
    /// For each Event, how many scripted requests had come before it.
    event_after: Vec<usize>,
}

impl Log {
    fn posts(&self, path: &str) -> Vec<&Value> {
        self.requests
            .iter()
            .filter(|s| s.method == Method::POST && s.path == path)
            .map(|s| &s.body)
            .collect()
    }

    fn status(&self) -> Value {
        self.requests
            .iter()
            .rev()
            .find(|s| s.path == STATUS_PATH)
            .map(|s| s.body["status"].clone())
            .expect("a status patch")
    }

    fn event(&self, reason: &str) -> Option<&Value> {
        self.events.iter().find(|e| e["reason"] == reason)
    }

    /// Whether the status had been written when the first Event with `reason` came.
    fn status_before(&self, reason: &str) -> bool {
        self.events
            .iter()
            .zip(&self.event_after)
            .find(|(e, _)| e["reason"] == reason)
            .is_some_and(|(_, &n)| self.requests[..n].iter().any(|s| s.path == STATUS_PATH))
    }
}

/// The mocked API server; it runs until the last client of it is dropped.
struct Mock {
    server: tokio::task::JoinHandle<Log>,
}

impl Mock {
    /// The client of a mock that answers `script`, in order.
    fn start(script: Vec<Expect>) -> (Client, Mock) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let server = tokio::spawn(async move {
            let mut script: VecDeque<Expect> = script.into();
            let mut log = Log::default();
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().clone();
                let path = req.uri().path().to_string();
                let query: BTreeMap<String, String> = req
                    .uri()
                    .query()
                    .map(|q| {
                        url::form_urlencoded::parse(q.as_bytes())
                            .into_owned()
                            .collect()
                    })
                    .unwrap_or_default();
                let content_type = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                if path == EVENTS_PATH || path.starts_with(&format!("{EVENTS_PATH}/")) {
                    log.events.push(body.clone());
                    log.event_after.push(log.requests.len());
                    let code = if method == Method::POST { 201 } else { 200 };
                    send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(serde_json::to_vec(&body).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                let Some(e) = script.pop_front() else {
                    panic!("unexpected request {method} {path}?{query:?} after the script ended");
                };
                assert_eq!(
                    (&method, &path, &query),
                    (&e.method, &e.path, &e.query),
                    "request {} of the script",
                    log.requests.len() + 1
                );
                if let Some(ct) = e.content_type {
                    assert_eq!(
                        content_type.as_deref(),
                        Some(ct),
                        "content type of {method} {path}"
                    );
                }
                log.requests.push(Seen {
                    method,
                    path,
                    body: body.clone(),
                });
                let answer = if e.answer.is_null() { body } else { e.answer };
                send.send_response(
                    Response::builder()
                        .status(e.code)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
            assert!(
                script.is_empty(),
                "requests never made: {:?}",
                script
                    .iter()
                    .map(|e| format!("{} {}", e.method, e.path))
                    .collect::<Vec<_>>()
            );
            log
        });
        (client, Mock { server })
    }

    /// Drops the context (its clients) and returns what the mock saw.
    async fn finish(self, ctx: Arc<Context>) -> Log {
        drop(ctx);
        self.server.await.expect("the mock server")
    }
}

/// Caches holding `pods` on one node with three L4 GPUs.
fn cache(pods: Vec<Value>) -> Cache {
    let pods = pods
        .into_iter()
        .map(|p| serde_json::from_value(p).unwrap())
        .collect();
    Cache::of(pods, vec![node()], vec![inventory()])
}

/// The defaults, with `file://` models allowed (the tests' models are node files).
fn node_models() -> Config {
    let mut c = Config::default();
    c.model_cache.host_path_models = true;
    c
}

/// A context over `client` and `cache`, with workers loaded as `loads`.
fn context(
    client: Client,
    cache: Cache,
    loads: &[(&str, f64)],
    clock: Arc<TestClock>,
) -> Arc<Context> {
    let scraper = Loads::default();
    scraper.set(loads.iter().copied());
    Context::with_cache(
        client,
        node_models(),
        Arc::new(scraper),
        Arc::new(Metrics::default()),
        cache,
        clock,
    )
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
        },
        // Read before, by a probe pod (SmolLM2-135M's header).
        "status": {"model": {"source": "file:///nowhere/smollm2.gguf", "sizedFrom": "Header",
            "readBy": "probe pod smollm-model-probe on gpu-a", "observedAt": "2026-11-24T09:00:00Z",
            "header": smollm2_header()}},
    }))
    .unwrap()
}

/// SmolLM2-135M-Instruct Q4_1's header, as `inference-worker inspect --json` prints it.
fn smollm2_header() -> Value {
    json!({"architecture": "llama", "parameters": 134_515_008u64, "layers": 30,
        "embedding": 576, "heads": 9, "kvHeads": 3, "headDim": 64, "feedForward": 1536,
        "contextLength": 8192, "vocab": 49152, "weightBytes": 96_576_768u64,
        "tensorBytes": {"F32": 140_544, "Q4_1": 66_355_200u64, "Q8_0": 30_081_024u64},
        "tokenizer": "gpt2", "chatTemplate": true})
}

/// The deployment as the controller's watch hands it over.
fn object(d: &InferenceDeployment) -> Arc<Stored> {
    Arc::new(Stored::of(d))
}

fn inventory() -> GpuInventory {
    serde_json::from_value(json!({
        "apiVersion": "gpuscale.dev/v1alpha1", "kind": "GpuInventory",
        "metadata": {"name": "gpu-a"},
        "spec": {"node": "gpu-a", "gpuCount": 3, "gpus": [
            {"index": 0, "uuid": "GPU-0", "product": "NVIDIA L4", "memoryTotalBytes": 24u64 << 30, "memoryFreeBytes": 24u64 << 30},
            {"index": 1, "uuid": "GPU-1", "product": "NVIDIA L4", "memoryTotalBytes": 24u64 << 30, "memoryFreeBytes": 24u64 << 30},
            {"index": 2, "uuid": "GPU-2", "product": "NVIDIA L4", "memoryTotalBytes": 24u64 << 30, "memoryFreeBytes": 24u64 << 30}
        ]}
    }))
    .unwrap()
}

fn node() -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-a"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"nvidia.com/gpu": "3"}}
    }))
    .unwrap()
}

/// A ready replica pod of `d` at GPU `gpu` with IP `ip`.
fn pod(d: &InferenceDeployment, index: u32, gpu: u32, ip: &str, extra_labels: Value) -> Value {
    let mut labels = json!({
        "app.kubernetes.io/managed-by": "gpuscale", LABEL_DEPLOYMENT: "smollm",
        LABEL_REPLICA: index.to_string(), LABEL_TEMPLATE: template_hash(&with_image(d.clone(), &node_models())), LABEL_SERVING: "true",
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

fn create_pod() -> Expect {
    expect(Method::POST, POD_PATH, Some(JSON)).reply(201, Value::Null)
}

fn drain(index: u32) -> Expect {
    expect(
        Method::PATCH,
        &format!("{POD_PATH}/smollm-{index}"),
        Some(MERGE),
    )
}

fn delete(index: u32) -> Expect {
    expect(
        Method::DELETE,
        &format!("{POD_PATH}/smollm-{index}"),
        Some(JSON),
    )
    .reply(
        200,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    )
}

fn apply_service() -> Expect {
    expect(
        Method::PATCH,
        "/api/v1/namespaces/default/services/smollm",
        Some(APPLY),
    )
    .query(&[("fieldManager", FIELD_MANAGER), ("force", "true")])
}

fn write_status(d: &InferenceDeployment) -> Expect {
    expect(Method::PATCH, STATUS_PATH, Some(MERGE)).reply(200, serde_json::to_value(d).unwrap())
}

fn server_error() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "etcdserver: leader changed", "reason": "InternalError", "code": 500})
}

/// `steps`, then the Service apply and the status write every pass ends with.
fn pass(d: &InferenceDeployment, mut steps: Vec<Expect>) -> Vec<Expect> {
    steps.push(apply_service());
    steps.push(write_status(d));
    steps
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

/// The placement a pod (or a patch of one) records in its annotation.
fn placement_in(pod: &Value) -> PodPlacement {
    serde_json::from_str(
        pod["metadata"]["annotations"][ANNOTATION_PLACEMENT]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

fn created_names(log: &Log) -> Vec<String> {
    log.posts(POD_PATH)
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// A cached copy without the finalizer (the watch has not yet brought the pass's own
/// finalizer patch): the pass reads the object, finds the finalizer there and goes on,
/// instead of a JSON patch whose test of `/metadata/finalizers` would fail with 422.
#[tokio::test]
async fn a_stale_copy_without_the_finalizer_is_read_again_not_patched() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let mut stale = d.clone();
    stale.metadata.finalizers = None;
    let get =
        expect(Method::GET, DEPLOYMENT_PATH, None).reply(200, serde_json::to_value(&d).unwrap());
    let (client, mock) = Mock::start(pass(&d, vec![get, create_pod()]));
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    reconcile(object(&stale), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    assert_eq!(created_names(&log), ["smollm-0"]);
}

/// A cached copy without the finalizer whose object is gone: nothing is written.
#[tokio::test]
async fn a_copy_without_the_finalizer_of_a_deleted_object_writes_nothing() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    d.metadata.finalizers = None;
    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "NotFound", "code": 404});
    let (client, mock) = Mock::start(vec![
        expect(Method::GET, DEPLOYMENT_PATH, None).reply(404, gone)
    ]);
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    let action = reconcile(object(&d), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    let log = mock.finish(ctx).await;
    assert_eq!(log.requests.len(), 1);
}

#[tokio::test]
async fn create_places_a_pinned_owned_pod_and_a_service() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let (client, mock) = Mock::start(pass(&d, vec![create_pod()]));
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    let action = reconcile(object(&d), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    let log = mock.finish(ctx).await;
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(log.posts(POD_PATH)[0].clone()).unwrap();
    assert_eq!(pod.name_any(), "smollm-0");
    let spec = pod.spec.unwrap();
    assert_eq!(spec.node_name, None, "the scheduler binds it");
    let term = &spec
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms[0];
    let by_name = &term.match_fields.as_ref().unwrap()[0];
    assert_eq!(
        (
            by_name.key.as_str(),
            by_name.operator.as_str(),
            by_name.values.as_deref()
        ),
        ("metadata.name", "In", Some(&["gpu-a".to_string()][..]))
    );
    assert_eq!(
        spec.tolerations.unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
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
    let svc = &log.requests[1].body;
    assert_eq!(svc["spec"]["selector"][LABEL_SERVING], "true");
    let status = log.status();
    assert_eq!(status["desiredReplicas"], 1);
    assert_eq!(status["placements"][0]["node"], "gpu-a");
    assert_eq!(condition(&status, "Unschedulable")["status"], "False");
}

#[tokio::test]
async fn with_a_price_table_status_and_metrics_say_what_the_replicas_cost() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let (client, mock) = Mock::start(pass(&d, vec![create_pod()]));
    let mut config = node_models();
    config.prices = crate::cost::PriceTable::parse(&["H100=2.49", "L4=0.8"]).unwrap();
    let ctx = Context::with_cache(
        client,
        config,
        Arc::new(Loads::default()),
        Arc::new(Metrics::default()),
        cache(vec![]),
        TestClock::new(),
    );
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let text = ctx.metrics.encode();
    let log = mock.finish(ctx).await;
    // The placement records the product it priced, on the pod and in status.
    let pod = &log.posts(POD_PATH)[0];
    assert_eq!(placement_in(pod).product.as_deref(), Some("NVIDIA L4"));
    let status = log.status();
    assert_eq!(status["placements"][0]["product"], "NVIDIA L4");
    let cost = &status["cost"];
    assert_eq!(cost["dollarsPerHour"], 0.8, "{status}");
    assert_eq!(cost["unpricedGpus"], 0);
    assert!(
        cost.get("dollarsPerMillionTokens").is_none(),
        "no tokens yet: {cost}"
    );
    assert!(
        text.contains(
            "gpuscale_operator_deployment_cost_dollars_per_hour{deployment=\"default/smollm\"} 0.8"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn the_mock_fails_a_pass_whose_request_differs_in_query_or_content_type() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    // The script wants a server-side apply without `force`; the pass sends `force=true`.
    let mut script = pass(&d, vec![create_pod()]);
    script[1] = expect(
        Method::PATCH,
        "/api/v1/namespaces/default/services/smollm",
        Some(APPLY),
    )
    .query(&[("fieldManager", FIELD_MANAGER)]);
    let (client, mock) = Mock::start(script);
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    let _ = reconcile(object(&d), ctx.clone()).await;
    drop(ctx);
    assert!(
        mock.server.await.is_err(),
        "the mismatch must fail the test"
    );

    // A merge patch where a server-side apply is scripted fails the same way.
    let mut script = pass(&d, vec![create_pod()]);
    script[1].content_type = Some(MERGE);
    let (client, mock) = Mock::start(script);
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    let _ = reconcile(object(&d), ctx.clone()).await;
    drop(ctx);
    assert!(mock.server.await.is_err());
}

#[tokio::test]
async fn a_409_on_create_is_someone_else_s_copy_not_an_error_or_a_duplicate() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "pods \"smollm-0\" already exists", "reason": "AlreadyExists", "code": 409});
    let (client, mock) = Mock::start(pass(&d, vec![create_pod().reply(409, conflict)]));
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    assert_eq!(log.posts(POD_PATH).len(), 1);
}

#[tokio::test]
async fn a_500_fails_the_pass_is_counted_by_kind_and_backs_off() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    // The status is still written after the failed step, with the decision.
    let script = vec![create_pod().reply(500, server_error()), write_status(&d)];
    let (client, mock) = Mock::start(script);
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    let obj = object(&d);
    let e = reconcile(obj.clone(), ctx.clone()).await.unwrap_err();
    assert!(e.to_string().contains("etcdserver: leader changed"), "{e}");
    let first = error_policy(obj.clone(), &e, ctx.clone());
    let second = error_policy(obj, &e, ctx.clone());
    assert_ne!(first, second, "the retry interval grows");
    let text = ctx.metrics.encode();
    assert!(
        text.contains("gpuscale_operator_reconcile_errors_total{kind=\"api_server_error\"} 1"),
        "{text}"
    );
    let log = mock.finish(ctx).await;
    assert_eq!(log.status()["desiredReplicas"], 1);
}

#[tokio::test]
async fn missing_inventory_is_reported_as_unschedulable_and_asks_for_a_node() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let (client, mock) = Mock::start(pass(&d, vec![create_pod()]));
    let empty = Cache::of(vec![], vec![], vec![]);
    let ctx = context(client, empty, &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    // No replica without a place: one pending pod a cluster autoscaler adds a GPU node
    // for (issue #24 item 9), which no Service or replica count sees.
    let posts = log.posts(POD_PATH);
    assert_eq!(posts.len(), 1, "{posts:?}");
    let request = &posts[0];
    assert_eq!(request["metadata"]["name"], "smollm-capacity-0");
    assert_eq!(
        request["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert_eq!(request["spec"]["restartPolicy"], "Never");
    assert!(request["metadata"]["annotations"][ANNOTATION_PLACEMENT].is_null());
    assert!(request["metadata"]["labels"][LABEL_DEPLOYMENT].is_null());
    assert!(
        request["spec"]["affinity"].is_null(),
        "not pinned to any node"
    );
    assert!(log.event("CapacityRequested").is_some(), "{:?}", log.events);
    let cond = condition(&log.status(), "Unschedulable");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("True"), Some("NoGPUs"))
    );
    assert!(log.event("Unschedulable").is_some(), "{:?}", log.events);
}

#[tokio::test]
async fn queue_depth_scales_up_and_says_why() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4}));
    let (client, mock) = Mock::start(pass(&d, vec![create_pod(), create_pod()]));
    let pods = vec![pod(&d, 0, 0, "10.0.0.1", json!({}))];
    let ctx = context(
        client,
        cache(pods),
        &[("http://10.0.0.1:8080", 20.0)],
        TestClock::new(),
    );
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    assert_eq!(
        created_names(&log),
        ["smollm-1", "smollm-2"],
        "20 in flight / 4 per replica, capped at max 3"
    );
    let gpus: Vec<&Value> = log
        .posts(POD_PATH)
        .iter()
        .map(|p| &p["metadata"]["annotations"][ANNOTATION_PLACEMENT])
        .collect();
    assert_ne!(gpus[0], gpus[1], "two replicas, two GPUs");
    let status = log.status();
    assert_eq!(status["desiredReplicas"], 3);
    assert_eq!(status["queueDepth"], 20);
    assert!(
        status["lastScaleReason"]
            .as_str()
            .unwrap()
            .contains("queue depth"),
        "{status}"
    );
    let ev = log.event("ScaledUp").expect("a scale event");
    assert_eq!(
        ev["note"].as_str().unwrap().split(':').next(),
        Some("1 → 3")
    );
    // The Event comes after the status that says it: a client that sees the Event and
    // then reads the deployment finds the new desired count.
    assert!(log.status_before("ScaledUp"), "{:?}", log.requests);
}

#[tokio::test]
async fn scale_down_drains_first_and_deletes_only_when_empty() {
    let d = deployment(json!({"autoscale": false, "minReplicas": 1, "maxReplicas": 3}));
    let busy = ("http://10.0.0.1:8080", 3.0);
    let drained = pod(&d, 1, 1, "10.0.0.2", json!({}));
    let (client, mock) = Mock::start(pass(&d, vec![drain(1).reply(200, drained)]));
    let pods = vec![
        pod(&d, 0, 0, "10.0.0.1", json!({})),
        pod(&d, 1, 1, "10.0.0.2", json!({})),
    ];
    let ctx = context(
        client,
        cache(pods),
        &[busy, ("http://10.0.0.2:8080", 1.0)],
        TestClock::new(),
    );
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    assert_eq!(
        log.requests[0].body["metadata"]["labels"][LABEL_SERVING], "false",
        "taken out of the Service"
    );
    assert_eq!(
        log.requests[0].body["metadata"]["uid"], "pod-1",
        "that pod only (its UID a precondition)"
    );

    // Later passes: deleted once empty, and only once every client can have dropped
    // it from its endpoint list (ENDPOINTS_SETTLE after the drain began): an empty
    // replica deleted sooner would answer 503 to a request sent on the old list.
    let now = jiff::Timestamp::now();
    let ago = |s: i64| (now - jiff::SignedDuration::from_secs(s)).to_string();
    for (in_flight, since, deletes) in [
        (1.0, ago(60), false),
        (0.0, ago(1), false),
        (0.0, ago(6), true),
    ] {
        let steps = if deletes { vec![delete(1)] } else { vec![] };
        let (client, mock) = Mock::start(pass(&d, steps));
        let mut draining = pod(&d, 1, 1, "10.0.0.2", json!({LABEL_SERVING: "false"}));
        draining["metadata"]["annotations"][ANNOTATION_DRAINING_SINCE] = json!(since);
        let pods = vec![pod(&d, 0, 0, "10.0.0.1", json!({})), draining];
        let ctx = context(
            client,
            cache(pods),
            &[busy, ("http://10.0.0.2:8080", in_flight)],
            TestClock::new(),
        );
        reconcile(object(&d), ctx.clone()).await.unwrap();
        let log = mock.finish(ctx).await;
        assert_eq!(
            log.requests.iter().any(|s| s.method == Method::DELETE),
            deletes,
            "in flight {in_flight}, draining since {since}"
        );
    }
}

#[tokio::test]
async fn a_spec_change_surges_a_new_replica_before_draining_the_old() {
    let d = deployment(json!({"autoscale": false, "minReplicas": 1, "maxReplicas": 3}));
    let (client, mock) = Mock::start(pass(&d, vec![create_pod()]));
    let old = pod(&d, 0, 0, "10.0.0.1", json!({LABEL_TEMPLATE: "0000000000"}));
    let ctx = context(
        client,
        cache(vec![old]),
        &[("http://10.0.0.1:8080", 0.0)],
        TestClock::new(),
    );
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    assert_eq!(created_names(&log), ["smollm-1"]);
    assert_eq!(
        log.posts(POD_PATH)[0]["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
            ["matchFields"][0]["values"][0],
        "gpu-a"
    );
    // The script has no patch or delete of smollm-0: the old replica serves on.
}

#[tokio::test]
async fn delete_drains_every_replica_before_the_finalizer_goes() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    d.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now(),
    ));
    let (client, mock) = Mock::start(vec![drain(0)]);
    let pods = vec![pod(&d, 0, 0, "10.0.0.1", json!({}))];
    let ctx = context(
        client,
        cache(pods),
        &[("http://10.0.0.1:8080", 2.0)],
        TestClock::new(),
    );
    let e = reconcile(object(&d), ctx.clone()).await.unwrap_err();
    assert!(matches!(e, Error::Draining(1)), "{e}");
    assert_eq!(
        error_policy(object(&d), &e, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    let text = ctx.metrics.encode();
    assert!(
        text.contains("gpuscale_operator_reconciles_total{result=\"draining\"} 1")
            && !text.contains("reconcile_errors_total{"),
        "a drain is counted, and not as a failure: {text}"
    );
    let log = mock.finish(ctx).await;
    assert_eq!(
        log.requests[0].body["metadata"]["labels"][LABEL_SERVING],
        "false"
    );
}

/// Deleting a deployment follows the plan's rule towards no replica: a loading replica
/// is deleted at once, a ready one drained, a drained one deleted once out of every
/// endpoint list and empty, and one that left the Service a moment ago kept.
#[tokio::test]
async fn delete_removes_each_replica_by_the_plan_s_rule() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    d.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now(),
    ));
    let now = jiff::Timestamp::now();
    let ago = |s: i64| json!((now - jiff::SignedDuration::from_secs(s)).to_string());
    // The fixture's node has three GPUs: the loading replica is not placed on one.
    let mut loading = pod(&d, 1, 1, "10.0.0.2", json!({}));
    loading["status"]["conditions"] = json!([]);
    loading["metadata"]["annotations"] = json!({});
    // Made just now: loading, not stuck (a replica loading for days has failed).
    loading["metadata"]["creationTimestamp"] = json!(now.to_string());
    let mut out = pod(&d, 2, 1, "10.0.0.3", json!({LABEL_SERVING: "false"}));
    out["metadata"]["annotations"][ANNOTATION_DRAINING_SINCE] = ago(60);
    let mut leaving = pod(&d, 3, 2, "10.0.0.4", json!({LABEL_SERVING: "false"}));
    leaving["metadata"]["annotations"][ANNOTATION_DRAINING_SINCE] = ago(1);
    let (client, mock) = Mock::start(vec![delete(2), delete(1), drain(0)]);
    let pods = vec![pod(&d, 0, 0, "10.0.0.1", json!({})), loading, out, leaving];
    let ctx = context(
        client,
        cache(pods),
        &[
            ("http://10.0.0.1:8080", 2.0),
            ("http://10.0.0.2:8080", 0.0),
            ("http://10.0.0.3:8080", 0.0),
            ("http://10.0.0.4:8080", 0.0),
        ],
        TestClock::new(),
    );
    let e = reconcile(object(&d), ctx.clone()).await.unwrap_err();
    assert!(matches!(e, Error::Draining(4)), "{e}");
    let log = mock.finish(ctx).await;
    let done: Vec<(String, String)> = log
        .requests
        .iter()
        .map(|r| (r.method.to_string(), r.path.clone()))
        .collect();
    assert_eq!(
        done,
        [
            ("DELETE".into(), format!("{POD_PATH}/smollm-2")),
            ("DELETE".into(), format!("{POD_PATH}/smollm-1")),
            ("PATCH".into(), format!("{POD_PATH}/smollm-0")),
        ]
    );
}

#[test]
fn a_replica_on_four_gpus_splits_its_model_over_all_four() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 1}));
    d.spec.model.source = "https://models.example/llama.gguf".into();
    d.spec.resources.gpus_per_replica = 4;
    let mount = super::pods::model_mount(&d.spec.model, &ModelCache::default()).unwrap();
    let p = PodPlacement {
        node: "dgx-1".into(),
        gpus: vec![4, 5, 6, 7],
        uuids: (4..8).map(|i| format!("GPU-{i}")).collect(),
        bytes_per_gpu: 42 << 30,
        exclusive: true,
        assigned: false,
        dra: true,
        product: Some("NVIDIA H100 80GB HBM3".into()),
    };
    let args = super::pods::worker_args(&d, &mount, &p).join(" ");
    // The container sees its four GPUs as cuda:0..3, whichever they are on the node;
    // the budget is per device.
    assert!(
        args.contains("--device=cuda:0,cuda:1,cuda:2,cuda:3 ")
            && args.contains(&format!("--memory-budget={}", 42u64 << 30)),
        "{args}"
    );
}

#[tokio::test]
async fn a_stored_tensor_parallel_is_refused_with_its_new_name() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    // Stored before the rename (the API server's CEL rule refuses it on new writes).
    d.spec.resources.tensor_parallel = Some(4);
    let (client, mock) = Mock::start(vec![write_status(&d)]);
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let cond = condition(&log.status(), "InvalidSpec");
    assert_eq!(cond["status"], "True");
    let message = cond["message"].as_str().unwrap();
    assert!(
        message.contains("set gpusPerReplica: 4 and remove tensorParallel"),
        "{message}"
    );
}

#[tokio::test]
async fn an_unsizeable_model_is_an_invalid_spec_condition_and_nothing_is_touched() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    d.spec.model.parameters = None;
    // The probe could not read the file (a minute ago), and nothing is declared.
    let model = d.status.as_mut().unwrap().model.as_mut().unwrap();
    model.header = None;
    model.sized_from = gpuscale_crds::SizedFrom::Declared;
    model.error = Some("inspect exited with 1: cannot read /nowhere/smollm2.gguf".into());
    model.observed_at = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60),
    );
    // status.model is written (now Unsized), then the InvalidSpec condition.
    let (client, mock) = Mock::start(vec![write_status(&d), write_status(&d)]);
    let pods = vec![pod(&d, 0, 0, "10.0.0.1", json!({}))];
    let ctx = context(
        client,
        cache(pods),
        &[("http://10.0.0.1:8080", 0.0)],
        TestClock::new(),
    );
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let cond = condition(&log.status(), "InvalidSpec");
    assert_eq!(cond["status"], "True");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("spec.model.parameters"),
        "{cond}"
    );
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("cannot read /nowhere/smollm2.gguf"),
        "{cond}"
    );
    assert_eq!(log.status()["model"]["sizedFrom"], "Unsized");
}

#[tokio::test]
async fn an_object_that_cannot_be_read_is_reported_and_skipped() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    let mut raw = serde_json::to_value(&d).unwrap();
    raw["spec"].as_object_mut().unwrap().remove("model");
    let obj = Arc::new(Stored::parse(&raw));
    let (client, mock) = Mock::start(vec![]);
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    let action = reconcile(obj, ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert!(ctx
        .metrics
        .encode()
        .contains("gpuscale_operator_reconciles_total{result=\"unreadable\"} 1"));
    let log = mock.finish(ctx).await;
    let ev = log
        .event("Unreadable")
        .expect("a Warning event on the object");
    assert!(
        ev["note"]
            .as_str()
            .unwrap()
            .contains("spec: missing field `model`"),
        "{ev}"
    );
    assert!(log.requests.is_empty(), "nothing written, nothing deleted");
}

/// The per-deployment autoscaler state survives a failed pass. The window's
/// recommendation of 2 (t = 200 s) must still hold at t = 302 s, after the pass at
/// t = 301 s failed on its drain patch; lost state would scale straight to 1.
#[tokio::test]
async fn a_500_on_the_drain_keeps_the_scale_down_window() {
    let mut d = deployment(
        json!({"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4,
                                  "warmReplicas": 0, "scaleDownWindowSeconds": 300}),
    );
    d.status = Some(gpuscale_crds::InferenceDeploymentStatus {
        desired_replicas: 3,
        ..d.status.clone().unwrap()
    });
    let pods: Vec<Value> = (0..3)
        .map(|i| pod(&d, i, i, &format!("10.0.0.{}", i + 1), json!({})))
        .collect();
    let urls = [
        "http://10.0.0.1:8080",
        "http://10.0.0.2:8080",
        "http://10.0.0.3:8080",
    ];
    let clock = TestClock::new();
    let loads = Arc::new(Loads::default());
    let (unused, _) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let base = Context::with_cache(
        Client::new(unused, "default"),
        node_models(),
        loads.clone(),
        Arc::new(Metrics::default()),
        cache(pods),
        clock.clone(),
    );
    // (time, in flight per replica, script, pass succeeds, desired after)
    let passes = [
        (0, 4.0, pass(&d, vec![]), true, 3),
        (200, 2.0, pass(&d, vec![]), true, 3),
        // Idle: the window (from 1 s) holds the 2 of 200 s: drain one; it answers 500.
        (
            301,
            0.0,
            vec![drain(2).reply(500, server_error()), write_status(&d)],
            false,
            2,
        ),
        // Still idle: the same window holds: one drain again, not two.
        (302, 0.0, pass(&d, vec![drain(2)]), true, 2),
    ];
    for (t, each, script, ok, desired) in passes {
        clock.set(t);
        loads.set(urls.iter().map(|u| (*u, each)));
        let (client, mock) = Mock::start(script);
        let ctx = base.with_client(client);
        assert_eq!(
            reconcile(object(&d), ctx.clone()).await.is_ok(),
            ok,
            "pass at {t} s"
        );
        let log = mock.finish(ctx).await;
        assert_eq!(
            log.status()["desiredReplicas"],
            desired,
            "after the pass at {t} s"
        );
    }
}

/// The controller can hand a pass an object older than the status the previous pass
/// wrote. The pass decides against its own last decision, so it neither repeats the
/// scale-up (nor its Event) nor creates the replicas again: the ones just created are
/// expected even before the pod cache shows them.
#[tokio::test]
async fn a_pass_on_a_stale_object_does_not_repeat_the_last_decision() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4}));
    // Both passes get this object: its status still says 1.
    d.status = Some(gpuscale_crds::InferenceDeploymentStatus {
        desired_replicas: 1,
        ..d.status.clone().unwrap()
    });
    let clock = TestClock::new();
    let (unused, _) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let base = context(
        Client::new(unused, "default"),
        cache(vec![pod(&d, 0, 0, "10.0.0.1", json!({}))]),
        &[("http://10.0.0.1:8080", 20.0)],
        clock.clone(),
    );
    let (client, mock) = Mock::start(pass(&d, vec![create_pod(), create_pod()]));
    let ctx = base.with_client(client);
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let first = mock.finish(ctx).await;
    assert!(first.event("ScaledUp").is_some());

    clock.set(1);
    let (client, mock) = Mock::start(pass(&d, vec![]));
    let ctx = base.with_client(client);
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let second = mock.finish(ctx).await;
    assert!(second.event("ScaledUp").is_none(), "{:?}", second.events);
    assert_eq!(second.status()["desiredReplicas"], 3);
    assert_eq!(second.status()["replicas"], 3, "the created replicas count");
}

#[tokio::test]
async fn a_node_with_an_untolerated_taint_is_not_offered_to_placement() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let mut tainted = node();
    tainted.spec = Some(
        serde_json::from_value(json!(
        {"taints": [{"key": "gpu", "value": "broken", "effect": "NoSchedule"}]}))
        .unwrap(),
    );
    let (client, mock) = Mock::start(pass(&d, vec![create_pod()]));
    let cache = Cache::of(vec![], vec![tainted], vec![inventory()]);
    let ctx = context(client, cache, &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    // No replica; only a request for a node this replica's pods tolerate.
    assert_eq!(created_names(&log), ["smollm-capacity-0"]);
    assert_eq!(condition(&log.status(), "Unschedulable")["status"], "True");
}

/// A pod the scheduler refuses: reported with the scheduler's message, deleted (its
/// placement released), and its node avoided, so the refusal does not loop.
#[tokio::test]
async fn a_pod_the_scheduler_refuses_is_reported_released_and_its_node_avoided() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.";
    let mut refused = pod(&d, 0, 0, "", json!({}));
    refused["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
        "status": "False", "reason": "Unschedulable", "message": message}]});
    let (client, mock) = Mock::start(pass(&d, vec![delete(0), create_pod()]));
    let ctx = context(client, cache(vec![refused]), &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    // No replacement on gpu-a, the only node: it is avoided for now, and the scheduler
    // found no GPU there: a cluster autoscaler is asked for a node for the replacement.
    assert_eq!(created_names(&log), ["smollm-capacity-1"]);
    let cond = condition(&log.status(), "Unschedulable");
    assert_eq!(cond["reason"], "SchedulerRejected");
    assert!(
        cond["message"].as_str().unwrap().contains(message),
        "{cond}"
    );
    let ev = log
        .event("ReplicaFailed")
        .expect("an event on the replaced replica");
    assert!(ev["note"].as_str().unwrap().contains(message));
}

/// A replica is deleted by its UID, not its name: the delete names the pod the pass saw
/// as its precondition, and the API's 409 for a failed precondition (that pod is gone,
/// another holds its name) is taken as "already gone", not as an error of the pass.
#[tokio::test]
async fn a_replica_is_deleted_by_its_uid_and_a_failed_precondition_means_gone() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let mut refused = pod(&d, 0, 0, "", json!({}));
    refused["status"] = json!({"phase": "Failed", "reason": "UnexpectedAdmissionError",
        "message": "Allocate failed"});
    let precondition_failed = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "Operation cannot be fulfilled on pods \"smollm-0\": Precondition failed: UID in precondition: pod-0, UID in object meta: pod-0b",
        "reason": "Conflict", "code": 409});
    let steps = vec![delete(0).reply(409, precondition_failed), create_pod()];
    let (client, mock) = Mock::start(pass(&d, steps));
    let ctx = context(client, cache(vec![refused]), &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let deletes: Vec<&Value> = log
        .requests
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(|s| &s.body)
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(
        deletes[0]["preconditions"]["uid"], "pod-0",
        "{}",
        deletes[0]
    );
    assert_eq!(created_names(&log), ["smollm-capacity-1"]);
}

/// A pod the node's kubelet refuses at admission (its device plugin had no GPU left, as
/// a capacity request that the scheduler bound there can hold it): reported, replaced,
/// and the node avoided for a while, rather than a pod made and failed there in a loop.
#[tokio::test]
async fn a_pod_the_kubelet_refuses_at_admission_is_replaced_and_its_node_avoided() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let message = "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. Requested: 1, Available: 0, which is unexpected";
    let mut refused = pod(&d, 0, 0, "", json!({}));
    refused["status"] = json!({"phase": "Failed", "reason": "UnexpectedAdmissionError",
        "message": message});
    let (client, mock) = Mock::start(pass(&d, vec![delete(0), create_pod()]));
    let ctx = context(client, cache(vec![refused]), &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    assert_eq!(
        created_names(&log),
        ["smollm-capacity-1"],
        "not again on gpu-a"
    );
    let cond = condition(&log.status(), "Unschedulable");
    let text = cond["message"].as_str().unwrap();
    assert!(
        text.contains("the kubelet of gpu-a refused smollm-0") && text.contains(message),
        "{cond}"
    );
}

/// A node known only by GPU Feature Discovery labels: placed by count, the pod asks the
/// device plugin for a GPU, and no UUID is made up (not in the pod, not in status).
/// A shared replica, which must name its GPU, is not placed there.
#[tokio::test]
async fn a_gfd_only_node_is_placed_by_count_with_no_invented_uuid() {
    let gfd: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "gfd-a", "labels": {"nvidia.com/gpu.count": "2",
            "nvidia.com/gpu.memory": "24576", "nvidia.com/gpu.product": "NVIDIA-L4"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"nvidia.com/gpu": "2"}}
    }))
    .unwrap();
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let (client, mock) = Mock::start(pass(&d, vec![create_pod()]));
    let cache = Cache::of(vec![], vec![gfd.clone()], vec![]);
    let ctx = context(client, cache, &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let pod = &log.posts(POD_PATH)[0];
    let text = pod.to_string();
    assert!(!text.contains("gfd-a/gpu"), "an invented UUID: {text}");
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    let placed = &log.status()["placements"][0];
    assert_eq!(
        (placed["gpus"].clone(), placed["gpuCount"].clone()),
        (json!([]), json!(1))
    );

    let mut shared = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    shared.spec.resources.sharing = gpuscale_crds::SharingMode::Shared;
    let (client, mock) = Mock::start(pass(&shared, vec![]));
    let cache = Cache::of(vec![], vec![gfd], vec![]);
    let ctx = context(client, cache, &[], TestClock::new());
    reconcile(object(&shared), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    assert!(
        log.posts(POD_PATH).is_empty(),
        "no sharing resource on the node"
    );
    let cond = condition(&log.status(), "Unschedulable");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("True"), Some("BindingUnavailable"))
    );
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("needs a GPU sharing resource"),
        "{cond}"
    );
}

/// A node that offers the device plugin's sharing resource takes a shared replica,
/// which asks for one share of it: never a bare NVIDIA_VISIBLE_DEVICES.
#[tokio::test]
async fn a_shared_replica_on_a_device_plugin_node_asks_for_the_sharing_resource() {
    let sliced: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "gpu-a"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"nvidia.com/gpu.shared": "12"}}
    }))
    .unwrap();
    let mut shared = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    shared.spec.resources.sharing = gpuscale_crds::SharingMode::Shared;
    let (client, mock) = Mock::start(pass(&shared, vec![create_pod()]));
    let cache = Cache::of(vec![], vec![sliced], vec![inventory()]);
    let ctx = context(client, cache, &[], TestClock::new());
    reconcile(object(&shared), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let pod = &log.posts(POD_PATH)[0];
    let limits = &pod["spec"]["containers"][0]["resources"]["limits"];
    assert_eq!(limits, &json!({"nvidia.com/gpu.shared": "1"}));
    assert!(!pod.to_string().contains("NVIDIA_VISIBLE_DEVICES"), "{pod}");
    assert_eq!(log.status()["placements"][0]["binding"], "SharingResource");
    // An exclusive replica finds no whole GPU there, and says so.
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
    let sliced = Cache::of(
        vec![],
        vec![serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-a"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"nvidia.com/gpu.shared": "12"}}}))
        .unwrap()],
        vec![inventory()],
    );
    let (client, mock) = Mock::start(pass(&d, vec![]));
    let ctx = context(client, sliced, &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let cond = condition(&log.status(), "Unschedulable");
    assert_eq!(cond["reason"], "BindingUnavailable", "{cond}");
}

/// The NVIDIA DRA driver's ResourceSlice for node gpu-a: three L4s, shareable or not.
fn dra_slice(shareable: bool) -> k8s_openapi::api::resource::v1::ResourceSlice {
    let devices: Vec<Value> = (0..3)
        .map(|i| {
            json!({"name": format!("gpu-{i}"), "allowMultipleAllocations": shareable,
                "attributes": {"uuid": {"string": format!("GPU-{i}")}, "index": {"int": i},
                               "productName": {"string": "NVIDIA L4"}},
                "capacity": {"memory": {"value": "24Gi"}}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": "gpu-a-gpu.nvidia.com"},
        "spec": {"driver": "gpu.nvidia.com", "nodeName": "gpu-a",
                 "pool": {"name": "gpu-a", "generation": 1, "resourceSliceCount": 1},
                 "devices": devices}
    }))
    .unwrap()
}

const CLAIM_PATH: &str = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims";

/// On a DRA node the pod references a ResourceClaim, made right after it and owned by
/// it, whose CEL selector names exactly the GPU placement chose; no device-plugin
/// resource is asked for. A shared replica claims its VRAM as consumable capacity.
#[tokio::test]
async fn a_dra_replica_claims_exactly_the_chosen_gpu() {
    let made = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "smollm-0", "namespace": "default", "uid": "pod-uid-0"}});
    for shareable in [false, true] {
        let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 4}));
        if shareable {
            d.spec.resources.sharing = gpuscale_crds::SharingMode::Shared;
        }
        let steps = vec![
            create_pod().reply(201, made.clone()),
            expect(Method::POST, CLAIM_PATH, Some(JSON)).reply(201, Value::Null),
        ];
        let (client, mock) = Mock::start(pass(&d, steps));
        let cache = Cache::of(vec![], vec![node()], vec![inventory()])
            .with_slices(vec![dra_slice(shareable)]);
        let ctx = context(client, cache, &[], TestClock::new());
        reconcile(object(&d), ctx.clone()).await.unwrap();
        let log = mock.finish(ctx).await;
        let pod = &log.posts(POD_PATH)[0];
        assert_eq!(
            pod["spec"]["resourceClaims"],
            json!([{"name": "gpus", "resourceClaimName": "smollm-0-gpus"}])
        );
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["claims"],
            json!([{"name": "gpus"}])
        );
        assert!(
            pod["spec"]["containers"][0]["resources"]["limits"].is_null(),
            "{pod}"
        );
        let claim = &log.posts(CLAIM_PATH)[0];
        let placed = &log.status()["placements"][0];
        let uuid = placed["gpus"][0].as_str().unwrap();
        let exactly = &claim["spec"]["devices"]["requests"][0]["exactly"];
        assert_eq!(exactly["deviceClassName"], "gpu.nvidia.com");
        assert_eq!(exactly["count"], 1);
        assert_eq!(
            exactly["selectors"][0]["cel"]["expression"],
            format!("device.attributes[\"gpu.nvidia.com\"].uuid in [\"{uuid}\"]")
        );
        assert_eq!(claim["metadata"]["ownerReferences"][0]["uid"], "pod-uid-0");
        assert_eq!(placed["claim"], "smollm-0-gpus");
        if shareable {
            assert_eq!(placed["binding"], "DraSharedClaim");
            let bytes: u64 = exactly["capacity"]["requests"]["memory"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(bytes, placed["vramReservedBytes"].as_u64().unwrap());
        } else {
            assert_eq!(placed["binding"], "DraClaim");
            assert!(exactly["capacity"].is_null());
        }
        assert!(log.status()["placementSummary"]
            .as_str()
            .unwrap()
            .contains(uuid));
    }
}

/// The device plugin gave the replica another GPU than placement chose (GPU-2 for
/// GPU-0): within the pass the pod's recorded placement, the status and the ledger follow
/// what was assigned, and the replica created beside it does not take GPU 2.
#[tokio::test]
async fn the_ledger_and_status_follow_what_the_device_plugin_assigned() {
    let d = deployment(json!({"autoscale": false, "minReplicas": 2, "maxReplicas": 3}));
    let clock = TestClock::new();
    let scraper = Arc::new(Loads::default());
    scraper.set([("http://10.0.0.1:8080", 0.0)]);
    scraper
        .1
        .lock()
        .unwrap()
        .insert("http://10.0.0.1:8080".into(), vec!["GPU-2".into()]);
    let (client, mock) = Mock::start(pass(
        &d,
        vec![drain(0).reply(200, Value::Null), create_pod()],
    ));
    // The placement patch is a merge patch on the pod, like a drain.
    let ctx = Context::with_cache(
        client,
        node_models(),
        scraper,
        Arc::new(Metrics::default()),
        cache(vec![pod(&d, 0, 0, "10.0.0.1", json!({}))]),
        clock,
    );
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let recorded = placement_in(&log.requests[0].body);
    assert_eq!(
        (recorded.gpus, recorded.uuids, recorded.assigned),
        (vec![2], vec!["GPU-2".to_string()], true)
    );
    let new = placement_in(log.posts(POD_PATH)[0]);
    assert_ne!(
        new.gpus,
        vec![2],
        "GPU 2 is taken, whatever placement had hoped"
    );
    let placements = &log.status()["placements"];
    assert_eq!(placements[0]["gpus"], json!(["GPU-2"]));
}

/// The node agent lists what the kubelet assigned (PodResources) before the worker is
/// up: the recorded placement and status follow it at once, with no worker report.
#[tokio::test]
async fn the_kubelet_s_assignments_from_the_node_agent_correct_a_loading_replica() {
    let d = deployment(json!({"autoscale": false, "minReplicas": 1, "maxReplicas": 1}));
    let clock = TestClock::new();
    let mut loading = pod(&d, 0, 0, "10.0.0.1", json!({}));
    loading["status"]["conditions"] = json!([]);
    // Created just now: loading, not stuck.
    loading["metadata"]["creationTimestamp"] = json!(clock.start.1.to_string());
    let mut inv = inventory();
    inv.spec.assignments = vec![gpuscale_crds::GpuAssignment {
        namespace: "default".into(),
        pod: "smollm-0".into(),
        gpus: vec!["GPU-2".into()],
    }];
    let cache = Cache::of(
        vec![serde_json::from_value(loading).unwrap()],
        vec![node()],
        vec![inv],
    );
    let (client, mock) = Mock::start(pass(&d, vec![drain(0).reply(200, Value::Null)]));
    let ctx = context(client, cache, &[], clock);
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let recorded = placement_in(&log.requests[0].body);
    assert_eq!(
        (recorded.gpus, recorded.uuids, recorded.assigned),
        (vec![2], vec!["GPU-2".to_string()], true)
    );
    assert_eq!(log.status()["placements"][0]["gpus"], json!(["GPU-2"]));
}

/// Only deployments waiting for capacity are woken by an inventory change.
#[test]
fn an_inventory_change_wakes_only_deployments_short_of_replicas() {
    let obj = |status: Value| -> Stored {
        let v = json!({"apiVersion": "gpuscale.dev/v1alpha1",
            "kind": "InferenceDeployment", "metadata": {"name": "x"}, "status": status});
        Stored::parse(&v)
    };
    assert!(obj(Value::Null).waits_for_capacity());
    assert!(obj(json!({"replicas": 1, "desiredReplicas": 2})).waits_for_capacity());
    assert!(obj(json!({"replicas": 2, "desiredReplicas": 2,
        "conditions": [{"type": "Unschedulable", "status": "True"}]}))
    .waits_for_capacity());
    assert!(!obj(json!({"replicas": 2, "desiredReplicas": 2,
        "conditions": [{"type": "Unschedulable", "status": "False"}]}))
    .waits_for_capacity());
}

/// A probe pod of `d`'s model in `phase`, its container terminated with `exit` and
/// termination message `message`.
fn probe(d: &InferenceDeployment, phase: &str, exit: i32, message: &str) -> Value {
    let mut p =
        serde_json::to_value(probe_pod(d, &node_models(), &d.spec.model.source).unwrap()).unwrap();
    p["metadata"]["uid"] = json!("probe-uid");
    p["metadata"]["creationTimestamp"] = json!("2026-11-24T10:00:00Z");
    p["spec"]["nodeName"] = json!("gpu-a");
    p["status"] = json!({"phase": phase, "containerStatuses": [{"name": "inspect", "ready": false,
        "restartCount": 0, "image": "", "imageID": "",
        "state": {"terminated": {"exitCode": exit, "message": message}}}]});
    p
}

/// A pass that records what the probe read, deletes the probe, then creates the replica.
fn probe_read_then_create(d: &InferenceDeployment) -> Vec<Expect> {
    vec![
        write_status(d),
        delete_probe(),
        create_pod(),
        apply_service(),
        write_status(d),
    ]
}

fn delete_probe() -> Expect {
    expect(
        Method::DELETE,
        &format!("{POD_PATH}/smollm-model-probe"),
        Some(JSON),
    )
    .reply(
        200,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    )
}

/// The operator never opens a file:// model (it lives on the nodes): a probe pod reads
/// it there, and the deployment waits, touching no replica.
#[tokio::test]
async fn a_node_model_is_read_by_a_probe_pod_and_the_deployment_waits() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    d.status = None;
    let (client, mock) = Mock::start(vec![create_pod(), write_status(&d)]);
    let ctx = context(client, cache(vec![]), &[], TestClock::new());
    let action = reconcile(object(&d), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    let log = mock.finish(ctx).await;
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(log.posts(POD_PATH)[0].clone()).unwrap();
    assert_eq!(pod.name_any(), "smollm-model-probe");
    assert!(
        !pod.labels().contains_key(LABEL_DEPLOYMENT),
        "no replica selector counts it"
    );
    assert_eq!(pod.labels()[LABEL_PROBE_OF], "smollm");
    assert_eq!(pod.owner_references()[0].uid, "uid-1");
    let spec = pod.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let c = &spec.containers[0];
    assert_eq!(
        c.args.as_deref().unwrap()[..3],
        ["inspect", "/nowhere/smollm2.gguf", "--json"]
    );
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    let host = spec.volumes.unwrap()[0].host_path.clone().unwrap();
    assert_eq!(host.path, "/nowhere");
    let cond = condition(&log.status(), "Progressing");
    assert_eq!(cond["reason"], "ReadingModel");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("smollm-model-probe"),
        "{cond}"
    );
}

/// A finished probe's header sizes the replicas (declared values are not used), is
/// kept in status with who read it, and the probe pod is deleted.
#[tokio::test]
async fn a_finished_probe_is_recorded_deleted_and_sizes_the_replicas() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    d.status = None;
    // A declared size far from the truth: only the header counts.
    d.spec.model.parameters = Some(70_000_000_000);
    let done = probe(&d, "Succeeded", 0, &smollm2_header().to_string());
    let (client, mock) = Mock::start(probe_read_then_create(&d));
    let ctx = context(client, cache(vec![done]), &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let model = &log.requests[0].body["status"]["model"];
    assert_eq!(model["sizedFrom"], "Header");
    assert_eq!(model["readBy"], "probe pod smollm-model-probe on gpu-a");
    assert_eq!(model["header"]["kvHeads"], 3);
    assert_eq!(log.status()["model"], *model, "later status writes keep it");
    let created = placement_in(log.posts(POD_PATH)[0]);
    let header: gguf::ModelSummary = serde_json::from_value(smollm2_header()).unwrap();
    let want = crate::estimate::ModelProfile::from_summary(&header)
        .estimate(&crate::placement::replica_config(&d.spec))
        .unwrap()
        .per_gpu();
    assert_eq!(created.bytes_per_gpu, want);
}

/// A probe that fails says why in status; the declared size is the fallback, and
/// status says the size is declared.
#[tokio::test]
async fn a_failed_probe_falls_back_to_the_declared_size_and_says_so() {
    let mut d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    d.status = None;
    let failed = probe(
        &d,
        "Failed",
        1,
        r#"{"error":"truncated GGUF: needed 8 bytes at offset 24"}"#,
    );
    let (client, mock) = Mock::start(probe_read_then_create(&d));
    let ctx = context(client, cache(vec![failed]), &[], TestClock::new());
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let model = &log.requests[0].body["status"]["model"];
    assert_eq!(model["sizedFrom"], "Declared");
    assert_eq!(
        model["error"],
        "inspect exited with 1: truncated GGUF: needed 8 bytes at offset 24"
    );
    assert!(model.get("header").is_none());
    let created = placement_in(log.posts(POD_PATH)[0]);
    assert_eq!(Some(created.bytes_per_gpu), declared_need(&d));
}

/// A replica fetching its model is reported with its progress (a condition, an Event,
/// the operator's metric) and, while the download advances, is not taken for a stuck
/// replica however old it is.
#[tokio::test]
async fn a_replica_downloading_its_model_is_reported_and_kept() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 1}));
    let mut loading = pod(&d, 0, 0, "10.0.0.1", json!({}));
    loading["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    let (client, mock) = Mock::start(pass(&d, vec![]));
    let scraper = Loads::default();
    scraper.set([("http://10.0.0.1:8080", 0.0)]);
    scraper.2.lock().unwrap().insert(
        "http://10.0.0.1:8080".into(),
        crate::scrape::Startup {
            download_bytes: 50e6,
            download_total: 200e6,
            ..Default::default()
        },
    );
    let metrics = Arc::new(Metrics::default());
    let ctx = Context::with_cache(
        client,
        node_models(),
        Arc::new(scraper),
        metrics.clone(),
        cache(vec![loading]),
        TestClock::new(),
    );
    reconcile(object(&d), ctx.clone()).await.unwrap();
    let log = mock.finish(ctx).await;
    let status = log.status();
    let cond = condition(&status, "Progressing");
    assert_eq!(cond["reason"], "DownloadingModel", "{cond}");
    assert_eq!(
        cond["message"],
        "downloading the model: smollm-0: 25% of 200.0 MB"
    );
    // Created a day before the test's clock: stuck, but for the download.
    assert_eq!(status["placements"][0]["state"], "Loading", "{status}");
    let event = log.event("DownloadingModel").expect("an Event");
    assert!(
        event["note"].as_str().unwrap().contains("25% of 200.0 MB"),
        "{event}"
    );
    assert!(
        metrics
            .encode()
            .contains("gpuscale_operator_model_download_ratio{deployment=\"default/smollm\"} 0.25"),
        "{}",
        metrics.encode()
    );
    // Nothing measured yet: no ready time is reported.
    assert!(status.get("measuredReadySeconds").is_none(), "{status}");
}

#[test]
fn held_requests_are_demand_and_idleness_is_known_only_with_a_router() {
    use crate::routers::Reported;
    let d = deployment(json!({"minReplicas": 0, "maxReplicas": 2}));
    let t0 = Instant::now();
    let mut state = DeploymentState::restore(&d, t0, jiff::Timestamp::now());
    let held = |held: f64, requests: f64| Some(Reported { held, requests });
    let f = super::observe::demand_and_idleness;
    // Zero replicas: the routers' held requests are all the demand; idleness starts at
    // the first reading.
    assert_eq!(
        f(&mut state, None, 0, held(3.0, 0.0), t0),
        (Some(3.0), Some(Duration::ZERO))
    );
    // Answered, nothing held, nothing on the workers: idle since the count last moved.
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(
        f(&mut state, Some(0.0), 1, held(0.0, 3.0), t1),
        (Some(0.0), Some(Duration::ZERO))
    );
    let t2 = t1 + Duration::from_secs(40);
    assert_eq!(
        f(&mut state, Some(0.0), 1, held(0.0, 3.0), t2),
        (Some(0.0), Some(Duration::from_secs(40)))
    );
    // Work on a worker is activity, though the router's count did not move.
    let t3 = t2 + Duration::from_secs(1);
    assert_eq!(
        f(&mut state, Some(2.0), 1, held(0.0, 3.0), t3),
        (Some(2.0), Some(Duration::ZERO))
    );
    // A ready replica that could not be scraped: demand and idleness unknown, never 0.
    assert_eq!(f(&mut state, None, 1, held(0.0, 3.0), t3), (None, None));
    // No router: workers' demand only, idleness unknown.
    assert_eq!(f(&mut state, Some(1.0), 1, None, t3), (Some(1.0), None));
    assert_eq!(f(&mut state, None, 0, None, t3), (None, None));
}

/// Issue #24 item 1: a deployment that names no image runs the operator's, including
/// one the 0.1.0 CRD stored its default in; an image it names wins; a new operator
/// image changes the template hash, so the workers roll to it as a canary.
#[test]
fn the_worker_image_follows_the_operator_unless_the_deployment_names_one() {
    let mut config = node_models();
    config.worker_image = "registry.local/gpuscale/inference-worker:0.2.0".into();
    let mut d = deployment(json!({"minReplicas": 1}));
    assert_eq!(d.spec.worker.image, None);
    assert_eq!(
        pods::worker_image(&d, &config),
        "registry.local/gpuscale/inference-worker:0.2.0"
    );
    d.spec.worker.image = Some("ghcr.io/gpuscale/inference-worker:0.1.0".into());
    assert_eq!(
        pods::worker_image(&d, &config),
        "registry.local/gpuscale/inference-worker:0.2.0",
        "the 0.1.0 CRD's stored default must not pin the workers"
    );
    d.spec.worker.image = Some("mine/worker@sha256:abc".into());
    assert_eq!(pods::worker_image(&d, &config), "mine/worker@sha256:abc");

    let unnamed = deployment(json!({"minReplicas": 1}));
    let old = template_hash(&with_image(unnamed.clone(), &node_models()));
    let new = template_hash(&with_image(unnamed, &config));
    assert_ne!(old, new, "an operator upgrade must be a new version");
}

/// Issue #24 items 1 and 5: worker pods pull with the operator's and the deployment's
/// secrets (each once) and carry what the restricted Pod Security level asks.
#[test]
fn worker_pods_have_pull_secrets_and_pass_the_restricted_level() {
    let mut config = node_models();
    config.image_pull_secrets = vec!["mirror".into(), "shared".into()];
    let mut d = with_image(deployment(json!({"minReplicas": 1})), &config);
    d.spec.worker.image_pull_secrets = vec![
        LocalObjectReference {
            name: "shared".into(),
        },
        LocalObjectReference {
            name: "team".into(),
        },
    ];
    let p: PodPlacement =
        serde_json::from_value(json!({"node": "gpu-a", "gpus": [0], "bytesPerGpu": 1u64 << 30}))
            .unwrap();
    let pod = serde_json::to_value(pods::replica_pod(&d, 0, &p, &config).unwrap()).unwrap();
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "mirror"}, {"name": "shared"}, {"name": "team"}])
    );
    let probe = serde_json::to_value(probe_pod(&d, &config, "x").unwrap()).unwrap();
    assert_eq!(
        probe["spec"]["imagePullSecrets"],
        pod["spec"]["imagePullSecrets"]
    );
    for pod in [&pod, &probe] {
        let s = &pod["spec"]["securityContext"];
        assert_eq!(s["runAsNonRoot"], true);
        assert_eq!(s["seccompProfile"]["type"], "RuntimeDefault");
        let c = &pod["spec"]["containers"][0]["securityContext"];
        assert_eq!(c["allowPrivilegeEscalation"], false);
        assert_eq!(c["capabilities"]["drop"], json!(["ALL"]));
    }
}

/// Issue #24 item 5: `file://` models (hostPath volumes) only where an administrator
/// allowed them; http models go to an emptyDir cache unless a node cache is configured.
#[test]
fn node_directories_are_mounted_only_when_allowed() {
    let d = deployment(json!({"minReplicas": 1}));
    let refused = mountable(&d, &Config::default()).unwrap_err();
    assert!(refused.contains("models.allowHostPath=true"), "{refused}");
    assert!(mountable(&d, &node_models()).is_ok());

    let mut web = d.clone();
    web.spec.model.source = "https://models.example/smollm2.gguf".into();
    let m = pods::model_mount(&web.spec.model, &Config::default().model_cache).unwrap();
    assert!(m.volume.empty_dir.is_some() && m.volume.host_path.is_none());
}

/// A pod as a kubelet reports it (status of Kubernetes 1.34, trimmed of nothing the
/// kubelet sends), read as the pod store reads it from the watch (`SeenPod`, slimmed):
/// every reading the operator makes of it is the same as of the full `Pod`, the
/// store's view of a pod the operator holds in full (`SeenPod::from`) is the same,
/// and what it drops is gone.
#[test]
fn the_pod_store_keeps_every_field_a_pass_reads() {
    let full = |phase: &str, waiting: Value| -> Value {
        json!({
            "metadata": {
                "name": "m-0", "namespace": "ns", "uid": "u1",
                "creationTimestamp": "2026-12-01T10:00:00Z",
                "annotations": {
                    "gpuscale.dev/placement": r#"{"node":"n1","gpus":[2],"bytesPerGpu":1024}"#,
                    "gpuscale.dev/draining-since": "2026-12-01T10:01:00Z",
                },
                "labels": {
                    "app": "m", "gpuscale.dev/replica": "0", "gpuscale.dev/template": "abc",
                    "gpuscale.dev/serving": "false",
                },
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            },
            "spec": {
                "nodeName": "n1",
                "containers": [{"name": "worker", "image": "gpuscale/worker:1"}],
            },
            "status": {
                "phase": phase,
                "reason": "UnexpectedAdmissionError",
                "message": "no GPU",
                "podIP": "10.0.0.7",
                "podIPs": [{"ip": "10.0.0.7"}],
                "hostIP": "192.168.0.1",
                "qosClass": "Guaranteed",
                "startTime": "2026-12-01T10:00:01Z",
                "conditions": [
                    {"type": "PodReadyToStartContainers", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T10:00:40Z"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T10:00:02Z"},
                ],
                "containerStatuses": [{
                    "name": "worker", "ready": false, "restartCount": 3, "started": false,
                    "image": "gpuscale/worker:1", "imageID": "sha256:abc",
                    "containerID": "containerd://0123",
                    "state": {"waiting": waiting},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                        "message": "model file is corrupt", "containerID": "containerd://0122"}},
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                }],
            },
        })
    };
    // Both views of one pod's JSON: the full one, and the store's.
    let views = |json: Value| -> (k8s_openapi::api::core::v1::Pod, SeenPod) {
        let seen: SeenPod = serde_json::from_value(json.clone()).unwrap();
        (serde_json::from_value(json).unwrap(), seen)
    };
    for json in [
        full(
            "Running",
            json!({"reason": "CrashLoopBackOff", "message": "back-off"}),
        ),
        full("Failed", json!({"reason": "ContainerCreating"})),
        full("Pending", json!(null)),
    ] {
        let (pod, slim) = views(json);
        assert_eq!(slim, SeenPod::from(pod.clone()));
        assert_eq!(pods::failure(&slim), pods::failure(&pod));
        assert_eq!(pods::unschedulable(&slim), pods::unschedulable(&pod));
        assert_eq!(
            pods::refused_at_admission(&slim),
            pods::refused_at_admission(&pod)
        );
        assert_eq!(pods::is_ready(&slim), pods::is_ready(&pod));
        assert_eq!(pods::worker_url(&slim, 8080), pods::worker_url(&pod, 8080));
        assert_eq!(pods::placement_of(&slim), pods::placement_of(&pod));
        assert_eq!(Some(slim.labels().to_map()), pod.metadata.labels);
        assert_eq!(Some(slim.annotations().to_map()), pod.metadata.annotations);
        for key in [pods::LABEL_REPLICA, pods::LABEL_TEMPLATE, "app", "absent"] {
            assert_eq!(slim.label(key), pod.label(key), "label {key}");
        }
        assert_eq!(pods::index_of(&slim), Some(0));
        assert_eq!(pods::index_of(&slim), pods::index_of(&pod));
        assert_eq!(pods::placement_of(&slim).unwrap().gpus, [2]);
        let at = "2026-12-01T10:01:02Z".parse().unwrap();
        let timeout = Duration::from_secs(60);
        assert_eq!(pods::drain_stage(&slim, at, timeout), Drain::Leaving);
        assert_eq!(
            pods::drain_stage(&slim, at, timeout),
            pods::drain_stage(&pod, at, timeout)
        );
        assert_eq!(slim.node_name(), Some("n1"));
        let (a, b) = (slim.facts(), pod.facts());
        assert_eq!((a.ready, a.scheduled), (b.ready, b.scheduled));
        assert!(a.ready.and(a.scheduled).and_then(|c| c.since).is_some());
        assert_eq!(
            a.containers().collect::<Vec<_>>(),
            b.containers().collect::<Vec<_>>()
        );
        assert_eq!(a.containers().count(), 1);
        assert_eq!(slim.name(), "m-0");
        assert_eq!(slim.namespace_str(), Some("ns"));
        assert_eq!(slim.uid(), pod.metadata.uid);
        assert_eq!(
            slim.creation_timestamp(),
            pod.metadata.creation_timestamp.as_ref()
        );
    }
    // Lists sent as null read as empty, as `Pod` reads them.
    let mut nulls = full("Pending", json!(null));
    nulls["status"]["conditions"] = json!(null);
    nulls["status"]["containerStatuses"] = json!(null);
    let (pod, slim) = views(nulls);
    assert_eq!(slim, SeenPod::from(pod));
    assert!(!pods::is_ready(&slim) && slim.facts().containers().next().is_none());
    // What each pod costs in the store before any of its fields is set.
    let (seen, pod) = (
        std::mem::size_of::<SeenPod>(),
        std::mem::size_of::<k8s_openapi::api::core::v1::Pod>(),
    );
    assert!(seen * 3 < pod, "a SeenPod is {seen} bytes, a Pod {pod}");
    // A model probe's result is its container's termination message.
    let summary = r#"{"architecture":"llama","parameters":8030261248,"layers":32,"embedding":4096,"heads":32,"kvHeads":8,"headDim":128,"feedForward":14336,"contextLength":8192,"vocab":128256,"weightBytes":4661211136,"tensorBytes":{"Q4_0":3593105408},"tokenizer":"gpt2","chatTemplate":true}"#;
    for (code, message) in [(0, summary), (2, r#"{"error": "not a GGUF file"}"#)] {
        let mut probe = full("Succeeded", json!(null));
        probe["status"]["containerStatuses"][0]["state"] = json!({"terminated": {
            "exitCode": code, "reason": "Completed", "message": message,
            "containerID": "containerd://0124", "startedAt": "2026-12-01T10:00:01Z"}});
        let (probe, slim) = views(probe);
        let (a, b) = (model::finished(&slim), model::finished(&probe));
        assert_eq!(b.as_ref().map(|r| r.is_ok()), Some(code == 0), "{b:?}");
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
    assert_eq!(
        pods::failure(&views(full("Running", json!({"reason": "CrashLoopBackOff"}))).1).as_deref(),
        Some("CrashLoopBackOff: model file is corrupt")
    );
}

#[test]
fn the_deployment_store_keeps_no_managed_fields_or_last_applied_copy() {
    let d = deployment(json!({"minReplicas": 1, "maxReplicas": 3}));
    let mut full = serde_json::to_value(&d).unwrap();
    let last_applied = serde_json::to_string(&full).unwrap();
    full["metadata"]["annotations"] = json!({
        "kubectl.kubernetes.io/last-applied-configuration": last_applied,
        "team": "search",
    });
    full["metadata"]["managedFields"] = json!([
        {"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "gpuscale.dev/v1alpha1",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:model": {".": {}, "f:source": {}}}}},
        {"manager": FIELD_MANAGER, "operation": "Apply", "subresource": "status", "apiVersion": "gpuscale.dev/v1alpha1",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:replicas": {}, "f:readyReplicas": {}}}},
    ]);
    let mut slim = Stored::parse(&full);
    slim_deployment(&mut slim);
    assert!(slim.managed_fields().is_empty());
    assert_eq!(
        slim.annotations().keys().collect::<Vec<_>>(),
        ["team"],
        "the user's own annotations are kept"
    );
    assert_eq!(
        slim.read().unwrap().spec,
        d.spec,
        "every field a pass reads is kept"
    );
    assert_eq!(gate::class_of(&slim), gate::class_of(&Stored::parse(&full)));
}

/// kube-runtime spawns a task per pass asked, and at fleet scale a pass is asked for
/// every deployment at once while at most `--concurrent-passes` run: the rest wait at
/// the gate. A task's cell holds the whole future, sized for its largest state, so
/// the pass's body must be boxed behind the gate for a waiting pass to stay small
/// (heaptrack at 2,500 pods: 12.7 KB a waiting pass when it was inline).
#[tokio::test]
async fn a_pass_waiting_for_its_place_holds_little() {
    let (unused, _) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(
        Client::new(unused, "default"),
        cache(vec![]),
        &[],
        TestClock::new(),
    );
    let obj: Arc<Stored> = Arc::new(
        serde_json::from_value(serde_json::to_value(deployment(json!({}))).unwrap()).unwrap(),
    );
    let pass = reconcile(obj, ctx);
    let size = std::mem::size_of_val(&pass);
    assert!(size <= 1024, "a pass's future is {size} bytes");
}

/// The once-a-second reckoning of lost replicas adopts nothing, and finds what the
/// ledger finds: a replica on a GPU the node no longer has, and one on a node gone.
#[tokio::test]
async fn lost_replicas_are_found_without_building_a_ledger() {
    let d = deployment(json!({}));
    let on_gone_node = {
        let mut p = pod(&d, 2, 0, "10.0.0.3", json!({}));
        p["metadata"]["annotations"][ANNOTATION_PLACEMENT] = json!(json!({"node": "gpu-z",
            "gpus": [0], "uuids": ["GPU-Z0"], "bytesPerGpu": 2u64 << 30, "exclusive": true})
        .to_string());
        p
    };
    let (unused, _) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(
        Client::new(unused, "default"),
        cache(vec![
            pod(&d, 0, 0, "10.0.0.1", json!({})),
            pod(&d, 1, 7, "10.0.0.2", json!({})),
            on_gone_node,
        ]),
        &[],
        TestClock::new(),
    );
    let pods = ctx.cache.pods();
    let lost = observe::lost(&ctx, &pods);
    let mut names: Vec<_> = lost.iter().collect();
    names.sort();
    assert_eq!(
        names,
        [
            (
                &"smollm-1".to_string(),
                &"GPU 7 is gone from node gpu-a".to_string()
            ),
            (&"smollm-2".to_string(), &"node gpu-z is gone".to_string()),
        ]
    );
    assert_eq!(lost, observe::ledger(&ctx, &pods, &[]).lost);
}

/// The node store reads a node's JSON into a `SeenNode` and keeps what placement
/// reads (labels, cordon, taints, allocatable, Ready), the same as a `Node` held in
/// full converts to; what it drops is gone.
#[test]
fn the_node_store_keeps_every_field_placement_reads() {
    let full = |ready: &str| {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "gpu-b", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4",
                "nvidia.com/gpu.count": "2"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"unschedulable": true, "podCIDR": "10.1.0.0/24",
                "taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]},
            "status": {
                "allocatable": {"nvidia.com/gpu": "2", "cpu": "15"},
                "capacity": {"nvidia.com/gpu": "2", "cpu": "16"},
                "addresses": [{"type": "InternalIP", "address": "192.168.0.2"}],
                "conditions": [
                    {"type": "MemoryPressure", "status": "False"},
                    {"type": "Ready", "status": ready, "reason": "KubeletReady"},
                ],
                "images": [{"names": ["gpuscale/worker:1"], "sizeBytes": 1000}],
                "nodeInfo": {"kubeletVersion": "v1.34.0", "machineID": "m", "systemUUID": "s",
                    "bootID": "b", "kernelVersion": "6", "osImage": "o", "containerRuntimeVersion": "c",
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            },
        })
    };
    for ready in ["True", "False", "Unknown"] {
        let mut seen: SeenNode = serde_json::from_value(full(ready)).unwrap();
        seen.slim();
        let node: Node = serde_json::from_value(full(ready)).unwrap();
        assert_eq!(seen, SeenNode::from(node.clone()));
        let status = seen.status.as_ref().unwrap();
        assert_eq!(status.ready, ready == "True");
        assert_eq!(
            status.allocatable,
            node.status.unwrap().allocatable.unwrap()
        );
        let spec = seen.spec.as_ref().unwrap();
        assert_eq!(spec.unschedulable, Some(true));
        assert_eq!(spec.taints.as_ref().unwrap()[0].effect, "NoSchedule");
        assert_eq!(seen.labels(), node.metadata.labels.as_ref().unwrap());
        assert!(seen.metadata.managed_fields.is_none());
    }
    let mut nulls = full("True");
    nulls["status"]["conditions"] = json!(null);
    nulls["status"]["allocatable"] = json!(null);
    let mut seen: SeenNode = serde_json::from_value(nulls.clone()).unwrap();
    seen.slim();
    let node: Node = serde_json::from_value(nulls).unwrap();
    assert_eq!(seen, SeenNode::from(node));
    assert!(!seen.status.unwrap().ready);
    let (seen, node) = (std::mem::size_of::<SeenNode>(), std::mem::size_of::<Node>());
    assert!(seen * 2 < node, "a SeenNode is {seen} bytes, a Node {node}");
}

/// A Service as a real API server returns it (cluster IPs, IP families, policies,
/// status and managed fields filled in) is read into the store's `SeenService`, and
/// matches the Service the operator applies; a changed port, selector or owner does
/// not (the operator applies it again).
#[test]
fn the_service_store_keeps_what_the_match_compares() {
    let d = deployment(json!({}));
    let want = pods::service(&d);
    let served = |mut v: Value| -> SeenService {
        v["metadata"]["uid"] = json!("svc-uid");
        v["metadata"]["resourceVersion"] = json!("42");
        v["metadata"]["managedFields"] = json!([{"manager": "gpuscale", "operation": "Apply"}]);
        v["metadata"]["annotations"] = json!({
            "kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"});
        v["spec"]["clusterIP"] = json!("10.96.0.12");
        v["spec"]["clusterIPs"] = json!(["10.96.0.12"]);
        v["spec"]["ipFamilies"] = json!(["IPv4"]);
        v["spec"]["ipFamilyPolicy"] = json!("SingleStack");
        v["spec"]["sessionAffinity"] = json!("None");
        v["spec"]["type"] = json!("ClusterIP");
        v["spec"]["internalTrafficPolicy"] = json!("Cluster");
        v["spec"]["ports"][0]["appProtocol"] = json!("http");
        v["status"] = json!({"loadBalancer": {}});
        let mut s: SeenService = serde_json::from_value(v).unwrap();
        s.slim();
        s
    };
    let have = served(serde_json::to_value(&want).unwrap());
    assert!(pods::service_matches(&have, &want));
    assert!(have.metadata.managed_fields.is_none());
    assert_eq!(
        have.metadata.annotations,
        Some([("team".to_string(), "a".to_string())].into())
    );
    for (path, value) in [
        ("/spec/ports/0/port", json!(9999)),
        ("/spec/selector/gpuscale.dev~1serving", json!("false")),
        ("/metadata/ownerReferences/0/uid", json!("another")),
    ] {
        let mut v = serde_json::to_value(&want).unwrap();
        *v.pointer_mut(path).unwrap() = value;
        assert!(!pods::service_matches(&served(v), &want), "{path}");
    }
}
