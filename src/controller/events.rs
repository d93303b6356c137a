//! Kubernetes Events about RecordingCanaries (`events.k8s.io/v1`), with bounded memory.
//!
//! kube's `Recorder` keeps every Event it published for six minutes, to count repeats as a
//! series; a fleet of canaries moving at once (1,000 canaries, 7 Events each from create to
//! delete) keeps thousands of them. The planner emits Events on transitions only, so the one
//! repeat worth counting is the same Event again on the same canary (a refused write retried with
//! backoff, say). This publisher remembers one Event per canary, the last, as a fingerprint: a
//! repeat within [`SERIES_WINDOW`] patches that Event's `series`, anything else is a new Event.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::RecordingCanary;
use crate::cache::index::CanaryKey;
use crate::planner::EventNote;

/// A repeat within this long of the last one joins its series (as kube's `Recorder` does).
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// What to send for one Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Send {
    /// A new Event object of this name.
    Create { name: String },
    /// The Event of this name happened again: its series now counts `count`.
    Repeat { name: String, count: i32 },
}

#[derive(Debug, Clone)]
struct Last {
    fingerprint: u64,
    name: String,
    count: i32,
    at: Timestamp,
}

/// The last Event of each canary (pure bookkeeping, no I/O).
#[derive(Debug, Default)]
pub struct Series {
    last: HashMap<CanaryKey, Last>,
}

impl Series {
    /// What to send for an Event with `fingerprint` about `canary` at `now`; `fresh_name` names
    /// a new one.
    pub fn next(
        &mut self,
        canary: &CanaryKey,
        fingerprint: u64,
        now: Timestamp,
        fresh_name: impl FnOnce() -> String,
    ) -> Send {
        if let Some(l) = self.last.get_mut(canary)
            && l.fingerprint == fingerprint
            && now.duration_since(l.at) < SERIES_WINDOW
        {
            l.count += 1;
            l.at = now;
            return Send::Repeat {
                name: l.name.clone(),
                count: l.count,
            };
        }
        let name = fresh_name();
        self.last.insert(
            canary.clone(),
            Last {
                fingerprint,
                name: name.clone(),
                count: 1,
                at: now,
            },
        );
        Send::Create { name }
    }

    /// The Event named `name` is gone (expired on the API server): the next repeat starts anew.
    pub fn lost(&mut self, canary: &CanaryKey, name: &str) {
        if self.last.get(canary).is_some_and(|l| l.name == name) {
            self.last.remove(canary);
        }
    }

    /// Forgets a canary that went away.
    pub fn forget(&mut self, canary: &CanaryKey) {
        self.last.remove(canary);
    }

    /// Canaries remembered (for tests).
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// What makes two Events the same one: type, reason and note.
pub fn fingerprint(e: &EventNote) -> u64 {
    let mut h = DefaultHasher::new();
    (e.warning, &e.reason, &e.note).hash(&mut h);
    h.finish()
}

/// Publishes Events as `controller` (`instance`: this process).
pub struct Publisher {
    client: Client,
    controller: String,
    instance: Option<String>,
    series: Mutex<Series>,
}

impl Publisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.into(),
            instance,
            series: Mutex::new(Series::default()),
        }
    }

    fn series(&self) -> std::sync::MutexGuard<'_, Series> {
        self.series.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a canary that went away.
    pub fn forget(&self, canary: &CanaryKey) {
        self.series().forget(canary);
    }

    /// Publishes `e` about `canary`: a new Event, or a repeat of its last one.
    pub async fn publish(
        &self,
        canary: &RecordingCanary,
        e: &EventNote,
    ) -> Result<(), kube::Error> {
        let ns = canary.namespace().unwrap_or_default();
        let key: CanaryKey = (ns.clone(), canary.name_any());
        let now = Timestamp::now();
        let fp = fingerprint(e);
        let fresh = || format!("{}.{:x}", canary.name_any(), now.as_nanosecond());
        let events: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let (name, count) = match self.series().next(&key, fp, now, fresh) {
            Send::Create { name } => (name, None),
            Send::Repeat { name, count } => (name, Some(count)),
        };
        if let Some(count) = count {
            let series = json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                .await
            {
                Ok(_) => return Ok(()),
                // Expired on the API server (Events live an hour): a new one, below.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(err) => return Err(err),
            }
        }
        let name = if count.is_some() {
            let mut series = self.series();
            series.lost(&key, &name);
            match series.next(&key, fp, now, fresh) {
                Send::Create { name } | Send::Repeat { name, .. } => name,
            }
        } else {
            name
        };
        let ev = self.event(canary, e, name, now);
        events.create(&PostParams::default(), &ev).await.map(drop)
    }

    fn event(
        &self,
        canary: &RecordingCanary,
        e: &EventNote,
        name: String,
        now: Timestamp,
    ) -> Event {
        let regarding: ObjectReference = canary.object_ref(&());
        Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: canary.namespace(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if e.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(e.reason.clone()),
            note: Some(fit(&e.note, NOTE_MAX_BYTES)),
            // Names what was done, so that "weight 10 -> 25" and "weight 25 -> 50" are told
            // apart by tools that group Events by action.
            action: Some(fit(&e.note, ACTION_MAX_BYTES)),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(
                self.instance
                    .clone()
                    .unwrap_or_else(|| self.controller.clone()),
            ),
            ..Event::default()
        }
    }
}

/// The API server refuses an Event whose `note` is longer than this many bytes (events.k8s.io/v1
/// validation); a longer note (a refused write's message, a route in JSON) is cut, never dropped.
pub const NOTE_MAX_BYTES: usize = 1024;
/// The same for `action`.
pub const ACTION_MAX_BYTES: usize = 128;

/// `s` cut to at most `max` bytes on a character boundary, ending in `…` when it was cut.
pub fn fit(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    const MORE: &str = "…";
    let mut end = max.saturating_sub(MORE.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_over_the_api_limit_is_cut_to_it_on_a_character_boundary() {
        let long = "é".repeat(700); // 1,400 bytes
        let cut = fit(&long, NOTE_MAX_BYTES);
        assert!(cut.len() <= NOTE_MAX_BYTES, "{} bytes", cut.len());
        assert!(cut.ends_with('…'));
        assert!(
            cut.len() > NOTE_MAX_BYTES - 8,
            "cut too short: {}",
            cut.len()
        );
        assert_eq!(fit("short", NOTE_MAX_BYTES), "short");
        let action = fit(&"ü".repeat(100), ACTION_MAX_BYTES);
        assert!(action.len() <= ACTION_MAX_BYTES);
    }

    #[tokio::test]
    async fn an_event_with_a_long_note_is_built_within_the_api_limits() {
        let c: RecordingCanary = serde_json::from_value(serde_json::json!({
            "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
            "metadata": {"name": "c", "namespace": "shop", "uid": "u"},
            "spec": {"targetRef": {"name": "web"}, "percent": 10}
        }))
        .expect("canary");
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let p = Publisher::new(client, "recording-canary", None);
        let e = note("WriteRefused", &"x".repeat(5000));
        let ev = p.event(&c, &e, "n".into(), Timestamp::now());
        assert!(
            ev.note
                .as_deref()
                .is_some_and(|n| n.len() <= NOTE_MAX_BYTES)
        );
        assert!(
            ev.action
                .as_deref()
                .is_some_and(|a| a.len() <= ACTION_MAX_BYTES)
        );
    }

    fn c(name: &str) -> CanaryKey {
        ("shop".into(), name.into())
    }

    fn note(reason: &str, text: &str) -> EventNote {
        EventNote {
            warning: true,
            reason: reason.into(),
            note: text.into(),
        }
    }

    #[test]
    fn the_same_event_again_on_a_canary_counts_in_the_series_of_its_first() {
        let mut s = Series::default();
        let t = Timestamp::now();
        let f = fingerprint(&note("WriteRefused", "denied"));
        assert_eq!(
            s.next(&c("a"), f, t, || "a.1".into()),
            Send::Create { name: "a.1".into() }
        );
        for (i, count) in [(1, 2), (2, 3)] {
            let later = t + SignedDuration::from_secs(i);
            assert_eq!(
                s.next(&c("a"), f, later, || "unused".into()),
                Send::Repeat {
                    name: "a.1".into(),
                    count
                }
            );
        }
    }

    #[test]
    fn another_event_another_canary_or_a_repeat_after_the_window_is_a_new_event() {
        let mut s = Series::default();
        let t = Timestamp::now();
        let f = fingerprint(&note("WriteRefused", "denied"));
        s.next(&c("a"), f, t, || "a.1".into());
        // Another canary's identical Event is its own.
        assert_eq!(
            s.next(&c("b"), f, t, || "b.1".into()),
            Send::Create { name: "b.1".into() }
        );
        // Another reason or note on the same canary.
        let g = fingerprint(&note("WriteRefused", "denied again"));
        assert_ne!(f, g);
        assert_eq!(
            s.next(&c("a"), g, t, || "a.2".into()),
            Send::Create { name: "a.2".into() }
        );
        // Only the last Event counts: the first one again is new.
        assert_eq!(
            s.next(&c("a"), f, t, || "a.3".into()),
            Send::Create { name: "a.3".into() }
        );
        // Past the window.
        let late = t + SERIES_WINDOW + SignedDuration::from_secs(1);
        assert_eq!(
            s.next(&c("a"), f, late, || "a.4".into()),
            Send::Create { name: "a.4".into() }
        );
    }

    #[test]
    fn memory_is_one_entry_per_canary_and_goes_with_the_canary() {
        let mut s = Series::default();
        let t = Timestamp::now();
        for i in 0..100 {
            let f = fingerprint(&note("Step", &format!("weight {i}")));
            s.next(&c("a"), f, t, || format!("a.{i}"));
        }
        s.next(&c("b"), 1, t, || "b.1".into());
        assert_eq!(s.len(), 2);
        s.forget(&c("a"));
        s.forget(&c("b"));
        assert!(s.is_empty());
    }

    #[test]
    fn an_event_gone_from_the_api_server_is_not_repeated_into() {
        let mut s = Series::default();
        let t = Timestamp::now();
        s.next(&c("a"), 7, t, || "a.1".into());
        s.lost(&c("a"), "a.1");
        assert_eq!(
            s.next(&c("a"), 7, t, || "a.2".into()),
            Send::Create { name: "a.2".into() }
        );
        // A stale report about an older Event does not drop the current one.
        s.lost(&c("a"), "a.1");
        assert!(matches!(
            s.next(&c("a"), 7, t, || "x".into()),
            Send::Repeat { count: 2, .. }
        ));
    }
}
