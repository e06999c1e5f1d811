//! An InferenceDeployment as the controller's store keeps it: its metadata, and its
//! spec and status as the JSON text the API server sent, read into the typed
//! deployment once a pass has its place (`read`).
//!
//! The store held `DynamicObject`s before: read untyped, so that one object that does
//! not fit the type cannot fail the list that carries all the others. A
//! `serde_json::Value` tree, though, costs a map node and a `String` per field: about
//! 40 KB per deployment in the fleet (heaptrack at 250 deployments: 10 MB of maps under
//! `kube_core::dynamic`), 40 MB at 1,000, against a few KB as text. Text keeps the same
//! tolerance (spec and status are checked against the type only in `read`), and the
//! two things asked of the status outside a pass (the observed generation, for the
//! gate's `class_of`; `waits_for_capacity`, for inventory events) are read once, when
//! the object arrives.
//!
//! The status is kept deflated ([`Deflated`]): it is most of an object's text (its
//! replicas' placements and its conditions, about 4.8 KB in the fleet at ten replicas),
//! read only by the deployment's own pass, and deflate at its fastest level makes it
//! about 1.3 KB: 3.5 MB less at 1,000 deployments, for a few microseconds a pass.

use std::borrow::Cow;
use std::io::{Read, Write};

use gpuscale_crds::InferenceDeployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One stored InferenceDeployment.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "Wire")]
pub struct Stored {
    pub metadata: ObjectMeta,
    spec: Option<Box<RawValue>>,
    status: Option<Deflated>,
    /// `status.observedGeneration`.
    observed_generation: Option<i64>,
    /// No status yet, fewer replicas than desired, or `Unschedulable` true.
    waits_for_capacity: bool,
}

/// The object as the API server sends it (its other top-level fields, `apiVersion`
/// and `kind`, are the type's). Spec and status arrive as `Value`s, not as raw text:
/// a watch event whose `object` comes before its `type` (JSON does not order keys; the
/// simulator sorts them) is buffered by serde before it is read, and raw text cannot
/// be taken from a buffer.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<serde_json::Value>,
}

/// What is read of the status on arrival; a status that does not parse reads as
/// empty (its pass reports the object as unreadable).
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Glance {
    observed_generation: Option<i64>,
    #[serde(default)]
    replicas: u64,
    #[serde(default)]
    desired_replicas: u64,
    #[serde(default)]
    conditions: Vec<GlanceCondition>,
}

#[derive(Deserialize)]
struct GlanceCondition {
    #[serde(rename = "type", default)]
    type_: String,
    #[serde(default)]
    status: String,
}

/// `v` as JSON text (`None` for null: no spec or status).
fn text(v: Option<serde_json::Value>) -> Option<Box<RawValue>> {
    v.filter(|v| !v.is_null())
        .and_then(|v| serde_json::value::to_raw_value(&v).ok())
}

/// JSON text, deflated (RFC 1951, by `flate2`).
#[derive(Clone, Debug)]
struct Deflated(Box<[u8]>);

impl Deflated {
    fn of(json: &RawValue) -> Deflated {
        let text = json.get().as_bytes();
        let mut e = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(text.len() / 3),
            flate2::Compression::fast(),
        );
        e.write_all(text)
            .expect("deflating into memory cannot fail");
        Deflated(
            e.finish()
                .expect("deflating into memory cannot fail")
                .into_boxed_slice(),
        )
    }

    /// The JSON text again.
    fn inflate(&self) -> Box<RawValue> {
        let mut text = String::new();
        flate2::read::DeflateDecoder::new(&*self.0)
            .read_to_string(&mut text)
            .expect("inflating what was deflated here");
        RawValue::from_string(text).expect("the text was JSON when deflated")
    }
}

impl From<Wire> for Stored {
    fn from(w: Wire) -> Stored {
        let glance: Option<Glance> = w
            .status
            .as_ref()
            .filter(|s| !s.is_null())
            .map(|s| Glance::deserialize(s).unwrap_or_default());
        let waits_for_capacity = glance.as_ref().is_none_or(|g| {
            g.replicas < g.desired_replicas
                || g.conditions
                    .iter()
                    .any(|c| c.type_ == "Unschedulable" && c.status == "True")
        });
        Stored {
            metadata: w.metadata,
            spec: text(w.spec),
            status: text(w.status).as_deref().map(Deflated::of),
            observed_generation: glance.and_then(|g| g.observed_generation),
            waits_for_capacity,
        }
    }
}

impl Stored {
    /// `v` as the store would hold it, were the API server to send it (tests).
    #[cfg(test)]
    pub(super) fn parse(v: &serde_json::Value) -> Stored {
        serde_json::from_str(&v.to_string()).expect("an object the store can hold")
    }

    /// `d` as the store would hold it (tests).
    #[cfg(test)]
    pub(super) fn of(d: &InferenceDeployment) -> Stored {
        Stored::parse(&serde_json::to_value(d).expect("a deployment serializes"))
    }

    /// The typed deployment, or why this object cannot be one (the path of the field
    /// that does not fit, and why).
    pub fn read(&self) -> Result<InferenceDeployment, String> {
        use kube::Resource;
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Typed<'a> {
            api_version: &'a str,
            kind: &'a str,
            metadata: &'a ObjectMeta,
            #[serde(skip_serializing_if = "Option::is_none")]
            spec: &'a Option<Box<RawValue>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: &'a Option<Box<RawValue>>,
        }
        let text = serde_json::to_string(&Typed {
            api_version: &InferenceDeployment::api_version(&()),
            kind: &InferenceDeployment::kind(&()),
            metadata: &self.metadata,
            spec: &self.spec,
            status: &self.status.as_ref().map(Deflated::inflate),
        })
        .map_err(|e| e.to_string())?;
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })
    }

    /// `status.observedGeneration`, as it arrived.
    pub fn observed_generation(&self) -> Option<i64> {
        self.observed_generation
    }

    /// Whether it may wait for GPUs to appear: no status yet, fewer replicas than
    /// desired, or `Unschedulable` true.
    pub fn waits_for_capacity(&self) -> bool {
        self.waits_for_capacity
    }
}

impl kube::Resource for Stored {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        InferenceDeployment::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        InferenceDeployment::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        InferenceDeployment::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        InferenceDeployment::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(v: serde_json::Value) -> Stored {
        Stored::parse(&v)
    }

    #[test]
    fn the_observed_generation_is_read_on_arrival() {
        let meta = json!({"name": "m", "namespace": "ns", "generation": 3});
        assert_eq!(
            stored(json!({"metadata": meta})).observed_generation(),
            None
        );
        let acted = stored(json!({"metadata": meta, "status": {"observedGeneration": 3}}));
        assert_eq!(acted.observed_generation(), Some(3));
    }

    #[test]
    fn an_object_that_does_not_fit_the_type_is_stored_and_read_as_an_error() {
        let bad = stored(json!({"metadata": {"name": "bad", "namespace": "ns"},
            "spec": {"model": {"source": 42}}, "status": {"replicas": "many"}}));
        assert_eq!(bad.metadata.name.as_deref(), Some("bad"));
        let why = bad.read().unwrap_err();
        assert!(why.starts_with("spec"), "{why}");
    }

    #[test]
    fn the_status_is_kept_deflated_and_read_back_as_it_came() {
        let condition = |t: &str| {
            json!({"type": t, "status": "True", "reason": "AsExpected",
                "message": "all replicas are placed and ready",
                "lastTransitionTime": "2026-12-05T08:00:00Z"})
        };
        let placement = |i: u32| {
            json!({"replica": i, "node": format!("hollow-{i:04}"), "gpus": [0],
                "gpuUuids": [format!("GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd")],
                "bytesPerGpu": 17_179_869_184u64, "product": "Tesla V100-SXM3-32GB"})
        };
        let placements: Vec<_> = (0..10).map(placement).collect();
        let conditions = ["Available", "Progressing", "Unschedulable"].map(condition);
        let status = json!({"observedGeneration": 4, "replicas": 10,
            "placements": placements, "conditions": conditions});
        let s = stored(json!({"metadata": {"name": "m", "namespace": "ns"},
            "spec": {"x": 1}, "status": status}));
        let kept = s.status.as_ref().expect("a status");
        let text = status.to_string().len();
        assert!(kept.0.len() * 2 < text, "{} bytes of {text}", kept.0.len());
        let back: serde_json::Value = serde_json::from_str(kept.inflate().get()).unwrap();
        assert_eq!(back, status);
        assert_eq!(s.observed_generation(), Some(4));
    }

    #[test]
    fn a_watch_event_reads_whatever_the_order_of_its_keys() {
        let object = r#"{"metadata":{"name":"a","namespace":"n"},"spec":{"x":1},"status":{"observedGeneration":2}}"#;
        for event in [
            format!(r#"{{"type":"ADDED","object":{object}}}"#),
            format!(r#"{{"object":{object},"type":"ADDED"}}"#),
        ] {
            let e: kube::core::WatchEvent<Stored> = serde_json::from_str(&event).unwrap();
            let kube::core::WatchEvent::Added(d) = e else {
                panic!("{event}")
            };
            assert_eq!(d.observed_generation(), Some(2));
            assert_eq!(d.spec.as_ref().map(|s| s.get()), Some(r#"{"x":1}"#));
        }
    }
}
