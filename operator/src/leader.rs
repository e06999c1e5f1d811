//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's
//! `leaderelection` package does it: a candidate takes or renews the lease with a
//! replace that carries the `resourceVersion` it read, so of two racing writers the API
//! server accepts one and answers the other 409. Expiry is judged by this process's own
//! clock, from the moment it last saw the record change, so clock skew between operator
//! replicas cannot hand the lease to two holders.
//!
//! (kube-lease-manager was considered; it decides ownership by server-side-apply field
//! conflicts instead of resourceVersion, and the RBAC, fencing and skew rules here are
//! those every Kubernetes controller manager uses.)

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

use crate::metrics::Metrics;

/// How the lease is named and timed.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's identity (the pod name, or host and pid).
    pub identity: String,
    /// How long a holder's lease lasts without renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it gives leadership up.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self::with_duration(namespace, name, identity, Duration::from_secs(15))
    }

    /// A lease of `lease_duration`, with client-go's proportions: the renew deadline
    /// at 2/3 of it and the retry period at 2/15 (10 s and 2 s for 15 s).
    pub fn with_duration(
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration * 2 / 15,
        }
    }
}

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Another candidate holds the lease now.
    #[error("lost the lease {lease} to {holder}")]
    Lost {
        /// namespace/name of the lease.
        lease: String,
        /// The new holder.
        holder: String,
    },
    /// Renewal failed for longer than the renew deadline.
    #[error("could not renew the lease {lease} within {deadline:?}: {source}")]
    RenewFailed {
        /// namespace/name of the lease.
        lease: String,
        /// The renew deadline.
        deadline: Duration,
        /// The last API error.
        source: kube::Error,
    },
}

/// What a candidate should do with the lease record it just read.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// It holds the lease: renew it.
    Renew,
    /// The lease is free or expired: take it (a new holder, transitions + 1).
    Take,
    /// Someone else holds a live lease: wait.
    Wait {
        /// The holder.
        holder: String,
    },
}

/// The decision, pure: `unchanged_for` is how long this process has seen the record
/// unchanged (by its own clock), `duration` the lease duration the record states.
pub fn step(holder: Option<&str>, me: &str, unchanged_for: Duration, duration: Duration) -> Step {
    match holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => Step::Renew,
        Some(h) if unchanged_for < duration => Step::Wait { holder: h.into() },
        _ => Step::Take,
    }
}

/// What identifies one version of the lease record: holder, renewTime, resourceVersion.
type RecordKey = (Option<String>, Option<String>, Option<String>);

/// A candidate for the lease.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// (holder, renewTime, resourceVersion) last seen, and when it was first seen.
    observed: Option<(RecordKey, Instant)>,
}

fn micro_now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl Elector {
    /// A candidate using `client` and `config`.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    fn lease_ref(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// One attempt to take or renew the lease. `Ok(Ok(()))` when this candidate holds it
    /// afterwards; `Ok(Err(holder))` when someone else does.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Result<(), String>, kube::Error> {
        let now = Instant::now();
        let secs = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(micro_now()),
                    renew_time: Some(micro_now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Ok(())),
                // Another candidate created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Err("(another candidate)".into())),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let key = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
            lease.metadata.resource_version.clone(),
        );
        let since = match &self.observed {
            Some((k, at)) if *k == key => *at,
            _ => {
                self.observed = Some((key, now));
                now
            }
        };
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.config.lease_duration);
        let decision = step(
            spec.holder_identity.as_deref(),
            &self.config.identity,
            now.duration_since(since),
            duration,
        );
        let mut new = spec.clone();
        let decision_was_take = decision == Step::Take;
        match decision {
            Step::Wait { holder } => return Ok(Err(holder)),
            Step::Renew => {}
            Step::Take => {
                new.holder_identity = Some(self.config.identity.clone());
                new.acquire_time = Some(micro_now());
                new.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        new.renew_time = Some(micro_now());
        new.lease_duration_seconds = Some(secs);
        lease.spec = Some(new);
        // The replace carries the resourceVersion read above: a concurrent writer makes
        // this a 409, never a second holder.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Ok(())),
            // Someone else wrote first. A candidate lost the race; a holder retries (the
            // next read tells whether it still holds the lease).
            Err(kube::Error::Api(e)) if e.code == 409 && decision_was_take => {
                Ok(Err(spec.holder_identity.unwrap_or_default()))
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (holder cleared, 1 s duration) so a standby takes over at once
    /// rather than after the lease expires. Best effort: the lease expires anyway.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro_now());
        if let Err(e) = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(lease = %self.lease_ref(), error = %e, "releasing the lease failed");
        }
    }

    /// Waits until this candidate holds the lease, then runs `work` while renewing it.
    /// Returns when `work` ends (releasing the lease) or with an error when leadership is
    /// lost; the caller should then stop, as client-go's users do, because a second
    /// leader may already be acting.
    pub async fn lead<F: Future<Output = ()>>(
        mut self,
        metrics: &Metrics,
        work: F,
    ) -> Result<(), LeaderError> {
        let lease = self.lease_ref();
        let mut waiting_on = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Ok(())) => break,
                Ok(Err(holder)) => {
                    if waiting_on.as_ref() != Some(&holder) {
                        tracing::info!(%lease, %holder, "waiting for the lease");
                        waiting_on = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(%lease, error = %e, "lease not reachable"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
        tracing::info!(%lease, identity = %self.config.identity, "became the leader");
        metrics.set_leader(true);
        let renew = async {
            let mut last_renewed = Instant::now();
            loop {
                tokio::time::sleep(self.config.retry_period).await;
                match self.try_acquire_or_renew().await {
                    Ok(Ok(())) => last_renewed = Instant::now(),
                    Ok(Err(holder)) => {
                        return LeaderError::Lost {
                            lease: lease.clone(),
                            holder,
                        }
                    }
                    Err(source) if last_renewed.elapsed() >= self.config.renew_deadline => {
                        return LeaderError::RenewFailed {
                            lease: lease.clone(),
                            deadline: self.config.renew_deadline,
                            source,
                        }
                    }
                    Err(e) => tracing::warn!(%lease, error = %e, "lease renewal failed; retrying"),
                }
            }
        };
        let result = tokio::select! {
            () = work => Ok(()),
            e = renew => Err(e),
        };
        metrics.set_leader(false);
        if result.is_ok() {
            self.release().await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_free_lease_is_taken() {
        assert_eq!(step(None, "a", Duration::ZERO, D), Step::Take);
        assert_eq!(step(Some(""), "a", Duration::ZERO, D), Step::Take);
    }

    #[test]
    fn the_holder_renews() {
        assert_eq!(
            step(Some("a"), "a", Duration::from_secs(60), D),
            Step::Renew
        );
    }

    #[test]
    fn a_live_lease_of_another_is_waited_for_until_it_expires_by_our_clock() {
        assert_eq!(
            step(Some("b"), "a", Duration::from_secs(14), D),
            Step::Wait { holder: "b".into() }
        );
        assert_eq!(step(Some("b"), "a", Duration::from_secs(15), D), Step::Take);
    }
}
