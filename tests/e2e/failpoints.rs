//! Faults placed exactly, with failpoints compiled into the controller under test (the e2e tests
//! are built with `--features failpoints`; `FAILPOINTS` is set per process):
//! - the process dies right after each kind of dependent mesh write and before the status write
//!   that records its time, through setup and rollback; the next process resumes and every wait
//!   still lasts as long as the canary asks;
//! - a panic in a reconcile is caught: the process goes on, the canary converges, and a Warning
//!   Event says what happened.

use std::time::Duration;

use serde_json::json;

use crate::support::{CLONE, Harness, OWNED, controller_args, split_weights};

/// How long a failpoint's process gets to reach its write and die.
const DIE_WITHIN: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_between_each_mesh_write_and_its_status_write_is_resumed_with_full_waits()
 {
    let mut h = Harness::start_without_controller("failpoints").await;
    let ns = h.ns.clone();
    let kubeconfig = h.env.kubeconfig.clone();
    let args: Vec<String> = controller_args(&ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.apply_example("app.yaml").await;
    h.apply_example("canary.yaml").await;
    // Longer than the watcher's fixed floor, so that a wait cut short shows.
    h.patch_canary("frontend", &json!({"spec": {"propagationDelay": "3s"}}))
        .await;

    // Each process dies right after its first write of one kind: setup (the subsets, then the
    // split), then rollback (the routes back, then the subsets out).
    let mut n = 0;
    let mut die_after = |h: &Harness, failpoint: &str| {
        n += 1;
        let fp = format!("{failpoint}=return");
        h.spawn_controller_with(&n.to_string(), &args, &kubeconfig, &[("FAILPOINTS", &fp)])
    };
    for (phase, failpoint) in [
        ("setup", "after-destination-rule-write"),
        ("setup", "after-virtual-service-write"),
    ] {
        let mut p = die_after(&h, failpoint);
        let status = p.exited_within(DIE_WITHIN).await;
        assert!(
            status.is_some_and(|s| !s.success()),
            "{phase}: the controller did not die at {failpoint}: {status:?}"
        );
        h.faults_injected(1);
    }
    let resumed = h.spawn_controller("resumed", &args, &kubeconfig);
    h.wait_ready("frontend").await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((90, 10)));
    drop(resumed);

    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    for failpoint in [
        "after-virtual-service-write",
        "after-destination-rule-write",
    ] {
        let mut p = die_after(&h, failpoint);
        let status = p.exited_within(DIE_WITHIN).await;
        assert!(
            status.is_some_and(|s| !s.success()),
            "rollback: the controller did not die at {failpoint}: {status:?}"
        );
        h.faults_injected(1);
    }
    let last = h.spawn_controller("last", &args, &kubeconfig);
    h.until(
        "the rollback to finish",
        Duration::from_secs(60),
        || async {
            let gone = h.canary("frontend").await.is_none()
                && h.dr(OWNED).await.is_none()
                && h.vs(OWNED).await.is_none()
                && h.deployment(CLONE).await.is_none();
            if gone {
                Ok(())
            } else {
                Err("canary, VirtualService, DestinationRule or clone still there".to_string())
            }
        },
    )
    .await;
    drop(last);
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_reconcile_is_caught_reported_and_retried_while_the_process_goes_on() {
    let mut h = Harness::start_without_controller("panic").await;
    let ns = h.ns.clone();
    let kubeconfig = h.env.kubeconfig.clone();
    let args: Vec<String> = controller_args(&ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The first two reconciles panic (a bug); kube-runtime would re-raise the panic and end
    // every canary's controller with it.
    let mut p = h.spawn_controller_with(
        "",
        &args,
        &kubeconfig,
        &[("FAILPOINTS", "reconcile=2*panic")],
    );
    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    assert!(
        p.exited_within(Duration::from_millis(100)).await.is_none(),
        "the controller process must still run"
    );
    h.faults_injected(2);
    let events = h
        .k(&[
            "get",
            "events.events.k8s.io",
            "--field-selector",
            "reason=ReconcilePanicked",
            "-o",
            "jsonpath={.items[*].type}",
        ])
        .await;
    assert!(
        events.split_whitespace().any(|t| t == "Warning"),
        "a Warning Event ReconcilePanicked on the canary: {events:?}"
    );
    // Still reconciling: a ramp goes on after the panics.
    h.patch_canary("frontend", &json!({"spec": {"percent": 30}}))
        .await;
    h.wait_status("frontend", "Ready", 30).await;
    drop(p);
    h.finish(true).await;
}
