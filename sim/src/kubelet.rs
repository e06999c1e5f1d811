//! The simulated kubelet of one simulated node: registers the Node, publishes its
//! simulated GPUs as a GpuInventory (through the real node agent's publish), and runs
//! each pod bound to the node as a local process of the real `inference-worker` —
//! reporting pod IP, readiness from the worker's `/readyz`, and a crash as
//! CrashLoopBackOff; on deletion it sends SIGTERM, waits out the grace period, and only
//! then removes the pod.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gpuscale_crds::{GpuAssignment, GpuDevice, GpuInventorySpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::dra;
use super::nodes::{SimBinding, SimNode, SHARED_RESOURCE};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};

/// What every simulated kubelet shares.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// The `inference-worker` binary.
    pub worker_bin: PathBuf,
    /// Node paths (hostPath volumes) and the local directories they stand for.
    pub host_paths: Vec<(String, PathBuf)>,
    /// Compute threads per worker (the simulated CPU limit).
    pub threads: usize,
    /// Where each pod's worker writes its log.
    pub log_dir: PathBuf,
    /// Each node's own filesystem: a node path outside `host_paths` is
    /// `<node_root>/<node>/<path>`, so what one node writes (a model cache) the others
    /// do not see, and no pod reaches this machine's real paths.
    pub node_root: PathBuf,
}

impl KubeletConfig {
    /// The local path standing for `path` on `node`.
    pub fn node_path(&self, node: &str, path: &str) -> PathBuf {
        for (prefix, dir) in &self.host_paths {
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return PathBuf::from(format!("{}{rest}", dir.display()));
                }
            }
        }
        self.node_root.join(node).join(path.trim_start_matches('/'))
    }
}

impl KubeletConfig {
    /// One compute thread per worker; the nodes' `/models` is `models`.
    pub fn new(worker_bin: PathBuf, models: PathBuf, log_dir: PathBuf) -> Self {
        Self {
            worker_bin,
            host_paths: vec![("/models".into(), models)],
            threads: 1,
            node_root: log_dir.with_file_name("nodes"),
            log_dir,
        }
    }
}

/// Hands out pod IPs: every worker gets its own loopback address, so all can listen on
/// the same port as pods do. Addresses are unique across every cluster in the process
/// (one counter) and, through the pid, across processes.
fn pod_ip() -> String {
    static NEXT_IP: AtomicU32 = AtomicU32::new(0);
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    let block = 1 + std::process::id() % 250;
    format!("127.{block}.{}.{}", (n / 250) % 250, n % 250 + 2)
}

use crate::now_rfc3339 as now;

/// A worker process of a pod.
#[derive(Clone, Copy, Debug)]
struct Worker {
    pid: u32,
    /// Termination began: its exit is no crash.
    stopping: bool,
}

type Running = Arc<Mutex<HashMap<String, Worker>>>;

/// The node's simulated NVIDIA device plugin, as the kubelet's device manager drives it
/// (<https://kubernetes.io/docs/concepts/extend-kubernetes/compute-storage-net/device-plugins/>):
/// a pod's `nvidia.com/gpu` limit is allocated from the free devices when the pod is
/// admitted, by the plugin's own order (highest index first: which GPUs a pod gets is
/// the plugin's choice, never the requester's), handed to the container as
/// `NVIDIA_VISIBLE_DEVICES`, and held while the pod is active: a crashed container
/// keeps them, a pod that ended (Succeeded or Failed) or is gone from the API gives
/// them back. The kubelet's device manager keys allocations by pod UID and frees those
/// of pods no longer active before each allocation and each PodResources listing
/// (`UpdateAllocatedDevices`, "frees any Devices that are bound to terminated pods", in
/// kubernetes/pkg/kubelet/cm/devicemanager/manager.go); a pod deleted before it was
/// admitted is never admitted. Too few free devices fail the pod with
/// `UnexpectedAdmissionError`, as the kubelet does. With time-slicing (`replicas` shares per GPU, advertised as
/// `nvidia.com/gpu.shared`) a share goes to the highest-index GPU with one left.
/// Devices a DRA claim allocated to a pod are listed beside them, as the PodResources
/// API lists both.
#[derive(Debug, Default)]
pub struct DevicePlugin {
    /// Device UUIDs by index.
    uuids: Vec<String>,
    /// Time-slicing shares per GPU (0: whole GPUs only).
    replicas: u32,
    /// Whole devices held, by pod UID.
    held: HashMap<String, Vec<usize>>,
    /// The GPU of each pod (by UID) holding a time-sliced share.
    shared: HashMap<String, usize>,
    /// Devices prepared for a pod (by UID) from its allocated DRA claims.
    claimed: HashMap<String, Vec<usize>>,
    /// `namespace/name` of each pod (by UID) holding devices, for the listing.
    names: HashMap<String, String>,
    /// UIDs of pods that ended or are gone: never admitted again.
    ended: std::collections::HashSet<String>,
}

type Devices = Arc<Mutex<DevicePlugin>>;

/// Who a pod is to the device plugin: its UID and `namespace/name`.
struct PodId {
    uid: String,
    name: String,
}

impl PodId {
    fn of(pod: &Pod) -> PodId {
        PodId {
            uid: pod.uid().unwrap_or_default(),
            name: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
        }
    }
}

impl DevicePlugin {
    /// Admits `pod`: refused if it already ended or is gone (deleted while the kubelet
    /// was still setting it up), else remembered under its UID.
    fn admit(&mut self, pod: &PodId) -> Result<(), String> {
        if self.ended.contains(&pod.uid) {
            return Err(format!("pod {} is no longer active", pod.name));
        }
        self.names.insert(pod.uid.clone(), pod.name.clone());
        Ok(())
    }

    fn allocate(&mut self, pod: &PodId, n: usize) -> Result<Vec<String>, String> {
        self.admit(pod)?;
        let pod = pod.uid.as_str();
        if let Some(have) = self.held.get(pod) {
            return Ok(have.iter().map(|&i| self.uuids[i].clone()).collect());
        }
        let taken: Vec<usize> = self.held.values().flatten().copied().collect();
        let free: Vec<usize> = (0..self.uuids.len())
            .rev()
            .filter(|i| !taken.contains(i))
            .collect();
        if free.len() < n {
            return Err(format!(
                "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. \
                 Requested: {n}, Available: {}, which is unexpected",
                free.len()
            ));
        }
        let mine: Vec<usize> = free[..n].to_vec();
        let uuids = mine.iter().map(|&i| self.uuids[i].clone()).collect();
        self.held.insert(pod.to_string(), mine);
        Ok(uuids)
    }

    fn allocate_share(&mut self, pod: &PodId) -> Result<String, String> {
        self.admit(pod)?;
        let pod = pod.uid.as_str();
        if let Some(&g) = self.shared.get(pod) {
            return Ok(self.uuids[g].clone());
        }
        let used = |g: usize| self.shared.values().filter(|&&x| x == g).count() as u32;
        let Some(g) = (0..self.uuids.len())
            .rev()
            .find(|&g| used(g) < self.replicas)
        else {
            return Err(format!(
                "Allocate failed due to requested number of devices unavailable for {SHARED_RESOURCE}. \
                 Requested: 1, Available: 0, which is unexpected"
            ));
        };
        self.shared.insert(pod.to_string(), g);
        Ok(self.uuids[g].clone())
    }

    /// What the PodResources API lists, by pod (`namespace/name` keys): the device
    /// plugin's devices, and with `dra` the devices of claims too.
    fn listed(&self, dra: bool) -> Vec<GpuAssignment> {
        let shares = self.shared.iter().map(|(pod, &g)| (pod, vec![g]));
        let claimed = self.claimed.iter().filter(|_| dra);
        let mut out: Vec<GpuAssignment> = self
            .held
            .iter()
            .chain(claimed)
            .map(|(pod, ix)| (pod, ix.clone()))
            .chain(shares)
            .map(|(uid, ix)| {
                let key = self.names.get(uid).map(String::as_str).unwrap_or_default();
                let (namespace, pod) = key.split_once('/').unwrap_or(("", key));
                let mut gpus: Vec<String> = ix.iter().map(|&i| self.uuids[i].clone()).collect();
                gpus.sort();
                GpuAssignment {
                    namespace: namespace.into(),
                    pod: pod.into(),
                    gpus,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        out
    }

    /// The pod with UID `uid` ended or is gone: its devices go back, and it is never
    /// admitted again.
    fn release(&mut self, uid: &str) {
        self.held.remove(uid);
        self.shared.remove(uid);
        self.claimed.remove(uid);
        self.names.remove(uid);
        self.ended.insert(uid.to_string());
    }

    /// Whether the pod with UID `uid` ended or is gone.
    fn ended(&self, uid: &str) -> bool {
        self.ended.contains(uid)
    }
}

/// The node agent of a simulated node: publishes the GpuInventory again whenever the
/// device plugin's assignments change, with them (as the real agent lists them from
/// the kubelet's PodResources API; see `gpuscale_operator::pod_resources`).
async fn node_agent(client: Client, node: SimNode, uid: String, devices: Devices) {
    let mut last: Option<Vec<GpuAssignment>> = None;
    loop {
        let now = devices.lock().expect("devices lock").listed(false);
        if last.as_ref() != Some(&now) {
            let mut spec = inventory(&node);
            spec.assignments = now.clone();
            match gpuscale_operator::node_agent::publish(&client, spec, Some(&uid)).await {
                Ok(_) => last = Some(now),
                Err(e) => tracing::debug!(node = %node.name, error = %e, "inventory not published"),
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A running simulated kubelet.
pub struct Kubelet {
    node: String,
    spec: SimNode,
    task: tokio::task::JoinHandle<()>,
    running: Running,
    devices: Devices,
}

impl Kubelet {
    /// Registers `node` and starts serving the pods bound to it.
    pub async fn start(
        client: Client,
        node: SimNode,
        config: KubeletConfig,
    ) -> anyhow::Result<Self> {
        let uid = register(&client, &node).await?;
        if node.agent {
            gpuscale_operator::node_agent::publish(&client, inventory(&node), Some(&uid)).await?;
        }
        let replicas = match node.binding {
            SimBinding::Dra { shareable } => {
                // The DRA driver's kubelet plugin publishes the node's devices.
                let slice = dra::resource_slice(&node, &uid, shareable);
                let api: Api<ResourceSlice> = Api::all(client.clone());
                match api
                    .create(&PostParams::default(), &serde_json::from_value(slice)?)
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
                0
            }
            SimBinding::DevicePlugin { replicas } => replicas,
        };
        let running: Running = Arc::default();
        let devices: Devices = Arc::new(Mutex::new(DevicePlugin {
            uuids: (0..node.gpus.len())
                .map(|i| dra::uuid(&node.name, i))
                .collect(),
            replicas,
            ..DevicePlugin::default()
        }));
        let name = node.name.clone();
        let spec = node.clone();
        let agent = node
            .agent
            .then(|| node_agent(client.clone(), node.clone(), uid.clone(), devices.clone()));
        let kubelet = serve(
            client,
            name.clone(),
            config,
            running.clone(),
            devices.clone(),
        );
        // The kubelet and the node's agent stop together, as the node does.
        let task = tokio::spawn(async move {
            match agent {
                Some(agent) => {
                    tokio::join!(kubelet, agent);
                }
                None => kubelet.await,
            }
        });
        Ok(Self {
            node: name,
            spec,
            task,
            running,
            devices,
        })
    }

    /// The GPUs each pod holds, by pod name, as the kubelet's PodResources API lists
    /// them: devices of the device plugin (whole or a time-sliced share) and of DRA
    /// claims.
    pub fn assignments(&self) -> HashMap<String, Vec<String>> {
        let d = self.devices.lock().expect("devices lock");
        d.listed(true)
            .into_iter()
            .map(|a| (a.pod, a.gpus))
            .collect()
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node as it was simulated.
    pub fn spec(&self) -> &SimNode {
        &self.spec
    }

    /// SIGKILLs the worker of `pod`, if this kubelet runs it.
    pub fn kill_worker(&self, pod: &str) -> bool {
        let pid = self
            .running
            .lock()
            .expect("running lock")
            .get(pod)
            .map(|w| w.pid);
        if let Some(pid) = pid {
            signal(pid, "KILL");
        }
        pid.is_some()
    }

    /// Pids of the workers this kubelet runs, by pod name.
    pub fn workers(&self) -> HashMap<String, u32> {
        let running = self.running.lock().expect("running lock");
        running.iter().map(|(k, w)| (k.clone(), w.pid)).collect()
    }

    /// The node dies: the kubelet stops, and with it every worker (their tasks drop
    /// the child processes, which kills them); nothing more reaches the API.
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn signal(pid: u32, sig: &str) {
    // `kill` rather than libc: no unsafe code for a simulator.
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// The Node object a simulated node registers (see `register`).
pub fn node_object(node: &SimNode) -> serde_json::Value {
    let mut labels = json!({"kubernetes.io/hostname": node.name, "gpuscale.dev/simulated": "true"});
    if let Some(zone) = &node.zone {
        labels["topology.kubernetes.io/zone"] = json!(zone);
    }
    if !node.agent {
        if let Some(g) = node.gpus.first() {
            labels["nvidia.com/gpu.count"] = json!(node.gpus.len().to_string());
            labels["nvidia.com/gpu.memory"] = json!((g.memory_bytes >> 20).to_string());
            labels["nvidia.com/gpu.product"] = json!(g.product.replace(' ', "-"));
        }
    }
    let mut capacity = json!({"cpu": "16", "memory": "128Gi", "pods": "110"});
    match node.binding {
        SimBinding::DevicePlugin { replicas: 0 } => {
            capacity["nvidia.com/gpu"] = json!(node.gpus.len().to_string());
        }
        SimBinding::DevicePlugin { replicas } => {
            capacity[SHARED_RESOURCE] = json!((node.gpus.len() as u32 * replicas).to_string());
        }
        SimBinding::Dra { .. } => {}
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name, "labels": labels},
        "spec": {},
        "status": {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "simulated kubelet is posting ready status",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "nodeInfo": {"kubeletVersion": "v1.34.0-gpuscale-sim", "architecture": "amd64",
                         "operatingSystem": "linux", "osImage": "gpuscale simulated node",
                         "containerRuntimeVersion": "process://", "kernelVersion": "",
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        },
    })
}

/// Registers the Node: its allocatable GPU resources as its binding makes them (the
/// device plugin's `nvidia.com/gpu`, or only `nvidia.com/gpu.shared` under
/// time-slicing, or none where the DRA driver binds them), and GPU Feature Discovery
/// labels where no node agent runs. Returns the Node's UID.
async fn register(client: &Client, node: &SimNode) -> anyhow::Result<String> {
    let api: Api<Node> = Api::all(client.clone());
    let obj: Node = serde_json::from_value(node_object(node))?;
    let made = match api.create(&PostParams::default(), &obj).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(&node.name).await?,
        Err(e) => return Err(e.into()),
    };
    Ok(made.uid().unwrap_or_default())
}

/// The inventory NVML would report for the node's simulated GPUs.
pub fn inventory(node: &SimNode) -> GpuInventorySpec {
    let gpus: Vec<GpuDevice> = node
        .gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let i = i as u32;
            let peers = node
                .nvlink
                .iter()
                .find(|island| island.contains(&i))
                .map(|island| island.iter().copied().filter(|p| *p != i).collect())
                .unwrap_or_default();
            GpuDevice {
                index: i,
                uuid: dra::uuid(&node.name, i as usize),
                product: g.product.clone(),
                memory_total_bytes: g.memory_bytes,
                memory_free_bytes: g.memory_bytes,
                compute_capability: None,
                nvlink_peers: peers,
                numa_node: None,
                health: Default::default(),
            }
        })
        .collect();
    GpuInventorySpec {
        node: node.name.clone(),
        gpu_count: gpus.len() as u32,
        product: gpus.first().map(|g| g.product.clone()),
        zone: node.zone.clone(),
        gpus,
        message: Some("simulated GPUs (gpuscale simulator)".into()),
        observed_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        )),
        assignments: Vec::new(),
    }
}

async fn serve(
    client: Client,
    node: String,
    config: KubeletConfig,
    running: Running,
    devices: Devices,
) {
    // Every pod task lives in this set: when the kubelet stops, they all do.
    let mut tasks = tokio::task::JoinSet::new();
    let pods: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher::watcher(pods.clone(), cfg).boxed();
    // Pods this kubelet has started (by UID: a name comes back when a replica is
    // recreated) and whether termination began.
    let mut started: HashMap<String, bool> = HashMap::new();
    while let Some(ev) = stream.next().await {
        while tasks.try_join_next().is_some() {}
        let pods_seen: Vec<Pod> = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
            Ok(watcher::Event::Delete(p)) => {
                // Gone from the API: its devices go back to the plugin.
                devices
                    .lock()
                    .expect("devices lock")
                    .release(&p.uid().unwrap_or_default());
                started.remove(&p.uid().unwrap_or_default());
                // Force-deleted behind our back: stop the worker.
                if let Some(w) = running.lock().expect("running lock").get_mut(&p.name_any()) {
                    w.stopping = true;
                    signal(w.pid, "KILL");
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(%node, error = %e, "kubelet watch");
                continue;
            }
        };
        for pod in pods_seen {
            let key = pod.uid().unwrap_or_default();
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let api: Api<Pod> = Api::namespaced(
                pods.clone().into_client(),
                &pod.namespace().unwrap_or_default(),
            );
            match (started.get(&key).copied(), terminating) {
                (None, false) => {
                    started.insert(key, false);
                    tasks.spawn(run_pod(
                        api,
                        pod,
                        config.clone(),
                        running.clone(),
                        devices.clone(),
                    ));
                }
                (None, true) => {
                    // Never started: nothing to stop.
                    let _ = api.delete(&pod.name_any(), &stopped(&pod)).await;
                }
                (Some(false), true) => {
                    started.insert(key, true);
                    let grace = pod
                        .metadata
                        .deletion_grace_period_seconds
                        .unwrap_or(30)
                        .max(0) as u64;
                    let pid = running
                        .lock()
                        .expect("running lock")
                        .get_mut(&pod.name_any())
                        .map(|w| {
                            w.stopping = true;
                            w.pid
                        });
                    let running = running.clone();
                    tasks.spawn(async move {
                        if let Some(pid) = pid {
                            signal(pid, "TERM");
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(grace);
                            let alive = || {
                                running
                                    .lock()
                                    .expect("running lock")
                                    .contains_key(&pod.name_any())
                            };
                            while tokio::time::Instant::now() < deadline && alive() {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            if alive() {
                                signal(pid, "KILL");
                            }
                        }
                        let _ = api.delete(&pod.name_any(), &stopped(&pod)).await;
                    });
                }
                _ => {}
            }
        }
    }
}

/// How a kubelet deletes a pod whose containers have stopped: at once, and only that
/// pod. The kubelet's status manager sets the pod's UID as a precondition "to prevent
/// deleting a newly created pod with the same name and namespace" (kubernetes
/// `pkg/kubelet/status/status_manager.go`); a delete by name alone, late behind other
/// work, removed the replica the operator had made again in its place.
pub fn stopped(pod: &Pod) -> DeleteParams {
    DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default().grace_period(0)
    }
}

/// Where a container's termination message is written ([`KubeletConfig::log_dir`]
/// stands in for the file the kubelet mounts at its `terminationMessagePath`).
fn termination_file(config: &KubeletConfig, pod: &str) -> PathBuf {
    config.log_dir.join(format!("{pod}.termination-log"))
}

/// Rewrites the container's arguments for a local process: the pod IP to listen on,
/// the CPU backend (the GPUs are simulated), a thread cap for a serving worker, node
/// paths mapped to local directories through the pod's hostPath volumes, and the
/// termination message path to the file standing in for it.
fn command_line(pod: &Pod, ip: &str, config: &KubeletConfig) -> Vec<String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let c = spec.containers.first().cloned().unwrap_or_default();
    let termination = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let mounts: Vec<(String, String)> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let v = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
            Some((m.mount_path.clone(), v.host_path.as_ref()?.path.clone()))
        })
        .collect();
    let node = spec.node_name.clone().unwrap_or_default();
    let local = |path: &str| -> String {
        if path == termination {
            return termination_file(config, &pod.name_any())
                .display()
                .to_string();
        }
        for (mount, host) in &mounts {
            if let Some(rest) = path.strip_prefix(mount.as_str()) {
                return config
                    .node_path(&node, &format!("{host}{rest}"))
                    .display()
                    .to_string();
            }
        }
        path.to_string()
    };
    let args = c.args.unwrap_or_default();
    // A subcommand (`inspect`) is a one-shot tool, not the server.
    let serving = args.first().is_none_or(|a| a.starts_with("--"));
    let mut args: Vec<String> = args
        .into_iter()
        .filter(|a| !a.starts_with("--threads"))
        .map(|a| match a.split_once('=') {
            Some(("--host", _)) => format!("--host={ip}"),
            // Each GPU becomes a CPU part, so a multi-GPU replica runs the same layer
            // split on the simulated node as on the real one.
            Some(("--device", v)) => {
                format!("--device={}", vec!["cpu"; v.split(',').count()].join(","))
            }
            Some((k, v)) if v.starts_with('/') => format!("{k}={}", local(v)),
            _ if a.starts_with('/') => local(&a),
            _ => a,
        })
        .collect();
    if serving {
        args.push(format!("--threads={}", config.threads));
    }
    args
}

async fn run_pod(
    api: Api<Pod>,
    pod: Pod,
    config: KubeletConfig,
    running: Running,
    devices: Devices,
) {
    let name = pod.name_any();
    let ip = pod_ip();
    // Claims are mounted through their bound volumes' host paths (the only volumes the
    // simulated provisioner makes).
    let mut pod = pod;
    let client = api.clone().into_client();
    let ns = pod.namespace().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    for v in pod
        .spec
        .iter_mut()
        .flat_map(|s| s.volumes.iter_mut().flatten())
    {
        // An emptyDir is a directory the kubelet makes for the pod, where it keeps it
        // (<https://kubernetes.io/docs/concepts/storage/volumes/#emptydir>).
        if v.empty_dir.take().is_some() {
            v.host_path = Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                path: format!(
                    "/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/{}",
                    v.name
                ),
                type_: Some("DirectoryOrCreate".into()),
            });
            continue;
        }
        let Some(claim) = v.persistent_volume_claim.take() else {
            continue;
        };
        match crate::volumes::host_path_of(&client, &ns, &claim.claim_name).await {
            Ok(path) => {
                v.host_path =
                    Some(k8s_openapi::api::core::v1::HostPathVolumeSource { path, type_: None });
            }
            Err(message) => {
                let patch = json!({"metadata": {"uid": pod.uid()},
                    "status": {"phase": "Failed", "reason": "FailedMount", "message": message}});
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                return;
            }
        }
    }
    // hostPath volumes of type Directory must be directories on the node, or the
    // volume does not mount and the container never starts
    // (<https://kubernetes.io/docs/concepts/storage/volumes/#hostpath-volume-types>).
    // DirectoryOrCreate makes it (empty, on this node only).
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let Some(h) = v.host_path.as_ref() else {
            continue;
        };
        let local = config.node_path(&node, &h.path);
        if h.type_.as_deref() == Some("DirectoryOrCreate") {
            let _ = std::fs::create_dir_all(&local);
        }
        if matches!(h.type_.as_deref(), Some("Directory" | "DirectoryOrCreate")) && !local.is_dir()
        {
            let message = format!(
                "MountVolume.SetUp failed for volume \"{}\" : hostPath type check failed: {} is not a directory",
                v.name, h.path
            );
            let patch = json!({"metadata": {"uid": pod.uid()}, "status": {"phase": "Pending", "containerStatuses": [{
                "name": pod.spec.as_ref().and_then(|s| s.containers.first()).map(|c| c.name.clone()),
                "ready": false, "restartCount": 0, "image": "", "imageID": "",
                "state": {"waiting": {"reason": "ContainerCreating", "message": message}}}]}});
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            return;
        }
    }
    let args = command_line(&pod, &ip, &config);
    let port = args
        .iter()
        .find_map(|a| a.strip_prefix("--port="))
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(8080);
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "worker".into());
    let envs: Vec<(String, String)> = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect();
    let _ = std::fs::create_dir_all(&config.log_dir);
    let log = std::fs::File::create(config.log_dir.join(format!("{name}.log")));
    let mut cmd = tokio::process::Command::new(&config.worker_bin);
    cmd.args(&args)
        .envs(envs)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match log.and_then(|f| Ok((f.try_clone()?, f))) {
        Ok((out, err)) => cmd.stdout(out).stderr(err),
        Err(_) => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
    };
    let status = |ready: bool, state: serde_json::Value| {
        json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
            "startTime": now(),
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                            "lastTransitionTime": now()}],
            "containerStatuses": [{"name": container, "ready": ready, "restartCount": 0,
                                   "image": "gpuscale/inference-worker (local process)",
                                   "imageID": "", "started": true, "state": state}],
        }})
    };
    // Each status patch names the pod's UID as a precondition, as the kubelet's
    // status manager does (`pkg/util/pod/pod.go`, `PatchPodStatus`).
    let pod_uid = pod.uid();
    let patch_status = |mut v: serde_json::Value| {
        let api = api.clone();
        let name = name.clone();
        v["metadata"]["uid"] = json!(pod_uid);
        async move {
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&v))
                .await
            {
                tracing::debug!(pod = %name, error = %e, "pod status not written");
            }
        }
    };
    // Admission: the device plugin allocates the pod's GPUs (whole or a share), and
    // the DRA driver prepares the devices its claims were allocated; or the pod fails.
    let limit = |r: &str| -> usize {
        pod.spec
            .iter()
            .flat_map(|s| &s.containers)
            .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get(r))
            .filter_map(|q| q.0.parse::<usize>().ok())
            .sum()
    };
    let (gpus, shares) = (limit("nvidia.com/gpu"), limit(SHARED_RESOURCE));
    let claims = Api::<ResourceClaim>::namespaced(
        api.clone().into_client(),
        &pod.namespace().unwrap_or_default(),
    );
    let admitted: Result<Vec<String>, String> = async {
        let mut uuids = Vec::new();
        if gpus > 0 {
            uuids.extend(
                devices
                    .lock()
                    .expect("devices lock")
                    .allocate(&PodId::of(&pod), gpus)?,
            );
        }
        if shares > 0 {
            uuids.push(
                devices
                    .lock()
                    .expect("devices lock")
                    .allocate_share(&PodId::of(&pod))?,
            );
        }
        let prepared = prepare_claims(&pod, &claims).await?;
        if !prepared.is_empty() {
            let mut d = devices.lock().expect("devices lock");
            uuids.extend(prepared.iter().map(|&i| d.uuids[i].clone()));
            d.admit(&PodId::of(&pod))?;
            d.claimed.insert(uid.clone(), prepared);
        }
        Ok(uuids)
    }
    .await;
    match admitted {
        Ok(uuids) if !uuids.is_empty() => {
            cmd.env("NVIDIA_VISIBLE_DEVICES", uuids.join(","));
        }
        Ok(_) => {}
        Err(message) => {
            patch_status(json!({"status": {"phase": "Failed",
                "reason": "UnexpectedAdmissionError", "message": message}}))
            .await;
            return;
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            patch_status(json!({"status": {"phase": "Failed", "reason": "StartError",
                "message": format!("starting {}: {e}", config.worker_bin.display())}}))
            .await;
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    running.lock().expect("running lock").insert(
        name.clone(),
        Worker {
            pid,
            stopping: false,
        },
    );
    // Deleted while it was being set up: the deleting side marks the pod ended before
    // it looks for a worker to stop, this side registers the worker before it looks at
    // the mark, so one of the two stops it.
    if devices.lock().expect("devices lock").ended(&uid) {
        running.lock().expect("running lock").remove(&name);
        let _ = child.kill().await;
        return;
    }
    let started = json!({"running": {"startedAt": now()}});
    patch_status(status(false, started.clone())).await;
    tracing::info!(pod = %name, %ip, port, pid, "simulated kubelet started a worker");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("a plain HTTP client");
    let readyz = format!("http://{ip}:{port}/readyz");
    let mut ready = false;
    let exit = loop {
        tokio::select! {
            exit = child.wait() => break exit,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                let now_ready = http.get(&readyz).send().await.is_ok_and(|r| r.status().is_success());
                if now_ready != ready {
                    ready = now_ready;
                    patch_status(status(ready, started.clone())).await;
                }
            }
        }
    };
    let stopping = running
        .lock()
        .expect("running lock")
        .remove(&name)
        .is_some_and(|w| w.stopping);
    if stopping {
        return; // stopped on purpose; the deleting side removes the pod
    }
    let code = exit.ok().and_then(|s| s.code()).unwrap_or(-1);
    let restart = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    if restart == "Never" || (restart == "OnFailure" && code == 0) {
        // An ended pod is no longer active: its devices go back (see `DevicePlugin`).
        devices.lock().expect("devices lock").release(&uid);
        // Run to completion: the pod ends Succeeded or Failed, never restarted
        // (<https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-phase>),
        // and the kubelet copies the container's termination message file into its
        // status, at most 4096 bytes
        // (<https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/>).
        let mut message = std::fs::read(termination_file(&config, &name)).unwrap_or_default();
        message.truncate(4096);
        let (phase, reason) = if code == 0 {
            ("Succeeded", "Completed")
        } else {
            ("Failed", "Error")
        };
        patch_status(json!({"status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted",
                            "lastTransitionTime": now()}],
            "containerStatuses": [{"name": container, "ready": false, "restartCount": 0,
                "image": "gpuscale/inference-worker (local process)", "imageID": "",
                "started": false,
                "state": {"terminated": {"exitCode": code, "reason": reason,
                    "message": String::from_utf8_lossy(&message), "finishedAt": now()}}}],
        }}))
        .await;
        return;
    }
    // A crash: reported as CrashLoopBackOff (the simulator does not restart workers),
    // with why it stopped in lastState as the kubelet puts it there: the termination
    // message file, or under FallbackToLogsOnError and an empty file, the log's tail
    // (<https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/#customizing-the-termination-message>).
    let c = pod.spec.as_ref().and_then(|s| s.containers.first());
    let fallback =
        c.and_then(|c| c.termination_message_policy.as_deref()) == Some("FallbackToLogsOnError");
    let mut message = std::fs::read_to_string(termination_file(&config, &name)).unwrap_or_default();
    if message.trim().is_empty() && fallback {
        let log =
            std::fs::read_to_string(config.log_dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(80).collect();
        message = lines.into_iter().rev().collect::<Vec<_>>().join("\n");
        let cut = message.len().saturating_sub(2048);
        let cut = (cut..=message.len())
            .find(|&i| message.is_char_boundary(i))
            .unwrap_or(0);
        message = message[cut..].to_string();
    }
    message = message.chars().take(4096).collect();
    patch_status(json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now()}],
        "containerStatuses": [{"name": container, "ready": false, "restartCount": 1,
            "image": "gpuscale/inference-worker (local process)", "imageID": "", "started": false,
            "state": {"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off 10s restarting failed container={container} pod={name}")}},
            "lastState": {"terminated": {"exitCode": code, "reason": "Error",
                "message": message, "finishedAt": now()}}}],
    }}))
    .await;
}

/// The devices of this node that the pod's ResourceClaims were allocated, as the DRA
/// driver's kubelet plugin prepares them: each claim must exist, be allocated and be
/// reserved for this pod (the kubelet runs no pod on claims that are not)
/// (<https://kubernetes.io/docs/concepts/scheduling-eviction/dynamic-resource-allocation/#resourceclaims-templates>).
async fn prepare_claims(pod: &Pod, claims: &Api<ResourceClaim>) -> Result<Vec<usize>, String> {
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for r in pod
        .spec
        .iter()
        .flat_map(|s| s.resource_claims.iter().flatten())
    {
        let Some(name) = &r.resource_claim_name else {
            return Err(format!("claim {}: templates are not simulated", r.name));
        };
        let claim = claims
            .get(name)
            .await
            .map_err(|e| format!("resourceclaim {name}: {e}"))?;
        let status = claim.status.unwrap_or_default();
        let reserved = status
            .reserved_for
            .iter()
            .flatten()
            .any(|c| Some(&c.uid) == pod.metadata.uid.as_ref());
        let Some(results) = status
            .allocation
            .and_then(|a| a.devices)
            .and_then(|d| d.results)
            .filter(|_| reserved)
        else {
            return Err(format!(
                "resourceclaim {name} is not allocated and reserved for the pod"
            ));
        };
        for res in results
            .iter()
            .filter(|r| r.driver == dra::DRIVER && r.pool == node)
        {
            let index = res
                .device
                .strip_prefix("gpu-")
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| format!("resourceclaim {name}: no device {} here", res.device))?;
            out.push(index);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(gpus: usize) -> DevicePlugin {
        DevicePlugin {
            uuids: (0..gpus).map(|i| format!("GPU-{i}")).collect(),
            ..DevicePlugin::default()
        }
    }

    fn id(uid: &str, name: &str) -> PodId {
        PodId {
            uid: uid.into(),
            name: format!("default/{name}"),
        }
    }

    /// The race that kept a capacity request's GPU forever: the pod was deleted while
    /// the kubelet was still admitting it. A real kubelet never admits a deleted pod;
    /// here the late allocation is refused and the GPU stays free.
    #[test]
    fn a_pod_deleted_before_admission_never_holds_a_device() {
        let mut d = plugin(1);
        d.release("uid-capacity");
        assert!(d
            .allocate(&id("uid-capacity", "smollm-capacity-1"), 1)
            .is_err());
        assert_eq!(
            d.allocate(&id("uid-replica", "smollm-1"), 1).unwrap(),
            ["GPU-0"]
        );
    }

    /// A pod that ran to completion is no longer active: its GPU goes to the next pod
    /// before the ended pod is deleted, as the device manager frees devices "bound to
    /// terminated pods"; a crashed container of a running pod keeps them.
    #[test]
    fn an_ended_pod_gives_its_devices_back_and_a_new_pod_of_the_same_name_is_new() {
        let mut d = plugin(1);
        d.allocate(&id("uid-a", "job"), 1).unwrap();
        assert!(
            d.allocate(&id("uid-b", "other"), 1).is_err(),
            "one GPU, held"
        );
        d.release("uid-a");
        assert_eq!(d.allocate(&id("uid-b", "other"), 1).unwrap(), ["GPU-0"]);
        assert_eq!(d.listed(false)[0].pod, "other");
        d.release("uid-b");
        // Recreated under the old name with a new UID: admitted like any new pod.
        assert_eq!(d.allocate(&id("uid-c", "job"), 1).unwrap(), ["GPU-0"]);
        assert!(
            d.allocate(&id("uid-a", "job"), 1).is_err(),
            "the old pod stays ended"
        );
    }
}
