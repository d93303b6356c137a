//! The safety stage: a sick clone drained whatever blocks, the target's new pods labelled.

use super::*;

// ---------------------------------------------------------------------------------------------
// 7. Unhealthy clone
// ---------------------------------------------------------------------------------------------

#[test]
fn a_clone_that_loses_its_ready_replicas_gets_weight_zero_and_a_warning() {
    let w = serving_world(10).clone_ready(0);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "CloneNotReady");
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "CloneNotReady"),
        "{:?}",
        p.events
    );
    let degraded = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
}

#[test]
fn a_crash_looping_clone_gets_weight_zero_at_once() {
    let mut w = serving_world(10);
    w.pods.push(
        clone_pod("frontend-recording-5c4b-b")
            .crash_looping()
            .build(),
    );
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "CloneCrashLooping");
    assert!(
        p.events
            .iter()
            .any(|e| e.warning && e.reason == "CloneCrashLooping"),
        "{:?}",
        p.events
    );
}

#[test]
fn a_crash_looping_target_pod_does_not_degrade_the_canary() {
    let mut w = serving_world(10);
    w.pods.push(
        target_pod("frontend-7d9f-c")
            .stable()
            .crash_looping()
            .build(),
    );
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.status.phase, Some(Phase::Ready));
}

#[test]
fn a_degraded_clone_gets_its_weight_back_when_healthy() {
    let mut w = serving_world(10);
    w.vss = vec![split_vs(0)];
    w.canary = canary()
        .status(status(Phase::Degraded, "CloneNotReady", 0))
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![90, 10]));
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert!(
        p.events
            .iter()
            .any(|e| !e.warning && e.reason == "TargetReached"),
        "{:?}",
        p.events
    );
}

#[test]
fn staying_degraded_repeats_no_event_and_no_write() {
    let mut w = serving_world(10).clone_ready(0);
    w.vss = vec![split_vs(0)];
    w.canary = canary()
        .status(status(Phase::Degraded, "CloneNotReady", 0))
        .build();
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
}

// ---------------------------------------------------------------------------------------------
// Safety actions run whatever blocks
// ---------------------------------------------------------------------------------------------

/// The serving canary at 10 %, with `f` applied to its builder.
pub(super) fn serving_canary(f: impl Fn(CanaryB) -> CanaryB) -> RecordingCanary {
    f(canary()
        .percent(10)
        .status(status(Phase::Ready, "TargetReached", 10)))
    .build()
}

/// Every way a canary serving 10 % can become blocked while its split is live.
pub(super) fn blocked_serving_worlds() -> Vec<(&'static str, World)> {
    let base = serving_world(10);
    let with = |f: &dyn Fn(&mut World)| {
        let mut w = base.clone();
        f(&mut w);
        w
    };
    let mut foreign_clone = base.clone.clone().expect("a clone");
    if let Some(l) = foreign_clone.metadata.labels.as_mut() {
        l.remove(CANARY_LABEL);
    }
    vec![
        (
            "InvalidSpec",
            with(&|w| w.canary = serving_canary(|c| c.delay("abc"))),
        ),
        ("TargetNotFound", with(&|w| w.target = None)),
        ("ServiceNotFound", with(&|w| w.service = false)),
        (
            "VirtualServiceNotFound",
            with(&|w| w.canary = serving_canary(|c| c.spec("virtualService", json!("nope")))),
        ),
        (
            "DestinationRuleNotFound",
            with(&|w| w.canary = serving_canary(|c| c.spec("destinationRule", json!("nope")))),
        ),
        (
            "AmbiguousVirtualService",
            with(&|w| {
                let mut second = user_vs();
                second["metadata"]["name"] = json!("frontend-copy");
                second["metadata"]["uid"] = json!("uid-vs-copy");
                w.vss.push(second);
            }),
        ),
        (
            "AmbiguousVirtualService",
            with(&|w| {
                w.vss.push(mesh_obj(
                    "VirtualService",
                    "elsewhere",
                    "frontend-routing",
                    json!({"hosts": [FQDN], "http": [{"route": [{"destination": {"host": FQDN}}]}]}),
                ))
            }),
        ),
        (
            "AmbiguousDestinationRule",
            with(&|w| {
                w.drs
                    .push(dr_in(NS, "frontend-copy", json!({"host": FQDN})))
            }),
        ),
        (
            "ShadowingDestinationRule",
            with(&|w| {
                w.drs
                    .push(dr_in("payments", "frontend-tls", json!({"host": FQDN})))
            }),
        ),
        (
            "DestinationRuleHostMismatch",
            with(&|w| {
                w.canary = serving_canary(|c| c.spec("destinationRule", json!("other")));
                w.drs.push(dr_in(NS, "other", json!({"host": "other"})));
            }),
        ),
        (
            "SubsetNameTaken",
            with(&|w| {
                w.drs[0]["spec"]["subsets"] =
                    json!([{"name": STABLE_SUBSET, "labels": {"version": "v1"}}])
            }),
        ),
        (
            "GatewayRouteNotFound",
            with(&|w| {
                w.canary = serving_canary(|c| c.spec("gateways", json!(["istio-system/typo-gw"])))
            }),
        ),
        (
            "ServiceSelectsOtherPods",
            with(&|w| {
                w.pods
                    .push(pod_of("frontend-v2", "9a9a", "frontend-v2-9a9a-a").build())
            }),
        ),
        (
            "ServiceWithoutSelector",
            with(&|w| w.service_selector.clear()),
        ),
        // Blocks only once this canary no longer holds its clone.
        (
            "Conflict",
            with(&|w| {
                w.rivals = vec![rival("alpha", -7200)];
                w.clone = None;
                w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            }),
        ),
        (
            "CloneNameTaken",
            with(&|w| {
                w.clone = Some(foreign_clone.clone());
                w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            }),
        ),
    ]
}

/// The ways a clone can fall sick; `None` where the world already has no clone of ours.
pub(super) fn sicken(w: &World, how: &str) -> Option<World> {
    let mut w = w.clone();
    let ours = w
        .clone
        .as_ref()
        .is_some_and(|c| c.labels().get(CANARY_LABEL).is_some());
    if !ours {
        // Already without a clone of its own: that is the "deleted" case.
        return (how == "deleted").then_some(w);
    }
    match how {
        "deleted" => {
            w.clone = None;
            w.pods.retain(|p| !pod_of_deployment(p, CLONE));
        }
        "crash-looping" => {
            w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            w.pods.push(
                clone_pod("frontend-recording-5c4b-a")
                    .crash_looping()
                    .build(),
            );
        }
        "not-ready" => {
            w = w.clone_ready(0);
            w.pods.retain(|p| !pod_of_deployment(p, CLONE));
            w.pods
                .push(clone_pod("frontend-recording-5c4b-a").not_ready().build());
        }
        "not-an-endpoint" => {
            // Ready pods that the Service's EndpointSlices do not list (as Ready) any more.
            w.endpoints = Some(target_endpoints(&w));
        }
        _ => unreachable!("{how}"),
    }
    Some(w)
}

#[test]
fn every_block_reason_still_drains_a_sick_clone_and_labels_new_target_pods() {
    let mut checked = 0;
    for (reason, blocked) in blocked_serving_worlds() {
        // Blocked with a healthy clone: the live split stays as it is.
        let p = blocked.plan();
        assert_blocked(&p, reason);
        if blocked
            .clone
            .as_ref()
            .is_some_and(|c| c.labels().get(CANARY_LABEL).is_some())
        {
            assert!(!has(&p, is_vs_write), "{reason}: {:#?}", p.actions);
        }
        for how in ["crash-looping", "deleted", "not-ready", "not-an-endpoint"] {
            let Some(mut w) = sicken(&blocked, how) else {
                continue;
            };
            w.pods
                .push(pod_of(TARGET, "8e0a", "frontend-8e0a-new").build());
            let p = w.plan();
            let case = format!("{reason}, clone {how}");
            assert_eq!(p.status.phase, Some(Phase::Blocked), "{case}: {p:#?}");
            assert_eq!(ready_reason(&p), reason, "{case}");
            let ops = patch_of(&p, MeshKind::VirtualService, "frontend")
                .unwrap_or_else(|| panic!("{case}: no drain of the split: {:#?}", p.actions));
            let after = apply_ops(w.vs_named("frontend"), ops);
            assert_eq!(weights(&after, 0), vec![100, 0], "{case}");
            assert_eq!(p.status.current_percent, 0, "{case}");
            assert!(
                labelled(&p).contains(&"frontend-8e0a-new".to_string()),
                "{case}: {:#?}",
                p.actions
            );
            // Nothing else: no subset, clone or delete write while blocked.
            assert!(
                p.actions.iter().all(|a| matches!(
                    a,
                    Action::LabelPod { .. }
                        | Action::PatchMesh {
                            kind: MeshKind::VirtualService,
                            ..
                        }
                )),
                "{case}: {:#?}",
                p.actions
            );
            assert!(
                p.events
                    .iter()
                    .any(|e| e.warning && e.reason == "TrafficDrained"),
                "{case}: {:?}",
                p.events
            );
            // The next reconcile, from the drained VirtualService, writes nothing more.
            let mut next = w.clone();
            next.vss = next
                .vss
                .iter()
                .map(|v| {
                    if meta_name(v) == "frontend" {
                        after.clone()
                    } else {
                        v.clone()
                    }
                })
                .collect();
            next.canary.status = Some(p.status.clone());
            assert!(!has(&next.plan(), is_vs_write), "{case}: drained twice");
            checked += 1;
        }
    }
    // Four ways to be sick; two blocked worlds have no clone of their own (only "deleted").
    assert_eq!(checked, 16 * 4 - 2 * 3, "cases checked");
}

#[test]
fn a_blocked_canary_whose_split_is_not_its_own_drains_nothing() {
    // Split by another canary: its VirtualService is not this one's to drain.
    let mut w = serving_world(10);
    w.vss[0]["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(json!({"canary": "other", "weights": [null]}).to_string());
    w.clone = None;
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
}

#[test]
fn a_blocked_canary_with_a_healthy_clone_keeps_it_sized_for_its_live_weight() {
    // Blocked (a second VirtualService appeared) while the HPA takes the target from 4 to 40:
    // the clone carrying 10 % grows with it, and never shrinks while blocked.
    let mut w = blocked_serving_worlds()
        .into_iter()
        .find(|(r, _)| *r == "AmbiguousDestinationRule")
        .map(|(_, w)| w)
        .expect("world");
    w.target = Some(target(40));
    let p = w.plan();
    assert_blocked(&p, "AmbiguousDestinationRule");
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { replicas: 4, .. })),
        "{:#?}",
        p.actions
    );
    w.target = Some(target(1));
    assert!(
        !w.plan()
            .actions
            .iter()
            .any(|a| matches!(a, Action::ScaleClone { .. })),
        "shrank while blocked"
    );
}
