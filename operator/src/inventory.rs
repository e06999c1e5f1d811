//! The GPU inventory placement works on, built from what the cluster publishes:
//! the node agent's `GpuInventory` objects (NVML: free memory, health, NVLink), or,
//! where no agent runs, NVIDIA GPU Feature Discovery labels and allocatable
//! `nvidia.com/gpu`.

use std::collections::{BTreeMap, HashMap};

use gpuscale_crds::{GpuDevice, GpuInventorySpec};

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

/// A node from its agent's `GpuInventory`. `reserved_running` gives, per GPU UUID, the
/// bytes that gpuscale replicas already running there reserved: NVML counts their use
/// too, and it must not be counted twice.
pub fn from_gpu_inventory(
    spec: &GpuInventorySpec,
    reserved_running: &HashMap<String, u64>,
) -> NodeGpus {
    let gpus = spec
        .gpus
        .iter()
        .map(|d| {
            let used = d.memory_total_bytes.saturating_sub(d.memory_free_bytes);
            let ours = reserved_running.get(&d.uuid).copied().unwrap_or(0);
            Gpu {
                index: d.index,
                uuid: Some(d.uuid.clone()),
                product: d.product.clone(),
                total_bytes: d.memory_total_bytes,
                used_outside_bytes: used.saturating_sub(ours),
                compute_capability: d
                    .compute_capability
                    .as_deref()
                    .and_then(parse_compute_capability),
                nvlink_peers: d.nvlink_peers.clone(),
                numa_node: d.numa_node,
                health: health_of(d),
            }
        })
        .collect();
    NodeGpus {
        name: spec.node.clone(),
        zone: spec.zone.clone(),
        gpus,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuscale_crds::GpuHealth;

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
        let node = from_gpu_inventory(&spec, &ours);
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
        let n = from_gfd_labels("gpu-7", &labels, Some(6)).unwrap();
        assert_eq!(n.gpus.len(), 6);
        assert_eq!(n.gpus[0].total_bytes, 81559 << 20);
        assert_eq!(n.gpus[5].uuid, None, "GFD labels name no device");
        assert_eq!(n.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(n.gpus[0].compute_capability, Some((9, 0)));
        assert!(from_gfd_labels("cpu-1", &BTreeMap::new(), None).is_none());
    }
}
