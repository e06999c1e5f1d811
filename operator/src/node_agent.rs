//! The node agent: reads this node's GPUs through NVML and publishes them as the
//! node's `GpuInventory` (server-side apply), so placement sees free memory measured on
//! the device (memory used outside Kubernetes included), health and NVLink topology.
//! Without NVML (a CPU node, or no driver) it publishes an empty inventory saying why.

use std::collections::HashMap;
use std::time::Duration;

use gpuscale_crds::{GpuDevice, GpuHealth, GpuInventory, GpuInventorySpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::{EventSet, Nvml};
use tracing::{info, warn};

/// NVML_NVLINK_MAX_LINKS: links a device may have.
const NVLINK_MAX_LINKS: u32 = 18;

/// Field manager of the agent's server-side applies.
pub const FIELD_MANAGER: &str = "gpuscale-node-agent";

/// Throttle reasons reported, with the names placement checks; idle and
/// clock-setting reasons are normal and not reported.
const THROTTLE_NAMES: &[(ThrottleReasons, &str)] = &[
    (ThrottleReasons::HW_SLOWDOWN, "HwSlowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "HwThermalSlowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "HwPowerBrakeSlowdown",
    ),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "SwThermalSlowdown"),
    (ThrottleReasons::SW_POWER_CAP, "SwPowerCap"),
];

/// NVML, opened once for the life of the process.
pub struct Probe {
    nvml: Option<&'static Nvml>,
    /// Critical XID events, drained at each refresh.
    events: Option<EventSet<'static>>,
    /// Critical XID errors seen per device UUID.
    xids: HashMap<String, u32>,
    why_none: Option<String>,
}

impl Probe {
    /// Opens NVML; its absence is normal on CPU nodes and is reported, not an error.
    pub fn new() -> Probe {
        match Nvml::init() {
            Ok(nvml) => {
                // The agent needs NVML for its whole life, and the XID event set
                // borrows it: leaking the one handle gives both a 'static lifetime.
                let nvml: &'static Nvml = Box::leak(Box::new(nvml));
                let events = register_xid_events(nvml);
                Probe {
                    nvml: Some(nvml),
                    events,
                    xids: HashMap::new(),
                    why_none: None,
                }
            }
            Err(e) => Probe {
                nvml: None,
                events: None,
                xids: HashMap::new(),
                why_none: Some(format!(
                    "NVML not available ({e}): no NVIDIA driver on this node"
                )),
            },
        }
    }

    /// The node's inventory now.
    pub fn collect(&mut self, node: &str, zone: Option<String>) -> GpuInventorySpec {
        let mut spec = GpuInventorySpec {
            node: node.to_string(),
            zone,
            observed_at: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        };
        let Some(nvml) = self.nvml else {
            spec.message = self.why_none.clone();
            return spec;
        };
        self.drain_xids();
        match read_devices(nvml, &self.xids) {
            Ok(gpus) => {
                spec.gpu_count = gpus.len() as u32;
                spec.product = gpus.first().map(|g| g.product.clone());
                if gpus.is_empty() {
                    spec.message = Some("NVML found no GPU".into());
                }
                spec.gpus = gpus;
            }
            Err(e) => spec.message = Some(format!("NVML failed: {e}")),
        }
        spec
    }

    fn drain_xids(&mut self) {
        let Some(set) = &self.events else { return };
        while let Ok(ev) = set.wait(0) {
            if let Ok(uuid) = ev.device.uuid() {
                warn!(%uuid, xid = ?ev.event_data, "critical XID error");
                *self.xids.entry(uuid).or_default() += 1;
            }
        }
    }
}

impl Default for Probe {
    fn default() -> Self {
        Probe::new()
    }
}

fn register_xid_events(nvml: &'static Nvml) -> Option<EventSet<'static>> {
    let mut set = nvml.create_event_set().ok()?;
    for i in 0..nvml.device_count().ok()? {
        let dev = nvml.device_by_index(i).ok()?;
        set = match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => s,
            // Some GPUs (and vGPUs) do not support XID events: no counting then.
            Err(e) => {
                warn!(gpu = i, error = %e, "XID events unsupported");
                return None;
            }
        };
    }
    Some(set)
}

fn read_devices(
    nvml: &Nvml,
    xids: &HashMap<String, u32>,
) -> Result<Vec<GpuDevice>, nvml_wrapper::error::NvmlError> {
    let count = nvml.device_count()?;
    let mut bus_to_index = HashMap::new();
    for i in 0..count {
        bus_to_index.insert(
            nvml.device_by_index(i)?.pci_info()?.bus_id.to_lowercase(),
            i,
        );
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let d = nvml.device_by_index(i)?;
        let mem = d.memory_info()?;
        let uuid = d.uuid()?;
        let mut peers: Vec<u32> = (0..NVLINK_MAX_LINKS)
            .filter_map(|l| {
                let link = d.link_wrapper_for(l);
                if link.is_active().ok()? {
                    bus_to_index
                        .get(&link.remote_pci_info().ok()?.bus_id.to_lowercase())
                        .copied()
                } else {
                    None
                }
            })
            .filter(|&p| p != i)
            .collect();
        peers.sort_unstable();
        peers.dedup();
        let throttle = d
            .current_throttle_reasons()
            .unwrap_or(ThrottleReasons::NONE);
        out.push(GpuDevice {
            index: i,
            product: d.name()?,
            memory_total_bytes: mem.total,
            memory_free_bytes: mem.free,
            compute_capability: d
                .cuda_compute_capability()
                .ok()
                .map(|c| format!("{}.{}", c.major, c.minor)),
            nvlink_peers: peers,
            numa_node: d.numa_node_id().ok(),
            health: GpuHealth {
                xid_errors: xids.get(&uuid).copied().unwrap_or(0),
                throttle_reasons: THROTTLE_NAMES
                    .iter()
                    .filter(|(flag, _)| throttle.contains(*flag))
                    .map(|(_, name)| name.to_string())
                    .collect(),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            },
            uuid,
        });
    }
    Ok(out)
}

/// The object the agent applies for `spec` (named after the node), owned by the Node
/// when its uid is known, so that the garbage collector deletes it with the node
/// (<https://kubernetes.io/docs/concepts/architecture/garbage-collection/#owners-dependents>:
/// a cluster-scoped dependent may have a cluster-scoped owner).
pub fn inventory_object(spec: GpuInventorySpec, node_uid: Option<&str>) -> GpuInventory {
    let mut obj = GpuInventory::new(&spec.node.clone(), spec);
    obj.metadata.owner_references = node_uid.map(|uid| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: obj.spec.node.clone(),
            uid: uid.into(),
            // Neither controller nor blockOwnerDeletion: nothing waits on it, and
            // blocking would need update on nodes/finalizers.
            ..OwnerReference::default()
        }]
    });
    obj
}

/// Server-side applies the node's inventory.
pub async fn publish(
    client: &Client,
    spec: GpuInventorySpec,
    node_uid: Option<&str>,
) -> Result<GpuInventory, kube::Error> {
    let api: Api<GpuInventory> = Api::all(client.clone());
    let name = spec.node.clone();
    let obj = inventory_object(spec, node_uid);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
}

/// What the agent reads of its Node: the zone label and the uid (its inventory's
/// owner). Nothing when the node cannot be read (logged).
pub async fn node_facts(client: &Client, node: &str) -> (Option<String>, Option<String>) {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.get(node).await {
        Ok(n) => (
            n.metadata
                .labels
                .and_then(|l| l.get("topology.kubernetes.io/zone").cloned()),
            n.metadata.uid,
        ),
        Err(e) => {
            warn!(node, error = %e, "cannot read the node (zone label, uid)");
            (None, None)
        }
    }
}

/// Where the agent learns which GPUs the kubelet assigned to each pod.
#[derive(Clone, Debug)]
pub struct Assignments {
    /// The kubelet's PodResources socket.
    pub socket: std::path::PathBuf,
    /// The GPU extended resources to report (`nvidia.com/gpu`, the sharing resource).
    pub resources: Vec<String>,
}

/// Publishes the inventory every `interval` until the process ends, with the GPU
/// assignments the kubelet lists when `assignments` says where. API errors are logged
/// and retried at the next tick; nothing is lost by a failed refresh.
pub async fn run(
    client: Client,
    node: String,
    interval: Duration,
    assignments: Option<Assignments>,
) {
    let mut probe = Probe::new();
    let (zone, uid) = node_facts(&client, &node).await;
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let mut spec = probe.collect(&node, zone.clone());
        if let Some(a) = &assignments {
            match crate::pod_resources::list(&a.socket).await {
                Ok(list) => {
                    let names: Vec<&str> = a.resources.iter().map(String::as_str).collect();
                    spec.assignments = crate::pod_resources::gpu_assignments(&list, &names);
                }
                // Published without assignments: the operator then follows what the
                // workers report, as before.
                Err(e) => warn!(node, error = %e, "cannot list the kubelet's pod resources"),
            }
        }
        let gpus = spec.gpu_count;
        match publish(&client, spec, uid.as_deref()).await {
            Ok(_) => info!(node, gpus, "published GPU inventory"),
            Err(e) => {
                warn!(node, error = %e, "publishing GPU inventory failed; retrying next interval")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;

    #[test]
    fn without_nvml_the_inventory_is_empty_and_says_why() {
        // This machine has no NVIDIA driver; on a GPU machine the probe finds GPUs.
        let mut probe = Probe::new();
        let spec = probe.collect("cpu-node", Some("z1".into()));
        if probe.nvml.is_none() {
            assert!(spec.gpus.is_empty());
            assert_eq!(spec.gpu_count, 0);
            assert!(
                spec.message
                    .as_deref()
                    .unwrap()
                    .contains("NVML not available"),
                "{spec:?}"
            );
        } else {
            assert_eq!(spec.gpu_count as usize, spec.gpus.len());
        }
        assert_eq!(spec.node, "cpu-node");
        assert_eq!(spec.zone.as_deref(), Some("z1"));
    }

    fn mock() -> (
        Client,
        tower_test::mock::Handle<Request<Body>, Response<Body>>,
    ) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(svc, "default"), handle)
    }

    fn spec() -> GpuInventorySpec {
        GpuInventorySpec {
            node: "gpu-a".into(),
            gpu_count: 1,
            gpus: vec![GpuDevice {
                index: 0,
                uuid: "GPU-1".into(),
                product: "NVIDIA L4".into(),
                memory_total_bytes: 24 << 30,
                memory_free_bytes: 20 << 30,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn publishes_with_server_side_apply_to_the_node_named_object() {
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("one request");
            assert_eq!(req.method(), http::Method::PATCH);
            assert_eq!(
                req.uri().path(),
                "/apis/gpuscale.dev/v1alpha1/gpuinventories/gpu-a"
            );
            let query = req.uri().query().unwrap();
            assert!(
                query.contains("fieldManager=gpuscale-node-agent") && query.contains("force=true"),
                "{query}"
            );
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let obj: GpuInventory = serde_json::from_slice(&body).unwrap();
            assert_eq!(obj.spec.gpus[0].uuid, "GPU-1");
            let owner = &obj.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("Node", "gpu-a", "node-uid")
            );
            send.send_response(Response::builder().body(Body::from(body.to_vec())).unwrap());
        });
        let got = publish(&client, spec(), Some("node-uid")).await.unwrap();
        assert_eq!(got.spec.gpu_count, 1);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_api_server_error_is_returned_not_swallowed() {
        let (client, mut handle) = mock();
        tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
            send.send_response(
                Response::builder()
                    .status(500)
                    .body(Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap(),
            );
        });
        let err = publish(&client, spec(), None).await.unwrap_err();
        assert!(
            err.to_string().contains("etcdserver: request timed out"),
            "{err}"
        );
    }
}
