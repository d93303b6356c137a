//! Faults placed exactly, with failpoints compiled into the controller under test (the e2e tests
//! are built with `--features failpoints`; `FAILPOINTS` is set per process):
//! - the process dies right after each kind of dependent mesh write and before the status write
//!   that records its time, through setup and rollback; the next process resumes and every wait
//!   still lasts as long as the canary asks;
//! - a panic in a reconcile is caught: the process goes on, the canary converges, and a Warning
//!   Event says what happened.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;

use crate::mbb::Kind;
use crate::support::{
    CLONE, Harness, OWNED, controller_args, elected_controller_args, split_weights,
};

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

/// The identity holding Lease `lease` of the test namespace.
async fn holder_of(h: &Harness, lease: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &h.ns);
    leases
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|s| !s.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_takes_over_between_the_subsets_and_their_time_still_waits_the_full_delay() {
    // The leader dies right after it added the subsets, before the status records when; the
    // warm standby (its process started long before) takes over once the lease expires (15 s)
    // and must still leave the whole propagationDelay (25 s, longer than the takeover) before
    // the routes use the subsets: measured from when it started to lead, not from its start.
    const LEASE: &str = "rc-e2e-takeover";
    const DELAY: Duration = Duration::from_secs(25);
    let mut h = Harness::start_without_controller("takeover").await;
    let ns = h.ns.clone();
    let kubeconfig = h.env.kubeconfig.clone();
    let args = elected_controller_args(&ns, LEASE);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = h.spawn_controller_with(
        "a",
        &args,
        &kubeconfig,
        &[("FAILPOINTS", "after-destination-rule-write=return")],
    );
    let a_id = format!("-{}", a.pid());
    h.until("a to lead", Duration::from_secs(30), || async {
        match holder_of(&h, LEASE).await {
            Some(id) if id.ends_with(&a_id) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let b = h.spawn_controller("b", &args, &kubeconfig);
    // The app Ready first: the standby's process is then well older than the subsets, as a
    // warm standby's is (the old measure, from its start, would end the wait early).
    h.apply_example("app.yaml").await;
    h.until("the app's pods Ready", Duration::from_secs(60), || async {
        let ready = h
            .deployment("frontend")
            .await
            .and_then(|d| d.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready >= 3 {
            Ok(())
        } else {
            Err(format!("{ready} ready"))
        }
    })
    .await;
    h.apply_example("canary.yaml").await;
    h.patch_canary("frontend", &json!({"spec": {"propagationDelay": "25s"}}))
        .await;
    let died = a.exited_within(Duration::from_secs(60)).await;
    assert!(
        died.is_some_and(|s| !s.success()),
        "a did not die after the DestinationRule write: {died:?}"
    );
    h.faults_injected(1);
    h.until("the split at 10 %", Duration::from_secs(120), || async {
        match h.vs(OWNED).await.as_ref().and_then(split_weights) {
            Some((90, 10)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let revisions = h.mbb.revisions();
    let subsets_at = revisions
        .iter()
        .find(|r| {
            r.kind == Kind::DestinationRule
                && r.object["spec"]["subsets"]
                    .as_array()
                    .is_some_and(|s| s.len() == 2)
        })
        .map(|r| r.seen)
        .expect("a DestinationRule revision with the subsets");
    let routed_at = revisions
        .iter()
        .find(|r| r.kind == Kind::VirtualService && !r.deleted)
        .map(|r| r.seen)
        .expect("a VirtualService revision");
    let waited = routed_at.duration_since(subsets_at);
    eprintln!("[e2e] {ns}: the routes used the subsets {waited:?} after they were added");
    assert!(
        waited >= DELAY,
        "the routes used the subsets {waited:?} after they were added; propagationDelay is {DELAY:?}"
    );
    drop(b);
    h.finish(true).await;
}
