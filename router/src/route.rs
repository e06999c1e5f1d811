//! The router's shared state and the two things it does with it: pick a replica for a
//! request (`Router::route`), holding the request while none can take it, and account
//! for the request until it finishes (`Ticket`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::pick::{self, Candidate, Reason};
use crate::prefix;
use crate::table::{Key, Table};

/// How requests are held.
#[derive(Clone, Debug)]
pub struct HoldConfig {
    /// How long one request may wait for a replica before it gets 503: long enough
    /// for a GPU replica's cold start (minutes).
    pub timeout: Duration,
    /// Requests held per deployment before more get 429.
    pub max_held: usize,
}

/// A replica the router stopped sending to, briefly, because it refused a connection.
const DOWN_FOR: Duration = Duration::from_secs(2);

/// What the router knows of one replica's load.
#[derive(Debug, Default)]
struct Load {
    /// Requests this router has outstanding there.
    own: u32,
    /// Requests other routers have there: the worker's scraped queue depth less ours.
    others: f64,
    /// Refused a connection: skipped until then.
    down_until: Option<Instant>,
}

/// The router's state, shared by every request.
pub struct Router {
    table: RwLock<Arc<Table>>,
    loads: Mutex<HashMap<String, Load>>,
    index: Mutex<prefix::Index>,
    /// Per deployment, the requests held, by arrival, and whether each waits in line
    /// (a retry does not: see `may_pick`).
    held: Mutex<HashMap<Key, BTreeMap<u64, bool>>>,
    /// Per deployment in a rollout, requests routed so far: the next one goes to the
    /// canary when it carries the count across a whole share (`canary_turn`).
    splits: Mutex<HashMap<Key, u64>>,
    next_seq: AtomicU64,
    /// Woken when a replica may have freed up or appeared.
    changed: Notify,
    synced: AtomicBool,
    hold: HoldConfig,
    pub metrics: Metrics,
}

/// A replica picked for one request; the request counts against it until this drops.
pub struct Ticket {
    router: Arc<Router>,
    pub key: Key,
    pub pod: String,
    pub url: String,
    /// The version the replica runs.
    pub revision: String,
    pub reason: Reason,
    /// Leading prompt blocks the replica had, of `blocks`.
    pub matched: usize,
    pub blocks: usize,
    /// Its load when picked (before this request).
    pub load: f64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(l) = self.router.loads.lock().unwrap().get_mut(&self.pod) {
            l.own = l.own.saturating_sub(1);
        }
        self.router.metrics.in_flight(&self.key, -1);
        self.router.changed.notify_waiters();
    }
}

impl Ticket {
    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    /// The replica refused the connection or failed before answering: others skip it
    /// for a moment.
    pub fn mark_down(&self, now: Instant) {
        if let Some(l) = self.router.loads.lock().unwrap().get_mut(&self.pod) {
            l.down_until = Some(now + DOWN_FOR);
        }
    }
}

/// Why a request got no replica.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// No deployment serves the model.
    UnknownModel,
    /// The hold ran out: 503 with `Retry-After`.
    Timeout { key: Key, retry_after: u64 },
    /// Too many requests held already: 429.
    QueueFull { key: Key, retry_after: u64 },
}

enum Attempt {
    Picked(Ticket),
    Wait { key: Key, retry_after: u64 },
    Unknown,
}

/// A request's place in its deployment's hold queue, while it lives.
struct Held<'a> {
    router: &'a Router,
    key: Key,
    seq: u64,
    since: Instant,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self.router.held.lock().unwrap();
        let n = held.get_mut(&self.key).map_or(0, |q| {
            q.remove(&self.seq);
            q.len()
        });
        drop(held);
        // The next in line may go now.
        self.router.changed.notify_waiters();
        self.router.metrics.set_held(&self.key, n);
        self.router
            .metrics
            .held_for(&self.key, self.since.elapsed().as_secs_f64());
    }
}

impl Router {
    /// A router with an empty table, not yet synced.
    pub fn new(hold: HoldConfig) -> Arc<Router> {
        Arc::new(Router {
            table: RwLock::new(Arc::new(Table::default())),
            loads: Mutex::new(HashMap::new()),
            index: Mutex::new(prefix::Index::default()),
            held: Mutex::new(HashMap::new()),
            splits: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(0),
            changed: Notify::new(),
            synced: AtomicBool::new(false),
            hold,
            metrics: Metrics::new(),
        })
    }

    /// The current table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap().clone()
    }

    /// Takes a new table (the watches saw a change); `synced` once every watch has
    /// listed. Replicas that are gone are forgotten.
    pub fn set_table(&self, table: Table, synced: bool) {
        let live: HashSet<String> = table
            .models()
            .flat_map(|(_, p)| p.replicas.iter().map(|r| r.pod.clone()))
            .collect();
        self.loads
            .lock()
            .unwrap()
            .retain(|pod, l| live.contains(pod) || l.own > 0);
        self.index
            .lock()
            .unwrap()
            .retain(&|pod: &str| live.contains(pod));
        *self.table.write().unwrap() = Arc::new(table);
        if synced {
            self.synced.store(true, Ordering::SeqCst);
        }
        self.changed.notify_waiters();
    }

    /// Whether the table reflects a full list of the cluster.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// A replica's in-flight requests as its worker reported them (all routers').
    pub fn observe_worker(&self, pod: &str, in_flight: f64) {
        let mut loads = self.loads.lock().unwrap();
        let l = loads.entry(pod.to_string()).or_default();
        l.others = (in_flight - f64::from(l.own)).max(0.0);
        drop(loads);
        self.changed.notify_waiters();
    }

    /// Requests held for `key` now.
    pub fn held(&self, key: &Key) -> usize {
        self.held.lock().unwrap().get(key).map_or(0, BTreeMap::len)
    }

    /// Whether a request may take a replica of `key` now: held requests go in arrival
    /// order, and a new one does not pass them (Knative's activator queues the same
    /// way). A request sent again after a failed try is neither held back nor in
    /// line: it left the line once, and a replica it has already tried is none it can
    /// take, so at the front it would stall everyone behind it.
    fn may_pick(&self, key: &Key, held: Option<u64>, retrying: bool) -> bool {
        if retrying {
            return true;
        }
        let queues = self.held.lock().unwrap();
        let first = queues
            .get(key)
            .and_then(|q| q.iter().find(|(_, in_line)| **in_line).map(|(s, _)| *s));
        match (held, first) {
            (_, None) => true,
            (Some(me), Some(first)) => me == first,
            (None, Some(_)) => false,
        }
    }

    /// A replica for a request for `model` whose prompt has `blocks`, skipping `tried`
    /// ones; waits while none can take it, up to the hold timeout from `arrived`.
    pub async fn route(
        self: &Arc<Self>,
        model: &str,
        blocks: &[u64],
        tried: &HashSet<String>,
        arrived: Instant,
    ) -> Result<Ticket, Refusal> {
        let deadline = arrived + self.hold.timeout;
        let mut held: Option<Held<'_>> = None;
        loop {
            // Registered before looking, so a change between the look and the wait is
            // not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let place = held.as_ref().map(|h| h.seq);
            let gate = |key: &Key| self.may_pick(key, place, !tried.is_empty());
            let (key, retry_after) = match self.attempt(model, blocks, tried, now, &gate) {
                Attempt::Picked(t) => return Ok(t),
                Attempt::Unknown if self.synced() => return Err(Refusal::UnknownModel),
                // Not listed yet: a model may exist that this router has not seen.
                Attempt::Unknown => (None, 10),
                Attempt::Wait { key, retry_after } => (Some(key), retry_after),
            };
            if let (None, Some(key)) = (&held, &key) {
                let mut queues = self.held.lock().unwrap();
                let q = queues.entry(key.clone()).or_default();
                if q.len() >= self.hold.max_held {
                    return Err(Refusal::QueueFull {
                        key: key.clone(),
                        retry_after,
                    });
                }
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                q.insert(seq, tried.is_empty());
                self.metrics.set_held(key, q.len());
                drop(queues);
                held = Some(Held {
                    router: self,
                    key: key.clone(),
                    seq,
                    since: now,
                });
                // It may be first in line already (the queue was empty): look again
                // at once rather than wait for a change.
                continue;
            }
            if now >= deadline {
                return Err(Refusal::Timeout {
                    key: key.unwrap_or(Key {
                        namespace: String::new(),
                        name: String::new(),
                    }),
                    retry_after,
                });
            }
            // Woken by a change; at least once a second in case a scrape freed room
            // that no event announced.
            let wait = (deadline - now).min(Duration::from_secs(1));
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }

    fn attempt(
        self: &Arc<Self>,
        model: &str,
        blocks: &[u64],
        tried: &HashSet<String>,
        now: Instant,
        may_pick: &dyn Fn(&Key) -> bool,
    ) -> Attempt {
        let table = self.table();
        let Some(pool) = table.pool(model) else {
            return Attempt::Unknown;
        };
        if !may_pick(&pool.key) {
            return Attempt::Wait {
                key: pool.key.clone(),
                retry_after: pool.retry_after_seconds,
            };
        }
        let mut replicas: Vec<_> = pool
            .replicas
            .iter()
            .filter(|r| !tried.contains(&r.pod))
            .collect();
        // A rollout: this request's version by the exact share. A retry (the client has
        // seen nothing yet) goes to the stable version only: a stable replica that is
        // full or refused must not spill traffic onto the canary past its share.
        // The count is read and advanced under one lock, so concurrent requests never
        // take the same turn (taken before `loads` and `index`, as nowhere else).
        let split = pool.split.as_ref();
        let mut turns = split.map(|_| self.splits.lock().unwrap());
        if let (Some(split), Some(turns)) = (split, &turns) {
            let n = turns.get(&pool.key).copied().unwrap_or(0);
            let canary = tried.is_empty() && canary_turn(n, split.percent);
            let group: Vec<_> = replicas
                .iter()
                .copied()
                .filter(|r| (r.revision == split.canary) == canary)
                .collect();
            // A version with no ready replica takes nothing (the operator routes a share
            // only once its replicas are ready; this covers the moment after).
            if !group.is_empty() {
                replicas = group;
            }
        }
        let mut loads = self.loads.lock().unwrap();
        let index = self.index.lock().unwrap();
        let candidates: Vec<Candidate> = replicas
            .iter()
            .map(|r| {
                let l = loads.get(&r.pod);
                let down = l.and_then(|l| l.down_until).is_some_and(|u| now < u);
                Candidate {
                    load: l.map_or(0.0, |l| f64::from(l.own) + l.others),
                    // A replica that refused a connection is full until it may be retried.
                    capacity: if down { 0.0 } else { pool.capacity },
                    matched: index.matched(&r.pod, blocks),
                }
            })
            .collect();
        drop(index);
        let Some((i, reason)) = pick::choose(&candidates) else {
            return Attempt::Wait {
                key: pool.key.clone(),
                retry_after: pool.retry_after_seconds,
            };
        };
        let r = replicas[i];
        if let Some(turns) = turns.as_mut().filter(|_| tried.is_empty()) {
            *turns.entry(pool.key.clone()).or_default() += 1;
        }
        drop(turns);
        loads.entry(r.pod.clone()).or_default().own += 1;
        drop(loads);
        self.index.lock().unwrap().record(&r.pod, blocks);
        self.metrics.in_flight(&pool.key, 1);
        self.metrics.picked(&pool.key, &r.pod, reason.as_str());
        self.metrics
            .prefix(&pool.key, blocks.len(), candidates[i].matched);
        Attempt::Picked(Ticket {
            router: Arc::clone(self),
            key: pool.key.clone(),
            pod: r.pod.clone(),
            url: r.url.clone(),
            revision: r.revision.clone(),
            reason,
            matched: candidates[i].matched,
            blocks: blocks.len(),
            load: candidates[i].load,
        })
    }
}

/// Whether request `n` (from 0) of a rollout goes to the canary at `percent`: when
/// `(n + 1) · percent / 100` passes a whole number, so any 100 consecutive requests give
/// the canary exactly `percent` of them, spread evenly.
pub fn canary_turn(n: u64, percent: u32) -> bool {
    let p = u64::from(percent.min(100));
    (n + 1) * p / 100 > n * p / 100
}

#[cfg(test)]
mod tests {
    use super::canary_turn;

    #[test]
    fn the_canary_gets_its_exact_share_spread_evenly() {
        for p in [0, 1, 10, 33, 50, 100] {
            let turns: Vec<bool> = (0..100).map(|n| canary_turn(n, p)).collect();
            assert_eq!(turns.iter().filter(|t| **t).count() as u32, p);
        }
        // 10%: one in each ten, not ten in a row.
        let ten: Vec<u64> = (0..100).filter(|n| canary_turn(*n, 10)).collect();
        assert_eq!(ten, vec![9, 19, 29, 39, 49, 59, 69, 79, 89, 99]);
    }
}
