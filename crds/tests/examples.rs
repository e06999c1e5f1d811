//! Every example in `examples/` against the committed CRD, admitted as an API server
//! admits it (`gpuscale_crds::validate`: pruning, defaults, the OpenAPI schema, then
//! every `x-kubernetes-validations` CEL rule). Valid examples must pass with no unknown
//! field and deserialize into the Rust type; each file in `examples/invalid/` must be
//! refused with the message named on its `# expect:` line, in the API server's words
//! (the simulator's `kubectl apply` test checks the same lines through kubectl).

use std::path::{Path, PathBuf};

use gpuscale_crds::validate::{FieldValidation, Refusal, Validator};
use gpuscale_crds::InferenceDeployment;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The validator of v1alpha1 from the committed CRD YAML.
fn validator() -> Validator {
    let path = repo().join("crds/inferencedeployments.gpuscale.dev.yaml");
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Validator::from_crd(&crd, "v1alpha1").expect("the CRD schema compiles")
}

/// What an API server would say about this manifest (`kubectl apply` asks for strict
/// field validation).
fn admit(v: &Validator, manifest: &str) -> Result<Value, Vec<String>> {
    let mut value: Value = serde_yaml::from_str(manifest).expect("example is YAML");
    match v.admit(&mut value, None, FieldValidation::Strict) {
        Ok(_) => Ok(value),
        Err(Refusal::Invalid { causes, .. }) => Err(causes.iter().map(|c| c.to_string()).collect()),
        Err(other) => Err(vec![other.to_string()]),
    }
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
    let v = validator();
    let files = yaml_files(&repo().join("examples"));
    assert!(
        files.len() >= 3,
        "expected at least 3 examples, found {files:?}"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        if let Err(errors) = admit(&v, &text) {
            panic!("{} refused: {errors:#?}", file.display());
        }
        let typed: InferenceDeployment = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not fit the Rust type: {e}", file.display()));
        assert!(!typed.spec.model.name.is_empty());
        println!("ok {}", file.display());
    }
}

#[test]
fn invalid_examples_are_refused_with_their_message() {
    let v = validator();
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
        let errors = admit(&v, &text).expect_err("an invalid example was admitted");
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
    let value = admit(
        &validator(),
        "apiVersion: gpuscale.dev/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: s}\n\
         spec:\n  model: {name: m, source: 'file:///m.gguf'}\n",
    )
    .unwrap();
    let spec = &value["spec"];
    assert_eq!(spec["scaling"]["scaleDownWindowSeconds"], 300);
    assert_eq!(spec["scaling"]["minReplicas"], 1);
    assert_eq!(spec["placement"]["strategy"], "BinPack");
    assert_eq!(spec["resources"]["maxSequenceLength"], 4096);
    assert_eq!(spec["resources"]["sharing"], "Exclusive");
}
