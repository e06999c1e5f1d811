//! The simulated scheduler: binds each pending pod to a node, deciding as
//! kube-scheduler's default filter plugins do
//! (<https://kubernetes.io/docs/reference/scheduling/config/#scheduling-plugins>):
//!
//! - **NodeUnschedulable**: a cordoned node (`spec.unschedulable`) takes only pods that
//!   tolerate `node.kubernetes.io/unschedulable:NoSchedule`.
//! - **TaintToleration**: every `NoSchedule` and `NoExecute` taint must be tolerated
//!   (<https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/>);
//!   a node that is not Ready carries `node.kubernetes.io/not-ready:NoSchedule`, as the
//!   node lifecycle controller adds it.
//! - **NodeAffinity**: `nodeSelector` and the required node affinity terms
//!   (`matchExpressions` on labels, `matchFields` on `metadata.name`)
//!   (<https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/>).
//! - **VolumeBinding**: claims must exist, bound volumes' node affinity must admit the
//!   node, unbound `WaitForFirstConsumer` claims are provisioned on the chosen node
//!   before the pod is bound (see `crate::volumes`).
//! - **NodeResourcesFit**: the pod's requests (limits stand in for the requests of
//!   extended resources such as `nvidia.com/gpu`) fit the node's allocatable less what
//!   the pods bound to it request
//!   (<https://kubernetes.io/docs/concepts/configuration/manage-resources-containers/>).
//! - **DynamicResources**
//!   (<https://kubernetes.io/docs/concepts/scheduling-eviction/dynamic-resource-allocation/>):
//!   a pod waits until the ResourceClaims it references exist; a claim already
//!   allocated confines the pod to its node; the others must be allocatable on the node
//!   from its ResourceSlices (see `crate::dra::allocate`, CEL selectors evaluated).
//!   Before binding, each claim's allocation and the pod's reservation are written to
//!   the claim's status, and remembered until the store shows them, so no device is
//!   handed out twice while a watch lags.
//!
//! Of the nodes that pass, the one with the most free GPUs, then the first by name.
//! A pod that fits nowhere gets `PodScheduled=False`, reason `Unschedulable`, with the
//! scheduler's message (`0/3 nodes are available: 1 node(s) had untolerated taint
//! {gpu: broken}, 2 Insufficient nvidia.com/gpu.`). Only pods whose `schedulerName` is
//! `default-scheduler` (or unset) are this scheduler's: any other stays Pending, as it
//! does on a cluster where that scheduler does not run. Binding goes through the pod's
//! `binding` subresource, as kube-scheduler's does.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Node, NodeSelector, PersistentVolume, PersistentVolumeClaim, Pod, PodCondition, Taint,
    Toleration,
};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::dra;
use crate::volumes::{self, ClaimState};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::json;

/// The scheduler name this simulator serves.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// A running simulated scheduler; stops when dropped.
pub struct Scheduler {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scheduler {
    /// Starts scheduling the cluster behind `client`.
    pub fn start(client: Client) -> Scheduler {
        Scheduler {
            task: tokio::spawn(run(client)),
        }
    }
}

/// The DRA and volume objects the scheduler reads.
#[derive(Clone)]
struct DraStores {
    claims: Store<ResourceClaim>,
    slices: Store<ResourceSlice>,
    classes: Store<DeviceClass>,
    pvcs: Store<PersistentVolumeClaim>,
    pvs: Store<PersistentVolume>,
    storage_classes: Store<StorageClass>,
}

/// A store of every `K`, kept current by a watch (the future that feeds it).
fn watched<K>(client: &Client) -> (Store<K>, impl std::future::Future<Output = ()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let feed = reflector::reflector(
        writer,
        watcher::watcher(Api::<K>::all(client.clone()), Default::default()),
    )
    .default_backoff()
    .for_each(|_| async {});
    (store, feed)
}

async fn run(client: Client) {
    let (pods, pod_feed) = watched::<Pod>(&client);
    let (nodes, node_feed) = watched::<Node>(&client);
    let (claims, f1) = watched::<ResourceClaim>(&client);
    let (slices, f2) = watched::<ResourceSlice>(&client);
    let (classes, f3) = watched::<DeviceClass>(&client);
    let (pvcs, f4) = watched::<PersistentVolumeClaim>(&client);
    let (pvs, f5) = watched::<PersistentVolume>(&client);
    let (storage_classes, f6) = watched::<StorageClass>(&client);
    let dra_feed = async {
        futures::join!(f1, f2, f3, f4, f5, f6);
    };
    let dra = DraStores {
        claims,
        slices,
        classes,
        pvcs,
        pvs,
        storage_classes,
    };
    tokio::select! {
        () = pod_feed => {}
        () = node_feed => {}
        () = dra_feed => {}
        () = schedule_loop(client, pods, nodes, dra) => {}
    }
}

async fn schedule_loop(client: Client, pods: Store<Pod>, nodes: Store<Node>, dra: DraStores) {
    let _ = pods.wait_until_ready().await;
    let _ = nodes.wait_until_ready().await;
    let _ = dra.claims.wait_until_ready().await;
    let _ = dra.slices.wait_until_ready().await;
    let _ = dra.classes.wait_until_ready().await;
    let _ = dra.pvcs.wait_until_ready().await;
    let _ = dra.pvs.wait_until_ready().await;
    let _ = dra.storage_classes.wait_until_ready().await;
    // The last message written per pod, by UID, so an unchanged refusal is not written
    // again. Not by name: a pod deleted and made again under its name between two
    // rounds (a capacity request replaced) is another pod, with no condition yet.
    let mut reported: HashMap<String, String> = HashMap::new();
    // Claims this scheduler allocated, until the store shows the allocation (the
    // scheduler's assume cache).
    let mut assumed: HashMap<String, ResourceClaim> = HashMap::new();
    loop {
        let all = pods.state();
        let node_list = nodes.state();
        let stored = dra.claims.state();
        assumed.retain(|k, _| {
            stored.iter().find(|c| claim_key(c) == *k).is_some_and(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.allocation.as_ref())
                    .is_none()
            })
        });
        let pvcs = dra.pvcs.state();
        let pvs = dra.pvs.state();
        let storage_classes = dra.storage_classes.state();
        let slices = dra.slices.state();
        let classes: Vec<DeviceClass> = dra.classes.state().iter().map(|c| (**c).clone()).collect();
        let mut bound: Vec<Pod> = all
            .iter()
            .filter(|p| node_of(p).is_some() && !terminal(p))
            .map(|p| (**p).clone())
            .collect();
        let mut pending: Vec<&Pod> = all
            .iter()
            .map(|p| &**p)
            .filter(|p| node_of(p).is_none() && p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                let name = p.spec.as_ref().and_then(|s| s.scheduler_name.as_deref());
                name.is_none_or(|n| n == DEFAULT_SCHEDULER)
            })
            .collect();
        pending.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
        // What the claims hold, built once per round and extended as this round
        // allocates (an allocation the store does not show yet is in `assumed`).
        let mut in_use = dra::InUse::of(
            stored
                .iter()
                .map(|c| &**c)
                .filter(|c| !assumed.contains_key(&claim_key(c)))
                .chain(assumed.values()),
        );
        let slice_refs: Vec<&ResourceSlice> = slices.iter().map(|s| &**s).collect();
        for pod in pending {
            let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
            let uid = pod.uid().unwrap_or_default();
            let ns = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            // DynamicResources' PreEnqueue: every claim must exist first.
            let mut claims: Vec<ResourceClaim> = Vec::new();
            let mut waiting = false;
            for name in claim_names(pod) {
                let key = format!("{ns}/{name}");
                match assumed.get(&key).cloned().or_else(|| {
                    stored
                        .iter()
                        .find(|c| claim_key(c) == key)
                        .map(|c| (**c).clone())
                }) {
                    Some(c) => claims.push(c),
                    None => waiting = true,
                }
            }
            if waiting {
                continue;
            }
            let fit = |node: &str| allocate_claims(&claims, &classes, node, &slice_refs, &in_use);
            let plugins = Plugins {
                volumes: volumes::prefilter(pod, &pvcs, &pvs, &storage_classes),
                claims: &fit,
            };
            match choose(pod, &node_list, &bound, &plugins) {
                Ok(node) => {
                    // PreBind: volumes first; the pod is bound once its claims are.
                    let states = plugins.volumes.as_deref().unwrap_or_default();
                    if !volumes::prebind(&client, states, &node).await {
                        continue;
                    }
                    // PreBind: write each claim's allocation and the pod's reservation.
                    let allocations = fit(&node).unwrap_or_default();
                    let mut written = true;
                    for (claim, allocation) in claims.iter().zip(allocations) {
                        let new = allocation.is_some();
                        match reserve(&client, claim, allocation, pod).await {
                            Ok(c) => {
                                // Newly allocated: the next pods of this round see it.
                                if new {
                                    in_use.add(&c);
                                }
                                assumed.insert(claim_key(&c), c);
                            }
                            Err(e) => {
                                tracing::debug!(pod = %key, error = %e, "claim not reserved");
                                written = false;
                            }
                        }
                    }
                    if !written {
                        continue;
                    }
                    // With the pod's UID, as kube-scheduler's DefaultBinder sends it: this
                    // round's view may be of a pod deleted and made again since.
                    let binding = json!({"apiVersion": "v1", "kind": "Binding",
                        "metadata": {"name": pod.name_any(), "uid": pod.uid()},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
                    match api
                        .create_subresource::<_, serde_json::Value>(
                            "binding",
                            &pod.name_any(),
                            &PostParams::default(),
                            &binding,
                        )
                        .await
                    {
                        Ok(_) => {
                            let mut p = pod.clone();
                            p.spec.get_or_insert_with(Default::default).node_name = Some(node);
                            bound.push(p);
                            reported.remove(&uid);
                        }
                        Err(e) => tracing::debug!(pod = %key, error = %e, "binding failed"),
                    }
                }
                Err(message) => {
                    if reported.get(&uid) == Some(&message) {
                        continue;
                    }
                    let cond = PodCondition {
                        type_: "PodScheduled".into(),
                        status: "False".into(),
                        reason: Some("Unschedulable".into()),
                        message: Some(message.clone()),
                        last_transition_time: Some(
                            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                jiff::Timestamp::now(),
                            ),
                        ),
                        ..PodCondition::default()
                    };
                    // The UID as a precondition, as the binding's (see `Store::update`).
                    let patch = json!({"metadata": {"uid": pod.uid()},
                        "status": {"conditions": [cond]}});
                    if api
                        .patch_status(
                            &pod.name_any(),
                            &PatchParams::default(),
                            &Patch::Strategic(&patch),
                        )
                        .await
                        .is_ok()
                    {
                        reported.insert(uid, message);
                    }
                }
            }
        }
        reported.retain(|uid, _| all.iter().any(|p| p.uid().as_ref() == Some(uid)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn node_of(p: &Pod) -> Option<&str> {
    p.spec
        .as_ref()?
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

fn terminal(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pod's claims, allocated on `node` where they are not yet: per claim, its
/// allocation to write (`None`: already allocated there), or why not.
type Allocations = Vec<Option<serde_json::Value>>;

fn allocate_claims(
    claims: &[ResourceClaim],
    classes: &[DeviceClass],
    node: &str,
    slices: &[&ResourceSlice],
    in_use: &dra::InUse,
) -> Result<Allocations, String> {
    let mut in_use_now = dra::InUse::default();
    let mut out = Vec::new();
    for c in claims {
        if let Some(at) = dra::allocated_node(c) {
            if at != node {
                return Err("node(s) didn't match Pod's node affinity/selector".into());
            }
            out.push(None);
            continue;
        }
        let a = dra::allocate(c, classes, node, slices, &in_use.merged(&in_use_now))?;
        let mut done = c.clone();
        done.status = Some(
            serde_json::from_value(json!({"allocation": a.clone()})).map_err(|e| e.to_string())?,
        );
        in_use_now.add(&done);
        out.push(Some(a));
    }
    Ok(out)
}

/// Writes a claim's allocation (if new) and the pod's reservation into its status.
async fn reserve(
    client: &Client,
    claim: &ResourceClaim,
    allocation: Option<serde_json::Value>,
    pod: &Pod,
) -> Result<ResourceClaim, kube::Error> {
    let api: Api<ResourceClaim> =
        Api::namespaced(client.clone(), &claim.namespace().unwrap_or_default());
    let mut status = serde_json::to_value(claim.status.clone().unwrap_or_default())
        .unwrap_or_else(|_| json!({}));
    if let Some(a) = allocation {
        status["allocation"] = a;
    }
    let me = json!({"resource": "pods", "name": pod.name_any(), "uid": pod.uid()});
    let mut reserved = status["reservedFor"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !reserved.contains(&me) {
        reserved.push(me);
    }
    status["reservedFor"] = json!(reserved);
    let patch =
        json!({"metadata": {"resourceVersion": claim.resource_version()}, "status": status});
    api.patch_status(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
}

fn claim_key(c: &ResourceClaim) -> String {
    format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any())
}

/// The ResourceClaims a pod references by name.
fn claim_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.resource_claims.iter().flatten())
        .filter_map(|r| r.resource_claim_name.clone())
        .collect()
}

/// What the volume and DRA plugins found for one pod.
pub struct Plugins<'a> {
    /// VolumeBinding's PreFilter: the pod's claims, or why no node can take it.
    pub volumes: Result<Vec<ClaimState>, String>,
    /// DynamicResources: whether the pod's ResourceClaims can be allocated on a node.
    pub claims: &'a (dyn Fn(&str) -> Result<Allocations, String> + Sync),
}

/// The node `pod` goes to, or the scheduler's message saying why none fits.
pub fn choose(
    pod: &Pod,
    nodes: &[std::sync::Arc<Node>],
    bound: &[Pod],
    plugins: &Plugins,
) -> Result<String, String> {
    let volumes = match &plugins.volumes {
        Ok(v) => v,
        Err(e) => return Err(format!("0/{} nodes are available: {e}.", nodes.len())),
    };
    let mut why: BTreeMap<String, usize> = BTreeMap::new();
    let mut fits: Vec<(i64, String)> = Vec::new();
    // The bound pods by node, once: a scan of every bound pod for every node made a
    // fleet of 1,000 nodes and 10,000 pods schedule a few pods a second.
    let mut by_node: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for p in bound {
        if let Some(n) = node_of(p) {
            by_node.entry(n).or_default().push(p);
        }
    }
    for node in nodes {
        let name = node.name_any();
        let on_node = by_node.get(name.as_str()).map_or(&[][..], Vec::as_slice);
        let fit = filter(pod, node, on_node)
            .and_then(|free| volumes::filter(volumes, node).map(|()| free))
            .and_then(|free| (plugins.claims)(&node.name_any()).map(|_| free));
        match fit {
            Ok(free_gpus) => fits.push((-free_gpus, node.name_any())),
            Err(reason) => *why.entry(reason).or_default() += 1,
        }
    }
    fits.sort();
    match fits.into_iter().next() {
        Some((_, name)) => Ok(name),
        None => {
            let reasons: Vec<String> = why.iter().map(|(r, n)| format!("{n} {r}")).collect();
            Err(format!(
                "0/{} nodes are available: {}.",
                nodes.len(),
                if reasons.is_empty() {
                    "no nodes".to_string()
                } else {
                    reasons.join(", ")
                }
            ))
        }
    }
}

/// Whether `pod` may go to `node` (with `on_node` already bound there): the node's free
/// `nvidia.com/gpu` count after it, or the reason in the scheduler's words.
pub fn filter(pod: &Pod, node: &Node, on_node: &[&Pod]) -> Result<i64, String> {
    let default = k8s_openapi::api::core::v1::PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&default);
    let no_tolerations = Vec::new();
    let tolerations = spec.tolerations.as_ref().unwrap_or(&no_tolerations);
    // NodeUnschedulable
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
        && !tolerated(
            tolerations,
            "node.kubernetes.io/unschedulable",
            None,
            "NoSchedule",
        )
    {
        return Err("node(s) were unschedulable".into());
    }
    // TaintToleration (with the not-ready taint of a node that is not Ready)
    let mut taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        taints.push(Taint {
            key: "node.kubernetes.io/not-ready".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        });
    }
    for t in &taints {
        if matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
            && !tolerated(tolerations, &t.key, t.value.as_deref(), &t.effect)
        {
            return Err(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t.key,
                t.value.clone().unwrap_or_default()
            ));
        }
    }
    // NodeAffinity
    let labels = node.labels();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let affinity_ok = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_none_or(|sel| matches_selector(sel, node));
    if !(selector_ok && affinity_ok) {
        return Err("node(s) didn't match Pod's node affinity/selector".into());
    }
    // NodeResourcesFit
    let allocatable: BTreeMap<String, i128> = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .map(|a| {
            a.iter()
                .filter_map(|(k, q)| Some((k.clone(), parse_quantity(&q.0)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut used: BTreeMap<String, i128> = BTreeMap::new();
    for p in on_node {
        for (k, v) in requests(p) {
            *used.entry(k).or_default() += v;
        }
        *used.entry("pods".into()).or_default() += 1000;
    }
    let mut want = requests(pod);
    *want.entry("pods".into()).or_default() += 1000;
    let mut short: Vec<String> = Vec::new();
    for (k, v) in &want {
        if *v == 0 {
            continue;
        }
        let have = allocatable.get(k).copied().unwrap_or(0);
        if used.get(k).copied().unwrap_or(0) + v > have {
            short.push(if k == "pods" {
                "Too many pods".into()
            } else {
                format!("Insufficient {k}")
            });
        }
    }
    if let Some(first) = short.into_iter().next() {
        return Err(first);
    }
    let gpus = |m: &BTreeMap<String, i128>| m.get("nvidia.com/gpu").copied().unwrap_or(0);
    Ok(((gpus(&allocatable) - gpus(&used) - gpus(&want)) / 1000) as i64)
}

/// Whether a required node selector (node affinity, a volume's node affinity) admits
/// `node`: any term matching, all of a term's requirements met, an empty term matching
/// nothing.
pub(crate) fn matches_selector(sel: &NodeSelector, node: &Node) -> bool {
    let labels = node.labels();
    sel.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.iter().flatten().all(|r| {
            requirement(
                labels.get(&r.key).map(String::as_str),
                &r.operator,
                r.values.as_deref(),
            )
        });
        let fields = term.match_fields.iter().flatten().all(|r| {
            let name = node.name_any();
            let v = (r.key == "metadata.name").then_some(name.as_str());
            requirement(v, &r.operator, r.values.as_deref())
        });
        let empty = term.match_expressions.as_ref().is_none_or(Vec::is_empty)
            && term.match_fields.as_ref().is_none_or(Vec::is_empty);
        !empty && exprs && fields
    })
}

/// Whether `tolerations` tolerate the taint `key=value:effect`.
fn tolerated(tolerations: &[Toleration], key: &str, value: Option<&str>, effect: &str) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == effect);
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == value.unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

/// One node selector requirement against the value `v` (absent: `None`).
fn requirement(v: Option<&str>, operator: &str, values: Option<&[String]>) -> bool {
    let values = values.unwrap_or_default();
    match operator {
        "In" => v.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => v.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                v.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// A pod's requests in thousandths (millicores, milli-bytes, milli-devices): the sum
/// over its containers, with limits standing in for extended resources' requests.
fn requests(pod: &Pod) -> BTreeMap<String, i128> {
    let mut out: BTreeMap<String, i128> = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let Some(r) = &c.resources else { continue };
        let mut these: BTreeMap<String, i128> = BTreeMap::new();
        for (k, q) in r.limits.iter().flatten() {
            if k.contains('/') {
                if let Some(v) = parse_quantity(&q.0) {
                    these.insert(k.clone(), v);
                }
            }
        }
        for (k, q) in r.requests.iter().flatten() {
            if let Some(v) = parse_quantity(&q.0) {
                these.insert(k.clone(), v);
            }
        }
        for (k, v) in these {
            *out.entry(k).or_default() += v;
        }
    }
    out
}

/// A Kubernetes quantity in thousandths of its unit (`500m` → 500, `2` → 2000,
/// `1Gi` → 1073741824000).
pub fn parse_quantity(s: &str) -> Option<i128> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        _ => return None,
    };
    Some((value * scale * 1000.0).round() as i128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn no_claims(_: &str) -> Result<Allocations, String> {
        Ok(Vec::new())
    }

    fn none() -> Plugins<'static> {
        Plugins {
            volumes: Ok(Vec::new()),
            claims: &no_claims,
        }
    }

    fn node(name: &str, gpus: u32, taints: serde_json::Value) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(
                json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"taints": taints},
                "status": {"allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110",
                                           "nvidia.com/gpu": gpus.to_string()},
                           "conditions": [{"type": "Ready", "status": "True"}]}}),
            )
            .unwrap(),
        )
    }

    fn pod(gpus: u32, extra: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "w", "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]}});
        if let (Some(spec), Some(extra)) = (p["spec"].as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                spec.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(p).unwrap()
    }

    fn pinned(node: &str) -> serde_json::Value {
        json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}}})
    }

    #[test]
    fn required_node_affinity_by_name_picks_that_node_only() {
        let nodes = vec![node("a", 2, json!([])), node("b", 2, json!([]))];
        assert_eq!(
            choose(&pod(1, pinned("b")), &nodes, &[], &none()),
            Ok("b".into())
        );
        let e = choose(&pod(1, pinned("c")), &nodes, &[], &none()).unwrap_err();
        assert_eq!(
            e,
            "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
        );
    }

    #[test]
    fn an_untolerated_taint_refuses_and_a_toleration_admits() {
        let nodes = vec![node(
            "a",
            2,
            json!([{"key": "gpu", "value": "broken", "effect": "NoSchedule"}]),
        )];
        let e = choose(&pod(1, json!({})), &nodes, &[], &none()).unwrap_err();
        assert!(
            e.contains("1 node(s) had untolerated taint {gpu: broken}"),
            "{e}"
        );
        let tolerant = pod(
            1,
            json!({"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}),
        );
        assert_eq!(choose(&tolerant, &nodes, &[], &none()), Ok("a".into()));
        // PreferNoSchedule never filters.
        let soft = vec![node(
            "a",
            2,
            json!([{"key": "x", "effect": "PreferNoSchedule"}]),
        )];
        assert!(choose(&pod(1, json!({})), &soft, &[], &none()).is_ok());
    }

    #[test]
    fn gpus_already_requested_on_a_node_are_not_handed_out_twice() {
        let nodes = vec![node("a", 2, json!([]))];
        let mut on_a = pod(2, json!({}));
        on_a.spec.as_mut().unwrap().node_name = Some("a".into());
        let e = choose(&pod(1, json!({})), &nodes, &[on_a], &none()).unwrap_err();
        assert_eq!(e, "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.");
    }

    #[test]
    fn a_volume_refusal_is_the_scheduler_s_message() {
        let nodes = vec![node("a", 2, json!([]))];
        let refused = Plugins {
            volumes: Err("persistentvolumeclaim \"models\" not found".into()),
            claims: &no_claims,
        };
        assert_eq!(
            choose(&pod(1, json!({})), &nodes, &[], &refused),
            Err("0/1 nodes are available: persistentvolumeclaim \"models\" not found.".into())
        );
    }

    #[test]
    fn quantities_parse_as_the_api_writes_them() {
        assert_eq!(parse_quantity("500m"), Some(500));
        assert_eq!(parse_quantity("2"), Some(2000));
        assert_eq!(parse_quantity("1Gi"), Some(1024 * 1024 * 1024 * 1000));
        assert_eq!(parse_quantity("1.5"), Some(1500));
        assert_eq!(parse_quantity("x"), None);
    }
}
