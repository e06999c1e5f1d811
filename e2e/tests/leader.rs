//! Leader election (operator/src/leader.rs) against the simulated API server.

use gpuscale_operator::leader::{Elector, LeaseConfig};

/// Two candidates against the simulated API server: one leads, the other waits
/// until the lease is released, then takes it.
#[tokio::test]
async fn two_candidates_share_one_lease() {
    let api = gpuscale_sim::api::ApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("gpuscale-leader-{}", std::process::id()));
    api.write_kubeconfig(&dir.join("kubeconfig")).unwrap();
    let client = gpuscale_sim::cluster::client_for(&dir.join("kubeconfig"))
        .await
        .unwrap();
    let mut a = Elector::new(client.clone(), LeaseConfig::new("default", "op", "a"));
    let mut b = Elector::new(client, LeaseConfig::new("default", "op", "b"));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Ok(()));
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Err("a".into()));
    assert_eq!(
        a.try_acquire_or_renew().await.unwrap(),
        Ok(()),
        "the holder renews"
    );
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Err("a".into()));
    a.release().await;
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Ok(()));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Err("b".into()));
}
