//! The routing table: which deployment serves each model name, and which of its replicas
//! may take a request now. Built from the watched InferenceDeployments and pods, again
//! on every change; pure, so the rules are tested without a cluster.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpuscale_crds::InferenceDeployment;
use gpuscale_crds::RolloutPhase;
use gpuscale_operator::reconcile::{is_ready, LABEL_DEPLOYMENT, LABEL_SERVING, LABEL_TEMPLATE};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// A deployment, as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A replica that takes requests.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    /// Pod name.
    pub pod: String,
    /// `http://ip:port`.
    pub url: String,
    /// The version it runs (its pod-template hash).
    pub revision: String,
}

/// A rollout's traffic split: the canary version's share, in percent.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub canary: String,
    pub percent: u32,
}

/// The deployment serving one model name.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub key: Key,
    /// Ready, serving (not draining), not being deleted.
    pub replicas: Vec<Replica>,
    /// Outstanding requests one replica takes before the router holds the rest: two
    /// batches (`resources.maxBatchSize` running and as many waiting), so a replica never
    /// idles between batches while the router keeps the choice of replica for the rest
    /// as long as it can (late binding, as llm-d's flow control does).
    pub capacity: f64,
    /// What to tell a client in `Retry-After` when its hold runs out: the measured time a
    /// replica takes to start, or 10 s.
    pub retry_after_seconds: u64,
    /// When the deployment was created (RFC 3339), for `/v1/models`.
    pub created: i64,
    /// A rollout in progress: the canary's share (`status.rollout`).
    pub split: Option<Split>,
}

/// Every model the router serves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    pools: BTreeMap<String, Pool>,
    /// Model names served by more than one deployment: the oldest serves it, and this
    /// says which were passed over.
    pub conflicts: Vec<(String, Vec<Key>)>,
}

impl Table {
    /// The table for these deployments and pods.
    pub fn build(deployments: &[Arc<InferenceDeployment>], pods: &[Arc<Pod>]) -> Table {
        let mut ds: Vec<&Arc<InferenceDeployment>> = deployments
            .iter()
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .collect();
        // Oldest first, then by key: the same winner on every router replica.
        ds.sort_by_key(|d| {
            (
                d.metadata.creation_timestamp.as_ref().map(|t| t.0),
                d.namespace(),
                d.name_any(),
            )
        });
        let mut table = Table::default();
        for d in ds {
            let key = Key {
                namespace: d.namespace().unwrap_or_default(),
                name: d.name_any(),
            };
            let model = d.spec.model.name.clone();
            if let Some(winner) = table.pools.get(&model) {
                let passed = vec![winner.key.clone(), key];
                match table.conflicts.iter_mut().find(|(m, _)| *m == model) {
                    Some((_, keys)) => keys.push(passed[1].clone()),
                    None => table.conflicts.push((model, passed)),
                }
                continue;
            }
            let rollout = d.status.as_ref().and_then(|s| s.rollout.as_ref());
            let split = rollout
                .filter(|r| r.phase == RolloutPhase::Progressing && r.canary_weight > 0)
                .and_then(|r| {
                    Some(Split {
                        canary: r.canary.as_ref()?.name.clone(),
                        percent: r.canary_weight.min(100),
                    })
                });
            // A canary takes requests only through its share: none before the operator
            // routes it (its replicas ready, idle and first in line would otherwise take
            // a burst), none once it is rolled back.
            let withheld = rollout
                .and_then(|r| r.canary.as_ref())
                .map(|c| c.name.as_str())
                .filter(|c| split.as_ref().is_none_or(|s| s.canary != *c));
            let replicas = pods
                .iter()
                .filter(|p| p.namespace().as_deref() == Some(key.namespace.as_str()))
                .filter(|p| p.labels().get(LABEL_DEPLOYMENT) == Some(&key.name))
                .filter_map(|p| replica(p, d.spec.worker.port))
                .filter(|r| Some(r.revision.as_str()) != withheld)
                .collect();
            let ready_seconds = d
                .status
                .as_ref()
                .and_then(|s| s.measured_ready_seconds)
                .filter(|s| s.is_finite() && *s > 0.0);
            table.pools.insert(
                model,
                Pool {
                    key,
                    replicas,
                    capacity: f64::from(d.spec.resources.max_batch_size.max(1) * 2),
                    retry_after_seconds: ready_seconds.map_or(10, |s| s.ceil() as u64),
                    created: d
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map_or(0, |t| t.0.as_second()),
                    split,
                },
            );
        }
        table
    }

    /// The pool serving `model`.
    pub fn pool(&self, model: &str) -> Option<&Pool> {
        self.pools.get(model)
    }

    /// Every served model, by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &Pool)> {
        self.pools.iter().map(|(m, p)| (m.as_str(), p))
    }
}

/// `pod` as a replica, if it may take requests: Ready, labelled serving (a drain flips
/// the label first), not being deleted, with an IP. Its port is the one its worker
/// container declares (versions may differ), else the deployment's.
fn replica(pod: &Pod, port: u16) -> Option<Replica> {
    if pod.metadata.deletion_timestamp.is_some()
        || pod.labels().get(LABEL_SERVING).map(String::as_str) != Some("true")
        || !is_ready(pod)
    {
        return None;
    }
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?;
    let port = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref()?.first())
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(port);
    Some(Replica {
        pod: pod.name_any(),
        url: format!("http://{ip}:{port}"),
        revision: pod
            .labels()
            .get(LABEL_TEMPLATE)
            .cloned()
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(ns: &str, name: &str, model: &str, created: &str) -> Arc<InferenceDeployment> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
                "spec": {"model": {"name": model, "source": "file:///models/m.gguf"},
                         "resources": {"maxBatchSize": 4}, "worker": {"port": 9000}},
                "status": {"measuredReadySeconds": 42.3}
            }))
            .unwrap(),
        )
    }

    fn pod(name: &str, deployment: &str, serving: &str, ready: &str, deleting: bool) -> Arc<Pod> {
        let mut meta = json!({"name": name, "namespace": "ml",
            "labels": {LABEL_DEPLOYMENT: deployment, LABEL_SERVING: serving}});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": meta,
                "status": {"podIP": "10.0.0.7",
                           "conditions": [{"type": "Ready", "status": ready}]}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn only_ready_serving_live_replicas_take_requests() {
        let ds = [deployment("ml", "llama", "llama-3", "2026-01-01T00:00:00Z")];
        let pods = [
            pod("llama-0", "llama", "true", "True", false),
            pod("llama-1", "llama", "false", "True", false),
            pod("llama-2", "llama", "true", "False", false),
            pod("llama-3", "llama", "true", "True", true),
            pod("other-0", "other", "true", "True", false),
        ];
        let t = Table::build(&ds, &pods);
        let p = t.pool("llama-3").expect("served");
        assert_eq!(
            p.replicas,
            vec![Replica {
                pod: "llama-0".into(),
                url: "http://10.0.0.7:9000".into(),
                revision: String::new(),
            }]
        );
        assert_eq!(p.capacity, 8.0);
        assert_eq!(p.retry_after_seconds, 43);
        assert!(t.pool("llama-3.1").is_none());
    }

    #[test]
    fn a_model_served_twice_goes_to_the_oldest_deployment_and_says_so() {
        let ds = [
            deployment("b", "new", "m", "2026-02-01T00:00:00Z"),
            deployment("a", "old", "m", "2026-01-01T00:00:00Z"),
        ];
        let t = Table::build(&ds, &[]);
        assert_eq!(t.pool("m").unwrap().key.to_string(), "a/old");
        assert_eq!(t.conflicts.len(), 1);
        assert_eq!(t.conflicts[0].1[1].to_string(), "b/new");
        // A deployment at zero replicas is still served: requests for it are held.
        assert!(t.pool("m").unwrap().replicas.is_empty());
    }

    #[test]
    fn a_rollout_in_progress_splits_by_the_canary_s_version() {
        let mut d = (*deployment("ml", "llama", "llama-3", "2026-01-01T00:00:00Z")).clone();
        let rev = |name: &str| -> gpuscale_crds::Revision {
            serde_json::from_value(json!({"name": name,
                "model": {"name": "llama-3", "source": "file:///models/m.gguf"},
                "resources": {}, "worker": {}, "needBytes": 1}))
            .unwrap()
        };
        let mut status = d.status.clone().unwrap();
        status.rollout = Some(gpuscale_crds::RolloutStatus {
            phase: RolloutPhase::Progressing,
            stable: rev("aaa"),
            canary: Some(rev("bbb")),
            step: 0,
            canary_weight: 10,
            step_asked_at: None,
            step_started_at: None,
            message: None,
        });
        d.status = Some(status.clone());
        let mut p = (*pod("llama-4", "llama", "true", "True", false)).clone();
        p.metadata
            .labels
            .get_or_insert_default()
            .insert(LABEL_TEMPLATE.into(), "bbb".into());
        let canary = [Arc::new(p)];
        let t = Table::build(&[Arc::new(d.clone())], &canary);
        let pool = t.pool("llama-3").unwrap();
        assert_eq!(
            pool.split,
            Some(Split {
                canary: "bbb".into(),
                percent: 10
            })
        );
        assert_eq!(pool.replicas[0].revision, "bbb");
        // Rolled back, or not routed yet: no split.
        status.rollout.as_mut().unwrap().phase = RolloutPhase::RolledBack;
        d.status = Some(status);
        assert_eq!(
            Table::build(&[Arc::new(d)], &[])
                .pool("llama-3")
                .unwrap()
                .split,
            None
        );
    }
}
