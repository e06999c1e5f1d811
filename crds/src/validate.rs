//! Admission of a custom resource as a Kubernetes API server does it, from the CRD's own
//! `openAPIV3Schema`: shared by the simulated API server (`sim/`) and the tests that
//! check `examples/` (feature `validate`; the operator never links it).
//!
//! The steps and their order follow the apiextensions-apiserver
//! (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/>):
//! 1. **Pruning** of fields the schema does not declare ("Field pruning"), unless a node
//!    says `x-kubernetes-preserve-unknown-fields`; with `fieldValidation=Strict` an
//!    unknown field is an error instead
//!    (<https://kubernetes.io/docs/reference/using-api/api-concepts/#field-validation>).
//! 2. **Null values** of fields that are not `nullable` are dropped, then **defaults**
//!    are applied ("Defaulting and Nullable").
//! 3. **Schema validation**, then the `x-kubernetes-validations` **CEL rules** ("Validation
//!    rules"); transition rules (those reading `oldSelf`) run only on updates.
//!
//! Errors carry the field path and the wording of the API server's field errors
//! (`spec.model: Required value`, `spec.x: Invalid value: 0: spec.x in body should be
//! greater than or equal to 1`), so that `kubectl apply` prints what it would print
//! against a real cluster.

use std::fmt;

use serde_json::Value;

/// What the request asked of unknown fields (the `fieldValidation` query parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them and warn (the API server's default).
    #[default]
    Warn,
    /// Refuse the request.
    Strict,
}

impl FieldValidation {
    /// The query parameter's value; `None` for an unknown one.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Ignore" => Some(Self::Ignore),
            "Warn" => Some(Self::Warn),
            "Strict" => Some(Self::Strict),
            _ => None,
        }
    }
}

/// One field error, as `metav1.StatusCause`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    /// The field path, `spec.scaling.minReplicas`.
    pub field: String,
    /// The message without the path: `Required value`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why an object was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 400 BadRequest: unknown fields under `fieldValidation=Strict`.
    UnknownFields(String),
    /// 422 Invalid: the field errors, with the API server's summary message.
    Invalid {
        message: String,
        causes: Vec<FieldError>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownFields(m) => f.write_str(m),
            Refusal::Invalid { message, .. } => f.write_str(message),
        }
    }
}

/// The admission rules of one version of one CRD.
pub struct Validator {
    kind: String,
    group: String,
    version: String,
    schema: Value,
    compiled: jsonschema::Validator,
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Validator({}.{}/{})",
            self.kind, self.group, self.version
        )
    }
}

impl Validator {
    /// The validator of `version` of `crd` (a CustomResourceDefinition as JSON), or an
    /// error naming what is wrong with the CRD's schema.
    pub fn from_crd(crd: &Value, version: &str) -> Result<Validator, String> {
        let spec = &crd["spec"];
        let v = spec["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == version))
            .ok_or_else(|| format!("the CRD has no version {version}"))?;
        let schema = v["schema"]["openAPIV3Schema"].clone();
        if !schema.is_object() {
            return Err(format!(
                "spec.versions[{version}].schema.openAPIV3Schema: Required value"
            ));
        }
        // The API server also checks each rule compiles when the CRD is written.
        let mut rules = Vec::new();
        collect_rules(&schema, &mut rules);
        for rule in rules {
            cel::Program::compile(&rule)
                .map_err(|e| format!("x-kubernetes-validations rule `{rule}`: {e:?}"))?;
        }
        let compiled = jsonschema::draft4::options()
            .should_validate_formats(false)
            .build(&with_nullable(&schema))
            .map_err(|e| format!("openAPIV3Schema: {e}"))?;
        Ok(Validator {
            kind: spec["names"]["kind"].as_str().unwrap_or_default().into(),
            group: spec["group"].as_str().unwrap_or_default().into(),
            version: version.into(),
            schema,
            compiled,
        })
    }

    /// Admits `obj` (a create, or an update of `old`): prunes it, defaults it and
    /// validates it in place. Returns the warnings (unknown fields dropped under
    /// `Warn`) or the refusal.
    pub fn admit(
        &self,
        obj: &mut Value,
        old: Option<&Value>,
        mode: FieldValidation,
    ) -> Result<Vec<String>, Refusal> {
        let mut unknown = Vec::new();
        if let Some(o) = obj.as_object_mut() {
            // apiVersion, kind and metadata are the API server's, never the schema's.
            for (k, v) in o.iter_mut() {
                if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match self.schema["properties"].get(k) {
                    Some(sub) => prune(sub, v, k, &mut unknown),
                    None if preserves(&self.schema) => {}
                    None => unknown.push(k.clone()),
                }
            }
            o.retain(|k, _| {
                matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                    || self.schema["properties"].get(k).is_some()
                    || preserves(&self.schema)
            });
        }
        if mode == FieldValidation::Strict && !unknown.is_empty() {
            let fields: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(Refusal::UnknownFields(format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: {}",
                fields.join(", "),
                kind = self.kind,
                v = self.version
            )));
        }
        drop_nulls(&self.schema, obj);
        apply_defaults(&self.schema, obj);

        let mut causes: Vec<FieldError> = self
            .compiled
            .iter_errors(obj)
            .map(|e| field_error(&e))
            .collect();
        if causes.is_empty() {
            list_errors(&self.schema, obj, "", &mut causes);
        }
        if causes.is_empty() {
            cel_errors(&self.schema, obj, old, "", &mut causes);
        }
        if causes.is_empty() {
            let warnings = match mode {
                FieldValidation::Warn => unknown
                    .iter()
                    .map(|f| format!("unknown field \"{f}\""))
                    .collect(),
                _ => Vec::new(),
            };
            return Ok(warnings);
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let list: Vec<String> = causes.iter().map(ToString::to_string).collect();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        Err(Refusal::Invalid {
            message: format!(
                "{}.{} \"{name}\" is invalid: {joined}",
                self.kind, self.group
            ),
            causes,
        })
    }
}

/// `schema` as JSON Schema reads it: OpenAPI's `nullable: true` becomes a `null` type
/// (and a `null` among the enum values), so that null passes where the API server lets
/// it.
fn with_nullable(schema: &Value) -> Value {
    match schema {
        Value::Object(m) => {
            let mut out: serde_json::Map<String, Value> = m
                .iter()
                .map(|(k, v)| {
                    let v = match k.as_str() {
                        // Maps of subschemas and lists of them; `enum`, `default`,
                        // `example` and the like hold values, not schemas.
                        "properties" | "patternProperties" | "definitions" => match v {
                            Value::Object(props) => Value::Object(
                                props
                                    .iter()
                                    .map(|(n, s)| (n.clone(), with_nullable(s)))
                                    .collect(),
                            ),
                            other => other.clone(),
                        },
                        "items" | "additionalProperties" | "not" => with_nullable(v),
                        "allOf" | "anyOf" | "oneOf" => match v {
                            Value::Array(a) => Value::Array(a.iter().map(with_nullable).collect()),
                            other => other.clone(),
                        },
                        _ => v.clone(),
                    };
                    (k.clone(), v)
                })
                .collect();
            if m.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = out.get("type").cloned() {
                    out.insert("type".into(), serde_json::json!([t, "null"]));
                }
                if let Some(Value::Array(e)) = out.get_mut("enum") {
                    if !e.contains(&Value::Null) {
                        e.push(Value::Null);
                    }
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

fn preserves(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true)
}

/// Drops what `schema` does not declare from `value` (at `path`), recording the paths.
fn prune(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if preserves(schema) {
        return;
    }
    match value {
        Value::Object(o) => {
            if let Some(props) = schema["properties"].as_object() {
                o.retain(|k, _| {
                    let known = props.contains_key(k);
                    if !known {
                        unknown.push(format!("{path}.{k}"));
                    }
                    known
                });
                for (k, v) in o.iter_mut() {
                    prune(&props[k], v, &format!("{path}.{k}"), unknown);
                }
            } else if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object())
            {
                for (k, v) in o.iter_mut() {
                    prune(extra, v, &format!("{path}.{k}"), unknown);
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for (i, v) in a.iter_mut().enumerate() {
                    prune(items, v, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Drops `null` values of fields that are not `nullable`, as the API server does before
/// defaulting.
fn drop_nulls(schema: &Value, value: &mut Value) {
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object_mut()) {
        obj.retain(|k, v| {
            !(v.is_null()
                && props
                    .get(k)
                    .is_some_and(|s| s["nullable"] != Value::Bool(true)))
        });
        for (k, v) in obj.iter_mut() {
            if let Some(sub) = props.get(k) {
                drop_nulls(sub, v);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array_mut()) {
        arr.iter_mut().for_each(|v| drop_nulls(items, v));
    }
}

/// Structural-schema defaulting: a missing property with a `default` gets it, then
/// defaulting recurses into what is present.
fn apply_defaults(schema: &Value, value: &mut Value) {
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object_mut()) {
        for (name, sub) in props {
            if !obj.contains_key(name) {
                if let Some(d) = sub.get("default") {
                    obj.insert(name.clone(), d.clone());
                }
            }
            if let Some(v) = obj.get_mut(name) {
                apply_defaults(sub, v);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array_mut()) {
        arr.iter_mut().for_each(|v| apply_defaults(items, v));
    }
}

/// `/spec/a/0/b` as the API server writes field paths: `spec.a[0].b`.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part);
        }
    }
    out
}

/// A value as `field.Invalid` prints it: scalars as Go would quote them, composite
/// values by their type name.
fn shown(v: &Value) -> String {
    match v {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A schema bound as Go prints a float64: `1`, not `1.0`.
fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

/// A JSON-schema error in the words of k8s.io/kube-openapi's validation errors.
fn field_error(e: &jsonschema::ValidationError<'_>) -> FieldError {
    use jsonschema::error::ValidationErrorKind as K;
    let at = field_path(&e.instance_path().to_string());
    let value = e.instance();
    let invalid = |what: String| FieldError {
        reason: "FieldValueInvalid",
        field: at.clone(),
        message: format!("Invalid value: {}: {at} in body {what}", shown(value)),
    };
    match e.kind() {
        K::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            FieldError {
                reason: "FieldValueRequired",
                field: if at.is_empty() {
                    name.to_string()
                } else {
                    format!("{at}.{name}")
                },
                message: "Required value".into(),
            }
        }
        K::Minimum { limit } => invalid(format!(
            "should be greater than or equal to {}",
            number(limit)
        )),
        K::Maximum { limit } => {
            invalid(format!("should be less than or equal to {}", number(limit)))
        }
        K::ExclusiveMinimum { limit } => {
            invalid(format!("should be greater than {}", number(limit)))
        }
        K::ExclusiveMaximum { limit } => invalid(format!("should be less than {}", number(limit))),
        K::Pattern { pattern } => invalid(format!("should match '{pattern}'")),
        K::MinLength { limit } => invalid(format!("should be at least {limit} chars long")),
        K::MinItems { limit } => invalid(format!("should have at least {limit} items")),
        K::MaxLength { limit } => FieldError {
            reason: "FieldValueTooLong",
            field: at.clone(),
            message: format!("Too long: may not be more than {limit} bytes"),
        },
        K::MaxItems { limit } => FieldError {
            reason: "FieldValueTooMany",
            field: at.clone(),
            message: format!(
                "Too many: {}: must have at most {limit} items",
                value.as_array().map_or(0, Vec::len)
            ),
        },
        K::Enum { options } => {
            let supported: Vec<String> = options
                .as_array()
                .map(|a| a.iter().map(Value::to_string).collect())
                .unwrap_or_default();
            FieldError {
                reason: "FieldValueNotSupported",
                field: at.clone(),
                message: format!(
                    "Unsupported value: {}: supported values: {}",
                    value,
                    supported.join(", ")
                ),
            }
        }
        K::Type { .. } => FieldError {
            reason: "FieldValueTypeInvalid",
            field: at.clone(),
            message: format!(
                "Invalid value: \"{t}\": {at} in body must be of type {}: \"{t}\"",
                expected_type(e),
                t = json_type(value)
            ),
        },
        _ => FieldError {
            reason: "FieldValueInvalid",
            field: at.clone(),
            message: format!("Invalid value: {}: {e}", shown(value)),
        },
    }
}

/// The type a `type` error wanted, from the error's own text.
fn expected_type(e: &jsonschema::ValidationError<'_>) -> String {
    let text = e.to_string();
    text.rsplit(" is not of type ")
        .next()
        .map(|t| t.trim_matches('"').to_string())
        .unwrap_or_else(|| "the declared type".into())
}

fn collect_rules(schema: &Value, out: &mut Vec<String>) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(r) = rule["rule"].as_str() {
            out.push(r.to_string());
        }
    }
    if let Some(props) = schema["properties"].as_object() {
        props.values().for_each(|s| collect_rules(s, out));
    }
    if let Some(items) = schema.get("items") {
        collect_rules(items, out);
    }
}

/// Kubernetes CEL types: JSON integers are `int`, other numbers `double`.
pub fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => match n.as_u64() {
                Some(u) => cel::Value::UInt(u),
                None => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
        },
        Value::String(s) => cel::Value::String(s.clone().into()),
        Value::Array(a) => cel::Value::List(a.iter().map(to_cel).collect::<Vec<_>>().into()),
        Value::Object(o) => {
            let m: std::collections::HashMap<String, cel::Value> =
                o.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            m.into()
        }
    }
}

/// Evaluates every CEL rule whose schema node has a value. A rule that fails, or that
/// cannot be evaluated on this value, is a field error (the API server reports an
/// evaluation error as Invalid too).
/// Lists declared `x-kubernetes-list-type: map` (unique by their
/// `x-kubernetes-list-map-keys`) or `set` (unique items), as the API server checks
/// them: a repeat is `Duplicate value` at the repeat's index
/// ([CRD docs](https://kubernetes.io/docs/reference/using-api/server-side-apply/#merge-strategy)).
fn list_errors(schema: &Value, value: &Value, path: &str, out: &mut Vec<FieldError>) {
    if let Some(arr) = value.as_array() {
        let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let key_of = |v: &Value| -> Value {
            match schema["x-kubernetes-list-type"].as_str() {
                Some("map") => Value::Object(
                    keys.iter()
                        .map(|k| (k.to_string(), v.get(*k).cloned().unwrap_or(Value::Null)))
                        .collect(),
                ),
                _ => v.clone(),
            }
        };
        if matches!(
            schema["x-kubernetes-list-type"].as_str(),
            Some("map" | "set")
        ) {
            let mut seen: Vec<Value> = Vec::new();
            for (i, v) in arr.iter().enumerate() {
                let k = key_of(v);
                if seen.contains(&k) {
                    out.push(FieldError {
                        reason: "FieldValueDuplicate",
                        field: format!("{path}[{i}]").trim_start_matches('.').to_string(),
                        message: format!("Duplicate value: {k}"),
                    });
                } else {
                    seen.push(k);
                }
            }
        }
        for (i, v) in arr.iter().enumerate() {
            list_errors(&schema["items"], v, &format!("{path}[{i}]"), out);
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object()) {
        for (name, sub) in props {
            if let Some(v) = obj.get(name) {
                list_errors(sub, v, &format!("{path}.{name}"), out);
            }
        }
    }
}

fn cel_errors(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    out: &mut Vec<FieldError>,
) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(src) = rule["rule"].as_str() else {
            continue;
        };
        let transition = src.contains("oldSelf");
        if transition && old.is_none() {
            continue;
        }
        let field = match rule["fieldPath"].as_str() {
            Some(fp) => format!("{path}{fp}").trim_start_matches('.').to_string(),
            None => path.trim_start_matches('.').to_string(),
        };
        let message = rule["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("failed rule: {src}"));
        let result = cel::Program::compile(src)
            .map_err(|e| format!("{e:?}"))
            .and_then(|p| {
                let mut ctx = cel::Context::default();
                ctx.add_variable_from_value("self", to_cel(value));
                if let Some(o) = old {
                    ctx.add_variable_from_value("oldSelf", to_cel(o));
                }
                p.execute(&ctx).map_err(|e| format!("{e:?}"))
            });
        let failure = match result {
            Ok(cel::Value::Bool(true)) => None,
            Ok(cel::Value::Bool(false)) => Some(message),
            Ok(other) => Some(format!("rule `{src}` gave {other:?}, not a bool")),
            Err(e) => Some(format!("rule `{src}` could not be evaluated: {e}")),
        };
        if let Some(message) = failure {
            out.push(FieldError {
                reason: "FieldValueInvalid",
                field,
                message: format!("Invalid value: \"{}\": {message}", json_type(value)),
            });
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object()) {
        for (name, sub) in props {
            if let Some(v) = obj.get(name) {
                let old_v = old.and_then(|o| o.get(name));
                cel_errors(sub, v, old_v, &format!("{path}.{name}"), out);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            // Transition rules of list items need list-type keys to pair old and new;
            // without them the API server does not run them either.
            cel_errors(items, v, None, &format!("{path}[{i}]"), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validator() -> Validator {
        let crd =
            serde_json::to_value(<crate::InferenceDeployment as kube::CustomResourceExt>::crd())
                .unwrap();
        Validator::from_crd(&crd, "v1alpha1").unwrap()
    }

    fn obj(spec: Value) -> Value {
        json!({"apiVersion": "gpuscale.dev/v1alpha1", "kind": "InferenceDeployment",
               "metadata": {"name": "x"}, "spec": spec})
    }

    #[test]
    fn field_paths_read_as_the_api_server_writes_them() {
        assert_eq!(field_path("/spec/a/0/b"), "spec.a[0].b");
        assert_eq!(field_path(""), "");
    }

    #[test]
    fn a_missing_required_field_is_a_required_value_at_its_path() {
        let mut o = obj(json!({}));
        let Err(Refusal::Invalid { message, causes }) =
            validator().admit(&mut o, None, FieldValidation::Strict)
        else {
            panic!("admitted");
        };
        assert_eq!(
            message,
            "InferenceDeployment.gpuscale.dev \"x\" is invalid: spec.model: Required value"
        );
        assert_eq!(causes[0].reason, "FieldValueRequired");
    }

    #[test]
    fn unknown_fields_are_pruned_warned_or_refused_by_mode() {
        let spec = json!({"model": {"name": "m", "source": "file:///m.gguf", "colour": "red"}});
        let v = validator();
        let mut o = obj(spec.clone());
        let warnings = v.admit(&mut o, None, FieldValidation::Warn).unwrap();
        assert_eq!(warnings, ["unknown field \"spec.model.colour\""]);
        assert!(o["spec"]["model"].get("colour").is_none(), "pruned");
        let mut o = obj(spec);
        let e = v.admit(&mut o, None, FieldValidation::Strict).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("strict decoding error: unknown field \"spec.model.colour\""),
            "{e}"
        );
    }

    #[test]
    fn defaults_are_applied_and_nulls_of_non_nullable_fields_dropped() {
        let mut o = obj(json!({"model": {"name": "m", "source": "file:///m.gguf"},
                               "scaling": null}));
        validator()
            .admit(&mut o, None, FieldValidation::Strict)
            .unwrap();
        assert_eq!(o["spec"]["scaling"]["scaleDownWindowSeconds"], 300);
        assert_eq!(o["spec"]["scaling"]["scaleDownWindowMode"], "Adaptive");
    }

    #[test]
    fn a_scale_down_window_mode_outside_the_enum_is_refused_naming_the_values() {
        let v = validator();
        let spec = |mode: &str| {
            obj(json!({"model": {"name": "m", "source": "file:///m.gguf"},
                       "scaling": {"scaleDownWindowMode": mode}}))
        };
        let mut o = spec("Fixed");
        v.admit(&mut o, None, FieldValidation::Strict).unwrap();
        assert_eq!(o["spec"]["scaling"]["scaleDownWindowMode"], "Fixed");
        let e = v
            .admit(&mut spec("Learned"), None, FieldValidation::Strict)
            .unwrap_err();
        assert!(
            e.to_string().contains(
                "spec.scaling.scaleDownWindowMode: Unsupported value: \"Learned\": supported values: \"Adaptive\", \"Fixed\""
            ),
            "{e}"
        );
    }

    #[test]
    fn null_is_a_value_of_a_nullable_field_and_dropped_from_others() {
        let mut o = obj(json!({"model": {"name": "m", "source": "file:///m.gguf",
                                          "parameters": null, "dtype": null}}));
        validator()
            .admit(&mut o, None, FieldValidation::Strict)
            .unwrap();
        assert!(o["spec"]["model"]["dtype"].is_null());
    }

    #[test]
    fn a_condition_type_twice_is_a_duplicate_value_as_the_api_server_says() {
        let v = validator();
        let mut o = obj(json!({"model": {"name": "m", "source": "file:///m.gguf"}}));
        let c = |t: &str| {
            json!({"type": t, "status": "True", "reason": "R", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"})
        };
        o["status"] = json!({"conditions": [c("Ready"), c("Available"), c("Ready")]});
        let Err(Refusal::Invalid { causes, .. }) = v.admit(&mut o, None, FieldValidation::Strict)
        else {
            panic!("a repeated condition type was admitted");
        };
        assert_eq!(causes[0].field, "status.conditions[2]");
        assert_eq!(causes[0].message, "Duplicate value: {\"type\":\"Ready\"}");
    }

    #[test]
    fn a_cel_rule_reports_at_its_field_path_with_the_node_type() {
        let mut o = obj(json!({"model": {"name": "m", "source": "file:///m.gguf"},
                               "scaling": {"minReplicas": 3, "maxReplicas": 2}}));
        let e = validator()
            .admit(&mut o, None, FieldValidation::Strict)
            .unwrap_err();
        let Refusal::Invalid { causes, .. } = e else {
            panic!("{e}")
        };
        assert!(
            causes.iter().any(|c| c.field == "spec.scaling.minReplicas"
                && c.message.starts_with("Invalid value: \"object\": ")),
            "{causes:?}"
        );
    }
}
