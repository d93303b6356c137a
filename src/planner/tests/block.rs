//! The checks that block: rivals, invalid specs, missing objects, hostile input.

use super::*;

// ---------------------------------------------------------------------------------------------
// 9. Two canaries on one target
// ---------------------------------------------------------------------------------------------

pub(super) fn rival(name: &str, created: i64) -> Rival {
    Rival {
        name: name.into(),
        created: Some(at(created)),
        target: TARGET.into(),
        service: TARGET.into(),
        deleting: false,
    }
}

#[test]
fn a_younger_canary_on_the_same_target_is_blocked_and_only_labels_the_targets_pods() {
    let mut w = fresh_world();
    w.rivals = vec![rival("alpha", -7200)];
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert_only_pod_labels(&p);
    assert_eq!(labelled(&p).len(), 2, "{:#?}", p.actions);
    w.canary = canary().without_finalizer().build();
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    assert_eq!(p.actions.first(), Some(&Action::AddFinalizer));
    assert_only_pod_labels(&Plan {
        actions: p.actions[1..].to_vec(),
        ..p.clone()
    });
}

#[test]
fn a_canary_for_the_same_service_conflicts_too() {
    let mut w = fresh_world();
    w.rivals = vec![Rival {
        target: "frontend-v2".into(),
        ..rival("alpha", -7200)
    }];
    assert_blocked(&w.plan(), "Conflict");
    // But not one for another target and Service.
    w.rivals = vec![Rival {
        target: "backend".into(),
        service: "backend".into(),
        ..rival("beta", -7200)
    }];
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn an_older_canary_still_rolling_back_keeps_the_younger_one_blocked() {
    // Acting while the older one removes its subsets could route to a subset about to go.
    let mut w = fresh_world();
    w.rivals = vec![Rival {
        deleting: true,
        ..rival("gamma", -7200)
    }];
    let p = w.plan();
    assert_blocked(&p, "Conflict");
    // Not even labels: the older one is taking them off.
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
}

#[test]
fn the_older_canary_is_not_blocked_by_a_younger_one() {
    let mut w = fresh_world();
    w.rivals = vec![rival("zeta", 0)];
    // Seen from the younger one, the same pair is a conflict.
    let mut younger = fresh_world().with_canary(canary().named("zeta", "uid-zeta", 0));
    younger.rivals = vec![rival(CANARY, -3600)];
    assert_blocked(&younger.plan(), "Conflict");
    let p = w.plan();
    assert_ne!(p.status.phase, Some(Phase::Blocked), "{p:#?}");
    assert!(has(&p, is_dr_write));
    // Same creation time: the name decides, deterministically.
    w.rivals = vec![rival("aaa", -3600)];
    assert_blocked(&w.plan(), "Conflict");
    w.rivals = vec![rival("zzz", -3600)];
    assert_ne!(w.plan().status.phase, Some(Phase::Blocked));
}

#[test]
fn deleting_the_blocked_younger_canary_only_removes_its_finalizer() {
    // The older canary "alpha" owns the split, the subsets, the clone and the labels.
    let mut w = serving_world(10);
    let mut v = split_vs(10);
    v["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(json!({"canary": "alpha", "weights": [null]}).to_string());
    w.vss = vec![v];
    let mut d = split_dr();
    d["metadata"]["annotations"][RESTORE_ANNOTATION] =
        json!(istio::dr_restore_note(true, "alpha", &both_subsets()));
    w.drs = vec![d];
    w.clone
        .as_mut()
        .unwrap()
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(CANARY_LABEL.into(), "alpha".into());
    w.canary = canary().deleting().build();
    w.rivals = vec![rival("alpha", -7200)];
    let p = w.plan();
    assert_eq!(p.actions, vec![Action::RemoveFinalizer]);
}

// ---------------------------------------------------------------------------------------------
// Validation, missing objects, finalizer
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_specs_block_and_only_label_the_targets_pods() {
    let cases = [
        canary().delay("abc"),
        canary().ramp(10, "0s"),
        canary().ramp(10, "soon"),
        canary().ramp(0, "30s"),
        canary().ramp(101, "30s"),
        canary().percent(150),
        canary().percent(-1),
        canary().max_replicas(0),
        canary().spec("targetRef", json!({"name": " "})),
        canary().spec("service", json!("")),
        canary()
            .spec("capture", json!("EBPF"))
            .spec("sidecar", json!({"annotations": {INJECT: "true"}})),
    ];
    for c in cases {
        let mut w = serving_world(10).with_canary(c.clone());
        w.vss = vec![user_vs()];
        w.drs = vec![user_dr()];
        w.pods = vec![target_pod("frontend-7d9f-a").build()];
        let p = w.plan();
        assert_blocked(&p, "InvalidSpec");
        assert_only_pod_labels(&p);
        // The target's name is known unless it is the invalid part.
        if c.v["spec"]["targetRef"]["name"] == "frontend" {
            assert_eq!(
                labelled(&p),
                vec!["frontend-7d9f-a"],
                "{:?}: {:#?}",
                c.v["spec"],
                p.actions
            );
        }
    }
}

#[test]
fn a_missing_target_blocks() {
    let mut w = fresh_world();
    w.target = None;
    let p = w.plan();
    assert_blocked(&p, "TargetNotFound");
    assert_only_pod_labels(&p);
}

/// The caches keep a clone without its pod template, and a target without its status
/// (`deployments::strip`): the planner must reach the same decisions as from the
/// whole objects.
#[test]
fn deployments_as_the_caches_keep_them_are_planned_as_the_whole_ones() {
    for pct in [0, 10, 50] {
        let w = serving_world(pct);
        let full = w.plan();
        let mut stripped = w.clone();
        let mut cl = stripped.clone.take().expect("a clone");
        crate::facts::deployments::strip(&mut cl);
        assert_eq!(
            cl.spec.as_ref().map(|s| s.template.clone()),
            Some(Default::default()),
            "the cache drops a clone's template"
        );
        stripped.clone = Some(cl);
        if let Some(t) = stripped.target.as_mut() {
            t.status = Some(Default::default());
            crate::facts::deployments::strip(t);
            assert!(t.status.is_none(), "the cache drops a target's status");
            assert!(t.spec.as_ref().is_some_and(|s| s.template.spec.is_some()));
        }
        assert_eq!(stripped.plan(), full, "at {pct} %");
    }
    // A new target template still replaces the clone with the whole template, built from the
    // target.
    let mut w = serving_world(10);
    if let Some(cl) = w.clone.as_mut() {
        crate::facts::deployments::strip(cl);
    }
    w.target = Some(target_with(4, "frontend:v2"));
    let p = w.plan();
    let replaced = replaced_clone(&p);
    let template = &replaced.spec.as_ref().expect("spec").template;
    assert_eq!(
        template.spec.as_ref().expect("pod spec").containers[0]
            .image
            .as_deref(),
        Some("frontend:v2")
    );
}

#[test]
fn a_canary_whose_target_is_another_canarys_clone_blocks() {
    let mut w = fresh_world();
    let other = canary().build();
    let t = w.target.take().expect("a target");
    let mut of_other = build_clone(&other, &t, 1);
    if let Some(l) = of_other.metadata.labels.as_mut() {
        l.insert(CANARY_LABEL.into(), "other".into());
    }
    w.target = Some(of_other);
    let p = w.plan();
    assert_blocked(&p, "TargetIsAClone");
    assert!(
        p.events
            .iter()
            .any(|e| e.note.contains("recording clone of RecordingCanary other")),
        "{:?}",
        p.events
    );
    assert!(
        !has(&p, |a| matches!(
            a,
            Action::CreateClone(_) | Action::ReplaceClone(_) | Action::ScaleClone { .. }
        )),
        "{:#?}",
        p.actions
    );
}

#[test]
fn a_missing_service_blocks() {
    let mut w = fresh_world();
    w.service = false;
    let p = w.plan();
    assert_blocked(&p, "ServiceNotFound");
    assert_only_pod_labels(&p);
}

#[test]
fn a_clone_name_taken_by_a_deployment_that_is_not_ours_blocks() {
    let mut w = fresh_world();
    let mut foreign = target(2);
    foreign.metadata.name = Some(CLONE.into());
    w.clone = Some(foreign.clone());
    let p = w.plan();
    assert_blocked(&p, "CloneNameTaken");
    assert_only_pod_labels(&p);
    // One made by another canary is not ours either.
    foreign
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(CANARY_LABEL.into(), "other".into());
    w.clone = Some(foreign);
    assert_blocked(&w.plan(), "CloneNameTaken");
}

#[test]
fn the_finalizer_is_added_first_when_absent() {
    let mut w = fresh_world();
    w.canary = canary().without_finalizer().build();
    let p = w.plan();
    assert_eq!(p.actions.first(), Some(&Action::AddFinalizer));
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| **a == Action::AddFinalizer)
            .count(),
        1
    );
    // Present: not added again.
    assert!(!has(&fresh_world().plan(), |a| *a == Action::AddFinalizer));
    // Also when blocked.
    w.target = None;
    let p = w.plan();
    assert_eq!(p.actions.first(), Some(&Action::AddFinalizer));
    assert!(
        p.actions[1..]
            .iter()
            .all(|a| matches!(a, Action::LabelPod { .. })),
        "{:#?}",
        p.actions
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------

#[test]
fn a_service_without_a_selector_blocks_before_any_mesh_write() {
    let mut w = fresh_world();
    w.service_selector.clear();
    let p = w.plan();
    assert_blocked(&p, "ServiceWithoutSelector");
    assert_only_pod_labels(&p);
}

#[test]
fn a_virtual_service_with_only_tcp_and_tls_routes_blocks() {
    let mut w = fresh_world();
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"],
               "tcp": [{"route": [{"destination": {"host": "frontend"}}]}],
               "tls": [{"match": [{"sniHosts": ["frontend"]}], "route": [{"destination": {"host": "frontend"}}]}]}),
    )];
    let p = w.plan();
    assert_blocked(&p, "NoRouteToService");
    assert_only_pod_labels(&p);
}

#[test]
fn a_delegating_virtual_service_blocks_and_its_delegate_is_left_alone() {
    let mut w = fresh_world();
    w.vss = vec![
        vs(
            "frontend",
            json!({"hosts": ["frontend"], "http": [{"match": [{"uri": {"prefix": "/"}}], "delegate": {"name": "frontend-routes"}}]}),
        ),
        vs(
            "frontend-routes",
            json!({"http": [{"route": [{"destination": {"host": "frontend"}}]}]}),
        ),
    ];
    let p = w.plan();
    assert_blocked(&p, "NoRouteToService");
    assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);
}

#[test]
fn weights_that_do_not_sum_to_100_keep_their_sum_when_split() {
    // Istio's validation refuses such a VirtualService; if one exists anyway, the split must
    // not make it worse: each route keeps its total.
    let mut w = fresh_world();
    w.vss = vec![vs(
        "frontend",
        json!({"hosts": ["frontend"], "http": [{"route": [
            {"destination": {"host": "frontend"}, "weight": 60},
            {"destination": {"host": "backend"}, "weight": 30}]}]}),
    )];
    w.drs = vec![split_dr()];
    w.pods = vec![
        target_pod("frontend-7d9f-a").stable().build(),
        target_pod("frontend-7d9f-b").stable().build(),
    ];
    w.canary = canary()
        .status(status(Phase::Progressing, "WaitingForStablePods", 0))
        .build();
    w.clone = Some(live_clone(&w.canary, &target(4), 1, 1));
    let w = w.clone_ready(1);
    let p = w.plan();
    let after = apply_ops(
        w.vs_named("frontend"),
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("split"),
    );
    let total: i64 = after["spec"]["http"][0]["route"]
        .as_array()
        .expect("route")
        .iter()
        .map(|d| d["weight"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(total, 90, "{after:#}");
}

#[test]
fn a_deployment_of_another_kind_named_as_the_target_is_not_found() {
    // targetRef names a StatefulSet (or anything that is not an apps/v1 Deployment): the
    // controller sees no Deployment of that name and says so.
    let mut w = fresh_world();
    w.target = None;
    let p = w.plan();
    assert_blocked(&p, "TargetNotFound");
    assert!(
        p.status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.message.contains("Deployment frontend not found")),
        "{:#?}",
        p.status.conditions
    );
}
