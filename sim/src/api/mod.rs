//! The simulated API server: the subset of the Kubernetes API that the operator, the
//! simulated kubelet and kubectl use, served over plain HTTP on loopback.

mod faults;
mod openapi;
mod patch;
mod pod_security;
mod resources;
mod selector;
mod server;
mod store;
mod table;

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

pub use faults::{FaultCounts, Faults};
pub use server::{Audited, Shared};
pub use store::{ApiError, DeleteOptions, Part, WriteOptions};

/// A running simulated API server.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Serves on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the simulated API server on {addr}"))?;
        let addr = listener.local_addr()?;
        let shared = Shared::default();
        let app = server::router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "simulated API server stopped");
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Lets `through` creates of `plural` through, then holds the next ones until the
    /// returned gate is released (a test stopping a client between two creates).
    pub fn gate_creates(&self, plural: &str, through: u32) -> CreateGate {
        let held = std::sync::Arc::new(tokio::sync::Notify::new());
        let (open, rx) = tokio::sync::watch::channel(false);
        *self.shared.gate.lock().expect("gate lock") = Some(server::Gate {
            plural: plural.to_string(),
            through,
            held: held.clone(),
            open: rx,
        });
        CreateGate {
            held,
            open,
            shared: self.shared.clone(),
        }
    }

    /// Injects `faults` into one client's requests from now on (`None`: stops).
    pub fn inject_faults(&self, faults: Option<Faults>) {
        self.shared.faults.set(faults);
    }

    /// The faults injected so far.
    pub fn fault_counts(&self) -> FaultCounts {
        self.shared.faults.counts()
    }

    /// Every kind of request served so far, by whom (see [`Audited`]), and a reset
    /// of the request log (which `take_request_counts` also reads).
    pub fn take_audit(&self) -> std::collections::BTreeSet<Audited> {
        self.take_audit_counts().into_keys().collect()
    }

    /// The resource requests served so far, by (verb, resource), and a reset of the
    /// request log (which `take_audit` also reads).
    pub fn take_request_counts(&self) -> std::collections::BTreeMap<(String, String), u64> {
        let mut counts = std::collections::BTreeMap::new();
        for (a, n) in self.take_audit_counts() {
            *counts.entry((a.verb, a.resource)).or_default() += n;
        }
        counts
    }

    /// The requests served so far, counted by kind (see [`Audited`]), and a reset
    /// of the request log.
    pub fn take_audit_counts(&self) -> std::collections::BTreeMap<Audited, u64> {
        std::mem::take(&mut *self.shared.requests.lock().expect("request log"))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates an object directly (as a controller of the simulator, not through HTTP),
    /// admitted as any create is.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        self.create_with(obj, &mut WriteOptions::new())
    }

    /// Stores an object its CRD's current schema would refuse, as one written before the
    /// schema changed: a real API server keeps and serves such objects, so a controller
    /// must survive them (tests only).
    pub fn create_unchecked(&self, obj: Value) -> Result<Value, ApiError> {
        self.create_with(
            obj,
            &mut WriteOptions {
                unchecked: true,
                ..WriteOptions::default()
            },
        )
    }

    fn create_with(&self, obj: Value, opts: &mut WriteOptions) -> Result<Value, ApiError> {
        let mut store = self.shared.store.lock().expect("store lock");
        let (group, _) = split_api_version(obj["apiVersion"].as_str().unwrap_or("v1"));
        let kind = obj["kind"].as_str().unwrap_or_default();
        let r = store
            .resources()
            .iter()
            .find(|r| r.group == group && r.kind == kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::bad_request(format!("no resource of kind {kind} in {group:?}"))
            })?;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or(if r.namespaced { "default" } else { "" })
            .to_string();
        store.create(&r, &ns, obj, opts)
    }

    /// Registers gpuscale's CRDs, as `helm install` does.
    pub fn register_crds(&self) -> anyhow::Result<()> {
        for (file, yaml) in gpuscale_crds::crd_manifests() {
            let crd: Value = serde_yaml::from_str(&yaml)?;
            self.create(crd)
                .map_err(|e| anyhow::anyhow!("registering {file}: {e}"))?;
        }
        Ok(())
    }

    /// Writes a kubeconfig that points at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        self.write_kubeconfig_as(path, None)
    }

    /// Writes a kubeconfig that points at this server, whose user impersonates `user`
    /// (kubeconfig's `as`, as `kubectl --as`) when one is given.
    pub fn write_kubeconfig_as(&self, path: &Path, user: Option<&str>) -> anyhow::Result<()> {
        let auth = match user {
            Some(u) => format!("{{as: {u:?}}}"),
            None => "{}".into(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gpuscale-sim\n  cluster:\n    server: {}\n\
             contexts:\n- name: gpuscale-sim\n  context:\n    cluster: gpuscale-sim\n    user: gpuscale-sim\n    namespace: default\n\
             current-context: gpuscale-sim\nusers:\n- name: gpuscale-sim\n  user: {auth}\n",
            self.url()
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// ("group", "version") of an apiVersion; the core group is "".
pub fn split_api_version(v: &str) -> (&str, &str) {
    v.rsplit_once('/').unwrap_or(("", v))
}

/// A hold on creates (`ApiServer::gate_creates`).
pub struct CreateGate {
    held: std::sync::Arc<tokio::sync::Notify>,
    open: tokio::sync::watch::Sender<bool>,
    shared: Shared,
}

impl CreateGate {
    /// Returns once a create is being held.
    pub async fn held(&self) {
        self.held.notified().await;
    }

    /// Lets the held creates (and all later ones) through.
    pub fn release(self) {
        let _ = self.open.send(true);
        *self.shared.gate.lock().expect("gate lock") = None;
    }
}
