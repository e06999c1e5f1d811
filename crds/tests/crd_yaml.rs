//! The committed CRD YAML (in `crds/` and in the Helm chart) must be exactly what the
//! types generate; regenerate with `cargo run -p gpuscale-crds --bin crdgen`.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (file, generated) in gpuscale_crds::crd_manifests() {
        let template = gpuscale_crds::chart_template(&generated);
        for (dir, generated) in [
            ("crds", &generated),
            ("charts/gpuscale/templates/crds", &template),
        ] {
            let path = root.join(dir).join(file);
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == *generated,
                "{} differs from the types; run `cargo run -p gpuscale-crds --bin crdgen`",
                path.display()
            );
        }
    }
}

#[test]
fn crd_has_subresources_printer_columns_and_short_name() {
    use kube::CustomResourceExt;
    let crd = gpuscale_crds::InferenceDeployment::crd();
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["infd".to_string()][..])
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    let v = &crd.spec.versions[0];
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    let cols: Vec<&str> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    for want in ["Model", "Ready", "Desired", "Queue", "GPUs", "Age"] {
        assert!(
            cols.contains(&want),
            "missing printer column {want}: {cols:?}"
        );
    }
}
