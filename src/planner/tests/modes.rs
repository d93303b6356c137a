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

// ---------------------------------------------------------------------------------------------
// Whole sessions: spec.sessionKey
// ---------------------------------------------------------------------------------------------

/// The regex of a route's header match on `x-session`.
fn session_regex(route: &Value) -> Option<String> {
    route["match"][0]["headers"]["x-session"]["regex"]
        .as_str()
        .map(String::from)
}

#[test]
fn a_session_key_routes_keys_in_the_share_to_the_clone_and_the_others_to_stable_ahead_of_the_split()
{
    let c = canary()
        .spec("sessionKey", json!({"header": "x-session"}))
        .status(status(Phase::Ready, "TargetReached", 10));
    let (mut w, v) = planned_vs(c.clone(), 10);
    assert_eq!(route_names(&v), ["rcanary-never", "rcanary-always", "-"]);
    assert_eq!(subsets_of_route(&v, 0), [Some(STABLE_SUBSET.to_string())]);
    assert_eq!(
        subsets_of_route(&v, 1),
        [Some(RECORDING_SUBSET.to_string())]
    );
    let (outside, inside) = (
        session_regex(&v["spec"]["http"][0]).expect("never: keys outside"),
        session_regex(&v["spec"]["http"][1]).expect("always: keys inside"),
    );
    let (o, i) = (
        regex::Regex::new(&outside).unwrap(),
        regex::Regex::new(&inside).unwrap(),
    );
    // 26 of 256 buckets at 10 %: keys ending in 00..19 (hex) are in.
    assert!(i.is_match("4b1d-00") && i.is_match("4B1D-19") && !i.is_match("4b1d-1a"));
    assert!(o.is_match("4b1d-1a") && !o.is_match("4b1d-00"));
    // Requests without the key: the weighted split.
    assert_eq!(weights(&v, 2), [90, 10]);
    let p = {
        w.vss = vec![v.clone()];
        w.plan()
    };
    assert!(!has(&p, is_vs_write), "written once: {:#?}", p.actions);
    assert!(
        ready_message(&p).contains("26 of 256 buckets"),
        "{}",
        ready_message(&p)
    );

    // A ramp to 30 % only adds keys: every key in at 10 % is in at 30 %.
    let (_, v30) = planned_vs(
        canary()
            .spec("sessionKey", json!({"header": "x-session"}))
            .percent(30)
            .status(status(Phase::Ready, "TargetReached", 30)),
        30,
    );
    let i30 = regex::Regex::new(&session_regex(&v30["spec"]["http"][1]).unwrap()).unwrap();
    for k in ["a-00", "a-0f", "a-10", "a-19", "A-19"] {
        assert!(i.is_match(k) && i30.is_match(k), "{k}");
    }
    assert!(i30.is_match("a-4c") && !i.is_match("a-4c"));
}

#[test]
fn with_without_key_stable_requests_without_the_key_never_reach_the_clone() {
    let c = canary()
        .spec(
            "sessionKey",
            json!({"cookie": "session", "alphabet": "Base64url", "withoutKey": "Stable"}),
        )
        .status(status(Phase::Ready, "TargetReached", 10));
    let (w, v) = planned_vs(c, 10);
    assert_eq!(route_names(&v), ["rcanary-never", "rcanary-always", "-"]);
    assert_eq!(
        weights(&v, 2),
        [100, 0],
        "the split route sends nothing to the clone"
    );
    let cookie = v["spec"]["http"][1]["match"][0]["headers"]["cookie"]["regex"]
        .as_str()
        .unwrap();
    assert!(
        regex::Regex::new(cookie)
            .unwrap()
            .is_match("session=abcdefAA")
    );
    // The status still says 10 %: the keys' share.
    let mut w = w;
    w.vss = vec![v];
    let p = w.plan();
    assert_eq!(p.status.current_percent, 10);
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert!(
        ready_message(&p).contains("stay on the stable pods"),
        "{}",
        ready_message(&p)
    );
}
