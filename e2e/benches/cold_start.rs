//! Ready time of a SmolLM2 replica on the simulator from an http(s) source, with a cold
//! node cache (the replica downloads the model) and a warm one (a second replica on the
//! same node maps the cached file), split into scheduling, download, load and warm-up
//! as the operator records them (issue #16, item 4).
//!
//! ```sh
//! cargo build --release -p gpuscale-inference-worker
//! eval "$(scripts/ensure-tools.sh)"   # GPUSCALE_SMOLLM2_GGUF
//! cargo bench -p gpuscale-e2e --bench cold_start
//! ```
//!
//! The download is from loopback (no network): on a cluster it is bounded by the
//! registry's bandwidth instead; what this shows is that the warm path costs loading
//! only, with no copy of the file.

use std::time::Duration;

use gpuscale_e2e::{smollm, worker_metric, Env};
use gpuscale_sim::nodes::SimNode;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// Seconds of each phase of a ready replica's start.
struct Start {
    total: f64,
    scheduling: f64,
    download: f64,
    load: f64,
    warmup: f64,
    cache_hit: bool,
}

async fn start_of(pod: &Pod) -> Start {
    let created = pod.metadata.creation_timestamp.as_ref().unwrap().0;
    let at = |kind: &str| {
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind && c.status == "True"))
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.duration_since(created).as_secs_f64())
            .unwrap_or(0.0)
    };
    let metric =
        |name: &'static str| async move { worker_metric(pod, name).await.unwrap_or(f64::NAN) };
    let load = metric("gpuscale_worker_model_load_seconds").await;
    let warmup = metric("gpuscale_worker_model_warmup_seconds").await;
    Start {
        total: at("Ready"),
        scheduling: at("PodScheduled"),
        download: metric("gpuscale_worker_model_download_seconds").await,
        load: load - warmup,
        warmup,
        cache_hit: metric("gpuscale_worker_model_cache_hit").await == 1.0,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "SmolLM2-135M Q4_1 (98 MB) from an http source, one simulated node; seconds \
             (total and scheduling from pod timestamps, whole seconds):"
        );
        println!(
            "{:>4} {:>5} {:>8} {:>10} {:>9} {:>7} {:>7} {:>5}",
            "run", "cache", "total", "scheduling", "download", "load", "warmup", "hit"
        );
        let mut ratios = Vec::new();
        for run in 1..=3 {
            let mut env = Env::start(
                &format!("coldstart{run}"),
                vec![SimNode::new("sim-l4", 2, "NVIDIA L4", 24, false)],
            )
            .await
            .unwrap();
            let url = format!(
                "{}/SmolLM2-135M-Instruct.Q4_1.gguf",
                env.sim().unwrap().model_server().url()
            );
            env.apply(&smollm(json!({"spec": {"model": {"source": url},
                "replicas": 1, "scaling": {"autoscale": false, "minReplicas": 1, "maxReplicas": 2}}})))
                .await
                .unwrap();
            let pods = env
                .wait_ready("smollm", 1, Duration::from_secs(120))
                .await
                .unwrap();
            let cold = start_of(&pods[0]).await;
            let api: Api<gpuscale_crds::InferenceDeployment> =
                Api::namespaced(env.client.clone(), &env.namespace);
            api.patch(
                "smollm",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"replicas": 2}})),
            )
            .await
            .unwrap();
            let pods = env
                .wait_ready("smollm", 2, Duration::from_secs(120))
                .await
                .unwrap();
            let second = pods.iter().find(|p| p.name_any() == "smollm-1").unwrap();
            let warm = start_of(second).await;
            for (label, s) in [("cold", &cold), ("warm", &warm)] {
                println!(
                    "{run:>4} {label:>5} {:>8.2} {:>10.2} {:>9.3} {:>7.3} {:>7.3} {:>5}",
                    s.total, s.scheduling, s.download, s.load, s.warmup, s.cache_hit
                );
            }
            ratios.push((warm.download, warm.load + warm.warmup));
        }
        // Pod timestamps are whole seconds (as Kubernetes writes them); the worker's
        // own phases are exact.
        for (dl, load) in &ratios {
            let bound = if dl < load { "loading" } else { "fetching" };
            println!(
                "warm replica: download {dl:.3} s vs load + warm-up {load:.3} s: bound by {bound}"
            );
        }
    });
}
