//! Picking a replica: the one holding the longest cached prefix of the prompt, unless
//! that would overload it, else the least loaded. Pure: loads and matches are passed in.
//!
//! The load bound is that of consistent hashing with bounded loads (Mirrokni, Thorup
//! and Zadimoghaddam, 2018), as the vLLM router and llm-d's scorers apply it to prefix
//! affinity: a replica may take a request for its cache only while its outstanding work
//! is within `(1 + ε)` of the mean plus one. A hot system prompt therefore spreads over
//! more replicas as it gets hotter instead of queueing on the first one that saw it.

use std::fmt;

/// The slack of the load bound.
pub const EPSILON: f64 = 0.25;

/// One replica that could take the request.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Outstanding requests: the router's own in flight plus what other routers sent it
    /// (from the worker's scraped queue depth).
    pub load: f64,
    /// Requests it can have outstanding before it counts as saturated.
    pub capacity: f64,
    /// Leading prompt blocks it was sent before.
    pub matched: usize,
}

/// Why a replica was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// It holds the longest cached prefix and is within the load bound.
    Prefix,
    /// The least loaded (no replica holds any of the prompt's blocks).
    LeastLoaded,
    /// The replica holding the prefix is over the load bound: least loaded instead.
    PrefixOverBound,
}

impl Reason {
    /// The label used in headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Prefix => "prefix",
            Reason::LeastLoaded => "least-loaded",
            Reason::PrefixOverBound => "prefix-over-bound",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The index of the replica to send the request to and why; `None` when every
/// candidate is saturated (the request is held).
pub fn choose(candidates: &[Candidate]) -> Option<(usize, Reason)> {
    let open: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].load < candidates[i].capacity)
        .collect();
    let least = *open.iter().min_by(|&&a, &&b| {
        let (ca, cb) = (&candidates[a], &candidates[b]);
        // Least loaded relative to capacity, then the lower index (stable).
        (ca.load / ca.capacity)
            .total_cmp(&(cb.load / cb.capacity))
            .then(a.cmp(&b))
    })?;
    // The bound is over every replica, saturated ones included: it is about spreading
    // the deployment's work, not only the open replicas'.
    let mean = candidates.iter().map(|c| c.load).sum::<f64>() / candidates.len() as f64;
    let bound = (1.0 + EPSILON) * mean + 1.0;
    let best = open
        .iter()
        .copied()
        .filter(|&i| candidates[i].matched > 0)
        .max_by(|&a, &b| {
            let (ca, cb) = (&candidates[a], &candidates[b]);
            ca.matched
                .cmp(&cb.matched)
                .then(cb.load.total_cmp(&ca.load))
                .then(b.cmp(&a))
        });
    Some(match best {
        Some(i) if candidates[i].load <= bound => (i, Reason::Prefix),
        Some(_) => (least, Reason::PrefixOverBound),
        None => (least, Reason::LeastLoaded),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(load: f64, matched: usize) -> Candidate {
        Candidate {
            load,
            capacity: 16.0,
            matched,
        }
    }

    #[test]
    fn the_longest_prefix_wins_within_the_bound() {
        let cs = [c(1.0, 2), c(0.0, 0), c(2.0, 5)];
        assert_eq!(choose(&cs), Some((2, Reason::Prefix)));
    }

    #[test]
    fn an_overloaded_prefix_holder_yields_to_the_least_loaded() {
        // Mean 4, bound 6: the holder at 12 is over it.
        let cs = [c(12.0, 8), c(0.0, 0), c(0.0, 0)];
        assert_eq!(choose(&cs), Some((1, Reason::PrefixOverBound)));
    }

    #[test]
    fn without_a_match_the_least_loaded_relative_to_capacity() {
        let mut big = c(4.0, 0);
        big.capacity = 64.0;
        let cs = [c(2.0, 0), big];
        assert_eq!(choose(&cs), Some((1, Reason::LeastLoaded)));
    }

    #[test]
    fn every_replica_saturated_means_hold() {
        assert_eq!(choose(&[c(16.0, 3), c(20.0, 0)]), None);
        assert_eq!(choose(&[]), None);
    }

    proptest! {
        /// Whatever the loads and matches: the pick is open, a prefix pick is within the
        /// bound and has the longest match among open replicas, and any other pick is a
        /// least-loaded open replica.
        #[test]
        fn picks_respect_the_bound_and_capacity(
            cs in proptest::collection::vec((0u32..40, 0usize..6), 1..8)
        ) {
            let cs: Vec<Candidate> = cs.iter().map(|&(l, m)| c(f64::from(l), m)).collect();
            let open: Vec<&Candidate> = cs.iter().filter(|c| c.load < c.capacity).collect();
            match choose(&cs) {
                None => prop_assert!(open.is_empty()),
                Some((i, reason)) => {
                    let p = &cs[i];
                    prop_assert!(p.load < p.capacity);
                    let mean = cs.iter().map(|c| c.load).sum::<f64>() / cs.len() as f64;
                    let min = open.iter().map(|c| c.load).fold(f64::MAX, f64::min);
                    match reason {
                        Reason::Prefix => {
                            prop_assert!(p.load <= (1.0 + EPSILON) * mean + 1.0);
                            prop_assert!(open.iter().all(|o| o.matched <= p.matched));
                        }
                        _ => prop_assert_eq!(p.load, min),
                    }
                }
            }
        }
    }
}
