//! GPU topology within a node: NVLink islands and the choice of a multi-GPU set.
//!
//! An island is a connected component of the NVLink graph. On NVSwitch systems (DGX/HGX)
//! that is all GPUs, all-to-all; on PCIe cards with bridges it is the bridged pair. A
//! component that is not all-to-all (the old hybrid cube-mesh) is still treated as one
//! island: every pair there is at most two NVLink hops apart, far better than PCIe.

use std::collections::BTreeMap;

use super::{NodeState, Sharing};
use crate::inventory::Gpu;

/// Island of each GPU (by position in the node's list), numbered densely from 0.
pub(super) struct Islands {
    pub of_gpu: Vec<usize>,
}

pub(super) fn islands(gpus: &[Gpu]) -> Islands {
    let pos = |index: u32| gpus.iter().position(|g| g.index == index);
    let mut parent: Vec<usize> = (0..gpus.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for (i, g) in gpus.iter().enumerate() {
        for &peer in &g.nvlink_peers {
            if let Some(j) = pos(peer) {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent[a.max(b)] = a.min(b);
            }
        }
    }
    // Number islands densely in order of their first GPU, for determinism.
    let mut ids = BTreeMap::new();
    let of_gpu = (0..gpus.len())
        .map(|i| {
            let r = root(&mut parent, i);
            let next = ids.len();
            *ids.entry(r).or_insert(next)
        })
        .collect();
    Islands { of_gpu }
}

/// Chooses `k` of the `fitting` GPUs (positions in `node.gpus`) for one replica:
/// within one NVLink island if any island holds `k` of them (the smallest such island,
/// so large islands stay whole), else within one NUMA node if possible, else any.
/// Returns the set and whether it is one NVLink island. `fitting` holds at least `k`.
pub(super) fn choose_set(
    node: &NodeState,
    fitting: &[usize],
    k: usize,
    sharing: Sharing,
) -> (Vec<usize>, bool) {
    debug_assert!(fitting.len() >= k);
    // Tightest GPUs first within a group, then by index.
    let order = |set: &mut Vec<usize>| {
        set.sort_by_key(|&gi| {
            let g = &node.gpus[gi];
            (g.free_for(sharing), g.index)
        })
    };
    let mut by_island: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &gi in fitting {
        by_island.entry(node.gpus[gi].island).or_default().push(gi);
    }
    let island = by_island
        .into_iter()
        .filter(|(_, v)| v.len() >= k)
        .min_by_key(|(id, v)| (v.len(), *id));
    if let Some((_, mut set)) = island {
        order(&mut set);
        set.truncate(k);
        return (set, true);
    }
    let mut by_numa: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
    for &gi in fitting {
        by_numa.entry(node.gpus[gi].numa).or_default().push(gi);
    }
    let mut set = by_numa
        .into_values()
        .filter(|v| v.len() >= k)
        .min_by_key(Vec::len)
        .unwrap_or_else(|| fitting.to_vec());
    order(&mut set);
    set.truncate(k);
    (set, false)
}
