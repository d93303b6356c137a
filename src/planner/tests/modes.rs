//! Modes: forced and excluded requests (`always`/`never`), Mirror.

use super::*;

// ---------------------------------------------------------------------------------------------
// Modes: forced and excluded requests, Mirror
// ---------------------------------------------------------------------------------------------

pub(super) fn always_qa() -> Value {
    json!([{"headers": {"x-team": {"exact": "qa"}}}])
}

pub(super) fn never_health() -> Value {
    json!([{"uri": {"prefix": "/healthz"}}])
}

/// The user's VS after the planner's own write for canary `c`, from serving_world(pct).
pub(super) fn planned_vs(c: CanaryB, pct: i32) -> (World, Value) {
    let w = serving_world(pct).with_canary(c);
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::VirtualService, "frontend")
        .unwrap_or_else(|| panic!("a VirtualService write: {:#?}", p.actions));
    let v = apply_ops(&w.vss[0], ops);
    (w, v)
}

pub(super) fn route_names(v: &Value) -> Vec<String> {
    v["spec"]["http"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["name"].as_str().unwrap_or("-").to_string())
        .collect()
}

#[test]
fn forced_and_excluded_requests_are_routed_ahead_of_the_split_once_the_clone_is_ready() {
    let c = canary()
        .spec("always", always_qa())
        .spec("never", never_health())
        .status(status(Phase::Ready, "TargetReached", 10));
    let (mut w, v) = planned_vs(c.clone(), 10);
    assert_eq!(route_names(&v), ["rcanary-never", "rcanary-always", "-"]);
    assert_eq!(subsets_of_route(&v, 0), [Some(STABLE_SUBSET.to_string())]);
    assert_eq!(
        subsets_of_route(&v, 1),
        [Some(RECORDING_SUBSET.to_string())]
    );
    assert_eq!(weights(&v, 2), [90, 10]);
    // Written once: the next plan over the result changes nothing.
    w.vss = vec![v.clone()];
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    // Rollback takes both routes out and restores the user's VS exactly.
    let mut d = w.with_canary(c.deleting());
    d.vss = vec![v];
    let p = d.plan();
    let restored = apply_ops(
        &d.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("restore"),
    );
    assert_eq!(restored, user_vs());
}

#[test]
fn percent_zero_with_always_records_only_the_forced_requests_on_one_replica() {
    let c = canary()
        .percent(0)
        .spec("always", always_qa())
        .status(status(Phase::Ready, "TargetReached", 0));
    let mut w = serving_world(0).with_canary(c);
    // serving_world(0) has no clone replica: it is sized to one, and nothing is forced yet.
    w = w.clone_ready(0);
    let p = w.plan();
    assert_eq!(p.status.clone_replicas, 1, "{:#?}", p.actions);
    let forced = patch_of(&p, MeshKind::VirtualService, "frontend")
        .map(|ops| route_names(&apply_ops(&w.vss[0], ops)))
        .unwrap_or_else(|| route_names(&w.vss[0]));
    assert!(!forced.iter().any(|n| n == "rcanary-always"), "{forced:?}");
    // With a Ready replica, the forced route goes in; the weight stays 0.
    let w = w.clone_ready(1);
    let p = w.plan();
    let v = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("a VS write"),
    );
    assert_eq!(route_names(&v), ["rcanary-always", "-"]);
    assert_eq!(weights(&v, 1), [100, 0]);
    assert_eq!(p.status.current_percent, 0);
}

#[test]
fn a_sick_clone_loses_its_forced_requests_too() {
    let c = canary()
        .spec("always", always_qa())
        .spec("never", never_health())
        .status(status(Phase::Ready, "TargetReached", 10));
    let (mut w, v) = planned_vs(c, 10);
    w.vss = vec![v];
    w.pods = vec![
        target_pod("frontend-7d9f-a").stable().build(),
        clone_pod("frontend-recording-5c4b-a")
            .crash_looping()
            .build(),
    ];
    let w = w.clone_ready(0);
    let p = w.plan();
    let drained = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("a drain"),
    );
    assert!(
        !route_names(&drained).iter().any(|n| n == "rcanary-always"),
        "{drained:#}"
    );
    assert!(
        !drained
            .to_string()
            .contains(&format!("\"{RECORDING_SUBSET}\",\"weight\":1")),
        "{drained:#}"
    );
    assert!(
        event_reasons(&p).contains(&"TrafficDrained") || p.status.phase == Some(Phase::Degraded)
    );
}

#[test]
fn mirror_mode_needs_the_side_effects_acknowledged() {
    let c = canary().spec("mode", json!("Mirror")).build();
    let err = c.spec.validate().expect_err("not acknowledged");
    assert!(err.0.contains("acknowledgeMirrorSideEffects"), "{err}");
    let c = canary()
        .spec("mode", json!("Mirror"))
        .spec("acknowledgeMirrorSideEffects", json!(true))
        .build();
    assert!(c.spec.validate().is_ok());
}

#[test]
fn switching_a_live_split_to_mirror_is_one_write_that_keeps_the_subsets() {
    let c = canary()
        .spec("mode", json!("Mirror"))
        .spec("acknowledgeMirrorSideEffects", json!(true))
        .status(status(Phase::Ready, "TargetReached", 10));
    let w = serving_world(10).with_canary(c);
    let p = w.plan();
    let vs_writes = p.actions.iter().filter(|a| is_vs_write(a)).count();
    assert_eq!(vs_writes, 1, "{:#?}", p.actions);
    assert!(!has(&p, is_dr_write), "{:#?}", p.actions);
    let v = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("VS write"),
    );
    assert_eq!(subsets_of_route(&v, 0), [Some(STABLE_SUBSET.to_string())]);
    assert_eq!(
        v["spec"]["http"][0]["mirrors"],
        json!([{"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "percentage": {"value": 10}}])
    );
    assert!(
        event_reasons(&p).contains(&"RoutesReshaped"),
        "{:?}",
        p.events
    );
    assert_eq!(p.status.current_percent, 10);
}

#[test]
fn a_route_that_cannot_take_the_shape_blocks_with_its_reason() {
    let mut legacy = user_vs();
    legacy["spec"]["http"][0]["mirror"] = json!({"host": "audit"});
    let c = canary()
        .spec("mode", json!("Mirror"))
        .spec("acknowledgeMirrorSideEffects", json!(true));
    let mut w = fresh_world().with_canary(c);
    w.vss = vec![legacy];
    let p = w.plan();
    assert_blocked(&p, "UnsupportedRoute");
    assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);

    let mut regex = user_vs();
    regex["spec"]["http"][0]["match"] = json!([{"uri": {"regex": "/api/.*"}}]);
    let mut w = fresh_world().with_canary(canary().spec("never", never_health()));
    w.vss = vec![regex];
    let p = w.plan();
    assert_blocked(&p, "UnsupportedRoute");
}

#[test]
fn target_pods_without_istio_sidecars_are_reported_once_without_stopping_progress() {
    let mut w = serving_world(10);
    for p in &mut w.pods {
        p.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .remove("security.istio.io/tlsMode");
    }
    let p = w.plan();
    let cond = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "SidecarInjected")
        .expect("the SidecarInjected condition");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("False", "NoIstioSidecar")
    );
    assert!(
        cond.message.contains("sidecar injection"),
        "{}",
        cond.message
    );
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "NoIstioSidecar")
    );
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);
    // Said once: the next plan, with that status, keeps the condition and sends no Event.
    let mut again = w;
    let mut c = again.canary.clone();
    c.status = Some(p.status.clone());
    again.canary = c;
    let p2 = again.plan();
    assert!(
        !p2.events.iter().any(|e| e.reason == "NoIstioSidecar"),
        "{:?}",
        p2.events
    );
    // With the sidecar, the condition is True.
    let p3 = serving_world(10).plan();
    let cond = p3
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "SidecarInjected")
        .expect("condition");
    assert_eq!(cond.status, "True");
}
