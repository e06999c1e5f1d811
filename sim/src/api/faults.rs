//! Fault injection for one client of the simulated API server: errors on a share of
//! its writes and watches that end early, the way an API server under load, a
//! restarting etcd member or a load balancer in front of the API behaves.
//!
//! What is injected, and why each is something a real API server does:
//! - **500 before the write is applied**: an internal error (an admission webhook that
//!   failed, a storage error) answers `InternalError` and nothing is stored.
//! - **500 after the write is applied**: the write reached storage but the answer was
//!   lost (the API server timed out waiting on etcd, or the connection broke after the
//!   commit): `the server was unable to return a response in the time allotted, but may
//!   still be processing the request`
//!   (<https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions>:
//!   clients must treat an unknown outcome as possibly applied). This is the fault that
//!   makes a controller that creates by `generateName` or counts its own writes leave
//!   duplicates.
//! - **409 Conflict on updates and patches**: another writer changed the object between
//!   the client's read and its write (optimistic concurrency,
//!   <https://kubernetes.io/docs/reference/using-api/api-concepts/#conflicts>). A real
//!   API server retries a patch without a resourceVersion precondition internally, so
//!   this is harsher than Kubernetes for plain patches, never more lenient.
//! - **A watch that ends early**: the connection closes mid-stream (half the time) or
//!   the server sends `410 Gone` / `Expired` (the other half), which forces a re-list
//!   (<https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes>).
//!
//! Only the requests of `Faults::user` (the `Impersonate-User` a client sends) are
//! affected, so the simulated kubelets and scheduler keep working while the operator
//! is tested.
//!
//! Each kind of write fault is drawn at its share, and also given to the next write
//! it applies to once [`OVERDUE`] writes went without it: a short scenario then meets
//! every kind (one CI run saw 14 faults and no 500-after-apply at 10% each), at the
//! cost of shares a little above those asked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What to inject, and into whose requests.
#[derive(Clone, Debug)]
pub struct Faults {
    /// The `Impersonate-User` whose requests are affected.
    pub user: String,
    /// Share of writes answered 500 without being applied.
    pub error_before: f64,
    /// Share of writes applied and then answered 500.
    pub error_after: f64,
    /// Share of updates and patches answered 409 Conflict without being applied.
    pub conflict: f64,
    /// Mean lifetime of a watch (exponentially distributed); `None`: watches end only
    /// at their timeout.
    pub watch_life: Option<Duration>,
    /// The random generator's seed (the same seed gives the same faults for the same
    /// sequence of requests).
    pub seed: u64,
}

/// What was injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub errors_before: u64,
    pub errors_after: u64,
    pub conflicts: u64,
    pub watches_closed: u64,
    pub watches_expired: u64,
}

/// What happens to one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteFault {
    None,
    ErrorBefore,
    ErrorAfter,
    Conflict,
}

/// How a watch ends early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WatchEnd {
    Close,
    Expire,
}

/// A write fault kind is forced after this many writes without it.
pub const OVERDUE: u32 = 20;

/// Faults being injected: the settings, a seeded generator, and the writes since the
/// last fault of each kind (before, after, conflict).
struct Active {
    faults: Faults,
    rng: fastrand::Rng,
    since: [u32; 3],
}

/// The injector the server consults: settings, a seeded generator, and counts.
#[derive(Default)]
pub(crate) struct Injector {
    state: Mutex<Option<Active>>,
    errors_before: AtomicU64,
    errors_after: AtomicU64,
    conflicts: AtomicU64,
    watches_closed: AtomicU64,
    watches_expired: AtomicU64,
}

impl Injector {
    pub(crate) fn set(&self, faults: Option<Faults>) {
        *self.state.lock().expect("faults lock") = faults.map(|f| Active {
            rng: fastrand::Rng::with_seed(f.seed),
            faults: f,
            since: [0; 3],
        });
    }

    pub(crate) fn counts(&self) -> FaultCounts {
        FaultCounts {
            errors_before: self.errors_before.load(Ordering::Relaxed),
            errors_after: self.errors_after.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            watches_closed: self.watches_closed.load(Ordering::Relaxed),
            watches_expired: self.watches_expired.load(Ordering::Relaxed),
        }
    }

    /// The fault for a write (`verb`) by `user`.
    pub(crate) fn write(&self, user: &str, verb: &str) -> WriteFault {
        let mut state = self.state.lock().expect("faults lock");
        let Some(a) = state.as_mut().filter(|a| a.faults.user == user) else {
            return WriteFault::None;
        };
        let f = &a.faults;
        let x = a.rng.f64();
        let can_conflict = matches!(verb, "update" | "patch");
        let conflict = if can_conflict { f.conflict } else { 0.0 };
        // A kind asked for (share above 0) that is overdue comes now, before any draw.
        let overdue = |k: usize, share: f64| share > 0.0 && a.since[k] >= OVERDUE;
        let fault = if overdue(1, f.error_after) {
            WriteFault::ErrorAfter
        } else if overdue(0, f.error_before) {
            WriteFault::ErrorBefore
        } else if can_conflict && overdue(2, f.conflict) {
            WriteFault::Conflict
        } else if x < f.error_before {
            WriteFault::ErrorBefore
        } else if x < f.error_before + f.error_after {
            WriteFault::ErrorAfter
        } else if x < f.error_before + f.error_after + conflict {
            WriteFault::Conflict
        } else {
            WriteFault::None
        };
        for (k, kind) in [
            WriteFault::ErrorBefore,
            WriteFault::ErrorAfter,
            WriteFault::Conflict,
        ]
        .into_iter()
        .enumerate()
        {
            a.since[k] = if fault == kind { 0 } else { a.since[k] + 1 };
        }
        let counter = match fault {
            WriteFault::None => return fault,
            WriteFault::ErrorBefore => &self.errors_before,
            WriteFault::ErrorAfter => &self.errors_after,
            WriteFault::Conflict => &self.conflicts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        fault
    }

    /// Whether a watch by `user` ends now, and how, checked every `dt`: a watch
    /// ends in each `dt` with probability 1 − e^(−dt/mean), so its lifetime is
    /// exponential with the mean asked for, and watches opened before the faults were
    /// injected are cut as well.
    pub(crate) fn watch_ends(&self, user: &str, dt: Duration) -> Option<WatchEnd> {
        let mut state = self.state.lock().expect("faults lock");
        let a = state.as_mut().filter(|a| a.faults.user == user)?;
        let (f, rng) = (&a.faults, &mut a.rng);
        let mean = f.watch_life?;
        let p = 1.0 - (-dt.as_secs_f64() / mean.as_secs_f64()).exp();
        if rng.f64() >= p {
            return None;
        }
        let end = if rng.bool() {
            WatchEnd::Close
        } else {
            WatchEnd::Expire
        };
        Some(end)
    }

    /// Counts a watch ended as `end`.
    pub(crate) fn ended(&self, end: WatchEnd) {
        match end {
            WatchEnd::Close => &self.watches_closed,
            WatchEnd::Expire => &self.watches_expired,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// The Status an injected 500 answers with.
pub(crate) fn internal_error(after: bool) -> super::ApiError {
    if after {
        super::ApiError::new(
            500,
            "InternalError",
            "the server was unable to return a response in the time allotted, but may \
             still be processing the request (injected fault)",
        )
    } else {
        super::ApiError::new(
            500,
            "InternalError",
            "Internal error occurred: storage unavailable (injected fault)",
        )
    }
}

/// The Status an injected 409 answers with.
pub(crate) fn conflict(kind: &str, name: &str) -> super::ApiError {
    super::ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {kind} \"{name}\": the object has been \
             modified; please apply your changes to the latest version and try again \
             (injected fault)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(user: &str) -> Faults {
        Faults {
            user: user.into(),
            error_before: 0.1,
            error_after: 0.1,
            conflict: 0.1,
            watch_life: Some(Duration::from_secs(2)),
            seed: 7,
        }
    }

    #[test]
    fn only_the_named_user_gets_faults_at_about_the_asked_shares() {
        let i = Injector::default();
        i.set(Some(faults("op")));
        for _ in 0..10_000 {
            assert_eq!(i.write("kubelet", "patch"), WriteFault::None);
        }
        assert_eq!(i.watch_ends("kubelet", Duration::from_secs(100)), None);
        let mut n = [0u32; 4];
        for _ in 0..10_000 {
            n[i.write("op", "patch") as usize] += 1;
        }
        // 10% each (a little more with the overdue ones): inside 8..12% for 10,000.
        for (k, &c) in n.iter().enumerate().skip(1) {
            assert!((800..1200).contains(&c), "fault {k}: {c} of 10000");
        }
        let c = i.counts();
        assert_eq!(
            (c.errors_before, c.errors_after, c.conflicts),
            (n[1] as u64, n[2] as u64, n[3] as u64)
        );
        // A create cannot conflict.
        for _ in 0..1000 {
            assert_ne!(i.write("op", "create"), WriteFault::Conflict);
        }
        // Watch lifetimes, checked every 100 ms, average the mean (2 s).
        let dt = Duration::from_millis(100);
        let lives: Vec<f64> = (0..2000)
            .map(|_| {
                let mut ticks = 1;
                while i.watch_ends("op", dt).is_none() {
                    ticks += 1;
                }
                ticks as f64 * dt.as_secs_f64()
            })
            .collect();
        let mean = lives.iter().sum::<f64>() / lives.len() as f64;
        assert!((1.8..2.3).contains(&mean), "{mean}");
        i.set(None);
        assert_eq!(i.write("op", "patch"), WriteFault::None);
    }

    /// However the draws fall, every kind asked for comes after at most `OVERDUE`
    /// writes without it (one write later per other kind due at the same time), and a
    /// kind not asked for never does.
    #[test]
    fn every_kind_asked_for_comes_within_overdue_writes() {
        for seed in 0..200 {
            let i = Injector::default();
            i.set(Some(Faults {
                error_after: 0.01,
                conflict: 0.0,
                seed,
                ..faults("op")
            }));
            for _ in 0..OVERDUE + 2 {
                i.write("op", "patch");
            }
            let c = i.counts();
            assert!(
                c.errors_before > 0 && c.errors_after > 0,
                "seed {seed}: {c:?}"
            );
            assert_eq!(c.conflicts, 0, "seed {seed}");
        }
    }
}
