//! The make-before-break watcher's newer checks, each shown to catch what it is for (issue 25):
//! weight only on subsets that have a Ready endpoint in the Service's EndpointSlices (item 1),
//! and waits that last the canary's own `propagationDelay`, not a fixed 0.9 s.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::mbb::{Kind, Revision, WATCH_MARGIN};
use crate::support::*;

/// The names of the clone's pods start with this.
const CLONE_POD_PREFIX: &str = "frontend-recording-";

/// The pods the EndpointSlices of Service `frontend` list as Ready endpoints.
async fn ready_endpoints(h: &Harness) -> Result<BTreeSet<String>, String> {
    let slices: Api<EndpointSlice> = Api::namespaced(h.client.clone(), &h.ns);
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=frontend"))
        .await
        .map_err(|e| format!("list EndpointSlices: {e}"))?;
    Ok(list
        .items
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.target_ref.as_ref()?.name.clone())
        .collect())
}

/// Waits until the Service's Ready endpoints satisfy `ok`; returns them.
async fn wait_endpoints(
    h: &Harness,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    h.until(what, timeout, || async {
        let eps = ready_endpoints(h).await?;
        if ok(&eps) {
            Ok(eps)
        } else {
            Err(format!("Ready endpoints of Service frontend: {eps:?}"))
        }
    })
    .await
}

fn is_clone_pod(name: &str) -> bool {
    name.starts_with(CLONE_POD_PREFIX)
}

/// A ValidatingAdmissionPolicy (and its binding, scoped to the test namespace) that refuses every
/// EndpointSlice write adding an endpoint for a pod whose name starts with a prefix: the
/// endpoint-slice controller cannot list those pods, whatever their readiness, as a slow
/// endpoint-slice controller (the README measured them 498.8 s behind at 10,000 Services) would
/// not. Both are deleted when the guard is dropped, also when the test fails.
struct EndpointsHeldBack {
    name: String,
    prefix: String,
    env: Env,
}

impl EndpointsHeldBack {
    /// Creates the policy and waits (at most 30 s) until the API server enforces it.
    async fn start(h: &Harness, prefix: &str) -> Self {
        let name = format!("rc-e2e-hold-{}", h.ns);
        let expression = format!(
            "!has(object.endpoints) || object.endpoints.all(e, !has(e.targetRef) || \
             !has(e.targetRef.name) || !e.targetRef.name.startsWith('{prefix}') || \
             (oldObject != null && has(oldObject.endpoints) && oldObject.endpoints.exists(o, \
             has(o.targetRef) && has(o.targetRef.name) && o.targetRef.name == e.targetRef.name)))"
        );
        let policy = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": ["discovery.k8s.io"],
                    "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": ["endpointslices"],
                }]},
                "validations": [{
                    "expression": expression,
                    "message": format!("e2e: endpoints of pods {prefix}* are held back"),
                }],
            },
        });
        let binding = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": h.ns,
                }}},
            },
        });
        let guard = Self {
            name,
            prefix: prefix.to_string(),
            env: h.env.clone(),
        };
        for (what, obj) in [("policy", policy), ("binding", binding)] {
            let file = h.manifest(&format!("hold-{what}"), &obj.to_string());
            h.k(&["apply", "-f", file.to_str().expect("utf-8 path")])
                .await;
        }
        h.until(
            "the API server to enforce the policy holding back the endpoints",
            Duration::from_secs(30),
            || async {
                match guard.enforced(h).await? {
                    true => Ok(()),
                    false => Err("a dry run of such an EndpointSlice is allowed".into()),
                }
            },
        )
        .await;
        guard
    }

    /// Whether the API server refuses (in a server-side dry run) an EndpointSlice that lists a
    /// pod with the prefix.
    async fn enforced(&self, h: &Harness) -> Result<bool, String> {
        let probe: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "rc-e2e-hold-probe"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"],
                           "targetRef": {"kind": "Pod", "name": format!("{}probe", self.prefix)}}],
        }))
        .expect("probe EndpointSlice");
        let slices: Api<EndpointSlice> = Api::namespaced(h.client.clone(), &h.ns);
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match slices.create(&dry_run, &probe).await {
            Ok(_) => Ok(false),
            Err(kube::Error::Api(s)) if s.message.contains("are held back") => Ok(true),
            Err(e) => Err(format!("a dry-run create of such an EndpointSlice: {e}")),
        }
    }

    /// Deletes the policy and its binding, waits until the API server no longer enforces it,
    /// and then updates the Service (an annotation). The endpoint-slice controller retries a
    /// Service whose write was refused with an exponential backoff (1 s, doubling): measured
    /// here, it listed the clone 5.5 s after an 8 s hold and 9.2 s after a 20 s one. An update of
    /// the Service queues it again at once, so that the wait that follows times the controller
    /// under test, not that backoff.
    async fn release(&self, h: &Harness) {
        for kind in [
            "validatingadmissionpolicybinding",
            "validatingadmissionpolicy",
        ] {
            h.k(&["delete", kind, &self.name, "--ignore-not-found"])
                .await;
        }
        h.until(
            "the API server to stop enforcing the policy holding back the endpoints",
            Duration::from_secs(30),
            || async {
                match self.enforced(h).await? {
                    false => Ok(()),
                    true => Err("a dry run of such an EndpointSlice is still refused".into()),
                }
            },
        )
        .await;
        h.k(&[
            "annotate",
            "service",
            "frontend",
            "--overwrite",
            "e2e.recordingcanary.dev/endpoints-released=true",
        ])
        .await;
    }
}

impl Drop for EndpointsHeldBack {
    fn drop(&mut self) {
        for kind in [
            "validatingadmissionpolicybinding",
            "validatingadmissionpolicy",
        ] {
            let _ = std::process::Command::new(&self.env.kubectl)
                .arg("--kubeconfig")
                .arg(&self.env.kubeconfig)
                .args([
                    "delete",
                    kind,
                    &self.name,
                    "--ignore-not-found",
                    "--wait=false",
                ])
                .stdin(std::process::Stdio::null())
                .output();
        }
    }
}

/// The recording subset's weight in the owned VirtualService (0 when unsplit or absent).
async fn recording_weight(h: &Harness) -> i64 {
    h.vs(OWNED)
        .await
        .and_then(|vs| split_weights(&vs))
        .map_or(0, |(_, recording)| recording)
}

/// Issue 25, item 1 ("weight rises before the clone is an endpoint"): the clone's pods are Ready
/// while the endpoint-slice controller cannot list them, so Istio would have no endpoint for the
/// recording subset and the requests sent there would fail with 503 UH. The weight must wait for
/// the endpoint. The controller that counts the clone's Ready pods instead gives the clone its
/// 10 % at once, and the make-before-break watcher must report it: this test fails on such a
/// controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_waits_until_the_clone_is_a_ready_endpoint() {
    // How long the clone's endpoints stay held back once its pod is Ready: several times what a
    // controller needs to write a split after its 1 s propagationDelay.
    const HOLD: Duration = Duration::from_secs(8);
    // How soon the endpoint-slice controller must list the clone once the policy is gone (and
    // the Service updated, see `release`).
    const RECOVERY: Duration = Duration::from_secs(10);
    let h = Harness::start("eps-hold").await;
    h.apply_example("app.yaml").await;
    wait_endpoints(&h, "the target's 3 pods Ready endpoints", WAIT, |eps| {
        eps.iter().filter(|p| !is_clone_pod(p)).count() >= 3
    })
    .await;

    let hold = EndpointsHeldBack::start(&h, CLONE_POD_PREFIX).await;
    h.faults_injected_of_kind("endpoints-held-back", 1);
    let canary = h.manifest(
        "canary",
        "apiVersion: recordingcanary.dev/v1alpha1\nkind: RecordingCanary\nmetadata: {name: frontend}\n\
         spec: {targetRef: {name: frontend}, percent: 10, propagationDelay: 1s}\n",
    );
    h.k(&["apply", "-f", canary.to_str().expect("utf-8 path")])
        .await;
    h.until("a Ready pod of the clone", WAIT, || async {
        let pods = h.pods(None).await;
        if pods.iter().any(|p| pod_of(p, CLONE) && pod_ready(p)) {
            Ok(())
        } else {
            Err(format!(
                "pods: {:?}",
                pods.iter().map(pod_name).collect::<Vec<_>>()
            ))
        }
    })
    .await;
    let clone_ready = Instant::now();
    // Held back until the controller gives the clone weight anyway (the failure this test is
    // for), or for HOLD.
    let weighted = h
        .until(
            "the clone to get weight, or the hold to end",
            HOLD + WAIT,
            || async {
                let w = recording_weight(&h).await;
                if w > 0 {
                    Ok(Some(w))
                } else if clone_ready.elapsed() >= HOLD {
                    Ok(None)
                } else {
                    Err(format!("recording weight {w}"))
                }
            },
        )
        .await;
    let eps = ready_endpoints(&h).await.expect("EndpointSlices");
    assert!(
        !eps.iter().any(|p| is_clone_pod(p)),
        "the policy did not hold the clone's endpoints back: Ready endpoints {eps:?}"
    );
    eprintln!(
        "[e2e] {}: the clone's pod Ready, its endpoint held back for {:?}; recording weight then: {weighted:?}",
        h.ns,
        clone_ready.elapsed()
    );

    let released = Instant::now();
    hold.release(&h).await;
    wait_endpoints(
        &h,
        "a clone pod to be a Ready endpoint once the policy is gone",
        RECOVERY,
        |eps| eps.iter().any(|p| is_clone_pod(p)),
    )
    .await;
    let recovered_in = released.elapsed();
    eprintln!(
        "[e2e] {}: the endpoint-slice controller listed the clone {recovered_in:?} after the policy was deleted",
        h.ns
    );
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    h.wait_gone(&h.canary_api(), "RecordingCanary", "frontend", WAIT)
        .await;

    // Checked here rather than by `finish`, to say which check this test is for; recorded for
    // the safety summary before any assertion, so that a violation counts there too.
    let report = h.mbb.check(&h.vs_api(), &h.dr_api()).await;
    h.record_checked(
        report.vs_revisions,
        report.dr_revisions,
        report.violations.len(),
    );
    let no_endpoint: Vec<&String> = report
        .violations
        .iter()
        .filter(|v| v.contains("which has no Ready endpoint"))
        .collect();
    if let Some(w) = weighted {
        assert!(
            !no_endpoint.is_empty(),
            "the VirtualService gave the clone {w}% while its endpoints were held back, and the \
             make-before-break watcher did not report it:\n{}",
            report.timeline
        );
    }
    assert!(
        no_endpoint.is_empty(),
        "issue 25 item 1: weight on the recording subset before the clone was a Ready endpoint \
         ({} VirtualService revisions):\n{}\nrevisions:\n{}",
        no_endpoint.len(),
        no_endpoint
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        report.timeline
    );
    assert!(
        report.violations.is_empty(),
        "make-before-break violated:\n{}\nrevisions:\n{}",
        report.violations.join("\n"),
        report.timeline
    );
    assert!(
        report.vs_revisions > 0 && report.endpoint_checks > 0 && report.eps_revisions > 0,
        "the watcher checked {} VirtualService revisions, {} weights against {} EndpointSlice \
         revisions",
        report.vs_revisions,
        report.endpoint_checks,
        report.eps_revisions
    );
}

/// The first revision the watcher saw for which `pick` holds.
fn first(revs: &[Revision], pick: impl Fn(&Revision) -> bool) -> &Revision {
    revs.iter()
        .find(|r| pick(r))
        .unwrap_or_else(|| panic!("the watcher saw no such revision"))
}

fn has_our_subsets(r: &Revision) -> bool {
    !r.deleted
        && r.object["spec"]["subsets"]
            .as_array()
            .is_some_and(|ss| ss.iter().any(|s| s["name"] == RECORDING_SUBSET))
}

fn routes_to_our_subsets(r: &Revision) -> bool {
    !r.deleted && split_weights(&r.object).is_some()
}

/// Create, ramp to 30 % and delete a canary with `propagationDelay: <delay>`; every wait between
/// dependent writes must last that delay, and the watcher must hold them to it.
async fn waits_last_the_propagation_delay(short: &str, delay: Duration) {
    let mut h = Harness::start(short).await;
    h.apply_example("app.yaml").await;
    let canary = h.manifest(
        "canary",
        &format!(
            "apiVersion: recordingcanary.dev/v1alpha1\nkind: RecordingCanary\nmetadata: {{name: frontend}}\n\
             spec: {{targetRef: {{name: frontend}}, percent: 30, propagationDelay: {}s, \
             ramp: {{stepPercent: 10, interval: 2s}}}}\n",
            delay.as_secs()
        ),
    );
    h.k(&["apply", "-f", canary.to_str().expect("utf-8 path")])
        .await;
    h.until("rcanary/frontend Ready at 30%", delay + WAIT, || async {
        let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
        let st = &c["status"];
        if st["phase"] == "Ready" && st["currentPercent"] == 30 {
            Ok(())
        } else {
            Err(st.to_string())
        }
    })
    .await;
    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    h.wait_gone(&h.canary_api(), "RecordingCanary", "frontend", delay + WAIT)
        .await;

    let report = h.mbb.check(&h.vs_api(), &h.dr_api()).await;
    assert!(
        report.violations.is_empty(),
        "{}\nrevisions:\n{}",
        report.violations.join("\n"),
        report.timeline
    );
    assert!(
        report.waits_checked >= 4 && report.waits_by_istio == 0,
        "expected the watcher to check the waits of both subsets in and out against the delay, \
         none ended by Istio (there is no istiod): {} checked, {} by Istio",
        report.waits_checked,
        report.waits_by_istio
    );
    // The waits as the watcher saw them.
    let revs = h.mbb.revisions();
    let subsets = first(&revs, |r| {
        r.kind == Kind::DestinationRule && has_our_subsets(r)
    });
    let split = first(&revs, |r| {
        r.kind == Kind::VirtualService && routes_to_our_subsets(r)
    });
    let unsplit = first(&revs, |r| {
        r.kind == Kind::VirtualService && r.rv > split.rv && !routes_to_our_subsets(r)
    });
    let removed = first(&revs, |r| {
        r.kind == Kind::DestinationRule && r.rv > unsplit.rv && !has_our_subsets(r)
    });
    let way_in = split.seen.duration_since(subsets.seen);
    let way_out = removed.seen.duration_since(unsplit.seen);
    eprintln!(
        "[e2e] {}: propagationDelay {delay:?}: split {way_in:?} after the subsets, subsets gone \
         {way_out:?} after the routes",
        h.ns
    );
    for (what, gap) in [("split", way_in), ("subset removal", way_out)] {
        assert!(
            gap + WATCH_MARGIN >= delay,
            "the {what} came {gap:?} after the write it depends on; propagationDelay is {delay:?}"
        );
    }

    // The check is live at this delay: the same timeline with the split seen only 1 s after the
    // subsets (a wait the old fixed 0.9 s gap let pass) is refused, once per subset.
    let cut = way_in - Duration::from_secs(1);
    let earlier = |seen: Instant| seen.checked_sub(cut).expect("an earlier instant");
    let shifted: Vec<Revision> = revs
        .iter()
        .cloned()
        .map(|mut r| {
            if r.rv >= split.rv {
                r.seen = earlier(r.seen);
            }
            r
        })
        .collect();
    let observations: Vec<_> = h
        .mbb
        .observations()
        .into_iter()
        .map(|mut o| {
            if o.rv >= split.rv {
                o.seen = earlier(o.seen);
            }
            o
        })
        .collect();
    let cut_short = crate::mbb::replay(&h.ns, &shifted, &observations);
    let expected = format!("propagationDelay {delay:?}");
    let caught: Vec<&String> = cut_short
        .violations
        .iter()
        .filter(|v| v.contains("after it was defined") && v.contains(&expected))
        .collect();
    assert_eq!(
        (caught.len(), cut_short.violations.len()),
        (2, 2),
        "a split 1 s after the subsets, with propagationDelay {delay:?}: expected the watcher to \
         refuse it for both subsets, and nothing else; it reported {:#?}",
        cut_short.violations
    );
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_last_a_propagation_delay_of_3s() {
    waits_last_the_propagation_delay("delay-3s", Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_last_a_propagation_delay_of_10s() {
    waits_last_the_propagation_delay("delay-10s", Duration::from_secs(10)).await;
}
