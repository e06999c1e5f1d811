//! What a pass reads, from stores kept current by watches: the pods gpuscale manages
//! (in a store of its own, `pod_store.rs`), and in kube-runtime reflector stores the
//! Services, claims, nodes, GpuInventories and ResourceSlices. A pass makes no LIST;
//! the API sees one watch per kind plus the operator's writes.
//!
//! A store lags the API by the time a watch event takes to arrive, so a pass can run
//! before the pods the previous pass created are in it. As the ReplicaSet controller does
//! with its "expectations", pods this operator created are remembered until the store
//! shows them (or five minutes pass), and every pass sees them: their GPUs count as taken
//! and their replicas as loading, so a stale store never causes a second placement on
//! the same GPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::inventory::SeenInventory;
use gpuscale_crds::GpuInventory;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;

use super::pod_store::PodStore;
use super::{PodFacts, SeenNode, SeenPod, SeenService};

/// How long a created pod is expected before the store must have shown it: five
/// minutes, the ReplicaSet controller's `ExpectationsTimeout`
/// (kubernetes `pkg/controller/controller_utils.go`). An expectation gone before its
/// pod shows lets the next pass place another replica on the same GPU, and at fleet
/// scale (10,000 pods on 2 cores) the pod watch can lag the first wave of creations
/// by more than the one minute this was; two replicas on one exclusive GPU were seen
/// there. A pod this operator deletes is forgotten at once (`forget_created`).
const EXPECTATION_TTL: Duration = Duration::from_secs(300);

/// One namespace's (or all namespaces') store of a namespaced kind: a kube-runtime
/// reflector store, or the operator's own pod store.
pub(super) trait NamespaceStore: Clone {
    /// What it holds.
    type Item;
    /// `namespace/name`.
    fn get(&self, namespace: &str, name: &str) -> Option<Arc<Self::Item>>;
    /// Waits for the first full list.
    fn wait_until_ready(&self) -> impl std::future::Future<Output = ()> + Send;
}

impl<K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static> NamespaceStore
    for Store<K>
{
    type Item = K;

    fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        Store::get(self, &reflector::ObjectRef::new(name).within(namespace))
    }

    async fn wait_until_ready(&self) {
        // Only fails when the writer is dropped, and then the store stays empty.
        let _ = Store::wait_until_ready(self).await;
    }
}

impl NamespaceStore for PodStore {
    type Item = SeenPod;

    fn get(&self, namespace: &str, name: &str) -> Option<Arc<SeenPod>> {
        PodStore::get(self, namespace, name)
    }

    async fn wait_until_ready(&self) {
        PodStore::wait_until_ready(self).await;
    }
}

/// Stores of a namespaced kind, one per watched namespace (or one for all): the
/// operator watches only the namespaces it serves, so that it needs no cluster-wide
/// access to pods, Services or claims (`--namespace`, the chart's `watchNamespaces`).
/// Reads see the union.
pub(super) struct Scoped<S>(Arc<RwLock<Vec<S>>>);

impl<S> Clone for Scoped<S> {
    fn clone(&self) -> Self {
        Scoped(self.0.clone())
    }
}

impl<S> Default for Scoped<S> {
    fn default() -> Self {
        Scoped(Arc::default())
    }
}

impl<S: NamespaceStore> Scoped<S> {
    fn of(store: S) -> Self {
        let s = Self::default();
        s.add(store);
        s
    }

    /// Adds the store of one more namespace (before the first pass waits on them).
    pub(super) fn add(&self, store: S) {
        self.0.write().expect("scoped lock").push(store);
    }

    fn stores(&self) -> Vec<S> {
        self.0.read().expect("scoped lock").clone()
    }

    /// `namespace/name`, from whichever store holds it.
    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<Arc<S::Item>> {
        self.stores().iter().find_map(|s| s.get(namespace, name))
    }

    async fn wait_until_ready(&self) {
        futures::future::join_all(self.stores().iter().map(S::wait_until_ready)).await;
    }
}

impl Scoped<PodStore> {
    /// Every pod of every namespace's store.
    pub(super) fn state(&self) -> Vec<Arc<SeenPod>> {
        self.stores().iter().flat_map(PodStore::state).collect()
    }

    /// The pods whose controller has UID `uid`, by each store's index: a pass costs
    /// its own replicas, not the fleet's (at 10,000 pods, scans of the whole store
    /// were more than half of the operator's CPU in steady state, `perf`).
    fn owned(&self, uid: &str) -> Vec<Arc<SeenPod>> {
        self.stores().iter().flat_map(|s| s.owned(uid)).collect()
    }
}

/// One owner's pods created and not yet seen, by `namespace/name`, with when each was
/// created.
type Expected = HashMap<String, (SeenPod, Instant)>;

/// The stores a pass reads.
#[derive(Clone)]
pub struct Cache {
    pub(super) pods: Scoped<PodStore>,
    pub(super) nodes: Store<SeenNode>,
    pub(super) inventories: Store<SeenInventory>,
    pub(super) services: Scoped<Store<SeenService>>,
    /// The DRA drivers' ResourceSlices (empty where DRA is off or not served).
    pub(super) slices: Store<ResourceSlice>,
    /// The ResourceClaims of managed replicas.
    pub(super) claims: Scoped<Store<ResourceClaim>>,
    /// Pods created by this operator and not yet seen in `pods`, by their controller's
    /// UID and then `namespace/name`.
    created: Arc<Mutex<HashMap<String, Expected>>>,
    /// Set once every store has had its first full list (see `ready`).
    ready: Arc<tokio::sync::OnceCell<()>>,
}

/// The writers behind a `Cache`'s cluster-wide stores, consumed by the reflectors in
/// `run` (which makes the namespaced stores, one per watched namespace).
pub struct Writers {
    pub(super) nodes: Writer<SeenNode>,
    pub(super) inventories: Writer<SeenInventory>,
    pub(super) slices: Writer<ResourceSlice>,
}

/// The writers of one namespace's (or all namespaces') stores.
pub(super) struct ScopeWriters {
    /// Fed by the pod watch (`PodStore::apply`).
    pub(super) pods: PodStore,
    pub(super) services: Writer<SeenService>,
    pub(super) claims: Writer<ResourceClaim>,
}

fn key(pod: &SeenPod) -> String {
    key_of(pod.namespace_str().unwrap_or_default(), pod.name())
}

fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Cache {
    /// Empty stores fed by watches (`run` starts them), and the writers of the
    /// cluster-wide ones; `run` adds each namespace's with [`Cache::scope`].
    pub fn watched() -> (Cache, Writers) {
        let (nodes, node_writer) = reflector::store();
        let (inventories, inv_writer) = reflector::store_shared(256);
        let (slices, slice_writer) = reflector::store();
        (
            Cache {
                pods: Scoped::default(),
                nodes,
                inventories,
                services: Scoped::default(),
                slices,
                claims: Scoped::default(),
                created: Arc::default(),
                ready: Arc::default(),
            },
            Writers {
                nodes: node_writer,
                inventories: inv_writer,
                slices: slice_writer,
            },
        )
    }

    /// The stores of one more namespace (or of all), and their writers.
    pub(super) fn scope(&self) -> ScopeWriters {
        let pods = PodStore::default();
        let (services, svc_writer) = reflector::store();
        let (claims, claim_writer) = reflector::store();
        self.pods.add(pods.clone());
        self.services.add(services);
        self.claims.add(claims);
        ScopeWriters {
            pods,
            services: svc_writer,
            claims: claim_writer,
        }
    }

    /// Stores holding exactly these objects, and no Service (tests and benchmarks).
    pub fn of(pods: Vec<Pod>, nodes: Vec<Node>, inventories: Vec<GpuInventory>) -> Cache {
        fn filled<K>(items: Vec<K>) -> Store<K>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Default + Eq + std::hash::Hash + Clone,
        {
            let mut w = Writer::default();
            w.apply_watcher_event(&watcher::Event::Init);
            for item in items {
                w.apply_watcher_event(&watcher::Event::InitApply(item));
            }
            w.apply_watcher_event(&watcher::Event::InitDone);
            w.as_reader()
        }
        Cache {
            pods: Scoped::of(PodStore::filled(pods.into_iter().map(SeenPod::from))),
            nodes: filled(nodes.into_iter().map(SeenNode::from).collect()),
            inventories: filled(inventories.into_iter().map(SeenInventory::from).collect()),
            services: Scoped::of(filled(Vec::new())),
            slices: filled(Vec::new()),
            claims: Scoped::of(filled(Vec::new())),
            created: Arc::default(),
            ready: Arc::default(),
        }
    }

    /// The same stores with these ResourceSlices (tests and benchmarks).
    pub fn with_slices(mut self, slices: Vec<ResourceSlice>) -> Cache {
        let mut w = Writer::default();
        w.apply_watcher_event(&watcher::Event::Init);
        for s in slices {
            w.apply_watcher_event(&watcher::Event::InitApply(s));
        }
        w.apply_watcher_event(&watcher::Event::InitDone);
        self.slices = w.as_reader();
        self
    }

    /// Waits until every store has its first full list. Every pass calls it, many at
    /// once at start; only one of them waits on the stores. kube-runtime's
    /// `Store::wait_until_ready` keeps a single waker (a oneshot receiver shared by all
    /// callers), so of several passes waiting together only the last to poll was woken:
    /// the others hung for ever and their deployments were never reconciled.
    pub async fn ready(&self) {
        self.ready
            .get_or_init(|| async {
                let _ = futures::join!(
                    self.pods.wait_until_ready(),
                    self.nodes.wait_until_ready(),
                    self.inventories.wait_until_ready(),
                    self.services.wait_until_ready(),
                    self.slices.wait_until_ready(),
                    self.claims.wait_until_ready()
                );
            })
            .await;
    }

    /// Every managed pod: the store's, plus those created and not in it yet. A copy of
    /// the whole store: for what needs every pod (the placement ledger); a pass's own
    /// replicas are [`Cache::owned`].
    ///
    /// The expectations are read first and the store after. An expectation goes once
    /// the store holds its pod, and the store loses a pod only when it is deleted, so a
    /// pod the first read drops is in the second. The other order (the store copied,
    /// then the expectations of pods it shows dropped) lost any pod the watch added
    /// between the two reads: at fleet scale, with the copy of 10,000 pods taking a
    /// while, two passes 52 ms apart put two replicas on one exclusive GPU that way.
    /// A pod can now be in both: the ledger adopts a replica once.
    pub fn pods(&self) -> Vec<Arc<SeenPod>> {
        let expected: Vec<Arc<SeenPod>> = {
            let mut created = self.created.lock().expect("created lock");
            for expected in created.values_mut() {
                self.still_expected(expected);
            }
            created.retain(|_, e| !e.is_empty());
            created
                .values()
                .flat_map(|e| e.values().map(|(p, _)| Arc::new(p.clone())))
                .collect()
        };
        let mut pods = self.pods.state();
        if !expected.is_empty() {
            let by_name: HashMap<(Option<String>, String), &SeenPod> = expected
                .iter()
                .map(|p| ((p.namespace(), p.name_any()), &**p))
                .collect();
            pods.retain(|s| !superseded(s, &by_name));
        }
        pods.extend(expected);
        pods
    }

    /// The pods whose controller is the object with UID `owner`: the store's (by the
    /// index, so a pass costs its own replicas, not the fleet's), plus those created
    /// and not in it yet (read first, as [`Cache::pods`] says why; each pod once).
    pub fn owned(&self, owner: &str) -> Vec<Arc<SeenPod>> {
        let expected: Vec<SeenPod> = {
            let mut created = self.created.lock().expect("created lock");
            let Some(e) = created.get_mut(owner) else {
                return self.pods.owned(owner);
            };
            self.still_expected(e);
            let pods = e.values().map(|(p, _)| p.clone()).collect();
            if e.is_empty() {
                created.remove(owner);
            }
            pods
        };
        let mut pods = self.pods.owned(owner);
        for p in expected {
            match pods.iter().position(|s| s.name() == p.name()) {
                // The store's is an earlier pod of that name, gone from the API (see
                // `superseded`).
                Some(i) if !same_pod(&pods[i], &p) => pods[i] = Arc::new(p),
                Some(_) => {}
                None => pods.push(Arc::new(p)),
            }
        }
        pods
    }

    /// Drops the expectation a pod watch event settles: the store now holds that pod
    /// (the same UID), or it was deleted. Fed each event after the store applied it, as
    /// the ReplicaSet controller lowers its expectations in its informer's handlers
    /// (`CreationObserved`); a read that misses it here still checks the store.
    pub(super) fn observed(&self, pod: &SeenPod) {
        let Some(owner) = pod.controller_uid() else {
            return;
        };
        let mut created = self.created.lock().expect("created lock");
        let Some(expected) = created.get_mut(owner) else {
            return;
        };
        let k = key(pod);
        if expected.get(&k).is_some_and(|(p, _)| same_pod(pod, p)) {
            expected.remove(&k);
        }
        if expected.is_empty() {
            created.remove(owner);
        }
    }

    /// Drops the expectations the store now shows, or that are older than the TTL: a
    /// lookup in the store's index each (during a fleet's first creations there are
    /// thousands, and a scan of the store per expectation took most of the operator's
    /// CPU).
    fn still_expected(&self, expected: &mut Expected) {
        let now = Instant::now();
        expected.retain(|_, (p, at)| {
            if now.duration_since(*at) >= EXPECTATION_TTL {
                tracing::warn!(pod = %p.name_any(), "a created pod never showed in the pod watch; no longer expected");
                return false;
            }
            // That pod (its UID), not any of its name: a replica made again in the
            // place of one the store still shows is not shown yet.
            self.pods
                .get(p.namespace_str().unwrap_or_default(), p.name())
                .is_none_or(|s| !same_pod(&s, p))
        });
    }

    /// Remembers a pod this operator created (the API's answer to the create).
    pub fn expect_created(&self, pod: Pod) {
        // Kept as the store keeps pods: a fleet's first wave holds thousands of these.
        let pod = SeenPod::from(pod);
        let owner = pod.controller_uid().unwrap_or_default().to_string();
        self.created
            .lock()
            .expect("created lock")
            .entry(owner)
            .or_default()
            .insert(key(&pod), (pod, Instant::now()));
    }

    /// Forgets the expectation of a pod this operator deleted (`act::delete_pod` says
    /// why).
    pub fn forget_created(&self, namespace: &str, name: &str) {
        let key = key_of(namespace, name);
        let mut created = self.created.lock().expect("created lock");
        for expected in created.values_mut() {
            expected.remove(&key);
        }
        created.retain(|_, e| !e.is_empty());
    }

    /// The nodes.
    pub fn nodes(&self) -> Vec<Arc<SeenNode>> {
        self.nodes.state()
    }

    /// The managed Service `namespace/name`, as last seen.
    pub fn service(&self, namespace: &str, name: &str) -> Option<Arc<SeenService>> {
        self.services.get(namespace, name)
    }

    /// The GpuInventories.
    pub fn inventories(&self) -> Vec<Arc<SeenInventory>> {
        self.inventories.state()
    }

    /// The ResourceSlices.
    pub fn slices(&self) -> Vec<Arc<ResourceSlice>> {
        self.slices.state()
    }

    /// Whether the ResourceClaim `namespace/name` exists, as last seen.
    pub fn has_claim(&self, namespace: &str, name: &str) -> bool {
        self.claims.get(namespace, name).is_some()
    }
}

/// Whether the store's pod `s` is an earlier pod of the name of one this operator
/// created since (`expected`, by name; [`same_pod`] is the rule `owned` applies too). A create succeeds only where the name
/// is free, so that earlier pod was gone from the API by then and the store has yet to
/// hear of it: it holds no GPU, and the new one does.
fn superseded(s: &SeenPod, expected: &HashMap<(Option<String>, String), &SeenPod>) -> bool {
    let k = (s.namespace(), s.name_any());
    expected.get(&k).is_some_and(|p| !same_pod(s, p))
}

/// Whether the store's pod `s` is the expected pod `p` (of the same name): the same
/// UID, or any UID where the expectation has none (an object as it was sent, not as
/// the API made it; `expect_created` is given the API's answer).
fn same_pod(s: &SeenPod, p: &SeenPod) -> bool {
    p.uid().is_none() || s.uid() == p.uid()
}

/// Marks a store complete and empty: no watch will ever fill it.
fn never_watched<K>(w: &mut Writer<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    for e in [watcher::Event::Init, watcher::Event::InitDone] {
        w.apply_watcher_event(&e);
    }
}

impl Writers {
    /// Marks the ResourceSlice store complete and empty: the cluster does not serve
    /// DRA, or it is off.
    pub(super) fn without_dra(&mut self) {
        never_watched(&mut self.slices);
    }
}

impl ScopeWriters {
    /// Marks this scope's ResourceClaim store complete and empty (DRA off).
    pub(super) fn without_dra(&mut self) {
        never_watched(&mut self.claims);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    fn pod(name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"}
        }))
        .unwrap()
    }

    /// The pod as the watch reads it.
    fn watched(pod: &Pod) -> super::super::seen::WatchedPod {
        serde_json::from_value(serde_json::to_value(pod).unwrap()).unwrap()
    }

    fn owned_pod(name: &str, owner: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "ownerReferences": [{
                "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
                "name": owner, "uid": format!("uid-{owner}"), "controller": true}]}
        }))
        .unwrap()
    }

    fn names(pods: Vec<Arc<SeenPod>>) -> Vec<String> {
        let mut n: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        n.sort();
        n
    }

    /// A deployment's pods come from the index, with its own expectations, and never
    /// another's.
    #[test]
    fn owned_pods_are_those_of_the_owner_and_its_expectations() {
        let cache = Cache::of(
            vec![owned_pod("a-0", "a"), owned_pod("b-0", "b"), pod("loose")],
            vec![],
            vec![],
        );
        cache.expect_created(owned_pod("a-1", "a"));
        cache.expect_created(owned_pod("b-1", "b"));
        assert_eq!(names(cache.owned("uid-a")), ["a-0", "a-1"]);
        assert_eq!(names(cache.owned("uid-b")), ["b-0", "b-1"]);
        assert!(cache.owned("uid-c").is_empty());
        assert_eq!(cache.pods().len(), 5);
        cache.forget_created("default", "a-1");
        assert_eq!(names(cache.owned("uid-a")), ["a-0"]);
    }

    /// A pod the watch adds while a pass copies the store is in the copy or among the
    /// expectations, never in neither (that gap put two replicas on one GPU). Another
    /// thread applies each new pod to the store while this one reads.
    #[test]
    fn a_created_pod_is_never_missed_while_the_watch_adds_it() {
        let store = PodStore::filled(
            (0..10_000).map(|i| SeenPod::from(owned_pod(&format!("old-{i}"), "b"))),
        );
        let cache = Cache::of(vec![], vec![], vec![]);
        let cache = Cache {
            pods: Scoped::of(store.clone()),
            ..cache
        };
        let mut missed = 0;
        for i in 0..200 {
            let new = owned_pod(&format!("new-{i}"), "a");
            cache.expect_created(new.clone());
            std::thread::scope(|s| {
                s.spawn(|| store.apply(watcher::Event::Apply(watched(&new))));
                for _ in 0..3 {
                    if !cache.pods().iter().any(|p| p.name_any() == new.name_any()) {
                        missed += 1;
                    }
                }
            });
        }
        assert_eq!(missed, 0, "reads that lost a created pod");
    }

    fn with_uid(mut p: Pod, uid: &str) -> Pod {
        p.metadata.uid = Some(uid.into());
        p
    }

    /// A replica made again while the store still shows the pod it replaced (deleted
    /// in the API, its delete event not here yet) is the one seen, by the pass and by
    /// the placement ledger; its expectation holds until the store has that UID, or
    /// the watch says it was deleted.
    #[test]
    fn a_replica_made_again_is_seen_over_the_earlier_pod_the_store_shows() {
        let old = with_uid(owned_pod("a-0", "a"), "old");
        let cache = Cache::of(vec![old.clone()], vec![], vec![]);
        let new = with_uid(owned_pod("a-0", "a"), "new");
        cache.expect_created(new.clone());
        let uids =
            |pods: Vec<Arc<SeenPod>>| pods.iter().map(|p| p.uid().unwrap()).collect::<Vec<_>>();
        assert_eq!(uids(cache.owned("uid-a")), ["new"]);
        assert_eq!(uids(cache.pods()), ["new"]);
        // Another pod's events settle nothing; that pod's own Apply does.
        cache.observed(&old.clone().into());
        assert_eq!(uids(cache.owned("uid-a")), ["new"]);
        cache.observed(&new.clone().into());
        assert!(cache.created.lock().unwrap().is_empty());
        // Deleted before the store ever showed it: no longer expected either.
        let again = with_uid(owned_pod("a-1", "a"), "again");
        cache.expect_created(again.clone());
        cache.observed(&again.into());
        assert!(cache.created.lock().unwrap().is_empty());
    }

    /// Many passes waiting for the stores together are all woken when they are ready
    /// (kube-runtime's own wait wakes only the last one to poll).
    #[tokio::test]
    async fn every_pass_waiting_for_the_stores_is_woken() {
        let (cache, mut writers) = Cache::watched();
        let mut scope = cache.scope();
        let waiting: Vec<_> = (0..8)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.ready().await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        writers.without_dra();
        scope.without_dra();
        macro_rules! listed {
            ($w:expr) => {
                $w.apply_watcher_event(&watcher::Event::Init);
                $w.apply_watcher_event(&watcher::Event::InitDone);
            };
        }
        scope.pods.apply(watcher::Event::Init);
        scope.pods.apply(watcher::Event::InitDone);
        listed!(writers.nodes);
        listed!(writers.inventories);
        listed!(scope.services);
        for w in waiting {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("a waiting pass was never woken")
                .unwrap();
        }
    }

    #[test]
    fn a_created_pod_is_seen_until_the_store_has_it() {
        let cache = Cache::of(vec![pod("a")], vec![], vec![]);
        cache.expect_created(pod("b"));
        let names = |c: &Cache| {
            let mut n: Vec<String> = c.pods().iter().map(|p| p.name_any()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&cache), ["a", "b"]);
        // Once the store shows it, the expectation goes (no duplicate).
        cache.expect_created(pod("a"));
        assert_eq!(names(&cache), ["a", "b"]);
        assert_eq!(
            cache
                .created
                .lock()
                .unwrap()
                .values()
                .map(HashMap::len)
                .sum::<usize>(),
            1
        );
        // Deleted before the store showed it: gone at once, not after the TTL.
        cache.forget_created(&pod("b").namespace().unwrap_or_default(), "b");
        assert_eq!(names(&cache), ["a"]);
    }
}
