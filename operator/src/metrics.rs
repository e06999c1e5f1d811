//! The operator's own Prometheus metrics (`gpuscale_operator_*`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::autoscale::Direction;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// How a reconcile pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Converged or converging.
    Ok,
    /// A deletion waits for replicas to drain: expected, not a failure.
    Draining,
    /// The object could not be read as an InferenceDeployment; skipped.
    Unreadable,
    /// Failed, with the kind of failure (`api_conflict`, `api_server_error`,
    /// `api_refused`, `api_unreachable`, `finalizer`).
    Error(&'static str),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabel {
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StartLabel {
    deployment: String,
    phase: &'static str,
}

/// How a replica's start was spent, from pod creation to ready.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ColdStart {
    /// Creation to the scheduler's binding.
    pub scheduling: f64,
    /// Fetching the model into the node's cache (0 on a hit or a node path).
    pub download: f64,
    /// Loading the weights and building the backend.
    pub load: f64,
    /// The warm-up pass.
    pub warmup: f64,
    /// The whole start, creation to ready.
    pub total: f64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabel {
    deployment: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScaleLabel {
    deployment: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicasLabel {
    deployment: String,
    state: &'static str,
}

/// A deployment's replica counts as one pass saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Replicas {
    /// What the autoscaler (or `spec.replicas`) asks for.
    pub desired: u32,
    /// Ready replicas.
    pub ready: u32,
    /// `spec.scaling.maxReplicas`.
    pub max: u32,
    /// Desired replicas that fit on no node (what a cluster autoscaler would add for).
    pub unschedulable: u32,
}

impl Replicas {
    const STATES: [&'static str; 4] = ["desired", "ready", "max", "unschedulable"];

    fn values(&self) -> [u32; 4] {
        [self.desired, self.ready, self.max, self.unschedulable]
    }
}

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    errors: Family<KindLabel, Counter>,
    duration: Histogram,
    scaling: Family<ScaleLabel, Counter>,
    rollouts: Family<RolloutLabel, Counter>,
    leader: Gauge,
    download: Family<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    cost_hourly: Family<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    cost_tokens: Family<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    start: Family<StartLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    replicas: Family<ReplicasLabel, Gauge>,
    health: crate::health::Health,
    tokio_tasks: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gpuscale_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconcile passes, by result (ok, draining, unreadable, error)",
            reconciles.clone(),
        );
        let errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes, by kind of failure",
            errors.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile pass took",
            duration.clone(),
        );
        let scaling = Family::<ScaleLabel, Counter>::default();
        registry.register(
            "scaling_decisions",
            "Autoscaler decisions that changed the replica count, by deployment and direction",
            scaling.clone(),
        );
        let rollouts = Family::<RolloutLabel, Counter>::default();
        registry.register(
            "rollout_events",
            "Rollout events by deployment (RolloutStarted, RolloutStep, RolloutPromoted, RolledBack, RolloutAbandoned)",
            rollouts.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this operator replica holds the leader Lease",
            leader.clone(),
        );
        let download =
            Family::<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "model_download_ratio",
            "Share of the model fetched by the deployment's downloading replicas (absent when none is)",
            download.clone(),
        );
        let cost_hourly =
            Family::<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "deployment_cost_dollars_per_hour",
            "What the deployment's GPUs cost per hour at the operator's price table (absent without one)",
            cost_hourly.clone(),
        );
        let cost_tokens =
            Family::<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "deployment_cost_dollars_per_million_tokens",
            "The hourly cost over the tokens generated in the last 5 minutes, per million (absent while none were)",
            cost_tokens.clone(),
        );
        let start = Family::<StartLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "replica_start_seconds",
            "The latest ready replica's start, by phase (scheduling, download, load, warmup, total)",
            start.clone(),
        );
        let replicas = Family::<ReplicasLabel, Gauge>::default();
        registry.register(
            "deployment_replicas",
            "Replicas of each deployment by state: desired (the autoscaler's), ready, max (spec.scaling.maxReplicas), unschedulable (desired replicas that fit on no node)",
            replicas.clone(),
        );
        let tokio_tasks = Gauge::default();
        registry.register(
            "tokio_alive_tasks",
            "Tasks alive in this process's tokio runtime, read at each scrape (a count that grows under steady load is a leak)",
            tokio_tasks.clone(),
        );
        Metrics {
            tokio_tasks,
            registry,
            replicas,
            health: crate::health::Health::default(),
            reconciles,
            errors,
            duration,
            scaling,
            rollouts,
            leader,
            download,
            cost_hourly,
            cost_tokens,
            start,
        }
    }
}

impl Metrics {
    /// Records one reconcile pass.
    pub fn reconciled(&self, took: Duration, outcome: Outcome) {
        let result = match outcome {
            Outcome::Ok => "ok",
            Outcome::Draining => "draining",
            Outcome::Unreadable => "unreadable",
            Outcome::Error(kind) => {
                self.errors.get_or_create(&KindLabel { kind }).inc();
                "error"
            }
        };
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Records a rollout event of `deployment` (`namespace/name`).
    pub fn rollout(&self, deployment: &str, event: &'static str) {
        self.rollouts
            .get_or_create(&RolloutLabel {
                deployment: deployment.into(),
                event,
            })
            .inc();
    }

    /// Records a scaling decision of `deployment` (`namespace/name`).
    pub fn scaled(&self, deployment: &str, direction: Direction) {
        let direction = match direction {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Hold => return,
        };
        self.scaling
            .get_or_create(&ScaleLabel {
                deployment: deployment.into(),
                direction,
            })
            .inc();
    }

    /// The share of the model fetched by `deployment`'s downloading replicas (`None`:
    /// none is downloading; the series goes).
    pub fn downloading(&self, deployment: &str, ratio: Option<f64>) {
        let label = DeploymentLabel {
            deployment: deployment.into(),
        };
        match ratio {
            Some(r) => {
                self.download.get_or_create(&label).set(r);
            }
            None => {
                self.download.remove(&label);
            }
        }
    }

    /// Records how a replica of `deployment` started.
    pub fn started(&self, deployment: &str, c: &ColdStart) {
        for (phase, v) in [
            ("scheduling", c.scheduling),
            ("download", c.download),
            ("load", c.load),
            ("warmup", c.warmup),
            ("total", c.total),
        ] {
            self.start
                .get_or_create(&StartLabel {
                    deployment: deployment.into(),
                    phase,
                })
                .set(v);
        }
    }

    /// Records `deployment`'s replica counts.
    pub fn replicas(&self, deployment: &str, r: Replicas) {
        for (state, v) in Replicas::STATES.into_iter().zip(r.values()) {
            self.replicas
                .get_or_create(&ReplicasLabel {
                    deployment: deployment.into(),
                    state,
                })
                .set(i64::from(v));
        }
    }

    /// Exports `deployment`'s cost (`None`: no price table; the series go).
    pub fn cost(&self, deployment: &str, cost: Option<&gpuscale_crds::CostStatus>) {
        let label = DeploymentLabel {
            deployment: deployment.into(),
        };
        match cost {
            Some(c) => {
                self.cost_hourly
                    .get_or_create(&label)
                    .set(c.dollars_per_hour);
                match c.dollars_per_million_tokens {
                    Some(v) => {
                        self.cost_tokens.get_or_create(&label).set(v);
                    }
                    None => {
                        self.cost_tokens.remove(&label);
                    }
                }
            }
            None => {
                self.cost_hourly.remove(&label);
                self.cost_tokens.remove(&label);
            }
        }
    }

    /// Drops the series of a deleted deployment.
    pub fn forget(&self, deployment: &str) {
        self.cost(deployment, None);
        for state in Replicas::STATES {
            self.replicas.remove(&ReplicasLabel {
                deployment: deployment.into(),
                state,
            });
        }
        self.downloading(deployment, None);
        for phase in ["scheduling", "download", "load", "warmup", "total"] {
            self.start.remove(&StartLabel {
                deployment: deployment.into(),
                phase,
            });
        }
        for direction in ["up", "down"] {
            self.scaling.remove(&ScaleLabel {
                deployment: deployment.into(),
                direction,
            });
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        self.health.set_leading(leading);
    }

    /// What the watches and the election say of the operator's health.
    pub fn health(&self) -> &crate::health::Health {
        &self.health
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tokio_tasks.set(rt.metrics().num_alive_tasks() as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_passes_and_decisions() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(3), Outcome::Ok);
        m.reconciled(Duration::from_millis(3), Outcome::Error("api_server_error"));
        m.reconciled(Duration::from_millis(3), Outcome::Draining);
        m.scaled("ns/a", Direction::Up);
        m.scaled("ns/a", Direction::Hold);
        m.set_leader(true);
        let text = m.encode();
        assert!(
            text.contains("gpuscale_operator_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("gpuscale_operator_reconciles_total{result=\"error\"} 1"));
        assert!(text.contains("gpuscale_operator_reconciles_total{result=\"draining\"} 1"));
        assert!(
            text.contains("gpuscale_operator_reconcile_errors_total{kind=\"api_server_error\"} 1"),
            "{text}"
        );
        assert!(!text.contains("kind=\"draining\""), "a drain is no failure");
        assert!(text.contains(
            "gpuscale_operator_scaling_decisions_total{deployment=\"ns/a\",direction=\"up\"} 1"
        ));
        assert!(!text.contains("direction=\"hold\""));
        assert!(text.contains("gpuscale_operator_leader 1"));
        m.forget("ns/a");
        assert!(!m.encode().contains("ns/a"));
    }
}
