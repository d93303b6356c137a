//! What the controller keeps of a Service: [`ServiceFacts`].
//!
//! The planner reads of a canary's Service only whether it exists and its pod selector. A
//! stripped k8s-openapi `Service` still takes about 1.7 KB: its spec struct alone is 800 bytes
//! of empty options, and the selector a 544-byte B-tree node. So the Service watch, the prime
//! read and the cache use this type: serde reads the metadata and `spec.selector` off the wire
//! and skips the rest.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::facts::newest_change_only;

/// The label that enrols a namespace or a Service with a waypoint in Istio's ambient mode.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";

/// A Service as the controller keeps it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Wire")]
pub struct ServiceFacts {
    /// Name, namespace, deletion, resourceVersion and uid only; and, until
    /// [`ServiceFacts::strip`], the time of its newest managedFields entry (the watch's lag).
    pub metadata: ObjectMeta,
    /// `spec.selector`, sorted by key (empty: none).
    selector: Box<[(String, String)]>,
    /// `spec.ports` as compact JSON text (the Gateway API router copies them to the Services it
    /// owns); empty without ports.
    ports: Box<str>,
    /// Its `istio.io/use-waypoint` label: the waypoint that handles its L7 traffic in Istio's
    /// ambient mode.
    pub use_waypoint: Option<Box<str>>,
    /// The UID of its controlling owner (the Gateway API router's own Services name their
    /// RecordingCanary).
    pub controller_uid: Option<Box<str>>,
}

impl ServiceFacts {
    /// Drops what only the watch's lag measure reads (see the `metadata` field).
    pub fn strip(&mut self) {
        self.metadata.managed_fields = None;
    }

    /// Its pod selector (empty: none).
    pub fn selector(&self) -> BTreeMap<String, String> {
        self.selector.iter().cloned().collect()
    }

    /// Its `spec.ports`, as the API lists them.
    pub fn ports(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ports).unwrap_or_default()
    }
}

crate::facts_of!(ServiceFacts, k8s_openapi::api::core::v1::Service);

/// The wire form: what serde reads of a Service. `null` and absent mean the same.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: Option<ObjectMeta>,
    #[serde(default)]
    spec: Option<WireSpec>,
}

#[derive(Deserialize)]
struct WireSpec {
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ports: Option<Vec<serde_json::Value>>,
}

impl From<Wire> for ServiceFacts {
    fn from(w: Wire) -> Self {
        let m = w.metadata.unwrap_or_default();
        let use_waypoint = m
            .labels
            .as_ref()
            .and_then(|l| l.get(USE_WAYPOINT_LABEL))
            .map(|v| v.as_str().into());
        let controller_uid = m
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .map(|r| r.uid.as_str().into());
        let (selector, ports) = match w.spec {
            Some(spec) => (spec.selector, spec.ports),
            None => (None, None),
        };
        let ports = match ports {
            Some(p) if !p.is_empty() => serde_json::Value::Array(p).to_string().into(),
            _ => Box::from(""),
        };
        ServiceFacts {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                deletion_timestamp: m.deletion_timestamp,
                resource_version: m.resource_version,
                uid: m.uid,
                managed_fields: newest_change_only(m.managed_fields),
                ..ObjectMeta::default()
            },
            selector: selector.unwrap_or_default().into_iter().collect(),
            ports,
            use_waypoint,
            controller_uid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_service_keeps_its_identity_and_selector_only() {
        let s: ServiceFacts = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "9",
                         "labels": {"team": "a"}, "annotations": {"note": "x"},
                         "managedFields": [
                            {"manager": "kubectl", "operation": "Update", "time": "2026-01-01T00:00:05Z",
                             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}],
                     "selector": {"tier": "web", "app": "shop"}},
            "status": {"loadBalancer": {}},
        }))
        .unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("web"));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("9"));
        assert_eq!(s.metadata.labels, None);
        assert_eq!(s.metadata.annotations, None);
        assert_eq!(
            s.selector(),
            BTreeMap::from([
                ("app".to_string(), "shop".to_string()),
                ("tier".to_string(), "web".to_string())
            ])
        );
        let mut s = s;
        assert!(s.metadata.managed_fields.is_some(), "kept for the lag");
        s.strip();
        assert!(s.metadata.managed_fields.is_none());
    }

    #[test]
    fn a_service_without_a_selector_selects_nothing() {
        for spec in [json!({"type": "ExternalName"}), json!(null)] {
            let s: ServiceFacts = serde_json::from_value(json!({
                "metadata": {"name": "ext", "namespace": "shop"}, "spec": spec,
            }))
            .unwrap();
            assert!(s.selector().is_empty());
        }
    }
}
