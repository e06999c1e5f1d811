//! Held requests get replicas in arrival order, and a new request does not pass them.
//! On a current-thread runtime, so the moment a slot frees is under the test's control.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use gpuscale_router::table::Table;
use gpuscale_router::{HoldConfig, Router};
use serde_json::json;

fn one_replica_of_capacity_two() -> Table {
    let d = serde_json::from_value(json!({
        "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"model": {"name": "m", "source": "file:///models/m.gguf"},
                 "resources": {"maxBatchSize": 1}}
    }))
    .unwrap();
    let pod = serde_json::from_value(json!({
        "metadata": {"name": "m-0", "namespace": "default",
                     "labels": {"gpuscale.dev/deployment": "m", "gpuscale.dev/serving": "true"}},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap();
    Table::build(&[Arc::new(d)], &[Arc::new(pod)])
}

#[tokio::test]
async fn held_requests_go_in_arrival_order_and_new_ones_queue_behind_them() {
    let r = Router::new(HoldConfig {
        timeout: Duration::from_secs(30),
        max_held: 10,
    });
    r.set_table(one_replica_of_capacity_two(), true);
    let none = HashSet::new();
    let key = r.table().pool("m").unwrap().key.clone();
    // Two requests fill the replica (two batches of one).
    let t1 = r.route("m", &[], &none, Instant::now()).await.unwrap();
    let t2 = r.route("m", &[], &none, Instant::now()).await.unwrap();
    // A arrives and is held.
    let a = tokio::spawn({
        let r = r.clone();
        async move { r.route("m", &[], &HashSet::new(), Instant::now()).await }
    });
    while r.held(&key) < 1 {
        tokio::task::yield_now().await;
    }
    // A slot frees; before A has run again, C arrives: it must queue behind A, not take
    // the slot.
    drop(t1);
    let mut c = Box::pin(r.route("m", &[], &none, Instant::now()));
    assert!(
        c.as_mut().now_or_never().is_none(),
        "a new request took the slot a held request was waiting for"
    );
    let a = a.await.unwrap().expect("A got the freed slot");
    assert_eq!(a.pod, "m-0");
    // C waits for the next slot, counted as held meanwhile.
    assert!(c.as_mut().now_or_never().is_none());
    assert_eq!(r.held(&key), 1);
    drop(t2);
    let c = tokio::time::timeout(Duration::from_secs(5), c)
        .await
        .expect("C got the next slot")
        .unwrap();
    assert_eq!(c.pod, "m-0");
    assert_eq!(r.held(&key), 0);
}
