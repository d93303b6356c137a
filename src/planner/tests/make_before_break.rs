//! Make before break: the waits between dependent writes, Istio's `Reconciled` report, endpoints before weight.

use super::*;

// ---------------------------------------------------------------------------------------------
// 4. Make before break
// ---------------------------------------------------------------------------------------------

#[test]
fn subsets_reach_the_dr_before_any_route_uses_them() {
    let w = fresh_world();
    let p = w.plan();
    assert!(has(&p, is_dr_write), "DR patch: {:#?}", p.actions);
    assert!(
        !has(&p, is_vs_write),
        "no VS write in the same pass: {:#?}",
        p.actions
    );
    assert!(created_clone(&p).is_none());
    assert_eq!(p.status.subsets_added_time, Some(rfc(at(0))));
    let rq = p.requeue_after.expect("requeue");
    assert!(
        rq <= Duration::from_secs(3) && rq > Duration::ZERO,
        "{rq:?}"
    );
    assert_eq!(ready_reason(&p), "AddingSubsets");
}

#[test]
fn the_vs_waits_a_full_propagation_delay_after_the_subsets() {
    let mut w = subsets_world();
    w.canary = canary()
        .delay("3s")
        .status(RecordingCanaryStatus {
            subsets_added_time: Some(rfc(at(0))),
            ..status(Phase::Progressing, "AddingSubsets", 0)
        })
        .build();
    w.now = at_ms(2_999);
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert!(created_clone(&p).is_none());
    assert_eq!(
        p.requeue_after,
        Some(Duration::from_millis(100)),
        "rounded up to the minimum"
    );
    w.now = at_ms(1_000);
    assert_eq!(w.plan().requeue_after, Some(Duration::from_secs(2)));
    w.now = at(3);
    let p = w.plan();
    assert!(
        patch_of(&p, MeshKind::VirtualService, "frontend").is_some(),
        "{:#?}",
        p.actions
    );
}

#[test]
fn a_restarted_controller_waits_the_propagation_delay_from_its_start() {
    let mut w = subsets_world();
    w.canary = canary()
        .status(RecordingCanaryStatus {
            subsets_added_time: Some(rfc(at(0))),
            ..status(Phase::Progressing, "AddingSubsets", 0)
        })
        .build();
    w.started = at(2);
    w.now = at(3);
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    w.now = at(5);
    assert!(has(&w.plan(), is_vs_write));
}

#[test]
fn the_first_split_sends_nothing_to_the_clone_and_creates_it_after_the_vs_patch() {
    let w = subsets_world();
    let p = w.plan();
    let vs_at = pos(&p, is_vs_write).expect("VS patch");
    let clone_at = pos(&p, |a| matches!(a, Action::CreateClone(_))).expect("clone created");
    assert!(vs_at < clone_at, "{:#?}", p.actions);
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![100, 0]);
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(ready_reason(&p), "WaitingForClone");
    assert!(
        p.events.is_empty(),
        "a split at 0% and a clone being created are no transition: {:?}",
        p.events
    );
    assert_eq!(
        created_clone(&p).unwrap().spec.as_ref().unwrap().replicas,
        Some(1),
        "ceil(4 x 10 / 100)"
    );
}

#[test]
fn a_clone_without_a_ready_replica_gets_no_weight() {
    let mut w = waiting_for_clone_world();
    w = w.clone_ready(0);
    w.pods
        .push(clone_pod("frontend-recording-5c4b-a").not_ready().build());
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.phase, Some(Phase::Progressing));
    assert_eq!(ready_reason(&p), "WaitingForClone");
    assert!(p.events.is_empty(), "no transition: {:?}", p.events);
}

#[test]
fn weight_goes_to_the_clone_once_it_has_a_ready_replica() {
    let w = waiting_for_clone_world();
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert_eq!(event_reasons(&p), vec!["RoutesSplit", "TargetReached"]);
}

#[test]
fn a_ready_clone_pod_gets_the_weight_before_its_deployment_status_says_so() {
    // The kube-controller-manager's deployment controller writes `readyReplicas` a pass of its
    // work queue after the pod is Ready: minutes, when thousands of Deployments change at once.
    let mut w = waiting_for_clone_world();
    w = w.clone_ready(1);
    if let Some(st) = w.clone.as_mut().and_then(|c| c.status.as_mut()) {
        st.ready_replicas = None;
    }
    let p = w.plan();
    let after = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("the split"),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    assert_eq!(p.status.clone_ready_replicas, 1);
}

#[test]
fn a_clone_whose_status_still_says_ready_but_whose_pods_are_not_gets_no_weight() {
    // The other way round: the pod stopped being Ready (or is being deleted) and the
    // Deployment's status has not caught up. The weight drains at once.
    for how in ["not-ready", "terminating", "gone"] {
        let mut w = serving_world(10).clone_ready(0);
        if let Some(st) = w.clone.as_mut().and_then(|c| c.status.as_mut()) {
            st.ready_replicas = Some(4);
        }
        match how {
            "not-ready" => w
                .pods
                .push(clone_pod("frontend-recording-5c4b-a").not_ready().build()),
            "terminating" => w
                .pods
                .push(clone_pod("frontend-recording-5c4b-a").terminating().build()),
            _ => {}
        }
        let p = w.plan();
        assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]), "{how}");
        assert_eq!(ready_reason(&p), "CloneNotReady", "{how}");
        assert_eq!(p.status.clone_ready_replicas, 0, "{how}");
    }
}

/// The serving pods of the target alone: the Service's Ready endpoints before any clone pod
/// is one.
pub(super) fn target_endpoints(w: &World) -> BTreeSet<String> {
    w.pods
        .iter()
        .filter(|p| p.serving() && pod_of_deployment(p, TARGET))
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

#[test]
fn a_ready_clone_pod_gets_no_weight_until_it_is_a_ready_endpoint_of_the_service() {
    // The mesh routes to EndpointSlice endpoints, which the endpoint-slice controller writes
    // after the pod is Ready: weight before that is answered with 503 (no healthy upstream).
    let mut w = waiting_for_clone_world();
    w.endpoints = Some(target_endpoints(&w));
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.clone_ready_replicas, 0);
    assert_eq!(ready_reason(&p), "WaitingForClone");
    assert!(
        ready_message(&p).contains("Ready endpoint"),
        "{}",
        ready_message(&p)
    );
    assert_eq!(p.status.phase, Some(Phase::Progressing));
    // One clone pod listed as a Ready endpoint: the weight goes to what one replica carries.
    let mut eps = target_endpoints(&w);
    eps.insert(format!("frontend-recording-5c4b-{}", pod_suffix(0)));
    w.endpoints = Some(eps);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![90, 10]));
    assert_eq!(p.status.clone_ready_replicas, 1);
}

#[test]
fn the_weight_rises_only_as_far_as_the_clones_ready_endpoints_carry_it() {
    // 4 Ready clone pods, 1 of them an endpoint: the capacity is one replica's worth.
    let mut w = waiting_for_clone_world().with_canary(canary().percent(100).status(status(
        Phase::Progressing,
        "WaitingForClone",
        0,
    )));
    let mut eps = target_endpoints(&w);
    eps.insert(format!("frontend-recording-5c4b-{}", pod_suffix(0)));
    w.endpoints = Some(eps);
    let p = w.plan();
    // Target of 4: one replica carries 25 %.
    assert_eq!(vs_weight_after(&w, &p), Some(vec![75, 25]));
    assert_eq!(ready_reason(&p), "WaitingForCloneCapacity");
}

#[test]
fn a_serving_clone_whose_pods_stop_being_endpoints_is_drained() {
    let mut w = serving_world(10);
    w.endpoints = Some(target_endpoints(&w));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(ready_reason(&p), "CloneNotAnEndpoint");
    assert_eq!(p.status.phase, Some(Phase::Degraded));
}

#[test]
fn the_split_waits_until_a_stable_pod_is_a_ready_endpoint_of_the_service() {
    // The stable subset needs an upstream too: labelled, Ready target pods that the Service's
    // EndpointSlices do not list yet.
    let mut w = subsets_world();
    w.endpoints = Some(BTreeSet::new());
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(ready_reason(&p), "WaitingForStableEndpoints");
    w.endpoints = None;
    let p = w.plan();
    assert!(has(&p, is_vs_write), "{:#?}", p.actions);
}

#[test]
fn a_sick_clone_is_drained_from_a_virtual_service_whose_first_split_route_gives_the_host_weight_0()
{
    // A "dark" route first (the host at weight 0 beside a new version), then the default route:
    // the percent read from the first pair is 0, but the later route still sends 10 % to the
    // clone, which must be drained whatever blocks.
    let spec = json!({"hosts": ["frontend"], "http": [
        {"name": "dark", "match": [{"headers": {"x-dark": {"exact": "1"}}}], "route": [
            {"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 0},
            {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": 0},
            {"destination": {"host": "frontend-v2"}, "weight": 100}]},
        {"name": "default", "route": [
            {"destination": {"host": "frontend", "subset": STABLE_SUBSET}, "weight": 90},
            {"destination": {"host": "frontend", "subset": RECORDING_SUBSET}, "weight": 10}]}
    ]});
    let mut user = vs("frontend", spec);
    user["metadata"]["annotations"] =
        json!({RESTORE_ANNOTATION: json!({"canary": CANARY, "weights": [0, null]}).to_string()});
    let mut w = serving_world(10);
    w.vss = vec![user];
    // Blocked (an unknown VirtualService named in the spec) with a crash-looping clone.
    w.canary.spec.virtual_service = Some("missing".into());
    let w = sicken(&w, "crash-looping").expect("sick");
    let p = w.plan();
    let ops = patch_of(&p, MeshKind::VirtualService, "frontend")
        .unwrap_or_else(|| panic!("no drain: {:#?}", p.actions));
    let after = apply_ops(&w.vss[0], ops);
    assert_eq!(weights(&after, 1), vec![100, 0], "{after:#}");
    assert!(event_reasons(&p).contains(&"TrafficDrained"));
}

#[test]
fn missing_subsets_are_added_back_before_the_vs_moves() {
    // Someone removed our subsets from the DR while the VS is split.
    let mut w = serving_world(10);
    w.drs = vec![user_dr()];
    let p = w.plan();
    let dr = pos(&p, is_dr_write).expect("DR patch");
    assert_eq!(p.status.subsets_added_time, Some(rfc(at(0))));
    if let Some(v) = pos(&p, is_vs_write) {
        assert!(dr < v);
    }
}

// ---------------------------------------------------------------------------------------------
// 4b. Observed propagation: Istio's Reconciled condition ends the wait early
// ---------------------------------------------------------------------------------------------

/// `obj` at `generation`, with the status istiod writes: `observedGeneration` (a string, as
/// protojson writes an int64, or a number) and a `Reconciled` condition.
pub(super) fn istio_reported(
    mut obj: Value,
    generation: i64,
    observed: Value,
    cond: &str,
) -> Value {
    obj["metadata"]["generation"] = json!(generation);
    obj["status"] = json!({
        "observedGeneration": observed,
        "conditions": [{"type": "Reconciled", "status": cond, "message": "3/3 proxies up to date."}],
    });
    obj
}

/// Subsets added at 0 with `propagationDelay` `delay`, pods labelled, VS not split; now is 1 s.
pub(super) fn waiting_world(delay: &str) -> World {
    let mut w = subsets_world();
    w.canary = canary()
        .delay(delay)
        .status(RecordingCanaryStatus {
            subsets_added_time: Some(rfc(at(0))),
            ..status(Phase::Progressing, "AddingSubsets", 0)
        })
        .build();
    w.now = at(1);
    w
}

#[test]
fn without_istio_status_the_split_waits_the_full_propagation_delay() {
    let mut w = waiting_world("60s");
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
    assert_eq!(ready_reason(&p), "AddingSubsets");
    assert_eq!(p.status.last_propagation_wait, None);
    w.now = at(60);
    let p = w.plan();
    assert!(has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(
        p.status.last_propagation_wait,
        Some(PropagationWait::PropagationDelay)
    );
}

#[test]
fn the_split_goes_in_as_soon_as_istio_reports_the_destination_rule_reconciled_for_its_generation() {
    for observed in [json!("2"), json!(2)] {
        let mut w = waiting_world("60s");
        w.drs = vec![istio_reported(split_dr(), 2, observed.clone(), "True")];
        let p = w.plan();
        assert!(
            patch_of(&p, MeshKind::VirtualService, "frontend").is_some(),
            "observedGeneration {observed}: {:#?}",
            p.actions
        );
        assert_eq!(
            p.status.last_propagation_wait,
            Some(PropagationWait::IstioReconciled)
        );
        assert_ne!(ready_reason(&p), "AddingSubsets");
    }
}

#[test]
fn an_older_generation_or_a_condition_not_true_does_not_end_the_wait() {
    for dr in [
        istio_reported(split_dr(), 3, json!("2"), "True"),
        istio_reported(split_dr(), 3, json!(2), "True"),
        istio_reported(split_dr(), 2, json!("2"), "False"),
        istio_reported(split_dr(), 2, json!("2"), "Unknown"),
    ] {
        let mut w = waiting_world("60s");
        w.drs = vec![dr.clone()];
        let p = w.plan();
        assert!(!has(&p, is_vs_write), "{}: {:#?}", dr["status"], p.actions);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
        assert_eq!(ready_reason(&p), "AddingSubsets");
    }
}

#[test]
fn the_condition_of_a_destination_rule_without_our_subsets_never_counts() {
    // The user's DR, reported Reconciled before the subsets go in: this plan adds them, and the
    // revision that will hold them is reported on by nobody yet.
    let mut w = fresh_world();
    w.pods = subsets_world().pods;
    w.drs = vec![istio_reported(user_dr(), 1, json!("1"), "True")];
    let p = w.plan();
    assert!(has(&p, is_dr_write), "{:#?}", p.actions);
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(ready_reason(&p), "AddingSubsets");
}

#[test]
fn istio_reconciled_also_ends_the_wait_of_a_restarted_controller() {
    let mut w = waiting_world("3s");
    w.started = at(1);
    assert!(!has(&w.plan(), is_vs_write));
    w.drs = vec![istio_reported(split_dr(), 2, json!("2"), "True")];
    assert!(has(&w.plan(), is_vs_write));
}

#[test]
fn a_status_only_change_of_the_destination_rule_after_the_split_changes_nothing() {
    let mut prev = status(Phase::Ready, "TargetReached", 10);
    prev.last_propagation_wait = Some(PropagationWait::IstioReconciled);
    let mut w = serving_world(10);
    w.canary = canary().status(prev).build();
    let quiet = w.plan();
    for dr in [
        istio_reported(split_dr(), 2, json!("2"), "True"),
        istio_reported(split_dr(), 3, json!("2"), "False"),
    ] {
        w.drs = vec![dr];
        let p = w.plan();
        assert!(p.actions.is_empty(), "{:#?}", p.actions);
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert_eq!(p.status, quiet.status, "no status write");
        assert_eq!(
            p.status.last_propagation_wait,
            Some(PropagationWait::IstioReconciled)
        );
    }
}

/// Rolling back: the user's VS restored at 0 (routes gone), with `propagationDelay` 60s, now 1s.
pub(super) fn routes_removed_world() -> World {
    let mut w = deleting_world();
    w.canary = canary()
        .deleting()
        .delay("60s")
        .status(RecordingCanaryStatus {
            routes_removed_time: Some(rfc(at(0))),
            virtual_services: vec!["shop/frontend".into()],
            ..status(Phase::Terminating, "TargetReached", 0)
        })
        .build();
    w.vss = vec![user_vs()];
    w.now = at(1);
    w
}

#[test]
fn rollback_removes_the_subsets_once_istio_reports_the_restored_virtual_service_reconciled() {
    let mut w = routes_removed_world();
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
    for observed in [json!("7"), json!(7)] {
        w.vss = vec![istio_reported(user_vs(), 7, observed, "True")];
        let p = w.plan();
        assert!(has(&p, is_dr_write), "{:#?}", p.actions);
        assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
        assert_eq!(
            p.status.last_propagation_wait,
            Some(PropagationWait::IstioReconciled)
        );
        let note = &p
            .events
            .iter()
            .find(|e| e.reason == "RolledBack")
            .unwrap()
            .note;
        assert!(note.contains("Istio reported"), "{note}");
    }
}

#[test]
fn rollback_keeps_the_subsets_while_istio_reports_an_older_generation_or_routes_to_them() {
    for v in [
        istio_reported(user_vs(), 8, json!("7"), "True"),
        istio_reported(user_vs(), 7, json!("7"), "False"),
        // Still routing to the subsets (another writer put the split back): never early.
        istio_reported(split_vs(10), 7, json!("7"), "True"),
    ] {
        let mut w = routes_removed_world();
        w.vss = vec![v.clone()];
        let p = w.plan();
        assert!(!has(&p, is_dr_write), "{}: {:#?}", v["status"], p.actions);
    }
}

#[test]
fn rollback_after_deleting_our_own_virtual_service_waits_the_propagation_delay() {
    // A deleted VirtualService has no status to report: only the delay tells.
    let mut w = routes_removed_world();
    w.vss = vec![];
    w.drs = vec![owned(dr_in(
        NS,
        "rec-recording",
        json!({"host": "frontend", "subsets": istio::our_subsets()}),
    ))];
    w.canary.status.as_mut().unwrap().virtual_services = vec!["shop/rec-recording".into()];
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(59)));
    w.now = at(60);
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(
            a,
            Action::DeleteMesh {
                kind: MeshKind::DestinationRule,
                ..
            }
        )),
        "{:#?}",
        p.actions
    );
    assert_eq!(
        p.status.last_propagation_wait,
        Some(PropagationWait::PropagationDelay)
    );
    let note = &p
        .events
        .iter()
        .find(|e| e.reason == "RolledBack")
        .unwrap()
        .note;
    assert!(note.contains("propagationDelay (1m)"), "{note}");
}
