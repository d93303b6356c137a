//! Which router is in force, and the Replicas router (no mesh: the clone's share of the
//! Service's Ready endpoints).

use super::*;

#[test]
fn the_router_is_istio_unless_the_spec_or_the_cluster_says_otherwise() {
    let p = fresh_world().plan();
    assert_eq!(p.status.router, Some(Router::Istio));
    // Auto: an ambient namespace, or a Service that already has an HTTPRoute, is the Gateway API's.
    let mut w = fresh_world();
    w.ambient = true;
    assert_eq!(w.plan().status.router, Some(Router::GatewayApi));
    let mut w = fresh_world();
    w.http_routes = vec![json!({"metadata": {"name": "r", "namespace": NS},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "frontend"}]}})];
    assert_eq!(w.plan().status.router, Some(Router::GatewayApi));
    // An ingress route of a Gateway the canary does not list, to the Service: still Istio.
    w.http_routes = vec![json!({"metadata": {"name": "r", "namespace": NS},
        "spec": {"parentRefs": [{"name": "ingress"}],
                 "rules": [{"backendRefs": [{"name": "frontend", "port": 80}]}]}})];
    assert_eq!(w.plan().status.router, Some(Router::Istio));
    // Asked for explicitly: Replicas only when asked.
    let w = fresh_world().with_canary(canary().spec("router", json!("Replicas")));
    assert_eq!(w.plan().status.router, Some(Router::Replicas));
    let mut w = fresh_world().with_canary(canary().spec("router", json!("Istio")));
    w.ambient = true;
    assert_eq!(w.plan().status.router, Some(Router::Istio));
}

#[test]
fn a_running_canarys_router_never_changes() {
    // Split by Istio; an HTTPRoute appears for the Service: the VirtualService stays the one
    // this canary drains and restores.
    let mut w = serving_world(10);
    if let Some(s) = w.canary.status.as_mut() {
        s.router = Some(Router::Istio);
        s.destination_rule = Some("shop/frontend".into());
    }
    w.http_routes = vec![json!({"metadata": {"name": "r", "namespace": NS}})];
    let p = w.plan();
    assert_eq!(p.status.router, Some(Router::Istio));
    assert_eq!(p.status.current_percent, 10);
}

/// A target of `n` Ready replicas whose pods are all Ready endpoints, a canary at `percent`
/// with the Replicas router, no mesh object.
fn replicas_world(n: i32, percent: i64) -> World {
    let mut w =
        fresh_world().with_canary(canary().percent(percent).spec("router", json!("Replicas")));
    w.target = Some(target(n));
    w.pods = (0..n)
        .map(|i| target_pod(&format!("frontend-7d9f-{}", pod_suffix(i))).build())
        .collect();
    w.vss = vec![];
    w.drs = vec![];
    w
}

fn is_mesh_or_label_write(a: &Action) -> bool {
    is_mesh_write(a) || matches!(a, Action::LabelPod { .. } | Action::UnlabelPod { .. })
}

#[test]
fn replicas_sizes_the_clone_so_that_its_share_of_the_endpoints_never_exceeds_the_percent() {
    // 10 % beside 9 target replicas: one clone pod, which is 10 % of the endpoints.
    let w = replicas_world(9, 10);
    let p = w.plan();
    let clone = created_clone(&p).expect("the clone");
    assert_eq!(clone.spec.as_ref().and_then(|s| s.replicas), Some(1));
    assert!(
        !has(&p, is_mesh_or_label_write),
        "no mesh write, no label: {:#?}",
        p.actions
    );
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.phase, Some(Phase::Progressing));
    // The clone's pod Ready and an endpoint: the share is reached.
    let mut w = replicas_world(9, 10);
    w.clone = Some(live_clone(&w.canary, w.target.as_ref().unwrap(), 1, 1));
    w.pods
        .push(clone_pod(&format!("frontend-recording-5c4b-{}", pod_suffix(0))).build());
    let p = w.plan();
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.phase, Some(Phase::Ready), "{p:#?}");
    assert_eq!(ready_reason(&p), "ShareReached");
    assert!(!has(&p, is_mesh_or_label_write), "{:#?}", p.actions);
    // The HPA scales the target to 3: one clone pod would be 25 %; the clone goes to 0 at once.
    w.target = Some(target(3));
    w.pods.truncate(3);
    w.pods
        .push(clone_pod(&format!("frontend-recording-5c4b-{}", pod_suffix(0))).build());
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(a, Action::ScaleClone { replicas: 0, .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(ready_reason(&p), "ShareTooCoarse");
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "ShareTooCoarse")
    );
}

#[test]
fn replicas_refuses_what_it_cannot_honour_without_routes() {
    for (key, value) in [
        ("mode", json!("Mirror")),
        ("always", json!([{"headers": {"x-record": {"exact": "1"}}}])),
        ("never", json!([{"uri": {"prefix": "/healthz"}}])),
        ("ramp", json!({"stepPercent": 5, "interval": "30s"})),
        ("virtualService", json!("frontend")),
    ] {
        let mut c = canary().spec("router", json!("Replicas")).spec(key, value);
        if key == "mode" {
            c = c.spec("acknowledgeMirrorSideEffects", json!(true));
        }
        let p = fresh_world().with_canary(c).plan();
        assert_blocked(&p, "UnsupportedByRouter");
        assert!(created_clone(&p).is_none(), "{key}");
    }
}

#[test]
fn replicas_rollback_removes_the_clone_and_writes_no_mesh_object() {
    let mut w = replicas_world(9, 10);
    w.clone = Some(live_clone(&w.canary, w.target.as_ref().unwrap(), 1, 1));
    w.canary.metadata.deletion_timestamp = Some(Time(at(-1)));
    w.canary.status = Some(RecordingCanaryStatus {
        router: Some(Router::Replicas),
        clone_replicas: 1,
        ..status(Phase::Ready, "ShareReached", 10)
    });
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(a, Action::DeleteClone { .. })),
        "{:#?}",
        p.actions
    );
    assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
}
