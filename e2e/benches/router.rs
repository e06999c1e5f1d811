//! The request router against a plain Service (round robin over the ready endpoints,
//! as kube-proxy spreads connections), on the simulator with real SmolLM2 workers, the
//! same traffic in one run (issue #17, item 6):
//!
//! (a) shared-prefix chat: four long system prompts, many users; TTFT p50/p99 and
//!     throughput;
//! (b) uneven request sizes (one in five asks for 24x the tokens); p99 latency;
//! (c) scale from zero under a burst: requests lost (must be 0) and the first request's
//!     latency against the replica's ready time.
//!
//! Each of (a) and (b) runs twice per target, alternating (router, Service, router,
//! Service), so the spread between the two runs of one target is the noise.
//!
//! ```sh
//! cargo build --release -p gpuscale-inference-worker
//! eval "$(scripts/ensure-tools.sh)"   # GPUSCALE_SMOLLM2_GGUF
//! cargo bench -p gpuscale-e2e --bench router
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpuscale_e2e::{smollm, Env};
use gpuscale_sim::nodes::SimNode;
use gpuscale_sim::traffic;
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";

/// One request of a workload: when it is sent (seconds from the start) and its body.
struct Req {
    at: f64,
    body: Value,
}

/// What one request gave.
struct Got {
    ok: bool,
    ttft: f64,
    total: f64,
}

/// Sends `reqs` at their times; each goes to `targets[i % n]` (one target: the router).
async fn run(targets: &[String], reqs: &[Req]) -> (Vec<Got>, f64) {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let wait = Duration::from_secs_f64(r.at).saturating_sub(start.elapsed());
        tokio::time::sleep(wait).await;
        let url = format!("{}/v1/chat/completions", targets[i % targets.len()]);
        let (http, body) = (http.clone(), r.body.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let Ok(resp) = http.post(url).json(&body).send().await else {
                return Got {
                    ok: false,
                    ttft: 0.0,
                    total: sent.elapsed().as_secs_f64(),
                };
            };
            let ok = resp.status().is_success();
            let mut stream = resp.bytes_stream();
            let mut ttft = None;
            let mut text = String::new();
            while let Some(chunk) = stream.next().await {
                let Ok(chunk) = chunk else { break };
                text.push_str(&String::from_utf8_lossy(&chunk));
                // The first chunk that carries generated text (the opener carries the
                // role and an empty content).
                if ttft.is_none() && has_text(&text) {
                    ttft = Some(sent.elapsed().as_secs_f64());
                }
            }
            let total = sent.elapsed().as_secs_f64();
            Got {
                ok: ok && text.contains("[DONE]"),
                ttft: ttft.unwrap_or(total),
                total,
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    (out, start.elapsed().as_secs_f64())
}

/// Whether an SSE chat stream so far has a delta with non-empty content.
fn has_text(sse: &str) -> bool {
    const DELTA: &str = "\"delta\":{\"content\":\"";
    sse.match_indices(DELTA)
        .any(|(i, _)| !sse[i + DELTA.len()..].starts_with('"'))
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn chat(system: &str, user: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "stream": true, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "system", "content": system},
                        {"role": "user", "content": user}]})
}

/// (a): four system prompts of about 150 tokens, 40 users' questions, 1.5 requests/s.
fn shared_prefix() -> Vec<Req> {
    let topics = ["billing", "shipping", "returns", "warranty"];
    (0..40)
        .map(|i| {
            let topic = topics[i % topics.len()];
            let system = format!(
                "You are the {topic} assistant of a hardware shop. {}",
                format!("Answer questions about {topic} politely, briefly and precisely, and never invent a policy. ").repeat(8)
            );
            Req {
                at: i as f64 / 1.5,
                body: chat(&system, &format!("Customer {i}: a short question about {topic}?"), 16),
            }
        })
        .collect()
}

/// (b): one request in five asks for 96 tokens, the others for 4; 2 requests/s.
fn uneven() -> Vec<Req> {
    (0..40)
        .map(|i| Req {
            at: i as f64 / 2.0,
            body: chat(
                "You are a helpful assistant.",
                &format!("Request {i}: tell me about GPUs."),
                if i % 5 == 0 { 96 } else { 4 },
            ),
        })
        .collect()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut env = Env::start(
            "routerbench",
            // Two GPUs for the fixed pair, two for the deployment that starts from zero.
            vec![SimNode::new("sim-l4", 4, "NVIDIA L4", 24, false)],
        )
        .await
        .unwrap();
        let router = env.start_router().await.unwrap();
        // Two fixed replicas: the same capacity behind both targets.
        let d = smollm(json!({"spec": {"replicas": 2, "resources": {"maxBatchSize": 4},
            "scaling": {"autoscale": false, "minReplicas": 2, "maxReplicas": 2,
                        "warmReplicas": 0}}}));
        env.apply(&d).await.unwrap();
        env.wait_ready("smollm", 2, Duration::from_secs(180))
            .await
            .unwrap();
        let service = traffic::endpoints(&env.client, &env.namespace, "smollm").await;
        assert_eq!(service.len(), 2, "{service:?}");
        let via_router = vec![router.clone()];
        println!("two SmolLM2 replicas (1 CPU thread each) on a 2-core machine; seconds");

        let workloads: [(&str, Arc<Vec<Req>>); 2] = [
            ("(a) shared-prefix chat", Arc::new(shared_prefix())),
            ("(b) uneven sizes", Arc::new(uneven())),
        ];
        for (name, reqs) in &workloads {
            println!("\n{name}: {} requests", reqs.len());
            println!(
                "{:>8} {:>3} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
                "target", "run", "errors", "ttft50", "ttft99", "lat50", "lat99", "req/s"
            );
            let mut rows: Vec<(&str, f64, f64, f64)> = Vec::new();
            for run_no in 1..=2 {
                for (label, targets) in [("router", &via_router), ("service", &service)] {
                    let (got, secs) = run(targets, reqs).await;
                    let errors = got.iter().filter(|g| !g.ok).count();
                    let ttft: Vec<f64> = got.iter().map(|g| g.ttft).collect();
                    let lat: Vec<f64> = got.iter().map(|g| g.total).collect();
                    let row = (
                        pct(ttft.clone(), 0.5),
                        pct(ttft, 0.99),
                        pct(lat.clone(), 0.5),
                        pct(lat, 0.99),
                    );
                    println!(
                        "{label:>8} {run_no:>3} {errors:>6} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.2}",
                        row.0,
                        row.1,
                        row.2,
                        row.3,
                        got.len() as f64 / secs
                    );
                    rows.push((label, row.1, row.3, row.0));
                }
            }
            for run_no in 0..2 {
                let (r, s) = (rows[2 * run_no], rows[2 * run_no + 1]);
                println!(
                    "  run {}: router/service  ttft p50 {:.2}x  ttft p99 {:.2}x  latency p99 {:.2}x",
                    run_no + 1,
                    r.3 / s.3,
                    r.1 / s.1,
                    r.2 / s.2
                );
            }
        }

        // (c) scale from zero: a second deployment at zero replicas, a burst of 12.
        let z = json!({"apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
            "metadata": {"name": "zero"},
            "spec": {"model": {"name": "smollm-zero",
                               "source": d["spec"]["model"]["source"].clone()},
                     "resources": {"allowCpu": true, "maxBatchSize": 4},
                     "scaling": {"minReplicas": 0, "maxReplicas": 2, "targetQueueDepth": 4}}});
        env.apply(&z).await.unwrap();
        env.wait("the zero deployment sized", Duration::from_secs(60), || async {
            env.deployment("zero").await.ok()?.status?.model?.header.map(|_| ())
        })
        .await
        .unwrap();
        let burst: Vec<Req> = (0..12)
            .map(|i| {
                let mut body = chat("You are terse.", &format!("Number {i}?"), 8);
                body["model"] = json!("smollm-zero");
                Req { at: i as f64 * 0.05, body }
            })
            .collect();
        let (got, _) = run(&via_router, &burst).await;
        assert!(
            got.iter().all(|g| g.total < 120.0),
            "the burst waited for a replica that never came"
        );
        let pods = env.pods("zero").await.unwrap();
        let ready = pods
            .iter()
            .filter_map(|p| {
                let created = p.metadata.creation_timestamp.as_ref()?.0;
                let c = p.status.as_ref()?.conditions.as_ref()?;
                let r = c.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
                Some(r.last_transition_time.as_ref()?.0.duration_since(created).as_secs_f64())
            })
            .reduce(f64::min)
            .unwrap_or(f64::NAN);
        let first = got.iter().map(|g| g.total).fold(f64::MAX, f64::min);
        println!(
            "\n(c) scale from zero, a burst of {} through the router: {} lost; first answer {:.2} s \
             after its request; the first replica was ready {:.0} s after its creation \
             (whole seconds); {} replica(s)",
            got.len(),
            got.iter().filter(|g| !g.ok).count(),
            first,
            ready,
            pods.len()
        );
        println!(
            "    (a plain Service cannot hold requests at zero replicas: all {} would fail)",
            got.len()
        );
    });
}
