//! What the simulator serves: each resource's names, scope, subresources and printer
//! columns, for the built-in kinds it knows and for every CRD registered with it.

use serde_json::{json, Value};

/// A printer column (`kubectl get`'s table), as a CRD's `additionalPrinterColumns` says.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    pub kind: String,
    /// A JSONPath such as `.status.readyReplicas` or `.status.conditions[?(@.type=="Ready")].status`.
    pub path: String,
    /// 0 shows by default; above 0 only with `-o wide`.
    pub priority: i64,
    pub description: String,
}

impl Column {
    fn new(name: &str, kind: &str, path: &str, priority: i64) -> Self {
        Self {
            name: name.into(),
            kind: kind.into(),
            path: path.into(),
            priority,
            description: String::new(),
        }
    }
}

/// Where the scale subresource reads and writes.
#[derive(Clone, Debug)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// One served resource.
#[derive(Clone, Debug)]
pub struct Resource {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status: bool,
    pub scale: Option<ScalePaths>,
    pub columns: Vec<Column>,
    /// The CRD's OpenAPI schema, when it came from one.
    pub schema: Option<Value>,
    /// Its admission (pruning, defaults, schema and CEL rules), when it came from a CRD.
    pub validator: Option<std::sync::Arc<gpuscale_crds::validate::Validator>>,
}

impl Resource {
    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: Vec::new(),
            categories: Vec::new(),
            status: false,
            scale: None,
            columns: Vec::new(),
            schema: None,
            validator: None,
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    fn columns(mut self, columns: Vec<Column>) -> Self {
        self.columns = columns;
        self
    }

    /// `apiVersion` of its objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The `APIResource` entries of discovery: the resource and its subresources.
    pub fn discovery(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural), "singularName": "",
                "namespaced": self.namespaced, "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.plural), "singularName": "",
                "namespaced": self.namespaced, "group": "autoscaling", "version": "v1",
                "kind": "Scale", "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }

    /// The resource a CRD object describes, one per served version, or why the CRD's
    /// schema is refused (a CEL rule that does not compile, as the API server checks).
    pub fn from_crd(crd: &Value) -> Result<Vec<Resource>, String> {
        let spec = &crd["spec"];
        let names = &spec["names"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let Some(versions) = spec["versions"].as_array() else {
            return Ok(Vec::new());
        };
        versions
            .iter()
            .filter(|v| v["served"].as_bool().unwrap_or(true))
            .map(|v| {
                let sub = &v["subresources"];
                let kind = text(&names["kind"]);
                Ok(Resource {
                    group: text(&spec["group"]),
                    version: text(&v["name"]),
                    plural: text(&names["plural"]),
                    singular: names["singular"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| kind.to_lowercase()),
                    kind,
                    namespaced: spec["scope"].as_str() != Some("Cluster"),
                    short_names: strings(&names["shortNames"]),
                    categories: strings(&names["categories"]),
                    status: sub.get("status").is_some(),
                    scale: sub.get("scale").map(|s| ScalePaths {
                        spec_replicas: text(&s["specReplicasPath"]),
                        status_replicas: text(&s["statusReplicasPath"]),
                        label_selector: s["labelSelectorPath"].as_str().map(String::from),
                    }),
                    columns: v["additionalPrinterColumns"]
                        .as_array()
                        .map(|cols| {
                            cols.iter()
                                .map(|c| Column {
                                    name: text(&c["name"]),
                                    kind: text(&c["type"]),
                                    path: text(&c["jsonPath"]),
                                    priority: c["priority"].as_i64().unwrap_or(0),
                                    description: text(&c["description"]),
                                })
                                .collect()
                        })
                        .unwrap_or_else(|| vec![Column::new("Age", "date", AGE, 0)]),
                    schema: v["schema"].get("openAPIV3Schema").cloned(),
                    validator: match v["schema"].get("openAPIV3Schema") {
                        Some(_) => Some(std::sync::Arc::new(
                            gpuscale_crds::validate::Validator::from_crd(crd, &text(&v["name"]))?,
                        )),
                        None => None,
                    },
                })
            })
            .collect()
    }
}

const AGE: &str = ".metadata.creationTimestamp";

/// The built-in kinds the operator, the simulated kubelet and kubectl use.
pub fn builtins() -> Vec<Resource> {
    let age = || Column::new("Age", "date", AGE, 0);
    vec![
        Resource::builtin("", "v1", "namespaces", "Namespace", false)
            .short(&["ns"])
            .with_status()
            .columns(vec![
                Column::new("Status", "string", ".status.phase", 0),
                age(),
            ]),
        Resource::builtin("", "v1", "nodes", "Node", false)
            .short(&["no"])
            .with_status()
            .columns(vec![
                Column::new("Status", "string", "@nodeStatus", 0),
                Column::new("GPUs", "string", ".status.capacity.nvidia\\.com/gpu", 0),
                age(),
                Column::new("Version", "string", ".status.nodeInfo.kubeletVersion", 0),
            ]),
        Resource::builtin("", "v1", "pods", "Pod", true)
            .short(&["po"])
            .with_status()
            .columns(vec![
                Column::new("Ready", "string", "@podReady", 0),
                Column::new("Status", "string", "@podStatus", 0),
                Column::new("Restarts", "integer", "@podRestarts", 0),
                age(),
                Column::new("IP", "string", ".status.podIP", 1),
                Column::new("Node", "string", ".spec.nodeName", 1),
            ]),
        Resource::builtin("", "v1", "services", "Service", true)
            .short(&["svc"])
            .with_status()
            .columns(vec![
                Column::new("Type", "string", ".spec.type", 0),
                Column::new("Cluster-IP", "string", ".spec.clusterIP", 0),
                Column::new("Port(s)", "string", "@servicePorts", 0),
                age(),
            ]),
        Resource::builtin("", "v1", "events", "Event", true)
            .short(&["ev"])
            .columns(event_columns()),
        Resource::builtin("events.k8s.io", "v1", "events", "Event", true)
            .short(&["ev"])
            .columns(event_columns()),
        Resource::builtin(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
        )
        .short(&["pvc"])
        .with_status()
        .columns(vec![
            Column::new("Status", "string", ".status.phase", 0),
            Column::new("Volume", "string", ".spec.volumeName", 0),
            Column::new("StorageClass", "string", ".spec.storageClassName", 0),
            age(),
        ]),
        Resource::builtin("", "v1", "persistentvolumes", "PersistentVolume", false)
            .short(&["pv"])
            .with_status()
            .columns(vec![
                Column::new("Capacity", "string", ".spec.capacity.storage", 0),
                Column::new("Status", "string", ".status.phase", 0),
                Column::new("StorageClass", "string", ".spec.storageClassName", 0),
                age(),
            ]),
        Resource::builtin(
            "storage.k8s.io",
            "v1",
            "storageclasses",
            "StorageClass",
            false,
        )
        .short(&["sc"])
        .columns(vec![
            Column::new("Provisioner", "string", ".provisioner", 0),
            Column::new("VolumeBindingMode", "string", ".volumeBindingMode", 0),
            age(),
        ]),
        // Dynamic Resource Allocation (resource.k8s.io/v1, GA in Kubernetes 1.34).
        Resource::builtin(
            "resource.k8s.io",
            "v1",
            "resourceslices",
            "ResourceSlice",
            false,
        )
        .columns(vec![
            Column::new("Node", "string", ".spec.nodeName", 0),
            Column::new("Driver", "string", ".spec.driver", 0),
            Column::new("Pool", "string", ".spec.pool.name", 0),
            age(),
        ]),
        Resource::builtin(
            "resource.k8s.io",
            "v1",
            "resourceclaims",
            "ResourceClaim",
            true,
        )
        .with_status()
        .columns(vec![
            Column::new("State", "string", "@claimState", 0),
            age(),
        ]),
        Resource::builtin(
            "resource.k8s.io",
            "v1",
            "deviceclasses",
            "DeviceClass",
            false,
        )
        .columns(vec![age()]),
        Resource::builtin("coordination.k8s.io", "v1", "leases", "Lease", true).columns(vec![
            Column::new("Holder", "string", ".spec.holderIdentity", 0),
            age(),
        ]),
        Resource::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
        .short(&["crd", "crds"])
        .with_status()
        .columns(vec![Column::new(
            "Created At",
            "string",
            ".metadata.creationTimestamp",
            0,
        )]),
    ]
}

fn event_columns() -> Vec<Column> {
    vec![
        Column::new("Type", "string", ".type", 0),
        Column::new("Reason", "string", ".reason", 0),
        Column::new("Object", "string", "@eventObject", 0),
        Column::new("Message", "string", "@eventMessage", 0),
        Column::new("Age", "date", AGE, 0),
    ]
}
