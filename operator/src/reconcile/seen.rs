//! What the pod store keeps of a pod ([`SeenPod`]), and what every reading of a pod
//! needs ([`PodFacts`]), so that the same helpers (`is_ready`, `failure`,
//! `placement_of`, …) read the store's pods and `k8s_openapi` pods alike (the
//! simulator, the router and the tests hold the latter).
//!
//! The node store keeps a [`SeenNode`] the same way.
//!
//! A pass reads a pod's metadata, its node and a few of its status fields, never the
//! rest of its spec nor its managed fields, which are most of its bytes. A
//! `k8s_openapi` `Pod` is 2,248 bytes before any field is set (1,440 of them the
//! `PodSpec`), so even with everything else dropped it cost about 5 KB a pod in the
//! store: heaptrack at 9,335 pods put about 50 MB of the operator's 112 MB peak heap
//! in the pod store. A pod is read from the watch as a [`WatchedPod`] (serde skips
//! the fields it does not name without building them) and kept as a [`SeenPod`],
//! with only these, its labels and annotations in a compact form ([`Tags`]).
//!
//! The Service and (in `inventory.rs`) GpuInventory stores keep slim types the same
//! way: [`SeenService`], `SeenInventory`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    ContainerStatus, Node, Pod, PodCondition, PodStatus, Service, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use serde::Deserialize;

/// A pod as the operator's store keeps it (see the module comment): not a
/// `kube::Resource`, and without `ObjectMeta`, whose 360 bytes (and an allocation per
/// string it holds) were a fifth of what each pod cost in kube-runtime's store. Its
/// metadata is the few fields a pass reads: name, namespace, UID, when it was created
/// and is being deleted, and its controller; its labels and annotations are [`Tags`].
/// The watch reads pods as [`WatchedPod`] (which the watcher needs: it resumes from
/// their `resourceVersion`) and the store keeps this (`PodStore`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "WatchedPod")]
pub struct SeenPod {
    name: Arc<str>,
    namespace: Option<Arc<str>>,
    uid: Option<Box<str>>,
    created: Option<Time>,
    deleted: Option<Time>,
    controller: Option<Arc<Controller>>,
    labels: Tags,
    annotations: Tags,
    pub spec: Option<SeenSpec>,
    pub status: Option<SeenStatus>,
}

/// A pod's controller (its owner reference with `controller: true`), shared by every
/// pod of that controller in the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Controller {
    pub api_version: Box<str>,
    pub kind: Box<str>,
    pub name: Box<str>,
    /// Shared with the pod store's index by controller.
    pub uid: Arc<str>,
}

/// A pod as the watch reads it: what [`SeenPod`] keeps, with the whole `ObjectMeta`
/// the watcher reads the `resourceVersion` of. Only in flight, never stored; serde
/// builds only the fields named here (managed fields aside, which `ObjectMeta` names).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedPod {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<SeenSpec>,
    status: Option<SeenStatus>,
}

impl From<WatchedPod> for SeenPod {
    fn from(w: WatchedPod) -> SeenPod {
        SeenPod::new(w.metadata, w.spec, w.status)
    }
}

/// Labels or annotations as the store keeps them: the pairs in key order in one
/// slice.
///
/// `ObjectMeta` holds each as a `BTreeMap<String, String>`, whose first node alone
/// is 11 pairs wide (about 540 bytes) and every key and value an allocation of its
/// own: a replica's five labels and one annotation cost about 1.25 KB in the store
/// (heaptrack at 10,000 pods: 12.5 MB of a 91 MB peak). Here they are two slices of
/// 32-byte pairs; the fleet's operator RSS fell from 122 to 111–113 MiB when they
/// came (README, fleet scale). A pod carries a handful, so a look-up is a scan. The
/// pod store shares each key, and each label value, among the pods that carry it (a
/// replica's label values are its deployment's name, its template and a few words),
/// so that a replica's own labels cost it the two slices and its replica index:
/// [`Interner`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tags(Box<[(Arc<str>, Arc<str>)]>);

impl Tags {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The pairs, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The pairs as `ObjectMeta` holds them.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(map: BTreeMap<String, String>) -> Tags {
        Tags(map.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

/// Strings (and controllers) many stored pods hold alike, kept once: a namespace, a
/// node's name, a phase, a label value, a controller's owner reference. One per pod
/// store, used under its lock; what no pod holds any more is dropped as the set grows
/// (an entry the set alone holds has a strong count of one).
#[derive(Default)]
pub(super) struct Interner {
    strings: HashSet<Arc<str>>,
    controllers: HashSet<Arc<Controller>>,
    /// The size of both sets after the last sweep.
    kept: usize,
}

impl Interner {
    fn one<T: ?Sized + Eq + std::hash::Hash>(set: &mut HashSet<Arc<T>>, value: &mut Arc<T>) {
        match set.get(&**value) {
            Some(kept) => *value = kept.clone(),
            None => {
                set.insert(value.clone());
            }
        }
    }

    fn string(&mut self, value: &mut Arc<str>) {
        Self::one(&mut self.strings, value);
    }

    /// How many strings and controllers it holds.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.strings.len() + self.controllers.len()
    }

    /// Drops what only the sets hold, once they have doubled since the last sweep.
    fn sweep(&mut self) {
        let size = self.strings.len() + self.controllers.len();
        if size > 2 * self.kept + 1024 {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.controllers.retain(|c| Arc::strong_count(c) > 1);
            self.kept = self.strings.len() + self.controllers.len();
        }
    }
}

/// Of a pod's spec, the node it is bound to.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "WireSpec")]
pub struct SeenSpec {
    pub node_name: Option<Arc<str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSpec {
    node_name: Option<String>,
}

impl From<WireSpec> for SeenSpec {
    fn from(w: WireSpec) -> SeenSpec {
        SeenSpec {
            node_name: w.node_name.map(Into::into),
        }
    }
}

/// Of a pod's status, what `pods.rs`, `observe.rs` and `model.rs` read: of its
/// conditions only Ready and PodScheduled, of its containers only their waiting or
/// terminated state and the last termination's message (why it is failing; a model
/// probe's summary is its termination message). `k8s_openapi`'s `PodCondition` and
/// `ContainerStatus` hold every field the API defines (a container status alone
/// carries its image, image ID, container ID, resources and volume mounts): about
/// 1 KB a pod in the store even when emptied. What a healthy pod leaves unset (the
/// reasons and messages of a pod, its conditions and its containers) is boxed, so that
/// it costs a pointer where it is absent: a pod in the store is mostly healthy pods.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "WireStatus")]
pub struct SeenStatus {
    pub phase: Option<Arc<str>>,
    pub pod_ip: Option<Box<str>>,
    /// The pod's reason and message.
    pub words: Option<Box<Words>>,
    /// The Ready condition.
    pub ready: Option<SeenCondition>,
    /// The PodScheduled condition.
    pub scheduled: Option<SeenCondition>,
    pub containers: Box<[SeenContainer]>,
}

/// A reason and a message: why a pod, a condition or a container is as it is.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Words {
    pub reason: Option<String>,
    pub message: Option<String>,
}

impl Words {
    /// Boxed, or `None` where both are absent.
    fn boxed(reason: Option<String>, message: Option<String>) -> Option<Box<Words>> {
        (reason.is_some() || message.is_some()).then(|| Box::new(Words { reason, message }))
    }

    fn of(words: &Option<Box<Words>>) -> (Option<&str>, Option<&str>) {
        words.as_deref().map_or((None, None), |w| {
            (w.reason.as_deref(), w.message.as_deref())
        })
    }
}

/// One of the two conditions kept.
#[derive(Clone, Debug, PartialEq)]
pub struct SeenCondition {
    pub status: ConditionStatus,
    /// `lastTransitionTime`: when it became what it is.
    pub since: Option<Time>,
    pub words: Option<Box<Words>>,
}

impl SeenCondition {
    fn facts(&self) -> ConditionFacts<'_> {
        let (reason, message) = Words::of(&self.words);
        ConditionFacts {
            status: self.status,
            reason,
            message,
            since: self.since.as_ref().map(|t| t.0),
        }
    }
}

impl From<ConditionFacts<'_>> for SeenCondition {
    fn from(c: ConditionFacts<'_>) -> SeenCondition {
        SeenCondition {
            status: c.status,
            since: c.since.map(Time),
            words: Words::boxed(c.reason.map(str::to_string), c.message.map(str::to_string)),
        }
    }
}

/// A condition's status, as the API defines it ("True", "False" or "Unknown"; any
/// other text reads as Unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    fn of(text: &str) -> ConditionStatus {
        match text {
            "True" => ConditionStatus::True,
            "False" => ConditionStatus::False,
            _ => ConditionStatus::Unknown,
        }
    }
}

/// Of a container's status, what is read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeenContainer {
    pub waiting: Option<Box<Words>>,
    pub terminated: Option<Box<Terminated>>,
    /// The last run's termination message.
    pub last_message: Option<Box<str>>,
}

impl SeenContainer {
    fn facts(&self) -> ContainerFacts<'_> {
        ContainerFacts {
            waiting: self
                .waiting
                .as_ref()
                .map(|w| (w.reason.as_deref(), w.message.as_deref())),
            terminated: self
                .terminated
                .as_ref()
                .map(|t| (t.exit_code, t.message.as_deref())),
            last_message: self.last_message.as_deref(),
        }
    }
}

impl From<ContainerFacts<'_>> for SeenContainer {
    fn from(c: ContainerFacts<'_>) -> SeenContainer {
        SeenContainer {
            waiting: c.waiting.map(|(reason, message)| {
                Box::new(Words {
                    reason: reason.map(str::to_string),
                    message: message.map(str::to_string),
                })
            }),
            terminated: c.terminated.map(|(exit_code, message)| {
                Box::new(Terminated {
                    exit_code,
                    message: message.map(str::to_string),
                })
            }),
            last_message: c.last_message.map(Into::into),
        }
    }
}

/// A container that ran and ended.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Terminated {
    #[serde(default)]
    pub exit_code: i32,
    pub message: Option<String>,
}

/// A pod's status as the API sends it, of which serde builds only the fields named
/// here.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStatus {
    phase: Option<String>,
    reason: Option<String>,
    message: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    // Options, not defaults: a list may come as `null`, which a default refuses.
    conditions: Option<Vec<WireCondition>>,
    container_statuses: Option<Vec<WireContainer>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
    reason: Option<String>,
    message: Option<String>,
    last_transition_time: Option<Time>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireContainer {
    state: Option<WireState>,
    last_state: Option<WireState>,
}

#[derive(Deserialize)]
struct WireState {
    /// A container waiting to run, and why (`CrashLoopBackOff`, …).
    waiting: Option<Words>,
    terminated: Option<Terminated>,
}

impl From<WireStatus> for SeenStatus {
    fn from(w: WireStatus) -> SeenStatus {
        let (mut ready, mut scheduled) = (None, None);
        for c in w.conditions.unwrap_or_default() {
            let kept = match c.type_.as_str() {
                "Ready" => &mut ready,
                "PodScheduled" => &mut scheduled,
                _ => continue,
            };
            // The first of a type, as a reading of the full list finds it.
            kept.get_or_insert(SeenCondition {
                status: ConditionStatus::of(&c.status),
                since: c.last_transition_time,
                words: Words::boxed(c.reason, c.message),
            });
        }
        SeenStatus {
            phase: w.phase.map(Into::into),
            pod_ip: w.pod_ip.map(Into::into),
            words: Words::boxed(w.reason, w.message),
            ready,
            scheduled,
            containers: w
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    let (waiting, terminated) = c
                        .state
                        .map(|s| (s.waiting, s.terminated))
                        .unwrap_or_default();
                    SeenContainer {
                        waiting: waiting.map(Box::new),
                        terminated: terminated.map(Box::new),
                        last_message: c
                            .last_state
                            .and_then(|s| s.terminated?.message)
                            .map(Into::into),
                    }
                })
                .collect(),
        }
    }
}

/// `kube::Resource` for a core/v1 kind the stores keep in a type of their own: the
/// watch asks the API for it by these names and deserializes it straight into `$t`.
macro_rules! core_v1_resource {
    ($t:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $t {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                "".into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

core_v1_resource!(WatchedPod, "Pod", "pods", NamespaceResourceScope);
core_v1_resource!(SeenNode, "Node", "nodes", ClusterResourceScope);
core_v1_resource!(SeenService, "Service", "services", NamespaceResourceScope);

/// An object's controller: the owner reference with `controller: true` (there is at
/// most one; the API server refuses a second).
pub(crate) fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

impl SeenPod {
    /// The store's pod of these parts: of the metadata what a pass reads (the type's
    /// comment), labels and annotations as [`Tags`].
    fn new(metadata: ObjectMeta, spec: Option<SeenSpec>, status: Option<SeenStatus>) -> SeenPod {
        let controller = controller_of(&metadata).map(|o| {
            Arc::new(Controller {
                api_version: o.api_version.as_str().into(),
                kind: o.kind.as_str().into(),
                name: o.name.as_str().into(),
                uid: o.uid.as_str().into(),
            })
        });
        SeenPod {
            name: metadata.name.unwrap_or_default().into(),
            namespace: metadata.namespace.map(Into::into),
            uid: metadata.uid.map(Into::into),
            created: metadata.creation_timestamp,
            deleted: metadata.deletion_timestamp,
            controller,
            labels: metadata.labels.map(Tags::from).unwrap_or_default(),
            annotations: metadata.annotations.map(Tags::from).unwrap_or_default(),
            spec,
            status,
        }
    }

    /// Shares what it holds alike with the store's other pods (`interner`'s comment
    /// says what).
    pub(super) fn intern(&mut self, interner: &mut Interner) {
        if let Some(ns) = self.namespace.as_mut() {
            interner.string(ns);
        }
        if let Some(c) = self.controller.as_mut() {
            Interner::one(&mut interner.controllers, c);
        }
        for (k, v) in &mut self.labels.0 {
            interner.string(k);
            interner.string(v);
        }
        // Annotations' values are a pod's own (its placement), and sharing them would
        // only grow the interner.
        for (k, _) in &mut self.annotations.0 {
            interner.string(k);
        }
        if let Some(node) = self.spec.as_mut().and_then(|s| s.node_name.as_mut()) {
            interner.string(node);
        }
        if let Some(phase) = self.status.as_mut().and_then(|s| s.phase.as_mut()) {
            interner.string(phase);
        }
        interner.sweep();
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its name, owned (as `kube::ResourceExt::name_any` gives it).
    pub fn name_any(&self) -> String {
        self.name.to_string()
    }

    /// Its namespace, owned (as `kube::ResourceExt::namespace` gives it).
    pub fn namespace(&self) -> Option<String> {
        self.namespace.as_deref().map(str::to_string)
    }

    /// Its namespace.
    pub fn namespace_str(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// Its UID, owned (as `kube::ResourceExt::uid` gives it).
    pub fn uid(&self) -> Option<String> {
        self.uid.as_deref().map(str::to_string)
    }

    /// When the API server created it.
    pub fn creation_timestamp(&self) -> Option<&Time> {
        self.created.as_ref()
    }

    /// When its deletion was asked for (it is terminating).
    pub fn deletion_timestamp(&self) -> Option<&Time> {
        self.deleted.as_ref()
    }

    /// Its controller's owner reference.
    pub fn controller(&self) -> Option<&Controller> {
        self.controller.as_deref()
    }

    /// Its namespace ("" where it has none) and name, sharing its own strings (the
    /// pod store's keys).
    pub(super) fn key(&self) -> (Arc<str>, Arc<str>) {
        let namespace = self.namespace.clone().unwrap_or_else(|| Arc::from(""));
        (namespace, self.name.clone())
    }

    /// Its controller's UID, shared (the pod store's index).
    pub(super) fn controller_arc_uid(&self) -> Option<Arc<str>> {
        Some(self.controller.as_ref()?.uid.clone())
    }

    /// Its labels. (This, not `kube::ResourceExt::labels`, which reads `metadata`.)
    pub fn labels(&self) -> &Tags {
        &self.labels
    }

    /// Its annotations. (This, not `kube::ResourceExt::annotations`.)
    pub fn annotations(&self) -> &Tags {
        &self.annotations
    }
}

impl From<Pod> for SeenPod {
    /// The store's view of a pod the operator holds in full (its create's answer, a
    /// test's pod): what the watch would have kept of its JSON.
    fn from(pod: Pod) -> SeenPod {
        SeenPod::new(
            pod.metadata,
            pod.spec.map(|s| SeenSpec {
                node_name: s.node_name.map(Into::into),
            }),
            pod.status.map(|s| {
                let facts = facts_of_status(&s);
                SeenStatus {
                    ready: facts.ready.map(SeenCondition::from),
                    scheduled: facts.scheduled.map(SeenCondition::from),
                    containers: facts.containers().map(SeenContainer::from).collect(),
                    phase: s.phase.map(Into::into),
                    words: Words::boxed(s.reason, s.message),
                    pod_ip: s.pod_ip.map(Into::into),
                }
            }),
        )
    }
}

/// The status fields every reading of a pod uses, borrowed from either kind of pod.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts<'a> {
    pub phase: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub message: Option<&'a str>,
    pub pod_ip: Option<&'a str>,
    /// The Ready condition.
    pub ready: Option<ConditionFacts<'a>>,
    /// The PodScheduled condition.
    pub scheduled: Option<ConditionFacts<'a>>,
    containers: Containers<'a>,
}

/// A condition, borrowed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConditionFacts<'a> {
    pub status: ConditionStatus,
    pub reason: Option<&'a str>,
    pub message: Option<&'a str>,
    /// When it became what it is.
    pub since: Option<jiff::Timestamp>,
}

/// A container's status, borrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ContainerFacts<'a> {
    /// Waiting: its reason and the kubelet's message.
    pub waiting: Option<(Option<&'a str>, Option<&'a str>)>,
    /// Ended: its exit code and termination message.
    pub terminated: Option<(i32, Option<&'a str>)>,
    /// The last run's termination message.
    pub last_message: Option<&'a str>,
}

#[derive(Clone, Copy, Debug)]
enum Containers<'a> {
    Full(&'a [ContainerStatus]),
    Seen(&'a [SeenContainer]),
}

impl Default for Containers<'_> {
    fn default() -> Self {
        Containers::Seen(&[])
    }
}

impl<'a> Facts<'a> {
    /// Its containers' states.
    pub fn containers(&self) -> impl Iterator<Item = ContainerFacts<'a>> + 'a {
        let (full, seen) = match self.containers {
            Containers::Full(cs) => (cs, &[][..]),
            Containers::Seen(cs) => (&[][..], cs),
        };
        let full = full.iter().map(|c| {
            let state = c.state.as_ref();
            ContainerFacts {
                waiting: state
                    .and_then(|s| s.waiting.as_ref())
                    .map(|w| (w.reason.as_deref(), w.message.as_deref())),
                terminated: state
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| (t.exit_code, t.message.as_deref())),
                last_message: c
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .and_then(|t| t.message.as_deref()),
            }
        });
        full.chain(seen.iter().map(SeenContainer::facts))
    }
}

/// The facts of a `k8s_openapi` pod status: its conditions found by type.
fn facts_of_status(s: &PodStatus) -> Facts<'_> {
    let condition = |type_: &str| {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_)
            .map(|c: &PodCondition| ConditionFacts {
                status: ConditionStatus::of(&c.status),
                reason: c.reason.as_deref(),
                message: c.message.as_deref(),
                since: c.last_transition_time.as_ref().map(|t| t.0),
            })
    };
    Facts {
        phase: s.phase.as_deref(),
        reason: s.reason.as_deref(),
        message: s.message.as_deref(),
        pod_ip: s.pod_ip.as_deref(),
        ready: condition("Ready"),
        scheduled: condition("PodScheduled"),
        containers: Containers::Full(s.container_statuses.as_deref().unwrap_or_default()),
    }
}

/// A pod the helpers can read: the store's [`SeenPod`] or a `k8s_openapi` `Pod`, or
/// an `Arc` of either.
pub trait PodFacts {
    /// Its name.
    fn pod_name(&self) -> Option<&str>;
    /// Its namespace.
    fn pod_namespace(&self) -> Option<&str>;
    /// Its UID.
    fn pod_uid(&self) -> Option<&str>;
    /// The UID of its controller (its owner reference with `controller: true`).
    fn controller_uid(&self) -> Option<&str>;
    /// The value of its label `key`.
    fn label(&self, key: &str) -> Option<&str>;
    /// The value of its annotation `key`.
    fn annotation(&self, key: &str) -> Option<&str>;
    /// All its labels.
    fn label_map(&self) -> BTreeMap<String, String>;
    /// The node the pod is bound to.
    fn node_name(&self) -> Option<&str>;
    /// Its status fields (all empty before it has a status).
    fn facts(&self) -> Facts<'_>;
}

impl PodFacts for SeenPod {
    fn pod_name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn pod_namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    fn pod_uid(&self) -> Option<&str> {
        self.uid.as_deref()
    }

    fn controller_uid(&self) -> Option<&str> {
        Some(&self.controller.as_ref()?.uid)
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key)
    }

    fn label_map(&self) -> BTreeMap<String, String> {
        self.labels.to_map()
    }

    fn node_name(&self) -> Option<&str> {
        self.spec.as_ref()?.node_name.as_deref()
    }

    fn facts(&self) -> Facts<'_> {
        let Some(s) = self.status.as_ref() else {
            return Facts::default();
        };
        Facts {
            phase: s.phase.as_deref(),
            reason: Words::of(&s.words).0,
            message: Words::of(&s.words).1,
            pod_ip: s.pod_ip.as_deref(),
            ready: s.ready.as_ref().map(SeenCondition::facts),
            scheduled: s.scheduled.as_ref().map(SeenCondition::facts),
            containers: Containers::Seen(&s.containers),
        }
    }
}

impl PodFacts for Pod {
    fn pod_name(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }

    fn pod_namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }

    fn pod_uid(&self) -> Option<&str> {
        self.metadata.uid.as_deref()
    }

    fn controller_uid(&self) -> Option<&str> {
        controller_of(&self.metadata).map(|o| o.uid.as_str())
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    fn label_map(&self) -> BTreeMap<String, String> {
        self.metadata.labels.clone().unwrap_or_default()
    }

    fn node_name(&self) -> Option<&str> {
        self.spec.as_ref()?.node_name.as_deref()
    }

    fn facts(&self) -> Facts<'_> {
        self.status
            .as_ref()
            .map(facts_of_status)
            .unwrap_or_default()
    }
}

/// A reference to a pod reads as the pod: `&Pod` in iterator adaptors, `Arc`s from
/// the store.
macro_rules! through {
    ($($t:ty),*) => {$(
        impl<P: PodFacts + ?Sized> PodFacts for $t {
            fn pod_name(&self) -> Option<&str> {
                (**self).pod_name()
            }

            fn pod_namespace(&self) -> Option<&str> {
                (**self).pod_namespace()
            }

            fn pod_uid(&self) -> Option<&str> {
                (**self).pod_uid()
            }

            fn controller_uid(&self) -> Option<&str> {
                (**self).controller_uid()
            }

            fn label(&self, key: &str) -> Option<&str> {
                (**self).label(key)
            }

            fn annotation(&self, key: &str) -> Option<&str> {
                (**self).annotation(key)
            }

            fn label_map(&self) -> BTreeMap<String, String> {
                (**self).label_map()
            }

            fn node_name(&self) -> Option<&str> {
                (**self).node_name()
            }

            fn facts(&self) -> Facts<'_> {
                (**self).facts()
            }
        }
    )*};
}

through!(&P, std::sync::Arc<P>);

/// A node as the operator's store keeps it: its metadata (name, GFD labels), whether
/// it is cordoned, its taints, its allocatable resources and whether it is Ready;
/// what `read_inventory` reads. A `k8s_openapi` `Node` is about 3 KB before its
/// fields' contents (heaptrack: about 3.3 KB a node in the store at 250 nodes), most
/// of it status (capacity, addresses, system info, images, conditions) that nothing
/// here reads.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SeenNode {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<SeenNodeSpec>,
    pub status: Option<SeenNodeStatus>,
}

/// Of a node's spec, what keeps pods off it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SeenNodeSpec {
    pub unschedulable: Option<bool>,
    pub taints: Option<Vec<Taint>>,
}

/// Of a node's status, its allocatable resources and whether it is Ready.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "WireNodeStatus")]
pub struct SeenNodeStatus {
    pub allocatable: BTreeMap<String, Quantity>,
    /// The Ready condition is True.
    pub ready: bool,
}

#[derive(Deserialize)]
struct WireNodeStatus {
    allocatable: Option<BTreeMap<String, Quantity>>,
    conditions: Option<Vec<WireNodeCondition>>,
}

#[derive(Deserialize)]
struct WireNodeCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

impl From<WireNodeStatus> for SeenNodeStatus {
    fn from(w: WireNodeStatus) -> SeenNodeStatus {
        SeenNodeStatus {
            allocatable: w.allocatable.unwrap_or_default(),
            ready: w
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
        }
    }
}

impl From<Node> for SeenNode {
    /// The store's view of a node held in full (tests, benchmarks).
    fn from(node: Node) -> SeenNode {
        let mut metadata = node.metadata;
        metadata.managed_fields = None;
        SeenNode {
            metadata,
            spec: node.spec.map(|s| SeenNodeSpec {
                unschedulable: s.unschedulable,
                taints: s.taints,
            }),
            status: node.status.map(|s| SeenNodeStatus {
                allocatable: s.allocatable.unwrap_or_default(),
                ready: s
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
            }),
        }
    }
}

impl SeenNode {
    /// Drops the managed fields (on a real API server, one entry per writer).
    pub fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }
}

/// A Service as the operator's store keeps it: what `pods::service_matches` compares
/// (its labels and controller, its selector and its ports' name, port, target and
/// protocol), without what the API server fills in (cluster IPs, IP families, node
/// ports, policies, status) or the managed fields. A `k8s_openapi` `Service` in the
/// store, with those, cost about 1.5 KB (heaptrack: 1.5 MB at the fleet's 1,000).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SeenService {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<SeenServiceSpec>,
}

/// Of a Service's spec, its selector and ports.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SeenServiceSpec {
    pub selector: Option<BTreeMap<String, String>>,
    pub ports: Option<Vec<SeenServicePort>>,
}

/// Of a Service port, what gpuscale sets.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SeenServicePort {
    pub name: Option<String>,
    #[serde(default)]
    pub port: i32,
    pub target_port: Option<IntOrString>,
    pub protocol: Option<String>,
}

impl SeenService {
    /// Drops the managed fields and the last `kubectl apply`'s copy of the object.
    pub fn slim(&mut self) {
        self.metadata.managed_fields = None;
        if let Some(a) = self.metadata.annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
}

impl From<Service> for SeenService {
    /// The store's view of a Service held in full (the operator's own, tests).
    fn from(svc: Service) -> SeenService {
        let mut seen = SeenService {
            metadata: svc.metadata,
            spec: svc.spec.map(|s| SeenServiceSpec {
                selector: s.selector,
                ports: s.ports.map(|ports| {
                    ports
                        .into_iter()
                        .map(|p| SeenServicePort {
                            name: p.name,
                            port: p.port,
                            target_port: p.target_port,
                            protocol: p.protocol,
                        })
                        .collect()
                }),
            }),
        };
        seen.slim();
        seen
    }
}
