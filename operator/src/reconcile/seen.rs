//! What the pod store keeps of a pod ([`SeenPod`]), and what every reading of a pod
//! needs ([`PodFacts`]), so that the same helpers (`is_ready`, `failure`,
//! `placement_of`, …) read the store's pods and `k8s_openapi` pods alike (the
//! simulator, the router and the tests hold the latter).
//!
//! A pass reads a pod's metadata, its node and a few of its status fields, never the
//! rest of its spec nor its managed fields, which are most of its bytes. A
//! `k8s_openapi` `Pod` is 2,248 bytes before any field is set (1,440 of them the
//! `PodSpec`), so even with everything else dropped it cost about 5 KB a pod in the
//! store: heaptrack at 9,335 pods put about 50 MB of the operator's 112 MB peak heap
//! in the pod store. A `SeenPod` is read straight from the watch (serde skips the
//! fields it does not name without building them) and keeps only these.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use serde::Deserialize;

/// A pod as the operator's store keeps it (see the module comment). Deserialized from
/// the API's pod JSON; [`SeenPod::slim`] then drops what serde still had to build.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SeenPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<SeenSpec>,
    pub status: Option<SeenStatus>,
}

/// Of a pod's spec, the node it is bound to.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SeenSpec {
    pub node_name: Option<String>,
}

/// Of a pod's status, what `pods.rs`, `observe.rs` and `model.rs` read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SeenStatus {
    pub phase: Option<String>,
    pub reason: Option<String>,
    pub message: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub conditions: Option<Vec<PodCondition>>,
    pub container_statuses: Option<Vec<ContainerStatus>>,
}

impl kube::Resource for SeenPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl SeenPod {
    /// Drops what a pass never reads and serde had to build: managed fields (on a
    /// real API server one entry per writer, each a tree of the fields it set),
    /// conditions other than Ready and PodScheduled, and of each container status all
    /// but its readiness, restarts, waiting or terminated state (a model probe's
    /// summary is its termination message) and the last termination's message (why
    /// it is failing). A container status alone carries its image, image ID,
    /// container ID, resources and volume mounts.
    pub fn slim(&mut self) {
        self.metadata.managed_fields = None;
        if let Some(status) = self.status.as_mut() {
            if let Some(cs) = status.conditions.as_mut() {
                cs.retain(|c| c.type_ == "Ready" || c.type_ == "PodScheduled");
            }
            if let Some(cs) = status.container_statuses.take() {
                status.container_statuses = Some(cs.into_iter().map(slim_container).collect());
            }
        }
    }
}

fn slim_container(c: ContainerStatus) -> ContainerStatus {
    ContainerStatus {
        name: c.name,
        ready: c.ready,
        restart_count: c.restart_count,
        state: c.state.map(|s| ContainerState {
            waiting: s.waiting,
            terminated: s.terminated.map(|t| ContainerStateTerminated {
                exit_code: t.exit_code,
                reason: t.reason,
                message: t.message,
                ..Default::default()
            }),
            running: None,
        }),
        last_state: c
            .last_state
            .and_then(|s| s.terminated)
            .map(|t| ContainerState {
                terminated: Some(ContainerStateTerminated {
                    message: t.message,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ..Default::default()
    }
}

impl From<Pod> for SeenPod {
    /// The store's view of a pod the operator holds in full (its create's answer, a
    /// test's pod).
    fn from(pod: Pod) -> SeenPod {
        let mut seen = SeenPod {
            metadata: pod.metadata,
            spec: pod.spec.map(|s| SeenSpec {
                node_name: s.node_name,
            }),
            status: pod.status.map(|s| SeenStatus {
                phase: s.phase,
                reason: s.reason,
                message: s.message,
                pod_ip: s.pod_ip,
                conditions: s.conditions,
                container_statuses: s.container_statuses,
            }),
        };
        seen.slim();
        seen
    }
}

/// The status fields every reading of a pod uses, borrowed from either kind of pod.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts<'a> {
    pub phase: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub message: Option<&'a str>,
    pub pod_ip: Option<&'a str>,
    pub conditions: &'a [PodCondition],
    pub containers: &'a [ContainerStatus],
}

/// A pod the helpers can read: the store's [`SeenPod`] or a `k8s_openapi` `Pod`, or
/// an `Arc` of either.
pub trait PodFacts {
    /// Its metadata.
    fn pod_meta(&self) -> &ObjectMeta;
    /// The node the pod is bound to.
    fn node_name(&self) -> Option<&str>;
    /// Its status fields (all empty before it has a status).
    fn facts(&self) -> Facts<'_>;
}

/// `PodFacts` for a pod type with `Pod`'s field names: `SeenPod` keeps them, so the
/// one reading serves both.
macro_rules! facts_of_fields {
    ($($t:ty),*) => {$(
        impl PodFacts for $t {
            fn pod_meta(&self) -> &ObjectMeta {
                &self.metadata
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
                    reason: s.reason.as_deref(),
                    message: s.message.as_deref(),
                    pod_ip: s.pod_ip.as_deref(),
                    conditions: s.conditions.as_deref().unwrap_or_default(),
                    containers: s.container_statuses.as_deref().unwrap_or_default(),
                }
            }
        }
    )*};
}

facts_of_fields!(SeenPod, Pod);

/// A reference to a pod reads as the pod: `&Pod` in iterator adaptors, `Arc`s from
/// the store.
macro_rules! through {
    ($($t:ty),*) => {$(
        impl<P: PodFacts + ?Sized> PodFacts for $t {
            fn pod_meta(&self) -> &ObjectMeta {
                (**self).pod_meta()
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
