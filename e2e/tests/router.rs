//! The request router end to end: a deployment at zero replicas, requests held by the
//! router while the operator (reading the router's held count) starts a replica, every
//! request answered, and the deployment back at zero once idle.

use std::time::{Duration, Instant};

use gpuscale_e2e::{smollm, Env};
use gpuscale_sim::nodes::SimNode;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";

/// Creation to Ready of a pod, from its status (whole seconds, as Kubernetes keeps
/// timestamps).
fn ready_seconds(p: &Pod) -> Option<f64> {
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
    Some(ready.duration_since(created).as_secs_f64())
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
    let ready = pods
        .iter()
        .filter_map(ready_seconds)
        .reduce(f64::min)
        .expect("a replica is ready");
    let first = answers.iter().map(|a| a.1).min().unwrap();
    eprintln!(
        "scale from zero: replica ready {ready:.0} s after its creation; first answer {:.2} s \
         after the request (statuses {:?})",
        first.as_secs_f64(),
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
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
    // The wait is the replica's start plus the operator's reaction (a pass a second,
    // reading the router each second) and the answer itself: within 5 s of the start.
    assert!(
        first.as_secs_f64() < ready + 5.0,
        "first answer after {first:?}, the replica took {ready} s"
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
