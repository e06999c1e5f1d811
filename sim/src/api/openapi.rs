//! OpenAPI v3 documents for what the simulator serves. `kubectl apply` reads them to
//! learn each kind's schema and whether the server validates fields itself.

use serde_json::{json, Map, Value};

use super::resources::Resource;
use super::store::Store;

fn gv_path(r: &Resource) -> String {
    if r.group.is_empty() {
        format!("api/{}", r.version)
    } else {
        format!("apis/{}/{}", r.group, r.version)
    }
}

/// `/openapi/v3`: one entry per group version.
pub fn root(store: &Store) -> Value {
    let mut paths = Map::new();
    for r in store.resources() {
        let p = gv_path(r);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", store.resource_version())}),
        );
    }
    json!({"paths": paths})
}

fn schema_name(r: &Resource) -> String {
    let group = if r.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        r.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{}.{}", r.version, r.kind)
}

/// `/openapi/v3/<api/v1 | apis/group/version>`: schemas and paths of that group version.
pub fn group_version(store: &Store, path: &str) -> Option<Value> {
    let members: Vec<&Resource> = store
        .resources()
        .iter()
        .filter(|r| gv_path(r) == path)
        .collect();
    if members.is_empty() {
        return None;
    }
    let mut schemas = Map::new();
    let mut paths = Map::new();
    let object_meta = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    for r in members {
        let gvk = json!([{"group": r.group, "version": r.version, "kind": r.kind}]);
        let mut schema = r.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        schema["properties"]["apiVersion"] = json!({"type": "string"});
        schema["properties"]["kind"] = json!({"type": "string"});
        schema["properties"]["metadata"] = object_meta.clone();
        schema["x-kubernetes-group-version-kind"] = gvk.clone();
        schemas.insert(schema_name(r), schema);
        // The server validates fields itself: kubectl sees `fieldValidation` on the
        // writes and leaves validation to it.
        let op = |verb: &str| {
            json!({"operationId": format!("{verb}{}", r.kind), "x-kubernetes-action": verb,
                   "x-kubernetes-group-version-kind": gvk[0],
                   "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                                  {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                                  {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}],
                   "responses": {"200": {"description": "OK"}}})
        };
        let base = if r.namespaced {
            format!("/{}/namespaces/{{namespace}}/{}", gv_path(r), r.plural)
        } else {
            format!("/{}/{}", gv_path(r), r.plural)
        };
        paths.insert(base.clone(), json!({"post": op("post"), "get": op("list")}));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "gpuscale simulated cluster", "version": "v1.34.0-gpuscale-sim"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
