//! Events (events.k8s.io/v1) about deployments, counted in series without losing what
//! they say.
//!
//! kube-runtime's `Recorder` keys a series by type, reason, action and object only, and
//! keeps the first note: a `ScaledUp 1 → 2` followed within six minutes by `ScaledUp
//! 2 → 4` shows as one event saying `1 → 2`, count 2. Every scale decision must be on
//! record, so here the note is part of the key: an event that repeats one already sent
//! (same note too) within the series window bumps that event's series, as the API's
//! EventSeries intends (<https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/event-v1/>);
//! any other event is a new object.

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::Client;
use tokio::sync::Mutex;

/// How long an event can still be continued as a series (kube-runtime's window).
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);
/// At most this many series are remembered; the oldest go first.
const MAX_SERIES: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    regarding: (Option<String>, Option<String>, Option<String>),
    type_: &'static str,
    reason: String,
    action: String,
    note: String,
}

/// Publishes Events as one controller instance.
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    sent: Mutex<HashMap<Key, Event>>,
}

impl Recorder {
    /// A recorder reporting as `controller` (instance `instance`, else the controller).
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Recorder {
            client,
            controller: controller.into(),
            instance: instance.unwrap_or_else(|| controller.into()),
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes one event about `regarding`.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let type_ = match type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key = Key {
            regarding: (
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
            type_,
            reason: reason.into(),
            action: action.into(),
            note: note.into(),
        };
        let mut sent = self.sent.lock().await;
        let last_seen = |e: &Event| {
            e.series
                .as_ref()
                .map(|s| s.last_observed_time.0)
                .or(e.event_time.as_ref().map(|t| t.0))
                .unwrap_or(now)
        };
        sent.retain(|_, e| last_seen(e) + SERIES_WINDOW > now);
        if sent.len() >= MAX_SERIES {
            if let Some(oldest) = sent
                .iter()
                .min_by_key(|(_, e)| last_seen(e))
                .map(|(k, _)| k.clone())
            {
                sent.remove(&oldest);
            }
        }
        let ns = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let event = match sent.get(&key) {
            Some(prev) => {
                let mut e = prev.clone();
                e.series = Some(EventSeries {
                    count: prev.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                });
                let name = e.metadata.name.clone().unwrap_or_default();
                let patch = serde_json::json!({"series": e.series});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                e
            }
            None => {
                let e = Event {
                    metadata: ObjectMeta {
                        namespace: Some(ns.clone()),
                        name: Some(format!(
                            "{}.{:x}",
                            regarding.name.as_deref().unwrap_or(&self.controller),
                            now.as_nanosecond()
                        )),
                        ..ObjectMeta::default()
                    },
                    event_time: Some(MicroTime(now)),
                    type_: Some(type_.into()),
                    reason: Some(reason.into()),
                    action: Some(action.into()),
                    note: Some(note.into()),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Event::default()
                };
                api.create(&PostParams::default(), &e).await?
            }
        };
        sent.insert(key, event);
        Ok(())
    }
}
