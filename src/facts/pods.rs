//! What the controller keeps of a pod: [`PodFacts`].
//!
//! Pods are the bulk of a cluster's objects, and every canary has at least two (the target's
//! and the clone's). The planner reads of a pod only its name, labels, owner, deletion, whether
//! it is Ready and whether a container is in `CrashLoopBackOff`. So the pod watch, the prime
//! list and the caches use this type instead of k8s-openapi's `Pod`: serde reads those fields
//! straight off the wire and skips the rest (the spec, most of the status) without building it.
//! A kept pod costs about a tenth of a stripped `Pod` (see docs/performance.md, the memory section).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::facts::newest_change_only;

/// A pod as the controller keeps it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Wire")]
pub struct PodFacts {
    /// Name, namespace, labels, owner references, deletion, resourceVersion and uid only; and,
    /// until [`PodFacts::strip`], the time of its newest managedFields entry (the watch's lag).
    pub metadata: ObjectMeta,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// One of its containers waits in `CrashLoopBackOff`.
    pub crash_looping: bool,
}

impl PodFacts {
    /// Drops what only the watch's lag measure reads (see the `metadata` field).
    pub fn strip(&mut self) {
        self.metadata.managed_fields = None;
    }

    /// Ready, and not being deleted.
    pub fn serving(&self) -> bool {
        self.ready && self.metadata.deletion_timestamp.is_none()
    }
}

crate::facts_of!(PodFacts, k8s_openapi::api::core::v1::Pod);

/// The wire form: what serde reads of a pod. `null` and absent mean the same.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: Option<ObjectMeta>,
    #[serde(default)]
    status: Option<WireStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStatus {
    #[serde(default)]
    conditions: Option<Vec<WireCondition>>,
    #[serde(default)]
    container_statuses: Option<Vec<WireContainer>>,
}

#[derive(Deserialize)]
struct WireCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

#[derive(Deserialize)]
struct WireContainer {
    #[serde(default)]
    state: Option<WireState>,
}

#[derive(Deserialize)]
struct WireState {
    #[serde(default)]
    waiting: Option<WireWaiting>,
}

#[derive(Deserialize)]
struct WireWaiting {
    #[serde(default)]
    reason: Option<String>,
}

impl From<Wire> for PodFacts {
    fn from(w: Wire) -> Self {
        let m = w.metadata.unwrap_or_default();
        let status = w.status;
        let ready = status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let crash_looping = status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.state
                        .as_ref()
                        .and_then(|s| s.waiting.as_ref())
                        .and_then(|w| w.reason.as_deref())
                        == Some("CrashLoopBackOff")
                })
            });
        PodFacts {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                labels: m.labels,
                owner_references: m.owner_references,
                deletion_timestamp: m.deletion_timestamp,
                resource_version: m.resource_version,
                uid: m.uid,
                managed_fields: newest_change_only(m.managed_fields),
                ..ObjectMeta::default()
            },
            ready,
            crash_looping,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use serde_json::json;

    fn wire(status: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-7d9f-a", "namespace": "shop", "uid": "u1", "resourceVersion": "42",
                "generateName": "web-7d9f-", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app": "web", "pod-template-hash": "7d9f"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "now"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d9f", "uid": "rs1", "controller": true}],
                "managedFields": [
                    {"manager": "kubelet", "operation": "Update", "time": "2026-01-01T00:00:09Z",
                     "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}},
                    {"manager": "kube-controller-manager", "operation": "Update",
                     "time": "2026-01-01T00:00:01Z"},
                ],
            },
            "spec": {"containers": [{"name": "app", "image": "web:v1"}], "nodeName": "n1"},
            "status": status,
        })
    }

    #[test]
    fn keeps_what_the_planner_reads_and_drops_the_rest() {
        let p: PodFacts = serde_json::from_value(wire(json!({
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                   "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}],
        })))
        .unwrap();
        assert!(p.ready && p.serving() && !p.crash_looping);
        assert_eq!(p.name_any(), "web-7d9f-a");
        assert_eq!(p.namespace().as_deref(), Some("shop"));
        assert_eq!(p.resource_version().as_deref(), Some("42"));
        assert_eq!(p.uid().as_deref(), Some("u1"));
        assert_eq!(
            p.labels().get("pod-template-hash").map(String::as_str),
            Some("7d9f")
        );
        assert_eq!(p.owner_references()[0].name, "web-7d9f");
        assert!(p.metadata.annotations.is_none());
        // Only the newest change's time, for the watch's lag; strip() drops it.
        let mut p = p;
        let kept = p.managed_fields();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            kept[0].time.as_ref().map(|t| t.0.to_string()).as_deref(),
            Some("2026-01-01T00:00:09Z")
        );
        assert!(kept[0].manager.is_none() && kept[0].fields_v1.is_none());
        p.strip();
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.generate_name.is_none());
        assert!(p.metadata.creation_timestamp.is_none());
    }

    #[test]
    fn a_pod_not_ready_or_being_deleted_does_not_serve() {
        let p: PodFacts = serde_json::from_value(wire(json!({
            "conditions": [{"type": "Ready", "status": "False"}],
        })))
        .unwrap();
        assert!(!p.ready && !p.serving());
        let mut v = wire(json!({"conditions": [{"type": "Ready", "status": "True"}]}));
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
        let p: PodFacts = serde_json::from_value(v).unwrap();
        assert!(p.ready && !p.serving());
    }

    #[test]
    fn a_container_waiting_in_crash_loop_back_off_marks_the_pod() {
        let p: PodFacts = serde_json::from_value(wire(json!({
            "containerStatuses": [
                {"name": "a", "state": {"running": {}}},
                {"name": "b", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}},
            ],
        })))
        .unwrap();
        assert!(p.crash_looping);
        let p: PodFacts = serde_json::from_value(wire(json!({
            "containerStatuses": [{"name": "b", "state": {"waiting": {"reason": "ContainerCreating"}}}],
        })))
        .unwrap();
        assert!(!p.crash_looping);
    }

    #[test]
    fn a_pod_without_status_or_with_nulls_is_read_as_not_ready() {
        let p: PodFacts = serde_json::from_value(wire(serde_json::Value::Null)).unwrap();
        assert!(!p.ready && !p.crash_looping);
        let p: PodFacts =
            serde_json::from_value(wire(json!({"conditions": null, "containerStatuses": null})))
                .unwrap();
        assert!(!p.ready);
        let p: PodFacts = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert_eq!(p.name_any(), "x");
    }
}
