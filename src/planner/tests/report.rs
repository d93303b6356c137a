//! The report: phase, conditions, Events, who labels the stable pods.

use super::*;

// ---------------------------------------------------------------------------------------------
// 10. Status and events
// ---------------------------------------------------------------------------------------------

#[test]
fn a_steady_state_plans_nothing_and_publishes_no_event() {
    let w = serving_world(10);
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.requeue_after, None);
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.target_replicas, 4);
    assert_eq!(p.status.clone_replicas, 1);
    assert_eq!(p.status.clone_ready_replicas, 4);
    assert_eq!(p.status.virtual_services, vec!["shop/frontend".to_string()]);
    assert_eq!(p.status.destination_rule.as_deref(), Some("shop/frontend"));
    assert_eq!(p.status.observed_generation, Some(3));
    let cond = |t: &str| {
        p.status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(cond("Ready"), "True");
    assert_eq!(cond("Progressing"), "False");
    assert_eq!(cond("Degraded"), "False");
}

#[test]
fn a_phase_change_publishes_an_event_and_keeps_transition_times_otherwise() {
    let w = serving_world(10);
    let p = w.plan();
    // Same phase and reason: the Ready condition keeps its transition time.
    let ready = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.last_transition_time, Time(at(-600)));
    // Blocked from Ready: a warning, and a new transition time.
    let mut w = serving_world(10);
    w.service = false;
    let p = w.plan();
    assert_eq!(p.events.len(), 1, "{:?}", p.events);
    let ready = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert_eq!(ready.last_transition_time, Time(at(0)));
}

// ---------------------------------------------------------------------------------------------
// Who labels the stable pods
// ---------------------------------------------------------------------------------------------

#[test]
fn the_status_says_who_labels_the_targets_new_pods() {
    let mut w = serving_world(10);
    assert_eq!(
        w.plan().status.stable_labelling,
        Some(StableLabelling::Controller)
    );
    w.stable_labelling = StableLabelling::AdmissionPolicy;
    assert_eq!(
        w.plan().status.stable_labelling,
        Some(StableLabelling::AdmissionPolicy)
    );
}

#[test]
fn the_controller_still_labels_the_targets_pods_when_the_admission_policy_is_in_force() {
    let mut w = subsets_world();
    w.pods = vec![target_pod("frontend-7d9f-c").build()];
    w.stable_labelling = StableLabelling::AdmissionPolicy;
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::LabelPod { name } if name == "frontend-7d9f-c")),
        "{:?}",
        p.actions
    );
}
