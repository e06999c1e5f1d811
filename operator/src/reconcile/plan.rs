//! From the replicas that exist and the count wanted of each version to the steps that
//! converge them. Pure. Rules:
//! - failed replicas are deleted (their replacement is a new replica);
//! - a draining replica is deleted once it is out of every client's endpoint list
//!   and holds nothing in flight, or once its drain timed out;
//! - replicas of each version (the stable one, and a rollout's canary) are created up
//!   to that version's target, canary first, with at most `surge` replicas above the
//!   desired count in all;
//! - excess replicas are removed rolled back first (drained at once), then outdated
//!   (neither stable nor canary), then the stable version's, then the canary's; loading
//!   before ready, then in the fleet's defragmenting order (each exit frees the
//!   largest block of GPU memory it can once the ones before it have gone, so free
//!   memory gathers where a larger model fits), then the one with the least in flight;
//!   a loading one is deleted at once, a ready one drained;
//! - any other ready replica is never drained while that would leave fewer ready
//!   replicas than desired (one fewer with `surge` 0: replace in place), so a rollout
//!   waits for its new replicas to be ready.

/// Lifecycle of a replica as the pod shows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// Created, not ready yet.
    Loading,
    /// Serving.
    Ready,
    /// Taken out of the Service, finishing its requests.
    Draining(Drain),
    /// Failed, or its node is gone.
    Failed,
}

/// How far a drain has gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// Out of the Service too short a time for every client to know: the
    /// EndpointSlice update and each node's kube-proxy sync follow the label change
    /// after a delay, and a request sent meanwhile still arrives. Kept, even empty,
    /// or that request would meet a worker shutting down (503).
    Leaving,
    /// Out of every endpoint list: deleted once it holds nothing in flight.
    Out,
    /// Past the drain timeout (or failed while draining): deleted now.
    TimedOut,
}

/// Which version a replica runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// A canary rolled back: drained at once, whatever the capacity.
    RolledBack,
    /// Neither stable nor canary: an abandoned canary, or a version older than both
    /// (pods made before the operator kept versions). Replaced like a surge rollout.
    Outdated,
    /// The version that serves (`status.rollout.stable`).
    Stable,
    /// A rollout's new version.
    Canary,
}

/// One replica.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    /// Index (the pod is `<deployment>-<index>`).
    pub index: u32,
    /// Phase.
    pub phase: Phase,
    /// Its version.
    pub version: Version,
    /// Requests waiting or running, when scraped.
    pub in_flight: Option<f64>,
    /// Its place in the fleet's defragmenting order, counted from the back: the
    /// highest goes first (`Engine::defragmenting_order`; 0 on the CPU, or where not
    /// computed).
    pub exit_priority: u32,
}

/// One step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Create replica `index` of a version (place it first).
    Create(u32, Version),
    /// Stop sending it traffic and let it finish.
    Drain(u32),
    /// Delete its pod.
    Delete(u32),
}

/// What to converge to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets {
    /// Replicas the autoscaler wants, both versions together.
    pub desired: u32,
    /// Replicas of the stable version.
    pub stable: u32,
    /// Replicas of the canary.
    pub canary: u32,
    /// Replicas allowed above `desired` while versions change (`rollout.maxSurge`).
    pub surge: u32,
}

impl Targets {
    /// One version, `desired` replicas of it.
    pub fn stable(desired: u32, surge: u32) -> Targets {
        Targets {
            desired,
            stable: desired,
            canary: 0,
            surge,
        }
    }

    fn of(&self, v: Version) -> u32 {
        match v {
            Version::RolledBack | Version::Outdated => 0,
            Version::Stable => self.stable,
            Version::Canary => self.canary,
        }
    }
}

/// Between replicas whose exits help the fleet equally, which goes first: the least in
/// flight (unscraped ones last), then the highest index.
pub fn tie_break(a: &Replica, b: &Replica) -> std::cmp::Ordering {
    let busy = |r: &Replica| r.in_flight.unwrap_or(f64::MAX);
    busy(a).total_cmp(&busy(b)).then(b.index.cmp(&a.index))
}

/// Sets `exit_priority` from the fleet's defragmenting order (replica indices, the
/// first to go first, as `Engine::defragmenting_order` gives them); replicas not in
/// it (on no GPU) keep 0 and go after.
pub fn rank_exits(replicas: &mut [Replica], order: &[u32]) {
    let n = order.len() as u32;
    for (rank, index) in order.iter().enumerate() {
        if let Some(r) = replicas.iter_mut().find(|r| r.index == *index) {
            r.exit_priority = n - rank as u32;
        }
    }
}

/// The steps from `replicas` towards `t`.
pub fn plan(replicas: &[Replica], t: &Targets) -> Vec<Step> {
    let mut steps = Vec::new();
    for r in replicas {
        match r.phase {
            Phase::Failed => steps.push(Step::Delete(r.index)),
            Phase::Draining(Drain::TimedOut) => steps.push(Step::Delete(r.index)),
            Phase::Draining(Drain::Out) if r.in_flight == Some(0.0) => {
                steps.push(Step::Delete(r.index));
            }
            _ => {}
        }
    }
    let active: Vec<&Replica> = replicas
        .iter()
        .filter(|r| matches!(r.phase, Phase::Loading | Phase::Ready))
        .collect();
    let count = |v: Version| active.iter().filter(|r| r.version == v).count() as u32;
    let mut have = [
        count(Version::RolledBack),
        count(Version::Outdated),
        count(Version::Stable),
        count(Version::Canary),
    ];
    let mut active_n = active.len() as u32;
    let mut ready_n = active.iter().filter(|r| r.phase == Phase::Ready).count() as u32;

    // Create: the smallest indices no pod uses (draining and failed pods still hold
    // theirs until they are gone, so names never collide).
    let limit = t.desired + t.surge;
    let mut used: Vec<u32> = replicas.iter().map(|r| r.index).collect();
    let mut next = 0;
    for v in [Version::Canary, Version::Stable] {
        let want = t.of(v).saturating_sub(have[v as usize]);
        let room = limit.max(t.stable + t.canary).saturating_sub(active_n);
        for _ in 0..want.min(room) {
            while used.contains(&next) {
                next += 1;
            }
            used.push(next);
            steps.push(Step::Create(next, v));
            active_n += 1;
            have[v as usize] += 1;
        }
    }

    // Remove the excess of each version.
    let mut victims = active.clone();
    victims.sort_by(|a, b| {
        let key = |r: &Replica| (r.version, r.phase == Phase::Ready);
        key(a)
            .cmp(&key(b))
            .then(b.exit_priority.cmp(&a.exit_priority))
            .then(tie_break(a, b))
    });
    let floor = if t.surge == 0 {
        t.desired.saturating_sub(1)
    } else {
        t.desired
    };
    for v in victims {
        let slot = v.version as usize;
        if have[slot] <= t.of(v.version) {
            continue;
        }
        if v.phase == Phase::Ready {
            if v.version != Version::RolledBack && ready_n <= floor {
                continue;
            }
            ready_n -= 1;
            steps.push(Step::Drain(v.index));
        } else {
            steps.push(Step::Delete(v.index));
        }
        have[slot] -= 1;
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(index: u32, phase: Phase, old: bool, in_flight: f64) -> Replica {
        Replica {
            index,
            phase,
            version: if old {
                Version::Outdated
            } else {
                Version::Stable
            },
            in_flight: Some(in_flight),
            exit_priority: 0,
        }
    }

    mod fleet {
        use super::*;
        use crate::estimate::GIB;
        use crate::inventory::{Binding, Gpu, Health, Inventory, NodeGpus};
        use crate::placement::{
            Engine, Placement, ReplicaId, Request, Selector, Sharing, SpreadDomain, Strategy,
        };

        /// `nodes` nodes of two L4s (24 GiB), shareable through DRA.
        pub fn engine(nodes: u32) -> Engine {
            let node = |n: u32| NodeGpus {
                name: format!("node-{n}"),
                zone: None,
                gpus: (0..2)
                    .map(|i| Gpu {
                        index: i,
                        uuid: Some(format!("GPU-{n}-{i}")),
                        product: "NVIDIA L4".into(),
                        total_bytes: 24 * GIB,
                        used_outside_bytes: 0,
                        compute_capability: Some((8, 9)),
                        nvlink_peers: Vec::new(),
                        numa_node: None,
                        health: Health::Healthy,
                    })
                    .collect(),
                binding: Binding::Dra { shareable: true },
            };
            Engine::new(&Inventory {
                nodes: (0..nodes).map(node).collect(),
            })
        }

        pub fn id(index: u32) -> ReplicaId {
            ReplicaId {
                deployment: "ns/small".into(),
                index,
            }
        }

        /// Places replica `index` of `gib` GiB on GPU slot `k` (node k / 2, GPU k % 2).
        pub fn adopt(engine: &mut Engine, index: u32, k: usize, gib: u64) {
            engine
                .adopt(Placement {
                    replica: id(index),
                    node: format!("node-{}", k / 2),
                    gpus: vec![(k % 2) as u32],
                    gpu_uuids: vec![format!("GPU-{}-{}", k / 2, k % 2)],
                    bytes_per_gpu: gib * GIB,
                    exclusive: false,
                    nvlink: true,
                    dra: true,
                    product: "NVIDIA L4".into(),
                })
                .unwrap();
        }

        /// A model of `gib` GiB on one GPU.
        pub fn big(gib: u64) -> Request {
            Request {
                replica: ReplicaId {
                    deployment: "ns/big".into(),
                    index: 0,
                },
                need_per_gpu: gib * GIB,
                gpus: 1,
                sharing: Sharing::Shared,
                selector: Selector::default(),
                strategy: Strategy::BinPack,
                spread: SpreadDomain::Node,
                require_nvlink: false,
                avoid_nodes: Vec::new(),
            }
        }

        /// The wave `plan` takes `n` replicas (all ready, equally busy) down to `keep`
        /// with, given the defragmenting order or not, and whether `want` GiB fits after.
        pub fn wave(
            engine: &Engine,
            n: u32,
            keep: u32,
            defragment: bool,
            want: u64,
        ) -> (Vec<Step>, bool) {
            let mut replicas: Vec<Replica> = (0..n)
                .map(|index| r(index, Phase::Ready, false, 1.0))
                .collect();
            if defragment {
                // Asked as the controller asks: in the plan's own tie-break order.
                let mut by_tie = replicas.clone();
                by_tie.sort_by(tie_break);
                let ids: Vec<_> = by_tie.iter().map(|r| id(r.index)).collect();
                let order: Vec<u32> = engine
                    .defragmenting_order(&ids)
                    .iter()
                    .map(|r| r.index)
                    .collect();
                rank_exits(&mut replicas, &order);
            }
            let mut after = engine.clone();
            let steps = plan(&replicas, &Targets::stable(keep, 1));
            for step in &steps {
                let Step::Drain(index) = step else {
                    panic!("{step:?}")
                };
                after.release(&id(*index)).unwrap();
            }
            (steps, after.place(&big(want)).is_ok())
        }
    }

    /// A fragmented fleet: 4 nodes x 2 L4 (24 GiB), 14 replicas of 8 GiB shared, two
    /// alone on a GPU and the rest paired so that the highest indices sit on different
    /// GPUs. No GPU has 20 GiB free. A wave of three removals: by the old order
    /// (highest index first) every freed block is 16 GiB and a 20 GiB model still does
    /// not fit; in the defragmenting order the two lone replicas go first and it fits.
    #[test]
    fn a_scale_down_wave_that_defragments_makes_room_for_a_model_that_did_not_fit() {
        let mut engine = fleet::engine(4);
        // GPU slot k holds these replicas.
        let slots: [&[u32]; 8] = [
            &[0],
            &[1],
            &[2, 8],
            &[3, 9],
            &[4, 10],
            &[5, 11],
            &[6, 12],
            &[7, 13],
        ];
        for (k, replicas) in slots.iter().enumerate() {
            for &index in *replicas {
                fleet::adopt(&mut engine, index, k, 8);
            }
        }
        assert!(
            engine.clone().place(&fleet::big(20)).is_err(),
            "fragmented: 20 GiB fits nowhere"
        );
        let (steps, fits) = fleet::wave(&engine, 14, 11, false, 20);
        assert_eq!(steps, [Step::Drain(13), Step::Drain(12), Step::Drain(11)]);
        assert!(!fits, "highest index first leaves three 16 GiB blocks");
        let (steps, fits) = fleet::wave(&engine, 14, 11, true, 20);
        assert_eq!(steps[..2], [Step::Drain(1), Step::Drain(0)]);
        assert!(fits, "the two lone replicas go first: whole GPUs free");
    }

    /// Two GPUs, each shared by two 10 GiB replicas, the indices alternating (what the
    /// Spread strategy leaves). Each exit alone frees 14 GiB, all equal, so scoring
    /// each replica once would remove the two highest, one from each GPU, and a 20 GiB
    /// model would still not fit. In the defragmenting order the second exit is the
    /// first one's neighbour, which empties its GPU.
    #[test]
    fn a_wave_empties_a_gpu_two_replicas_share_though_each_exit_alone_frees_half() {
        let mut engine = fleet::engine(1);
        for (index, k) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
            fleet::adopt(&mut engine, index, k, 10);
        }
        let each: Vec<_> = (0..4).map(|i| engine.freed_by(&fleet::id(i))).collect();
        assert!(each.windows(2).all(|w| w[0] == w[1]), "{each:?}");
        let (steps, fits) = fleet::wave(&engine, 4, 2, false, 20);
        assert_eq!(steps, [Step::Drain(3), Step::Drain(2)]);
        assert!(!fits);
        let (steps, fits) = fleet::wave(&engine, 4, 2, true, 20);
        assert_eq!(steps, [Step::Drain(3), Step::Drain(1)]);
        assert!(fits, "GPU 1 emptied");
    }

    #[test]
    fn scale_down_removes_the_replica_whose_exit_frees_the_largest_block_first() {
        let frees = |mut r: Replica, priority: u32| {
            r.exit_priority = priority;
            r
        };
        // The least busy comes last in the defragmenting order; another first.
        let have = [
            frees(r(0, Phase::Ready, false, 1.0), 10),
            frees(r(1, Phase::Ready, false, 4.0), 80),
            frees(r(2, Phase::Ready, false, 2.0), 30),
        ];
        assert_eq!(
            plan(&have, &Targets::stable(1, 1)),
            vec![Step::Drain(1), Step::Drain(2)]
        );
        // Equal priorities (replicas on the CPU): the least busy, as before.
        let have = [
            frees(r(0, Phase::Ready, false, 3.0), 80),
            frees(r(1, Phase::Ready, false, 1.0), 80),
        ];
        assert_eq!(plan(&have, &Targets::stable(1, 1)), vec![Step::Drain(1)]);
    }

    #[test]
    fn creates_missing_replicas_at_the_smallest_free_indices() {
        let have = [r(1, Phase::Ready, false, 0.0)];
        assert_eq!(
            plan(&have, &Targets::stable(3, 1)),
            vec![
                Step::Create(0, Version::Stable),
                Step::Create(2, Version::Stable)
            ]
        );
        assert_eq!(plan(&have, &Targets::stable(1, 1)), vec![]);
    }

    #[test]
    fn scale_down_drains_the_least_busy_ready_replica_and_deletes_loading_ones_first() {
        let have = [
            r(0, Phase::Ready, false, 5.0),
            r(1, Phase::Ready, false, 1.0),
            r(2, Phase::Ready, false, 3.0),
        ];
        assert_eq!(plan(&have, &Targets::stable(2, 1)), vec![Step::Drain(1)]);
        let have = [
            r(0, Phase::Ready, false, 5.0),
            r(1, Phase::Loading, false, 0.0),
        ];
        assert_eq!(plan(&have, &Targets::stable(1, 1)), vec![Step::Delete(1)]);
    }

    #[test]
    fn a_draining_replica_is_deleted_only_when_out_of_endpoints_and_empty_or_timed_out() {
        let busy = r(3, Phase::Draining(Drain::Out), false, 2.0);
        let idle = r(4, Phase::Draining(Drain::Out), false, 0.0);
        let late = r(5, Phase::Draining(Drain::TimedOut), false, 2.0);
        let unknown = Replica {
            in_flight: None,
            ..busy.clone()
        };
        // Empty, but clients may not know yet that it left the Service.
        let leaving = r(6, Phase::Draining(Drain::Leaving), false, 0.0);
        let ready = r(0, Phase::Ready, false, 0.0);
        assert_eq!(
            plan(
                &[ready, busy, idle, late, unknown, leaving],
                &Targets::stable(1, 1)
            ),
            vec![Step::Delete(4), Step::Delete(5)]
        );
    }

    #[test]
    fn failed_replicas_are_replaced_under_a_new_name() {
        let have = [
            r(0, Phase::Failed, false, 0.0),
            r(1, Phase::Ready, false, 0.0),
        ];
        assert_eq!(
            plan(&have, &Targets::stable(2, 1)),
            vec![Step::Delete(0), Step::Create(2, Version::Stable)]
        );
    }

    fn canary(index: u32, phase: Phase) -> Replica {
        Replica {
            version: Version::Canary,
            ..r(index, phase, false, 0.0)
        }
    }

    #[test]
    fn a_canary_step_surges_then_drains_stable_replicas_only_as_canaries_are_ready() {
        let stable = |i| r(i, Phase::Ready, false, 1.0);
        // 2 desired, canary at 50%: one canary, the stable version keeps 2 (surge 1).
        let t = Targets {
            desired: 2,
            stable: 1,
            canary: 1,
            surge: 1,
        };
        assert_eq!(
            plan(&[stable(0), stable(1)], &t),
            vec![Step::Create(2, Version::Canary)]
        );
        // The canary loads: the stable ones stay (capacity never below desired).
        let loading = canary(2, Phase::Loading);
        assert_eq!(plan(&[stable(0), stable(1), loading], &t), vec![]);
        // It is ready: the stable excess drains.
        let ready = canary(2, Phase::Ready);
        assert_eq!(
            plan(&[stable(0), stable(1), ready.clone()], &t),
            vec![Step::Drain(1)]
        );
    }

    #[test]
    fn outdated_replicas_are_replaced_with_a_surge_never_below_capacity() {
        let old = |i| r(i, Phase::Ready, true, 1.0);
        let t = Targets::stable(2, 1);
        assert_eq!(
            plan(&[old(0), old(1)], &t),
            vec![Step::Create(2, Version::Stable)]
        );
        let new = r(2, Phase::Ready, false, 0.0);
        assert_eq!(plan(&[old(0), old(1), new], &t), vec![Step::Drain(1)]);
    }

    #[test]
    fn max_surge_zero_replaces_in_place() {
        let stable = |i| r(i, Phase::Ready, false, 1.0);
        let t = Targets {
            desired: 2,
            stable: 1,
            canary: 1,
            surge: 0,
        };
        // No room above desired: a stable replica drains first, then the canary starts.
        assert_eq!(plan(&[stable(0), stable(1)], &t), vec![Step::Drain(1)]);
        let draining = r(1, Phase::Draining(Drain::Out), false, 1.0);
        assert_eq!(
            plan(&[stable(0), draining], &t),
            vec![Step::Create(2, Version::Canary)]
        );
    }

    #[test]
    fn a_rolled_back_version_is_drained_at_once_and_the_stable_one_restored() {
        let old = |i, phase| Replica {
            version: Version::RolledBack,
            ..r(i, phase, false, 1.0)
        };
        let t = Targets::stable(2, 0);
        assert_eq!(
            plan(
                &[
                    r(0, Phase::Ready, false, 0.0),
                    old(1, Phase::Ready),
                    old(2, Phase::Loading)
                ],
                &t
            ),
            vec![Step::Delete(2), Step::Drain(1)]
        );
    }
}
