//! Observed propagation: the waits between dependent writes end when Istio reports the object
//! written first `Reconciled` for its generation, with `propagationDelay` as the upper bound and
//! the fallback. There is no istiod here: the test plays it, writing the status subresource as
//! istiod does (`observedGeneration` as a string, as protojson writes an int64).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

use crate::mbb::{Kind, Revision};
use crate::support::*;

/// How long the stand-in istiod takes to report a generation distributed.
const ISTIO_DELAY: Duration = Duration::from_secs(2);

/// Writes the status istiod writes for `resource/name` at `generation`: the `Reconciled`
/// condition, `True` once every proxy has it. Returns the resourceVersion of the write.
async fn istiod_reports(
    h: &Harness,
    resource: &str,
    name: &str,
    generation: i64,
    reconciled: bool,
) -> u64 {
    let (status, message) = if reconciled {
        ("True", "1/1 proxies up to date.")
    } else {
        ("False", "0/1 proxies up to date.")
    };
    let patch = json!({"status": {
        "observedGeneration": generation.to_string(),
        "conditions": [{"type": "Reconciled", "status": status, "message": message}],
    }});
    let rv = h
        .k(&[
            "patch",
            resource,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .await;
    rv.trim()
        .parse()
        .unwrap_or_else(|e| panic!("resourceVersion {rv:?} of the status write: {e}"))
}

fn generation(obj: &Value) -> i64 {
    obj["metadata"]["generation"]
        .as_i64()
        .unwrap_or_else(|| panic!("no metadata.generation: {obj}"))
}

fn has_our_subsets(dr: &Value) -> bool {
    let names: Vec<&str> = dr["spec"]["subsets"]
        .as_array()
        .map(|ss| ss.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    names.contains(&STABLE_SUBSET) && names.contains(&RECORDING_SUBSET)
}

fn routes_to_our_subsets(vs: &Value) -> bool {
    http_destinations(vs)
        .iter()
        .flatten()
        .any(|(_, s, _)| matches!(s.as_deref(), Some(STABLE_SUBSET) | Some(RECORDING_SUBSET)))
}

/// The first revision the make-before-break watcher saw for which `pick` holds.
fn first_revision(h: &Harness, kind: Kind, pick: impl Fn(&Revision) -> bool) -> Revision {
    h.mbb
        .revisions()
        .into_iter()
        .find(|r| r.kind == kind && pick(r))
        .unwrap_or_else(|| panic!("the watcher saw no such {kind:?} revision"))
}

/// The message of the canary's `RolledBack` Event.
async fn rolled_back_note(h: &Harness) -> String {
    let events: Api<Event> = Api::namespaced(h.client.clone(), &h.ns);
    let selector =
        "involvedObject.kind=RecordingCanary,involvedObject.name=frontend,reason=RolledBack";
    h.until(
        "the Event RolledBack on rcanary/frontend",
        Duration::from_secs(30),
        || async {
            let list = events
                .list(&ListParams::default().fields(selector))
                .await
                .map_err(|e| format!("list events: {e}"))?;
            list.items
                .iter()
                .find_map(|e| e.message.clone())
                .ok_or_else(|| "no RolledBack Event yet".to_string())
        },
    )
    .await
}

async fn last_propagation_wait(h: &Harness, expected: &str) {
    h.until(
        &format!("rcanary/frontend status.lastPropagationWait {expected}"),
        WAIT,
        || async {
            let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
            if c["status"]["lastPropagationWait"] == expected {
                Ok(())
            } else {
                Err(c["status"].to_string())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_reconciled_ends_each_wait_long_before_the_propagation_delay() {
    let mut h = Harness::start("prop").await;
    h.apply_example("app.yaml").await;
    // The user's objects, adopted: on rollback the VirtualService is restored (not deleted), so
    // istiod can report the revision without the routes.
    h.apply_example("adopt/user-vs-dr.yaml").await;
    let canary = h.manifest(
        "canary",
        "apiVersion: recordingcanary.dev/v1alpha1\nkind: RecordingCanary\nmetadata: {name: frontend}\n\
         spec: {targetRef: {name: frontend}, virtualService: frontend, destinationRule: frontend, \
         percent: 10, propagationDelay: 60s}\n",
    );
    h.k(&["apply", "-f", canary.to_str().expect("utf-8 path")])
        .await;

    // The way in: the subsets reach the DestinationRule; istiod reports it still propagating,
    // then, ISTIO_DELAY later, distributed.
    let dr = h
        .until(
            "DestinationRule frontend with the subsets",
            WAIT,
            || async {
                let d = h
                    .dr("frontend")
                    .await
                    .ok_or("no DestinationRule frontend")?;
                if has_our_subsets(&d) {
                    Ok(d)
                } else {
                    Err(d["spec"].to_string())
                }
            },
        )
        .await;
    let subsets_seen = Instant::now();
    let dr_generation = generation(&dr);
    istiod_reports(&h, "destinationrule", "frontend", dr_generation, false).await;
    tokio::time::sleep(ISTIO_DELAY).await;
    let vs = h.vs("frontend").await.expect("VirtualService frontend");
    assert!(
        !routes_to_our_subsets(&vs),
        "the VirtualService routes to the subsets before Istio reported them distributed: {}",
        vs["spec"]
    );
    let dr_reconciled_rv =
        istiod_reports(&h, "destinationrule", "frontend", dr_generation, true).await;
    h.until(
        "VirtualService frontend to route to the subsets",
        Duration::from_secs(20),
        || async {
            let v = h.vs("frontend").await.ok_or("no VirtualService frontend")?;
            if routes_to_our_subsets(&v) {
                Ok(())
            } else {
                Err(v["spec"].to_string())
            }
        },
    )
    .await;
    let took = subsets_seen.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the split came {took:?} after the subsets, with Istio reporting them after {ISTIO_DELAY:?} (propagationDelay 60s)"
    );
    assert_eq!(
        h.dr("frontend").await.map(|d| generation(&d)),
        Some(dr_generation),
        "the DestinationRule changed after istiod's report"
    );
    last_propagation_wait(&h, "IstioReconciled").await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let split = first_revision(&h, Kind::VirtualService, |r| {
        routes_to_our_subsets(&r.object)
    });
    assert!(
        split.rv > dr_reconciled_rv,
        "the split (VirtualService revision {}) must come after istiod's report (DestinationRule revision {dr_reconciled_rv})",
        split.rv
    );
    eprintln!(
        "[e2e] {}: split {took:?} after the subsets (DestinationRule Reconciled at revision {dr_reconciled_rv}, VirtualService split at {})",
        h.ns, split.rv
    );

    // The way out: the routes go back; istiod reports the restored VirtualService, and only
    // then do the subsets leave.
    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    let restored = h
        .until(
            "VirtualService frontend restored (no route to the subsets)",
            WAIT,
            || async {
                let v = h.vs("frontend").await.ok_or("no VirtualService frontend")?;
                if routes_to_our_subsets(&v) {
                    Err(v["spec"].to_string())
                } else {
                    Ok(v)
                }
            },
        )
        .await;
    let restored_seen = Instant::now();
    let vs_generation = generation(&restored);
    istiod_reports(&h, "virtualservice", "frontend", vs_generation, false).await;
    tokio::time::sleep(ISTIO_DELAY).await;
    let dr = h.dr("frontend").await.expect("DestinationRule frontend");
    assert!(
        has_our_subsets(&dr),
        "the subsets left the DestinationRule before Istio reported the routes gone: {}",
        dr["spec"]
    );
    let vs_reconciled_rv =
        istiod_reports(&h, "virtualservice", "frontend", vs_generation, true).await;
    h.wait_gone(
        &h.canary_api(),
        "RecordingCanary",
        "frontend",
        Duration::from_secs(20),
    )
    .await;
    let took = restored_seen.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the rollback ended {took:?} after the routes went, with Istio reporting them after {ISTIO_DELAY:?} (propagationDelay 60s)"
    );
    let dr = h.dr("frontend").await.expect("the user's DestinationRule");
    assert!(!has_our_subsets(&dr), "{}", dr["spec"]);
    let note = rolled_back_note(&h).await;
    assert!(
        note.contains("Istio reported"),
        "the RolledBack Event says which wait ended: {note}"
    );
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let removed = first_revision(&h, Kind::DestinationRule, |r| {
        r.rv > split.rv && !has_our_subsets(&r.object)
    });
    assert!(
        removed.rv > vs_reconciled_rv,
        "the subsets left (DestinationRule revision {}) before istiod's report on the routes (VirtualService revision {vs_reconciled_rv})",
        removed.rv
    );

    let (checked, violations) = h.mbb.istio_order();
    assert!(
        violations.is_empty(),
        "the dependent writes did not wait for Istio's reports:\n{}",
        violations.join("\n")
    );
    assert!(
        checked >= 4,
        "the watcher checked only {checked} dependent writes (expected the split's two subsets and their removal)"
    );
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_istio_reporting_each_wait_is_the_propagation_delay() {
    const DELAY: Duration = Duration::from_secs(4);
    // What watch delivery may shave off the wait as the watcher sees it.
    const MARGIN: Duration = Duration::from_millis(300);
    let mut h = Harness::start("prop-delay").await;
    h.apply_example("app.yaml").await;
    let canary = h.manifest(
        "canary",
        "apiVersion: recordingcanary.dev/v1alpha1\nkind: RecordingCanary\nmetadata: {name: frontend}\n\
         spec: {targetRef: {name: frontend}, percent: 10, propagationDelay: 4s}\n",
    );
    h.k(&["apply", "-f", canary.to_str().expect("utf-8 path")])
        .await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    last_propagation_wait(&h, "PropagationDelay").await;
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let subsets = first_revision(&h, Kind::DestinationRule, |r| has_our_subsets(&r.object));
    let split = first_revision(&h, Kind::VirtualService, |r| {
        routes_to_our_subsets(&r.object)
    });
    let gap = split.seen.duration_since(subsets.seen);
    assert!(
        gap + MARGIN >= DELAY,
        "the split came {gap:?} after the subsets; propagationDelay is {DELAY:?}"
    );

    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    h.wait_gone(&h.canary_api(), "RecordingCanary", "frontend", WAIT)
        .await;
    let note = rolled_back_note(&h).await;
    assert!(
        note.contains("propagationDelay (4s)"),
        "the RolledBack Event says which wait ended: {note}"
    );
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let vs_gone = first_revision(&h, Kind::VirtualService, |r| r.deleted);
    let dr_gone = first_revision(&h, Kind::DestinationRule, |r| r.deleted);
    let gap = dr_gone.seen.duration_since(vs_gone.seen);
    assert!(
        gap + MARGIN >= DELAY,
        "the subsets left {gap:?} after the routes; propagationDelay is {DELAY:?}"
    );
    eprintln!(
        "[e2e] {}: without Istio's reports, split and removal waited the propagationDelay ({DELAY:?})",
        h.ns
    );
    h.finish(true).await;
}
