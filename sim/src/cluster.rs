//! A whole simulated cluster: the API server with the gpuscale CRDs registered, a
//! kubeconfig for it, the scheduler, and one simulated kubelet per simulated node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use kube::api::DeleteParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use super::api::ApiServer;
use super::kubelet::{Kubelet, KubeletConfig};
use super::nodes::SimNode;
use super::scheduler::Scheduler;

/// How to start a simulated cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Address of the API server (port 0: any free port).
    pub addr: SocketAddr,
    /// Where the kubeconfig goes.
    pub kubeconfig: PathBuf,
    pub nodes: Vec<SimNode>,
    pub kubelet: KubeletConfig,
}

/// A running simulated cluster.
pub struct SimCluster {
    api: ApiServer,
    client: Client,
    kubeconfig: PathBuf,
    kubelets: Vec<Kubelet>,
    /// Nodes cut off from the API (see `partition_node`), to bring back.
    partitioned: Vec<(SimNode, tokio::task::JoinHandle<()>)>,
    config: KubeletConfig,
    _scheduler: Scheduler,
    _provisioner: super::volumes::Provisioner,
    models: super::models::ModelServer,
}

/// A kube-rs client for the cluster in `kubeconfig`, made as for any cluster.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    client_as(kubeconfig, None).await
}

/// A client of the cluster of `kubeconfig` that impersonates `user` (as `kubectl
/// --as`), so that the simulator's request log tells its requests apart.
pub async fn client_as(kubeconfig: &Path, user: Option<&str>) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = user.map(str::to_string);
    Ok(Client::try_from(config)?)
}

impl SimCluster {
    /// Starts the API server, registers the CRDs, writes the kubeconfig and starts the
    /// nodes.
    pub async fn start(config: ClusterConfig) -> anyhow::Result<Self> {
        // The nodes' filesystems are not the operator's: on a cluster the operator runs
        // in its own pod and cannot open a file:// model on a node. The simulated nodes'
        // paths (`/models`) stand for local directories and must not exist here, so an
        // operator process that tried to open a node path would fail here as there.
        for (node_path, _) in &config.kubelet.host_paths {
            anyhow::ensure!(
                !Path::new(node_path).exists(),
                "the simulated nodes' {node_path} exists on this machine, where the \
                 operator could read it as no operator pod can: remove it or simulate \
                 another node path"
            );
        }
        let api = ApiServer::start(config.addr).await?;
        api.register_crds()?;
        // The DeviceClass the NVIDIA DRA driver's chart installs, for the DRA nodes.
        api.create(super::dra::device_class())
            .map_err(|e| anyhow::anyhow!("creating the DeviceClass: {e}"))?;
        api.write_kubeconfig(&config.kubeconfig)?;
        let client = client_for(&config.kubeconfig).await?;
        let models = match config.kubelet.host_paths.first() {
            Some((_, dir)) => super::models::ModelServer::start(dir.clone()).await?,
            None => anyhow::bail!("the simulated nodes have no model directory"),
        };
        let mut cluster = Self {
            models,
            _scheduler: Scheduler::start(client.clone()),
            _provisioner: super::volumes::Provisioner::start(client.clone()),
            api,
            client,
            kubeconfig: config.kubeconfig,
            kubelets: Vec::new(),
            partitioned: Vec::new(),
            config: config.kubelet,
        };
        for node in config.nodes {
            cluster.add_node(node).await?;
        }
        Ok(cluster)
    }

    /// Adds a node and starts its kubelet.
    pub async fn add_node(&mut self, node: SimNode) -> anyhow::Result<()> {
        let name = node.name.clone();
        let k = Kubelet::start(self.client.clone(), node, self.config.clone())
            .await
            .with_context(|| format!("starting the simulated kubelet of {name}"))?;
        self.kubelets.push(k);
        Ok(())
    }

    /// A node is lost: its kubelet and workers die at once, and the Node object is
    /// deleted, which (as the pod garbage collector does) removes the pods bound to it.
    pub async fn lose_node(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .kubelets
            .iter()
            .position(|k| k.node() == name)
            .with_context(|| format!("no simulated node {name}"))?;
        self.kubelets.remove(i).kill();
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// A worker is killed (SIGKILL, as the OOM killer or a crashed process ends it):
    /// the kubelet reports the container's exit. Returns whether `pod` ran a worker.
    pub fn kill_worker(&self, pod: &str) -> bool {
        self.kubelets.iter().any(|k| k.kill_worker(pod))
    }

    /// A node is cut off: its kubelet stops posting status (its workers die with it, so
    /// nothing reaches them either), and after `grace` the node lifecycle controller
    /// marks it as the kube-controller-manager does once `--node-monitor-grace-period`
    /// passes (40 s by default; 50 s since Kubernetes 1.32): the Ready condition
    /// `Unknown`, the `node.kubernetes.io/unreachable` taints (NoSchedule and
    /// NoExecute), and every pod on it not Ready
    /// (<https://kubernetes.io/docs/concepts/architecture/nodes/#condition>,
    /// <https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/#taint-based-evictions>).
    /// Pods deleted meanwhile stay Terminating: no kubelet confirms their end.
    /// Taint-based eviction (after the pods' 300 s default toleration) is not
    /// simulated.
    pub async fn partition_node(
        &mut self,
        name: &str,
        grace: std::time::Duration,
    ) -> anyhow::Result<()> {
        let i = self
            .kubelets
            .iter()
            .position(|k| k.node() == name)
            .with_context(|| format!("no simulated node {name}"))?;
        let kubelet = self.kubelets.remove(i);
        let spec = kubelet.spec().clone();
        kubelet.kill();
        let client = self.client.clone();
        let node = name.to_string();
        let marking = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Err(e) = super::lifecycle::mark_unreachable(&client, &node).await {
                tracing::warn!(%node, error = %e, "marking the node unreachable");
            }
        });
        self.partitioned.push((spec, marking));
        Ok(())
    }

    /// A partitioned node comes back: its kubelet posts Ready again, the node lifecycle
    /// controller lifts the unreachable taints, and the kubelet finishes the pods
    /// deleted meanwhile and starts the others again (their processes died).
    pub async fn heal_node(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .partitioned
            .iter()
            .position(|(n, _)| n.name == name)
            .with_context(|| format!("no partitioned node {name}"))?;
        let (spec, marking) = self.partitioned.remove(i);
        marking.abort();
        super::lifecycle::mark_reachable(&self.client, name).await?;
        self.add_node(spec).await
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        self.api.url()
    }

    /// The kubeconfig's path.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client for the cluster.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The simulated API server itself (request counts, objects stored unchecked).
    pub fn api(&self) -> &ApiServer {
        &self.api
    }

    /// The HTTP server of the nodes' model directory (for `http://` model sources).
    pub fn model_server(&self) -> &super::models::ModelServer {
        &self.models
    }

    /// The kubelets, by node.
    pub fn kubelets(&self) -> &[Kubelet] {
        &self.kubelets
    }
}
