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

/// One simulated node.
#[derive(Clone, Debug, PartialEq)]
pub struct SimNode {
    pub name: String,
    pub gpus: Vec<SimGpu>,
    /// Groups of GPU indices joined by NVLink.
    pub nvlink: Vec<Vec<u32>>,
    pub zone: Option<String>,
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
        }
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

/// Reads a fleet written as `name=COUNTxPRODUCT:GIB[:nvlink]`, comma separated, e.g.
/// `a=2xNVIDIA L4:24,b=8xNVIDIA H100 80GB HBM3:80:nvlink`.
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
            let nvlink = match parts.next() {
                None => false,
                Some("nvlink") => true,
                Some(other) => bail!("{t:?}: unknown flag {other:?} (only nvlink)"),
            };
            let count: u32 = count
                .parse()
                .with_context(|| format!("{t:?}: count is not a number"))?;
            if product.is_empty() || gib == 0 {
                bail!("{t:?}: a GPU needs a product and some memory");
            }
            Ok(SimNode::new(name.trim(), count, product, gib, nvlink))
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
        for bad in [
            "a",
            "a=2",
            "a=2xL4",
            "a=2xL4:x",
            "a=2xL4:24:sli",
            "a=twoxL4:24",
        ] {
            assert!(parse_fleet(bad).is_err(), "{bad}");
        }
    }
}
