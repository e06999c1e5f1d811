//! The simulator's object store: every object as JSON, one cluster-wide resourceVersion,
//! a history of changes for watches to resume from, and the API server's own rules
//! (conflicts, generation, status and scale subresources, finalizers, graceful pod
//! deletion, owner-reference garbage collection, CRD registration).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use gpuscale_crds::validate::{FieldValidation, Refusal};

use super::resources::{builtins, Resource};
use super::selector::{FieldSelector, LabelSelector};

/// Changes kept for watches that resume from a resourceVersion; older ones get 410.
const HISTORY: usize = 50_000;

/// A failure, as a Kubernetes `Status`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `Status.details` (the causes of an Invalid).
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", plural_group(r)),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    /// The API server's answer to a custom resource its CRD's schema refuses: 400 for
    /// unknown fields under strict validation, else 422 with one cause per field.
    fn refused(r: &Resource, name: &str, refusal: Refusal) -> Self {
        match refusal {
            Refusal::UnknownFields(m) => Self::bad_request(m),
            Refusal::Invalid { message, causes } => Self {
                code: 422,
                reason: "Invalid",
                message,
                details: Some(json!({
                    "name": name, "group": r.group, "kind": r.kind,
                    "causes": causes.iter().map(|c| json!({
                        "reason": c.reason, "message": c.message, "field": c.field,
                    })).collect::<Vec<_>>(),
                })),
            },
        }
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code});
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// What a change was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub change: Change,
    /// (group, plural) of the object.
    pub resource: (String, String),
    pub object: Value,
    /// The object before the change, so a watch with a selector can tell an object that
    /// stopped matching (sent as DELETED) from one that never did.
    pub old: Option<Value>,
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

/// Options of a create or update, and what it warned of.
#[derive(Debug, Default)]
pub struct WriteOptions {
    /// `dryRun=All`: check, answer, store nothing.
    pub dry_run: bool,
    /// `fieldValidation`: what unknown fields of a custom resource do.
    pub validation: FieldValidation,
    /// `Warning` headers for the response (unknown fields dropped under `Warn`).
    pub warnings: Vec<String>,
    /// A scheduler's binding: the one write that may set a pod's `spec.nodeName`.
    pub binding: bool,
    /// Skip admission: only for objects a test stores as if written before their CRD's
    /// schema changed (the API server keeps such objects and serves them as they are).
    pub unchecked: bool,
}

impl WriteOptions {
    /// A plain write, with the API server's default field validation.
    pub fn new() -> Self {
        Self::default()
    }
}

/// What a delete does to the object's dependents, its `propagationPolicy`
/// (<https://kubernetes.io/docs/concepts/architecture/garbage-collection/#cascading-deletion>).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    /// The object goes at once; the garbage collector deletes its dependents after.
    #[default]
    Background,
    /// The object stays, marked deleted and held by the `foregroundDeletion`
    /// finalizer, until every dependent with `blockOwnerDeletion: true` is gone.
    Foreground,
    /// The dependents stay, with their owner reference to this object removed.
    Orphan,
}

impl Propagation {
    /// A request's `propagationPolicy` (none: Background, the default of every resource
    /// here), refused as the API server's `ValidateDeleteOptions` refuses another value.
    pub fn parse(policy: Option<&str>) -> Result<Propagation, ApiError> {
        match policy {
            None | Some("Background") => Ok(Propagation::Background),
            Some("Foreground") => Ok(Propagation::Foreground),
            Some("Orphan") => Ok(Propagation::Orphan),
            Some(other) => Err(ApiError::invalid(format!(
                "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
            ))),
        }
    }
}

/// Options of a delete.
#[derive(Debug, Default)]
pub struct DeleteOptions {
    pub grace_seconds: Option<i64>,
    pub propagation: Propagation,
    pub dry_run: bool,
    /// `preconditions.uid`: delete only the object with this UID.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`: delete only at this resourceVersion.
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    /// The API server's check of `preconditions`: "Must be fulfilled before a deletion
    /// is carried out. If not possible, a 409 Conflict status will be returned"
    /// (<https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/delete-options/>),
    /// worded as apimachinery's `storage.Preconditions.Check`. It is how a kubelet or a
    /// controller deletes the pod it saw and not a newer one of the same name.
    fn check(&self, kind: &str, name: &str, obj: &Value) -> Result<(), ApiError> {
        let meta = &obj["metadata"];
        let have = |k: &str| meta[k].as_str().unwrap_or_default();
        if let Some(uid) = self.uid.as_deref().filter(|u| *u != have("uid")) {
            return Err(precondition_failed(kind, name, "UID", uid, have("uid")));
        }
        if let Some(rv) = self
            .resource_version
            .as_deref()
            .filter(|v| *v != have("resourceVersion"))
        {
            let rv_now = have("resourceVersion");
            return Err(precondition_failed(
                kind,
                name,
                "ResourceVersion",
                rv,
                rv_now,
            ));
        }
        Ok(())
    }
}

/// The 409 of a failed precondition (a delete's `preconditions`, or the UID a write
/// carries), worded as apimachinery's `storage.Preconditions.Check`; `target` is what
/// the request named (`pods`, `pods/binding`, `<plural>.<group>`).
pub(super) fn precondition_failed(
    target: &str,
    name: &str,
    what: &str,
    want: &str,
    have: &str,
) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {target} \"{name}\": Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
        ),
    )
}

type Key = (String, String);

/// A receiver of the changes to come.
pub type Subscription = broadcast::Receiver<Arc<Event>>;

/// The store.
pub struct Store {
    rv: u64,
    uid: u64,
    resources: Vec<Resource>,
    objects: BTreeMap<Key, BTreeMap<Key, Value>>,
    history: VecDeque<Arc<Event>>,
    tx: broadcast::Sender<Arc<Event>>,
    /// Objects deleted in the foreground that wait for their blocking dependents.
    foreground: Vec<Waiting>,
}

/// An object deleted in the foreground, by UID.
struct Waiting {
    uid: Value,
    resource: Resource,
    key: Key,
}

/// The finalizer a foreground delete holds its object with.
const FOREGROUND_DELETION: &str = "foregroundDeletion";

use crate::now_rfc3339 as now;

fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj["metadata"][key].as_str()
}

/// Everything but metadata and status: a change here bumps `generation`.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

/// Sets a dotted path (`.spec.replicas`), making maps on the way.
pub fn set_path(obj: &mut Value, path: &str, v: Value) {
    let keys: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    let mut cur = obj;
    for k in &keys[..keys.len() - 1] {
        if !cur[*k].is_object() {
            cur[*k] = json!({});
        }
        cur = &mut cur[*k];
    }
    cur[keys[keys.len() - 1]] = v;
}

impl Default for Store {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(8192);
        let mut s = Self {
            rv: 1,
            uid: 0,
            resources: builtins(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            tx,
            foreground: Vec::new(),
        };
        let ns = s
            .resource("", "namespaces")
            .expect("namespaces are built in");
        for name in ["default", "kube-system"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                             "status": {"phase": "Active"}});
            s.create(&ns, "", obj, &mut WriteOptions::new())
                .expect("a fresh store takes namespaces");
        }
        s
    }
}

impl Store {
    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Every served resource.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// The resource `plural` of `group`.
    pub fn resource(&self, group: &str, plural: &str) -> Option<Resource> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.plural == plural)
            .cloned()
    }

    fn bucket(&self, r: &Resource) -> Option<&BTreeMap<Key, Value>> {
        self.objects.get(&(r.group.clone(), r.plural.clone()))
    }

    /// One object.
    pub fn get(&self, r: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.bucket(r)
            .and_then(|b| b.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))
    }

    /// Objects in `ns` (all namespaces when None) that match the selectors. Core
    /// `v1` events include the `events.k8s.io` ones, converted, as they share storage
    /// in Kubernetes.
    pub fn list(
        &self,
        r: &Resource,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        let mut out = self.list_own(r, ns, labels, fields);
        if r.group.is_empty() && r.plural == "events" {
            if let Some(new) = self.resource("events.k8s.io", "events") {
                out.extend(
                    self.list_own(&new, ns, labels, fields)
                        .iter()
                        .map(core_event),
                );
            }
        }
        out
    }

    fn list_own(
        &self,
        r: &Resource,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        self.bucket(r)
            .map(|b| {
                b.iter()
                    .filter(|((n, _), o)| {
                        ns.is_none_or(|ns| ns == n) && labels.matches(o) && fields.matches(o)
                    })
                    .map(|(_, o)| o.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes after `rv` (410 when they are no longer kept), and a receiver for the
    /// ones to come, taken together so that none falls between.
    pub fn changes_since(&self, rv: u64) -> Result<(Vec<Arc<Event>>, Subscription), ApiError> {
        if let Some(first) = self.history.front() {
            if rv + 1 < first.rv {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", first.rv - 1),
                ));
            }
        }
        let past = self.history.iter().filter(|e| e.rv > rv).cloned().collect();
        Ok((past, self.tx.subscribe()))
    }

    fn record(&mut self, change: Change, r: &Resource, object: Value, old: Option<Value>) {
        let e = Arc::new(Event {
            rv: self.rv,
            change,
            resource: (r.group.clone(), r.plural.clone()),
            object,
            old,
        });
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(e.clone());
        // No receivers is fine: nobody watches yet.
        let _ = self.tx.send(e);
    }

    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn check_kind(r: &Resource, obj: &Value) -> Result<(), ApiError> {
        let kind = obj["kind"].as_str().unwrap_or(&r.kind);
        let api_version = obj["apiVersion"].as_str().map(String::from);
        if kind != r.kind || api_version.is_some_and(|v| v != r.api_version()) {
            return Err(ApiError::bad_request(format!(
                "the body is a {kind} of {}, not a {} of {}",
                obj["apiVersion"].as_str().unwrap_or("?"),
                r.kind,
                r.api_version()
            )));
        }
        Ok(())
    }

    /// Creates `obj` in `ns`.
    pub fn create(
        &mut self,
        r: &Resource,
        ns: &str,
        mut obj: Value,
        opts: &mut WriteOptions,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() || !obj["metadata"].is_object() && !obj["metadata"].is_null() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        Self::check_kind(r, &obj)?;
        if r.namespaced {
            if let Some(body_ns) = meta_str(&obj, "namespace") {
                if body_ns != ns {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the object ({body_ns}) does not match the namespace on the request ({ns})"
                    )));
                }
            }
            let nsr = self.resource("", "namespaces").expect("built in");
            let namespace = self.get(&nsr, "", ns).map_err(|_| {
                ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
            })?;
            if (r.group.as_str(), r.plural.as_str()) == ("", "pods") {
                if let Some(level) = super::pod_security::enforced(&namespace) {
                    let broken = super::pod_security::violations(&obj, level);
                    if !broken.is_empty() {
                        let name = meta_str(&obj, "name").unwrap_or_default();
                        return Err(ApiError::new(
                            403,
                            "Forbidden",
                            super::pod_security::refusal(name, level, &broken),
                        ));
                    }
                }
            }
        }
        self.uid += 1;
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(prefix)) => format!("{prefix}{:05x}", self.uid * 7919 % 0xfffff),
            _ => {
                return Err(ApiError::invalid(
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(format!(
                "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
            )));
        }
        let key = (ns.to_string(), name.clone());
        if self.bucket(r).is_some_and(|b| b.contains_key(&key)) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", plural_group(r)),
            ));
        }
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        let m = &mut obj["metadata"];
        m["name"] = json!(name);
        if r.namespaced {
            m["namespace"] = json!(ns);
        } else if let Some(o) = m.as_object_mut() {
            o.remove("namespace");
        }
        m["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        m["creationTimestamp"] = json!(now());
        m["generation"] = json!(1);
        if let Some(o) = m.as_object_mut() {
            o.remove("deletionTimestamp");
            o.remove("managedFields");
        }
        self.defaults(r, &mut obj);
        builtin_checks(r, &name, &obj, None)?;
        Self::admit(r, &name, &mut obj, None, opts)?;
        if opts.dry_run {
            return Ok(obj);
        }
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        if r.group == "apiextensions.k8s.io" {
            self.register_crd(&mut obj)?;
        }
        self.objects
            .entry((r.group.clone(), r.plural.clone()))
            .or_default()
            .insert(key, obj.clone());
        self.record(Change::Added, r, obj.clone(), None);
        Ok(obj)
    }

    /// A custom resource against its CRD's schema and rules (pruned and defaulted in
    /// place), as the apiextensions-apiserver admits it on every create and update.
    fn admit(
        r: &Resource,
        name: &str,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &mut WriteOptions,
    ) -> Result<(), ApiError> {
        let Some(v) = r.validator.as_ref().filter(|_| !opts.unchecked) else {
            return Ok(());
        };
        let warnings = v
            .admit(obj, old, opts.validation)
            .map_err(|e| ApiError::refused(r, name, e))?;
        opts.warnings.extend(warnings);
        Ok(())
    }

    /// What the API server fills in: pod phase, a service's cluster IP, a fresh status
    /// where the status subresource owns it.
    fn defaults(&self, r: &Resource, obj: &mut Value) {
        match (r.group.as_str(), r.plural.as_str()) {
            ("", "pods") => {
                obj["status"] = json!({"phase": "Pending"});
                if obj["spec"]["terminationGracePeriodSeconds"].is_null() {
                    obj["spec"]["terminationGracePeriodSeconds"] = json!(30);
                }
            }
            ("", "services") => {
                if obj["spec"]["type"].is_null() {
                    obj["spec"]["type"] = json!("ClusterIP");
                }
                if obj["spec"]["clusterIP"].is_null() {
                    let n = self.uid;
                    obj["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", n / 250, n % 250 + 1));
                }
            }
            _ if r.status && !r.group.is_empty() && r.group != "apiextensions.k8s.io" => {
                // A CRD with a status subresource ignores status on create.
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
            }
            _ => {}
        }
    }

    fn register_crd(&mut self, crd: &mut Value) -> Result<(), ApiError> {
        let new = Resource::from_crd(crd).map_err(|e| {
            ApiError::invalid(format!(
                "CustomResourceDefinition.apiextensions.k8s.io {:?} is invalid: {e}",
                crd["metadata"]["name"].as_str().unwrap_or_default()
            ))
        })?;
        if new.is_empty() {
            return Err(ApiError::invalid(
                "spec.versions: Required value: a CRD needs at least one served version",
            ));
        }
        for r in new {
            self.resources
                .retain(|o| !(o.group == r.group && o.plural == r.plural));
            self.resources.push(r);
        }
        crd["status"] = json!({
            "acceptedNames": crd["spec"]["names"],
            "storedVersions": crd["spec"]["versions"].as_array().map(|v| v.iter().map(|v| v["name"].clone()).collect::<Vec<_>>()),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": now()},
            ],
        });
        Ok(())
    }

    /// Replaces the object (or its status) with `obj`. A non-empty
    /// `metadata.resourceVersion` must be the current one, else 409.
    pub fn update(
        &mut self,
        r: &Resource,
        ns: &str,
        name: &str,
        obj: Value,
        part: Part,
        opts: &mut WriteOptions,
    ) -> Result<Value, ApiError> {
        let old = self.get(r, ns, name)?;
        if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|v| !v.is_empty()) {
            if Some(rv) != meta_str(&old, "resourceVersion") {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        plural_group(r)
                    ),
                ));
            }
        }
        // A UID in the object is a precondition: the kubelet puts its pod's UID in each
        // status patch "to ensure it appears in the patch as a precondition"
        // (kubernetes `pkg/util/pod/pod.go`, `PatchPodStatus`), so that a write meant
        // for one pod never lands on a newer one of the same name.
        if let Some(uid) = meta_str(&obj, "uid").filter(|u| !u.is_empty()) {
            let have = meta_str(&old, "uid").unwrap_or_default();
            if uid != have {
                let target = plural_group(r);
                return Err(precondition_failed(&target, name, "UID", uid, have));
            }
        }
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name").unwrap_or_default()
            )));
        }
        Self::check_kind(r, &obj)?;
        let mut new = match part {
            Part::Status => {
                let mut n = old.clone();
                n["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
                n
            }
            Part::Main => {
                let mut n = obj;
                if r.status {
                    match old.get("status") {
                        Some(s) => n["status"] = s.clone(),
                        None => {
                            if let Some(o) = n.as_object_mut() {
                                o.remove("status");
                            }
                        }
                    }
                }
                // Fields only the server sets.
                for k in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "namespace",
                ] {
                    match old["metadata"].get(k) {
                        Some(v) => n["metadata"][k] = v.clone(),
                        None => {
                            if let Some(m) = n["metadata"].as_object_mut() {
                                m.remove(k);
                            }
                        }
                    }
                }
                n
            }
        };
        new["apiVersion"] = json!(r.api_version());
        new["kind"] = json!(r.kind);
        new["metadata"]["name"] = json!(name);
        if r.group.is_empty() && r.plural == "pods" && part == Part::Main {
            pod_spec_update(name, &old, &new, opts.binding)?;
        }
        if part == Part::Main {
            builtin_checks(r, name, &new, Some(&old))?;
            no_new_finalizers_once_deleted(r, name, &new, &old)?;
        }
        Self::admit(r, name, &mut new, Some(&old), opts)?;
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let bumped = part == Part::Main && spec_part(&new) != spec_part(&old);
        new["metadata"]["generation"] = json!(generation + i64::from(bumped));
        if opts.dry_run {
            return Ok(new);
        }
        if r.group == "apiextensions.k8s.io" && part == Part::Main {
            self.register_crd(&mut new)?;
        }
        // No change, no new resourceVersion and no event, as the API server does.
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == old {
            return Ok(new);
        }
        let new = self.replace(r, ns, name, new, old);
        if finalized(r, &new) {
            self.remove(r, ns, name, Propagation::Background);
        }
        Ok(new)
    }

    fn store(&mut self, r: &Resource, ns: &str, name: &str, obj: Value) {
        self.objects
            .entry((r.group.clone(), r.plural.clone()))
            .or_default()
            .insert((ns.to_string(), name.to_string()), obj);
    }

    /// Deletes an object: at once, or (finalizers, a foreground delete, or a pod its
    /// kubelet must stop first) by marking it with a deletionTimestamp.
    pub fn delete(
        &mut self,
        r: &Resource,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let old = self.get(r, ns, name)?;
        opts.check(&plural_group(r), name, &old)?;
        let has_finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let grace = opts.grace_seconds.unwrap_or_else(|| {
            old["spec"]["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(30)
        });
        let graceful = r.group.is_empty()
            && r.plural == "pods"
            && old["spec"]["nodeName"].as_str().is_some_and(|n| {
                let nodes = self.resource("", "nodes").expect("built in");
                self.get(&nodes, "", n).is_ok()
            })
            && grace > 0;
        if opts.dry_run {
            return Ok(old);
        }
        let foreground = opts.propagation == Propagation::Foreground;
        if has_finalizers || graceful || foreground {
            if old["metadata"].get("deletionTimestamp").is_some() {
                if !graceful && !has_finalizers {
                    self.remove(r, ns, name, opts.propagation);
                } else if !graceful && awaits_kubelet(r, &old) {
                    // A grace period can only be shortened: a pod with finalizers
                    // that its kubelet has stopped goes once they are removed.
                    let mut new = old.clone();
                    new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                    return Ok(self.replace(r, ns, name, new, old));
                }
                return Ok(old);
            }
            let mut new = old.clone();
            new["metadata"]["deletionTimestamp"] = json!(now());
            if graceful {
                new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            }
            if foreground {
                let finalizers = &mut new["metadata"]["finalizers"];
                if !finalizers.is_array() {
                    *finalizers = json!([]);
                }
                if let Some(list) = finalizers.as_array_mut() {
                    list.push(json!(FOREGROUND_DELETION));
                }
            }
            let new = self.replace(r, ns, name, new, old);
            if foreground {
                // The garbage collector's part: the dependents go first, then the
                // object, once none that blocks it is left.
                let uid = new["metadata"]["uid"].clone();
                self.foreground.push(Waiting {
                    uid: uid.clone(),
                    resource: r.clone(),
                    key: (ns.to_string(), name.to_string()),
                });
                for (res, (dns, dname)) in self.dependents(&uid) {
                    let _ = self.delete(&res, &dns, &dname, &DeleteOptions::default());
                }
                self.release(&uid);
            }
            return Ok(new);
        }
        Ok(self.remove(r, ns, name, opts.propagation).unwrap_or(old))
    }

    /// Stores `new` in place of `old` at a new resourceVersion, with its event.
    fn replace(&mut self, r: &Resource, ns: &str, name: &str, mut new: Value, old: Value) -> Value {
        new["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.store(r, ns, name, new.clone());
        self.record(Change::Modified, r, new.clone(), Some(old));
        new
    }

    /// The objects with an owner reference to `uid`.
    fn dependents(&self, uid: &Value) -> Vec<(Resource, Key)> {
        self.resources
            .iter()
            .flat_map(|res| {
                self.bucket(res)
                    .into_iter()
                    .flat_map(|b| b.iter())
                    .filter(|(_, o)| owner_ref(o, uid).is_some())
                    .map(|(k, _)| (res.clone(), k.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Ends the foreground delete of `uid` once no dependent with `blockOwnerDeletion:
    /// true` is left: "Once the garbage collector has deleted all 'blocking'
    /// dependents, it deletes the owner object" (the page cited at `Propagation`). Its
    /// `foregroundDeletion` finalizer goes; with no other finalizer, so does it.
    fn release(&mut self, uid: &Value) {
        let Some(at) = self.foreground.iter().position(|w| w.uid == *uid) else {
            return;
        };
        let blocked = self.dependents(uid).iter().any(|(res, (dns, dname))| {
            self.get(res, dns, dname).is_ok_and(|o| {
                owner_ref(&o, uid).is_some_and(|x| x["blockOwnerDeletion"] == json!(true))
            })
        });
        if blocked {
            return;
        }
        let Waiting { resource, key, .. } = self.foreground.swap_remove(at);
        let Ok(old) = self.get(&resource, &key.0, &key.1) else {
            return;
        };
        let mut new = old.clone();
        if let Some(list) = new["metadata"]["finalizers"].as_array_mut() {
            list.retain(|f| f != FOREGROUND_DELETION);
        }
        let new = self.replace(&resource, &key.0, &key.1, new, old);
        if finalized(&resource, &new) {
            self.remove(&resource, &key.0, &key.1, Propagation::Background);
        }
    }

    /// Removes an object for good, then what it owned (background propagation; with
    /// Orphan, their references to it go instead, as the `orphan` finalizer's garbage
    /// collection does), and for a Node the pods bound to it (the pod garbage
    /// collector's job). An owner deleted in the foreground that this object blocked
    /// may go with it.
    fn remove(
        &mut self,
        r: &Resource,
        ns: &str,
        name: &str,
        propagation: Propagation,
    ) -> Option<Value> {
        let mut obj = self
            .objects
            .get_mut(&(r.group.clone(), r.plural.clone()))?
            .remove(&(ns.to_string(), name.to_string()))?;
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.record(Change::Deleted, r, obj.clone(), None);
        if r.group == "apiextensions.k8s.io" {
            let group = obj["spec"]["group"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let plural = obj["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            self.resources
                .retain(|o| !(o.group == group && o.plural == plural));
            self.objects.remove(&(group, plural));
        }
        let uid = obj["metadata"]["uid"].clone();
        self.foreground.retain(|w| w.uid != uid);
        for (res, (dns, dname)) in self.dependents(&uid) {
            if propagation == Propagation::Orphan {
                let Ok(old) = self.get(&res, &dns, &dname) else {
                    continue;
                };
                let mut new = old.clone();
                if let Some(refs) = new["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|x| x["uid"] != uid);
                    if refs.is_empty() {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove("ownerReferences");
                        }
                    }
                }
                self.replace(&res, &dns, &dname, new, old);
            } else {
                let _ = self.delete(&res, &dns, &dname, &DeleteOptions::default());
            }
        }
        if r.group.is_empty() && r.plural == "nodes" {
            let pods = self.resource("", "pods").expect("built in");
            let bound: Vec<Key> = self
                .bucket(&pods)
                .into_iter()
                .flat_map(|b| b.iter())
                .filter(|(_, p)| p["spec"]["nodeName"].as_str() == Some(name))
                .map(|(k, _)| k.clone())
                .collect();
            for (pns, pname) in bound {
                self.remove(&pods, &pns, &pname, Propagation::Background);
            }
        }
        if !self.foreground.is_empty() {
            let owners: Vec<Value> = obj["metadata"]["ownerReferences"]
                .as_array()
                .map(|refs| refs.iter().map(|x| x["uid"].clone()).collect())
                .unwrap_or_default();
            for owner in owners {
                self.release(&owner);
            }
        }
        Some(obj)
    }
}

/// An object being deleted takes no new finalizer: apimachinery's
/// `ValidateObjectMetaUpdate` refuses it ("no new finalizers can be added if the object
/// is being deleted"), so nothing can hold a deleted object longer than the finalizers
/// it had.
fn no_new_finalizers_once_deleted(
    r: &Resource,
    name: &str,
    new: &Value,
    old: &Value,
) -> Result<(), ApiError> {
    if old["metadata"].get("deletionTimestamp").is_none() {
        return Ok(());
    }
    let list = |o: &Value| -> Vec<String> {
        o["metadata"]["finalizers"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let had = list(old);
    let added: Vec<String> = list(new).into_iter().filter(|f| !had.contains(f)).collect();
    if added.is_empty() {
        return Ok(());
    }
    let quoted: Vec<String> = added.iter().map(|f| format!("{f:?}")).collect();
    Err(ApiError::invalid(format!(
        "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
        r.kind,
        quoted.join(", ")
    )))
}

/// `obj`'s owner reference to `uid`, if it has one.
fn owner_ref<'a>(obj: &'a Value, uid: &Value) -> Option<&'a Value> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|x| x["uid"] == *uid)
}

/// The API server's own validation of the built-in kinds the simulator checks: a
/// ResourceClaim (see `crate::dra::validate_claim`).
fn builtin_checks(
    r: &Resource,
    name: &str,
    obj: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    if (r.group.as_str(), r.plural.as_str()) == ("resource.k8s.io", "resourceclaims") {
        crate::dra::validate_claim(obj, old).map_err(|e| {
            ApiError::invalid(format!(
                "ResourceClaim.resource.k8s.io \"{name}\" is invalid: {e}"
            ))
        })?;
    }
    Ok(())
}

/// An `events.k8s.io/v1` Event as a core `v1` one.
/// A pod's spec is immutable but for the fields the API server lets an update change
/// (<https://kubernetes.io/docs/concepts/workloads/pods/#pod-update-and-replacement>):
/// container images, `activeDeadlineSeconds`, `terminationGracePeriodSeconds`, and
/// tolerations added to the existing ones. `spec.nodeName` is set once, by a binding.
fn pod_spec_update(name: &str, old: &Value, new: &Value, binding: bool) -> Result<(), ApiError> {
    let comparable = |spec: &Value, keep_node: bool| {
        let mut s = spec.clone();
        if let Some(o) = s.as_object_mut() {
            o.remove("activeDeadlineSeconds");
            o.remove("terminationGracePeriodSeconds");
            o.remove("tolerations");
            if !keep_node {
                o.remove("nodeName");
            }
            for list in ["containers", "initContainers"] {
                for c in o
                    .get_mut(list)
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
        s
    };
    let (was, now) = (&old["spec"], &new["spec"]);
    let node_set = was["nodeName"].as_str().is_none_or(str::is_empty)
        && now["nodeName"].as_str().is_some_and(|n| !n.is_empty());
    let node_ok = binding && node_set;
    let old_tolerations = was["tolerations"].as_array().cloned().unwrap_or_default();
    let new_tolerations = now["tolerations"].as_array().cloned().unwrap_or_default();
    let tolerations_ok = old_tolerations.iter().all(|t| new_tolerations.contains(t));
    if comparable(was, !node_ok) == comparable(now, !node_ok) && tolerations_ok {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "Pod \"{name}\" is invalid: spec: Forbidden: pod updates may not change fields other than \
         `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, \
         `spec.tolerations` (only additions to existing tolerations) or \
         `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
    )))
}

fn core_event(e: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Event", "metadata": e["metadata"],
        "involvedObject": e["regarding"], "reason": e["reason"], "message": e["note"],
        "type": e["type"], "count": e["deprecatedCount"].as_i64().unwrap_or(1),
        "firstTimestamp": e["deprecatedFirstTimestamp"], "lastTimestamp": e["deprecatedLastTimestamp"],
        "eventTime": e["eventTime"],
        "source": {"component": e["reportingController"]},
    })
}

/// A terminating pod on a live node stays until its kubelet reports it stopped.
/// Whether a deleted object has nothing left to wait for (no finalizer, no kubelet to
/// stop it) and goes now.
fn finalized(r: &Resource, obj: &Value) -> bool {
    obj["metadata"].get("deletionTimestamp").is_some()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty)
        && !awaits_kubelet(r, obj)
}

fn awaits_kubelet(r: &Resource, obj: &Value) -> bool {
    r.group.is_empty()
        && r.plural == "pods"
        && obj["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .is_some_and(|g| g > 0)
}

fn plural_group(r: &Resource) -> String {
    if r.group.is_empty() {
        r.plural.clone()
    } else {
        format!("{}.{}", r.plural, r.group)
    }
}

/// RFC 1123 subdomain: lowercase alphanumerics, '-' and '.', at most 253 characters.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric())
}
