use proptest::prelude::{
    any, prop, prop_assert, prop_assert_eq, proptest, ProptestConfig, Strategy as Gen,
};

use super::*;
use crate::estimate::GIB;
use crate::inventory::{Binding, Gpu, Health, Inventory, NodeGpus};

fn gpu(index: u32, product: &str, gib: u64, peers: &[u32]) -> Gpu {
    Gpu {
        index,
        uuid: Some(format!("GPU-{product}-{index}")),
        product: product.into(),
        total_bytes: gib * GIB,
        used_outside_bytes: 0,
        compute_capability: Some((9, 0)),
        nvlink_peers: peers.to_vec(),
        numa_node: Some(index / 4),
        health: Health::Healthy,
    }
}

/// `n` GPUs all NVLinked to each other (NVSwitch).
fn nvswitch_node(name: &str, n: u32, product: &str, gib: u64) -> NodeGpus {
    let all: Vec<u32> = (0..n).collect();
    NodeGpus {
        name: name.into(),
        zone: None,
        gpus: (0..n)
            .map(|i| {
                gpu(
                    i,
                    product,
                    gib,
                    &all.iter().copied().filter(|&p| p != i).collect::<Vec<_>>(),
                )
            })
            .collect(),
        binding: Binding::Dra { shareable: true },
    }
}

/// `n` GPUs NVLinked in bridged pairs (0-1, 2-3, ...).
fn paired_node(name: &str, n: u32, product: &str, gib: u64) -> NodeGpus {
    NodeGpus {
        name: name.into(),
        zone: None,
        gpus: (0..n).map(|i| gpu(i, product, gib, &[i ^ 1])).collect(),
        binding: Binding::Dra { shareable: true },
    }
}

fn req(dep: &str, index: u32, need_gib: f64, gpus: u32, sharing: Sharing) -> Request {
    Request {
        replica: ReplicaId {
            deployment: dep.into(),
            index,
        },
        need_per_gpu: (need_gib * GIB as f64) as u64,
        gpus,
        sharing,
        selector: Selector::default(),
        strategy: Strategy::BinPack,
        spread: SpreadDomain::Node,
        require_nvlink: false,
        avoid_nodes: Vec::new(),
    }
}

fn inv(nodes: Vec<NodeGpus>) -> Inventory {
    Inventory { nodes }
}

#[test]
fn refusal_names_the_need_and_the_largest_free_block() {
    let mut n = paired_node("node-b", 4, "L40S", 48);
    n.gpus[3].used_outside_bytes = (48.0 * GIB as f64 - 11.8 * GIB as f64) as u64;
    for g in &mut n.gpus[..3] {
        g.used_outside_bytes = 40 * GIB;
    }
    let mut e = Engine::new(&inv(vec![n]));
    let r = e
        .place(&req("ns/big", 0, 14.2, 1, Sharing::Shared))
        .unwrap_err();
    assert_eq!(r.reason, RefusalReason::InsufficientVram);
    assert!(
        r.message
            .contains("needs 14.2 GiB of VRAM, largest free block 11.8 GiB on node-b gpu 3"),
        "{}",
        r.message
    );
}

#[test]
fn refusals_for_selector_health_and_topology_say_why() {
    let mut e = Engine::new(&inv(vec![]));
    assert_eq!(
        e.place(&req("ns/a", 0, 1.0, 1, Sharing::Shared))
            .unwrap_err()
            .reason,
        RefusalReason::NoGpus
    );

    let mut e = Engine::new(&inv(vec![paired_node("n1", 2, "L4", 24)]));
    let mut r = req("ns/a", 0, 1.0, 1, Sharing::Shared);
    r.selector.products = vec!["H100".into()];
    let refusal = e.place(&r).unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::NoMatchingGpu);
    assert!(
        refusal.message.contains("the cluster has: L4"),
        "{}",
        refusal.message
    );

    let mut n = paired_node("n1", 2, "L4", 24);
    n.gpus
        .iter_mut()
        .for_each(|g| g.health = Health::Unhealthy("throttling (HwSlowdown)".into()));
    let mut e = Engine::new(&inv(vec![n]));
    let refusal = e
        .place(&req("ns/a", 0, 1.0, 1, Sharing::Shared))
        .unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::UnhealthyGpus);
    assert!(refusal.message.contains("HwSlowdown"));

    let mut e = Engine::new(&inv(vec![
        paired_node("n1", 2, "A100", 80),
        paired_node("n2", 4, "A100", 80),
    ]));
    let refusal = e
        .place(&req("ns/tp", 0, 30.0, 8, Sharing::Exclusive))
        .unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::InsufficientGpusOnNode);
    assert!(
        refusal.message.contains("at most 4 found on n2"),
        "{}",
        refusal.message
    );

    let mut r = req("ns/tp", 0, 30.0, 4, Sharing::Exclusive);
    r.require_nvlink = true;
    let refusal = e.place(&r).unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::NvlinkUnavailable);
    r.require_nvlink = false;
    let p = e.place(&r).unwrap();
    assert!(!p.nvlink);
    assert_eq!(p.node, "n2");
}

#[test]
fn gpu_pairs_use_one_nvlink_bridge() {
    let mut e = Engine::new(&inv(vec![paired_node("n1", 8, "A100", 80)]));
    // Take GPU 0 so the first pair is broken.
    e.place(&req("ns/small", 0, 10.0, 1, Sharing::Exclusive))
        .unwrap();
    let p = e
        .place(&req("ns/tp2", 0, 30.0, 2, Sharing::Exclusive))
        .unwrap();
    assert!(p.nvlink);
    assert_eq!(p.gpus[0] ^ 1, p.gpus[1], "one bridged pair: {:?}", p.gpus);
    assert_ne!(p.gpus, vec![0, 1]);
}

#[test]
fn bin_pack_keeps_whole_nodes_and_whole_gpus_free() {
    let nodes = vec![
        nvswitch_node("a", 8, "H100", 80),
        nvswitch_node("b", 8, "H100", 80),
    ];
    let mut e = Engine::new(&inv(nodes));
    // Small shared replicas pack onto one GPU of one node.
    for i in 0..4 {
        let p = e
            .place(&req("ns/small", i, 15.0, 1, Sharing::Shared).with_spread(SpreadDomain::None))
            .unwrap();
        assert_eq!((p.node.as_str(), p.gpus.as_slice()), ("a", &[0][..]));
    }
    // An 8-GPU replica still finds a whole node.
    let p = e
        .place(&req("ns/huge", 0, 70.0, 8, Sharing::Exclusive))
        .unwrap();
    assert_eq!(p.node, "b");
    assert!(p.nvlink);
}

#[test]
fn exclusive_takes_the_smallest_gpu_that_fits() {
    let mut n = nvswitch_node("n", 2, "A100", 80);
    n.gpus[1].total_bytes = 40 * GIB;
    let mut e = Engine::new(&inv(vec![n]));
    let p = e
        .place(&req("ns/a", 0, 30.0, 1, Sharing::Exclusive))
        .unwrap();
    assert_eq!(p.gpus, vec![1]);
    // An exclusive GPU takes no shared replica even with VRAM left on it.
    let mut e = Engine::new(&inv(vec![nvswitch_node("n", 1, "H100", 80)]));
    e.place(&req("ns/a", 0, 30.0, 1, Sharing::Exclusive))
        .unwrap();
    let refusal = e
        .place(&req("ns/c", 0, 5.0, 1, Sharing::Shared))
        .unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::InsufficientVram);
    assert!(
        refusal.message.contains("every matching GPU is taken"),
        "{}",
        refusal.message
    );
}

#[test]
fn replicas_of_one_deployment_spread_across_nodes_and_zones() {
    let mut a = nvswitch_node("a", 8, "H100", 80);
    let mut b = nvswitch_node("b", 8, "H100", 80);
    let mut c = nvswitch_node("c", 8, "H100", 80);
    a.zone = Some("z1".into());
    b.zone = Some("z1".into());
    c.zone = Some("z2".into());
    let mut e = Engine::new(&inv(vec![a, b, c]));
    let nodes: Vec<String> = (0..3)
        .map(|i| {
            e.place(&req("ns/web", i, 20.0, 1, Sharing::Shared))
                .unwrap()
                .node
        })
        .collect();
    assert_eq!(nodes, ["a", "b", "c"]);
    let zones: Vec<String> = (0..2)
        .map(|i| {
            e.place(&req("ns/z", i, 20.0, 1, Sharing::Shared).with_spread(SpreadDomain::Zone))
                .unwrap()
                .node
        })
        .collect();
    assert_ne!(
        zones[0] == "c",
        zones[1] == "c",
        "one replica per zone: {zones:?}"
    );
}

#[test]
fn release_frees_and_existing_placements_are_adopted_not_moved() {
    let mut e = Engine::new(&inv(vec![nvswitch_node("a", 2, "H100", 80)]));
    let p = e
        .place(&req("ns/a", 0, 30.0, 1, Sharing::Exclusive))
        .unwrap();
    let moved = Placement {
        gpus: vec![1],
        gpu_uuids: vec!["GPU-H100-1".into()],
        ..p.clone()
    };
    let mut fresh = Engine::new(&inv(vec![nvswitch_node("a", 2, "H100", 80)]));
    fresh.adopt(moved.clone()).unwrap();
    assert_eq!(
        fresh
            .place(&req("ns/a", 0, 30.0, 1, Sharing::Exclusive))
            .unwrap(),
        moved
    );
    assert_eq!(
        fresh.adopt(Placement {
            node: "gone".into(),
            replica: ReplicaId {
                deployment: "x".into(),
                index: 9
            },
            ..p.clone()
        }),
        Err(AdoptError::NodeGone("gone".into()))
    );
    // Asked of the inventory without an engine, the answers adopting gives.
    let one = inv(vec![nvswitch_node("a", 2, "H100", 80)]);
    let present = Present::new(&one);
    for (node, gpus) in [("a", vec![1]), ("gone", vec![1]), ("a", vec![0, 7])] {
        let placement = Placement {
            node: node.into(),
            gpus: gpus.clone(),
            ..p.clone()
        };
        assert_eq!(
            present.adoptable(node, &gpus),
            Engine::new(&one).adopt(placement),
            "{node} {gpus:?}"
        );
    }
    assert_eq!(present.adoptable("a", &[1]), Ok(()));
    assert_eq!(
        present.adoptable("a", &[0, 7]),
        Err(AdoptError::GpuGone {
            node: "a".into(),
            gpu: 7
        })
    );
    assert_eq!(e.release(&p.replica), Some(p));
    assert!(e
        .gpu_usage()
        .all(|(_, _, reserved, _, owners, excl)| reserved == 0 && owners == 0 && !excl));
}

#[test]
fn fragmentation_counts_free_space_too_small_for_the_smallest_model() {
    let mut e = Engine::new(&inv(vec![nvswitch_node("a", 2, "L4", 24)]));
    e.place(&req("ns/a", 0, 20.0, 1, Sharing::Shared)).unwrap();
    let f = e.fragmentation(8 * GIB);
    assert_eq!(f.free_bytes, 28 * GIB);
    assert_eq!(f.stranded_bytes, 4 * GIB);
    assert_eq!(f.largest_free_block, 24 * GIB);
    assert_eq!(f.whole_free_gpus, 1);
}

#[test]
fn islands_are_nvlink_components() {
    let n = paired_node("n", 6, "A100", 80);
    let count = |i: &topology::Islands| i.of_gpu.iter().max().map_or(0, |m| m + 1);
    let i = topology::islands(&n.gpus);
    assert_eq!(count(&i), 3);
    assert_eq!(i.of_gpu, vec![0, 0, 1, 1, 2, 2]);
    assert_eq!(
        count(&topology::islands(&nvswitch_node("n", 8, "H100", 80).gpus)),
        1
    );
}

impl Request {
    fn with_spread(mut self, s: SpreadDomain) -> Self {
        self.spread = s;
        self
    }
}

// ---- properties -------------------------------------------------------------------

fn arb_inventory() -> impl Gen<Value = Inventory> {
    let node = (
        1u32..=8,
        prop::sample::select(vec![24u64, 40, 48, 80, 141]),
        any::<bool>(),
        0u32..3,
        0u64..8,
    );
    prop::collection::vec(node, 1..8).prop_map(|nodes| {
        inv(nodes
            .into_iter()
            .enumerate()
            .map(|(i, (n, gib, nvswitch, zone, outside))| {
                let mut node = if nvswitch {
                    nvswitch_node(&format!("node-{i:02}"), n, "GPU", gib)
                } else {
                    paired_node(&format!("node-{i:02}"), n, "GPU", gib)
                };
                node.zone = Some(format!("z{zone}"));
                node.gpus
                    .iter_mut()
                    .for_each(|g| g.used_outside_bytes = outside * GIB);
                if outside == 7 {
                    node.gpus[0].health = Health::Unhealthy("XID 79".into());
                }
                node
            })
            .collect())
    })
}

fn arb_requests() -> impl Gen<Value = Vec<Request>> {
    let one = (
        0u32..4,
        1u64..100,
        prop::sample::select(vec![1u32, 1, 1, 2, 4, 8]),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![
            SpreadDomain::Node,
            SpreadDomain::Zone,
            SpreadDomain::None,
        ]),
        any::<bool>(),
    );
    prop::collection::vec(one, 1..40).prop_map(|rs| {
        rs.into_iter()
            .enumerate()
            .map(
                |(i, (dep, need, gpus, shared, spread_strategy, spread, nvl))| {
                    let sharing = if shared && gpus == 1 {
                        Sharing::Shared
                    } else {
                        Sharing::Exclusive
                    };
                    let mut r = req(&format!("ns/d{dep}"), i as u32, need as f64, gpus, sharing);
                    r.strategy = if spread_strategy {
                        Strategy::Spread
                    } else {
                        Strategy::BinPack
                    };
                    r.spread = spread;
                    r.require_nvlink = nvl;
                    r
                },
            )
            .collect()
    })
}

fn run(inventory: &Inventory, requests: &[Request]) -> (Engine, Vec<Result<Placement, Refusal>>) {
    let mut e = Engine::new(inventory);
    let out = requests.iter().map(|r| e.place(r)).collect();
    (e, out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn never_over_commits_and_sets_stay_on_one_node(inventory in arb_inventory(), requests in arb_requests()) {
        let (e, out) = run(&inventory, &requests);
        // Per-GPU use recomputed from the placements returned, not read from the engine:
        // (bytes reserved, placements, any exclusive) by (node, GPU index).
        let mut used: std::collections::BTreeMap<(&str, u32), (u64, u32, bool)> = Default::default();
        for p in out.iter().flatten() {
            for g in &p.gpus {
                let u = used.entry((p.node.as_str(), *g)).or_default();
                u.0 += p.bytes_per_gpu;
                u.1 += 1;
                u.2 |= p.exclusive;
            }
        }
        for ((node, index), (bytes, count, exclusive)) in &used {
            let gpu = inventory.nodes.iter().find(|n| n.name == *node).unwrap()
                .gpus.iter().find(|g| g.index == *index).unwrap();
            prop_assert!(*bytes <= gpu.usable_bytes(), "{node} gpu {index}: {bytes} > {}", gpu.usable_bytes());
            prop_assert!(!exclusive || *count == 1, "{node} gpu {index}: exclusive with {count} placements");
        }
        // The engine's own ledger agrees with that.
        for (node, index, reserved, _, owners, _) in e.gpu_usage() {
            let (bytes, count, _) = used.get(&(node, index)).copied().unwrap_or_default();
            prop_assert_eq!((reserved, owners), (bytes, count), "{} gpu {}", node, index);
        }
        for (r, p) in requests.iter().zip(&out) {
            let Ok(p) = p else { continue };
            let node = inventory.nodes.iter().find(|n| n.name == p.node).unwrap();
            prop_assert_eq!(p.gpus.len(), r.gpus as usize);
            let mut distinct = p.gpus.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), p.gpus.len());
            for (g, uuid) in p.gpus.iter().zip(&p.gpu_uuids) {
                let gpu = node.gpus.iter().find(|x| x.index == *g).unwrap();
                prop_assert_eq!(gpu.uuid.as_ref(), Some(uuid), "GPU set must be on the placement's node");
                prop_assert_eq!(&gpu.health, &Health::Healthy);
            }
            if r.require_nvlink { prop_assert!(p.nvlink); }
        }
    }

    #[test]
    fn deterministic_whatever_the_inventory_order(inventory in arb_inventory(), requests in arb_requests()) {
        let (_, a) = run(&inventory, &requests);
        let mut reversed = inventory.clone();
        reversed.nodes.reverse();
        let (_, b) = run(&reversed, &requests);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn stable_when_re_run_with_existing_placements(inventory in arb_inventory(), requests in arb_requests()) {
        let (first, out) = run(&inventory, &requests);
        let mut again = Engine::new(&inventory);
        for p in first.placements() {
            again.adopt(p.clone()).unwrap();
        }
        for (r, before) in requests.iter().zip(&out) {
            if let Ok(before) = before {
                prop_assert_eq!(&again.place(r).unwrap(), before);
            }
        }
        let usage_a: Vec<_> = first.gpu_usage().collect();
        let usage_b: Vec<_> = again.gpu_usage().collect();
        prop_assert_eq!(usage_a, usage_b);
    }

    /// The wave's order, played out on copies of the replicas' own nodes, is the one a
    /// copy of the whole engine gives (the greedy rule as first written): every
    /// placed replica once, in the same order, and the engine untouched.
    #[test]
    fn a_wave_order_is_what_playing_it_out_on_the_whole_engine_gives(inventory in arb_inventory(), requests in arb_requests()) {
        let (e, _) = run(&inventory, &requests);
        let mut ids: Vec<ReplicaId> = requests.iter().map(|r| r.replica.clone()).collect();
        ids.reverse();
        let mut after = e.clone();
        let mut left: Vec<&ReplicaId> = ids.iter().filter(|r| e.freed_by(r).is_some()).collect();
        let mut whole = Vec::new();
        while !left.is_empty() {
            let mut best = 0;
            let mut most = after.freed_by(left[0]);
            for (i, r) in left.iter().enumerate().skip(1) {
                let frees = after.freed_by(r);
                if frees > most {
                    (best, most) = (i, frees);
                }
            }
            let r = left.remove(best);
            after.release(r);
            whole.push(r.clone());
        }
        let before: Vec<_> = e.gpu_usage().map(|u| (u.0.to_string(), u.1, u.2, u.4)).collect();
        prop_assert_eq!(&e.defragmenting_order(&ids), &whole);
        let usage: Vec<_> = e.gpu_usage().map(|u| (u.0.to_string(), u.1, u.2, u.4)).collect();
        prop_assert_eq!(usage, before);
        // Given twice, a replica is still ordered once.
        let twice: Vec<ReplicaId> = ids.iter().chain(&ids).cloned().collect();
        prop_assert_eq!(e.defragmenting_order(&twice), whole);
    }

    #[test]
    fn releasing_everything_restores_the_empty_cluster(inventory in arb_inventory(), requests in arb_requests()) {
        let (mut e, out) = run(&inventory, &requests);
        for p in out.into_iter().flatten() {
            prop_assert!(e.release(&p.replica).is_some());
        }
        prop_assert!(e.gpu_usage().all(|(_, _, reserved, _, owners, _)| reserved == 0 && owners == 0));
        prop_assert!(e.per_node.is_empty() && e.per_zone.is_empty());
    }
}

#[test]
fn multi_gpu_sets_take_the_smallest_gpus_that_fit() {
    let l4 = NodeGpus {
        name: "b-l4".into(),
        zone: None,
        gpus: (0..8).map(|i| gpu(i, "L4", 24, &[])).collect(),
        binding: Binding::Dra { shareable: true },
    };
    let mut e = Engine::new(&inv(vec![nvswitch_node("a-h100", 8, "H100", 80), l4]));
    let p = e
        .place(&req("ns/tp4", 0, 18.0, 4, Sharing::Exclusive))
        .unwrap();
    assert_eq!(p.node, "b-l4", "{p:?}");
    assert!(!p.nvlink);
}

/// A node bound by `binding`, of two 24 GiB L4s.
fn bound_node(name: &str, binding: Binding) -> NodeGpus {
    NodeGpus {
        binding,
        ..paired_node(name, 2, "L4", 24)
    }
}

#[test]
fn each_binding_takes_only_what_it_can_bind_and_says_why_not() {
    let plain = Binding::DevicePlugin {
        whole: true,
        sharing: None,
    };
    let sliced = Binding::DevicePlugin {
        whole: false,
        sharing: Some("nvidia.com/gpu.shared".into()),
    };
    // A shared replica: not on a plain device-plugin node, nor on a DRA node without
    // shareable devices.
    let mut e = Engine::new(&inv(vec![
        bound_node("a", plain.clone()),
        bound_node("b", Binding::Dra { shareable: false }),
    ]));
    let r = e
        .place(&req("ns/s", 0, 4.0, 1, Sharing::Shared))
        .unwrap_err();
    assert_eq!(r.reason, RefusalReason::BindingUnavailable, "{r}");
    assert!(r.message.contains("sharing"), "{r}");
    // An exclusive replica: not where the plugin offers only shares.
    let mut e = Engine::new(&inv(vec![bound_node("c", sliced.clone())]));
    let r = e
        .place(&req("ns/x", 0, 4.0, 1, Sharing::Exclusive))
        .unwrap_err();
    assert_eq!(r.reason, RefusalReason::BindingUnavailable);
    assert!(r.message.contains("no whole GPUs"), "{r}");
    // Through a sharing resource the plugin picks the GPU: a share must fit on every
    // GPU of the node, so once one GPU is too full the node takes no more.
    let p = e.place(&req("ns/s", 0, 20.0, 1, Sharing::Shared)).unwrap();
    assert!(!p.dra);
    let r = e.place(&req("ns/s", 1, 20.0, 1, Sharing::Shared));
    assert!(r.is_err(), "the plugin may put it on the full GPU: {r:?}");
    assert!(e.place(&req("ns/s", 2, 4.0, 1, Sharing::Shared)).is_ok());
    // On a DRA node the claim names the GPU, so the second share goes to the free one.
    let mut e = Engine::new(&inv(vec![bound_node(
        "d",
        Binding::Dra { shareable: true },
    )]));
    let p0 = e.place(&req("ns/s", 0, 20.0, 1, Sharing::Shared)).unwrap();
    let p1 = e.place(&req("ns/s", 1, 20.0, 1, Sharing::Shared)).unwrap();
    assert!(p0.dra && p1.dra);
    assert_ne!(p0.gpus, p1.gpus);
}
