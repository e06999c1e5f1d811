//! Simulated GPU nodes: how many, which GPUs, how much VRAM, which GPUs share NVLink.

use anyhow::{bail, Context};

/// One simulated GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct SimGpu {
    /// Product name as NVML reports it.
    pub product: String,
    /// VRAM in bytes.
    pub memory_bytes: u64,
}

/// How a simulated node hands its GPUs to pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimBinding {
    /// The NVIDIA device plugin: whole GPUs as `nvidia.com/gpu`, or, with time-slicing
    /// (`replicas` > 0, renameByDefault), only shares as `nvidia.com/gpu.shared`,
    /// `replicas` per GPU.
    DevicePlugin { replicas: u32 },
    /// The NVIDIA DRA driver: a ResourceSlice of the GPUs; `shareable` devices allow
    /// multiple allocations with consumable memory.
    Dra { shareable: bool },
}

/// The extended resource of time-sliced GPU shares (the device plugin's
/// `renameByDefault` name).
pub const SHARED_RESOURCE: &str = "nvidia.com/gpu.shared";

/// One simulated node.
#[derive(Clone, Debug, PartialEq)]
pub struct SimNode {
    pub name: String,
    pub gpus: Vec<SimGpu>,
    /// Groups of GPU indices joined by NVLink.
    pub nvlink: Vec<Vec<u32>>,
    pub zone: Option<String>,
    pub binding: SimBinding,
    /// The gpuscale node agent runs there (a GpuInventory); without it only GPU
    /// Feature Discovery labels describe the GPUs.
    pub agent: bool,
}

impl SimNode {
    /// `count` GPUs of `product` with `gib` GiB each, all on one NVLink island when
    /// `nvlink`.
    pub fn new(name: &str, count: u32, product: &str, gib: u64, nvlink: bool) -> Self {
        Self {
            name: name.into(),
            gpus: (0..count)
                .map(|_| SimGpu {
                    product: product.into(),
                    memory_bytes: gib << 30,
                })
                .collect(),
            nvlink: if nvlink && count > 1 {
                vec![(0..count).collect()]
            } else {
                Vec::new()
            },
            zone: None,
            binding: SimBinding::DevicePlugin { replicas: 0 },
            agent: true,
        }
    }

    /// The same node, its GPUs bound by `binding`.
    pub fn bound(mut self, binding: SimBinding) -> Self {
        self.binding = binding;
        self
    }

    /// The same node without the gpuscale node agent (GFD labels only).
    pub fn without_agent(mut self) -> Self {
        self.agent = false;
        self
    }
}

/// The demo's fleet: two nodes of two L4s and one of four NVLinked A100s.
pub fn default_fleet() -> Vec<SimNode> {
    vec![
        SimNode::new("sim-l4-0", 2, "NVIDIA L4", 24, false),
        SimNode::new("sim-l4-1", 2, "NVIDIA L4", 24, false),
        SimNode::new("sim-a100-0", 4, "NVIDIA A100-SXM4-80GB", 80, true),
    ]
}

/// Reads a fleet written as `name=COUNTxPRODUCT:GIB[:FLAG...]`, comma separated, e.g.
/// `a=2xNVIDIA L4:24,b=8xNVIDIA H100 80GB HBM3:80:nvlink:dra`. Flags: `nvlink` (one
/// NVLink island), `dra` (the DRA driver binds the GPUs), `dra-shared` (with shareable
/// devices), `sliced=N` (device-plugin time-slicing, N shares per GPU), `gfd` (no
/// node agent: GPU Feature Discovery labels only).
pub fn parse_fleet(s: &str) -> anyhow::Result<Vec<SimNode>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (name, rest) = t
                .split_once('=')
                .with_context(|| format!("{t:?}: expected name=COUNTxPRODUCT:GIB[:nvlink]"))?;
            let (count, rest) = rest
                .split_once('x')
                .with_context(|| format!("{t:?}: expected COUNTxPRODUCT"))?;
            let mut parts = rest.split(':');
            let product = parts.next().unwrap_or_default();
            let gib: u64 = parts
                .next()
                .with_context(|| format!("{t:?}: missing :GIB"))?
                .parse()
                .with_context(|| format!("{t:?}: GiB is not a number"))?;
            let count: u32 = count
                .parse()
                .with_context(|| format!("{t:?}: count is not a number"))?;
            if product.is_empty() || gib == 0 {
                bail!("{t:?}: a GPU needs a product and some memory");
            }
            let flags: Vec<&str> = parts.collect();
            let mut node =
                SimNode::new(name.trim(), count, product, gib, flags.contains(&"nvlink"));
            for f in flags {
                match f {
                    "nvlink" => {}
                    "dra" => node.binding = SimBinding::Dra { shareable: false },
                    "dra-shared" => node.binding = SimBinding::Dra { shareable: true },
                    "gfd" => node.agent = false,
                    _ => match f.strip_prefix("sliced=").map(str::parse::<u32>) {
                        Some(Ok(replicas)) if replicas > 0 => {
                            node.binding = SimBinding::DevicePlugin { replicas }
                        }
                        _ => bail!(
                            "{t:?}: unknown flag {f:?} (nvlink, dra, dra-shared, sliced=N, gfd)"
                        ),
                    },
                }
            }
            Ok(node)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleets_parse_and_bad_ones_say_why() {
        let f = parse_fleet("a=2xNVIDIA L4:24, b=4xA100:80:nvlink").unwrap();
        assert_eq!(f[0], SimNode::new("a", 2, "NVIDIA L4", 24, false));
        assert_eq!(f[1].nvlink, vec![vec![0, 1, 2, 3]]);
        let f = parse_fleet("c=2xL4:24:dra-shared:gfd,d=1xL4:24:sliced=4").unwrap();
        assert_eq!(f[0].binding, SimBinding::Dra { shareable: true });
        assert!(!f[0].agent);
        assert_eq!(f[1].binding, SimBinding::DevicePlugin { replicas: 4 });
        for bad in [
            "a",
            "a=2",
            "a=2xL4",
            "a=2xL4:x",
            "a=2xL4:24:sli",
            "a=2xL4:24:sliced=0",
            "a=twoxL4:24",
        ] {
            assert!(parse_fleet(bad).is_err(), "{bad}");
        }
    }
}
