//! Rollback on deletion: routes first, the wait, subsets, clone, labels, finalizer.

use super::*;

// ---------------------------------------------------------------------------------------------
// 8. Rollback
// ---------------------------------------------------------------------------------------------

pub(super) fn deleting_world() -> World {
    let mut w = serving_world(10);
    w.canary = canary()
        .deleting()
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    w
}

#[test]
fn rollback_restores_the_vs_first_and_then_waits() {
    let w = deleting_world();
    let p = w.plan();
    assert_eq!(p.actions.len(), 1, "{:#?}", p.actions);
    assert!(
        matches!(&p.actions[0], Action::PatchMesh { kind: MeshKind::VirtualService, name, .. } if name == "frontend")
    );
    assert!(p.requeue_after.expect("requeue") >= Duration::from_secs(3));
    assert_eq!(p.status.phase, Some(Phase::Terminating));
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.routes_removed_time, Some(rfc(at(0))));
    assert!(event_reasons(&p).contains(&"TrafficRestored"));
    assert!(event_reasons(&p).contains(&"RollbackStarted"));
}

#[test]
fn rollback_restores_the_user_vs_exactly() {
    // Split through the planner, then roll back through the planner.
    for original in [user_vs(), rich_user_vs()] {
        let mut w = serving_world(10);
        w.vss = vec![original.clone()];
        let p = w.plan();
        let split = apply_ops(
            &original,
            patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
        );
        assert_ne!(split, original);
        let mut w = deleting_world();
        w.vss = vec![split];
        let p = w.plan();
        let restored = apply_ops(
            &w.vss[0],
            patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
        );
        assert_eq!(restored, original);
    }
    // And the hand-written split fixture.
    let w = deleting_world();
    let p = w.plan();
    assert_eq!(
        apply_ops(
            &w.vss[0],
            patch_of(&p, MeshKind::VirtualService, "frontend").unwrap()
        ),
        user_vs()
    );
}

#[test]
fn rollback_waits_the_propagation_delay_before_removing_subsets() {
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-1)));
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    assert_eq!(p.status.phase, Some(Phase::Terminating));
}

#[test]
fn a_restarted_controller_waits_again_before_removing_subsets() {
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-10)));
    w.started = at(-1);
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
}

#[test]
fn rollback_then_removes_subsets_deletes_the_clone_unlabels_pods_and_removes_the_finalizer_last() {
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    let dr = pos(&p, is_dr_write).expect("DR patch");
    let clone = pos(&p, |a| {
        *a == Action::DeleteClone {
            uid: "uid-clone".into(),
        }
    })
    .expect("DeleteClone");
    let unlabel: Vec<usize> = p
        .actions
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, Action::UnlabelPod { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(unlabel.len(), 2, "{:#?}", p.actions);
    assert!(
        dr < clone && unlabel.iter().all(|u| clone < *u),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
    assert!(!has(&p, |a| *a
        == Action::UnlabelPod {
            name: "frontend-recording-5c4b-a".into()
        }));
    assert!(!has(&p, is_vs_write));
    assert!(event_reasons(&p).contains(&"RolledBack"));
}

#[test]
fn a_rollback_leaves_the_stable_labels_to_a_younger_canary_of_the_same_target() {
    // The younger one takes over once this one is gone; its split needs the labels (and the
    // chart's fences refuse their removal while a live canary targets the pods).
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    w.rivals = vec![rival("younger", 100)];
    let p = w.plan();
    assert!(
        !has(&p, |a| matches!(a, Action::UnlabelPod { .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
    // A younger one being deleted too takes nothing over: the labels go.
    w.rivals = vec![Rival {
        deleting: true,
        ..rival("younger", 100)
    }];
    assert!(has(&w.plan(), |a| matches!(a, Action::UnlabelPod { .. })));
}

#[test]
fn rollback_restores_the_user_dr_exactly() {
    // Subsets and annotations were absent: both go away again.
    let mut w = fresh_world();
    let original = user_dr();
    let added = apply_ops(
        &original,
        patch_of(&w.plan(), MeshKind::DestinationRule, "frontend").unwrap(),
    );
    assert!(added["metadata"]["annotations"].is_object());
    w = deleting_world();
    w.vss = vec![user_vs()];
    w.drs = vec![added];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    let restored = apply_ops(
        &w.drs[0],
        patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap(),
    );
    assert_eq!(restored, original);
    assert!(restored["spec"].get("subsets").is_none());
    assert!(restored["metadata"].get("annotations").is_none());
}

#[test]
fn rollback_keeps_the_user_subsets_and_annotations_of_a_dr() {
    let mut original = user_dr();
    original["spec"]["subsets"] = json!([{"name": "v1", "labels": {"version": "v1"}}]);
    original["metadata"]["annotations"] = json!({"owner": "team-shop"});
    let mut w = fresh_world();
    w.drs = vec![original.clone()];
    let added = apply_ops(
        &original,
        patch_of(&w.plan(), MeshKind::DestinationRule, "frontend").unwrap(),
    );
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.drs = vec![added];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    let restored = apply_ops(
        &w.drs[0],
        patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap(),
    );
    assert_eq!(restored, original);

    // An empty subsets list that was there stays there.
    let mut original = user_dr();
    original["spec"]["subsets"] = json!([]);
    let mut w = fresh_world();
    w.drs = vec![original.clone()];
    let added = apply_ops(
        &original,
        patch_of(&w.plan(), MeshKind::DestinationRule, "frontend").unwrap(),
    );
    let mut w = deleting_world();
    w.vss = vec![user_vs()];
    w.drs = vec![added];
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    assert_eq!(
        apply_ops(
            &w.drs[0],
            patch_of(&p, MeshKind::DestinationRule, "frontend").unwrap()
        ),
        original
    );
}

#[test]
fn rollback_deletes_owned_vs_and_dr_instead_of_patching_them() {
    let mut w = deleting_world();
    let mut ovs = owned(vs(
        CANARY,
        json!({"hosts": [FQDN], "http": [{"route": [
            {"destination": {"host": FQDN, "subset": STABLE_SUBSET}, "weight": 90},
            {"destination": {"host": FQDN, "subset": RECORDING_SUBSET}, "weight": 10},
        ]}]}),
    ));
    ovs["metadata"]["uid"] = json!("uid-owned-vs");
    let mut odr = owned(dr_in(
        NS,
        CANARY,
        json!({"host": FQDN, "subsets": istio::our_subsets()}),
    ));
    odr["metadata"]["uid"] = json!("uid-owned-dr");
    w.vss = vec![ovs];
    w.drs = vec![odr];
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::DeleteMesh {
            kind: MeshKind::VirtualService,
            name: CANARY.into(),
            uid: "uid-owned-vs".into()
        },]
    );
    w.vss.clear();
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    let p = w.plan();
    assert_eq!(
        p.actions[0],
        Action::DeleteMesh {
            kind: MeshKind::DestinationRule,
            name: CANARY.into(),
            uid: "uid-owned-dr".into()
        }
    );
    assert!(!has(&p, |a| matches!(a, Action::PatchMesh { .. })));
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
}

#[test]
fn rollback_completes_when_everything_is_already_gone() {
    let w = World {
        canary: canary().deleting().build(),
        now: at(0),
        started: at(-3600),
        target: None,
        service: false,
        clone: None,
        pods: vec![],
        vss: vec![],
        drs: vec![],
        rivals: vec![],
        stable_labelling: StableLabelling::Controller,
        service_selector: BTreeMap::from([("app".to_string(), "frontend".to_string())]),
        endpoints: None,
        http_routes: Vec::new(),
        grpc_routes: Vec::new(),
        ambient: false,
        waypoint: None,
        service_ports: Vec::new(),
        backends: [None, None],
        backend_endpoints: None,
    };
    let p = w.plan();
    assert_eq!(p.actions, vec![Action::RemoveFinalizer]);
    // Also with an invalid spec.
    let mut w2 = w.clone();
    w2.canary = canary().deleting().delay("abc").build();
    assert_eq!(w2.plan().actions, vec![Action::RemoveFinalizer]);
}

#[test]
fn rollback_leaves_a_clone_it_does_not_own_and_unrelated_objects() {
    let mut w = deleting_world();
    w.vss = vec![
        user_vs(),
        vs(
            "backend",
            json!({"hosts": ["backend"], "http": [{"route": [{"destination": {"host": "backend"}}]}]}),
        ),
    ];
    w.drs.push(dr_in(
        NS,
        "backend",
        json!({"host": "backend", "subsets": [{"name": "v1", "labels": {"v": "1"}}]}),
    ));
    w.canary.status.as_mut().unwrap().routes_removed_time = Some(rfc(at(-3)));
    w.clone
        .as_mut()
        .unwrap()
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(CANARY_LABEL.into(), "someone-else".into());
    let p = w.plan();
    assert!(!has(&p, |a| matches!(a, Action::DeleteClone { .. })));
    assert!(patch_of(&p, MeshKind::DestinationRule, "backend").is_none());
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
}

#[test]
fn deletion_without_our_finalizer_plans_nothing() {
    let mut w = deleting_world();
    w.canary = canary().deleting().without_finalizer().build();
    let p = w.plan();
    assert!(p.actions.is_empty());
}
