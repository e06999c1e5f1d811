//! Dynamic Resource Allocation as the simulator serves it
//! (<https://kubernetes.io/docs/concepts/scheduling-eviction/dynamic-resource-allocation/>):
//! what the NVIDIA DRA driver publishes for a simulated node (a ResourceSlice, the
//! `gpu.nvidia.com` DeviceClass), the API server's checks of a ResourceClaim, and the
//! allocator kube-scheduler's DynamicResources plugin runs: a claim's device requests
//! are matched against the devices of a node's slices by evaluating the DeviceClass's
//! and the request's CEL selectors, and a device is handed out once, unless it allows
//! multiple allocations, in which case its consumable capacity bounds the sharing.

use std::collections::BTreeMap;

use gpuscale_operator::inventory::parse_bytes;
use k8s_openapi::api::resource::v1::{
    Device, DeviceClass, DeviceRequestAllocationResult, ResourceClaim, ResourceSlice,
};
use serde_json::{json, Value};

use crate::nodes::SimNode;

/// The driver the simulated nodes' GPUs belong to (NVIDIA's DRA driver name).
pub const DRIVER: &str = gpuscale_operator::inventory::NVIDIA_DRA_DRIVER;

/// The UUID of GPU `index` of a simulated node (the same the node agent reports).
pub fn uuid(node: &str, index: usize) -> String {
    format!("GPU-sim-{node}-{index}")
}

/// The DeviceClass the NVIDIA DRA driver installs: every device of its driver.
pub fn device_class() -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": DRIVER},
        "spec": {"selectors": [{"cel": {"expression": format!("device.driver == {DRIVER:?}")}}]},
    })
}

/// The ResourceSlice the driver's kubelet plugin publishes for `node`: one device per
/// GPU with the driver's attributes (`uuid`, `index`, `productName`, `type`) and
/// `memory` capacity; shareable devices allow multiple allocations (consumable
/// capacity, KEP-5075). Owned by the Node, so it goes when the Node does.
pub fn resource_slice(node: &SimNode, node_uid: &str, shareable: bool) -> Value {
    let devices: Vec<Value> = node
        .gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut d = json!({
                "name": format!("gpu-{i}"),
                "attributes": {
                    "type": {"string": "gpu"},
                    "uuid": {"string": uuid(&node.name, i)},
                    "index": {"int": i},
                    "productName": {"string": g.product},
                },
                "capacity": {"memory": {"value": g.memory_bytes.to_string()}},
            });
            if shareable {
                d["allowMultipleAllocations"] = json!(true);
            }
            d
        })
        .collect();
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {
            "name": format!("{}-{DRIVER}", node.name),
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node.name,
                                 "uid": node_uid, "controller": true}],
        },
        "spec": {
            "driver": DRIVER, "nodeName": node.name,
            "pool": {"name": node.name, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    })
}

/// The API server's validation of a ResourceClaim
/// (<https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/resource-claim-v1/>):
/// the object must be one, each request has a DNS-label name and exactly one of
/// `exactly` or `firstAvailable`, `allocationMode` is `ExactCount` (count at least 1)
/// or `All`, every CEL selector compiles, and the spec is immutable.
pub fn validate_claim(obj: &Value, old: Option<&Value>) -> Result<(), String> {
    if let Some(old) = old {
        if old["spec"] != obj["spec"] {
            return Err("spec: Invalid value: field is immutable".into());
        }
        return Ok(());
    }
    let claim: ResourceClaim = serde_json::from_value(obj.clone())
        .map_err(|e| format!("the body is no ResourceClaim: {e}"))?;
    let requests = claim
        .spec
        .devices
        .as_ref()
        .and_then(|d| d.requests.as_ref())
        .cloned()
        .unwrap_or_default();
    for (i, r) in requests.iter().enumerate() {
        let at = format!("spec.devices.requests[{i}]");
        let label = !r.name.is_empty()
            && r.name.len() <= 63
            && r.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !label {
            return Err(format!(
                "{at}.name: Invalid value: {:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'",
                r.name
            ));
        }
        let Some(exactly) = &r.exactly else {
            return Err(match &r.first_available {
                Some(_) => format!("{at}.firstAvailable: Forbidden: not supported by the gpuscale simulator"),
                None => format!("{at}: Required value: exactly one of `exactly` or `firstAvailable` is required"),
            });
        };
        match exactly.allocation_mode.as_deref().unwrap_or("ExactCount") {
            "ExactCount" if exactly.count.unwrap_or(1) >= 1 => {}
            "All" => {}
            "ExactCount" => {
                return Err(format!("{at}.exactly.count: Invalid value: {}: must be greater than zero", exactly.count.unwrap_or(0)))
            }
            other => {
                return Err(format!(
                    "{at}.exactly.allocationMode: Unsupported value: {other:?}: supported values: \"All\", \"ExactCount\""
                ))
            }
        }
        for (j, sel) in exactly.selectors.iter().flatten().enumerate() {
            let Some(cel) = &sel.cel else { continue };
            if let Err(e) = cel::Program::compile(&cel.expression) {
                return Err(format!(
                    "{at}.exactly.selectors[{j}].cel.expression: Invalid value: {:?}: compilation failed: {e}",
                    cel.expression
                ));
            }
        }
    }
    Ok(())
}

/// A device as CEL selectors see it: `device.driver`, `device.attributes[domain][name]`
/// and `device.capacity[domain][name]`, with unqualified names in the driver's domain,
/// and `device.allowMultipleAllocations`.
fn cel_device(driver: &str, d: &Device) -> Value {
    let mut attrs: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for (k, a) in d.attributes.iter().flatten() {
        let (domain, name) = k.rsplit_once('/').unwrap_or((driver, k));
        let v = if let Some(s) = &a.string {
            json!(s)
        } else if let Some(i) = a.int {
            json!(i)
        } else if let Some(b) = a.bool {
            json!(b)
        } else {
            json!(a.version)
        };
        attrs
            .entry(domain.to_string())
            .or_default()
            .insert(name.to_string(), v);
    }
    let mut capacity: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for (k, c) in d.capacity.iter().flatten() {
        let (domain, name) = k.rsplit_once('/').unwrap_or((driver, k));
        capacity
            .entry(domain.to_string())
            .or_default()
            .insert(name.to_string(), json!(c.value.0));
    }
    json!({"driver": driver, "attributes": attrs, "capacity": capacity,
           "allowMultipleAllocations": d.allow_multiple_allocations.unwrap_or(false)})
}

/// Whether a CEL selector selects the device. An error (a missing attribute, a type
/// mismatch) means it does not, as the scheduler treats a failing selector.
fn selects(expression: &str, device: &Value) -> bool {
    let Ok(program) = cel::Program::compile(expression) else {
        return false;
    };
    let mut ctx = cel::Context::default();
    ctx.add_variable_from_value("device", gpuscale_crds::validate::to_cel(device));
    matches!(program.execute(&ctx), Ok(cel::Value::Bool(true)))
}

/// One device of a pool on a node.
struct Candidate<'a> {
    driver: &'a str,
    pool: &'a str,
    device: &'a Device,
}

/// What is already allocated: per `(driver, pool, device)`, the claims holding it and
/// the `memory` they consume.
#[derive(Default)]
pub struct InUse {
    held: BTreeMap<(String, String, String), (u32, u64)>,
}

impl InUse {
    /// The allocations of `claims`.
    pub fn of<'a>(claims: impl IntoIterator<Item = &'a ResourceClaim>) -> InUse {
        let mut u = InUse::default();
        for c in claims {
            u.add(c);
        }
        u
    }

    /// These allocations and `other`'s together.
    pub fn merged(&self, other: &InUse) -> InUse {
        let mut held = self.held.clone();
        for (k, (n, m)) in &other.held {
            let e = held.entry(k.clone()).or_insert((0, 0));
            e.0 += n;
            e.1 = e.1.saturating_add(*m);
        }
        InUse { held }
    }

    /// Adds one claim's allocation.
    pub fn add(&mut self, c: &ResourceClaim) {
        let results = c
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .and_then(|a| a.devices.as_ref())
            .and_then(|d| d.results.clone())
            .unwrap_or_default();
        for r in results {
            let memory = r
                .consumed_capacity
                .as_ref()
                .and_then(|c| c.get("memory"))
                .and_then(|q| parse_bytes(&q.0))
                .unwrap_or(u64::MAX);
            let e = self
                .held
                .entry((r.driver, r.pool, r.device))
                .or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.saturating_add(memory);
        }
    }
}

/// Allocates `claim` on `node` from `slices`, against what `in_use` holds: the
/// allocation (results and the node selector) to write into the claim's status, or
/// why it cannot be made there.
pub fn allocate(
    claim: &ResourceClaim,
    classes: &[DeviceClass],
    node: &str,
    slices: &[&ResourceSlice],
    in_use: &InUse,
) -> Result<Value, String> {
    // Only the newest generation of each pool counts.
    let mut newest: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for s in slices
        .iter()
        .filter(|s| s.spec.node_name.as_deref() == Some(node))
    {
        let g = newest
            .entry((s.spec.driver.as_str(), s.spec.pool.name.as_str()))
            .or_insert(i64::MIN);
        *g = (*g).max(s.spec.pool.generation);
    }
    let candidates: Vec<Candidate> = slices
        .iter()
        .filter(|s| s.spec.node_name.as_deref() == Some(node))
        .filter(|s| {
            newest.get(&(s.spec.driver.as_str(), s.spec.pool.name.as_str()))
                == Some(&s.spec.pool.generation)
        })
        .flat_map(|s| {
            s.spec.devices.iter().flatten().map(|d| Candidate {
                driver: &s.spec.driver,
                pool: &s.spec.pool.name,
                device: d,
            })
        })
        .collect();
    let mut taken: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut results: Vec<DeviceRequestAllocationResult> = Vec::new();
    let requests = claim
        .spec
        .devices
        .as_ref()
        .and_then(|d| d.requests.clone())
        .unwrap_or_default();
    for r in &requests {
        let Some(x) = &r.exactly else {
            return Err(format!(
                "request {}: only `exactly` requests are simulated",
                r.name
            ));
        };
        let class = classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(x.device_class_name.as_str()))
            .ok_or_else(|| format!("deviceclass {:?} not found", x.device_class_name))?;
        let want_memory = x
            .capacity
            .as_ref()
            .and_then(|c| c.requests.as_ref())
            .and_then(|q| q.get("memory"))
            .and_then(|q| parse_bytes(&q.0));
        let mut chosen = 0i64;
        let all = x.allocation_mode.as_deref() == Some("All");
        let count = x.count.unwrap_or(1);
        for c in &candidates {
            if !all && chosen == count {
                break;
            }
            let view = cel_device(c.driver, c.device);
            let class_ok = class
                .spec
                .selectors
                .iter()
                .flatten()
                .filter_map(|s| s.cel.as_ref())
                .all(|s| selects(&s.expression, &view));
            let request_ok = x
                .selectors
                .iter()
                .flatten()
                .filter_map(|s| s.cel.as_ref())
                .all(|s| selects(&s.expression, &view));
            if !(class_ok && request_ok) {
                continue;
            }
            let key = (
                c.driver.to_string(),
                c.pool.to_string(),
                c.device.name.clone(),
            );
            let (holders, used) = in_use.held.get(&key).copied().unwrap_or((0, 0));
            let used = used.saturating_add(taken.get(&key).copied().unwrap_or(0));
            let shared = c.device.allow_multiple_allocations == Some(true);
            let total = c
                .device
                .capacity
                .as_ref()
                .and_then(|m| m.get("memory"))
                .and_then(|q| parse_bytes(&q.value.0))
                .unwrap_or(0);
            // Without a capacity request a claim consumes the whole device.
            let consume = want_memory.unwrap_or(total);
            let free = if shared {
                total.saturating_sub(used) >= consume
            } else {
                holders == 0 && !taken.contains_key(&key)
            };
            if !free {
                continue;
            }
            *taken.entry(key).or_default() += consume;
            results.push(DeviceRequestAllocationResult {
                request: r.name.clone(),
                driver: c.driver.to_string(),
                pool: c.pool.to_string(),
                device: c.device.name.clone(),
                consumed_capacity: shared.then(|| {
                    BTreeMap::from([(
                        "memory".to_string(),
                        k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                            consume.to_string(),
                        ),
                    )])
                }),
                share_id: shared.then(|| format!("{:08x}", results.len() + 1)),
                ..DeviceRequestAllocationResult::default()
            });
            chosen += 1;
        }
        if (!all && chosen < count) || (all && chosen == 0) {
            return Err("cannot allocate all claims".into());
        }
    }
    Ok(json!({
        "devices": {"results": results},
        "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node]}]}]},
    }))
}

/// The node an allocated claim is bound to, from its allocation's node selector.
pub fn allocated_node(claim: &ResourceClaim) -> Option<String> {
    let sel = claim
        .status
        .as_ref()?
        .allocation
        .as_ref()?
        .node_selector
        .as_ref()?;
    sel.node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name")?
        .values
        .as_ref()?
        .first()
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(shareable: bool) -> ResourceSlice {
        let node = SimNode::new("n1", 2, "NVIDIA L4", 24, false);
        serde_json::from_value(resource_slice(&node, "uid-n1", shareable)).unwrap()
    }

    fn claim(selector: &str, memory: Option<u64>) -> ResourceClaim {
        let mut exactly = json!({"deviceClassName": DRIVER, "allocationMode": "ExactCount", "count": 1,
                                 "selectors": [{"cel": {"expression": selector}}]});
        if let Some(m) = memory {
            exactly["capacity"] = json!({"requests": {"memory": m.to_string()}});
        }
        serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "gpus", "exactly": exactly}]}},
        }))
        .unwrap()
    }

    fn with(mut c: ResourceClaim, allocation: Value) -> ResourceClaim {
        c.status = Some(serde_json::from_value(json!({"allocation": allocation})).unwrap());
        c
    }

    fn classes() -> Vec<DeviceClass> {
        vec![serde_json::from_value(device_class()).unwrap()]
    }

    #[test]
    fn a_uuid_selector_gets_exactly_that_device_once() {
        let s = slice(false);
        let want = format!(
            "device.attributes[\"{DRIVER}\"].uuid in [\"{}\"]",
            uuid("n1", 1)
        );
        let c = claim(&want, None);
        let a = allocate(&c, &classes(), "n1", &[&s], &InUse::default()).unwrap();
        assert_eq!(a["devices"]["results"][0]["device"], "gpu-1");
        assert_eq!(
            a["nodeSelector"]["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
            "n1"
        );
        // Held now: a second claim for the same device is refused, another node has none.
        let held = InUse::of([&with(c.clone(), a)]);
        assert!(allocate(&c, &classes(), "n1", &[&s], &held).is_err());
        assert!(allocate(&c, &classes(), "n2", &[&s], &InUse::default()).is_err());
        // A selector that matches nothing, or fails to evaluate, selects nothing.
        for bad in [
            "device.attributes[\"gpu.nvidia.com\"].uuid == \"GPU-x\"",
            "device.nope.x == 1",
        ] {
            assert!(allocate(
                &claim(bad, None),
                &classes(),
                "n1",
                &[&s],
                &InUse::default()
            )
            .is_err());
        }
    }

    #[test]
    fn a_shareable_device_is_shared_up_to_its_memory() {
        let s = slice(true);
        let sel = format!(
            "device.attributes[\"{DRIVER}\"].uuid == \"{}\"",
            uuid("n1", 0)
        );
        let c = claim(&sel, Some(10 << 30));
        let mut in_use = InUse::default();
        for _ in 0..2 {
            let a = allocate(&c, &classes(), "n1", &[&s], &in_use).unwrap();
            assert_eq!(
                a["devices"]["results"][0]["consumedCapacity"]["memory"],
                (10u64 << 30).to_string()
            );
            in_use.add(&with(c.clone(), a));
        }
        // 20 of 24 GiB consumed: 10 more do not fit.
        assert!(allocate(&c, &classes(), "n1", &[&s], &in_use).is_err());
        assert!(allocate(
            &claim(&sel, Some(4 << 30)),
            &classes(),
            "n1",
            &[&s],
            &in_use
        )
        .is_ok());
    }

    #[test]
    fn the_api_server_refuses_bad_claims_and_spec_changes() {
        let ok = serde_json::to_value(claim("device.driver == \"gpu.nvidia.com\"", None)).unwrap();
        assert!(validate_claim(&ok, None).is_ok());
        let mut bad = ok.clone();
        bad["spec"]["devices"]["requests"][0]["exactly"]["selectors"][0]["cel"]["expression"] =
            json!("device.driver ==");
        assert!(validate_claim(&bad, None)
            .unwrap_err()
            .contains("compilation failed"));
        let mut bad = ok.clone();
        bad["spec"]["devices"]["requests"][0]["exactly"]["count"] = json!(0);
        assert!(validate_claim(&bad, None)
            .unwrap_err()
            .contains("greater than zero"));
        let mut changed = ok.clone();
        changed["spec"]["devices"]["requests"][0]["exactly"]["count"] = json!(2);
        assert!(validate_claim(&changed, Some(&ok))
            .unwrap_err()
            .contains("immutable"));
    }
}
