//! The request router end to end: a deployment at zero replicas, requests held by the
//! router while the operator (reading the router's held count) starts a replica, every
//! request answered, and the deployment back at zero once idle.

use std::time::{Duration, Instant};

use gpuscale_e2e::{smollm, Env};
use gpuscale_sim::nodes::SimNode;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";

/// When a pod was created and when it became Ready, from its metadata and status (to
/// the second, as Kubernetes keeps timestamps).
fn created_and_ready(p: &Pod) -> Option<(Timestamp, Timestamp)> {
    let created = p.metadata.creation_timestamp.as_ref()?.0;
    let ready = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()?
        .0;
    Some((created, ready))
}

/// How many requests for `deployment` in `namespace` the router has held and released,
/// and their time held in all, in seconds (its `hold_seconds` histogram's count and sum).
async fn holds(url: &str, namespace: &str, deployment: &str) -> (f64, f64) {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the router's metrics parse");
    let value = |metric: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.get("namespace") == Some(namespace)
                    && s.labels.get("deployment") == Some(deployment)
            })
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{metric} for {namespace}/{deployment} in:\n{text}"))
    };
    (
        value("gpuscale_router_hold_seconds_count"),
        value("gpuscale_router_hold_seconds_sum"),
    )
}

async fn ask(url: &str, i: usize) -> (u16, Duration, String) {
    let t = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "max_tokens": 8, "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": format!("Say the number {i}.")}]}))
        .send()
        .await
        .expect("the router answers");
    let status = resp.status().as_u16();
    let route = resp
        .headers()
        .get("x-gpuscale-route")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let _ = resp.bytes().await;
    (status, t.elapsed(), route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_scales_from_zero_through_the_router_and_back_losing_nothing() {
    let mut env = Env::start(
        "router-zero",
        vec![SimNode::new("sim-l4-a", 2, "NVIDIA L4", 24, false)],
    )
    .await
    .unwrap();
    let url = env.start_router().await.unwrap();
    let d = smollm(json!({"spec": {"scaling": {
        "minReplicas": 0, "maxReplicas": 2, "warmReplicas": 0, "targetQueueDepth": 4,
        "scaleDownWindowSeconds": 5, "scaleToZeroAfterSeconds": 10}}}));
    env.apply(&d).await.unwrap();
    // Sized from the header (a probe pod), and no replica.
    env.wait("the model sized", Duration::from_secs(60), || async {
        let st = env.deployment("smollm").await.ok()?.status?;
        st.model?.header.map(|_| ())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.pods("smollm").await.unwrap().is_empty(),
        "minReplicas 0 starts no replica"
    );
    let models: Value = reqwest::get(format!("{url}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");

    // Four requests at zero replicas: held, then all answered by the replica they bring.
    let sent = Instant::now();
    let sent_at = Timestamp::now();
    let asks: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { ask(&url, i).await })
        })
        .collect();
    let mut answers = Vec::new();
    for a in asks {
        answers.push(a.await.unwrap());
    }
    // One replica carries four at targetQueueDepth 4; the panic projection of a step
    // from zero (growth of 4/s) may ask for a second, which maxReplicas bounds.
    let pods = env.pods("smollm").await.unwrap();
    assert!((1..=2).contains(&pods.len()), "{} replicas", pods.len());
    let (created, ready) = pods
        .iter()
        .filter_map(created_and_ready)
        .min_by_key(|&(_, ready)| ready)
        .expect("a replica is ready");
    let first = answers.iter().map(|a| a.1).min().unwrap();
    // Seconds after the requests were sent (timestamps to the nearest second).
    let since_sent = |t: Timestamp| t.duration_since(sent_at).as_secs_f64();
    let (created, ready) = (since_sent(created), since_sent(ready));
    let (held, held_seconds) = holds(&url, &env.namespace, "smollm").await;
    let mean_hold = held_seconds / held;
    eprintln!(
        "scale from zero: replica created {created:.0} s after the requests, ready at \
         {ready:.0} s; {held} requests held {mean_hold:.2} s on average; first answer at \
         {:.2} s (statuses {:?})",
        first.as_secs_f64(),
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert_eq!(held, 4.0, "the router held each of the four requests");
    assert!(
        answers.iter().all(|a| a.0 == 200),
        "every held request answered: {answers:?}"
    );
    let names: Vec<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        answers
            .iter()
            .all(|a| names.iter().any(|n| a.2.starts_with(&format!("pod={n};")))),
        "every answer names the replica that gave it: {answers:?}"
    );
    // The wait is the operator's reaction (a pass a second, reading the router each
    // second), the replica's start, the router's release, and the answer itself. The
    // first two come from the pod's timestamps and the release from the router's own
    // count of time held, so the answer's speed, which is the worker's and the
    // machine's, is left out: bounding the first answer by the replica's Ready plus
    // 5 s failed twice in four runs with this test sharing two cores with three others,
    // and the worker's log showed why: it got the requests within 0.5 s of its ready
    // and took 4.4 and 6.3 s to answer them. The reaction is allowed ten passes; the
    // release the router's watch, its once-a-second look, and a timestamp's rounding.
    assert!(
        created < 10.0,
        "the replica was created {created:.0} s after the requests it was started for"
    );
    assert!(
        mean_hold < ready + 3.0,
        "the requests were held {mean_hold:.2} s on average, the replica ready at {ready:.0} s"
    );
    assert!(sent.elapsed() < Duration::from_secs(120));

    // Idle for scaleToZeroAfterSeconds: back to zero, and the Event says why.
    env.wait("scaled to zero", Duration::from_secs(90), || async {
        env.pods("smollm").await.ok()?.is_empty().then_some(())
    })
    .await
    .unwrap();
    let events = env.events("smollm").await.unwrap();
    assert!(
        events
            .iter()
            .filter_map(|e| e.note.as_deref())
            .any(|n| n.contains("scaled to zero")),
        "{:?}",
        events.iter().map(|e| e.note.clone()).collect::<Vec<_>>()
    );
    // And from zero again.
    let (status, _, _) = ask(&url, 9).await;
    assert_eq!(status, 200);
}
