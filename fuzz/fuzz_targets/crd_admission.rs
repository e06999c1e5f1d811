//! Admission of InferenceDeployments as the simulated API server does it (prune,
//! default, schema, CEL rules) on arbitrary JSON bodies: admitted or refused with
//! causes, never a panic; an admitted object is admitted again unchanged.
#![no_main]
use std::sync::OnceLock;

use gpuscale_crds::validate::{FieldValidation, Validator};
use libfuzzer_sys::fuzz_target;

fn validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| {
        let (_, yaml) = gpuscale_crds::crd_manifests()
            .into_iter()
            .find(|(f, _)| f.starts_with("inferencedeployments"))
            .expect("the CRD");
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        Validator::from_crd(&crd, "v1alpha1").unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut obj) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if validator()
        .admit(&mut obj, None, FieldValidation::Strict)
        .is_ok()
    {
        let mut again = obj.clone();
        validator()
            .admit(&mut again, None, FieldValidation::Strict)
            .expect("an admitted object is admitted again");
        assert_eq!(again, obj, "admission is idempotent");
    }
});
