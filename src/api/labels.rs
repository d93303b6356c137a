//! The labels that tie objects to a canary: what marks a clone, and which Deployment a pod is of.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::CANARY_LABEL;

/// Label every object created by the controller carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "recording-canary");

/// The canary whose clone a Deployment is (by the labels every clone carries), if it is one.
pub fn clone_of(meta: &ObjectMeta) -> Option<&str> {
    let labels = meta.labels.as_ref()?;
    if labels.get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) {
        return None;
    }
    labels.get(CANARY_LABEL).map(String::as_str)
}

/// Whether the controlling ReplicaSet of a pod (its metadata alone, what a metadata-only watch
/// delivers) belongs to Deployment `deploy` (a Deployment names its ReplicaSets
/// `<deployment>-<pod-template-hash>`).
pub fn meta_of_deployment(meta: &ObjectMeta, deploy: &str) -> bool {
    let Some(hash) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
    else {
        return false;
    };
    let rs = format!("{deploy}-{hash}");
    meta.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.controller == Some(true) && r.kind == "ReplicaSet" && r.name == rs)
    })
}
