//! The four patch types of a PATCH request
//! (<https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/>):
//! JSON patch (RFC 6902), JSON merge patch (RFC 7386), strategic merge patch for the
//! built-in kinds, and server-side apply.
//!
//! Strategic merge follows the `patchStrategy`/`patchMergeKey` tags of the core types the
//! operator and kubectl patch: lists such as `containers`, `env`, `ports`, `volumes`,
//! `conditions` and `ownerReferences` are merged element by element by their key, not
//! replaced; `finalizers` is merged as a set; other lists are replaced whole; and the
//! directives `$patch: delete|replace|merge`, `$deleteFromPrimitiveList/<f>`,
//! `$retainKeys` and `$setElementOrder/<f>` are honoured. Custom resources refuse it
//! with 415, as the API server does ("strategic merge patch is not supported for custom
//! resources").
//!
//! Server-side apply is a merge of the applied configuration: the simulator keeps no
//! field ownership (managedFields), so a field dropped from a later apply is not removed.

use serde_json::{json, Map, Value};

use super::resources::Resource;
use super::store::ApiError;

/// Applies a patch of `content_type` to `current` of resource `r`.
pub fn apply(
    r: &Resource,
    content_type: &str,
    current: &Value,
    body: &Value,
) -> Result<Value, ApiError> {
    let mut out = current.clone();
    let kind = content_type.split(';').next().unwrap_or_default().trim();
    match kind {
        "application/json-patch+json" => {
            // As the API server's JSON patch library does, a `test` for null passes on a
            // missing path (kube-runtime's finalizer helper relies on it).
            let ops: Vec<Value> = body
                .as_array()
                .ok_or_else(|| ApiError::bad_request("a JSON patch is an array of operations"))?
                .iter()
                .filter(|op| {
                    !(op["op"] == "test"
                        && op["value"].is_null()
                        && op["path"]
                            .as_str()
                            .is_some_and(|p| current.pointer(p).is_none()))
                })
                .cloned()
                .collect();
            let p: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut out, &p).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch does not apply: {e}"),
                )
            })?;
            return Ok(out);
        }
        "application/merge-patch+json" | "application/apply-patch+yaml" => {
            json_patch::merge(&mut out, body)
        }
        "application/strategic-merge-patch+json" => {
            if r.validator.is_some() || r.schema.is_some() {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: \
                         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml \
                         (strategic merge patch is not supported for the custom resource {})",
                        r.kind
                    ),
                ));
            }
            out = strategic_merge(current, body, "")?;
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the patch type {other:?} is not supported"),
            ))
        }
    }
    // A patch only checks the resourceVersion it names itself.
    out["metadata"]["resourceVersion"] = body["metadata"]["resourceVersion"].clone();
    if out["metadata"]["resourceVersion"].is_null() {
        out["metadata"]["resourceVersion"] = json!("");
    }
    Ok(out)
}

/// How a list field of a core type merges, from its `patchStrategy` and
/// `patchMergeKey` tags in k8s.io/api (`parent` is the field holding the list's object).
enum ListStrategy {
    /// Merge elements with equal values of this key.
    ByKey(&'static str),
    /// A set of scalars (finalizers).
    Set,
    /// Replaced whole (no patch strategy: tolerations, args, command, ...).
    Replace,
}

fn list_strategy(field: &str, path: &str) -> ListStrategy {
    use ListStrategy::*;
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => ByKey("name"),
        // ContainerPort merges by containerPort; ServicePort by port.
        "ports" if path.contains("ontainers") => ByKey("containerPort"),
        "ports" => ByKey("port"),
        "volumeMounts" => ByKey("mountPath"),
        "volumeDevices" => ByKey("devicePath"),
        "conditions" | "addresses" => ByKey("type"),
        "ownerReferences" => ByKey("uid"),
        "hostAliases" => ByKey("ip"),
        "topologySpreadConstraints" => ByKey("topologyKey"),
        "finalizers" => Set,
        _ => Replace,
    }
}

/// Strategic merge of `patch` into `current` at `path` (for error messages and the
/// context of list keys).
fn strategic_merge(current: &Value, patch: &Value, path: &str) -> Result<Value, ApiError> {
    let (Some(cur), Some(p)) = (current.as_object(), patch.as_object()) else {
        return Ok(strip(patch));
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => return Ok(strip(patch)),
        Some("delete") => return Ok(Value::Null),
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "{path}: unknown $patch directive {other:?}"
            )))
        }
    }
    let mut out: Map<String, Value> = cur.clone();
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        out.retain(|k, _| keep.iter().any(|x| x == k.as_str()));
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(gone)) = (
                out.get_mut(field).and_then(Value::as_array_mut),
                v.as_array(),
            ) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue; // $patch, $retainKeys handled above; $setElementOrder is order only
        }
        let at = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if v.is_null() {
            out.remove(k);
            continue;
        }
        let merged = match (out.get(k), v) {
            (Some(c @ Value::Object(_)), Value::Object(_)) => strategic_merge(c, v, &at)?,
            (Some(Value::Array(c)), Value::Array(items)) => merge_list(k, &at, c, items)?,
            _ => strip(v),
        };
        if merged.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), merged);
        }
    }
    Ok(Value::Object(out))
}

fn merge_list(
    field: &str,
    path: &str,
    current: &[Value],
    patch: &[Value],
) -> Result<Value, ApiError> {
    match list_strategy(field, path) {
        ListStrategy::Replace => Ok(Value::Array(patch.iter().map(strip).collect())),
        ListStrategy::Set => {
            let mut out = current.to_vec();
            for x in patch {
                if !out.contains(x) {
                    out.push(x.clone());
                }
            }
            Ok(Value::Array(out))
        }
        ListStrategy::ByKey(key) => {
            // `$patch: replace` as a list element replaces the whole list.
            if patch.iter().any(|x| x["$patch"] == "replace") {
                return Ok(Value::Array(
                    patch
                        .iter()
                        .filter(|x| x["$patch"] != "replace")
                        .map(strip)
                        .collect(),
                ));
            }
            let mut out = current.to_vec();
            for item in patch {
                let Some(id) = item.get(key).filter(|v| !v.is_null()) else {
                    return Err(ApiError::bad_request(format!(
                        "{path}: every element of a strategic merge patch of this list needs its merge key {key:?}"
                    )));
                };
                let pos = out.iter().position(|c| c.get(key) == Some(id));
                match (pos, item["$patch"].as_str()) {
                    (Some(i), Some("delete")) => {
                        out.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => out[i] = strategic_merge(&out[i], item, path)?,
                    (None, _) => out.push(strip(item)),
                }
            }
            Ok(Value::Array(out))
        }
    }
}

/// The patch value with its directives removed (what gets stored).
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_resource() -> Resource {
        super::super::resources::builtins()
            .into_iter()
            .find(|r| r.plural == "pods")
            .unwrap()
    }

    const SMP: &str = "application/strategic-merge-patch+json";

    #[test]
    fn containers_and_env_merge_by_name_not_replace() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
            {"name": "b", "image": "b:1"}]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "env": [{"name": "Y", "value": "3"}]}]}});
        let out = apply(&pod_resource(), SMP, &pod, &patch).unwrap();
        let cs = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(cs.len(), 2, "container b survives: {out}");
        assert_eq!(cs[0]["image"], "a:1");
        assert_eq!(
            cs[0]["env"],
            json!([{"name": "X", "value": "1"}, {"name": "Y", "value": "3"}])
        );
    }

    #[test]
    fn conditions_merge_by_type_and_directives_delete_and_replace() {
        let pod = json!({"metadata": {"name": "p", "finalizers": ["a"]}, "status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]},
            "spec": {"tolerations": [{"key": "a"}], "containers": [{"name": "a"}, {"name": "b"}]}});
        let patch = json!({"metadata": {"finalizers": ["b"]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            "spec": {"tolerations": [{"key": "b"}],
                     "containers": [{"name": "b", "$patch": "delete"}]}});
        let out = apply(&pod_resource(), SMP, &pod, &patch).unwrap();
        assert_eq!(out["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(out["status"]["conditions"][0]["status"], "True");
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "b"}]),
            "no strategy: replaced"
        );
        assert_eq!(out["spec"]["containers"], json!([{"name": "a"}]));
    }

    #[test]
    fn custom_resources_refuse_strategic_merge() {
        let mut r = pod_resource();
        r.schema = Some(json!({"type": "object"}));
        let e = apply(&r, SMP, &json!({}), &json!({})).unwrap_err();
        assert_eq!(e.code, 415);
    }
}
