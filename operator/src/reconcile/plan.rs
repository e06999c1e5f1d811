//! From the replicas that exist and the count wanted to the steps that converge them.
//! Pure. Rules:
//! - failed replicas are deleted (their replacement is a new replica);
//! - a draining replica is deleted once it holds nothing in flight, or its drain timed out;
//! - replicas of the current template are created up to the desired count, with at
//!   most `surge` extra replicas while outdated ones still serve (a rollout);
//! - excess replicas are removed outdated first, loading before ready, then the one
//!   with the least in flight; a loading one is deleted at once, a ready one drained;
//! - a ready replica is never drained while that would leave fewer ready replicas than
//!   desired (a rollout waits for its new replicas to be ready).

/// Lifecycle of a replica as the pod shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Created, not ready yet.
    Loading,
    /// Serving.
    Ready,
    /// Taken out of the Service, finishing its requests.
    Draining {
        /// Whether the drain has run past its timeout.
        timed_out: bool,
    },
    /// Failed, or its node is gone.
    Failed,
}

/// One replica.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    /// Index (the pod is `<deployment>-<index>`).
    pub index: u32,
    /// Phase.
    pub phase: Phase,
    /// Built from an older template.
    pub outdated: bool,
    /// Requests waiting or running, when scraped.
    pub in_flight: Option<f64>,
}

/// One step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Create replica `index` (place it first).
    Create(u32),
    /// Stop sending it traffic and let it finish.
    Drain(u32),
    /// Delete its pod.
    Delete(u32),
}

/// The steps from `replicas` towards `desired` replicas of the current template.
pub fn plan(replicas: &[Replica], desired: u32, surge: u32) -> Vec<Step> {
    let mut steps = Vec::new();
    for r in replicas {
        match r.phase {
            Phase::Failed => steps.push(Step::Delete(r.index)),
            Phase::Draining { timed_out } if timed_out || r.in_flight == Some(0.0) => {
                steps.push(Step::Delete(r.index));
            }
            _ => {}
        }
    }
    let active: Vec<&Replica> = replicas
        .iter()
        .filter(|r| matches!(r.phase, Phase::Loading | Phase::Ready))
        .collect();
    let mut current = active.iter().filter(|r| !r.outdated).count() as u32;
    let mut active_n = active.len() as u32;
    let mut ready_n = active.iter().filter(|r| r.phase == Phase::Ready).count() as u32;

    // Create: the smallest indices no pod uses (draining and failed pods still hold
    // theirs until they are gone, so names never collide).
    let limit = desired + surge.max(1);
    let mut used: Vec<u32> = replicas.iter().map(|r| r.index).collect();
    let mut to_create = desired.saturating_sub(current);
    let any_outdated = active.iter().any(|r| r.outdated);
    if any_outdated {
        to_create = to_create.min(limit.saturating_sub(active_n));
    }
    let mut next = 0;
    for _ in 0..to_create {
        while used.contains(&next) {
            next += 1;
        }
        used.push(next);
        steps.push(Step::Create(next));
        active_n += 1;
        current += 1;
    }

    // Remove the excess.
    let mut victims = active.clone();
    victims.sort_by(|a, b| {
        let key = |r: &Replica| (!r.outdated, r.phase == Phase::Ready);
        key(a)
            .cmp(&key(b))
            .then(
                a.in_flight
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.in_flight.unwrap_or(f64::MAX)),
            )
            .then(b.index.cmp(&a.index))
    });
    let mut excess = active_n.saturating_sub(desired);
    for v in victims {
        if excess == 0 {
            break;
        }
        // A replica of the current template goes only when there are more of them
        // than wanted: during a rollout the excess is the old ones.
        if !v.outdated {
            if current <= desired {
                continue;
            }
            current -= 1;
        }
        if v.phase == Phase::Ready {
            if ready_n <= desired {
                continue;
            }
            ready_n -= 1;
            steps.push(Step::Drain(v.index));
        } else {
            steps.push(Step::Delete(v.index));
        }
        excess -= 1;
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(index: u32, phase: Phase, outdated: bool, in_flight: f64) -> Replica {
        Replica {
            index,
            phase,
            outdated,
            in_flight: Some(in_flight),
        }
    }

    #[test]
    fn creates_missing_replicas_at_the_smallest_free_indices() {
        let have = [r(1, Phase::Ready, false, 0.0)];
        assert_eq!(plan(&have, 3, 1), vec![Step::Create(0), Step::Create(2)]);
        assert_eq!(plan(&have, 1, 1), vec![]);
    }

    #[test]
    fn scale_down_drains_the_least_busy_ready_replica_and_deletes_loading_ones_first() {
        let have = [
            r(0, Phase::Ready, false, 5.0),
            r(1, Phase::Ready, false, 1.0),
            r(2, Phase::Ready, false, 3.0),
        ];
        assert_eq!(plan(&have, 2, 1), vec![Step::Drain(1)]);
        let have = [
            r(0, Phase::Ready, false, 5.0),
            r(1, Phase::Loading, false, 0.0),
        ];
        assert_eq!(plan(&have, 1, 1), vec![Step::Delete(1)]);
    }

    #[test]
    fn a_draining_replica_is_deleted_only_when_empty_or_timed_out() {
        let busy = r(3, Phase::Draining { timed_out: false }, false, 2.0);
        let idle = r(4, Phase::Draining { timed_out: false }, false, 0.0);
        let late = r(5, Phase::Draining { timed_out: true }, false, 2.0);
        let unknown = Replica {
            in_flight: None,
            ..busy.clone()
        };
        let ready = r(0, Phase::Ready, false, 0.0);
        assert_eq!(
            plan(&[ready, busy, idle, late, unknown], 1, 1),
            vec![Step::Delete(4), Step::Delete(5)]
        );
    }

    #[test]
    fn failed_replicas_are_replaced_under_a_new_name() {
        let have = [
            r(0, Phase::Failed, false, 0.0),
            r(1, Phase::Ready, false, 0.0),
        ];
        assert_eq!(plan(&have, 2, 1), vec![Step::Delete(0), Step::Create(2)]);
    }

    #[test]
    fn a_rollout_surges_then_drains_old_replicas_only_as_new_ones_are_ready() {
        let old = |i| r(i, Phase::Ready, true, 1.0);
        // Start: two old replicas; one new one is created (surge 1), nothing drained.
        assert_eq!(plan(&[old(0), old(1)], 2, 1), vec![Step::Create(2)]);
        // The new one loads: wait.
        let loading = r(2, Phase::Loading, false, 0.0);
        assert_eq!(plan(&[old(0), old(1), loading], 2, 1), vec![]);
        // It is ready: drain one old.
        let new2 = r(2, Phase::Ready, false, 0.0);
        assert_eq!(
            plan(&[old(0), old(1), new2.clone()], 2, 1),
            vec![Step::Drain(1)]
        );
        // The old one drains: the next new one is created.
        let draining = r(1, Phase::Draining { timed_out: false }, true, 1.0);
        assert_eq!(
            plan(&[old(0), draining, new2.clone()], 2, 1),
            vec![Step::Create(3)]
        );
        // Both new ready: the last old one drains.
        let new3 = r(3, Phase::Ready, false, 0.0);
        assert_eq!(plan(&[old(0), new2, new3], 2, 1), vec![Step::Drain(0)]);
    }
}
