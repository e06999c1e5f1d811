//! What a pass reads, from kube-runtime reflector stores kept current by watches: the
//! pods and Services gpuscale manages, the nodes and the GpuInventories. A pass makes no LIST; the
//! API sees one watch per kind plus the operator's writes.
//!
//! A store lags the API by the time a watch event takes to arrive, so a pass can run
//! before the pods the previous pass created are in it. As the ReplicaSet controller does
//! with its "expectations", pods this operator created are remembered until the store
//! shows them (or a minute passes), and every pass sees them: their GPUs count as taken
//! and their replicas as loading, so a stale store never causes a second placement on
//! the same GPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpuscale_crds::GpuInventory;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use kube::ResourceExt;

/// How long a created pod is expected before the store must have shown it: five
/// minutes, the ReplicaSet controller's `ExpectationsTimeout`
/// (kubernetes `pkg/controller/controller_utils.go`). An expectation gone before its
/// pod shows lets the next pass place another replica on the same GPU, and at fleet
/// scale (10,000 pods on 2 cores) the pod watch can lag the first wave of creations
/// by more than the one minute this was; two replicas on one exclusive GPU were seen
/// there. A pod this operator deletes is forgotten at once (`forget_created`).
const EXPECTATION_TTL: Duration = Duration::from_secs(300);

/// Stores of a namespaced kind, one per watched namespace (or one for all): the
/// operator watches only the namespaces it serves, so that it needs no cluster-wide
/// access to pods, Services or claims (`--namespace`, the chart's `watchNamespaces`).
/// Reads see the union.
pub(super) struct Scoped<K: kube::Resource<DynamicType = ()> + Clone + 'static>(
    Arc<std::sync::RwLock<Vec<Store<K>>>>,
);

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Clone for Scoped<K> {
    fn clone(&self) -> Self {
        Scoped(self.0.clone())
    }
}

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Scoped<K> {
    fn new() -> Self {
        Scoped(Arc::default())
    }

    fn of(store: Store<K>) -> Self {
        let s = Self::new();
        s.add(store);
        s
    }

    /// Adds the store of one more namespace (before the first pass waits on them).
    pub(super) fn add(&self, store: Store<K>) {
        self.0.write().expect("scoped lock").push(store);
    }

    fn stores(&self) -> Vec<Store<K>> {
        self.0.read().expect("scoped lock").clone()
    }

    /// Every object of every namespace's store.
    pub(super) fn state(&self) -> Vec<Arc<K>> {
        self.stores().iter().flat_map(Store::state).collect()
    }

    /// `namespace/name`, from whichever store holds it.
    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        let key = reflector::ObjectRef::new(name).within(namespace);
        self.stores().iter().find_map(|s| s.get(&key))
    }

    async fn wait_until_ready(&self) {
        futures::future::join_all(self.stores().iter().map(Store::wait_until_ready)).await;
    }
}

/// The stores a pass reads.
#[derive(Clone)]
pub struct Cache {
    pub(super) pods: Scoped<Pod>,
    pub(super) nodes: Store<Node>,
    pub(super) inventories: Store<GpuInventory>,
    pub(super) services: Scoped<Service>,
    /// The DRA drivers' ResourceSlices (empty where DRA is off or not served).
    pub(super) slices: Store<ResourceSlice>,
    /// The ResourceClaims of managed replicas.
    pub(super) claims: Scoped<ResourceClaim>,
    /// Pods created by this operator and not yet seen in `pods`, by `namespace/name`.
    created: Arc<Mutex<HashMap<String, (Pod, Instant)>>>,
    /// Set once every store has had its first full list (see `ready`).
    ready: Arc<tokio::sync::OnceCell<()>>,
}

/// The writers behind a `Cache`'s cluster-wide stores, consumed by the reflectors in
/// `run` (which makes the namespaced stores, one per watched namespace).
pub struct Writers {
    pub(super) nodes: Writer<Node>,
    pub(super) inventories: Writer<GpuInventory>,
    pub(super) slices: Writer<ResourceSlice>,
}

/// The writers of one namespace's (or all namespaces') stores.
pub(super) struct ScopeWriters {
    pub(super) pods: Writer<Pod>,
    pub(super) services: Writer<Service>,
    pub(super) claims: Writer<ResourceClaim>,
}

fn key(pod: &Pod) -> String {
    key_of(&pod.namespace().unwrap_or_default(), &pod.name_any())
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
                pods: Scoped::new(),
                nodes,
                inventories,
                services: Scoped::new(),
                slices,
                claims: Scoped::new(),
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

    /// The stores of one more namespace (or of all), and their writers. The pod store
    /// is shared: the controller's trigger on pod changes reads the same watch.
    pub(super) fn scope(&self) -> ScopeWriters {
        let (pods, pod_writer) = reflector::store_shared(1024);
        let (services, svc_writer) = reflector::store();
        let (claims, claim_writer) = reflector::store();
        self.pods.add(pods);
        self.services.add(services);
        self.claims.add(claims);
        ScopeWriters {
            pods: pod_writer,
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
            pods: Scoped::of(filled(pods)),
            nodes: filled(nodes),
            inventories: filled(inventories),
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

    /// Every managed pod: the store's, plus those created and not in it yet.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let mut pods = self.pods.state();
        let mut created = self.created.lock().expect("created lock");
        let now = Instant::now();
        // A lookup in the store's index per expectation: during a fleet's first
        // creations there are thousands of each, and a scan of the store per expectation
        // took most of the operator's CPU.
        created.retain(|_, (p, at)| {
            now.duration_since(*at) < EXPECTATION_TTL
                && self
                    .pods
                    .get(&p.namespace().unwrap_or_default(), &p.name_any())
                    .is_none()
        });
        pods.extend(created.values().map(|(p, _)| Arc::new(p.clone())));
        pods
    }

    /// Remembers a pod this operator created (the API's answer to the create).
    pub fn expect_created(&self, mut pod: Pod) {
        // Kept as the store keeps pods: a fleet's first wave holds thousands of these.
        super::slim_pod(&mut pod);
        self.created
            .lock()
            .expect("created lock")
            .insert(key(&pod), (pod, Instant::now()));
    }

    /// Forgets the expectation of a pod this operator deleted (`act::delete_pod` says
    /// why).
    pub fn forget_created(&self, namespace: &str, name: &str) {
        self.created
            .lock()
            .expect("created lock")
            .remove(&key_of(namespace, name));
    }

    /// The nodes.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.state()
    }

    /// The managed Service `namespace/name`, as last seen.
    pub fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(namespace, name)
    }

    /// The GpuInventories.
    pub fn inventories(&self) -> Vec<Arc<GpuInventory>> {
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

    fn pod(name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"}
        }))
        .unwrap()
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
        listed!(scope.pods);
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
        assert_eq!(cache.created.lock().unwrap().len(), 1);
        // Deleted before the store showed it: gone at once, not after the TTL.
        cache.forget_created(&pod("b").namespace().unwrap_or_default(), "b");
        assert_eq!(names(&cache), ["a"]);
    }
}
