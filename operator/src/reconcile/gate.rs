//! Places for the passes that run at once, given in the order asked, a spec change
//! first.
//!
//! Why not kube-runtime's own limit (`controller::Config::concurrency`): it holds the
//! requests beyond the limit in a hash set and takes the first it finds there, so under
//! load the same deployments lose every time (the fleet's spec changes waited up to
//! 8 s). Why a second class: a pass asked for by a spec change should not queue behind
//! the periodic passes of every other deployment, as controller-runtime's priority queue
//! puts the items of its periodic resync and initial list behind real changes
//! (`pkg/controller/priorityqueue`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::Stored;
use tokio::sync::oneshot;

/// How often a routine pass that waits looks again at whether its deployment changed.
pub const RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Which queue a pass waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The deployment changed (a spec not yet acted on, or a deletion): first.
    Change,
    /// A periodic pass, or one for a change of a replica.
    Routine,
}

/// The class of a pass over `obj`, as the controller's store shows it: a change while
/// its spec is not yet acted on (`status.observedGeneration` behind
/// `metadata.generation`, or none yet: a new deployment) or it is being deleted.
pub fn class_of(obj: &Stored) -> Class {
    let observed = obj.observed_generation();
    if obj.metadata.deletion_timestamp.is_some() || observed != obj.metadata.generation {
        Class::Change
    } else {
        Class::Routine
    }
}

/// A limit on passes at once, with two FIFO queues.
#[derive(Debug)]
pub struct Gate {
    inner: Arc<Mutex<Queues>>,
}

#[derive(Debug)]
struct Queues {
    free: usize,
    change: VecDeque<oneshot::Sender<Place>>,
    routine: VecDeque<oneshot::Sender<Place>>,
}

/// One place, given back when dropped.
#[derive(Debug)]
pub struct Place {
    /// `None` once the place has gone back (or was never taken by its waiter).
    inner: Option<Arc<Mutex<Queues>>>,
}

impl Gate {
    /// A gate with `places` places (at least one).
    pub fn new(places: usize) -> Gate {
        Gate {
            inner: Arc::new(Mutex::new(Queues {
                free: places.max(1),
                change: VecDeque::new(),
                routine: VecDeque::new(),
            })),
        }
    }

    /// Waits for a place: at once if one is free, else after every pass of `class`
    /// (and, for a routine pass, every change) that asked before.
    pub async fn enter(&self, class: Class) -> Place {
        let rx = {
            let mut q = self.inner.lock().expect("gate lock");
            if q.free > 0 {
                q.free -= 1;
                return Place {
                    inner: Some(self.inner.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            match class {
                Class::Change => q.change.push_back(tx),
                Class::Routine => q.routine.push_back(tx),
            }
            rx
        };
        // The sender is only dropped with a place sent, or with the gate; a waiter
        // dropped here drops the place it may have been sent, which gives it back.
        rx.await.expect("a queued waiter is sent a place")
    }

    /// As `enter`, for a pass whose class can change while it waits (its deployment
    /// changed after the pass was asked for): `class_now` is asked again every
    /// [`RECHECK`], and a routine pass that has become a change moves to the change
    /// queue. (The fleet caught a pass asked for just before a spec change reached the
    /// operator's store: it waited 3 s in the routine queue with the change to act on.)
    pub async fn enter_as(&self, mut class_now: impl FnMut() -> Class) -> Place {
        if class_now() == Class::Change {
            return self.enter(Class::Change).await;
        }
        let routine = self.enter(Class::Routine);
        tokio::pin!(routine);
        loop {
            tokio::select! {
                place = &mut routine => return place,
                () = tokio::time::sleep(RECHECK) => {
                    if class_now() == Class::Change {
                        // The routine place, if sent meanwhile, goes back when dropped.
                        return self.enter(Class::Change).await;
                    }
                }
            }
        }
    }

    /// Passes waiting, of each class.
    #[cfg(test)]
    pub fn waiting(&self) -> (usize, usize) {
        let q = self.inner.lock().expect("gate lock");
        (q.change.len(), q.routine.len())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let mut q = inner.lock().expect("gate lock");
        loop {
            let Some(next) = q.change.pop_front().or_else(|| q.routine.pop_front()) else {
                q.free += 1;
                return;
            };
            let place = Place {
                inner: Some(inner.clone()),
            };
            // A waiter that gave up sends the place back unopened (emptied here, so
            // that its drop does not take the lock held now): the next one gets it.
            match next.send(place) {
                Ok(()) => return,
                Err(mut unused) => unused.inner = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn places_are_limited_and_changes_go_first_each_class_in_order() {
        let gate = Arc::new(Gate::new(2));
        let a = gate.enter(Class::Routine).await;
        let b = gate.enter(Class::Routine).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for (name, class) in [
            ("r1", Class::Routine),
            ("r2", Class::Routine),
            ("c1", Class::Change),
            ("c2", Class::Change),
        ] {
            let (gate, order) = (gate.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let place = gate.enter(class).await;
                order.lock().unwrap().push(name);
                settle().await;
                drop(place);
            }));
            settle().await;
        }
        assert_eq!(gate.waiting(), (2, 2), "two places taken, four wait");
        assert!(order.lock().unwrap().is_empty());
        drop(a);
        drop(b);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["c1", "c2", "r1", "r2"]);
        // Every place came back: two at once again, the third waits.
        let _x = gate.enter(Class::Routine).await;
        let _y = gate.enter(Class::Routine).await;
        let third = tokio::time::timeout(Duration::from_millis(50), gate.enter(Class::Change));
        assert!(third.await.is_err(), "a third place while two are held");
    }

    #[test]
    fn a_spec_not_yet_acted_on_or_a_deletion_is_a_change() {
        let obj = |generation: i64, observed: Option<i64>, deleted: bool| {
            let mut o = Stored::parse(&serde_json::json!({
                "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
                "metadata": {"name": "m", "generation": generation},
                "status": observed.map(|g| serde_json::json!({"observedGeneration": g})),
            }));
            if deleted {
                o.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ));
            }
            o
        };
        assert_eq!(class_of(&obj(2, Some(2), false)), Class::Routine);
        assert_eq!(class_of(&obj(3, Some(2), false)), Class::Change);
        assert_eq!(class_of(&obj(1, None, false)), Class::Change, "new");
        assert_eq!(class_of(&obj(2, Some(2), true)), Class::Change, "deleted");
    }

    #[tokio::test]
    async fn a_routine_pass_whose_deployment_changes_while_it_waits_goes_first() {
        let gate = Arc::new(Gate::new(1));
        let held = gate.enter(Class::Routine).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut waiters = Vec::new();
        for name in ["r1", "r2", "late change"] {
            let (gate, order, changed) = (gate.clone(), order.clone(), changed.clone());
            waiters.push(tokio::spawn(async move {
                let class = move || {
                    if name == "late change" && changed.load(std::sync::atomic::Ordering::SeqCst) {
                        Class::Change
                    } else {
                        Class::Routine
                    }
                };
                let place = gate.enter_as(class).await;
                order.lock().unwrap().push(name);
                settle().await;
                drop(place);
            }));
            settle().await;
        }
        // The third was asked for as routine; its deployment changes now.
        changed.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(RECHECK * 2).await;
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["late change", "r1", "r2"]);
        let again = tokio::time::timeout(Duration::from_millis(200), gate.enter(Class::Routine));
        assert!(again.await.is_ok(), "no place was lost on the way");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_place() {
        let gate = Arc::new(Gate::new(1));
        let held = gate.enter(Class::Routine).await;
        // Gives up while queued.
        let quit = tokio::time::timeout(Duration::from_millis(20), gate.enter(Class::Change));
        assert!(quit.await.is_err());
        // Queued, then dropped after the place was sent but before it was taken.
        let late = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.enter(Class::Routine).await })
        };
        settle().await;
        drop(held);
        late.abort();
        let _ = late.await;
        // The one place is free again.
        let again = tokio::time::timeout(Duration::from_millis(200), gate.enter(Class::Routine));
        assert!(again.await.is_ok(), "the place came back");
        assert_eq!(gate.waiting(), (0, 0));
    }
}
