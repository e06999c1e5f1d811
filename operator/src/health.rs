//! What the operator's `/healthz` and `/readyz` say, from what its watches and leader
//! election saw: a liveness probe that restarts an operator whose watches have failed
//! for minutes (a restart renews its connections and credentials), and a readiness
//! probe that holds a leader out of its Service until its caches have listed once.
//! A standby replica is live and ready: standing by is its job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long every retry of a watch may fail before the operator is reported not live.
/// The watches retry with backoff on their own; this is for what retries do not heal.
pub const WATCH_FAILING_LIMIT: Duration = Duration::from_secs(300);

/// The operator's health, fed by its watches and its election.
#[derive(Debug, Default)]
pub struct Health {
    /// Each failing watch and when its current run of errors began.
    failing: Mutex<HashMap<&'static str, Instant>>,
    /// The controller runs here (this replica leads, or there is no election).
    leading: AtomicBool,
    /// Every cache of the controller has listed once.
    synced: AtomicBool,
}

impl Health {
    /// One event of the watch `name`: an error starts (or continues) its failing run,
    /// anything else ends it.
    pub fn watched(&self, name: &'static str, ok: bool, now: Instant) {
        let mut failing = self.failing.lock().expect("health lock");
        if ok {
            failing.remove(name);
        } else {
            failing.entry(name).or_insert(now);
        }
    }

    /// This replica started (or stopped) running the controller.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
        if !leading {
            self.synced.store(false, Ordering::Relaxed);
            self.failing.lock().expect("health lock").clear();
        }
    }

    /// The controller's caches have all listed once.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// `/healthz`: an error names each watch failing for longer than `limit`.
    pub fn live(&self, now: Instant, limit: Duration) -> Result<(), String> {
        let failing = self.failing.lock().expect("health lock");
        let mut stuck: Vec<String> = failing
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > limit)
            .map(|(name, since)| {
                format!(
                    "the {name} watch has failed for {} s",
                    now.duration_since(*since).as_secs()
                )
            })
            .collect();
        stuck.sort();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(stuck.join("; "))
        }
    }

    /// `/readyz`: a leader is ready once its caches have listed; a standby always.
    pub fn ready(&self) -> Result<&'static str, String> {
        if !self.leading.load(Ordering::Relaxed) {
            return Ok("standing by");
        }
        if self.synced.load(Ordering::Relaxed) {
            Ok("leading")
        } else {
            Err("leading, but the caches have not listed yet".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_failing_past_the_limit_is_not_live_until_it_recovers() {
        let h = Health::default();
        let t0 = Instant::now();
        h.watched("pods", false, t0);
        // A later error does not restart the run.
        h.watched("pods", false, t0 + Duration::from_secs(200));
        assert!(h
            .live(t0 + Duration::from_secs(299), WATCH_FAILING_LIMIT)
            .is_ok());
        let e = h
            .live(t0 + Duration::from_secs(301), WATCH_FAILING_LIMIT)
            .unwrap_err();
        assert_eq!(e, "the pods watch has failed for 301 s");
        h.watched("pods", true, t0 + Duration::from_secs(302));
        assert!(h
            .live(t0 + Duration::from_secs(900), WATCH_FAILING_LIMIT)
            .is_ok());
    }

    #[test]
    fn a_standby_is_ready_and_a_leader_only_once_synced() {
        let h = Health::default();
        assert_eq!(h.ready(), Ok("standing by"));
        h.set_leading(true);
        assert!(h.ready().is_err());
        h.set_synced();
        assert_eq!(h.ready(), Ok("leading"));
        h.set_leading(false);
        assert_eq!(h.ready(), Ok("standing by"));
        h.set_leading(true);
        assert!(h.ready().is_err(), "a new term lists again");
    }
}
