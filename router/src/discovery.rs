//! Where the table comes from: kube-rs watches of InferenceDeployments and replica pods
//! (in the namespaces the router may serve), and a scrape of each replica's queue depth.

use std::sync::Arc;
use std::time::Duration;

use futures::{future, StreamExt};
use gpuscale_crds::InferenceDeployment;
use gpuscale_operator::reconcile::LABEL_DEPLOYMENT;
use gpuscale_operator::scrape;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};

use crate::route::Router;
use crate::table::Table;

/// Watches deployments and pods in `namespaces` (every namespace when empty) and keeps
/// `router`'s table current. Runs until a watch ends for good.
pub async fn watch(
    client: Client,
    namespaces: Vec<String>,
    router: Arc<Router>,
) -> anyhow::Result<()> {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut deployments: Vec<Store<InferenceDeployment>> = Vec::new();
    let mut pods: Vec<Store<Pod>> = Vec::new();
    let mut streams = Vec::new();
    for (scope, ns) in scopes.iter().enumerate() {
        let (d_api, p_api): (Api<InferenceDeployment>, Api<Pod>) = match ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let (reader, writer) = reflector::store();
        deployments.push(reader);
        streams.push(
            watcher(d_api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .map(move |e| listed(e, 2 * scope))
                .boxed(),
        );
        let (reader, writer) = reflector::store();
        pods.push(reader);
        // Replica pods only: those the operator labelled with their deployment.
        let config = watcher::Config::default().labels(LABEL_DEPLOYMENT);
        streams.push(
            watcher(p_api, config)
                .default_backoff()
                .reflect(writer)
                .map(move |e| listed(e, 2 * scope + 1))
                .boxed(),
        );
    }
    let mut listed_once = vec![false; streams.len()];
    let mut events = futures::stream::select_all(streams);
    while let Some(event) = events.next().await {
        match event {
            Err(e) => {
                // The backoff retries; the table keeps what it had meanwhile.
                tracing::warn!(error = %e, "watch failed; retrying");
                continue;
            }
            Ok(Some(stream)) => listed_once[stream] = true,
            Ok(None) => {}
        }
        let synced = listed_once.iter().all(|&l| l);
        let ds: Vec<_> = deployments.iter().flat_map(|s| s.state()).collect();
        let ps: Vec<_> = pods.iter().flat_map(|s| s.state()).collect();
        let table = Table::build(&ds, &ps);
        for (model, keys) in &table.conflicts {
            tracing::warn!(
                model,
                serving = %keys[0],
                ignored = ?keys[1..].iter().map(ToString::to_string).collect::<Vec<_>>(),
                "several deployments serve one model name; the oldest gets its requests"
            );
        }
        router.set_table(table, synced);
    }
    anyhow::bail!("the watches ended")
}

/// `Some(stream)` when a watch event ends `stream`'s initial list.
fn listed<K>(
    e: Result<watcher::Event<K>, watcher::Error>,
    stream: usize,
) -> anyhow::Result<Option<usize>> {
    Ok(matches!(e?, watcher::Event::InitDone).then_some(stream))
}

/// Scrapes every replica's `/metrics` each `interval`, so the router knows the work
/// other routers sent there.
pub async fn scrape_workers(router: Arc<Router>, http: reqwest::Client, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let table = router.table();
        let replicas: Vec<_> = table
            .models()
            .flat_map(|(_, p)| p.replicas.iter().cloned())
            .collect();
        let reads = replicas.iter().map(|r| {
            let http = http.clone();
            async move {
                let url = format!("{}/metrics", r.url);
                let text = http
                    .get(&url)
                    .timeout(interval)
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                Some((r.pod.clone(), scrape::parse(&url, &text).ok()?.in_flight()))
            }
        });
        for (pod, in_flight) in future::join_all(reads).await.into_iter().flatten() {
            router.observe_worker(&pod, in_flight);
        }
    }
}
