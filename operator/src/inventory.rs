//! The GPU inventory placement works on, built from what the cluster publishes:
//! the DRA driver's `ResourceSlice`s (resource.k8s.io/v1: the devices a claim can name),
//! the node agent's `GpuInventory` objects (NVML: free memory, health, NVLink), or,
//! where no agent runs, NVIDIA GPU Feature Discovery labels and allocatable
//! `nvidia.com/gpu`. Each node also says how its GPUs are bound to a pod
//! ([`Binding`]): that decides what a replica there can ask for.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use gpuscale_crds::{GpuAssignment, GpuDevice, GpuInventory, GpuInventorySpec};
use k8s_openapi::api::resource::v1::{DeviceAttribute, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ClusterResourceScope;
use serde::Deserialize;

/// Throttle reasons that mean the GPU is slowed by hardware, heat or power: such GPUs
/// get no new replicas. Idle, application-clock and power-cap reasons are normal.
pub const BLOCKING_THROTTLE_REASONS: &[&str] = &[
    "HwSlowdown",
    "HwThermalSlowdown",
    "HwPowerBrakeSlowdown",
    "SwThermalSlowdown",
];
/// Core temperature at which a GPU gets no new replicas.
pub const MAX_TEMPERATURE_C: u32 = 90;

/// All GPU nodes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inventory {
    /// The nodes, in any order (placement sorts them).
    pub nodes: Vec<NodeGpus>,
}

/// One node's GPUs.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeGpus {
    /// Node name.
    pub name: String,
    /// Topology zone, if labelled.
    pub zone: Option<String>,
    /// The GPUs.
    pub gpus: Vec<Gpu>,
    /// How a pod gets them.
    pub binding: Binding,
}

/// How a node's GPUs reach a pod, which decides what placement may promise there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Dynamic Resource Allocation: a ResourceClaim names the exact devices (a CEL
    /// selector on their UUIDs) and the scheduler allocates precisely those.
    Dra {
        /// Every device allows multiple allocations with consumable `memory` capacity
        /// (KEP-5075), so a shared replica can claim a share of a named GPU.
        shareable: bool,
    },
    /// An extended resource served by the NVIDIA device plugin: a pod asks for a count
    /// and the plugin picks the devices.
    DevicePlugin {
        /// The node offers whole GPUs (`nvidia.com/gpu` allocatable).
        whole: bool,
        /// The GPU sharing resource the node offers (time-slicing or MPS replicas, as
        /// `nvidia.com/gpu.shared`), if any.
        sharing: Option<String>,
    },
}

/// One GPU as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpu {
    /// Index on the node.
    pub index: u32,
    /// Device UUID; `None` where only GPU Feature Discovery labels describe the node
    /// (they give a count, not devices): such GPUs are placed by count, and which one a
    /// pod gets is the device plugin's choice. No UUID is ever made up.
    pub uuid: Option<String>,
    /// Product name.
    pub product: String,
    /// Total memory.
    pub total_bytes: u64,
    /// Memory in use by something gpuscale did not place (other pods, processes
    /// outside Kubernetes): never available to placement.
    pub used_outside_bytes: u64,
    /// Compute capability `(major, minor)`.
    pub compute_capability: Option<(u32, u32)>,
    /// Indices of NVLink peers on the same node.
    pub nvlink_peers: Vec<u32>,
    /// NUMA node.
    pub numa_node: Option<u32>,
    /// Whether it may take new replicas, and why not.
    pub health: Health,
}

impl Gpu {
    /// Memory placement may hand out.
    pub fn usable_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.used_outside_bytes)
    }
}

/// Whether a GPU may take new replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Yes.
    Healthy,
    /// No, for this reason.
    Unhealthy(String),
}

/// Parses `"8.0"` into `(8, 0)`.
pub fn parse_compute_capability(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Health of a GPU from the agent's signals.
pub fn health_of(d: &GpuDevice) -> Health {
    if d.health.xid_errors > 0 {
        return Health::Unhealthy(format!("{} critical XID errors", d.health.xid_errors));
    }
    if let Some(r) = d
        .health
        .throttle_reasons
        .iter()
        .find(|r| BLOCKING_THROTTLE_REASONS.contains(&r.as_str()))
    {
        return Health::Unhealthy(format!("throttling ({r})"));
    }
    match d.health.temperature_c {
        Some(t) if t >= MAX_TEMPERATURE_C => Health::Unhealthy(format!("temperature {t} °C")),
        _ => Health::Healthy,
    }
}

/// A node agent's `GpuInventory` as the operator's store keeps it: what placement
/// reads of each GPU, its health worked out on arrival (`health_of`), compute
/// capability parsed, the product's name shared by the node's GPUs. The store kept
/// the CRD's own type before, about 320 bytes a GPU with its strings (heaptrack: 4.6 MB
/// at the fleet's 16,000 GPUs); this is about half.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "GpuInventory")]
pub struct SeenInventory {
    pub metadata: ObjectMeta,
    pub spec: SeenInventorySpec,
}

/// Of an inventory's spec, what placement and the assignment check read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeenInventorySpec {
    pub node: String,
    pub zone: Option<String>,
    pub gpus: Box<[SeenGpu]>,
    /// The GPUs the kubelet assigned to each pod (see `GpuInventorySpec`).
    pub assignments: Vec<GpuAssignment>,
}

/// One GPU of a [`SeenInventory`].
#[derive(Clone, Debug, PartialEq)]
pub struct SeenGpu {
    pub index: u32,
    pub numa_node: Option<u32>,
    pub compute_capability: Option<(u32, u32)>,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    pub uuid: Box<str>,
    pub product: Arc<str>,
    pub nvlink_peers: Box<[u32]>,
    pub health: Health,
}

impl From<&GpuInventorySpec> for SeenInventorySpec {
    fn from(spec: &GpuInventorySpec) -> SeenInventorySpec {
        let mut products: Vec<Arc<str>> = Vec::new();
        let gpus = spec
            .gpus
            .iter()
            .map(|d| {
                let product = match products.iter().find(|p| ***p == *d.product) {
                    Some(p) => p.clone(),
                    None => {
                        let p: Arc<str> = d.product.as_str().into();
                        products.push(p.clone());
                        p
                    }
                };
                SeenGpu {
                    index: d.index,
                    numa_node: d.numa_node,
                    compute_capability: d
                        .compute_capability
                        .as_deref()
                        .and_then(parse_compute_capability),
                    memory_total_bytes: d.memory_total_bytes,
                    memory_free_bytes: d.memory_free_bytes,
                    uuid: d.uuid.as_str().into(),
                    product,
                    nvlink_peers: d.nvlink_peers.as_slice().into(),
                    health: health_of(d),
                }
            })
            .collect();
        SeenInventorySpec {
            node: spec.node.clone(),
            zone: spec.zone.clone(),
            gpus,
            assignments: spec.assignments.clone(),
        }
    }
}

impl From<GpuInventory> for SeenInventory {
    fn from(inv: GpuInventory) -> SeenInventory {
        let mut metadata = inv.metadata;
        metadata.managed_fields = None;
        SeenInventory {
            metadata,
            spec: (&inv.spec).into(),
        }
    }
}

impl kube::Resource for SeenInventory {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        GpuInventory::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        GpuInventory::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        GpuInventory::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        GpuInventory::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A node from its agent's `GpuInventory`. `reserved_running` gives, per GPU UUID, the
/// bytes that gpuscale replicas already running there reserved: NVML counts their use
/// too, and it must not be counted twice.
pub fn from_gpu_inventory(
    spec: &SeenInventorySpec,
    reserved_running: &HashMap<String, u64>,
    binding: Binding,
) -> NodeGpus {
    let gpus = spec
        .gpus
        .iter()
        .map(|d| {
            let used = d.memory_total_bytes.saturating_sub(d.memory_free_bytes);
            let ours = reserved_running.get(&*d.uuid).copied().unwrap_or(0);
            Gpu {
                index: d.index,
                uuid: Some(d.uuid.to_string()),
                product: d.product.to_string(),
                total_bytes: d.memory_total_bytes,
                used_outside_bytes: used.saturating_sub(ours),
                compute_capability: d.compute_capability,
                nvlink_peers: d.nvlink_peers.to_vec(),
                numa_node: d.numa_node,
                health: d.health.clone(),
            }
        })
        .collect();
    NodeGpus {
        name: spec.node.clone(),
        zone: spec.zone.clone(),
        gpus,
        binding,
    }
}

/// A node from NVIDIA GPU Feature Discovery labels (`nvidia.com/gpu.count`,
/// `nvidia.com/gpu.memory` in MiB, `nvidia.com/gpu.product`,
/// `nvidia.com/gpu.compute.major/minor`) and its allocatable `nvidia.com/gpu`.
/// No free-memory, health or NVLink information exists on this path.
/// Returns `None` for nodes without GPUs.
pub fn from_gfd_labels(
    node: &str,
    labels: &BTreeMap<String, String>,
    allocatable_gpus: Option<u32>,
    binding: Binding,
) -> Option<NodeGpus> {
    let label = |k: &str| labels.get(k).map(String::as_str);
    let labelled: u32 = label("nvidia.com/gpu.count")?.parse().ok()?;
    let count = allocatable_gpus.map_or(labelled, |a| a.min(labelled));
    let mib: u64 = label("nvidia.com/gpu.memory")?.parse().ok()?;
    if count == 0 || mib == 0 {
        return None;
    }
    let product = label("nvidia.com/gpu.product")
        .unwrap_or("unknown")
        .to_string();
    let cc = match (
        label("nvidia.com/gpu.compute.major"),
        label("nvidia.com/gpu.compute.minor"),
    ) {
        (Some(a), Some(b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        _ => None,
    };
    Some(NodeGpus {
        name: node.to_string(),
        zone: label("topology.kubernetes.io/zone").map(str::to_string),
        gpus: (0..count)
            .map(|i| Gpu {
                index: i,
                uuid: None,
                product: product.clone(),
                total_bytes: mib << 20,
                used_outside_bytes: 0,
                compute_capability: cc,
                nvlink_peers: Vec::new(),
                numa_node: None,
                health: Health::Healthy,
            })
            .collect(),
        binding,
    })
}

/// The NVIDIA DRA driver's name, as its ResourceSlices and DeviceClass carry it.
pub const NVIDIA_DRA_DRIVER: &str = "gpu.nvidia.com";

/// The GPUs `driver` publishes for `node` in ResourceSlices, as the NVIDIA DRA driver
/// writes them: one device per GPU with the attributes `uuid`, `index`, `productName`
/// and `cudaComputeCapability`, and the capacity `memory`
/// (<https://kubernetes.io/docs/concepts/scheduling-eviction/dynamic-resource-allocation/#resourceslice>).
/// Only the slices of each pool's newest generation count, and a pool whose slices
/// have not all arrived (fewer than `resourceSliceCount`) is not used yet, as the API
/// documents for consumers. A device without a `uuid` attribute cannot be named by a
/// claim's selector and is left out. `agent`, the node agent's view of the same GPUs,
/// adds what the slices do not carry: NVLink peers, NUMA node, health and memory used
/// outside Kubernetes (matched by UUID). `None` when the driver publishes nothing there.
pub fn from_resource_slices(
    node: &str,
    driver: &str,
    slices: &[&ResourceSlice],
    agent: Option<&SeenInventorySpec>,
    reserved_running: &HashMap<String, u64>,
) -> Option<NodeGpus> {
    let mine: Vec<&ResourceSlice> = slices
        .iter()
        .copied()
        .filter(|s| s.spec.driver == driver && s.spec.node_name.as_deref() == Some(node))
        .collect();
    let mut newest: HashMap<&str, i64> = HashMap::new();
    for s in &mine {
        let g = newest.entry(s.spec.pool.name.as_str()).or_insert(i64::MIN);
        *g = (*g).max(s.spec.pool.generation);
    }
    let current: Vec<&ResourceSlice> = mine
        .into_iter()
        .filter(|s| newest.get(s.spec.pool.name.as_str()) == Some(&s.spec.pool.generation))
        .collect();
    let complete = |pool: &str| {
        let of_pool: Vec<&&ResourceSlice> = current
            .iter()
            .filter(|s| s.spec.pool.name == pool)
            .collect();
        of_pool
            .first()
            .is_some_and(|s| of_pool.len() as i64 >= s.spec.pool.resource_slice_count)
    };
    let agent_gpu = |uuid: &str| agent.and_then(|a| a.gpus.iter().find(|g| *g.uuid == *uuid));
    let mut gpus = Vec::new();
    let mut shareable = true;
    for s in current.iter().filter(|s| complete(&s.spec.pool.name)) {
        for d in s.spec.devices.iter().flatten() {
            let attr = |k: &str| -> Option<&DeviceAttribute> {
                let attrs = d.attributes.as_ref()?;
                attrs.get(k).or_else(|| attrs.get(&format!("{driver}/{k}")))
            };
            let Some(uuid) = attr("uuid").and_then(|a| a.string.clone()) else {
                continue;
            };
            let total = d
                .capacity
                .as_ref()
                .and_then(|c| c.get("memory"))
                .and_then(|c| parse_bytes(&c.value.0))
                .unwrap_or(0);
            if total == 0 {
                continue;
            }
            shareable &= d.allow_multiple_allocations == Some(true);
            let seen = agent_gpu(&uuid);
            let index = attr("index")
                .and_then(|a| a.int)
                .and_then(|i| u32::try_from(i).ok())
                .or(seen.map(|g| g.index))
                .unwrap_or(gpus.len() as u32);
            let used = seen.map_or(0, |g| {
                let used = g.memory_total_bytes.saturating_sub(g.memory_free_bytes);
                used.saturating_sub(reserved_running.get(&uuid).copied().unwrap_or(0))
            });
            gpus.push(Gpu {
                index,
                product: attr("productName")
                    .and_then(|a| a.string.clone())
                    .or(seen.map(|g| g.product.to_string()))
                    .unwrap_or_else(|| "unknown".into()),
                total_bytes: total,
                used_outside_bytes: used,
                compute_capability: attr("cudaComputeCapability")
                    .and_then(|a| a.version.as_deref().or(a.string.as_deref()))
                    .and_then(|v| {
                        let mut it = v.split('.');
                        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
                    }),
                nvlink_peers: seen.map(|g| g.nvlink_peers.to_vec()).unwrap_or_default(),
                numa_node: seen.and_then(|g| g.numa_node),
                health: seen.map_or(Health::Healthy, |g| g.health.clone()),
                uuid: Some(uuid),
            });
        }
    }
    if gpus.is_empty() {
        return None;
    }
    gpus.sort_by_key(|g| g.index);
    Some(NodeGpus {
        name: node.to_string(),
        zone: agent.and_then(|a| a.zone.clone()),
        gpus,
        binding: Binding::Dra { shareable },
    })
}

/// A Kubernetes quantity of bytes (`80Gi`, `81559Mi`, `85899345920`), as DRA capacities
/// and GFD write them.
pub fn parse_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuscale_crds::GpuHealth;

    /// An inventory as the API serves it is read straight into the store's type: the
    /// node's GPUs share their product's name, health and compute capability are
    /// worked out once, managed fields are dropped, and placement's view of the node
    /// is what it was from the CRD's type.
    #[test]
    fn the_inventory_store_keeps_what_placement_reads() {
        let mut hot = device(0, GpuHealth::default());
        hot.index = 1;
        hot.uuid = "GPU-b".into();
        hot.health.temperature_c = Some(95);
        let spec = GpuInventorySpec {
            node: "n1".into(),
            zone: Some("z".into()),
            gpus: vec![device(40 << 30, GpuHealth::default()), hot],
            ..GpuInventorySpec::default()
        };
        let json = serde_json::json!({
            "apiVersion": "gpuscale.dev/v1alpha1", "kind": "GpuInventory",
            "metadata": {"name": "n1", "managedFields": [{"manager": "agent"}]},
            "spec": serde_json::to_value(&spec).unwrap(),
        });
        let seen: SeenInventory = serde_json::from_value(json).unwrap();
        assert!(seen.metadata.managed_fields.is_none());
        let [a, b] = &*seen.spec.gpus else {
            panic!("two GPUs: {:?}", seen.spec.gpus)
        };
        assert!(Arc::ptr_eq(&a.product, &b.product));
        assert_eq!(a.compute_capability, Some((9, 0)));
        assert_eq!(a.health, Health::Healthy);
        assert!(matches!(&b.health, Health::Unhealthy(r) if r.contains("95")));
        let binding = Binding::Dra { shareable: true };
        let none = HashMap::new();
        let node = from_gpu_inventory(&seen.spec, &none, binding);
        assert_eq!(node.gpus.len(), 2);
        assert_eq!(node.gpus[0].uuid.as_deref(), Some("GPU-a"));
        assert_eq!(node.gpus[0].product, "NVIDIA H100 80GB HBM3");
        assert_eq!(node.gpus[0].used_outside_bytes, 40 << 30);
        assert_eq!(node.gpus[0].nvlink_peers, [1, 2]);
        assert_eq!(node.zone.as_deref(), Some("z"));
    }

    fn device(free: u64, health: GpuHealth) -> GpuDevice {
        GpuDevice {
            index: 0,
            uuid: "GPU-a".into(),
            product: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            memory_free_bytes: free,
            compute_capability: Some("9.0".into()),
            nvlink_peers: vec![1, 2],
            numa_node: Some(0),
            health,
        }
    }

    #[test]
    fn memory_used_outside_gpuscale_is_not_usable_and_ours_is_not_counted_twice() {
        let spec = GpuInventorySpec {
            node: "n1".into(),
            gpus: vec![device(60 << 30, GpuHealth::default())],
            ..Default::default()
        };
        // 20 GiB used, 15 GiB of it by a gpuscale replica already running there.
        let ours = HashMap::from([("GPU-a".to_string(), 15u64 << 30)]);
        let node = from_gpu_inventory(&(&spec).into(), &ours, Binding::Dra { shareable: true });
        let g = &node.gpus[0];
        assert_eq!(g.used_outside_bytes, 5 << 30);
        assert_eq!(g.usable_bytes(), 75 << 30);
        assert_eq!(g.compute_capability, Some((9, 0)));
        assert_eq!(g.health, Health::Healthy);
    }

    #[test]
    fn xid_errors_throttling_and_heat_make_a_gpu_unhealthy() {
        let xid = GpuHealth {
            xid_errors: 2,
            ..Default::default()
        };
        assert!(matches!(health_of(&device(0, xid)), Health::Unhealthy(r) if r.contains("XID")));
        let thr = GpuHealth {
            throttle_reasons: vec!["GpuIdle".into(), "HwSlowdown".into()],
            ..Default::default()
        };
        assert!(
            matches!(health_of(&device(0, thr)), Health::Unhealthy(r) if r.contains("HwSlowdown"))
        );
        let idle = GpuHealth {
            throttle_reasons: vec!["GpuIdle".into()],
            temperature_c: Some(60),
            ..Default::default()
        };
        assert_eq!(health_of(&device(0, idle)), Health::Healthy);
        let hot = GpuHealth {
            temperature_c: Some(93),
            ..Default::default()
        };
        assert!(matches!(health_of(&device(0, hot)), Health::Unhealthy(_)));
    }

    #[test]
    fn gfd_labels_give_gpus_bounded_by_allocatable() {
        let labels: BTreeMap<String, String> = [
            ("nvidia.com/gpu.count", "8"),
            ("nvidia.com/gpu.memory", "81559"),
            ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),
            ("nvidia.com/gpu.compute.major", "9"),
            ("nvidia.com/gpu.compute.minor", "0"),
            ("topology.kubernetes.io/zone", "us-east-1a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let plugin = Binding::DevicePlugin {
            whole: true,
            sharing: None,
        };
        let n = from_gfd_labels("gpu-7", &labels, Some(6), plugin.clone()).unwrap();
        assert_eq!(n.gpus.len(), 6);
        assert_eq!(n.gpus[0].total_bytes, 81559 << 20);
        assert_eq!(n.gpus[5].uuid, None, "GFD labels name no device");
        assert_eq!(n.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(n.gpus[0].compute_capability, Some((9, 0)));
        assert!(from_gfd_labels("cpu-1", &BTreeMap::new(), None, plugin).is_none());
    }

    fn slice(pool_gen: i64, count: i64, devices: serde_json::Value) -> ResourceSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("n1-gpu.nvidia.com-{pool_gen}")},
            "spec": {"driver": "gpu.nvidia.com", "nodeName": "n1",
                     "pool": {"name": "n1", "generation": pool_gen, "resourceSliceCount": count},
                     "devices": devices},
        }))
        .unwrap()
    }

    fn dra_device(i: i64, shared: bool) -> serde_json::Value {
        serde_json::json!({
            "name": format!("gpu-{i}"),
            "allowMultipleAllocations": shared,
            "attributes": {"uuid": {"string": format!("GPU-{i}")}, "index": {"int": i},
                           "productName": {"string": "NVIDIA H100 80GB HBM3"},
                           "cudaComputeCapability": {"version": "9.0.0"}},
            "capacity": {"memory": {"value": "80Gi"}},
        })
    }

    #[test]
    fn resource_slices_give_named_gpus_from_the_newest_complete_pool() {
        let old = slice(1, 1, serde_json::json!([dra_device(0, false)]));
        let new = slice(
            2,
            1,
            serde_json::json!([dra_device(0, true), dra_device(1, true), {"name": "no-uuid",
                "capacity": {"memory": {"value": "80Gi"}}}]),
        );
        let agent = GpuInventorySpec {
            node: "n1".into(),
            gpus: vec![GpuDevice {
                uuid: "GPU-1".into(),
                index: 1,
                ..device(70 << 30, GpuHealth::default())
            }],
            ..Default::default()
        };
        let none = HashMap::new();
        let agent = SeenInventorySpec::from(&agent);
        let n = from_resource_slices("n1", NVIDIA_DRA_DRIVER, &[&old, &new], Some(&agent), &none)
            .unwrap();
        assert_eq!(n.binding, Binding::Dra { shareable: true });
        let uuids: Vec<_> = n.gpus.iter().map(|g| g.uuid.clone().unwrap()).collect();
        assert_eq!(
            uuids,
            ["GPU-0", "GPU-1"],
            "generation 1 and the unnamed device are out"
        );
        assert_eq!(n.gpus[0].total_bytes, 80 << 30);
        assert_eq!(n.gpus[0].compute_capability, Some((9, 0)));
        assert_eq!(
            n.gpus[1].nvlink_peers,
            vec![1, 2],
            "topology comes from the agent"
        );
        assert_eq!(n.gpus[1].used_outside_bytes, 10 << 30);
        // A pool that says it spans two slices is not used until both are there.
        let partial = slice(3, 2, serde_json::json!([dra_device(0, false)]));
        assert!(from_resource_slices("n1", NVIDIA_DRA_DRIVER, &[&partial], None, &none).is_none());
        assert!(from_resource_slices("n2", NVIDIA_DRA_DRIVER, &[&new], None, &none).is_none());
        assert_eq!(parse_bytes("81559Mi"), Some(81559 << 20));
        assert_eq!(parse_bytes("12x"), None);
    }
}
