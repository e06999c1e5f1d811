//! `GpuInventory`: the GPUs of one node as its node agent sees them (NVML), published
//! through the API so the operator places replicas on concrete devices.
// kube-derive's repeated `printcolumn(...)` arguments trip this lint; they are distinct columns.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The GPUs of one node. The object is named after the node and written by that node's
/// agent; the operator only reads it.
#[derive(CustomResource, JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "gpuscale.dev",
    version = "v1alpha1",
    kind = "GpuInventory",
    plural = "gpuinventories",
    shortname = "gpuinv",
    category = "gpuscale",
    derive = "PartialEq",
    derive = "Default",
    doc = "The GPUs of one node, as reported by the gpuscale node agent through NVML.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpuCount"),
    printcolumn(name = "Product", type_ = "string", json_path = ".spec.product"),
    printcolumn(name = "Seen", type_ = "date", json_path = ".spec.observedAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GpuInventorySpec {
    /// Node name.
    pub node: String,
    /// Number of GPUs found.
    #[serde(default)]
    pub gpu_count: u32,
    /// Product of the first GPU, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Topology zone of the node, copied from `topology.kubernetes.io/zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The GPUs.
    #[serde(default)]
    pub gpus: Vec<GpuDevice>,
    /// Why the agent found no GPU, when it found none (for example "NVML not found").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the agent last refreshed this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
    /// The GPUs the kubelet's device plugins assigned to each pod on this node, as the
    /// kubelet's PodResources API lists them (time-slicing replica suffixes `::N`
    /// removed, so each is a GPU UUID).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assignments: Vec<GpuAssignment>,
}

/// The GPUs one pod was assigned.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuAssignment {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// GPU UUIDs, sorted.
    pub gpus: Vec<String>,
}

/// One GPU as NVML reports it.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuDevice {
    /// NVML index on the node.
    pub index: u32,
    /// Stable device UUID (`GPU-…`).
    pub uuid: String,
    /// Product name (for example `NVIDIA H100 80GB HBM3`).
    pub product: String,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Free memory in bytes as NVML saw it (memory used outside Kubernetes shows here).
    pub memory_free_bytes: u64,
    /// CUDA compute capability, `major.minor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
    /// Indices of GPUs on this node reachable over NVLink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvlink_peers: Vec<u32>,
    /// NUMA node of the GPU's PCIe root, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Health signals.
    #[serde(default)]
    pub health: GpuHealth,
}

/// Health signals of one GPU. Unhealthy or throttling GPUs get no new replicas.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuHealth {
    /// XID errors seen since the agent started.
    #[serde(default)]
    pub xid_errors: u32,
    /// Active clock throttle reasons (for example `HwSlowdown`, `SwThermalSlowdown`);
    /// idle and application-clock reasons are not listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttle_reasons: Vec<String>,
    /// Core temperature in °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Power draw in watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,
}
