//! The writers: carry out a [`Plan`](crate::planner::Plan)'s actions, in order, against the API server.
//!
//! Every write touches only fields the controller owns. Writes to objects others also write
//! (user VirtualServices and DestinationRules, the clone that webhooks mutate) are guarded by the
//! resourceVersion they were planned from, so a concurrent change makes the write fail with a
//! conflict and the canary is planned again from fresh state. Deletes carry a UID precondition.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::debug;

use crate::Error;
use crate::api::{
    FIELD_MANAGER, FINALIZER, ROLE_LABEL, ROLE_STABLE, RecordingCanary, RecordingCanaryStatus,
};
use crate::freshness::{Expect, Kind, Written};
use crate::istio;
use crate::planner::{Action, MeshKind};

/// Result of one API call where "already gone" counts as done.
fn gone_is_ok<T>(r: Result<T, kube::Error>) -> Result<Option<T>, kube::Error> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a write of `kind` left behind: the object at the revision it returned.
fn at<K: Resource>(kind: Kind, obj: Option<K>) -> Option<Written> {
    let obj = obj?;
    Some(Written {
        kind,
        name: obj.meta().name.clone().unwrap_or_default(),
        expect: Expect::AtLeast(obj.meta().resource_version.clone().unwrap_or_default()),
    })
}

fn gone(kind: Kind, name: &str, uid: &str) -> Written {
    Written {
        kind,
        name: name.to_string(),
        expect: Expect::Gone(uid.to_string()),
    }
}

fn mesh_kind(kind: MeshKind) -> Kind {
    match kind {
        MeshKind::VirtualService => Kind::VirtualService,
        MeshKind::DestinationRule => Kind::DestinationRule,
    }
}

/// The API server answers a failed JSON-patch `test` (our resourceVersion guard) with 422,
/// and a stale resourceVersion on an update with 409: both mean "planned from an old read".
/// Any other 422 (a validation error, an admission policy's denial) is a real refusal.
fn guarded<T>(r: Result<T, kube::Error>) -> Result<Option<T>, Error> {
    match r {
        Ok(t) => Ok(Some(t)),
        // A namespace being deleted refuses new objects; its canaries are about to roll back.
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("being terminated") => {
            Ok(None)
        }
        Err(kube::Error::Api(s)) if s.code == 409 || crate::failed_patch_test(&s) => {
            Err(Error::Conflict(s.message))
        }
        Err(e) => Err(e.into()),
    }
}

fn json_patch(ops: Vec<Value>) -> Result<Patch<Value>, Error> {
    let p: json_patch::Patch =
        serde_json::from_value(Value::Array(ops)).map_err(Error::Serialization)?;
    Ok(Patch::Json(p))
}

fn mesh_api(client: &Client, ns: &str, kind: MeshKind) -> Api<DynamicObject> {
    let ar = match kind {
        MeshKind::VirtualService => istio::virtual_service_resource(),
        MeshKind::DestinationRule => istio::destination_rule_resource(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn delete_with_uid(uid: &str) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::background()
    }
}

/// A one-line description of an action, for logs.
pub fn describe(action: &Action) -> String {
    match action {
        Action::AddFinalizer => "add finalizer".into(),
        Action::RemoveFinalizer => "remove finalizer".into(),
        Action::RecordRampStep(t) => format!("record ramp step at {t}"),
        Action::LabelPod { name } => format!("label pod {name} stable"),
        Action::UnlabelPod { name } => format!("unlabel pod {name}"),
        Action::CreateClone(d) => format!("create clone {}", d.name_any()),
        Action::ReplaceClone(d) => format!("replace clone {}", d.name_any()),
        Action::ScaleClone { replicas, .. } => format!("scale clone to {replicas}"),
        Action::DeleteClone { .. } => "delete clone".into(),
        Action::CreateMesh { kind, object } => format!(
            "create {kind:?} {}",
            object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
        ),
        Action::PatchMesh { kind, name, ops } => {
            format!("patch {kind:?} {name}: {}", Value::Array(ops.clone()))
        }
        Action::DeleteMesh { kind, name, .. } => format!("delete {kind:?} {name}"),
    }
}

/// Carries out `actions` in order; stops at the first failure. Returns what each write left
/// behind, for read-your-writes ([`crate::freshness`]); on failure, the writes made before it
/// are recorded in `written` all the same.
pub async fn apply(
    client: &Client,
    canary: &RecordingCanary,
    actions: &[Action],
    written: &mut Vec<Written>,
) -> Result<(), Error> {
    let ns = canary.namespace().unwrap_or_default();
    let name = canary.name_any();
    let canaries: Api<RecordingCanary> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    for action in actions {
        debug!(action = %describe(action), "applying");
        match action {
            Action::AddFinalizer => {
                let mut ops = istio::rv_test(
                    &serde_json::to_value(&canary.metadata).map(|m| json!({"metadata": m}))?,
                );
                if canary.metadata.finalizers.is_some() {
                    ops.push(
                        json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}),
                    );
                } else {
                    ops.push(
                        json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}),
                    );
                }
                let r = guarded(canaries.patch(&name, &pp, &json_patch(ops)?).await)?;
                written.extend(at(Kind::Canary, r));
            }
            Action::RemoveFinalizer => {
                let Some(i) = canary.finalizers().iter().position(|f| f == FINALIZER) else {
                    continue;
                };
                let ops = vec![
                    json!({"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER}),
                    json!({"op": "remove", "path": format!("/metadata/finalizers/{i}")}),
                ];
                match canaries.patch(&name, &pp, &json_patch(ops)?).await {
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    r => {
                        guarded(r)?;
                    }
                }
                // The last finalizer gone, the canary goes.
                let uid = canary.metadata.uid.clone().unwrap_or_default();
                written.push(gone(Kind::Canary, &name, &uid));
            }
            Action::RecordRampStep(t) => {
                let st = json!({"status": {"lastStepTime": t}});
                let r = gone_is_ok(canaries.patch_status(&name, &pp, &Patch::Merge(st)).await)?;
                written.extend(at(Kind::Canary, r));
            }
            Action::LabelPod { name } => {
                let patch = json!({"metadata": {"labels": {ROLE_LABEL: ROLE_STABLE}}});
                let r = gone_is_ok(pods.patch(name, &pp, &Patch::Merge(patch)).await)?;
                written.extend(at(Kind::Pod, r));
            }
            Action::UnlabelPod { name } => {
                let patch = json!({"metadata": {"labels": {ROLE_LABEL: null}}});
                let r = gone_is_ok(pods.patch(name, &pp, &Patch::Merge(patch)).await)?;
                written.extend(at(Kind::Pod, r));
            }
            Action::CreateClone(d) => {
                let r = guarded(deployments.create(&post, d).await)?;
                written.extend(at(Kind::Deployment, r));
            }
            Action::ReplaceClone(d) => {
                let r = guarded(deployments.replace(&d.name_any(), &post, d).await)?;
                written.extend(at(Kind::Deployment, r));
            }
            Action::ScaleClone { replicas, from } => {
                // Guarded by the replicas it scales from: the Deployment's status changes all
                // the time, and only a concurrent scale makes this write wrong.
                let mut ops = match from {
                    Some(n) => vec![json!({"op": "test", "path": "/spec/replicas", "value": n})],
                    None => Vec::new(),
                };
                ops.push(json!({"op": "add", "path": "/spec/replicas", "value": replicas}));
                let r = guarded(
                    deployments
                        .patch(&canary.spec.clone_name(), &pp, &json_patch(ops)?)
                        .await,
                )?;
                written.extend(at(Kind::Deployment, r));
            }
            Action::DeleteClone { uid } => {
                gone_is_ok(
                    deployments
                        .delete(&canary.spec.clone_name(), &delete_with_uid(uid))
                        .await,
                )?;
                written.push(gone(Kind::Deployment, &canary.spec.clone_name(), uid));
            }
            Action::CreateMesh { kind, object } => {
                let obj: DynamicObject = serde_json::from_value(object.clone())?;
                let r = guarded(mesh_api(client, &ns, *kind).create(&post, &obj).await)?;
                written.extend(at(mesh_kind(*kind), r));
            }
            Action::PatchMesh { kind, name, ops } => {
                let r = guarded(
                    mesh_api(client, &ns, *kind)
                        .patch(name, &pp, &json_patch(ops.clone())?)
                        .await,
                )?;
                written.extend(at(mesh_kind(*kind), r));
            }
            Action::DeleteMesh { kind, name, uid } => {
                gone_is_ok(
                    mesh_api(client, &ns, *kind)
                        .delete(name, &delete_with_uid(uid))
                        .await,
                )?;
                written.push(gone(mesh_kind(*kind), name, uid));
            }
        }
    }
    Ok(())
}

/// Writes the status when it changed. A canary already gone is fine.
pub async fn write_status(
    client: &Client,
    canary: &RecordingCanary,
    status: &RecordingCanaryStatus,
) -> Result<Option<Written>, Error> {
    if canary.status.as_ref() == Some(status) {
        return Ok(None);
    }
    let api: Api<RecordingCanary> =
        Api::namespaced(client.clone(), &canary.namespace().unwrap_or_default());
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let patch = status_patch(canary.status.as_ref(), status);
    let r = gone_is_ok(
        api.patch_status(&canary.name_any(), &pp, &Patch::Merge(patch))
            .await,
    )?;
    Ok(at(Kind::Canary, r))
}

/// The merge patch from `prev` to `status`: a field that `status` no longer has is set to null,
/// so that it clears (a merge patch leaves out what it does not name).
pub fn status_patch(prev: Option<&RecordingCanaryStatus>, status: &RecordingCanaryStatus) -> Value {
    let mut new = serde_json::to_value(status).unwrap_or_else(|_| json!({}));
    let old = prev
        .and_then(|p| serde_json::to_value(p).ok())
        .unwrap_or_else(|| json!({}));
    if let (Some(new), Some(old)) = (new.as_object_mut(), old.as_object()) {
        for key in old.keys() {
            if !new.contains_key(key) {
                new.insert(key.clone(), Value::Null);
            }
        }
    }
    json!({ "status": new })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_field_that_goes_away_is_cleared_by_the_patch() {
        let prev = RecordingCanaryStatus {
            phase: Some("Ready".into()),
            last_step_time: Some("2026-01-01T00:00:00Z".into()),
            virtual_services: vec!["ns/vs".into()],
            ..Default::default()
        };
        let now = RecordingCanaryStatus {
            phase: Some("Progressing".into()),
            ..Default::default()
        };
        let p = status_patch(Some(&prev), &now);
        assert_eq!(p["status"]["phase"], "Progressing");
        assert_eq!(p["status"]["lastStepTime"], Value::Null);
        assert_eq!(p["status"]["virtualServices"], Value::Null);
        assert!(
            p["status"]
                .as_object()
                .is_some_and(|o| o.contains_key("lastStepTime"))
        );
    }

    #[test]
    fn a_first_status_patch_names_only_what_is_set() {
        let now = RecordingCanaryStatus {
            phase: Some("Progressing".into()),
            ..Default::default()
        };
        let p = status_patch(None, &now);
        let keys: Vec<&String> = p["status"]
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        assert!(
            !keys.iter().any(|k| k.as_str() == "lastStepTime"),
            "{keys:?}"
        );
        assert_eq!(p["status"]["phase"], "Progressing");
    }
}
