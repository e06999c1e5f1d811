//! `InferenceDeployment`: one model served by a right-sized, placed set of worker pods.
// kube-derive's repeated `printcolumn(...)` arguments trip this lint; they are distinct columns.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::{EnvVar, LocalObjectReference, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of an InferenceDeployment. Only `model.name` and `model.source` are
/// required; everything else defaults to what the field has learned.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpuscale.dev",
    version = "v1alpha1",
    kind = "InferenceDeployment",
    plural = "inferencedeployments",
    shortname = "infd",
    category = "gpuscale",
    category = "all",
    namespaced,
    status = "InferenceDeploymentStatus",
    derive = "PartialEq",
    doc = "A model served by GPU-placed inference workers, scaled on queue depth.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.name"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(
        name = "Warm",
        type_ = "integer",
        json_path = ".status.warmReplicas",
        priority = "1"
    ),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queueDepth"),
    printcolumn(name = "GPUs", type_ = "string", json_path = ".status.gpuSummary"),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        json_path = ".status.rollout.phase"
    ),
    printcolumn(
        name = "Canary%",
        type_ = "integer",
        json_path = ".status.rollout.canaryWeight"
    ),
    printcolumn(
        name = "Placements",
        type_ = "string",
        json_path = ".status.placementSummary",
        priority = 1
    ),
    printcolumn(
        name = "USD/h",
        type_ = "number",
        json_path = ".status.cost.dollarsPerHour",
        priority = 1
    ),
    printcolumn(
        name = "USD/1M-tokens",
        type_ = "number",
        json_path = ".status.cost.dollarsPerMillionTokens",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.lastScaleReason",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
// Cross-field rules sit on the spec (defaults are applied before CEL runs, so every
// section is present); fieldPath points the error at the offending field.
#[x_kube(validation = Rule::new("!has(self.scaling.scaleToZeroAfterSeconds) || self.scaling.minReplicas == 0")
    .message("scaling.scaleToZeroAfterSeconds applies only with scaling.minReplicas 0")
    .field_path(".scaling.scaleToZeroAfterSeconds"))]
#[x_kube(validation = Rule::new("self.scaling.minReplicas <= self.scaling.maxReplicas")
    .message("scaling.minReplicas must not exceed scaling.maxReplicas")
    .field_path(".scaling.minReplicas"))]
#[x_kube(validation = Rule::new("self.scaling.warmReplicas <= self.scaling.maxReplicas")
    .message("scaling.warmReplicas must not exceed scaling.maxReplicas")
    .field_path(".scaling.warmReplicas"))]
#[x_kube(validation = Rule::new("self.resources.gpusPerReplica in [1, 2, 4, 8, 16]")
    .message("resources.gpusPerReplica must be 1, 2, 4, 8 or 16 (GPUs of one node per replica)")
    .field_path(".resources.gpusPerReplica"))]
#[x_kube(validation = Rule::new("self.resources.gpusPerReplica == 1 || self.resources.sharing == 'Exclusive'")
    .message("resources.gpusPerReplica > 1 needs whole GPUs: set resources.sharing to Exclusive")
    .field_path(".resources.sharing"))]
#[x_kube(validation = Rule::new("!self.resources.allowCpu || self.resources.gpusPerReplica == 1")
    .message("resources.allowCpu cannot be combined with resources.gpusPerReplica > 1")
    .field_path(".resources.allowCpu"))]
#[x_kube(validation = Rule::new("!has(self.resources.tensorParallel) || self.resources.tensorParallel == 1")
    .message("resources.tensorParallel was renamed resources.gpusPerReplica: a replica's GPUs split the model by layers, not tensors; set gpusPerReplica instead (tensorParallel: 1, which earlier versions filled in by default, is allowed and means nothing)")
    .field_path(".resources.tensorParallel"))]
#[x_kube(validation = Rule::new("self.rollout.steps[self.rollout.steps.size() - 1] == 100")
    .message("rollout.steps must end at 100 (the new version takes all traffic before it is promoted)")
    .field_path(".rollout.steps"))]
// Real Kubernetes has isSorted() in its list library; an index walk is portable CEL
// and bounded by the list's maxItems.
#[x_kube(validation = Rule::new("[0, 1, 2, 3, 4, 5, 6, 7, 8].all(i, i + 1 >= self.rollout.steps.size() || self.rollout.steps[i] < self.rollout.steps[i + 1])")
    .message("rollout.steps must rise (for example [10, 50, 100])")
    .field_path(".rollout.steps"))]
#[serde(rename_all = "camelCase")]
pub struct InferenceDeploymentSpec {
    /// The model to serve.
    pub model: ModelSpec,
    /// What one replica needs: sequence length and batch (which size the KV cache),
    /// GPUs per replica, GPU selection and sharing.
    #[serde(default)]
    pub resources: ResourcesSpec,
    /// Queue-depth autoscaling bounds and windows.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Where replicas go.
    #[serde(default)]
    pub placement: PlacementSpec,
    /// The worker pod.
    #[serde(default)]
    pub worker: WorkerSpec,
    /// How a new model version replaces the old one.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Replica count pinned by hand (`kubectl scale`); used only when
    /// `scaling.autoscale` is false, otherwise the autoscaler decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub replicas: Option<u32>,
}

/// The model file and how to read it.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(
    "has(self.format) || self.source.endsWith('.gguf') || self.source.endsWith('.safetensors')"
).message("cannot infer model.format from model.source: set model.format to gguf"))]
// Accepted and then crash-looping would be worse than a refusal: the worker reads GGUF only.
#[x_kube(validation = Rule::new(
    "(has(self.format) ? self.format : (self.source.endsWith('.safetensors') ? 'safetensors' : 'gguf')) != 'safetensors'"
).message("model.format safetensors is not supported yet: the worker loads GGUF only; convert the model with llama.cpp's convert_hf_to_gguf.py and point model.source at the .gguf file")
    .field_path(".format"))]
// Only a download is verified: a file:// or pvc:// model is read where it lies.
#[x_kube(validation = Rule::new(
    "!has(self.sha256) || self.source.startsWith('http://') || self.source.startsWith('https://')"
).message("model.sha256 verifies downloads: it applies to http(s):// sources only")
    .field_path(".sha256"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Model name, as served by `/v1/models` and used in requests.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Model version; changing it triggers a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub version: Option<String>,
    /// Where the weights are: `file:///path` on the node, `pvc://<claim>/<path>`,
    /// or an `http(s)://` URL.
    #[x_kube(validation = Rule::new("self.matches('^(file|pvc|https?)://.+')").message(
        "model.source must be a URI: file:///path/on/node, pvc://<claim>/<path>, http:// or https://"
    ))]
    #[schemars(length(min = 1, max = 2048))]
    pub source: String,
    /// File format; inferred from the source's extension when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ModelFormat>,
    /// Declared parameter count. Placement reads the real shapes from the file header
    /// when it can reach the file; this is the fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub parameters: Option<u64>,
    /// Declared weight type, the fallback when the file header is unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<WeightType>,
    /// SHA-256 of an `http(s)://` model (64 lowercase hex digits): the download into the
    /// node's cache is verified against it, and a mismatch is an error, never a served
    /// model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// Model file formats the worker loads.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// llama.cpp's GGUF.
    Gguf,
    /// Hugging Face safetensors: refused at admission until the worker loads it (see
    /// the rule on `ModelSpec`), so a deployment never crash-loops on it.
    Safetensors,
}

/// Weight element types, as named by llama.cpp.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    /// 32-bit float.
    #[serde(rename = "f32")]
    F32,
    /// 16-bit float.
    #[serde(rename = "f16")]
    F16,
    /// bfloat16.
    #[serde(rename = "bf16")]
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum.
    #[serde(rename = "q4_1")]
    Q4_1,
}

/// What one replica needs.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourcesSpec {
    /// Longest sequence (prompt + completion) a request may reach; sizes the KV cache.
    #[schemars(range(min = 16, max = 1048576))]
    pub max_sequence_length: u32,
    /// Sequences decoded together; the KV cache is budgeted for this many.
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: u32,
    /// GPUs per replica, all on one node (NVLink-connected where possible). The model
    /// is split by layers, a contiguous block per GPU (llama.cpp's `--split-mode
    /// layer`): a replica holds a model larger than one GPU and runs its blocks one GPU
    /// after another. Tensor parallelism (splitting each layer) is not implemented.
    #[schemars(range(min = 1, max = 16))]
    pub gpus_per_replica: u32,
    /// Renamed `gpusPerReplica` (the GPUs split the model by layers, not tensors); kept
    /// in the schema only to refuse it with that message. Objects stored by earlier
    /// versions carry `tensorParallel: 1` (a schema default then): that value is allowed
    /// and ignored, so they keep working after an upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor_parallel: Option<u32>,
    /// Extra VRAM kept free on top of the computed need, in percent of it.
    #[schemars(range(max = 100))]
    pub vram_headroom_percent: u32,
    /// Which GPUs qualify.
    pub gpu: GpuSelector,
    /// Whole GPUs per replica, or several replicas packed on one GPU by VRAM.
    pub sharing: SharingMode,
    /// Allow replicas on nodes without a GPU (the CPU backend).
    pub allow_cpu: bool,
}

impl Default for ResourcesSpec {
    fn default() -> Self {
        Self {
            max_sequence_length: 4096,
            max_batch_size: 8,
            gpus_per_replica: 1,
            tensor_parallel: None,
            vram_headroom_percent: 10,
            gpu: GpuSelector::default(),
            sharing: SharingMode::Exclusive,
            allow_cpu: false,
        }
    }
}

/// Filters on the GPUs a replica may use. Empty means any healthy GPU.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuSelector {
    /// Accepted products, matched as substrings of the NVML product name
    /// (for example `H100`, `A100-SXM4-80GB`, `L4`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub products: Vec<String>,
    /// Minimum total memory per GPU, in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "minMemoryGiB")]
    #[schemars(range(min = 1, max = 4096))]
    pub min_memory_gib: Option<u32>,
    /// Minimum CUDA compute capability, `major.minor` (for example `8.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+\\\\.[0-9]+$')")
        .message("resources.gpu.minComputeCapability must look like 8.0 or 9.0"))]
    #[schemars(length(max = 8))]
    pub min_compute_capability: Option<String>,
}

/// How replicas share GPUs.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SharingMode {
    /// Each replica gets whole GPUs.
    #[default]
    Exclusive,
    /// Several replicas may share one GPU; each gets a VRAM budget it enforces itself.
    Shared,
}

/// Queue-depth autoscaling.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ScalingSpec {
    /// Whether the autoscaler decides the replica count; when false, `spec.replicas`
    /// (or `minReplicas`) is used as is.
    pub autoscale: bool,
    /// Fewest replicas, kept even when idle.
    #[schemars(range(max = 1000))]
    pub min_replicas: u32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: u32,
    /// Replicas kept loaded and idle on top of demand, so a burst does not wait for
    /// weights to load.
    #[schemars(range(max = 100))]
    pub warm_replicas: u32,
    /// Waiting plus running requests one replica should carry.
    #[schemars(range(min = 1, max = 10000))]
    pub target_queue_depth: u32,
    /// Scale-up waits until demand has held this long, panic mode's included: it goes
    /// to the lowest replica count asked for over the window (0: act at once).
    #[schemars(range(max = 3600))]
    pub scale_up_window_seconds: u32,
    /// Scale-down waits until lower demand has held at least this long; with
    /// `scaleDownWindowMode: Adaptive` (the default) longer after scale-downs that were
    /// reversed.
    #[schemars(range(max = 86400))]
    pub scale_down_window_seconds: u32,
    /// `Adaptive`: after scale-downs that a scale-up reversed within five minutes
    /// (needless cold starts), scale-down waits long enough to have bridged those dips
    /// (at most 300 s, for an hour after the last one), and the status's reason says
    /// so. `Fixed`: exactly `scaleDownWindowSeconds`, as the HPA's stabilisation window.
    pub scale_down_window_mode: ScaleDownWindowMode,
    /// Short window over which a queue growing faster than capacity triggers an
    /// immediate scale-up (panic mode).
    #[schemars(range(min = 1, max = 600))]
    pub panic_window_seconds: u32,
    /// Pre-warm: also scale for the demand forecast one measured cold start ahead
    /// (Holt's linear trend over the recent demand), never below the reactive rule.
    pub predictive: bool,
    /// With `minReplicas: 0`: how long the deployment must have had no request before
    /// its last replica goes (default 300). Requests that arrive at zero replicas are
    /// held by the request router until a replica is ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 86400))]
    pub scale_to_zero_after_seconds: Option<u32>,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            autoscale: true,
            min_replicas: 1,
            max_replicas: 1,
            warm_replicas: 0,
            target_queue_depth: 4,
            scale_up_window_seconds: 0,
            scale_down_window_seconds: 300,
            scale_down_window_mode: ScaleDownWindowMode::Adaptive,
            panic_window_seconds: 6,
            predictive: false,
            scale_to_zero_after_seconds: None,
        }
    }
}

/// Whether the scale-down window lengthens after scale-downs that were reversed.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScaleDownWindowMode {
    /// `scaleDownWindowSeconds`, lengthened after needless cold starts: fewer flaps,
    /// for the GPU time the longer hold costs.
    #[default]
    Adaptive,
    /// Exactly `scaleDownWindowSeconds`.
    Fixed,
}

/// Placement policy.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct PlacementSpec {
    /// BinPack keeps whole GPUs free; Spread balances load across nodes.
    pub strategy: PlacementStrategy,
    /// Failure domain this deployment's replicas are spread across.
    pub spread_across: SpreadDomain,
    /// For gpusPerReplica > 1: refuse GPU sets that are not one NVLink domain
    /// (otherwise NVLink is only preferred).
    pub require_nvlink: bool,
}

/// Placement strategies.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PlacementStrategy {
    /// Fill partly used GPUs first, keeping large blocks free.
    #[default]
    BinPack,
    /// Prefer the emptiest nodes.
    Spread,
}

/// Failure domains for spreading one deployment's replicas.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SpreadDomain {
    /// Prefer distinct nodes (`kubernetes.io/hostname`).
    #[default]
    Node,
    /// Prefer distinct zones (`topology.kubernetes.io/zone`).
    Zone,
    /// No spreading.
    None,
}

/// The worker pod.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkerSpec {
    /// Worker image. Unset (the usual case): the image released with the operator, so
    /// an upgrade of the operator rolls the workers to its version (as a canary). Set
    /// it to pin a version or to use your own build.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Secrets in the deployment's namespace for pulling `image`, in addition to the
    /// ones the operator is installed with (chart value `imagePullSecrets`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// HTTP port of the OpenAI-compatible API and `/metrics`.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Extra environment variables.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// CPU and memory for the worker container (GPUs are set by placement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_secrets: Vec::new(),
            port: 8080,
            env: Vec::new(),
            resources: None,
        }
    }
}

/// How a new version replaces the old one: a canary that takes a rising share of the
/// traffic through the request router, step by step, each step gated on what the
/// routers measure for the new version against the stable one over the same window.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RolloutSpec {
    /// Replicas started above the desired count while the old version still serves.
    /// 0 replaces in place: an old replica is drained before each new one starts, so
    /// capacity dips by one replica at a time.
    #[schemars(range(max = 100))]
    pub max_surge: u32,
    /// The new version's share of traffic at each step, in percent: rising, ending at
    /// 100. After the last step's hold, the new version is promoted.
    #[schemars(length(min = 1, max = 10), inner(range(min = 1, max = 100)))]
    pub steps: Vec<u32>,
    /// How long each step holds once the new version's replicas for it are ready,
    /// before the next step (its observation window).
    #[schemars(range(min = 1, max = 86400))]
    pub step_seconds: u32,
    /// New-version replicas that are not ready this long after the rollout (or its
    /// step) asked for them roll it back.
    #[schemars(range(min = 10, max = 86400))]
    pub ready_timeout_seconds: u32,
    /// Roll back when the new version's error ratio (5xx answers and answers cut
    /// short) over the step's window exceeds this, in percent.
    #[schemars(range(max = 100))]
    pub rollback_error_percent: u32,
    /// Roll back when the new version's p95 time to first token or p95 inter-token
    /// latency over the step's window exceeds the stable version's by more than this,
    /// in percent (50: 1.5 times as slow).
    #[schemars(range(max = 10000))]
    pub rollback_latency_percent: u32,
    /// New-version answers a step needs before its latency is compared and before an
    /// error ratio rolls back early (with fewer, the ratio is judged when the hold ends).
    #[schemars(range(min = 1, max = 100000))]
    pub min_requests: u32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_surge: 1,
            steps: vec![10, 50, 100],
            step_seconds: 60,
            ready_timeout_seconds: 600,
            rollback_error_percent: 5,
            rollback_latency_percent: 50,
            min_requests: 20,
        }
    }
}

/// What a deployment costs, at the operator's GPU price table.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CostStatus {
    /// US dollars per hour for the GPUs its replicas hold now (loading and draining
    /// replicas included: their GPUs are held), at the price of each GPU's product.
    pub dollars_per_hour: f64,
    /// US dollars per million generated tokens over the last window (`window_seconds`):
    /// the hourly cost over the tokens per hour; absent while nothing was generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dollars_per_million_tokens: Option<f64>,
    /// Generated tokens per second over the window.
    #[serde(default)]
    pub tokens_per_second: f64,
    /// The window the token rate is measured over, in seconds.
    #[serde(default)]
    pub window_seconds: u32,
    /// GPUs whose product has no price in the table (not counted in the cost).
    #[serde(default)]
    pub unpriced_gpus: u32,
}

/// Observed state, written by the operator.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceDeploymentStatus {
    /// Replica pods that exist.
    #[serde(default)]
    pub replicas: u32,
    /// Replicas whose worker reports ready.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Replicas the autoscaler (or a pinned `spec.replicas`) wants.
    #[serde(default)]
    pub desired_replicas: u32,
    /// Ready replicas held idle as warm capacity.
    #[serde(default)]
    pub warm_replicas: u32,
    /// Waiting plus running requests across ready replicas at the last scrape.
    #[serde(default)]
    pub queue_depth: u32,
    /// Requests per second across replicas at the last scrape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<f64>,
    /// What the replicas cost at the operator's GPU price table (chart value
    /// `pricing.gpuHourlyUSD`); absent without a price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostStatus>,
    /// Measured time from pod creation to ready, the latest replica's, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_ready_seconds: Option<f64>,
    /// Short summary for `kubectl get`: GPU count and VRAM reserved (for example `2 / 9.1Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_summary: Option<String>,
    /// Per replica, for `kubectl get -o wide`: node, GPUs held and how they were bound
    /// (for example `smollm-0 sim-a100-0 [GPU-…-3] DraClaim`), `;`-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_summary: Option<String>,
    /// Where each replica runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<ReplicaPlacement>,
    /// Ready (what `kubectl wait --for=condition=Ready` and GitOps health checks read),
    /// Available, Progressing, Unschedulable, InvalidSpec, Promoted; one of each type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the replica count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why the replica count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// Label selector of the replica pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// What the autoscaler must not forget when the operator restarts or the leader
    /// changes (with `measuredReadySeconds`): a failover neither scales down early nor
    /// forgets a panic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<AutoscalerMemory>,
    /// What the operator learned of the model file and how; reused until
    /// `model.source` or `model.version` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
    /// The serving version and the rollout of a new one, kept here so that a
    /// restarted operator resumes at the same step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Where a rollout stands.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Stable` (one version serves), `Progressing` (a canary takes a share) or
    /// `RolledBack` (the new version failed its gate; the stable one stays until the
    /// spec changes again).
    pub phase: RolloutPhase,
    /// The version that serves all traffic but the canary's share.
    pub stable: Revision,
    /// The new version: in progress, or the one rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Revision>,
    /// Index in `rollout.steps` of the step in progress.
    #[serde(default)]
    pub step: u32,
    /// The canary's share of traffic now, in percent: 0 until its replicas for the step
    /// are ready.
    #[serde(default)]
    pub canary_weight: u32,
    /// When the step asked for its replicas (the ready timeout runs from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_asked_at: Option<Time>,
    /// When the step's window began: its replicas ready and its share routed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// The last promotion, step or rollback, with its numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A rollout's phase.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutPhase {
    /// One version serves.
    Stable,
    /// A canary takes a share of the traffic.
    Progressing,
    /// The canary failed its gate and was removed; the stable version stays pinned
    /// until the spec changes again.
    RolledBack,
}

/// One version of the pods: what they are built from, by its template hash.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// The pod-template hash (each pod's `gpuscale.dev/template` label).
    pub name: String,
    /// The model it serves.
    pub model: ModelSpec,
    /// What one replica needs.
    pub resources: ResourcesSpec,
    /// The worker pod.
    pub worker: WorkerSpec,
    /// Bytes one replica reserves (weights, KV cache, workspace), as sized.
    pub need_bytes: u64,
}

/// The model as the operator sized it.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// The `model.source` this describes.
    pub source: String,
    /// The `model.version` this describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where the size came from: the file's header, or the declared
    /// `model.parameters` and `model.dtype` (an estimate) when it could not be read.
    pub sized_from: SizedFrom,
    /// How the header was read: `http range request` or `probe pod NAME on NODE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_by: Option<String>,
    /// Why the header could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The header's facts (`inference-worker inspect MODEL --json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<gguf::ModelSummary>,
    /// When it was read (or the read failed).
    pub observed_at: Time,
}

/// Where a replica's size came from.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizedFrom {
    /// The model file's header.
    Header,
    /// The declared `model.parameters` and `model.dtype`.
    Declared,
    /// Neither: the header is unreadable and nothing is declared.
    Unsized,
}

/// The autoscaler's memory, kept in status.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerMemory {
    /// Recommendations that still bound a scale-down, oldest first, each higher than
    /// every later one. The last is the current recommendation, with the time it was
    /// first made; after a restart it is taken as still current.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<Recommendation>,
    /// Panic mode, which forbids scaling down, lasts until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_until: Option<Time>,
}

/// One remembered recommendation.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// Replicas recommended.
    pub replicas: u32,
    /// When (the last time, or for the current one the first time).
    pub time: Time,
}

/// One replica's placement.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    /// Pod name.
    pub pod: String,
    /// Node name.
    pub node: String,
    /// GPU UUIDs, where known (empty on the CPU backend, and on nodes known only by
    /// GPU Feature Discovery labels, where the device plugin picks the device).
    #[serde(default)]
    pub gpus: Vec<String>,
    /// GPUs the replica holds; more than `gpus` lists means their UUIDs are unknown.
    #[serde(default)]
    pub gpu_count: u32,
    /// VRAM reserved per GPU, in bytes.
    pub vram_reserved_bytes: u64,
    /// Lifecycle state of the replica.
    pub state: ReplicaState,
    /// How its GPUs were bound to the pod (absent on the CPU backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<GpuBinding>,
    /// The ResourceClaim that holds its GPUs, when bound through DRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// The GPUs' product name, as placement saw it (absent on the CPU backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
}

/// How a replica's GPUs were bound to its pod.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuBinding {
    /// A ResourceClaim whose selector names the GPUs by UUID (DRA): the scheduler
    /// allocated exactly the GPUs placement chose.
    DraClaim,
    /// A share of a named GPU through a ResourceClaim requesting consumable memory
    /// capacity of a device that allows multiple allocations (DRA).
    DraSharedClaim,
    /// Whole GPUs counted out by the device plugin (`nvidia.com/gpu`): it picked which,
    /// and `gpus` lists what it assigned once the worker reported them.
    DevicePlugin,
    /// A share through the device plugin's GPU sharing resource (time-slicing or MPS);
    /// the plugin picked the GPU.
    SharingResource,
}

/// Lifecycle of a replica.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Pod created; weights loading.
    Loading,
    /// Serving.
    Ready,
    /// Loaded and idle, held as warm capacity.
    Warm,
    /// No longer admitting; finishing in-flight requests before deletion.
    Draining,
    /// Failed to become ready.
    Failed,
}
