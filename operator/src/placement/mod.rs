//! Placement: where each replica runs, down to the concrete GPU set. Pure logic: the
//! inventory and the existing placements go in, a placement or a refusal with a reason a
//! person can act on comes out.
//!
//! Filters: health, the GPU selector (product, memory, compute capability), VRAM fit
//! (exclusive: a whole free GPU; shared: the need out of what is left). Tensor-parallel
//! sets stay on one node and prefer one NVLink island. Among fits, candidates are ranked
//! by a key (lowest wins, ties broken by node name and GPU index, so the result is
//! deterministic): spreading one deployment's replicas first, then the strategy —
//! BinPack takes the tightest fit on the fullest node and keeps whole GPUs, whole NVLink
//! islands and whole nodes free for large models; Spread takes the emptiest node.
//! Existing placements are adopted as they are and never moved.

mod spec;
mod topology;

pub use spec::{replica_config, request};

use std::collections::HashMap;

use crate::estimate::gib;
use crate::inventory::{Binding, Health, Inventory};

/// Identifies one replica: the deployment (`namespace/name`) and its index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId {
    /// `namespace/name` of the InferenceDeployment.
    pub deployment: String,
    /// Replica index.
    pub index: u32,
}

/// Whole GPUs, or a share of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Whole GPUs.
    Exclusive,
    /// A VRAM share of a GPU other replicas may share.
    Shared,
}

/// Placement strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Tightest fit, fullest node first.
    BinPack,
    /// Emptiest node first.
    Spread,
}

/// Failure domain to spread one deployment's replicas across.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpreadDomain {
    /// Prefer nodes that hold none of this deployment's replicas.
    Node,
    /// Prefer zones that hold none.
    Zone,
    /// Do not spread.
    None,
}

/// Which GPUs qualify.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    /// Accepted products, as substrings of the product name; empty accepts all.
    pub products: Vec<String>,
    /// Minimum total memory per GPU.
    pub min_memory_bytes: Option<u64>,
    /// Minimum compute capability.
    pub min_compute_capability: Option<(u32, u32)>,
}

/// What one replica needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The replica.
    pub replica: ReplicaId,
    /// VRAM to reserve on each of its GPUs (from [`crate::estimate`]).
    pub need_per_gpu: u64,
    /// GPUs per replica (tensor parallelism).
    pub gpus: u32,
    /// Whole GPUs or a share.
    pub sharing: Sharing,
    /// Qualifying GPUs.
    pub selector: Selector,
    /// Strategy.
    pub strategy: Strategy,
    /// Spread domain.
    pub spread: SpreadDomain,
    /// Refuse GPU sets that are not one NVLink island.
    pub require_nvlink: bool,
    /// Nodes not to use: the scheduler refused this deployment's pod there lately.
    pub avoid_nodes: Vec<String>,
}

/// Where a replica runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The replica.
    pub replica: ReplicaId,
    /// Node name.
    pub node: String,
    /// GPU indices on the node, ascending.
    pub gpus: Vec<u32>,
    /// Their UUIDs, in the same order, where the inventory knows them (empty on nodes
    /// known only by GPU Feature Discovery labels).
    pub gpu_uuids: Vec<String>,
    /// VRAM reserved on each.
    pub bytes_per_gpu: u64,
    /// Whole GPUs.
    pub exclusive: bool,
    /// The GPU set is one NVLink island (always true for one GPU).
    pub nvlink: bool,
    /// The GPUs are claimed through DRA (a ResourceClaim naming them), not counted
    /// out by a device plugin.
    pub dra: bool,
    /// The GPUs' product name (what a price table is keyed by).
    pub product: String,
}

/// Why a replica could not be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The inventory holds no GPU.
    NoGpus,
    /// No GPU matches the selector.
    NoMatchingGpu,
    /// GPUs match but none is healthy.
    UnhealthyGpus,
    /// No GPU has enough free VRAM.
    InsufficientVram,
    /// No node has enough fitting GPUs for the multi-GPU set.
    InsufficientGpusOnNode,
    /// Enough GPUs exist on a node but not in one NVLink island, and NVLink is required.
    NvlinkUnavailable,
    /// Placed, but the cluster's scheduler refused the pod on that node (a taint, a
    /// resource the inventory does not show); the message is the scheduler's.
    SchedulerRejected,
    /// The GPUs that would fit cannot be bound in this sharing mode: no GPU sharing
    /// resource or shareable DRA device for a shared replica, no whole GPUs for an
    /// exclusive one.
    BindingUnavailable,
}

impl RefusalReason {
    /// The reason as a condition reason (`Unschedulable` condition).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::NoGpus => "NoGPUs",
            RefusalReason::NoMatchingGpu => "NoMatchingGPU",
            RefusalReason::UnhealthyGpus => "UnhealthyGPUs",
            RefusalReason::InsufficientVram => "InsufficientVRAM",
            RefusalReason::InsufficientGpusOnNode => "InsufficientGPUsOnNode",
            RefusalReason::NvlinkUnavailable => "NVLinkUnavailable",
            RefusalReason::SchedulerRejected => "SchedulerRejected",
            RefusalReason::BindingUnavailable => "BindingUnavailable",
        }
    }
}

/// A refusal: a machine-readable reason and a message a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Why.
    pub reason: RefusalReason,
    /// What to do about it, with the numbers.
    pub message: String,
}

/// Why an existing placement cannot be adopted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    /// The node is no longer in the inventory.
    #[error("node {0} is gone")]
    NodeGone(String),
    /// A GPU index is no longer on the node.
    #[error("GPU {gpu} is gone from node {node}")]
    GpuGone {
        /// Node.
        node: String,
        /// GPU index.
        gpu: u32,
    },
}

/// Which nodes and GPUs exist, to ask whether a recorded placement could still be
/// adopted without building an [`Engine`]: the operator's lost check asks it of every
/// replica once a second, and an engine for the whole fleet cost 1.9 MB at 1,000 nodes
/// for a question about names and indices. It keeps only those (node by node, as an
/// inventory is read: [`Present::add`]), so the check need not hold the inventory
/// either (about 4 MB at 16,000 GPUs).
#[derive(Debug, Default)]
pub struct Present(HashMap<String, Box<[u32]>>);

impl Present {
    /// The nodes of `inventory`.
    pub fn new(inventory: &Inventory) -> Present {
        let mut present = Present::default();
        for n in &inventory.nodes {
            present.add(n);
        }
        present
    }

    /// Takes a node's name and GPU indices (of a name given twice, the first).
    pub fn add(&mut self, node: &crate::inventory::NodeGpus) {
        self.0
            .entry(node.name.clone())
            .or_insert_with(|| node.gpus.iter().map(|g| g.index).collect());
    }

    /// What [`Engine::adopt`] would say of a placement on `gpus` of `node`, as far as
    /// their existence goes, without recording anything.
    pub fn adoptable(&self, node: &str, gpus: &[u32]) -> Result<(), AdoptError> {
        let indices = self
            .0
            .get(node)
            .ok_or_else(|| AdoptError::NodeGone(node.to_string()))?;
        match gpus.iter().find(|g| !indices.contains(g)) {
            Some(&gpu) => Err(AdoptError::GpuGone {
                node: node.to_string(),
                gpu,
            }),
            None => Ok(()),
        }
    }
}

/// Free VRAM and how much of it is stranded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fragmentation {
    /// Free bytes on healthy GPUs.
    pub free_bytes: u64,
    /// Free bytes in blocks smaller than the smallest model's need: capacity that
    /// exists but where no model can use it.
    pub stranded_bytes: u64,
    /// Largest free block on one GPU.
    pub largest_free_block: u64,
    /// GPUs with nothing placed on them.
    pub whole_free_gpus: u32,
}

#[derive(Clone, Debug)]
struct GpuState {
    index: u32,
    uuid: Option<String>,
    product: usize,
    total: u64,
    usable: u64,
    reserved: u64,
    owners: u32,
    exclusive: bool,
    cc: Option<(u32, u32)>,
    numa: Option<u32>,
    island: usize,
    unhealthy: Option<String>,
}

impl GpuState {
    fn shared_free(&self) -> u64 {
        if self.exclusive {
            0
        } else {
            self.usable.saturating_sub(self.reserved)
        }
    }

    /// Free VRAM as a request of this sharing mode sees it.
    fn free_for(&self, sharing: Sharing) -> u64 {
        match sharing {
            Sharing::Exclusive if self.owners > 0 => 0,
            Sharing::Exclusive => self.usable,
            Sharing::Shared => self.shared_free(),
        }
    }
}

#[derive(Clone, Debug)]
struct NodeState {
    name: String,
    zone: Option<usize>,
    gpus: Vec<GpuState>,
    binding: Binding,
}

/// The placement engine: the inventory plus everything placed on it.
#[derive(Clone, Debug)]
pub struct Engine {
    nodes: Vec<NodeState>,
    products: Vec<String>,
    placed: HashMap<ReplicaId, Placement>,
    /// Replicas per node index, by deployment (for spreading).
    per_node: HashMap<String, HashMap<usize, u32>>,
    /// Replicas per zone index, by deployment.
    per_zone: HashMap<String, HashMap<usize, u32>>,
}

/// Lower is better; the last two entries are node and GPU order, for determinism.
type Key = [u64; 6];

impl Engine {
    /// An engine over `inventory` with nothing placed.
    pub fn new(inventory: &Inventory) -> Engine {
        let mut products: Vec<String> = Vec::new();
        let mut zones: Vec<String> = Vec::new();
        let intern = |list: &mut Vec<String>, s: &str| match list.iter().position(|p| p == s) {
            Some(i) => i,
            None => {
                list.push(s.to_string());
                list.len() - 1
            }
        };
        let mut nodes: Vec<NodeState> = inventory
            .nodes
            .iter()
            .map(|n| {
                let islands = topology::islands(&n.gpus);
                let gpus = n
                    .gpus
                    .iter()
                    .zip(&islands.of_gpu)
                    .map(|(g, &island)| GpuState {
                        index: g.index,
                        uuid: g.uuid.clone(),
                        product: intern(&mut products, &g.product),
                        total: g.total_bytes,
                        usable: g.usable_bytes(),
                        reserved: 0,
                        owners: 0,
                        exclusive: false,
                        cc: g.compute_capability,
                        numa: g.numa_node,
                        island,
                        unhealthy: match &g.health {
                            Health::Healthy => None,
                            Health::Unhealthy(r) => Some(r.clone()),
                        },
                    })
                    .collect();
                NodeState {
                    name: n.name.clone(),
                    zone: n.zone.as_deref().map(|z| intern(&mut zones, z)),
                    gpus,
                    binding: n.binding.clone(),
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Engine {
            nodes,
            products,
            placed: HashMap::new(),
            per_node: HashMap::new(),
            per_zone: HashMap::new(),
        }
    }

    /// Records an existing placement as it is (replicas are never moved). It is
    /// adopted even if the GPU now looks full: the replica is running there.
    pub fn adopt(&mut self, p: Placement) -> Result<(), AdoptError> {
        if self.placed.contains_key(&p.replica) {
            return Ok(());
        }
        let (ni, slots) = self.slots(&p.node, &p.gpus)?;
        self.commit(ni, &slots, p);
        Ok(())
    }

    /// The node's index and the GPUs' slots on it.
    fn slots(&self, node: &str, gpus: &[u32]) -> Result<(usize, Vec<usize>), AdoptError> {
        let ni = self
            .node_index(node)
            .ok_or_else(|| AdoptError::NodeGone(node.to_string()))?;
        let slots = gpus
            .iter()
            .map(|&g| {
                self.nodes[ni]
                    .gpus
                    .iter()
                    .position(|s| s.index == g)
                    .ok_or_else(|| AdoptError::GpuGone {
                        node: node.to_string(),
                        gpu: g,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok((ni, slots))
    }

    /// Places a replica, or says why it cannot. A replica already placed gets its
    /// existing placement back.
    pub fn place(&mut self, req: &Request) -> Result<Placement, Refusal> {
        if let Some(p) = self.placed.get(&req.replica) {
            return Ok(p.clone());
        }
        let k = req.gpus.max(1) as usize;
        let product_ok: Vec<bool> = self
            .products
            .iter()
            .map(|p| {
                req.selector.products.is_empty()
                    || req.selector.products.iter().any(|s| p.contains(s.as_str()))
            })
            .collect();
        // This deployment's replica counts, looked up once rather than per node.
        let dep = req.replica.deployment.as_str();
        let (dep_nodes, dep_zones) = (self.per_node.get(dep), self.per_zone.get(dep));
        let mut seen = Seen::default();
        let mut best: Option<(Key, usize, Vec<usize>, bool)> = None;
        for (ni, node) in self.nodes.iter().enumerate() {
            if req.avoid_nodes.contains(&node.name) {
                continue;
            }
            let fitting = self.fitting_gpus(node, ni, req, &product_ok, &mut seen);
            if fitting.len() < k {
                continue;
            }
            let spread = match req.spread {
                SpreadDomain::None => 0,
                SpreadDomain::Node => count_in(dep_nodes, Some(ni)),
                SpreadDomain::Zone => count_in(dep_zones, node.zone),
            };
            let stats = NodeStats::of(node, req.sharing);
            let candidate = if k == 1 {
                let (key, gi) = fitting
                    .iter()
                    .map(|&gi| (single_key(node, &stats, gi, req, spread, ni), gi))
                    .min()
                    .expect("fitting is not empty");
                Some((key, vec![gi], true))
            } else {
                let (set, nvlink) = topology::choose_set(node, &fitting, k, req.sharing);
                if nvlink || !req.require_nvlink {
                    Some((
                        set_key(node, &stats, &set, req, spread, ni, nvlink),
                        set,
                        nvlink,
                    ))
                } else {
                    seen.nvlink_short = Some(node.name.clone());
                    None
                }
            };
            if let Some((key, set, nvlink)) = candidate {
                if best.as_ref().is_none_or(|b| key < b.0) {
                    best = Some((key, ni, set, nvlink));
                }
            }
        }
        let Some((_, ni, set, nvlink)) = best else {
            return Err(self.refusal(req, &seen));
        };
        let node = &self.nodes[ni];
        let mut order: Vec<usize> = set;
        order.sort_by_key(|&gi| node.gpus[gi].index);
        let p = Placement {
            replica: req.replica.clone(),
            node: node.name.clone(),
            gpus: order.iter().map(|&gi| node.gpus[gi].index).collect(),
            gpu_uuids: order
                .iter()
                .filter_map(|&gi| node.gpus[gi].uuid.clone())
                .collect(),
            bytes_per_gpu: req.need_per_gpu,
            exclusive: req.sharing == Sharing::Exclusive,
            nvlink,
            dra: matches!(node.binding, Binding::Dra { .. }),
            product: self.products[node.gpus[order[0]].product].clone(),
        };
        self.commit(ni, &order, p.clone());
        Ok(p)
    }

    /// Frees a replica's GPUs (after it has been drained and deleted).
    pub fn release(&mut self, replica: &ReplicaId) -> Option<Placement> {
        let p = self.placed.remove(replica)?;
        let ni = self.node_index(&p.node).expect("placed on a known node");
        give_back(&p, &mut self.nodes[ni].gpus);
        let dep = &p.replica.deployment;
        decrement(&mut self.per_node, dep, ni);
        if let Some(z) = self.nodes[ni].zone {
            decrement(&mut self.per_zone, dep, z);
        }
        Some(p)
    }

    /// What removing `replica` would give back to the fleet: the largest free block
    /// its exit leaves on one of its GPUs (the whole usable memory of a GPU it leaves
    /// empty). Scale-down removes the replica that frees most first, so the fleet's
    /// free memory gathers into blocks a larger model can use; `None` for a replica
    /// placed on no GPU.
    pub fn freed_by(&self, replica: &ReplicaId) -> Option<u64> {
        let p = self.placed.get(replica)?;
        frees(p, &self.nodes[self.node_index(&p.node)?].gpus)
    }

    /// The order a scale-down wave should take `replicas` in so the fleet's free memory
    /// gathers into the largest blocks: greedily, the one whose exit frees most
    /// ([`Engine::freed_by`]) once those before it have gone. Scoring each replica
    /// alone is not enough: two replicas sharing a GPU each free only a part of it, and
    /// only the second exit empties it. Ties go to the one given first; replicas placed
    /// on no GPU are left out.
    ///
    /// The exits are played out on copies of their own nodes' GPUs only: a copy of the
    /// whole engine (every placement in the cluster) cost a scale-down pass several MB
    /// at fleet scale, and what a pass frees for a moment still sets the allocator's
    /// high-water mark.
    pub fn defragmenting_order(&self, replicas: &[ReplicaId]) -> Vec<ReplicaId> {
        let mut left: Vec<(&ReplicaId, &Placement, usize)> = Vec::new();
        for r in replicas {
            let Some(p) = self.placed.get(r) else {
                continue;
            };
            let Some(ni) = self.node_index(&p.node) else {
                continue;
            };
            // Each replica once, and only those an exit frees something for.
            if frees(p, &self.nodes[ni].gpus).is_some() && !left.iter().any(|l| l.0 == r) {
                left.push((r, p, ni));
            }
        }
        let mut after: HashMap<usize, Vec<GpuState>> = HashMap::new();
        for &(_, _, ni) in &left {
            after
                .entry(ni)
                .or_insert_with(|| self.nodes[ni].gpus.clone());
        }
        let mut order = Vec::with_capacity(left.len());
        while !left.is_empty() {
            let freed = |&(_, p, ni): &(&ReplicaId, &Placement, usize)| frees(p, &after[&ni]);
            let mut best = 0;
            let mut most = freed(&left[0]);
            for (i, l) in left.iter().enumerate().skip(1) {
                let f = freed(l);
                if f > most {
                    (best, most) = (i, f);
                }
            }
            let (r, p, ni) = left.remove(best);
            give_back(p, after.get_mut(&ni).expect("copied above"));
            order.push(r.clone());
        }
        order
    }

    /// Every placement, in replica order.
    pub fn placements(&self) -> Vec<&Placement> {
        let mut v: Vec<&Placement> = self.placed.values().collect();
        v.sort_by(|a, b| a.replica.cmp(&b.replica));
        v
    }

    /// Per GPU: `(node, index, reserved, usable, owners, exclusive)`, for checks.
    pub fn gpu_usage(&self) -> impl Iterator<Item = (&str, u32, u64, u64, u32, bool)> {
        self.nodes.iter().flat_map(|n| {
            n.gpus.iter().map(move |g| {
                (
                    n.name.as_str(),
                    g.index,
                    g.reserved,
                    g.usable,
                    g.owners,
                    g.exclusive,
                )
            })
        })
    }

    /// Free VRAM and the part of it stranded in blocks smaller than `smallest_need`.
    pub fn fragmentation(&self, smallest_need: u64) -> Fragmentation {
        let mut f = Fragmentation::default();
        for g in self
            .nodes
            .iter()
            .flat_map(|n| &n.gpus)
            .filter(|g| g.unhealthy.is_none())
        {
            let free = g.shared_free();
            f.free_bytes += free;
            if free < smallest_need {
                f.stranded_bytes += free;
            }
            f.largest_free_block = f.largest_free_block.max(free);
            f.whole_free_gpus += u32::from(g.owners == 0);
        }
        f
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes
            .binary_search_by(|n| n.name.as_str().cmp(name))
            .ok()
    }

    fn commit(&mut self, ni: usize, slots: &[usize], p: Placement) {
        for &gi in slots {
            let s = &mut self.nodes[ni].gpus[gi];
            s.reserved += p.bytes_per_gpu;
            s.owners += 1;
            s.exclusive |= p.exclusive;
        }
        let dep = &p.replica.deployment;
        *self
            .per_node
            .entry(dep.clone())
            .or_default()
            .entry(ni)
            .or_default() += 1;
        if let Some(z) = self.nodes[ni].zone {
            *self
                .per_zone
                .entry(dep.clone())
                .or_default()
                .entry(z)
                .or_default() += 1;
        }
        self.placed.insert(p.replica.clone(), p);
    }

    /// GPUs of `node` that pass every filter and fit, noting what was seen for the
    /// refusal message.
    fn fitting_gpus(
        &self,
        node: &NodeState,
        ni: usize,
        req: &Request,
        product_ok: &[bool],
        seen: &mut Seen,
    ) -> Vec<usize> {
        let sel = &req.selector;
        let mut fitting = Vec::new();
        seen.any_gpu |= !node.gpus.is_empty();
        if let Some(why) = unbindable(node, req.sharing) {
            seen.unbindable.get_or_insert(why);
            return fitting;
        }
        // Through a sharing resource the device plugin picks the GPU, so a shared
        // replica fits a node only if it fits whichever healthy GPU the plugin picks.
        let plugin_picks =
            req.sharing == Sharing::Shared && matches!(node.binding, Binding::DevicePlugin { .. });
        let mut healthy_here = 0;
        for (gi, g) in node.gpus.iter().enumerate() {
            let matches = product_ok[g.product]
                && sel.min_memory_bytes.is_none_or(|m| g.total >= m)
                && sel
                    .min_compute_capability
                    .is_none_or(|m| g.cc.is_some_and(|c| c >= m));
            if !matches {
                continue;
            }
            seen.matching += 1;
            if let Some(why) = &g.unhealthy {
                seen.unhealthy
                    .get_or_insert_with(|| format!("{} gpu {}: {why}", node.name, g.index));
                continue;
            }
            seen.healthy += 1;
            healthy_here += 1;
            let free = g.free_for(req.sharing);
            if free > seen.largest.0 {
                seen.largest = (free, ni, g.index);
            }
            if free >= req.need_per_gpu {
                fitting.push(gi);
            }
        }
        if plugin_picks && fitting.len() < healthy_here {
            fitting.clear();
        }
        if fitting.len() > seen.most_on_node.0 {
            seen.most_on_node = (fitting.len(), ni);
        }
        fitting
    }

    fn refusal(&self, req: &Request, seen: &Seen) -> Refusal {
        let k = req.gpus.max(1);
        let need = gib(req.need_per_gpu);
        let (reason, message) = if !seen.any_gpu {
            (RefusalReason::NoGpus, "no GPU nodes in the inventory: no GpuInventory from a node agent and no node labelled by NVIDIA GPU Feature Discovery".to_string())
        } else if let (0, Some(why)) = (seen.matching, &seen.unbindable) {
            (RefusalReason::BindingUnavailable, why.clone())
        } else if seen.matching == 0 {
            let mut have: Vec<&str> = self.products.iter().map(String::as_str).collect();
            have.sort_unstable();
            (
                RefusalReason::NoMatchingGpu,
                format!(
                    "no GPU matches the selector ({}); the cluster has: {}",
                    describe(&req.selector),
                    have.join(", ")
                ),
            )
        } else if seen.healthy == 0 {
            (
                RefusalReason::UnhealthyGpus,
                format!(
                    "all {} GPUs matching the selector are unhealthy (for example {})",
                    seen.matching,
                    seen.unhealthy.as_deref().unwrap_or("?")
                ),
            )
        } else if k == 1 {
            let (free, ni, g) = seen.largest;
            let whole = if req.sharing == Sharing::Exclusive {
                "a whole GPU with "
            } else {
                ""
            };
            let largest = if free == 0 {
                "every matching GPU is taken".to_string()
            } else {
                format!(
                    "largest free block {} on {} gpu {g}",
                    gib(free),
                    self.nodes[ni].name
                )
            };
            (RefusalReason::InsufficientVram, format!("needs {whole}{need} of VRAM, {largest}; add GPUs, lower maxBatchSize or maxSequenceLength, or use a smaller quantisation"))
        } else if let (true, Some(node)) = (req.require_nvlink, &seen.nvlink_short) {
            (RefusalReason::NvlinkUnavailable, format!("needs {k} NVLink-connected GPUs with {need} free each; {node} has enough GPUs but not in one NVLink island (set placement.requireNvlink: false to accept PCIe)"))
        } else {
            let (most, ni) = seen.most_on_node;
            let at = if most == 0 {
                String::new()
            } else {
                format!(" on {}", self.nodes[ni].name)
            };
            (
                RefusalReason::InsufficientGpusOnNode,
                format!(
                    "needs {k} GPUs with {need} free each on one node; at most {most} found{at}"
                ),
            )
        };
        Refusal { reason, message }
    }
}

/// What a scan saw, for the refusal message.
#[derive(Default)]
struct Seen {
    any_gpu: bool,
    matching: u32,
    healthy: u32,
    unhealthy: Option<String>,
    /// (free bytes, node, gpu index) of the largest free block among healthy matches.
    largest: (u64, usize, u32),
    /// (fitting GPUs, node) of the node with the most.
    most_on_node: (usize, usize),
    nvlink_short: Option<String>,
    /// Why a node's GPUs could not be bound in the request's sharing mode.
    unbindable: Option<String>,
}

/// Why `node` cannot bind a replica of this sharing mode, if it cannot.
fn unbindable(node: &NodeState, sharing: Sharing) -> Option<String> {
    let name = &node.name;
    match (&node.binding, sharing) {
        (Binding::Dra { shareable: false }, Sharing::Shared) => Some(format!(
            "a shared replica needs a share of a named GPU, and the DRA driver on {name} \
             publishes no shareable GPUs (allowMultipleAllocations with consumable memory \
             capacity); enable consumable capacity in the driver (Kubernetes feature \
             DRAConsumableCapacity) or set resources.sharing: Exclusive"
        )),
        (Binding::DevicePlugin { sharing: None, .. }, Sharing::Shared) => Some(format!(
            "a shared replica needs a GPU sharing resource, and {name} offers none (configure \
             time-slicing or MPS in the NVIDIA device plugin with renameByDefault, so shares \
             are nvidia.com/gpu.shared, or install its DRA driver); or set resources.sharing: \
             Exclusive"
        )),
        (Binding::DevicePlugin { whole: false, .. }, Sharing::Exclusive) => Some(format!(
            "{name} offers no whole GPUs (no nvidia.com/gpu allocatable: its device plugin \
             shares them); use another node or set resources.sharing: Shared"
        )),
        _ => None,
    }
}

fn describe(s: &Selector) -> String {
    let mut parts = Vec::new();
    if !s.products.is_empty() {
        parts.push(format!("products {:?}", s.products));
    }
    if let Some(m) = s.min_memory_bytes {
        parts.push(format!("at least {} per GPU", gib(m)));
    }
    if let Some((a, b)) = s.min_compute_capability {
        parts.push(format!("compute capability {a}.{b} or newer"));
    }
    parts.join(", ")
}

/// A deployment's replica count at `index` (a node or a zone), 0 when absent.
fn count_in(counts: Option<&HashMap<usize, u32>>, index: Option<usize>) -> u64 {
    match (counts, index) {
        (Some(m), Some(i)) => u64::from(m.get(&i).copied().unwrap_or(0)),
        _ => 0,
    }
}

/// The largest free block `p`'s exit leaves on one of its GPUs among `gpus` (its
/// node's), as [`Engine::freed_by`] says.
fn frees(p: &Placement, gpus: &[GpuState]) -> Option<u64> {
    p.gpus
        .iter()
        .filter_map(|&g| gpus.iter().find(|s| s.index == g))
        .filter(|s| s.unhealthy.is_none())
        .map(|s| {
            if s.owners <= 1 {
                s.usable
            } else if p.exclusive || s.exclusive {
                0
            } else {
                s.usable.saturating_sub(s.reserved - p.bytes_per_gpu)
            }
        })
        .max()
}

/// Gives `p`'s share of its GPUs back (`gpus`: its node's).
fn give_back(p: &Placement, gpus: &mut [GpuState]) {
    for &g in &p.gpus {
        let s = gpus
            .iter_mut()
            .find(|s| s.index == g)
            .expect("placed on a known GPU");
        s.reserved -= p.bytes_per_gpu;
        s.owners -= 1;
        if p.exclusive {
            s.exclusive = false;
        }
    }
}

/// Removes one replica of `dep` at `index`, dropping entries that reach zero.
fn decrement(m: &mut HashMap<String, HashMap<usize, u32>>, dep: &str, index: usize) {
    let Some(counts) = m.get_mut(dep) else { return };
    if let Some(c) = counts.get_mut(&index) {
        *c -= 1;
        if *c == 0 {
            counts.remove(&index);
        }
    }
    if counts.is_empty() {
        m.remove(dep);
    }
}

/// Node-wide figures the ranking keys need, computed once per node and request.
struct NodeStats {
    /// Healthy GPUs with nothing placed on them.
    whole_free: u64,
    /// The same, per NVLink island.
    whole_free_in_island: Vec<u64>,
    /// Free VRAM on the node as the request's sharing mode sees it.
    free_bytes: u64,
}

impl NodeStats {
    fn of(node: &NodeState, sharing: Sharing) -> NodeStats {
        let islands = node.gpus.iter().map(|g| g.island + 1).max().unwrap_or(0);
        let mut s = NodeStats {
            whole_free: 0,
            whole_free_in_island: vec![0; islands],
            free_bytes: 0,
        };
        for g in &node.gpus {
            if g.owners == 0 && g.unhealthy.is_none() {
                s.whole_free += 1;
                s.whole_free_in_island[g.island] += 1;
            }
            s.free_bytes += g.free_for(sharing);
        }
        s
    }
}

fn single_key(
    node: &NodeState,
    stats: &NodeStats,
    gi: usize,
    req: &Request,
    spread: u64,
    ni: usize,
) -> Key {
    let g = &node.gpus[gi];
    let idx = u64::from(g.index);
    match req.strategy {
        Strategy::BinPack => {
            let (node_free, island_free) = (stats.whole_free, stats.whole_free_in_island[g.island]);
            // An empty GPU taken by a shared replica stops being whole: charge for it.
            let breaks_whole = u64::from(g.owners == 0);
            let fit = match req.sharing {
                // Smallest GPU that fits: big GPUs stay for big models.
                Sharing::Exclusive => g.usable,
                // Tightest remaining space, and a partly used GPU before an empty one.
                Sharing::Shared => {
                    (breaks_whole << 62) | (g.free_for(Sharing::Shared) - req.need_per_gpu)
                }
            };
            [spread, fit, node_free, island_free, ni as u64, idx]
        }
        Strategy::Spread => [
            spread,
            u64::MAX - stats.free_bytes,
            u64::MAX - g.free_for(req.sharing),
            0,
            ni as u64,
            idx,
        ],
    }
}

fn set_key(
    node: &NodeState,
    stats: &NodeStats,
    set: &[usize],
    req: &Request,
    spread: u64,
    ni: usize,
    nvlink: bool,
) -> Key {
    let capacity: u64 = set.iter().map(|&gi| node.gpus[gi].usable).sum();
    let first = set
        .iter()
        .map(|&gi| u64::from(node.gpus[gi].index))
        .min()
        .unwrap_or(0);
    match req.strategy {
        Strategy::BinPack => {
            // Smallest GPUs that fit first: NVLink is worth preferring among GPUs of
            // one size, not worth taking a larger class that bigger models need later
            // (requireNvlink is there for sets that must have it). Then the fullest
            // node, which keeps empty nodes whole for the largest sets.
            [
                spread,
                capacity,
                u64::from(!nvlink),
                stats.whole_free,
                ni as u64,
                first,
            ]
        }
        Strategy::Spread => [
            spread,
            u64::from(!nvlink),
            u64::MAX - stats.free_bytes,
            0,
            ni as u64,
            first,
        ],
    }
}

#[cfg(test)]
mod tests;
