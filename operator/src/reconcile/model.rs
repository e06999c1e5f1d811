//! Sizing a replica from the model's header, wherever the model lives.
//!
//! The operator runs in its own pod: it can reach an `http(s)://` model over the network
//! (range requests for the header, `model_header`), but a `file://` or `pvc://` model
//! lives on the nodes, where only a pod can mount it. For those a short-lived probe pod
//! runs `inference-worker inspect` with the replicas' volume and writes the header's
//! facts to its termination message, which the kubelet copies into the pod's status.
//! The result is kept in `status.model` and reused until `model.source` or
//! `model.version` changes; the declared `parameters` and `dtype` are the fallback when
//! the header cannot be read, and status then says the size is declared.

use std::collections::BTreeMap;
use std::time::Duration;

use gpuscale_crds::{InferenceDeployment, ModelStatus, SizedFrom};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::ResourceExt;
use tracing::info;

use super::pods::{model_mount, worker_image, MANAGED_BY};
use super::{Context, Error, PodFacts};
use crate::estimate::ModelProfile;
use crate::placement;

/// Marks a probe pod, with the name of the deployment it reads for. Not the replicas'
/// `gpuscale.dev/deployment` label, so no selector of replicas (the Service's, the
/// scale subresource's) ever counts a probe.
pub const LABEL_PROBE_OF: &str = "gpuscale.dev/model-probe-of";
/// The source (and `@version`) a probe pod reads.
pub(super) const ANNOTATION_PROBED: &str = "gpuscale.dev/model";
/// A probe that has not finished by then (unschedulable, a volume that does not mount,
/// an image that does not pull) is given up and its reason reported.
const PROBE_DEADLINE: Duration = Duration::from_secs(120);
/// A failed read is tried again after this long (the file may have been copied since).
const RETRY_FAILED_READ: Duration = Duration::from_secs(300);
/// Timeout of each HTTP request of a header read.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(20);

/// What sizing found.
pub(super) enum Sizing {
    /// Bytes per GPU, and what status keeps of the model.
    Sized { need: u64, model: ModelStatus },
    /// A probe pod is reading the header.
    Probing(String),
    /// The model cannot be sized (or the configuration does not fit it): why.
    Unsized {
        message: String,
        model: Option<ModelStatus>,
    },
}

fn key(source: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{source}@{v}"),
        None => source.to_string(),
    }
}

/// Whether `m` describes the deployment's current model, and is not a failed read due
/// for another try.
fn current(m: &ModelStatus, d: &InferenceDeployment, wall: jiff::Timestamp) -> bool {
    let spec = &d.spec.model;
    if m.source != spec.source || m.version != spec.version {
        return false;
    }
    m.sized_from == SizedFrom::Header
        || wall.duration_since(m.observed_at.0).unsigned_abs() < RETRY_FAILED_READ
}

/// Sizes `d`'s replicas: from what was learned before (`known`, the pass's memory, which
/// may be newer than the status it was handed), else by reading the header.
pub(super) async fn size(
    d: &InferenceDeployment,
    ctx: &Context,
    known: Option<&ModelStatus>,
    wall: jiff::Timestamp,
) -> Result<Sizing, Error> {
    let remembered = known
        .into_iter()
        .chain(d.status.as_ref().and_then(|s| s.model.as_ref()))
        .find(|m| current(m, d, wall))
        .cloned();
    let model = match remembered {
        Some(m) => m,
        None => match read(d, ctx, wall).await? {
            Read::Done(m) => *m,
            Read::Pending(why) => return Ok(Sizing::Probing(why)),
        },
    };
    Ok(need(d, model))
}

/// The bytes per GPU for `model`, or why there are none.
fn need(d: &InferenceDeployment, model: ModelStatus) -> Sizing {
    let cfg = placement::replica_config(&d.spec);
    if let Some(header) = &model.header {
        return match ModelProfile::from_summary(header).estimate(&cfg) {
            Ok(e) => Sizing::Sized {
                need: e.per_gpu(),
                model,
            },
            Err(e) => Sizing::Unsized {
                message: e.to_string(),
                model: Some(model),
            },
        };
    }
    let read_error = model.error.clone().unwrap_or_default();
    match declared_need(d) {
        Some(need) => Sizing::Sized {
            need,
            model: ModelStatus {
                sized_from: SizedFrom::Declared,
                ..model
            },
        },
        None => Sizing::Unsized {
            message: format!(
                "cannot read the model header ({read_error}) and spec.model.parameters and \
                 spec.model.dtype are not both set: make {} readable or declare them",
                d.spec.model.source
            ),
            model: Some(ModelStatus {
                sized_from: SizedFrom::Unsized,
                ..model
            }),
        },
    }
}

enum Read {
    Done(Box<ModelStatus>),
    Pending(String),
}

async fn read(
    d: &InferenceDeployment,
    ctx: &Context,
    wall: jiff::Timestamp,
) -> Result<Read, Error> {
    let spec = &d.spec.model;
    let record = |header: Result<gguf::ModelSummary, String>, by: String| ModelStatus {
        source: spec.source.clone(),
        version: spec.version.clone(),
        sized_from: if header.is_ok() {
            SizedFrom::Header
        } else {
            SizedFrom::Declared
        },
        read_by: Some(by),
        error: header.as_ref().err().cloned(),
        header: header.ok(),
        observed_at: Time(wall.round(jiff::Unit::Second).unwrap_or(wall)),
    };
    if spec.source.starts_with("http://") || spec.source.starts_with("https://") {
        let got = crate::model_header::read_http(&ctx.model_http, &spec.source).await;
        info!(source = %spec.source, ok = got.is_ok(), "read the model header over HTTP");
        return Ok(Read::Done(Box::new(record(
            got.map_err(|e| e.to_string()),
            "http range requests".into(),
        ))));
    }
    probe(d, ctx, wall, record).await
}

/// Runs (or reads, or gives up) the probe pod of `d`'s model.
async fn probe(
    d: &InferenceDeployment,
    ctx: &Context,
    wall: jiff::Timestamp,
    record: impl Fn(Result<gguf::ModelSummary, String>, String) -> ModelStatus,
) -> Result<Read, Error> {
    let ns = d.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let want = key(&d.spec.model.source, d.spec.model.version.as_deref());
    let existing = ctx
        .cache
        .owned(&d.uid().unwrap_or_default())
        .into_iter()
        .find(|p| p.labels().contains_key(LABEL_PROBE_OF));
    let Some(pod) = existing else {
        let Some(pod) = probe_pod(d, &ctx.config, &want) else {
            return Ok(Read::Done(Box::new(record(
                Err(format!(
                    "{} cannot be mounted into a pod",
                    d.spec.model.source
                )),
                "nothing".into(),
            ))));
        };
        match api.create(&PostParams::default(), &pod).await {
            // The API's answer, with its UID: the expectation is of that pod.
            Ok(made) => {
                info!(pod = %pod.name_any(), model = %want, "created model probe pod");
                ctx.cache.expect_created(made);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Read::Pending(format!(
            "reading the model header in probe pod {}",
            pod.name_any()
        )));
    };
    let name = pod.name_any();
    if pod.annotations().get(ANNOTATION_PROBED) != Some(&want) {
        // A probe of an earlier source or version.
        remove_probes(d, ctx).await?;
        return Ok(Read::Pending(format!(
            "waiting for probe pod {name} of an earlier model to go"
        )));
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "no node".into());
    let by = format!("probe pod {name} on {node}");
    let outcome = match finished(&pod) {
        Some(result) => result,
        None => {
            let age = pod
                .creation_timestamp()
                .map_or(Duration::ZERO, |t| wall.duration_since(t.0).unsigned_abs());
            if age < PROBE_DEADLINE {
                return Ok(Read::Pending(format!(
                    "reading the model header in probe pod {name}"
                )));
            }
            Err(format!(
                "probe pod {name} did not finish in {} s: {}",
                PROBE_DEADLINE.as_secs(),
                stuck_reason(&pod)
            ))
        }
    };
    info!(pod = %name, ok = outcome.is_ok(), "model probe finished");
    // Deleted by `remove_probes` once status holds the result.
    Ok(Read::Done(Box::new(record(outcome, by))))
}

/// Deletes `d`'s probe pods: called once status holds what they found (a probe
/// deleted first would be lost to an operator that stops between the two writes).
pub(super) async fn remove_probes(d: &InferenceDeployment, ctx: &Context) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    for pod in ctx
        .cache
        .owned(&d.uid().unwrap_or_default())
        .iter()
        .filter(|p| p.labels().contains_key(LABEL_PROBE_OF) && p.deletion_timestamp().is_none())
    {
        // Its container has exited (or is a read-only reader of an earlier model):
        // nothing to wait for, so no grace period, and no Terminating pod left behind
        // on a node whose kubelet is gone.
        // Through `delete_pod`, which forgets its expectation too: a probe this operator
        // created and deleted before the store showed it would otherwise still be
        // seen, and deleted again each pass, until the expectation expired.
        let now_grace = DeleteParams::background().grace_period(0);
        if super::act::delete_pod(ctx, &api, pod, now_grace).await? {
            info!(pod = %pod.name_any(), "deleted model probe pod");
        }
    }
    Ok(())
}

/// The probe's result once its container has terminated: the summary its termination
/// message holds, or the error.
pub(super) fn finished(pod: &impl PodFacts) -> Option<Result<gguf::ModelSummary, String>> {
    let status = pod.facts();
    let Some((exit_code, message)) = status.containers().find_map(|c| c.terminated) else {
        // Failed before its container ran (admission, eviction, deadline).
        return (status.phase == Some("Failed")).then(|| {
            Err(format!(
                "probe pod failed: {} {}",
                status.reason.unwrap_or_default(),
                status.message.unwrap_or_default()
            ))
        });
    };
    let message = message.unwrap_or_default().to_string();
    if exit_code == 0 {
        return Some(serde_json::from_str(&message).map_err(|e| {
            format!("the probe's termination message is not a model summary ({e}): {message}")
        }));
    }
    let error = serde_json::from_str::<serde_json::Value>(&message)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or(message);
    Some(Err(format!("inspect exited with {exit_code}: {error}")))
}

/// Why an unfinished probe is stuck: the scheduler's message or its container's wait.
fn stuck_reason(pod: &impl PodFacts) -> String {
    if let Some(m) = super::pods::unschedulable(pod) {
        return format!("the scheduler cannot place it: {m}");
    }
    pod.facts()
        .containers()
        .find_map(|c| {
            let (reason, message) = c.waiting?;
            Some(format!(
                "{} {}",
                reason.unwrap_or_default(),
                message.unwrap_or_default()
            ))
        })
        .unwrap_or_else(|| "still pending".into())
}

/// The probe pod of `d`: the worker image running `inspect` on the model as the replicas
/// mount it, once (`restartPolicy: Never`, a deadline), owned by `d`.
pub fn probe_pod(d: &InferenceDeployment, config: &super::Config, probed: &str) -> Option<Pod> {
    let super::pods::ModelMount {
        path,
        volume,
        mount,
        ..
    } = model_mount(&d.spec.model, &config.model_cache)?;
    let name = d.name_any();
    let small = |cpu: &str, mem: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(mem.into())),
        ])
    };
    Some(Pod {
        metadata: ObjectMeta {
            name: Some(format!("{name}-model-probe")),
            namespace: d.namespace(),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGED_BY.to_string(),
                ),
                (LABEL_PROBE_OF.to_string(), name.clone()),
            ])),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_PROBED.to_string(),
                probed.to_string(),
            )])),
            owner_references: kube::Resource::controller_owner_ref(d, &()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(PROBE_DEADLINE.as_secs() as i64),
            tolerations: Some(config.scheduling.tolerations.clone()).filter(|t| !t.is_empty()),
            scheduler_name: config.scheduling.scheduler_name.clone(),
            image_pull_secrets: super::pods::pull_secrets(d, config),
            security_context: Some(super::pods::pod_security()),
            containers: vec![Container {
                name: "inspect".into(),
                image: Some(worker_image(d, config)),
                args: Some(vec![
                    "inspect".into(),
                    path,
                    "--json".into(),
                    "--termination-log=/dev/termination-log".into(),
                ]),
                termination_message_path: Some("/dev/termination-log".into()),
                termination_message_policy: Some("File".into()),
                security_context: Some(super::pods::container_security()),
                resources: Some(ResourceRequirements {
                    requests: Some(small("50m", "64Mi")),
                    limits: Some(small("1", "256Mi")),
                    ..ResourceRequirements::default()
                }),
                volume_mounts: Some(vec![mount]),
                ..Container::default()
            }],
            volumes: Some(vec![volume]),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// Bytes per GPU from the declared parameter count and weight type, when both are set:
/// an estimate, used only when the header cannot be read.
pub fn declared_need(d: &InferenceDeployment) -> Option<u64> {
    use crate::estimate::{GIB, RUNTIME_OVERHEAD_BYTES};
    use gpuscale_crds::WeightType as W;
    let m = &d.spec.model;
    let cfg = placement::replica_config(&d.spec);
    let (params, dtype) = (m.parameters?, m.dtype?);
    let bits: u64 = match dtype {
        W::F32 => 32,
        W::F16 | W::Bf16 => 16,
        W::Q8_0 => 9,
        W::Q4_0 => 5,
        W::Q4_1 => 6,
    };
    // Without the shapes, KV bytes per token is bounded from the parameter count:
    // 2·sqrt(params) is above Llama-3 8B (128 KiB), 70B (320 KiB) and SmolLM2 (23 KiB).
    let kv_per_token = 2 * (params as f64).sqrt() as u64;
    let tp = cfg.gpus.max(1);
    let kv = kv_per_token * cfg.max_sequence_length * cfg.max_batch_size;
    let base = (params * bits / 8 + kv).div_ceil(tp) + RUNTIME_OVERHEAD_BYTES;
    let need = base + base * cfg.headroom_percent / 100;
    Some(need.max(GIB / 4))
}
