//! What a pod costs in the operator's pod store, counted by a global allocator that
//! adds up the bytes asked for (not the allocator's rounding): 10,000 pods as the
//! fleet's hollow kubelet reports them (a replica's labels, its placement, a Running
//! status with four conditions and one container), the fleet's size.
//!
//! A test binary of its own, so that its allocator counts nothing else. Before the pod
//! store was the operator's own (`reconcile/pod_store.rs`), kube-runtime's reflector
//! store with a `SeenPod` holding an `ObjectMeta`, and an index by owner beside it,
//! cost 1,845 bytes a pod here; the bound below is what it must stay under.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use gpuscale_operator::reconcile::{Cache, PodFacts};
use k8s_openapi::api::core::v1::Pod;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter of
// the bytes live is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        LIVE.fetch_add(size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Replica `r` of fleet deployment `d`, as the API serves it once the hollow kubelet
/// has marked it Ready (`sim/src/fleet.rs`).
fn pod(d: usize, r: usize) -> serde_json::Value {
    let now = "2026-12-05T10:00:00Z";
    let deployment = format!("fleet-{d:04}");
    serde_json::json!({
        "metadata": {
            "name": format!("{deployment}-{r}"), "namespace": "default",
            "uid": format!("0b1c2d3e-{d:04}-{r:04}-8f9a-0123456789ab"),
            "resourceVersion": format!("{}", 100_000 + d * 10 + r),
            "generation": 1, "creationTimestamp": now,
            "labels": {
                "app.kubernetes.io/managed-by": "gpuscale",
                "app.kubernetes.io/name": "inference-worker",
                "gpuscale.dev/deployment": deployment, "gpuscale.dev/replica": r.to_string(),
                "gpuscale.dev/template": "0123456789", "gpuscale.dev/serving": "true",
            },
            "annotations": {"gpuscale.dev/placement": format!(
                r#"{{"node":"hollow-{d:04}","gpus":[{r}],"bytesPerGpu":6000000000}}"#)},
            "ownerReferences": [{
                "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
                "name": deployment, "uid": format!("aaaaaaaa-{d:04}-4bbb-8ccc-dddddddddddd"),
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {"nodeName": format!("hollow-{d:04}"),
                 "containers": [{"name": "worker", "image": "gpuscale/inference-worker"}]},
        "status": {
            "phase": "Running", "podIP": format!("127.0.{}.{}", d / 250, r + 1),
            "podIPs": [{"ip": format!("127.0.{}.{}", d / 250, r + 1)}],
            "hostIP": "127.0.0.1", "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
            "containerStatuses": [{
                "name": "worker", "ready": true, "started": true, "restartCount": 0,
                "image": "gpuscale/inference-worker (hollow)", "imageID": "",
                "state": {"running": {"startedAt": now}},
            }],
        },
    })
}

#[test]
fn a_fleet_pod_costs_under_a_kilobyte_in_the_store() {
    let pods: Vec<String> = (0..1_000)
        .flat_map(|d| (0..10).map(move |r| pod(d, r).to_string()))
        .collect();
    let before = LIVE.load(Ordering::Relaxed);
    let parsed: Vec<Pod> = pods
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    // The full pods are dropped once the store has what it keeps of them.
    let cache = Cache::of(parsed, vec![], vec![]);
    let per_pod = (LIVE.load(Ordering::Relaxed) - before) / 10_000;
    eprintln!("the pod store holds {per_pod} bytes a pod");
    // The store holds them all, each deployment's by its index.
    let owned = cache.owned("aaaaaaaa-0042-4bbb-8ccc-dddddddddddd");
    assert_eq!(owned.len(), 10);
    assert!(owned
        .iter()
        .all(|p| p.label("gpuscale.dev/deployment") == Some("fleet-0042")));
    assert_eq!(cache.pods().len(), 10_000);
    assert!(per_pod < 1_000, "{per_pod} bytes a pod");
}
