//! Ramps and the HPA: steps, intervals, the clone sized in proportion, `maxReplicas`.

use super::*;

// ---------------------------------------------------------------------------------------------
// 5. Ramp
// ---------------------------------------------------------------------------------------------

pub(super) fn ramp_world(vs_pct: i64, last_step: Option<i64>) -> World {
    let mut w = serving_world(30);
    w.vss = vec![split_vs(vs_pct)];
    w.canary = canary()
        .percent(30)
        .ramp(10, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: last_step.map(|s| rfc(at(s))),
            ..status(Phase::Progressing, "Ramping", vs_pct as i32)
        })
        .build();
    w
}

pub(super) fn vs_weight_after(w: &World, p: &Plan) -> Option<Vec<i64>> {
    patch_of(p, MeshKind::VirtualService, "frontend")
        .map(|ops| weights(&apply_ops(&w.vss[0], ops), 0))
}

#[test]
fn the_first_ramp_step_is_immediate() {
    let w = ramp_world(0, None);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![90, 10]));
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.last_step_time, Some(rfc(at(0))));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(30)));
    assert_eq!(ready_reason(&p), "Ramping");
    assert_eq!(p.status.phase, Some(Phase::Progressing));
}

#[test]
fn the_ramp_waits_for_the_interval_between_steps() {
    let w = ramp_world(10, Some(-10));
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.current_percent, 10);
    assert_eq!(p.status.last_step_time, Some(rfc(at(-10))));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(20)));
}

#[test]
fn the_ramp_steps_after_the_interval_and_stops_at_the_target() {
    let w = ramp_world(10, Some(-30));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![80, 20]));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(30)));
    let w = ramp_world(20, Some(-30));
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![70, 30]));
    assert_eq!(p.status.phase, Some(Phase::Ready));
    assert_eq!(p.requeue_after, None, "no further step");
    // At the target, nothing moves any more.
    let w = ramp_world(30, Some(-300));
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.status.current_percent, 30);
}

#[test]
fn the_last_ramp_step_does_not_overshoot() {
    let mut w = ramp_world(20, Some(-30));
    w.canary = canary()
        .percent(25)
        .ramp(10, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: Some(rfc(at(-30))),
            ..status(Phase::Progressing, "Ramping", 20)
        })
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![75, 25]));
}

#[test]
fn the_ramp_resumes_from_the_status_after_a_restart() {
    // Restarted a second ago: the interval still runs from status.lastStepTime.
    let mut w = ramp_world(10, Some(-31));
    w.started = at(-1);
    assert_eq!(vs_weight_after(&w, &w.plan()), Some(vec![80, 20]));
    let mut w = ramp_world(10, Some(-10));
    w.started = at(-1);
    let p = w.plan();
    assert!(!has(&p, is_vs_write));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(20)));
}

#[test]
fn decreasing_the_percent_applies_at_once_even_with_a_ramp() {
    let mut w = ramp_world(30, Some(-1));
    w.canary = canary()
        .percent(5)
        .ramp(10, "30s")
        .status(RecordingCanaryStatus {
            last_step_time: Some(rfc(at(-1))),
            ..status(Phase::Ready, "TargetReached", 30)
        })
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![95, 5]));
    assert_eq!(p.status.current_percent, 5);
}

#[test]
fn the_ramp_does_not_rise_while_the_clone_is_unhealthy() {
    let w = ramp_world(10, Some(-300)).clone_ready(0);
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert_eq!(
        p.status.last_step_time,
        Some(rfc(at(-300))),
        "no step taken"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. HPA
// ---------------------------------------------------------------------------------------------

#[test]
fn target_scaling_changes_clone_replicas_but_not_weights() {
    let mut w = serving_world(10);
    for (t, want) in [(20, 2), (4, 1), (35, 4)] {
        w.target = Some(target(t));
        let p = w.plan();
        assert!(!has(&p, is_mesh_write), "{:#?}", p.actions);
        assert_eq!(p.status.current_percent, 10);
        let scaled = p.actions.iter().find_map(|a| match a {
            Action::ScaleClone { replicas, .. } => Some(*replicas),
            _ => None,
        });
        if want == 1 {
            assert_eq!(scaled, None, "already at 1");
        } else {
            assert_eq!(scaled, Some(want), "target {t}");
        }
    }
}

#[test]
fn clone_replicas_are_the_ceiling_of_the_target_share() {
    for (t, p, max, want) in [
        (4, 10, None, 1),
        (10, 10, None, 1),
        (11, 10, None, 2),
        (7, 30, None, 3),
        (20, 50, None, 10),
        (20, 50, Some(2), 2),
        (1, 1, None, 1),
        (0, 10, None, 1),
        (3, 100, None, 3),
        (20, 0, None, 0),
    ] {
        assert_eq!(
            clone_replicas(t, p, p, max),
            want,
            "T={t} p={p} max={max:?}"
        );
    }
    // Through the planner: maxReplicas caps the clone.
    let mut w = serving_world(50);
    w.target = Some(target(20));
    w.canary = canary()
        .percent(50)
        .max_replicas(3)
        .status(status(Phase::Ready, "TargetReached", 50))
        .build();
    let p = w.plan();
    assert!(
        has(&p, |a| matches!(a, Action::ScaleClone { replicas: 3, .. })),
        "{:#?}",
        p.actions
    );
}

#[test]
fn percent_zero_scales_the_clone_to_zero_and_routes_nothing() {
    let mut w = serving_world(10);
    w.canary = canary()
        .percent(0)
        .status(status(Phase::Ready, "TargetReached", 10))
        .build();
    let p = w.plan();
    assert_eq!(vs_weight_after(&w, &p), Some(vec![100, 0]));
    assert!(
        has(&p, |a| matches!(a, Action::ScaleClone { replicas: 0, .. })),
        "{:#?}",
        p.actions
    );
    assert_eq!(p.status.clone_replicas, 0);
    assert_eq!(p.status.current_percent, 0);
    assert!(pos(&p, is_vs_write) < pos(&p, |a| matches!(a, Action::ScaleClone { .. })));
}
