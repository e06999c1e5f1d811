//! Every example in `examples/` against the committed CRD, the way an API server would
//! treat it: schema defaults applied, then the OpenAPI schema (a JSON Schema validator),
//! then every `x-kubernetes-validations` CEL rule (a CEL interpreter). Valid examples
//! must pass and deserialize into the Rust type; each file in `examples/invalid/` must be
//! refused with the message named on its `# expect:` line.

use std::path::{Path, PathBuf};

use gpuscale_crds::InferenceDeployment;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `openAPIV3Schema` of v1alpha1 from the committed CRD YAML.
fn crd_schema() -> Value {
    let path = repo().join("crds/inferencedeployments.gpuscale.dev.yaml");
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let version = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .expect("v1alpha1 served");
    version["schema"]["openAPIV3Schema"].clone()
}

/// Structural-schema defaulting as the API server does it: a missing property with a
/// `default` gets it, then defaulting recurses into what is present.
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

fn schema_errors(schema: &Value, value: &Value) -> Vec<String> {
    let validator = jsonschema::draft4::options()
        .should_validate_formats(false)
        .build(schema)
        .expect("the CRD schema compiles");
    validator
        .iter_errors(value)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Kubernetes CEL types: JSON integers are `int`, other numbers `double`.
fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().unwrap()),
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

/// Evaluates every CEL rule whose schema node has a value, returning the messages of
/// the rules that fail. A rule that cannot be evaluated is a failure of the CRD itself.
fn cel_errors(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let src = rule["rule"].as_str().unwrap();
        let program = cel::Program::compile(src)
            .unwrap_or_else(|e| panic!("CEL rule `{src}` does not compile: {e:?}"));
        let mut ctx = cel::Context::default();
        ctx.add_variable_from_value("self", to_cel(value));
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => out.push(format!(
                "{path}{}: {}",
                rule["fieldPath"].as_str().unwrap_or(""),
                rule["message"].as_str().unwrap_or(src)
            )),
            other => panic!("CEL rule `{src}` at {path} gave {other:?}, not a bool"),
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object()) {
        for (name, sub) in props {
            if let Some(v) = obj.get(name) {
                cel_errors(sub, v, &format!("{path}.{name}"), out);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            cel_errors(items, v, &format!("{path}[{i}]"), out);
        }
    }
}

/// What an API server would say about this manifest: schema errors first (it stops
/// there), then CEL rule failures.
fn refusals(schema: &Value, manifest: &str) -> Vec<String> {
    let mut value: Value = serde_yaml::from_str(manifest).expect("example is YAML");
    apply_defaults(schema, &mut value);
    let errors = schema_errors(schema, &value);
    if !errors.is_empty() {
        return errors;
    }
    let mut errors = Vec::new();
    cel_errors(schema, &value, "", &mut errors);
    errors
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn valid_examples_pass_schema_and_cel_and_deserialize() {
    let schema = crd_schema();
    let files = yaml_files(&repo().join("examples"));
    assert!(
        files.len() >= 3,
        "expected at least 3 examples, found {files:?}"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let errors = refusals(&schema, &text);
        assert!(errors.is_empty(), "{} refused: {errors:#?}", file.display());
        let typed: InferenceDeployment = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not fit the Rust type: {e}", file.display()));
        assert!(!typed.spec.model.name.is_empty());
        println!("ok {}", file.display());
    }
}

#[test]
fn invalid_examples_are_refused_with_their_message() {
    let schema = crd_schema();
    let files = yaml_files(&repo().join("examples/invalid"));
    assert!(
        files.len() >= 8,
        "expected at least 8 invalid examples, found {files:?}"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let errors = refusals(&schema, &text);
        assert!(
            errors.iter().any(|e| e.contains(expect)),
            "{}: expected a refusal containing {expect:?}, got {errors:#?}",
            file.display()
        );
        println!("refused {}: {errors:?}", file.display());
    }
}

#[test]
fn defaults_make_the_short_example_complete() {
    let schema = crd_schema();
    let mut value: Value = serde_yaml::from_str(
        "apiVersion: gpuscale.dev/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: s}\n\
         spec:\n  model: {name: m, source: 'file:///m.gguf'}\n",
    )
    .unwrap();
    apply_defaults(&schema, &mut value);
    let spec = &value["spec"];
    assert_eq!(spec["scaling"]["scaleDownWindowSeconds"], 300);
    assert_eq!(spec["scaling"]["minReplicas"], 1);
    assert_eq!(spec["placement"]["strategy"], "BinPack");
    assert_eq!(spec["resources"]["maxSequenceLength"], 4096);
    assert_eq!(spec["resources"]["sharing"], "Exclusive");
    assert!(schema_errors(&schema, &value).is_empty());
}
