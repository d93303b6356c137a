//! What the caches keep of a Deployment: [`DeploymentFacts`].
//!
//! Every canary has two Deployments in the caches, its target and its clone. As k8s-openapi's
//! typed `Deployment` each costs several KiB (the struct alone is 2,496 bytes before any
//! string, and a pod template's containers are as large again). The caches keep the metadata as
//! a struct (the index and the freshness checks read it for every event) and the rest as compact
//! JSON text, parsed back into a `Deployment` when a canary is planned: a few microseconds for
//! one of the two objects a reconcile reads. [`strip`] says what is kept.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer, Serialize};

use crate::api::labels;
use crate::facts::newest_change_only;

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What the caches keep of a Deployment: all but managedFields and kubectl's copy of the spec;
/// of a clone, not its pod template; of any other Deployment (a target), neither its status nor
/// its annotations. The planner reads of a clone its metadata (the source hash annotation says
/// which template it runs), replicas, selector and status; of a target its labels, spec and the
/// rest of its metadata, never its annotations. It builds the clone's template from the target,
/// and never targets a clone (`TargetIsAClone`).
pub fn strip(d: &mut Deployment) {
    d.metadata.managed_fields = None;
    if labels::clone_of(&d.metadata).is_some() {
        if let Some(a) = d.metadata.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
        if let Some(spec) = d.spec.as_mut() {
            spec.template = Default::default();
        }
    } else {
        // Each annotation map costs a 544-byte B-tree node at least.
        d.metadata.annotations = None;
        d.status = None;
    }
}

/// A Deployment as the caches keep it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentFacts {
    /// Its metadata, stripped, but for the time of its newest managedFields entry until
    /// [`DeploymentFacts::strip_lag`] (the watch's lag is measured from it).
    pub metadata: ObjectMeta,
    /// `{"spec": …, "status": …}` as compact JSON text (what [`strip`] left of them).
    body: Box<str>,
}

#[derive(Serialize, Deserialize)]
struct Body {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<DeploymentSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<DeploymentStatus>,
}

impl DeploymentFacts {
    /// Keeps `d` as [`strip`] says; only the newest managedFields time stays, until
    /// [`DeploymentFacts::strip_lag`].
    pub fn new(mut d: Deployment) -> Self {
        let changed = newest_change_only(d.metadata.managed_fields.take());
        strip(&mut d);
        d.metadata.managed_fields = changed;
        let body = Body {
            spec: d.spec,
            status: d.status,
        };
        Self {
            metadata: d.metadata,
            body: serde_json::to_string(&body)
                .unwrap_or_else(|_| "{}".into())
                .into_boxed_str(),
        }
    }

    /// Drops what only the watch's lag measure reads.
    pub fn strip_lag(&mut self) {
        self.metadata.managed_fields = None;
    }

    /// The Deployment as kept (see [`strip`]).
    pub fn deployment(&self) -> Deployment {
        let body: Body = serde_json::from_str(&self.body).unwrap_or(Body {
            spec: None,
            status: None,
        });
        Deployment {
            metadata: self.metadata.clone(),
            spec: body.spec,
            status: body.status,
        }
    }
}

impl<'de> Deserialize<'de> for DeploymentFacts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Deployment::deserialize(d).map(DeploymentFacts::new)
    }
}

crate::facts_of!(DeploymentFacts, Deployment);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wire(labels: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "9",
                         "labels": labels,
                         "annotations": {LAST_APPLIED: "{}", "keep": "me"},
                         "managedFields": [
                            {"manager": "kubectl", "operation": "Update", "time": "2026-01-01T00:00:05Z",
                             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}},
                            {"manager": "kube-controller-manager", "operation": "Update",
                             "time": "2026-01-01T00:00:02Z"}]},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "app", "image": "web:v1"}]}}},
            "status": {"replicas": 3, "readyReplicas": 2, "conditions": [
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]},
        })
    }

    fn stripped(v: serde_json::Value) -> Deployment {
        let mut d: Deployment = serde_json::from_value(v).unwrap();
        strip(&mut d);
        d
    }

    #[test]
    fn a_target_comes_back_as_stripped_with_its_template_and_without_its_status_or_annotations() {
        let v = wire(json!({"app": "web"}));
        let mut f: DeploymentFacts = serde_json::from_value(v.clone()).unwrap();
        let times: Vec<_> = f
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|e| (e.time.as_ref().map(|t| t.0.to_string()), e.manager.clone()))
            .collect();
        assert_eq!(times, [(Some("2026-01-01T00:00:05Z".to_string()), None)]);
        f.strip_lag();
        let d = f.deployment();
        assert_eq!(d, stripped(v));
        assert!(d.status.is_none());
        assert_eq!(
            d.spec.unwrap().template.spec.unwrap().containers[0]
                .image
                .as_deref(),
            Some("web:v1")
        );
        assert_eq!(d.metadata.annotations, None);
        assert_eq!(d.metadata.labels.unwrap().len(), 1);
    }

    #[test]
    fn a_clone_comes_back_without_its_template_and_with_its_status() {
        let v = wire(
            json!({"app": "web", labels::MANAGED_BY.0: labels::MANAGED_BY.1,
                            crate::api::CANARY_LABEL: "c"}),
        );
        let mut f: DeploymentFacts = serde_json::from_value(v.clone()).unwrap();
        f.strip_lag();
        let d = f.deployment();
        assert_eq!(d, stripped(v));
        let spec = d.spec.unwrap();
        assert_eq!(spec.template, Default::default());
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(d.status.unwrap().ready_replicas, Some(2));
        assert_eq!(
            d.metadata.annotations.unwrap().keys().collect::<Vec<_>>(),
            ["keep"],
            "of a clone's annotations, only kubectl's copy dropped"
        );
    }
}
