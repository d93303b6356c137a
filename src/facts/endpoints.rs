//! What the controller keeps of an EndpointSlice: [`EndpointSliceFacts`].
//!
//! The mesh routes to endpoints, not to pods: Istio builds a subset's upstream hosts from the
//! Service's EndpointSlices (each endpoint joined with its pod's labels). A pod that is Ready but
//! not yet a Ready endpoint is no upstream at all, and weight sent to a subset that has none is
//! answered with 503 (UH, "no healthy upstream"). The endpoint-slice controller writes the slices
//! after the pods, seconds to minutes later when its queue is deep, so the planner counts a pod as
//! able to carry traffic only once it is a Ready endpoint here.
//!
//! Of a slice the planner needs only which Service it belongs to (its
//! `kubernetes.io/service-name` label) and which pods it lists as Ready endpoints; serde reads
//! those off the wire and skips the rest (addresses, ports, zones, hints).

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::facts::newest_change_only;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An EndpointSlice as the controller keeps it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Wire")]
pub struct EndpointSliceFacts {
    /// Name, namespace, deletion, resourceVersion and uid only; and, until
    /// [`EndpointSliceFacts::strip`], the time of its newest managedFields entry (the watch's lag).
    pub metadata: ObjectMeta,
    /// Its Service (the `kubernetes.io/service-name` label; empty without one).
    pub service: String,
    /// The pods it lists as Ready endpoints, sorted.
    ready_pods: Box<[String]>,
    /// When it last changed: its newest managedFields entry, which the API server keeps to the
    /// second (kept past [`EndpointSliceFacts::strip`]).
    pub changed: Option<Timestamp>,
}

impl EndpointSliceFacts {
    /// Drops what only the watch's lag measure reads (see the `metadata` field).
    pub fn strip(&mut self) {
        self.metadata.managed_fields = None;
    }

    /// Whether pod `name` is a Ready endpoint in this slice.
    pub fn has_ready_pod(&self, name: &str) -> bool {
        self.ready_pods
            .binary_search_by(|p| p.as_str().cmp(name))
            .is_ok()
    }

    /// The pods listed as Ready endpoints.
    pub fn ready_pods(&self) -> impl Iterator<Item = &str> {
        self.ready_pods.iter().map(String::as_str)
    }
}

crate::facts_of!(
    EndpointSliceFacts,
    k8s_openapi::api::discovery::v1::EndpointSlice
);

/// The pods that are Ready endpoints of a Service, from all of its slices.
pub fn ready_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSliceFacts>,
) -> BTreeSet<String> {
    slices
        .into_iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .flat_map(|s| s.ready_pods().map(String::from))
        .collect()
}

/// The wire form: what serde reads of an EndpointSlice. `null` and absent mean the same.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: Option<ObjectMeta>,
    #[serde(default)]
    endpoints: Option<Vec<WireEndpoint>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEndpoint {
    #[serde(default)]
    conditions: Option<WireConditions>,
    #[serde(default)]
    target_ref: Option<WireRef>,
}

#[derive(Deserialize)]
struct WireConditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct WireRef {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

impl From<Wire> for EndpointSliceFacts {
    fn from(w: Wire) -> Self {
        let m = w.metadata.unwrap_or_default();
        let service = m
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_default();
        // "ready" unset means unknown, which consumers are to read as ready (the API's doc);
        // the endpoint-slice controller always sets it.
        let ready_pods: BTreeSet<String> = w
            .endpoints
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .filter_map(|e| e.target_ref)
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .filter_map(|r| r.name)
            .collect();
        let managed_fields = newest_change_only(m.managed_fields);
        let changed = managed_fields
            .as_ref()
            .and_then(|f| f.first())
            .and_then(|e| e.time.as_ref())
            .map(|t| t.0);
        EndpointSliceFacts {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                deletion_timestamp: m.deletion_timestamp,
                resource_version: m.resource_version,
                uid: m.uid,
                managed_fields,
                ..ObjectMeta::default()
            },
            service,
            ready_pods: ready_pods.into_iter().collect(),
            changed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(endpoints: serde_json::Value) -> EndpointSliceFacts {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop", "resourceVersion": "7",
                         "labels": {"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .expect("slice")
    }

    #[test]
    fn a_slice_keeps_its_service_and_its_ready_pod_endpoints_only() {
        let s = slice(json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true},
             "targetRef": {"kind": "Pod", "name": "web-7d9f-a", "namespace": "shop"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": false},
             "targetRef": {"kind": "Pod", "name": "web-recording-5c4b-a", "namespace": "shop"}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true},
             "targetRef": {"kind": "Pod", "name": "web-7d9f-old"}},
            {"addresses": ["10.0.0.4"], "conditions": {},
             "targetRef": {"kind": "Pod", "name": "web-7d9f-b"}},
            {"addresses": ["10.9.9.9"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.5"], "conditions": {"ready": true},
             "targetRef": {"kind": "Node", "name": "node-1"}},
        ]));
        assert_eq!(s.service, "web");
        assert_eq!(s.metadata.labels, None, "labels are not kept");
        assert_eq!(
            s.ready_pods().collect::<Vec<_>>(),
            ["web-7d9f-a", "web-7d9f-b"]
        );
        assert!(s.has_ready_pod("web-7d9f-a"));
        assert!(!s.has_ready_pod("web-recording-5c4b-a"), "not ready yet");
        assert!(!s.has_ready_pod("web-7d9f-old"), "terminating");
    }

    #[test]
    fn a_slice_keeps_when_it_last_changed_past_the_strip() {
        let mut s: EndpointSliceFacts = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "time": "2026-12-05T10:00:07Z"},
                {"manager": "kubectl", "operation": "Update", "time": "2026-12-05T09:00:00Z"},
            ]},
        }))
        .expect("slice");
        s.strip();
        assert_eq!(s.metadata.managed_fields, None);
        assert_eq!(
            s.changed,
            Some("2026-12-05T10:00:07Z".parse().expect("time"))
        );
        assert_eq!(slice(json!([])).changed, None, "no managedFields: unknown");
    }

    #[test]
    fn a_slice_without_endpoints_has_no_ready_pod() {
        for endpoints in [json!([]), json!(null)] {
            assert_eq!(slice(endpoints).ready_pods().count(), 0);
        }
    }

    #[test]
    fn the_ready_endpoints_of_a_service_are_those_of_all_its_live_slices() {
        let a = slice(
            json!([{"conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "p1"}}]),
        );
        let mut b = slice(
            json!([{"conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "p2"}}]),
        );
        assert_eq!(
            ready_endpoints([&a, &b]),
            BTreeSet::from(["p1".to_string(), "p2".to_string()])
        );
        b.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(
            ready_endpoints([&a, &b]),
            BTreeSet::from(["p1".to_string()])
        );
    }
}
