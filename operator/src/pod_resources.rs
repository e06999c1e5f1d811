//! The kubelet's PodResources API (`v1.PodResourcesLister/List` over the kubelet's Unix
//! socket), the standard source of which devices each pod was assigned, as NVIDIA's
//! DCGM exporter reads it
//! (<https://kubernetes.io/docs/concepts/extend-kubernetes/compute-storage-net/device-plugins/#monitoring-device-plugin-resources>).
//! The node agent lists it and publishes the GPU assignments in its GpuInventory, so the
//! operator learns what a device plugin handed out as soon as the pod is admitted, not
//! only once its worker is up.
//!
//! The messages are the subset of `k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`
//! read here, with the proto's field numbers; protobuf skips the fields left out.

use std::path::{Path, PathBuf};

use gpuscale_crds::GpuAssignment;
use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};

/// The kubelet's socket, where the chart mounts it.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// `ListPodResourcesRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesRequest {}

/// `ListPodResourcesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesResponse {
    /// The pods on the node.
    #[prost(message, repeated, tag = "1")]
    pub pod_resources: Vec<PodResources>,
}

/// `PodResources`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodResources {
    /// Pod name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Pod namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Its containers.
    #[prost(message, repeated, tag = "3")]
    pub containers: Vec<ContainerResources>,
}

/// `ContainerResources` (devices only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerResources {
    /// Container name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Devices from device plugins.
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<ContainerDevices>,
}

/// `ContainerDevices`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerDevices {
    /// Extended resource name (`nvidia.com/gpu`).
    #[prost(string, tag = "1")]
    pub resource_name: String,
    /// The plugin's device IDs (GPU UUIDs for NVIDIA's; `UUID::N` for time-slicing
    /// replicas).
    #[prost(string, repeated, tag = "2")]
    pub device_ids: Vec<String>,
}

/// Why the API could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("connecting to the kubelet's PodResources socket {0}: {1}")]
    Connect(PathBuf, #[source] tonic::transport::Error),
    /// The call failed.
    #[error("PodResources List: {0}")]
    Call(#[from] tonic::Status),
}

/// Lists the pods' resources from the kubelet at `socket`.
pub async fn list(socket: &Path) -> Result<ListPodResourcesResponse, Error> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://kubelet.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| Error::Connect(socket.to_path_buf(), e))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let answer = grpc
        .unary(
            tonic::Request::new(ListPodResourcesRequest {}),
            http::uri::PathAndQuery::from_static("/v1.PodResourcesLister/List"),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(answer.into_inner())
}

/// The GPUs each pod holds through the extended resources `resources`: device IDs with
/// a time-slicing suffix (`GPU-…::2`) reduced to the GPU's UUID, sorted, no duplicates.
pub fn gpu_assignments(list: &ListPodResourcesResponse, resources: &[&str]) -> Vec<GpuAssignment> {
    let mut out: Vec<GpuAssignment> = list
        .pod_resources
        .iter()
        .filter_map(|p| {
            let mut gpus: Vec<String> = p
                .containers
                .iter()
                .flat_map(|c| &c.devices)
                .filter(|d| resources.contains(&d.resource_name.as_str()))
                .flat_map(|d| &d.device_ids)
                .map(|id| id.split("::").next().unwrap_or(id).to_string())
                .collect();
            gpus.sort();
            gpus.dedup();
            (!gpus.is_empty()).then(|| GpuAssignment {
                namespace: p.namespace.clone(),
                pod: p.name.clone(),
                gpus,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubelet stand-in serving `List` over a Unix socket with tonic's server.
    #[derive(Clone)]
    struct Lister(ListPodResourcesResponse);

    impl tonic::server::NamedService for Lister {
        const NAME: &'static str = "v1.PodResourcesLister";
    }

    struct Unary(ListPodResourcesResponse);

    impl tonic::server::UnaryService<ListPodResourcesRequest> for Unary {
        type Response = ListPodResourcesResponse;
        type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;
        fn call(&mut self, _: tonic::Request<ListPodResourcesRequest>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(self.0.clone())))
        }
    }

    impl tower::Service<http::Request<tonic::body::Body>> for Lister {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
        >;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let answer = self.0.clone();
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Unary(answer), req).await)
            })
        }
    }

    fn pod(name: &str, resource: &str, ids: &[&str]) -> PodResources {
        PodResources {
            name: name.into(),
            namespace: "default".into(),
            containers: vec![ContainerResources {
                name: "worker".into(),
                devices: vec![ContainerDevices {
                    resource_name: resource.into(),
                    device_ids: ids.iter().map(|s| s.to_string()).collect(),
                }],
            }],
        }
    }

    #[tokio::test]
    async fn lists_the_kubelet_s_assignments_over_its_socket() {
        let dir = std::env::temp_dir().join(format!("gpuscale-podres-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("kubelet.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let answer = ListPodResourcesResponse {
            pod_resources: vec![
                pod("a-0", "nvidia.com/gpu", &["GPU-2", "GPU-1"]),
                pod("s-0", "nvidia.com/gpu.shared", &["GPU-1::3"]),
                pod("nic", "example.com/nic", &["eth1"]),
            ],
        };
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Lister(answer))
                .serve_with_incoming(incoming),
        );
        let got = list(&socket).await.unwrap();
        let gpus = gpu_assignments(&got, &["nvidia.com/gpu", "nvidia.com/gpu.shared"]);
        let by_pod: Vec<(&str, Vec<&str>)> = gpus
            .iter()
            .map(|a| (a.pod.as_str(), a.gpus.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(
            by_pod,
            [("a-0", vec!["GPU-1", "GPU-2"]), ("s-0", vec!["GPU-1"])]
        );
        server.abort();
        // No kubelet there: an error that names the socket, not an empty list.
        let e = list(&dir.join("missing.sock")).await.unwrap_err();
        assert!(e.to_string().contains("missing.sock"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
