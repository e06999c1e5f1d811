//! Placement at fleet scale: 1,000 nodes x 8 GPUs, 2,000 replicas of mixed sizes in
//! random arrival order, asking for about 91% of the GPUs (the H100-only models for 91%
//! of the H100s). Prints time per placement and,
//! against a naive first-fit run on the same input, refusals and fragmentation.
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

/// The baseline: nodes in inventory order, GPUs in index order, first that fits.
struct FirstFit {
    /// (usable, reserved, owners, exclusive) per GPU per node.
    nodes: Vec<Vec<(u64, u64, u32, bool)>>,
}

impl FirstFit {
    fn new(inv: &Inventory) -> Self {
        FirstFit {
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

    fn place(&mut self, r: &Request) -> bool {
        for node in &mut self.nodes {
            let fits: Vec<usize> = node
                .iter()
                .enumerate()
                .filter(|(_, &(usable, reserved, owners, excl))| match r.sharing {
                    Sharing::Exclusive => owners == 0 && usable >= r.need_per_gpu,
                    Sharing::Shared => !excl && usable - reserved >= r.need_per_gpu,
                })
                .map(|(i, _)| i)
                .take(r.gpus as usize)
                .collect();
            if fits.len() == r.gpus as usize {
                for i in fits {
                    let g = &mut node[i];
                    g.1 += r.need_per_gpu;
                    g.2 += 1;
                    g.3 |= r.sharing == Sharing::Exclusive;
                }
                return true;
            }
        }
        false
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

    let mut ff = FirstFit::new(&inv);
    let t = Instant::now();
    let refused_ff = requests.iter().filter(|r| !ff.place(r)).count();
    let ff_time = t.elapsed();

    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / requests.len() as f64;
    println!(
        "time per placement: gpuscale {:.1} µs, first-fit {:.1} µs",
        per(ours_time),
        per(ff_time)
    );
    let f = engine.fragmentation(smallest);
    let (ff_free, ff_stranded, ff_whole) = ff.fragmentation(smallest);
    println!("refusals: gpuscale {refused_ours}, first-fit {refused_ff}");
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
    if refused_ff > 0 {
        println!(
            "  gpuscale refuses {:.0}% fewer than first-fit (goal: at least 20% fewer)",
            100.0 * (1.0 - refused_ours as f64 / refused_ff as f64)
        );
    }
    println!(
        "stranded VRAM (free blocks under the smallest model's {:.1} GiB): gpuscale {:.2} TiB of {:.2} TiB free, first-fit {:.2} TiB of {:.2} TiB free",
        smallest as f64 / GIB as f64,
        tib(f.stranded_bytes),
        tib(f.free_bytes),
        tib(ff_stranded),
        tib(ff_free)
    );
    println!(
        "whole free GPUs left: gpuscale {}, first-fit {ff_whole}",
        f.whole_free_gpus
    );
    println!(
        "ratio (gpuscale / first-fit): refusals {:.2}, time per placement {:.1}",
        refused_ours as f64 / refused_ff.max(1) as f64,
        per(ours_time) / per(ff_time)
    );

    // The same mix scaled to other demand levels, on the same fleet.
    println!("\ndemand sweep (same fleet, same mix scaled):");
    println!(
        "{:>8} {:>9} {:>16} {:>17}",
        "demand", "replicas", "refused gpuscale", "refused first-fit"
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
        let mut ff = FirstFit::new(&inv);
        let theirs = reqs.iter().filter(|r| !ff.place(r)).count();
        println!(
            "{:>7.0}% {:>9} {:>16} {:>17}",
            100.0 * demand / total_gpus as f64,
            reqs.len(),
            ours,
            theirs
        );
    }
}
