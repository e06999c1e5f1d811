//! Writes the CRD YAML generated from the API types into `crds/`, and as templates
//! into the Helm chart's `templates/crds/` (see `gpuscale_crds::chart_template`).
//! `--check` only compares and fails on any difference.

use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for (file, yaml) in gpuscale_crds::crd_manifests() {
        let template = gpuscale_crds::chart_template(&yaml);
        for (dir, yaml) in [
            (root.join("crds"), &yaml),
            (root.join("charts/gpuscale/templates/crds"), &template),
        ] {
            let path = dir.join(file);
            if check {
                if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    stale.push(path);
                }
            } else {
                write(&path, yaml)?;
                println!("wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        anyhow::bail!(
            "CRD YAML differs from the types in: {:?}; run `cargo run -p gpuscale-crds --bin crdgen`",
            stale
        );
    }
    Ok(())
}

fn write(path: &Path, yaml: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().expect("a file path has a parent"))?;
    std::fs::write(path, yaml).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}
