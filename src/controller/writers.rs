//! The writers: carry out a [`Plan`](crate::planner::Plan)'s actions, in order, against the API server.
//!
//! Every write touches only fields the controller owns. Writes to objects others also write
//! (user VirtualServices and DestinationRules, the clone that webhooks mutate) are guarded by the
//! resourceVersion they were planned from, so a concurrent change makes the write fail with a
//! conflict and the canary is planned again from fresh state. Deletes carry a UID precondition.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::debug;

use crate::Error;
use crate::api::{
    FIELD_MANAGER, FINALIZER, ROLE_LABEL, ROLE_STABLE, RecordingCanary, RecordingCanaryStatus,
};
use crate::cache::freshness::{Expect, Kind, Written};
use crate::istio;
use crate::planner::{Action, MeshKind};
use crate::runtime::api_errors;
use crate::runtime::lease::Fence;

/// Result of one API call where "already gone" counts as done.
fn gone_is_ok<T>(r: Result<T, kube::Error>) -> Result<Option<T>, kube::Error> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(kube::Error::Api(s)) if api_errors::not_found(&s) => Ok(None),
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

/// The API server answers a failed JSON-patch `test` (our resourceVersion guard) with 422,
/// and a stale resourceVersion on an update with 409: both mean "planned from an old read".
/// Any other 422 (a validation error, an admission policy's denial) is a real refusal.
fn guarded<T>(r: Result<T, kube::Error>) -> Result<Option<T>, Error> {
    match r {
        Ok(t) => Ok(Some(t)),
        // A namespace being deleted refuses new objects; its canaries are about to roll back.
        Err(kube::Error::Api(s)) if api_errors::namespace_terminating(&s) => Ok(None),
        Err(kube::Error::Api(s))
            if api_errors::conflict(&s) || api_errors::failed_patch_test(&s) =>
        {
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
    Api::namespaced_with(client.clone(), ns, &kind.api_resource())
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
        Action::CreateService(o) => format!(
            "create Service {}",
            o.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
        ),
        Action::PatchService { name, .. } => format!("patch Service {name}"),
        Action::DeleteService { name, .. } => format!("delete Service {name}"),
    }
}

/// Failpoints (tests only): the process dies right after a mesh write of `kind`, before any
/// later write of the plan and before the status write that records its time (SIGABRT: the
/// lease is not released, as with SIGKILL).
fn died_after(kind: MeshKind) {
    match kind {
        MeshKind::DestinationRule => {
            fail::fail_point!("after-destination-rule-write", |_| std::process::abort())
        }
        MeshKind::VirtualService => {
            fail::fail_point!("after-virtual-service-write", |_| std::process::abort())
        }
        MeshKind::HttpRoute => {
            fail::fail_point!("after-http-route-write", |_| std::process::abort())
        }
        // Never written.
        MeshKind::GrpcRoute => {}
    }
}

/// The canary's resourceVersion after `written` (the last write to it), else as it was read.
pub fn canary_rv(canary: &RecordingCanary, written: &[Written]) -> Option<String> {
    written
        .iter()
        .rev()
        .find_map(|w| match (&w.kind, &w.expect) {
            (Kind::Canary, Expect::AtLeast(rv)) => Some(rv.clone()),
            _ => None,
        })
        .or_else(|| canary.metadata.resource_version.clone())
}

/// A status merge patch guarded by the canary's resourceVersion (a merge patch that names
/// `metadata.resourceVersion` fails with 409 when the object moved on): a status planned from an
/// older canary, or sent by a leader whose lease ran out and committed late, never overwrites a
/// newer one.
fn guarded_status(status: Value, rv: Option<String>) -> Value {
    let mut patch = json!({ "status": status });
    if let Some(rv) = rv {
        patch["metadata"] = json!({ "resourceVersion": rv });
    }
    patch
}

/// Carries out `actions` in order; stops at the first failure. Before each write the `fence`
/// is checked: a write is sent only while the lease is fresh (a plan whose first writes took long
/// does not send its last ones after a standby could have taken over). Returns what each write
/// left behind, for read-your-writes ([`crate::cache::freshness`]); on failure, the writes made before
/// it are recorded in `written` all the same.
pub async fn apply(
    client: &Client,
    fence: &Fence,
    canary: &RecordingCanary,
    actions: &[Action],
    written: &mut Vec<Written>,
) -> Result<(), Error> {
    let ns = canary.namespace().unwrap_or_default();
    let name = canary.name_any();
    let canaries: Api<RecordingCanary> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    for action in actions {
        if !fence.may_write() {
            return Err(Error::Fenced);
        }
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
                    Err(kube::Error::Api(s)) if api_errors::not_found(&s) => {}
                    r => {
                        guarded(r)?;
                    }
                }
                // The last finalizer gone, the canary goes.
                let uid = canary.metadata.uid.clone().unwrap_or_default();
                written.push(gone(Kind::Canary, &name, &uid));
            }
            Action::RecordRampStep(t) => {
                let st = guarded_status(json!({"lastStepTime": t}), canary_rv(canary, written));
                let r = match canaries.patch_status(&name, &pp, &Patch::Merge(st)).await {
                    Err(kube::Error::Api(s)) if api_errors::not_found(&s) => None,
                    r => guarded(r)?,
                };
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
                written.extend(at(Kind::from(*kind), r));
                died_after(*kind);
            }
            Action::PatchMesh { kind, name, ops } => {
                let r = guarded(
                    mesh_api(client, &ns, *kind)
                        .patch(name, &pp, &json_patch(ops.clone())?)
                        .await,
                )?;
                written.extend(at(Kind::from(*kind), r));
                died_after(*kind);
            }
            Action::DeleteMesh { kind, name, uid } => {
                gone_is_ok(
                    mesh_api(client, &ns, *kind)
                        .delete(name, &delete_with_uid(uid))
                        .await,
                )?;
                written.push(gone(Kind::from(*kind), name, uid));
                died_after(*kind);
            }
            Action::CreateService(object) => {
                let svc: Service = serde_json::from_value(Value::clone(object))?;
                let r = guarded(services.create(&post, &svc).await)?;
                written.extend(at(Kind::Service, r));
            }
            Action::PatchService { name, ops } => {
                let r = guarded(services.patch(name, &pp, &json_patch(ops.clone())?).await)?;
                written.extend(at(Kind::Service, r));
            }
            Action::DeleteService { name, uid } => {
                gone_is_ok(services.delete(name, &delete_with_uid(uid)).await)?;
                written.push(gone(Kind::Service, name, uid));
            }
        }
    }
    Ok(())
}

/// Writes the status when it changed, guarded by the canary's resourceVersion `rv` (see
/// [`canary_rv`]) and by the `fence`. A canary already gone is fine.
pub async fn write_status(
    client: &Client,
    fence: &Fence,
    canary: &RecordingCanary,
    status: &RecordingCanaryStatus,
    rv: Option<String>,
) -> Result<Option<Written>, Error> {
    if canary.status.as_ref() == Some(status) {
        return Ok(None);
    }
    if !fence.may_write() {
        return Err(Error::Fenced);
    }
    let api: Api<RecordingCanary> =
        Api::namespaced(client.clone(), &canary.namespace().unwrap_or_default());
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut patch = status_patch(canary.status.as_ref(), status);
    let patch = guarded_status(patch["status"].take(), rv);
    let r = match api
        .patch_status(&canary.name_any(), &pp, &Patch::Merge(patch))
        .await
    {
        Err(kube::Error::Api(s)) if api_errors::not_found(&s) => None,
        r => guarded(r)?,
    };
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
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    /// A mock API server that answers every request with `{}` of the right shape, records
    /// (method, path, body), and runs `on_request` first (to close a fence mid-plan, say).
    fn api(
        seen: Arc<Mutex<Vec<(String, String, Value)>>>,
        on_request: impl Fn() + Send + Sync + Clone + 'static,
    ) -> Client {
        let svc = tower::service_fn(move |req: Request<Body>| {
            let (seen, on_request) = (seen.clone(), on_request.clone());
            async move {
                on_request();
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                if let Ok(mut v) = seen.lock() {
                    v.push((parts.method.to_string(), parts.uri.path().to_string(), body));
                }
                // Enough of a Pod and of a RecordingCanary for either to deserialize.
                let answer = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "x", "namespace": "shop", "resourceVersion": "9"},
                    "spec": {"targetRef": {"name": "web"}, "percent": 10, "containers": []}});
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(answer.to_string().into_bytes()))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        Client::new(svc, "shop")
    }

    fn canary() -> RecordingCanary {
        serde_json::from_value(json!({
            "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
            "metadata": {"name": "c", "namespace": "shop", "uid": "u", "resourceVersion": "41",
                         "finalizers": [FINALIZER]},
            "spec": {"targetRef": {"name": "web"}, "percent": 10},
        }))
        .expect("canary")
    }

    #[tokio::test]
    async fn no_write_of_a_plan_is_sent_once_the_lease_is_no_longer_fresh() {
        // The fence closes while the first write is on its way (a renewal failed meanwhile):
        // the rest of the plan is not sent, and the reconcile says why.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fence = Fence::elected();
        fence.renewed(tokio::time::Instant::now() + std::time::Duration::from_secs(60));
        let closing = fence.clone();
        let client = api(seen.clone(), move || closing.lost());
        let actions = [
            Action::LabelPod {
                name: "web-1".into(),
            },
            Action::LabelPod {
                name: "web-2".into(),
            },
            Action::RecordRampStep("2026-01-01T00:00:00Z".into()),
        ];
        let mut written = Vec::new();
        let r = apply(&client, &fence, &canary(), &actions, &mut written).await;
        assert!(matches!(r, Err(Error::Fenced)), "{r:?}");
        assert_eq!(seen.lock().map(|v| v.len()).unwrap_or_default(), 1);
        let status = RecordingCanaryStatus {
            phase: Some(crate::api::status::Phase::Ready),
            ..Default::default()
        };
        let r = write_status(&client, &fence, &canary(), &status, Some("41".into())).await;
        assert!(matches!(r, Err(Error::Fenced)), "{r:?}");
        assert_eq!(seen.lock().map(|v| v.len()).unwrap_or_default(), 1);
    }

    #[tokio::test]
    async fn status_and_ramp_step_writes_carry_the_canarys_latest_resource_version() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let client = api(seen.clone(), || {});
        let fence = Fence::always();
        let c = canary();
        let mut written = Vec::new();
        let actions = [Action::RecordRampStep("2026-01-01T00:00:00Z".into())];
        apply(&client, &fence, &c, &actions, &mut written)
            .await
            .expect("applied");
        // The answer's resourceVersion (9) is what the next status write is guarded by.
        assert_eq!(canary_rv(&c, &written).as_deref(), Some("9"));
        let status = RecordingCanaryStatus {
            phase: Some(crate::api::status::Phase::Ready),
            ..Default::default()
        };
        write_status(&client, &fence, &c, &status, canary_rv(&c, &written))
            .await
            .expect("status");
        let seen = seen.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(seen.len(), 2);
        assert!(
            seen.iter()
                .all(|(m, p, _)| m == "PATCH" && p.ends_with("/c/status"))
        );
        assert_eq!(seen[0].2["metadata"]["resourceVersion"], "41");
        assert_eq!(seen[0].2["status"]["lastStepTime"], "2026-01-01T00:00:00Z");
        assert_eq!(seen[1].2["metadata"]["resourceVersion"], "9");
        assert_eq!(seen[1].2["status"]["phase"], "Ready");
    }

    #[test]
    fn a_status_field_that_goes_away_is_cleared_by_the_patch() {
        let prev = RecordingCanaryStatus {
            phase: Some(crate::api::status::Phase::Ready),
            last_step_time: Some("2026-01-01T00:00:00Z".into()),
            virtual_services: vec!["ns/vs".into()],
            ..Default::default()
        };
        let now = RecordingCanaryStatus {
            phase: Some(crate::api::status::Phase::Progressing),
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
            phase: Some(crate::api::status::Phase::Progressing),
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
