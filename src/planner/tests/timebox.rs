//! Time-boxed recordings (`spec.duration`): the clock, the end that puts production back and
//! keeps the canary as a record, and a simulated recording from creation to `Completed`.

use super::simulation::{Sim, strip_rv};
use super::*;

fn timed(duration: &str) -> CanaryB {
    canary().spec("duration", json!(duration))
}

#[test]
fn the_clock_starts_when_the_clone_first_gets_weight_and_the_status_shows_the_time_left() {
    // Waiting for the clone: not started, the whole duration left, no end.
    let mut w = waiting_for_clone_world();
    w.pods.retain(|p| !pod_of_deployment(p, CLONE));
    w.canary = timed("30m")
        .status(status(Phase::Progressing, "WaitingForClone", 0))
        .build();
    let p = w.plan();
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(p.status.recording_start_time, None);
    assert_eq!(p.status.recording_end_time, None);
    assert_eq!(p.status.time_left.as_deref(), Some("30m"));
    // Serving: the clock starts now, the end is 30 minutes later, the text changes in a minute.
    let w = serving_world(10).with_canary(timed("30m").status(status(
        Phase::Ready,
        "TargetReached",
        10,
    )));
    let p = w.plan();
    assert_eq!(p.status.recording_start_time, Some(rfc(at(0))));
    assert_eq!(p.status.recording_end_time, Some(rfc(at(1800))));
    assert_eq!(p.status.time_left.as_deref(), Some("30m"));
    assert_eq!(p.status.recorded_percent, Some(10));
    assert!(
        p.requeue_after
            .is_some_and(|r| r <= Duration::from_secs(60))
    );
    // 35 s before the end (nothing else to do): "30s", until 5 s later.
    let mut later = w.clone();
    later.canary.status = Some(p.status.clone());
    later.now = at(1765);
    let p2 = later.plan();
    assert_eq!(p2.status.time_left.as_deref(), Some("30s"));
    assert!(p2.actions.is_empty(), "{:#?}", p2.actions);
    assert_eq!(p2.requeue_after, Some(Duration::from_millis(5_001)));
}

#[test]
fn patching_the_duration_moves_the_end_of_a_running_recording() {
    let mut st = status(Phase::Ready, "TargetReached", 10);
    st.recording_start_time = Some(rfc(at(-600)));
    let w = serving_world(10).with_canary(timed("30m").status(st.clone()));
    assert_eq!(w.plan().status.recording_end_time, Some(rfc(at(1200))));
    let w = serving_world(10).with_canary(timed("1h").status(st.clone()));
    assert_eq!(w.plan().status.recording_end_time, Some(rfc(at(3000))));
    assert_eq!(w.plan().status.time_left.as_deref(), Some("50m"));
    // Shortened below what has run: it ends now.
    let w = serving_world(10).with_canary(timed("5m").status(st));
    let p = w.plan();
    assert!(has(&p, is_vs_write), "the routes go back: {:#?}", p.actions);
    assert_eq!(ready_reason(&p), "RecordingEnding");
}

#[test]
fn when_the_time_is_up_production_is_put_back_and_the_canary_stays_completed() {
    let mut st = status(Phase::Ready, "TargetReached", 10);
    st.recording_start_time = Some(rfc(at(-1801)));
    st.recorded_percent = Some(10);
    let mut w = serving_world(10).with_canary(timed("30m").status(st));
    // 1. The routes back, at once; then propagationDelay.
    let p = w.plan();
    assert_eq!(p.actions.len(), 1, "{:#?}", p.actions);
    assert!(has(&p, is_vs_write));
    assert_eq!(p.status.current_percent, 0);
    assert_eq!(ready_reason(&p), "RecordingEnding");
    assert!(event_reasons(&p).contains(&"RecordingEnding"));
    let restored = apply_ops(
        &w.vss[0],
        patch_of(&p, MeshKind::VirtualService, "frontend").unwrap(),
    );
    assert_eq!(strip_rv(restored.clone()), strip_rv(user_vs()));
    // 2. After the delay: the subsets out, the clone at zero, the labels off; no finalizer
    // removed: the canary stays, Completed.
    w.vss = vec![restored];
    w.canary.status = Some(p.status.clone());
    w.now = at(3);
    let p = w.plan();
    assert!(has(&p, is_dr_write));
    assert!(
        has(&p, |a| matches!(a, Action::ScaleClone { replicas: 0, .. })),
        "{:#?}",
        p.actions
    );
    assert!(!has(&p, |a| matches!(
        a,
        Action::DeleteClone { .. } | Action::RemoveFinalizer
    )));
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::UnlabelPod { .. }))
            .count(),
        2
    );
    assert_eq!(p.status.phase, Some(Phase::Completed));
    assert_eq!(ready_reason(&p), "RecordingCompleted");
    assert_eq!(p.status.completion_time, Some(rfc(at(3))));
    assert_eq!(p.status.recorded_percent, Some(10));
    assert_eq!(p.status.time_left, None);
    assert!(
        ready_message(&p).contains("at 10%"),
        "{}",
        ready_message(&p)
    );
    assert_eq!(event_reasons(&p), vec!["RecordingCompleted"]);
    assert_eq!(p.requeue_after, None);
}

#[test]
fn a_completed_canary_changes_nothing_more_and_goes_when_deleted() {
    let mut st = status(Phase::Completed, "RecordingCompleted", 0);
    st.recording_start_time = Some(rfc(at(-4000)));
    st.completion_time = Some(rfc(at(-2000)));
    st.recorded_percent = Some(10);
    let mut w = fresh_world().with_canary(timed("30m").percent(40).status(st.clone()));
    w.vss = vec![user_vs()];
    w.drs = vec![user_dr()];
    let mut clone = live_clone(&w.canary, w.target.as_ref().unwrap(), 0, 0);
    clone.status = None;
    w.clone = Some(clone);
    // A new pod of the target (an HPA) is not labelled; a patch of percent changes nothing.
    let p = w.plan();
    assert!(p.actions.is_empty(), "{:#?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.status.phase, Some(Phase::Completed));
    assert_eq!(p.status.completion_time, st.completion_time);
    // Deleted: the clone and the finalizer go.
    w.canary = timed("30m").deleting().status(st).build();
    let p = w.plan();
    assert!(has(&p, |a| matches!(a, Action::DeleteClone { .. })));
    assert_eq!(p.actions.last(), Some(&Action::RemoveFinalizer));
}

#[test]
fn a_simulated_recording_runs_for_its_duration_then_ends_without_breaking_a_request() {
    let original_vs = user_vs();
    let original_dr = user_dr();
    let mut w = fresh_world();
    w.canary = timed("2m").without_finalizer().build();
    w.started = at(-1);
    let mut sim = Sim::new(w);
    sim.run(400);
    let st = sim.w.canary.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Completed), "{st:#?}");
    let start = parse_time(st.recording_start_time.as_deref()).unwrap();
    let done = parse_time(st.completion_time.as_deref()).unwrap();
    // It recorded two minutes, then took propagationDelay to put everything back.
    assert!(
        done >= after(start, Duration::from_secs(123)),
        "{start} {done}"
    );
    assert!(
        done <= after(start, Duration::from_secs(125)),
        "{start} {done}"
    );
    assert_eq!(
        strip_rv(sim.w.vs_named("frontend").clone()),
        strip_rv(original_vs)
    );
    assert_eq!(strip_rv(sim.w.drs[0].clone()), strip_rv(original_dr));
    let clone = sim.w.clone.as_ref().expect("the clone stays, as a record");
    assert_eq!(clone.spec.as_ref().unwrap().replicas, Some(0));
    assert!(
        sim.w
            .pods
            .iter()
            .filter(|p| pod_of_deployment(p, TARGET))
            .all(|p| !p.labels().contains_key(ROLE_LABEL))
    );
    assert!(!sim.gone, "the canary stays");
    // The status showed the time left as it ran, at most once a minute past the last minute.
    let texts: Vec<String> = sim
        .plans
        .iter()
        .filter_map(|(_, p)| p.status.time_left.clone())
        .collect();
    assert!(
        texts.contains(&"2m".to_string())
            && texts.contains(&"1m".to_string())
            && texts.contains(&"50s".to_string()),
        "{texts:?}"
    );
}
