//! Placement at fleet scale: 1,000 nodes x 8 GPUs, 2,000 replicas of mixed sizes in
//! random arrival order, asking for about 91% of the GPUs (the H100-only models for 91%
//! of the H100s). Prints time per placement, refusals and fragmentation for gpuscale's
//! engine and three peers run on the same input, each timed the same way (one pass
//! over the same requests, in the same process):
//! - first-fit: nodes in inventory order, GPUs in index order, the first that fits;
//! - best-fit: the node, and on it the GPUs, that the request leaves the least free
//!   VRAM on (the classic bin-packing rule);
//! - HAMi binpack: HAMi's `node-scheduler-policy: binpack` with
//!   `gpu-scheduler-policy: binpack` (Project-HAMi/HAMi `pkg/scheduler/policy`): the
//!   fitting node with the highest score (share of device slots used + share of cores
//!   used + share of memory used, after the request), and on it the fitting GPUs with
//!   the highest score by the same sum; 10 slots per GPU (HAMi's default
//!   `deviceSplitCount`), a whole GPU's cores for an exclusive replica.
//!
//! `cargo bench -p gpuscale-operator --bench placement`

use std::time::Instant;

use gpuscale_operator::estimate::GIB;
use gpuscale_operator::inventory::{Binding, Gpu, Health, Inventory, NodeGpus};
use gpuscale_operator::placement::{
    Engine, ReplicaId, Request, Selector, Sharing, SpreadDomain, Strategy,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn fleet(rng: &mut StdRng) -> Inventory {
    let mut classes: Vec<u8> = [0u8; 350]
        .into_iter()
        .chain([1; 350])
        .chain([2; 300])
        .collect();
    classes.shuffle(rng);
    let nodes = classes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let (product, gib) = [("H100-80GB", 80), ("A100-40GB", 40), ("L4", 24)][c as usize];
            let gpus = (0..8u32)
                .map(|g| Gpu {
                    index: g,
                    uuid: Some(format!("GPU-{i:04}-{g}")),
                    product: product.into(),
                    total_bytes: gib * GIB,
                    used_outside_bytes: 0,
                    compute_capability: Some((8, 9)),
                    nvlink_peers: match c {
                        0 => (0..8).filter(|&p| p != g).collect(),
                        1 => vec![g ^ 1],
                        _ => vec![],
                    },
                    numa_node: Some(g / 4),
                    health: Health::Healthy,
                })
                .collect();
            NodeGpus {
                name: format!("node-{i:04}"),
                zone: Some(format!("zone-{}", i % 3)),
                gpus,
                binding: Binding::Dra { shareable: true },
            }
        })
        .collect();
    Inventory { nodes }
}

fn workload(rng: &mut StdRng, scale: f64) -> Vec<Request> {
    // (replicas, GPUs each, GiB per GPU range, sharing)
    let mix: [(u32, u32, (f64, f64), Sharing); 9] = [
        (300, 8, (42.0, 48.0), Sharing::Exclusive), // 70B f16 at 8 x H100
        (160, 1, (50.0, 70.0), Sharing::Exclusive), // large single-GPU models
        (100, 8, (28.0, 34.0), Sharing::Exclusive),
        (350, 4, (26.0, 34.0), Sharing::Exclusive), // 70B q4 at 4 GPUs
        (300, 2, (26.0, 34.0), Sharing::Exclusive),
        (390, 4, (16.0, 22.0), Sharing::Exclusive),
        (150, 1, (16.0, 22.0), Sharing::Exclusive), // 8B f16
        (100, 2, (16.0, 22.0), Sharing::Exclusive),
        (150, 1, (1.0, 6.0), Sharing::Shared), // small models packed by VRAM
    ];
    let mut out = Vec::new();
    for (kind, &(n, gpus, (lo, hi), sharing)) in mix.iter().enumerate() {
        for i in 0..(f64::from(n) * scale).round() as u32 {
            out.push(Request {
                replica: ReplicaId {
                    deployment: format!("ns/model-{kind}-{}", i / 4),
                    index: i % 4,
                },
                need_per_gpu: (rng.random_range(lo..hi) * GIB as f64) as u64,
                gpus,
                sharing,
                selector: Selector::default(),
                strategy: Strategy::BinPack,
                spread: SpreadDomain::Node,
                require_nvlink: false,
                avoid_nodes: Vec::new(),
            });
        }
    }
    out.shuffle(rng);
    out
}

/// How a peer picks a node and GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    FirstFit,
    BestFit,
    HamiBinpack,
}

/// A peer scheduler's view of the fleet.
struct Peer {
    rule: Rule,
    /// (usable, reserved, owners, exclusive) per GPU per node.
    nodes: Vec<Vec<(u64, u64, u32, bool)>>,
}

/// HAMi's default device split count: tasks one GPU may hold.
const HAMI_SLOTS: f64 = 10.0;

impl Peer {
    fn new(inv: &Inventory, rule: Rule) -> Self {
        Peer {
            rule,
            nodes: inv
                .nodes
                .iter()
                .map(|n| {
                    n.gpus
                        .iter()
                        .map(|g| (g.usable_bytes(), 0, 0, false))
                        .collect()
                })
                .collect(),
        }
    }

    fn fits(r: &Request, g: &(u64, u64, u32, bool)) -> bool {
        let &(usable, reserved, owners, excl) = g;
        match r.sharing {
            Sharing::Exclusive => owners == 0 && usable >= r.need_per_gpu,
            Sharing::Shared => !excl && usable - reserved >= r.need_per_gpu,
        }
    }

    /// What the request takes of a GPU: all of it when exclusive.
    fn taken(r: &Request, g: &(u64, u64, u32, bool)) -> u64 {
        match r.sharing {
            Sharing::Exclusive => g.0,
            Sharing::Shared => r.need_per_gpu,
        }
    }

    /// HAMi's device score after the request: slots + cores + memory shares.
    fn hami_score(r: &Request, g: &(u64, u64, u32, bool)) -> f64 {
        let excl = g.3 || r.sharing == Sharing::Exclusive;
        f64::from(g.2 + 1) / HAMI_SLOTS
            + f64::from(u8::from(excl))
            + (g.1 + Self::taken(r, g)) as f64 / g.0.max(1) as f64
    }

    /// The GPUs of `node` this rule would give `r`, best first, if enough fit.
    fn choose(&self, r: &Request, node: &[(u64, u64, u32, bool)]) -> Option<Vec<usize>> {
        let mut fits: Vec<usize> = (0..node.len())
            .filter(|&i| Self::fits(r, &node[i]))
            .collect();
        if fits.len() < r.gpus as usize {
            return None;
        }
        match self.rule {
            Rule::FirstFit => {}
            // Least free VRAM left on the GPU first.
            Rule::BestFit => {
                fits.sort_by_key(|&i| node[i].0 - node[i].1 - Self::taken(r, &node[i]))
            }
            Rule::HamiBinpack => fits.sort_by(|&a, &b| {
                Self::hami_score(r, &node[b]).total_cmp(&Self::hami_score(r, &node[a]))
            }),
        }
        fits.truncate(r.gpus as usize);
        Some(fits)
    }

    fn place(&mut self, r: &Request) -> bool {
        let mut best: Option<(usize, Vec<usize>, f64)> = None;
        for (n, node) in self.nodes.iter().enumerate() {
            let Some(gpus) = self.choose(r, node) else {
                continue;
            };
            let score = match self.rule {
                Rule::FirstFit => {
                    best = Some((n, gpus, 0.0));
                    break;
                }
                // Lower is better: free VRAM left on the node.
                Rule::BestFit => {
                    let free: u64 = node.iter().map(|g| if g.3 { 0 } else { g.0 - g.1 }).sum();
                    let taken: u64 = gpus.iter().map(|&i| Self::taken(r, &node[i])).sum();
                    (free - taken) as f64
                }
                // Higher is better: the node's shares after the request, negated.
                Rule::HamiBinpack => {
                    let count = node.len() as f64;
                    let slots =
                        node.iter().map(|g| f64::from(g.2)).sum::<f64>() + f64::from(r.gpus);
                    let cores = node.iter().filter(|g| g.3).count() as f64
                        + if r.sharing == Sharing::Exclusive {
                            f64::from(r.gpus)
                        } else {
                            0.0
                        };
                    let usable: u64 = node.iter().map(|g| g.0).sum();
                    let used: u64 = node.iter().map(|g| g.1).sum::<u64>()
                        + gpus.iter().map(|&i| Self::taken(r, &node[i])).sum::<u64>();
                    -(slots / (count * HAMI_SLOTS)
                        + cores / count
                        + used as f64 / usable.max(1) as f64)
                }
            };
            if best.as_ref().is_none_or(|b| score < b.2) {
                best = Some((n, gpus, score));
            }
        }
        let Some((n, gpus, _)) = best else {
            return false;
        };
        for i in gpus {
            let g = &mut self.nodes[n][i];
            g.1 += Self::taken(r, g);
            g.2 += 1;
            g.3 |= r.sharing == Sharing::Exclusive;
        }
        true
    }

    /// (free, stranded below `smallest`, whole free GPUs)
    fn fragmentation(&self, smallest: u64) -> (u64, u64, u32) {
        let mut f = (0, 0, 0);
        for &(usable, reserved, owners, excl) in self.nodes.iter().flatten() {
            let free = if excl { 0 } else { usable - reserved };
            f.0 += free;
            if free < smallest {
                f.1 += free;
            }
            f.2 += u32::from(owners == 0);
        }
        f
    }
}

/// GPUs asked for; a shared replica counts as a tenth of one.
fn gpu_demand(requests: &[Request]) -> f64 {
    requests
        .iter()
        .map(|r| match r.sharing {
            Sharing::Shared => 0.1,
            Sharing::Exclusive => f64::from(r.gpus),
        })
        .sum()
}

fn tib(b: u64) -> f64 {
    b as f64 / (1u64 << 40) as f64
}

fn main() {
    let mut rng = StdRng::seed_from_u64(7);
    let inv = fleet(&mut rng);
    let requests = workload(&mut rng, 1.0);
    let total_gpus: usize = inv.nodes.iter().map(|n| n.gpus.len()).sum();
    let demand = gpu_demand(&requests);
    let smallest = requests.iter().map(|r| r.need_per_gpu).min().unwrap();
    println!(
        "fleet: {} nodes, {total_gpus} GPUs; {} replicas asking for {:.0} GPUs ({:.0}% of the fleet)",
        inv.nodes.len(),
        requests.len(),
        demand,
        100.0 * demand / total_gpus as f64
    );

    let mut engine = Engine::new(&inv);
    let t = Instant::now();
    let mut refused_kinds = std::collections::BTreeMap::new();
    let refused_ours = requests
        .iter()
        .filter(|r| match engine.place(r) {
            Ok(_) => false,
            Err(e) => {
                *refused_kinds
                    .entry((r.gpus, r.need_per_gpu / GIB, e.reason.as_str()))
                    .or_insert(0) += 1;
                true
            }
        })
        .count();
    let ours_time = t.elapsed();

    let peers = [
        ("first-fit", Rule::FirstFit),
        ("best-fit", Rule::BestFit),
        ("HAMi binpack", Rule::HamiBinpack),
    ];
    let mut ran = Vec::new();
    for (name, rule) in peers {
        let mut peer = Peer::new(&inv, rule);
        let t = Instant::now();
        let refused = requests.iter().filter(|r| !peer.place(r)).count();
        ran.push((name, refused, t.elapsed(), peer.fragmentation(smallest)));
    }

    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / requests.len() as f64;
    let f = engine.fragmentation(smallest);
    println!(
        "{:<14} {:>9} {:>15} {:>22} {:>16}",
        "", "refused", "µs/placement", "stranded / free TiB", "whole free GPUs"
    );
    println!(
        "{:<14} {:>9} {:>15.1} {:>22} {:>16}",
        "gpuscale",
        refused_ours,
        per(ours_time),
        format!("{:.2} / {:.2}", tib(f.stranded_bytes), tib(f.free_bytes)),
        f.whole_free_gpus
    );
    for (name, refused, took, (free, stranded, whole)) in &ran {
        println!(
            "{name:<14} {refused:>9} {:>15.1} {:>22} {whole:>16}",
            per(*took),
            format!("{:.2} / {:.2}", tib(*stranded), tib(*free)),
        );
    }
    println!(
        "(stranded: free blocks under the smallest model's {:.1} GiB)",
        smallest as f64 / GIB as f64
    );
    if std::env::var_os("PLACEMENT_DEBUG").is_some() {
        println!("{refused_kinds:?}");
        let mut by_class = std::collections::BTreeMap::new();
        for p in engine.placements() {
            let node = inv.nodes.iter().find(|n| n.name == p.node).unwrap();
            let key = (
                p.gpus.len(),
                p.bytes_per_gpu / GIB / 10 * 10,
                node.gpus[0].product.clone(),
            );
            *by_class.entry(key).or_insert(0) += p.gpus.len();
        }
        println!("{by_class:#?}");
    }
    for (name, refused, took, _) in &ran {
        println!(
            "ratio (gpuscale / {name}): refusals {:.2} ({:.0}% fewer), time per placement {:.2}",
            refused_ours as f64 / (*refused).max(1) as f64,
            100.0 * (1.0 - refused_ours as f64 / (*refused).max(1) as f64),
            per(ours_time) / per(*took)
        );
    }
    println!(
        "(placements are deterministic for the seed; the times vary run to run by the machine's noise)"
    );

    // The same mix scaled to other demand levels, on the same fleet.
    println!("\ndemand sweep (same fleet, same mix scaled), replicas refused:");
    println!(
        "{:>8} {:>9} {:>9} {:>10} {:>9} {:>13}",
        "demand", "replicas", "gpuscale", "first-fit", "best-fit", "HAMi binpack"
    );
    for scale in [0.9, 0.95, 1.0, 1.03, 1.06, 1.1] {
        let mut rng = StdRng::seed_from_u64(11);
        let reqs = workload(&mut rng, scale);
        let demand: f64 = reqs
            .iter()
            .map(|r| {
                if r.sharing == Sharing::Shared {
                    0.1
                } else {
                    f64::from(r.gpus)
                }
            })
            .sum();
        let mut e = Engine::new(&inv);
        let ours = reqs.iter().filter(|r| e.place(r).is_err()).count();
        let theirs: Vec<usize> = peers
            .iter()
            .map(|&(_, rule)| {
                let mut peer = Peer::new(&inv, rule);
                reqs.iter().filter(|r| !peer.place(r)).count()
            })
            .collect();
        println!(
            "{:>7.0}% {:>9} {:>9} {:>10} {:>9} {:>13}",
            100.0 * demand / total_gpus as f64,
            reqs.len(),
            ours,
            theirs[0],
            theirs[1],
            theirs[2]
        );
    }
}
