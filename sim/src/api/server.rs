//! The HTTP face of the simulator: Kubernetes API paths, verbs, discovery, OpenAPI,
//! watches (resourceVersion, bookmarks, 410 on expired versions) and Table output.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, Method, StatusCode, Uri};
use serde_json::{json, Value};

use super::faults::{self, Injector, WatchEnd, WriteFault};
use super::openapi;
use super::patch;
use super::resources::Resource;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    precondition_failed, set_path, ApiError, Change, DeleteOptions, Event, Part, Propagation,
    Store, WriteOptions,
};
use super::table::{json_path, table, wants_table};
use gpuscale_crds::validate::FieldValidation;

/// The state every request shares.
#[derive(Clone, Default)]
pub struct Shared {
    pub store: Arc<Mutex<Store>>,
    /// Resource requests served, counted by who asked for what, as an audit log would
    /// say it (see [`Audited`]): for what a client costs the API, and what it needs
    /// to be granted.
    pub requests: Arc<Mutex<std::collections::BTreeMap<Audited, u64>>>,
    /// A test's hold on creates of one resource (see `ApiServer::gate_creates`).
    pub gate: Arc<Mutex<Option<Gate>>>,
    /// Faults injected into one client's requests (see `ApiServer::inject_faults`).
    pub(crate) faults: Arc<Injector>,
}

/// One kind of request in the simulator's audit log: who (the `Impersonate-User`
/// header: there is no authentication here, so a client says who it is as `kubectl
/// --as` does), the RBAC verb, the API group and the resource (`pods`,
/// `inferencedeployments/status`), and whether it spanned every namespace of a
/// namespaced kind (which only a ClusterRole grants).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Audited {
    pub user: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub cluster_wide: bool,
}

/// Lets `through` creates of `plural` pass, then holds every further one until the
/// test releases it, so a test can stop a client between two creates.
pub struct Gate {
    pub plural: String,
    pub through: u32,
    /// Told when a create is being held.
    pub held: Arc<tokio::sync::Notify>,
    /// Becomes true on release.
    pub open: tokio::sync::watch::Receiver<bool>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("store lock")
    }
}

/// The router: every path goes to one handler that reads it as the API server would.
/// The API server's limit on a request body (3 MiB, `maxRequestBodyBytes`,
/// <https://kubernetes.io/docs/reference/command-line-tools-reference/kube-apiserver/>).
pub const MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;

pub fn router(shared: Shared) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

/// How much of a too-large body is read and dropped before the 413 is sent, so that the
/// client, still writing, reads the answer instead of a broken pipe.
const DISCARD_LIMIT: usize = 64 * 1024 * 1024;

/// The request body, or the 413 Status once it passes `MAX_REQUEST_BODY`.
async fn read_body(body: axum::body::Body) -> Result<Bytes, Response> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| error(&ApiError::bad_request(e.to_string())))?;
        seen += chunk.len();
        if seen <= MAX_REQUEST_BODY {
            buf.extend_from_slice(&chunk);
        } else if seen > DISCARD_LIMIT {
            break;
        }
    }
    if seen > MAX_REQUEST_BODY {
        return Err(error(&ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("request entity too large: limit is {MAX_REQUEST_BODY}"),
        )));
    }
    Ok(Bytes::from(buf))
}

fn json_response(code: u16, v: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

fn error(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// A resource request, parsed from the path.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

type Query = HashMap<String, String>;

async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    // Too large: a Status, as the API server answers, not a plain-text 413.
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let query: Query = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    tracing::debug!(%method, %uri, "sim api request");
    match segs.as_slice() {
        ["version"] => json_response(200, &version()),
        ["healthz" | "readyz" | "livez"] => "ok".into_response(),
        ["api"] => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        ),
        ["apis"] => json_response(200, &groups(&shared.lock())),
        ["api", "v1"] => resource_list(&shared.lock(), "", "v1"),
        ["apis", g] => group(&shared.lock(), g),
        ["apis", g, v] => resource_list(&shared.lock(), g, v),
        ["openapi", "v2"] => error(&ApiError::new(
            404,
            "NotFound",
            "OpenAPI v2 is not served; use v3",
        )),
        ["openapi", "v3"] => json_response(200, &openapi::root(&shared.lock())),
        ["openapi", "v3", rest @ ..] => {
            match openapi::group_version(&shared.lock(), &rest.join("/")) {
                Some(doc) => json_response(200, &doc),
                None => error(&ApiError::new(404, "NotFound", "no such group version")),
            }
        }
        ["api", "v1", ..] | ["apis", _, _, ..] => {
            // `/api/v1/...` is the core group; `/apis/<group>/<version>/...` the others.
            let (g, v, rest) = match segs.as_slice() {
                ["api", v, rest @ ..] => ("", *v, rest),
                [_, g, v, rest @ ..] => (*g, *v, rest),
                _ => unreachable!("matched above"),
            };
            // No authentication here: a client says who it is the way `kubectl --as`
            // does, and the request log keeps it.
            let user = headers
                .get("impersonate-user")
                .and_then(|u| u.to_str().ok())
                .unwrap_or_default()
                .to_string();
            resource(
                shared,
                &user,
                g,
                v,
                rest,
                method,
                query,
                accept,
                &content_type,
                body,
            )
            .await
        }
        _ => error(&ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                uri.path()
            ),
        )),
    }
}

fn version() -> Value {
    json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-gpuscale-sim",
           "gitCommit": "simulator", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
           "goVersion": "none", "compiler": "rustc", "platform": "linux/amd64"})
}

fn group_versions(store: &Store) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for r in store.resources().iter().filter(|r| !r.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, vs)) if !vs.contains(&r.version) => vs.push(r.version.clone()),
            Some(_) => {}
            None => out.push((r.group.clone(), vec![r.version.clone()])),
        }
    }
    out
}

fn group_json(g: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": g, "versions": vs, "preferredVersion": vs[0]})
}

fn groups(store: &Store) -> Value {
    let groups: Vec<Value> = group_versions(store)
        .iter()
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group(store: &Store, g: &str) -> Response {
    match group_versions(store)
        .into_iter()
        .find(|(name, _)| name == g)
    {
        Some((name, vs)) => {
            let mut doc = group_json(&name, &vs);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            json_response(200, &doc)
        }
        None => error(&ApiError::new(404, "NotFound", format!("no group {g}"))),
    }
}

fn resource_list(store: &Store, g: &str, v: &str) -> Response {
    let resources: Vec<Value> = store
        .resources()
        .iter()
        .filter(|r| r.group == g && r.version == v)
        .flat_map(Resource::discovery)
        .collect();
    if resources.is_empty() {
        return error(&ApiError::new(
            404,
            "NotFound",
            format!("no group version {g}/{v}"),
        ));
    }
    let gv = if g.is_empty() {
        v.to_string()
    } else {
        format!("{g}/{v}")
    };
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1",
                               "groupVersion": gv, "resources": resources}),
    )
}

/// Reads `rest` (after `/api/v1` or `/apis/g/v`) as a resource path.
fn target(store: &Store, g: &str, v: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let find = |plural: &str| {
        store
            .resources()
            .iter()
            .find(|r| r.group == g && r.version == v && r.plural == plural)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({plural})"),
                )
            })
    };
    let owned = |s: &&str| s.to_string();
    match rest {
        ["namespaces", ns, plural, more @ ..] if find(plural).is_ok_and(|r| r.namespaced) => {
            Ok(Target {
                resource: find(plural)?,
                namespace: Some(ns.to_string()),
                name: more.first().map(owned),
                sub: more.get(1).map(owned),
            })
        }
        [plural, more @ ..] => Ok(Target {
            resource: find(plural)?,
            namespace: None,
            name: more.first().map(owned),
            sub: more.get(1).map(owned),
        }),
        [] => Err(ApiError::new(404, "NotFound", "no resource named")),
    }
}

/// The media types a request body may have here: the API server's JSON and YAML
/// serializers and its patch types. Protobuf, which the API server also decodes for
/// built-in types (kubectl's `create service`, `create configmap` and the like send
/// it), is not decoded here: refused with 415 in the API server's words for a body it
/// cannot decode, rather than read as broken JSON.
const BODY_TYPES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/merge-patch+json",
    "application/json-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];

fn parse_body(content_type: &str, body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/apply-patch+yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the apply patch is not valid YAML: {e}"))),
        "application/yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        m if BODY_TYPES.contains(&m) => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        _ => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({media}) - accepted media \
                 types include: {} (this simulated API server decodes no protobuf)",
                BODY_TYPES.join(", ")
            ),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    shared: Shared,
    user: &str,
    g: &str,
    v: &str,
    rest: &[&str],
    method: Method,
    query: Query,
    accept: &str,
    content_type: &str,
    body: Bytes,
) -> Response {
    let t = match target(&shared.lock(), g, v, rest) {
        Ok(t) => t,
        Err(e) => return error(&e),
    };
    let verb = match (&method, &t.name) {
        (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            "watch"
        }
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, None) => "deletecollection",
        (&Method::DELETE, Some(_)) => "delete",
        _ => "other",
    };
    let what = match &t.sub {
        Some(sub) => format!("{}/{sub}", t.resource.plural),
        None => t.resource.plural.clone(),
    };
    *shared
        .requests
        .lock()
        .expect("request log")
        .entry(Audited {
            user: user.to_string(),
            verb: verb.to_string(),
            group: t.resource.group.clone(),
            resource: what,
            cluster_wide: t.resource.namespaced && t.namespace.is_none(),
        })
        .or_default() += 1;
    let fault = match verb {
        "create" | "update" | "patch" | "delete" | "deletecollection" => {
            shared.faults.write(user, verb)
        }
        _ => WriteFault::None,
    };
    match fault {
        WriteFault::ErrorBefore => return error(&faults::internal_error(false)),
        WriteFault::Conflict => {
            let name = t.name.as_deref().unwrap_or_default();
            return error(&faults::conflict(&t.resource.plural, name));
        }
        WriteFault::None | WriteFault::ErrorAfter => {}
    }
    let body = match parse_body(content_type, &body) {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let validation = match query.get("fieldValidation").map(String::as_str) {
        None | Some("") => FieldValidation::default(),
        Some(v) => match FieldValidation::parse(v) {
            Some(m) => m,
            None => {
                return error(&ApiError::bad_request(format!(
                    "fieldValidation must be one of Ignore, Warn or Strict, not {v:?}"
                )))
            }
        },
    };
    let mut opts = WriteOptions {
        dry_run: query.get("dryRun").is_some_and(|d| d == "All"),
        validation,
        ..WriteOptions::default()
    };
    let ns = t.namespace.clone().unwrap_or_default();
    let table_out = wants_table(accept);
    let r = t.resource.clone();
    let ok = |v: Value| (200u16, v);
    let created = |v: Value| (201u16, v);
    let result = match (method.clone(), t.name.as_deref(), t.sub.as_deref()) {
        (Method::GET, None, _) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            return watch(shared, t, &query, table_out, user.to_string());
        }
        (Method::GET, None, _) => list(&shared.lock(), &t, &query, table_out).map(ok),
        (Method::GET, Some(name), Some("scale")) => shared
            .lock()
            .get(&r, &ns, name)
            .and_then(|o| scale_of(&r, &o))
            .map(ok),
        (Method::GET, Some(name), _) => {
            let store = shared.lock();
            store.get(&r, &ns, name).map(|o| {
                ok(if table_out {
                    table(&r, &[o], store.resource_version())
                } else {
                    o
                })
            })
        }
        (Method::POST, None, _) => {
            hold_if_gated(&shared, &r.plural).await;
            shared.lock().create(&r, &ns, body, &mut opts).map(created)
        }
        (Method::POST, Some(name), Some("binding")) if r.group.is_empty() && r.plural == "pods" => {
            bind(&shared, &ns, name, &body, &mut opts).map(created)
        }
        (Method::PUT, Some(name), sub) => {
            write(&shared, &t, name, sub, |_| Ok(body.clone()), &mut opts).map(ok)
        }
        (Method::PATCH, Some(name), sub) => {
            let apply = content_type.starts_with("application/apply-patch");
            let exists = shared.lock().get(&r, &ns, name).is_ok();
            if apply && !exists && sub.is_none() {
                // Server-side apply creates what does not exist yet.
                let mut obj = body.clone();
                obj["metadata"]["name"] = json!(name);
                shared.lock().create(&r, &ns, obj, &mut opts).map(created)
            } else {
                write(
                    &shared,
                    &t,
                    name,
                    sub,
                    |cur| patch::apply(&r, content_type, cur, &body),
                    &mut opts,
                )
                .map(ok)
            }
        }
        (Method::DELETE, Some(name), None) => delete_options(&query, &body)
            .and_then(|opts| shared.lock().delete(&r, &ns, name, &opts))
            .map(ok),
        (Method::DELETE, None, None) => checked_selector(&query)
            .and_then(|sel| Ok((sel, delete_options(&query, &body)?)))
            .map(|((labels, fields), opts)| {
                let mut store = shared.lock();
                let victims = store.list(&r, t.namespace.as_deref(), &labels, &fields);
                for o in &victims {
                    let name = o["metadata"]["name"].as_str().unwrap_or_default();
                    let ons = o["metadata"]["namespace"].as_str().unwrap_or_default();
                    // An object gone meanwhile is no failure of the collection delete.
                    let _ = store.delete(&r, ons, name, &opts);
                }
                ok(
                    json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                      "metadata": {}, "items": victims}),
                )
            }),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        )),
    };
    match result {
        // Applied, and the answer lost.
        Ok(_) if fault == WriteFault::ErrorAfter => error(&faults::internal_error(true)),
        Ok((code, v)) => {
            let mut resp = json_response(code, &v);
            // As the API server sends them: `299 - "<text>"`, one header each.
            for w in &opts.warnings {
                let text = format!("299 - {:?}", w);
                if let Ok(h) = http::HeaderValue::from_str(&text) {
                    resp.headers_mut().append(header::WARNING, h);
                }
            }
            resp
        }
        Err(e) => error(&e),
    }
}

fn checked_selector(q: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    Ok((
        LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
        FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
    ))
}

fn list(store: &Store, t: &Target, q: &Query, table_out: bool) -> Result<Value, ApiError> {
    let (labels, fields) = checked_selector(q)?;
    let items = store.list(&t.resource, t.namespace.as_deref(), &labels, &fields);
    let rv = store.resource_version();
    if table_out {
        return Ok(table(&t.resource, &items, rv));
    }
    Ok(
        json!({"kind": format!("{}List", t.resource.kind), "apiVersion": t.resource.api_version(),
              "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

fn delete_options(q: &Query, body: &Value) -> Result<DeleteOptions, ApiError> {
    let grace = q
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse().ok())
        .or(body["gracePeriodSeconds"].as_i64());
    let policy = q
        .get("propagationPolicy")
        .cloned()
        .or(body["propagationPolicy"].as_str().map(String::from));
    Ok(DeleteOptions {
        grace_seconds: grace,
        propagation: Propagation::parse(policy.as_deref())?,
        dry_run: q.get("dryRun").is_some_and(|d| d == "All")
            || body["dryRun"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "All")),
        uid: body["preconditions"]["uid"].as_str().map(String::from),
        resource_version: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(String::from),
    })
}

/// The `autoscaling/v1` Scale of `obj`.
fn scale_of(r: &Resource, obj: &Value) -> Result<Value, ApiError> {
    let Some(paths) = &r.scale else {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("{} has no scale subresource", r.kind),
        ));
    };
    let replicas = |p: &str| json_path(obj, p).and_then(Value::as_i64).unwrap_or(0);
    let m = &obj["metadata"];
    Ok(json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": replicas(&paths.spec_replicas)},
        "status": {"replicas": replicas(&paths.status_replicas),
                   "selector": paths.label_selector.as_deref().and_then(|p| json_path(obj, p)).cloned().unwrap_or(json!(""))},
    }))
}

/// `POST pods/<name>/binding`: how a scheduler assigns a pod to a node. It sets
/// `spec.nodeName` once; a pod already assigned answers 409, as the API server does
/// (<https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#create-binding-pod-v1-core>).
fn bind(
    shared: &Shared,
    ns: &str,
    name: &str,
    binding: &Value,
    opts: &mut WriteOptions,
) -> Result<Value, ApiError> {
    let node = binding["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::new(422, "Invalid", "target.name: Required value"))?;
    let mut store = shared.lock();
    let r = store.resource("", "pods").expect("pods are built in");
    let mut pod = store.get(&r, ns, name)?;
    // The binding's UID is the pod's, as kube-scheduler's binder sends it: a binding
    // decided for a pod since deleted never assigns another of the same name.
    if let Some(uid) = binding["metadata"]["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
    {
        let have = pod["metadata"]["uid"].as_str().unwrap_or_default();
        if uid != have {
            return Err(precondition_failed("pods/binding", name, "UID", uid, have));
        }
    }
    if let Some(have) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{have}\""),
        ));
    }
    if pod["metadata"]["deletionTimestamp"].is_string() {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is being deleted, cannot be assigned to a host"),
        ));
    }
    pod["spec"]["nodeName"] = json!(node);
    opts.binding = true;
    store.update(&r, ns, name, pod, Part::Main, opts)?;
    Ok(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    )
}

/// PUT or PATCH of an object, its status or its scale: `change` turns the current
/// object (or Scale) into the new one.
fn write(
    shared: &Shared,
    t: &Target,
    name: &str,
    sub: Option<&str>,
    change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    opts: &mut WriteOptions,
) -> Result<Value, ApiError> {
    let ns = t.namespace.clone().unwrap_or_default();
    let r = &t.resource;
    let mut store = shared.lock();
    let current = store.get(r, &ns, name)?;
    match sub {
        None | Some("status") => {
            let part = if sub == Some("status") {
                Part::Status
            } else {
                Part::Main
            };
            if part == Part::Status && !r.status {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("{} has no status subresource", r.kind),
                ));
            }
            let new = change(&current)?;
            store.update(r, &ns, name, new, part, opts)
        }
        Some("scale") => {
            let scale = scale_of(r, &current)?;
            let new = change(&scale)?;
            let replicas = new["spec"]["replicas"]
                .as_i64()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::new(
                        422,
                        "Invalid",
                        "spec.replicas: must be a non-negative integer",
                    )
                })?;
            let paths = r.scale.clone().expect("scale_of checked");
            let mut obj = current.clone();
            set_path(&mut obj, &paths.spec_replicas, json!(replicas));
            if let Some(rv) = new["metadata"]["resourceVersion"].as_str() {
                obj["metadata"]["resourceVersion"] = json!(rv);
            }
            let updated = store.update(r, &ns, name, obj, Part::Main, opts)?;
            scale_of(r, &updated)
        }
        Some(other) => Err(ApiError::new(
            404,
            "NotFound",
            format!("no subresource {other}"),
        )),
    }
}

/// Whether a change reaches a watcher, and as what.
fn visible(
    e: &Event,
    t: &Target,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<Change> {
    if e.resource != (t.resource.group.clone(), t.resource.plural.clone()) {
        return None;
    }
    let sees = |o: &Value| {
        t.namespace
            .as_deref()
            .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
            && labels.matches(o)
            && fields.matches(o)
    };
    let now = sees(&e.object);
    let before = e.old.as_ref().map(sees);
    match (e.change, now, before) {
        (Change::Modified, true, Some(false)) => Some(Change::Added),
        (Change::Modified, false, Some(true)) => Some(Change::Deleted),
        (Change::Modified, false, _) => None,
        (c, true, _) => Some(c),
        _ => None,
    }
}

fn line(kind: &str, object: Value) -> Result<Bytes, std::io::Error> {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Ok(Bytes::from(v))
}

/// How often a watch asks whether an injected fault ends it.
const FAULT_CHECK: Duration = Duration::from_millis(250);

/// A watch: past changes from the requested resourceVersion (or the current objects as
/// ADDED), then live ones, bookmarks when asked, until the timeout.
/// A watch of `user`'s may be cut short by an injected fault (see `faults`).
fn watch(shared: Shared, t: Target, q: &Query, table_out: bool, user: String) -> Response {
    let (labels, fields) = match checked_selector(q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let initial_events = q.get("sendInitialEvents").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800)
        .min(3600);
    // A resourceVersion that is not one is refused, as the API server's storage layer
    // refuses it ("invalid resource version"), not served from the start.
    let from: Option<u64> = match q
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
    {
        None => None,
        Some(v) => match v.parse() {
            Ok(n) => Some(n),
            Err(e) => {
                return error(&ApiError::bad_request(format!(
                    "invalid resource version {v:?}: {e}"
                )))
            }
        },
    };
    let (initial, past, mut rx, start_rv) = {
        let store = shared.lock();
        let rv = store.resource_version();
        let initial = if from.is_none() || initial_events {
            store.list(&t.resource, t.namespace.as_deref(), &labels, &fields)
        } else {
            Vec::new()
        };
        match store.changes_since(if initial.is_empty() {
            from.unwrap_or(rv)
        } else {
            rv
        }) {
            Ok((past, rx)) => (initial, past, rx, rv),
            Err(e) => {
                let body =
                    String::from_utf8(line("ERROR", e.status()).unwrap_or_default().to_vec())
                        .unwrap_or_default();
                return (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response();
            }
        }
    };
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1024);
    let faults = shared.faults.clone();
    let r = t.resource.clone();
    let render = move |o: Value, rv: u64| if table_out { table(&r, &[o], rv) } else { o };
    let bookmark_of = {
        let r = t.resource.clone();
        move |rv: u64, end: bool| {
            let mut m = json!({"resourceVersion": rv.to_string()});
            if end {
                m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": m})
        }
    };
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut fault_check = tokio::time::interval(FAULT_CHECK);
        let mut last = start_rv;
        for o in initial {
            if tx.send(line("ADDED", render(o, start_rv))).await.is_err() {
                return;
            }
        }
        if initial_events
            && tx
                .send(line("BOOKMARK", bookmark_of(start_rv, true)))
                .await
                .is_err()
        {
            return;
        }
        for e in past {
            last = last.max(e.rv);
            if let Some(c) = visible(&e, &t, &labels, &fields) {
                if tx
                    .send(line(c.as_str(), render(e.object.clone(), e.rv)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                got = rx.recv() => match got {
                    Ok(e) => {
                        if e.rv <= last { continue; }
                        last = e.rv;
                        if let Some(c) = visible(&e, &t, &labels, &fields) {
                            if tx.send(line(c.as_str(), render(e.object.clone(), e.rv))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let gone = ApiError::new(410, "Expired", "the watch fell behind; list again");
                        let _ = tx.send(line("ERROR", gone.status())).await;
                        return;
                    }
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    if tx.send(line("BOOKMARK", bookmark_of(last, false))).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => return,
                _ = fault_check.tick() => {
                    let Some(end) = faults.watch_ends(&user, FAULT_CHECK) else { continue };
                    faults.ended(end);
                    let _ = match end {
                        // The connection breaks: the chunked body ends in an error.
                        WatchEnd::Close => tx.send(Err(std::io::Error::other("watch connection dropped (injected fault)"))).await,
                        WatchEnd::Expire => {
                            let gone = ApiError::new(410, "Expired", "too old resource version (injected fault)");
                            tx.send(line("ERROR", gone.status())).await
                        }
                    };
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(
        out,
        |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Waits while a test holds creates of `plural` (none: returns at once). The create
/// then goes ahead, as a request an API server received does even if its client has
/// gone meanwhile.
async fn hold_if_gated(shared: &Shared, plural: &str) {
    let wait = {
        let mut gate = shared.gate.lock().expect("gate lock");
        match gate.as_mut().filter(|g| g.plural == plural) {
            None => None,
            Some(g) if g.through > 0 => {
                g.through -= 1;
                None
            }
            Some(g) => Some((g.held.clone(), g.open.clone())),
        }
    };
    if let Some((held, mut open)) = wait {
        held.notify_one();
        let _ = open.wait_for(|o| *o).await;
    }
}
