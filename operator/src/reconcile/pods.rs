//! The objects a deployment owns: one worker Pod per replica, pinned to its placement,
//! and one Service. Pure builders and readers; no API calls.

use std::collections::BTreeMap;

use gpuscale_crds::InferenceDeployment;

use super::{CacheVolume, ConditionStatus, Drain, PodFacts, SeenService};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction,
    HostPathVolumeSource, LocalObjectReference, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaimVolumeSource, Pod,
    PodResourceClaim, PodSecurityContext, PodSpec, Probe, ResourceClaim as ContainerClaim,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::api::resource::v1::{
    CELDeviceSelector, CapacityRequirements, DeviceClaim, DeviceRequest, DeviceSelector,
    ExactDeviceRequest, ResourceClaim, ResourceClaimSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};

/// Who manages the pods (`app.kubernetes.io/managed-by`).
pub const MANAGED_BY: &str = "gpuscale";
/// Label: the owning deployment's name.
pub const LABEL_DEPLOYMENT: &str = "gpuscale.dev/deployment";
/// Label: the replica index.
pub const LABEL_REPLICA: &str = "gpuscale.dev/replica";
/// Label: hash of the pod template; a change means a rollout.
pub const LABEL_TEMPLATE: &str = "gpuscale.dev/template";
/// Label: `"true"` while the replica takes traffic; the Service selects on it, so
/// flipping it to `"false"` is the first step of a drain.
pub const LABEL_SERVING: &str = "gpuscale.dev/serving";
/// Label: the deployment a capacity request pod asks a GPU node for
/// ([`capacity_pod`]); never on a replica.
pub const LABEL_CAPACITY_FOR: &str = "gpuscale.dev/capacity-for";
/// Annotation: the replica's placement, as JSON.
pub const ANNOTATION_PLACEMENT: &str = "gpuscale.dev/placement";
/// Annotation: when the drain began (RFC 3339).
pub const ANNOTATION_DRAINING_SINCE: &str = "gpuscale.dev/draining-since";
/// Where `pvc://` model claims are mounted in the worker.
pub const MODEL_MOUNT: &str = "/models";

/// A replica's placement as recorded on its pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPlacement {
    /// Node.
    pub node: String,
    /// GPU indices on the node (empty on a CPU node).
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// Their UUIDs.
    #[serde(default)]
    pub uuids: Vec<String>,
    /// Bytes reserved per GPU (or of host memory on a CPU node).
    pub bytes_per_gpu: u64,
    /// Whole GPUs.
    #[serde(default)]
    pub exclusive: bool,
    /// `gpus`/`uuids` are what the device plugin assigned, as the worker reported them,
    /// not what placement chose (the plugin picks the devices of a count request).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub assigned: bool,
    /// The GPUs are held by a DRA ResourceClaim naming them ([`claim_name`]), not
    /// counted out by a device plugin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dra: bool,
    /// The GPUs' product, as placement saw it (absent on CPU, and on pods placed by
    /// earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
}

/// The name of the ResourceClaim that holds the GPUs of pod `pod`.
pub fn claim_name(pod: &str) -> String {
    format!("{pod}-gpus")
}

/// The name a pod and its container use for the claim.
const CLAIM_REF: &str = "gpus";

/// The ResourceClaim of a replica placed on a DRA node: one request for exactly the
/// GPUs placement chose, selected by a CEL expression on their `uuid` attribute, so the
/// scheduler can allocate those and no others
/// (<https://kubernetes.io/docs/concepts/scheduling-eviction/dynamic-resource-allocation/#resourceclaims-templates>).
/// A shared replica asks for its VRAM as consumable `memory` capacity of the one GPU.
/// Owned by the pod, as the resourceclaim controller owns the claims it makes from
/// templates: the garbage collector removes it with the pod, and the devices with it.
pub fn replica_claim(
    pod: &impl PodFacts,
    p: &PodPlacement,
    config: &super::Config,
) -> Option<ResourceClaim> {
    let dra = config.binding.dra.as_ref()?;
    let uuids = serde_json::to_string(&p.uuids).expect("strings serialize");
    let expression = format!(
        "device.attributes[{}].uuid in {uuids}",
        serde_json::to_string(&dra.driver).expect("strings serialize")
    );
    let capacity = (!p.exclusive).then(|| CapacityRequirements {
        requests: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity(p.bytes_per_gpu.to_string()),
        )])),
    });
    Some(ResourceClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(pod.pod_name()?)),
            namespace: pod.pod_namespace().map(str::to_string),
            labels: Some(pod.label_map()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.pod_name()?.to_string(),
                uid: pod.pod_uid()?.to_string(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: ResourceClaimSpec {
            devices: Some(DeviceClaim {
                requests: Some(vec![DeviceRequest {
                    name: CLAIM_REF.into(),
                    exactly: Some(ExactDeviceRequest {
                        device_class_name: dra.device_class.clone(),
                        allocation_mode: Some("ExactCount".into()),
                        count: Some(p.uuids.len() as i64),
                        selectors: Some(vec![DeviceSelector {
                            cel: Some(CELDeviceSelector { expression }),
                        }]),
                        capacity,
                        ..ExactDeviceRequest::default()
                    }),
                    ..DeviceRequest::default()
                }]),
                ..DeviceClaim::default()
            }),
        },
        status: None,
    })
}

/// The pod name of replica `index`.
pub fn pod_name(deployment: &str, index: u32) -> String {
    format!("{deployment}-{index}")
}

/// The labels every replica of `deployment` carries (the Service's selector adds
/// serving=true).
pub fn selector_labels(deployment: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        (LABEL_DEPLOYMENT.to_string(), deployment.to_string()),
    ])
}

/// The label selector string of the replicas (status.selector, for `kubectl scale`).
pub fn selector_string(deployment: &str) -> String {
    selector_labels(deployment)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A stable hash of what the pods are built from: model, resources and worker.
/// FNV-1a, so it does not change between builds.
pub fn template_hash(d: &InferenceDeployment) -> String {
    let s = &d.spec;
    let text = serde_json::to_string(&(&s.model, &s.resources, &s.worker))
        .expect("specs always serialize");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

/// The worker command line for a placement.
pub(super) fn worker_args(
    d: &InferenceDeployment,
    model: &ModelMount,
    p: &PodPlacement,
) -> Vec<String> {
    let s = &d.spec;
    // The container sees exactly its GPUs, as cuda:0..N (device plugin and DRA both):
    // several split the model by layers, with --memory-budget on each.
    let device = match p.gpus.len() {
        0 => "cpu".to_string(),
        n => (0..n)
            .map(|i| format!("cuda:{i}"))
            .collect::<Vec<_>>()
            .join(","),
    };
    let mut args = vec![format!("--model={}", model.path)];
    args.extend(model.args.iter().cloned());
    args.extend([
        format!("--model-name={}", s.model.name),
        "--host=0.0.0.0".into(),
        format!("--port={}", s.worker.port),
        format!("--device={device}"),
        format!("--memory-budget={}", p.bytes_per_gpu),
        format!("--max-seq-len={}", s.resources.max_sequence_length),
        format!("--max-batch={}", s.resources.max_batch_size),
        "--log-format=json".into(),
        "--termination-log=/dev/termination-log".into(),
    ]);
    args
}

/// Where the model is inside a worker's pod, the volume that puts it there, and the
/// worker arguments that go with it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMount {
    /// The model file's path in the container.
    pub path: String,
    /// The volume holding it.
    pub volume: Volume,
    /// Its mount.
    pub mount: VolumeMount,
    /// Worker arguments beyond `--model` (the URL to fetch from, for http(s)).
    pub args: Vec<String>,
}

/// Where http(s) models are cached in the worker's container.
pub const MODEL_CACHE_MOUNT: &str = "/var/cache/gpuscale/models";

/// The file an http(s) model is cached as: content-addressed by its SHA-256 when given,
/// else named by a hash of the URL and version, with the URL's file name for people.
pub fn cache_file_name(url: &str, version: Option<&str>, sha256: Option<&str>) -> String {
    if let Some(sha) = sha256 {
        return format!("sha256-{sha}.gguf");
    }
    let key = format!("{url}@{}", version.unwrap_or(""));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let base: String = url
        .rsplit('/')
        .next()
        .unwrap_or("model")
        .split(['?', '#'])
        .next()
        .unwrap_or("model")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    format!("{h:016x}-{base}")
}

/// How `model` reaches the worker: a node path or a claim mounted read-only, or (http)
/// the node's model cache, which the worker fills before loading.
pub fn model_mount(
    model: &gpuscale_crds::ModelSpec,
    cache: &super::ModelCache,
) -> Option<ModelMount> {
    let source = model.source.as_str();
    if let Some(path) = source.strip_prefix("file://") {
        if !cache.host_path_models {
            return None;
        }
        let dir = std::path::Path::new(path)
            .parent()?
            .to_string_lossy()
            .to_string();
        let volume = Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: dir.clone(),
                type_: Some("Directory".into()),
            }),
            ..Volume::default()
        };
        let mount = VolumeMount {
            name: "model".into(),
            mount_path: dir,
            read_only: Some(true),
            ..VolumeMount::default()
        };
        return Some(ModelMount {
            path: path.to_string(),
            volume,
            mount,
            args: Vec::new(),
        });
    }
    if source.starts_with("http://") || source.starts_with("https://") {
        let volume = match &cache.volume {
            CacheVolume::EmptyDir => Volume {
                name: "model-cache".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            CacheVolume::HostPath(dir) => Volume {
                name: "model-cache".into(),
                host_path: Some(HostPathVolumeSource {
                    path: dir.clone(),
                    type_: Some("DirectoryOrCreate".into()),
                }),
                ..Volume::default()
            },
            CacheVolume::Claim(claim) => Volume {
                name: "model-cache".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(false),
                }),
                ..Volume::default()
            },
        };
        let mount = VolumeMount {
            name: "model-cache".into(),
            mount_path: MODEL_CACHE_MOUNT.into(),
            ..VolumeMount::default()
        };
        let name = cache_file_name(source, model.version.as_deref(), model.sha256.as_deref());
        let mut args = vec![format!("--model-url={source}")];
        args.extend(model.sha256.iter().map(|s| format!("--model-sha256={s}")));
        args.extend(
            cache
                .max_bytes
                .iter()
                .map(|b| format!("--model-cache-max-bytes={b}")),
        );
        return Some(ModelMount {
            path: format!("{MODEL_CACHE_MOUNT}/{name}"),
            volume,
            mount,
            args,
        });
    }
    let rest = source.strip_prefix("pvc://")?;
    let (claim, path) = rest.split_once('/')?;
    let volume = Volume {
        name: "model".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_string(),
            read_only: Some(true),
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: "model".into(),
        mount_path: format!("{MODEL_MOUNT}/{claim}"),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    Some(ModelMount {
        path: format!("{MODEL_MOUNT}/{claim}/{path}"),
        volume,
        mount,
        args: Vec::new(),
    })
}

/// The worker image released with this operator: what a deployment that names no image
/// runs, so that upgrading the operator rolls its workers to the same version.
pub const DEFAULT_WORKER_IMAGE: &str = concat!(
    "ghcr.io/gpuscale/inference-worker:",
    env!("CARGO_PKG_VERSION")
);

/// What the 0.1.0 CRD stored in every object as `spec.worker.image`'s default (a schema
/// default is written into the object when it is created). Read as "no image named", or
/// every deployment created then would stay on 0.1.0 forever.
const STORED_DEFAULT_0_1_0: &str = "ghcr.io/gpuscale/inference-worker:0.1.0";

/// The worker image of `d`'s pods: the one the deployment names, else the operator's
/// (`--worker-image`, which the chart sets to its own version).
pub fn worker_image(d: &InferenceDeployment, config: &super::Config) -> String {
    match d.spec.worker.image.as_deref() {
        Some(image) if image != STORED_DEFAULT_0_1_0 => image.into(),
        _ => config.worker_image.clone(),
    }
}

/// `d` with its worker image resolved, so that the pod template hash, the rollout's
/// stable record and every pod agree on it: a new operator image is a new version,
/// rolled out as a canary like any other template change.
pub fn with_image(mut d: InferenceDeployment, config: &super::Config) -> InferenceDeployment {
    d.spec.worker.image = Some(worker_image(&d, config));
    d
}

/// The pull secrets of `d`'s pods: the operator's (chart `imagePullSecrets`) and the
/// deployment's own, each once.
pub fn pull_secrets(
    d: &InferenceDeployment,
    config: &super::Config,
) -> Option<Vec<LocalObjectReference>> {
    let mut names: Vec<String> = config.image_pull_secrets.clone();
    for s in &d.spec.worker.image_pull_secrets {
        if !names.contains(&s.name) {
            names.push(s.name.clone());
        }
    }
    (!names.is_empty()).then(|| {
        names
            .into_iter()
            .map(|name| LocalObjectReference { name })
            .collect()
    })
}

/// The user worker containers run as (the image's own `USER`, distroless's nonroot).
const WORKER_UID: i64 = 65532;

/// Worker pods as the `restricted` Pod Security Standard asks
/// (<https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted>):
/// a non-root user, the runtime's seccomp profile; `fsGroup` makes the model cache
/// volume writable to that user. The NVIDIA container toolkit exposes GPUs to non-root
/// processes, so nothing here costs a GPU pod anything.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(WORKER_UID),
        run_as_group: Some(WORKER_UID),
        fs_group: Some(WORKER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// The worker container's part of the restricted level: no privilege escalation, every
/// capability dropped.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// The pod of replica `index` at placement `p`, owned by `d`.
pub fn replica_pod(
    d: &InferenceDeployment,
    index: u32,
    p: &PodPlacement,
    config: &super::Config,
) -> Option<Pod> {
    let drain_seconds = config.drain_timeout.as_secs();
    let name = d.name_any();
    let model = model_mount(&d.spec.model, &config.model_cache)?;
    let mut labels = selector_labels(&name);
    labels.insert("app.kubernetes.io/name".into(), "inference-worker".into());
    labels.insert(LABEL_REPLICA.into(), index.to_string());
    labels.insert(LABEL_TEMPLATE.into(), template_hash(d));
    labels.insert(LABEL_SERVING.into(), "true".into());
    let w = &d.spec.worker;
    let env = w.env.clone();
    let mut resources = w.resources.clone().unwrap_or_default();
    let mut claims = None;
    if !p.gpus.is_empty() {
        // Never a bare NVIDIA_VISIBLE_DEVICES: hardened container toolkits refuse it,
        // and the GPU must be accounted where the cluster allocates GPUs.
        let extended = if p.dra {
            // DRA: the claim (made right after the pod, see `replica_claim`) names the GPUs.
            resources.claims = Some(vec![ContainerClaim {
                name: CLAIM_REF.into(),
                request: None,
            }]);
            claims = Some(vec![PodResourceClaim {
                name: CLAIM_REF.into(),
                resource_claim_name: Some(claim_name(&pod_name(&name, index))),
                resource_claim_template_name: None,
            }]);
            None
        } else if p.exclusive {
            // The device plugin hands out whole GPUs on the chosen node.
            Some(("nvidia.com/gpu".to_string(), p.gpus.len()))
        } else {
            // A share through the plugin's sharing resource (time-slicing or MPS); the
            // worker enforces its VRAM budget itself.
            Some((config.binding.sharing_resource.clone()?, 1))
        };
        if let Some((resource, n)) = extended {
            resources
                .limits
                .get_or_insert_with(BTreeMap::new)
                .insert(resource, Quantity(n.to_string()));
        }
    }
    let http = |path: &str| HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::String("http".into()),
        ..HTTPGetAction::default()
    };
    let image = worker_image(d, config);
    Some(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, index)),
            namespace: d.namespace(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_PLACEMENT.to_string(),
                serde_json::to_string(p).expect("placements serialize"),
            )])),
            owner_references: d.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            affinity: Some(on_node(&p.node)),
            tolerations: Some(config.scheduling.tolerations.clone()).filter(|t| !t.is_empty()),
            runtime_class_name: config.scheduling.runtime_class.clone(),
            scheduler_name: config.scheduling.scheduler_name.clone(),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(drain_seconds as i64 + 10),
            containers: vec![Container {
                name: "worker".into(),
                image: Some(image),
                args: Some(worker_args(d, &model, p)),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: w.port.into(),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                }]),
                env: (!env.is_empty()).then_some(env),
                resources: Some(resources).filter(|r| *r != ResourceRequirements::default()),
                readiness_probe: Some(Probe {
                    http_get: Some(http("/readyz")),
                    period_seconds: Some(2),
                    ..Probe::default()
                }),
                liveness_probe: Some(Probe {
                    http_get: Some(http("/healthz")),
                    period_seconds: Some(10),
                    failure_threshold: Some(6),
                    ..Probe::default()
                }),
                volume_mounts: Some(vec![model.mount]),
                // Why a worker stopped (a failed download, a corrupt model) is its
                // termination message; the log's tail when it wrote none (a panic).
                termination_message_path: Some("/dev/termination-log".into()),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                security_context: Some(container_security()),
                ..Container::default()
            }],
            volumes: Some(vec![model.volume]),
            resource_claims: claims,
            image_pull_secrets: pull_secrets(d, config),
            security_context: Some(pod_security()),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// The name of the pod that asks a cluster autoscaler for a node for replica `index`.
pub fn capacity_pod_name(deployment: &str, index: u32) -> String {
    format!("{deployment}-capacity-{index}")
}

/// A pod that asks a cluster autoscaler for a GPU node for replica `index` of `d`,
/// which fits on no node there is. Cluster Autoscaler and Karpenter add nodes for
/// pending pods the scheduler cannot place
/// (<https://github.com/kubernetes/autoscaler/blob/master/cluster-autoscaler/FAQ.md#how-does-scale-up-work>),
/// and they read GPUs as the `nvidia.com/gpu` extended resource: so this pod asks for
/// `gpus` whole GPUs and the worker's CPU and memory, tolerates what replicas tolerate,
/// and runs nothing (`--version`, `restartPolicy: Never`), so that when the scheduler
/// binds it to the new node it ends at once and frees the GPU. It requires a node
/// whose `kubernetes.io/hostname` is none of `existing` (the nodes there are): on one
/// of those it would take a GPU placement meant for a replica, and a cluster
/// autoscaler would see it scheduled and add nothing. The operator deletes it as soon
/// as the replica can be placed (on the new node, when its GPUs appear) or is no
/// longer wanted, and places the replica once it is gone. It has no deployment label:
/// no Service, router or replica count sees it.
pub fn capacity_pod(
    d: &InferenceDeployment,
    index: u32,
    gpus: u32,
    existing: Vec<String>,
    config: &super::Config,
) -> Pod {
    let name = d.name_any();
    let mut resources = d.spec.worker.resources.clone().unwrap_or_default();
    resources
        .limits
        .get_or_insert_with(BTreeMap::new)
        .insert("nvidia.com/gpu".into(), Quantity(gpus.to_string()));
    Pod {
        metadata: ObjectMeta {
            name: Some(capacity_pod_name(&name, index)),
            namespace: d.namespace(),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGED_BY.to_string(),
                ),
                (LABEL_CAPACITY_FOR.to_string(), name.clone()),
            ])),
            owner_references: d.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            affinity: (!existing.is_empty()).then(|| on_none_of(existing)),
            tolerations: Some(config.scheduling.tolerations.clone()).filter(|t| !t.is_empty()),
            runtime_class_name: config.scheduling.runtime_class.clone(),
            scheduler_name: config.scheduling.scheduler_name.clone(),
            termination_grace_period_seconds: Some(0),
            image_pull_secrets: pull_secrets(d, config),
            security_context: Some(pod_security()),
            containers: vec![Container {
                name: "capacity".into(),
                image: Some(worker_image(d, config)),
                args: Some(vec!["--version".into()]),
                resources: Some(resources),
                security_context: Some(container_security()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The index of the replica capacity pod `pod` asks a node for (`None` for any other
/// pod).
pub fn capacity_index(pod: &impl PodFacts) -> Option<u32> {
    pod.label(LABEL_CAPACITY_FOR)?;
    let name = pod.pod_name()?;
    name.rsplit_once("-capacity-")?.1.parse().ok()
}

/// A required node affinity to `node` by name, as the DaemonSet controller pins its
/// pods: the scheduler still checks taints, resources, volumes and claims.
pub fn on_node(node: &str) -> Affinity {
    required(NodeSelectorTerm {
        match_fields: Some(vec![NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![node.into()]),
        }]),
        match_expressions: None,
    })
}

/// A required node affinity to a node other than `existing` (by
/// `kubernetes.io/hostname`): a node yet to come.
fn on_none_of(existing: Vec<String>) -> Affinity {
    required(NodeSelectorTerm {
        match_expressions: Some(vec![NodeSelectorRequirement {
            key: "kubernetes.io/hostname".into(),
            operator: "NotIn".into(),
            values: Some(existing),
        }]),
        match_fields: None,
    })
}

/// A pod affinity that requires a node matching `term`.
fn required(term: NodeSelectorTerm) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![term],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The Service in front of the serving replicas.
pub fn service(d: &InferenceDeployment) -> Service {
    let name = d.name_any();
    let mut selector = selector_labels(&name);
    selector.insert(LABEL_SERVING.into(), "true".into());
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: d.namespace(),
            labels: Some(selector_labels(&name)),
            owner_references: d.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: d.spec.worker.port.into(),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Whether the Service `have` already is what `want` applies: its selector, ports,
/// labels and controller owner (fields the API server defaults are not compared).
pub fn service_matches(have: &SeenService, want: &Service) -> bool {
    // The fields `service` sets; the API server fills others (nodePort, appProtocol),
    // and the store keeps only these (`SeenService`). Compared in place: this runs on
    // every pass of every deployment.
    let (have_spec, want_spec) = (have.spec.as_ref(), want.spec.as_ref());
    let selector_same =
        have_spec.and_then(|s| s.selector.as_ref()) == want_spec.and_then(|s| s.selector.as_ref());
    let have_ports = have_spec
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let want_ports = want_spec
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let ports_same = have_ports.len() == want_ports.len()
        && have_ports.iter().zip(want_ports).all(|(h, w)| {
            h.name == w.name
                && h.port == w.port
                && h.target_port == w.target_port
                && h.protocol == w.protocol
        });
    let owner = |meta| super::seen::controller_of(meta).map(|o| o.uid.as_str());
    let labels_kept = want
        .labels()
        .iter()
        .all(|(k, v)| have.labels().get(k) == Some(v));
    selector_same && ports_same && owner(&have.metadata) == owner(&want.metadata) && labels_kept
}

/// The placement recorded on a pod.
pub fn placement_of(pod: &impl PodFacts) -> Option<PodPlacement> {
    serde_json::from_str(pod.annotation(ANNOTATION_PLACEMENT)?).ok()
}

/// The replica index of a pod.
pub fn index_of(pod: &impl PodFacts) -> Option<u32> {
    pod.label(LABEL_REPLICA)?.parse().ok()
}

/// The merge patch that starts `pod`'s drain: out of the Service, with the time it
/// began. Its UID is in the patch, a precondition (the API refuses the patch with 409
/// where another pod now has the name), as the kubelet's status patches carry theirs.
pub fn drain_patch(pod: &impl PodFacts, now: jiff::Timestamp) -> serde_json::Value {
    serde_json::json!({"metadata": {
        "uid": pod.pod_uid(),
        "labels": {LABEL_SERVING: "false"},
        "annotations": {ANNOTATION_DRAINING_SINCE: now.to_string()},
    }})
}

/// How long a replica stays after it leaves the Service, empty or not, before it is
/// deleted: the EndpointSlice controller and then every node's kube-proxy learn of
/// the label change some time later, and clients holding the old list (the router,
/// the simulator's traffic) send to it until they do. Deleting it sooner sends it
/// SIGTERM, and the worker answers those requests 503. Kubernetes documents the
/// delay but not its length ("Pod termination": endpoint removal and the kubelet's
/// shutdown race; the usual remedy is a preStop sleep of a few seconds). kube-proxy
/// syncs at most once per `--iptables-min-sync-period` (1 s by default); 5 s covers
/// that, the EndpointSlice update before it and a client's own refresh.
pub const ENDPOINTS_SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// How far the drain of `pod` (out of the Service by its label) has gone at `now`,
/// with `timeout` as the drain's limit. A pod labelled out by hand, with no start
/// recorded, has nothing to wait for.
pub fn drain_stage(
    pod: &impl PodFacts,
    now: jiff::Timestamp,
    timeout: std::time::Duration,
) -> Drain {
    match drained_for(pod, now) {
        Some(t) if t > timeout => Drain::TimedOut,
        Some(t) if t < ENDPOINTS_SETTLE => Drain::Leaving,
        _ => Drain::Out,
    }
}

/// How long the pod has been draining, when it records the start.
fn drained_for(pod: &impl PodFacts, now: jiff::Timestamp) -> Option<std::time::Duration> {
    let since: jiff::Timestamp = pod.annotation(ANNOTATION_DRAINING_SINCE)?.parse().ok()?;
    Some(elapsed(since, now))
}

/// Time from `from` to `to` (zero when `to` is earlier).
pub fn elapsed(from: jiff::Timestamp, to: jiff::Timestamp) -> std::time::Duration {
    std::time::Duration::try_from(to.duration_since(from)).unwrap_or_default()
}

/// The base URL of the pod's worker, once it has an IP.
pub fn worker_url(pod: &impl PodFacts, port: u16) -> Option<String> {
    let ip = pod.facts().pod_ip?;
    Some(format!("http://{ip}:{port}"))
}

/// Whether the pod's Ready condition is true.
pub fn is_ready(pod: &impl PodFacts) -> bool {
    pod.facts()
        .ready
        .is_some_and(|c| c.status == ConditionStatus::True)
}

/// Why the pod cannot run, if it cannot (failed, or its container is stuck).
pub fn failure(pod: &impl PodFacts) -> Option<String> {
    let status = pod.facts();
    if status.phase == Some("Failed") {
        return Some(status.reason.unwrap_or("pod failed").into());
    }
    status.containers().find_map(|c| {
        let (reason, message) = c.waiting?;
        let reason = reason?;
        if ![
            "CrashLoopBackOff",
            "ImagePullBackOff",
            "ErrImagePull",
            "CreateContainerConfigError",
        ]
        .contains(&reason)
        {
            return None;
        }
        // The last run's termination message says why it stopped; the waiting
        // message only says that the kubelet backs off.
        let last = c.last_message.filter(|m| !m.trim().is_empty());
        Some(format!(
            "{reason}: {}",
            last.or(message).unwrap_or_default()
        ))
    })
}

/// The scheduler's message when it cannot place the pod (`PodScheduled=False`,
/// reason `Unschedulable`).
pub fn unschedulable(pod: &impl PodFacts) -> Option<String> {
    let c = pod.facts().scheduled?;
    (c.status == ConditionStatus::False && c.reason == Some("Unschedulable"))
        .then(|| c.message.unwrap_or_default().to_string())
}

/// Why the node's kubelet refused the pod at admission, if it did: the pod fails with
/// reason `UnexpectedAdmissionError` (the device plugin could not allocate what it
/// asks for) or `OutOf<resource>` (the node lacks it): the kubelet's admission
/// reasons (`ErrorReasonUnexpected` in k8s.io/kubernetes/pkg/kubelet/cm/admission, and
/// the predicate admit handler's `OutOf` prefix), which `kubectl describe pod` shows.
/// Placing the replica there again at once would fail the same way.
pub fn refused_at_admission(pod: &impl PodFacts) -> Option<String> {
    let status = pod.facts();
    let reason = status.reason?;
    (status.phase == Some("Failed")
        && (reason == "UnexpectedAdmissionError" || reason.starts_with("OutOf")))
    .then(|| format!("{reason}: {}", status.message.unwrap_or_default()))
}

/// The merge patch that records a replica's placement (after a correction).
pub fn placement_patch(p: &PodPlacement) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {
        ANNOTATION_PLACEMENT: serde_json::to_string(p).expect("placements serialize"),
    }}})
}

/// Whether `d` (this very object, by UID) controls the pod: pods of a deleted and
/// recreated deployment of the same name are not its replicas.
pub fn owned_by(pod: &impl PodFacts, d: &InferenceDeployment) -> bool {
    let uid = d.meta().uid.as_deref();
    uid.is_some() && pod.controller_uid() == uid
}
