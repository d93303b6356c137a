//! A writer that puts the routes back (a GitOps tool's self-heal): counted, named, outlasted.

use super::*;

// ---------------------------------------------------------------------------------------------
// A writer that puts the routes back (GitOps self-heal)
// ---------------------------------------------------------------------------------------------

/// The serving world after `manager` put the user's routes back into the VirtualService.
pub(super) fn reverted_by(manager: &str, pct: i32) -> World {
    let mut w = serving_world(pct);
    let mut v = split_vs(pct.into());
    v["spec"]["http"] = user_vs()["spec"]["http"].clone();
    v["metadata"]["managedFields"] = json!([
        {"manager": "recording-canary", "operation": "Update", "time": rfc(at(-120)),
         "fieldsV1": {"f:spec": {"f:http": {}}}},
        {"manager": manager, "operation": "Update", "time": rfc(at(-1)),
         "fieldsV1": {"f:spec": {"f:http": {}}}},
    ]);
    w.vss = vec![v];
    w
}

#[test]
fn a_split_put_back_by_another_writer_is_reapplied_at_once_and_the_writer_is_named() {
    let w = reverted_by("argocd-controller", 10);
    let p = w.plan();
    let after = apply_ops(
        w.vs_named("frontend"),
        patch_of(&p, MeshKind::VirtualService, "frontend").expect("the split again"),
    );
    assert_eq!(weights(&after, 0), vec![90, 10]);
    let e = p
        .events
        .iter()
        .find(|e| e.reason == "SplitReverted")
        .expect("a SplitReverted event");
    assert!(e.warning && e.note.contains("argocd-controller"), "{e:?}");
    assert_eq!(p.status.revert_count, 1);
    assert_eq!(p.status.phase, Some(Phase::Ready));
}

#[test]
fn a_split_put_back_again_and_again_is_reapplied_after_a_doubling_delay() {
    // The second revert in a row: wait 2 s, Degraded, no write.
    let mut w = reverted_by("kubectl-client-side-apply", 10);
    let mut st = status(Phase::Ready, "TargetReached", 10);
    st.revert_count = 1;
    st.last_revert_time = Some(rfc(at(-5)));
    w.canary = canary().percent(10).status(st).build();
    let p = w.plan();
    assert!(!has(&p, is_vs_write), "{:#?}", p.actions);
    assert_eq!(p.status.revert_count, 2);
    assert_eq!(p.status.phase, Some(Phase::Degraded));
    assert_eq!(ready_reason(&p), "SplitReverted");
    assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    assert_eq!(
        p.events
            .iter()
            .filter(|e| e.reason == "SplitReverted")
            .count(),
        1,
        "one Event per revert: {:?}",
        p.events
    );
    // 2 s later (the VS still reverted, status from the first plan): the split goes back, and
    // it is not counted as another revert.
    let mut later = w.clone();
    later.canary.status = Some(p.status.clone());
    later.now = at(2);
    let p2 = later.plan();
    assert!(has(&p2, is_vs_write), "{:#?}", p2.actions);
    assert_eq!(p2.status.revert_count, 2);
    assert!(!p2.events.iter().any(|e| e.reason == "SplitReverted"));
}

#[test]
fn the_revert_count_starts_over_once_a_split_has_held_for_ten_minutes() {
    let mut w = serving_world(10);
    let mut st = status(Phase::Ready, "TargetReached", 10);
    st.revert_count = 5;
    st.last_revert_time = Some(rfc(at(-60)));
    w.canary = canary().percent(10).status(st.clone()).build();
    assert_eq!(
        w.plan().status.revert_count,
        5,
        "a minute is not long enough"
    );
    st.last_revert_time = Some(rfc(at(-601)));
    w.canary = canary().percent(10).status(st).build();
    let p = w.plan();
    assert_eq!(p.status.revert_count, 0);
    assert_eq!(p.status.last_revert_time, None);
}

#[test]
fn the_revert_backoff_doubles_up_to_five_minutes() {
    let secs: Vec<u64> = (1..=12)
        .map(|n| progress::revert_backoff(n).as_secs())
        .collect();
    assert_eq!(secs, vec![0, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
}
