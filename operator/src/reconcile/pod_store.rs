//! The pod store: every managed pod of one watched namespace (or of all), as a
//! [`SeenPod`], indexed by name and by controller, kept current by the pod watch.
//!
//! Why not kube-runtime's reflector store, which the other kinds use: its objects must
//! be `kube::Resource`s, so each pod kept a whole `ObjectMeta` (360 bytes before its
//! strings), and its key repeated the name, namespace, UID and resourceVersion in
//! strings of their own. At 10,000 pods that store was about 22 MB of the operator's
//! heap. Here a pod is its [`SeenPod`], with what many pods hold alike (namespace,
//! controller, node, label values) shared ([`Interner`]), and the keys share the pod's
//! own name. The index by controller is kept under the same lock, so it never runs
//! ahead of the store or behind it.
//!
//! Events apply as kube-runtime's `Writer::apply_watcher_event` applies them: a
//! relist (`Init`, `InitApply`…, `InitDone`) is gathered aside and swapped in whole at
//! `InitDone`, so that a pod deleted while the watch was down is gone after it, and
//! reads see the old contents until then. The store is ready at its first `InitDone`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::runtime::watcher;

use super::seen::{Interner, WatchedPod};
use super::{PodFacts, SeenPod};

#[derive(Default)]
struct Pods {
    /// By namespace, then name. The keys share the pods' own strings, and a lookup by
    /// `&str` allocates nothing.
    by_name: HashMap<Arc<str>, HashMap<Arc<str>, Arc<SeenPod>>>,
    /// Each controller's pods, by its UID (a deployment's replicas and probes: a scan
    /// of them is short).
    by_controller: HashMap<Arc<str>, Vec<Arc<SeenPod>>>,
}

impl Pods {
    fn insert(&mut self, pod: Arc<SeenPod>) {
        let (namespace, name) = pod.key();
        let names = self.by_name.entry(namespace).or_default();
        if let Some(old) = names.insert(name, pod.clone()) {
            self.unindex(&old);
        }
        if let Some(c) = pod.controller_arc_uid() {
            self.by_controller.entry(c).or_default().push(pod);
        }
    }

    fn remove(&mut self, pod: &SeenPod) -> Option<Arc<SeenPod>> {
        let (namespace, name) = pod.key();
        let names = self.by_name.get_mut(&namespace)?;
        let old = names.remove(&name)?;
        if names.is_empty() {
            self.by_name.remove(&namespace);
        }
        self.unindex(&old);
        Some(old)
    }

    fn unindex(&mut self, old: &Arc<SeenPod>) {
        let Some(c) = old.controller_uid() else {
            return;
        };
        if let Some(pods) = self.by_controller.get_mut(c) {
            pods.retain(|p| !Arc::ptr_eq(p, old));
            if pods.is_empty() {
                self.by_controller.remove(c);
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    live: Pods,
    /// A relist under way: the pods listed so far.
    relisting: Option<Pods>,
    interner: Interner,
}

/// One namespace's (or all namespaces') managed pods. Cheap to clone: clones share it.
#[derive(Clone)]
pub(super) struct PodStore {
    inner: Arc<RwLock<Inner>>,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for PodStore {
    fn default() -> Self {
        PodStore {
            inner: Arc::default(),
            ready: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl PodStore {
    /// A store holding exactly these pods, ready (tests and benchmarks).
    pub(super) fn filled(pods: impl IntoIterator<Item = SeenPod>) -> PodStore {
        let store = PodStore::default();
        store.apply(watcher::Event::Init);
        for pod in pods {
            store.apply_seen(Applied::Listed(pod));
        }
        store.apply(watcher::Event::InitDone);
        store
    }

    /// Applies one event of the pod watch, and gives back the pod it was about (the
    /// one applied or deleted), for the expectations and the controller's trigger.
    pub(super) fn apply(&self, event: watcher::Event<WatchedPod>) -> Option<Arc<SeenPod>> {
        self.apply_seen(match event {
            watcher::Event::Init => Applied::Init,
            watcher::Event::InitApply(p) => Applied::Listed(p.into()),
            watcher::Event::InitDone => Applied::InitDone,
            watcher::Event::Apply(p) => Applied::Apply(p.into()),
            watcher::Event::Delete(p) => Applied::Delete(p.into()),
        })
    }

    fn apply_seen(&self, event: Applied) -> Option<Arc<SeenPod>> {
        let mut inner = self.inner.write().expect("pod store lock");
        let inner = &mut *inner;
        let mut shared = |mut pod: SeenPod| {
            pod.intern(&mut inner.interner);
            Arc::new(pod)
        };
        match event {
            Applied::Init => {
                inner.relisting = Some(Pods::default());
                None
            }
            Applied::Listed(pod) => {
                let pod = shared(pod);
                inner
                    .relisting
                    .get_or_insert_with(Pods::default)
                    .insert(pod.clone());
                Some(pod)
            }
            Applied::InitDone => {
                if let Some(fresh) = inner.relisting.take() {
                    inner.live = fresh;
                }
                self.ready.send_replace(true);
                None
            }
            Applied::Apply(pod) => {
                let pod = shared(pod);
                inner.live.insert(pod.clone());
                Some(pod)
            }
            Applied::Delete(pod) => Some(inner.live.remove(&pod).unwrap_or_else(|| Arc::new(pod))),
        }
    }

    /// Every pod.
    pub(super) fn state(&self) -> Vec<Arc<SeenPod>> {
        let inner = self.inner.read().expect("pod store lock");
        let names = inner.live.by_name.values();
        names.flat_map(HashMap::values).cloned().collect()
    }

    /// The pod `namespace/name`.
    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<Arc<SeenPod>> {
        let inner = self.inner.read().expect("pod store lock");
        inner.live.by_name.get(namespace)?.get(name).cloned()
    }

    /// The pods whose controller has UID `uid`.
    pub(super) fn owned(&self, uid: &str) -> Vec<Arc<SeenPod>> {
        let inner = self.inner.read().expect("pod store lock");
        inner
            .live
            .by_controller
            .get(uid)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for the first full list.
    pub(super) async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }
}

/// An event, its pod already read.
enum Applied {
    Init,
    Listed(SeenPod),
    InitDone,
    Apply(SeenPod),
    Delete(SeenPod),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod of `owner` as the watch reads it.
    fn pod(name: &str, owner: &str) -> WatchedPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                "labels": {"gpuscale.dev/deployment": owner, "gpuscale.dev/replica": "0"},
                "ownerReferences": [{
                    "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
                    "name": owner, "uid": format!("uid-{owner}"), "controller": true}]},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn owned(store: &PodStore, owner: &str) -> Vec<String> {
        let mut names: Vec<String> = store
            .owned(&format!("uid-{owner}"))
            .iter()
            .map(|p| p.name_any())
            .collect();
        names.sort();
        names
    }

    /// The index follows the watch through a relist: a pod deleted while the watch
    /// was down is gone once the relist is done, and not before, from the store and
    /// its index alike.
    #[test]
    fn the_store_and_its_index_follow_a_relist() {
        let store = PodStore::default();
        store.apply(watcher::Event::Apply(pod("a-0", "a")));
        store.apply(watcher::Event::Apply(pod("a-1", "a")));
        assert_eq!(owned(&store, "a"), ["a-0", "a-1"]);
        store.apply(watcher::Event::Init);
        store.apply(watcher::Event::InitApply(pod("a-1", "a")));
        store.apply(watcher::Event::InitApply(pod("a-2", "a")));
        // Until the relist is done, reads see what was there.
        assert_eq!(owned(&store, "a"), ["a-0", "a-1"]);
        assert!(store.get("default", "a-0").is_some());
        store.apply(watcher::Event::InitDone);
        assert_eq!(owned(&store, "a"), ["a-1", "a-2"]);
        assert!(store.get("default", "a-0").is_none());
        store.apply(watcher::Event::Delete(pod("a-1", "a")));
        assert_eq!(owned(&store, "a"), ["a-2"]);
        assert_eq!(store.state().len(), 1);
        let gone = store.apply(watcher::Event::Delete(pod("a-2", "a")));
        assert_eq!(gone.map(|p| p.name_any()).as_deref(), Some("a-2"));
        assert!(store.state().is_empty());
        assert!(store.inner.read().unwrap().live.by_controller.is_empty());
    }

    /// A pod of a name made again under another controller moves in the index, and an
    /// update of a pod replaces it there (no pod is listed twice).
    #[test]
    fn an_update_replaces_the_pod_in_the_index() {
        let store = PodStore::default();
        store.apply(watcher::Event::Apply(pod("x-0", "a")));
        store.apply(watcher::Event::Apply(pod("x-0", "a")));
        assert_eq!(owned(&store, "a"), ["x-0"]);
        store.apply(watcher::Event::Apply(pod("x-0", "b")));
        assert!(owned(&store, "a").is_empty());
        assert_eq!(owned(&store, "b"), ["x-0"]);
        assert_eq!(store.state().len(), 1);
    }

    /// What pods hold alike is kept once (namespace, controller, node, phase, label
    /// keys and values), and the interner drops what no pod holds any more.
    #[test]
    fn pods_share_what_they_hold_alike_and_the_interner_forgets_the_gone() {
        let store = PodStore::default();
        let a = store.apply(watcher::Event::Apply(pod("a-0", "a"))).unwrap();
        let b = store.apply(watcher::Event::Apply(pod("a-1", "a"))).unwrap();
        let same = |x: &Arc<str>, y: &Arc<str>| Arc::ptr_eq(x, y);
        assert!(same(&a.key().0, &b.key().0));
        assert!(same(
            &a.controller_arc_uid().unwrap(),
            &b.controller_arc_uid().unwrap()
        ));
        let node = |p: &SeenPod| p.spec.as_ref().unwrap().node_name.clone().unwrap();
        assert!(same(&node(&a), &node(&b)));
        assert!(a
            .labels()
            .iter()
            .zip(b.labels().iter())
            .all(|(x, y)| { std::ptr::eq(x.0, y.0) && std::ptr::eq(x.1, y.1) }));
        // Thousands of deployments come and go: the interner keeps about what the
        // live pods hold, not every string it ever saw.
        for round in 0..20 {
            for d in 0..200 {
                store.apply(watcher::Event::Apply(pod(
                    &format!("p-{d}"),
                    &format!("d{round}-{d}"),
                )));
            }
        }
        let inner = store.inner.read().unwrap();
        let interned = inner.interner.len();
        // The 202 live pods hold about 400 (a deployment name and a controller each);
        // without the sweep it would hold every one of the 8,000 it saw. A sweep runs
        // once the sets pass twice what the last one kept, plus 1,024.
        assert!(
            interned < 2 * 410 + 1024,
            "{interned} interned for 202 pods"
        );
    }
}
