//! The main user flows with the VirtualService and DestinationRule the controller creates.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use serde_json::{Value, json};

use crate::mbb::Kind;
use crate::support::*;

/// app.yaml + canary.yaml (+ propagationDelay 1s), then Ready at 10%.
async fn canary_at_10(h: &Harness) {
    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
}

fn clone_replicas(d: &Deployment) -> Option<i32> {
    d.spec.as_ref().and_then(|s| s.replicas)
}

fn ready_replicas(d: &Deployment) -> i32 {
    d.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

fn container_image(d: &Deployment, container: &str) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .image
        .clone()
}

/// Waits until the owned VirtualService `frontend` routes `stable`/`recording`.
async fn wait_weights(h: &Harness, stable: i64, recording: i64) -> Value {
    h.until(
        &format!("VirtualService frontend to route {stable}/{recording}"),
        WAIT,
        || async {
            let vs = h
                .vs(OWNED)
                .await
                .ok_or("no VirtualService frontend-recording")?;
            if split_weights(&vs) == Some((stable, recording)) {
                Ok(vs)
            } else {
                Err(vs["spec"].to_string())
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_at_10_percent_clones_splits_90_10_and_is_ready() {
    let mut h = Harness::start("ready").await;
    h.app_and_canary("canary.yaml").await;
    // `kubectl wait` is what a user (or a pipeline) runs.
    h.wait_ready("frontend").await;

    // The clone: annotated for the Speedscale operator, and Ready.
    let clone = h
        .until(
            "clone frontend-recording with a ready replica",
            WAIT,
            || async {
                let d = h
                    .deployment(CLONE)
                    .await
                    .ok_or("no Deployment frontend-recording")?;
                if ready_replicas(&d) >= 1 {
                    Ok(d)
                } else {
                    Err(format!("status: {:?}", d.status))
                }
            },
        )
        .await;
    let ann = clone.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ann.get(SIDECAR_ANNOTATION).map(String::as_str),
        Some("true"),
        "the clone Deployment's metadata must carry {SIDECAR_ANNOTATION}=\"true\"; annotations: {ann:?}"
    );

    // The DestinationRule has both subsets, selecting by role.
    let dr = h.dr(OWNED).await.expect("DestinationRule frontend");
    let subsets = dr["spec"]["subsets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (name, role) in [(STABLE_SUBSET, "stable"), (RECORDING_SUBSET, "recording")] {
        let s = subsets
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("DestinationRule frontend lacks subset {name}: {subsets:?}"));
        assert_eq!(
            s["labels"],
            json!({ROLE_LABEL: role}),
            "labels of subset {name}"
        );
    }
    let fqdn = format!("frontend.{}.svc.cluster.local", h.ns);
    assert_eq!(dr["spec"]["host"], fqdn.as_str(), "DestinationRule host");

    // The VirtualService routes 90/10 to the Service's host.
    let vs = h.vs(OWNED).await.expect("VirtualService frontend");
    let routes = http_destinations(&vs);
    assert_eq!(
        routes,
        vec![vec![
            (fqdn.clone(), Some(STABLE_SUBSET.to_string()), Some(90)),
            (fqdn.clone(), Some(RECORDING_SUBSET.to_string()), Some(10)),
        ]],
        "VirtualService frontend routes: {}",
        vs["spec"]
    );

    // Status.
    let c = h.wait_status("frontend", "Ready", 10).await;
    let ready = c["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned())
        .expect("Ready condition");
    assert_eq!(ready["status"], "True", "Ready condition: {ready}");

    // `kubectl get rcanary` shows the printer columns.
    let out = h.k(&["get", "rcanary"]).await;
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TARGET",
            "PERCENT",
            "CURRENT",
            "PHASE",
            "TIME-LEFT",
            "AGE"
        ],
        "kubectl get rcanary:\n{out}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row.get(..5),
        Some(&["frontend", "frontend", "10", "10", "Ready"][..]),
        "kubectl get rcanary:\n{out}"
    );

    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_to_25_moves_weights_to_75_25() {
    let mut h = Harness::start("patch25").await;
    canary_at_10(&h).await;
    wait_weights(&h, 90, 10).await;

    h.patch_canary("frontend", &json!({"spec": {"percent": 25}}))
        .await;
    wait_weights(&h, 75, 25).await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 25).await;
    // 3 target replicas at 25%: ceil(0.75) = 1 clone replica.
    h.until("clone at 1 replica", WAIT, || async {
        let d = h.deployment(CLONE).await.ok_or("no clone")?;
        match clone_replicas(&d) {
            Some(1) => Ok(()),
            r => Err(format!("replicas {r:?}")),
        }
    })
    .await;

    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_shows_intermediate_steps() {
    let mut h = Harness::start("ramp").await;
    h.apply_example("app.yaml").await;
    h.apply_example("canary-ramp.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s", "ramp": {"interval": "2s"}}}),
    )
    .await;
    let c = h.canary("frontend").await.expect("rcanary frontend");
    assert_eq!(
        c["spec"]["ramp"],
        json!({"stepPercent": 10, "interval": "2s"}),
        "ramp after the patch"
    );

    wait_weights(&h, 50, 50).await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 50).await;
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;

    // Every weight the VirtualService ever had, in order.
    let mut steps: Vec<(i64, Instant)> = Vec::new();
    for r in h.mbb.revisions() {
        if r.kind != Kind::VirtualService || r.deleted || r.name != OWNED {
            continue;
        }
        let Some((s, rec)) = split_weights(&r.object) else {
            continue;
        };
        assert_eq!(
            s + rec,
            100,
            "revision {} of the VirtualService: weights {s}/{rec} do not add up to 100",
            r.rv
        );
        if steps.last().map(|l| l.0) != Some(rec) {
            steps.push((rec, r.seen));
        }
    }
    let weights: Vec<i64> = steps.iter().map(|s| s.0).collect();
    eprintln!("[e2e] {}: recording weights over time: {weights:?}", h.ns);
    assert_eq!(
        weights.last(),
        Some(&50),
        "the ramp ends at 50: {weights:?}"
    );
    for w in weights.windows(2) {
        assert!(
            w[1] > w[0] && w[1] - w[0] <= 10,
            "the ramp must rise by at most stepPercent (10) at a time: {weights:?}"
        );
    }
    let intermediate: Vec<i64> = weights
        .iter()
        .copied()
        .filter(|w| *w > 0 && *w < 50)
        .collect();
    assert!(
        intermediate.len() >= 2,
        "expected at least two intermediate weights between 0 and 50 before 50, got {weights:?}"
    );
    // With interval 2s, two raises are never (nearly) simultaneous.
    let raises: Vec<&(i64, Instant)> = steps.iter().filter(|s| s.0 > 0).collect();
    for w in raises.windows(2) {
        let gap = w[1].1.duration_since(w[0].1);
        assert!(
            gap >= Duration::from_millis(1500),
            "steps {} -> {} came {gap:?} apart; the ramp interval is 2s ({weights:?})",
            w[0].0,
            w[1].0
        );
    }

    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_the_target_resizes_the_clone_without_rewriting_the_vs() {
    let mut h = Harness::start("scale").await;
    h.app_and_canary("canary.yaml").await;
    h.patch_canary("frontend", &json!({"spec": {"percent": 25}}))
        .await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 25).await;
    wait_weights(&h, 75, 25).await;
    h.until("clone at 1 replica (ceil(3 x 25%))", WAIT, || async {
        let d = h.deployment(CLONE).await.ok_or("no clone")?;
        match clone_replicas(&d) {
            Some(1) => Ok(()),
            r => Err(format!("replicas {r:?}")),
        }
    })
    .await;
    let vs_before = h.vs(OWNED).await.expect("VirtualService");
    let rv_before = vs_before["metadata"]["resourceVersion"].clone();

    h.k(&["scale", "deployment/frontend", "--replicas=9"]).await;

    // ceil(9 x 25 / 100) = 3, and the clone gets there.
    h.until("clone at 3 replicas, all ready", WAIT, || async {
        let d = h.deployment(CLONE).await.ok_or("no clone")?;
        if clone_replicas(&d) == Some(3) && ready_replicas(&d) == 3 {
            Ok(())
        } else {
            Err(format!(
                "replicas {:?}, ready {}",
                clone_replicas(&d),
                ready_replicas(&d)
            ))
        }
    })
    .await;
    h.until(
        "status: targetReplicas 9, cloneReplicas 3, cloneReadyReplicas 3",
        WAIT,
        || async {
            let c = h.canary("frontend").await.ok_or("rcanary gone")?;
            let st = &c["status"];
            if st["targetReplicas"] == 9
                && st["cloneReplicas"] == 3
                && st["cloneReadyReplicas"] == 3
                && st["phase"] == "Ready"
            {
                Ok(())
            } else {
                Err(st.to_string())
            }
        },
    )
    .await;
    // All 9 target pods are in the stable subset (so the controller has seen them all).
    h.until("9 ready target pods labelled stable", WAIT, || async {
        let pods = h.pods(None).await;
        let stable = pods
            .iter()
            .filter(|p| {
                pod_of(p, "frontend")
                    && pod_ready(p)
                    && labels(p).get(ROLE_LABEL).map(String::as_str) == Some("stable")
            })
            .count();
        if stable == 9 {
            Ok(())
        } else {
            Err(format!("{stable} of 9"))
        }
    })
    .await;

    let vs_after = h.vs(OWNED).await.expect("VirtualService");
    assert_eq!(
        vs_after["metadata"]["resourceVersion"], rv_before,
        "scaling the target must not rewrite the VirtualService; before: {}\nafter: {}",
        vs_before["spec"], vs_after["spec"]
    );
    // And no revision in between either.
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let rv_before: u64 = rv_before
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("numeric rv");
    let later: Vec<u64> = h
        .mbb
        .revisions()
        .iter()
        .filter(|r| r.kind == Kind::VirtualService && r.rv > rv_before)
        .map(|r| r.rv)
        .collect();
    assert!(
        later.is_empty(),
        "VirtualService revisions after the scale: {later:?}"
    );

    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_image_on_target_is_followed_by_clone_and_subsets_stay_exact() {
    const NEW_IMAGE: &str = "gcr.io/google-samples/microservices-demo/frontend:v0.10.2";
    let mut h = Harness::start("image").await;
    canary_at_10(&h).await;
    let target = h.deployment("frontend").await.expect("frontend");
    assert!(
        container_image(&target, "server").is_some(),
        "examples/istio/app.yaml has no container `server`"
    );

    h.k(&[
        "set",
        "image",
        "deployment/frontend",
        &format!("server={NEW_IMAGE}"),
    ])
    .await;

    h.until(
        "the clone's template to use the new image",
        WAIT,
        || async {
            let d = h.deployment(CLONE).await.ok_or("no clone")?;
            match container_image(&d, "server") {
                Some(i) if i == NEW_IMAGE => Ok(()),
                i => Err(format!("image {i:?}")),
            }
        },
    )
    .await;
    for d in ["deployment/frontend", "deployment/frontend-recording"] {
        h.k(&["rollout", "status", d, "--timeout=60s"]).await;
    }

    // Once settled: the stable label is on exactly the ready target pods, never on a clone pod.
    h.until(
        "role=stable on exactly the target's pods (all ready ones), role=recording on the clone's",
        WAIT,
        || async {
            let pods = h.pods(None).await;
            let mut problems = Vec::new();
            let mut ready_target = 0;
            let mut clone_pods = 0;
            for p in &pods {
                let role = labels(p).get(ROLE_LABEL).cloned();
                let name = pod_name(p);
                let of_target = pod_of(p, "frontend");
                let of_clone = pod_of(p, CLONE);
                if role.as_deref() == Some("stable") && !of_target {
                    problems.push(format!(
                        "{name} has role=stable but is not a pod of frontend"
                    ));
                }
                if of_target && pod_ready(p) {
                    ready_target += 1;
                    if role.as_deref() != Some("stable") {
                        problems.push(format!("ready target pod {name} has role={role:?}"));
                    }
                }
                if of_clone {
                    clone_pods += 1;
                    if role.as_deref() != Some("recording") {
                        problems.push(format!("clone pod {name} has role={role:?}"));
                    }
                }
            }
            if ready_target < 3 {
                problems.push(format!("only {ready_target} ready target pods"));
            }
            if clone_pods == 0 {
                problems.push("no clone pods".into());
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems.join("; "))
            }
        },
    )
    .await;
    // The ready target pods run the new image, and the split is still there.
    let pods = h.pods(Some(&format!("{ROLE_LABEL}=stable"))).await;
    for p in pods.iter().filter(|p| pod_ready(p)) {
        let image = p
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == "server"))
            .and_then(|c| c.image.clone());
        assert_eq!(
            image.as_deref(),
            Some(NEW_IMAGE),
            "stable pod {}",
            pod_name(p)
        );
    }
    wait_weights(&h, 90, 10).await;
    h.wait_status("frontend", "Ready", 10).await;

    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_restores_stable_and_removes_everything() {
    let mut h = Harness::start("delete").await;
    canary_at_10(&h).await;
    assert!(h.vs(OWNED).await.is_some() && h.dr(OWNED).await.is_some());

    let started = Instant::now();
    h.k(&["delete", "rcanary", "frontend", "--timeout=30s"])
        .await;
    let left = Duration::from_secs(30).saturating_sub(started.elapsed());
    h.until(
        "within 30s of `kubectl delete rcanary frontend`: canary, clone (and its pods), \
         VirtualService and DestinationRule gone, no pod labelled role=stable",
        left,
        || async {
            let mut still = Vec::new();
            if h.canary("frontend").await.is_some() {
                still.push("RecordingCanary frontend".to_string());
            }
            if h.deployment(CLONE).await.is_some() {
                still.push("Deployment frontend-recording".into());
            }
            if h.vs(OWNED).await.is_some() {
                still.push("VirtualService frontend".into());
            }
            if h.dr(OWNED).await.is_some() {
                still.push("DestinationRule frontend".into());
            }
            let pods = h.pods(None).await;
            for p in &pods {
                if labels(p).get(ROLE_LABEL).map(String::as_str) == Some("stable") {
                    still.push(format!("role=stable on pod {}", pod_name(p)));
                }
                if pod_of(p, CLONE) {
                    still.push(format!("clone pod {}", pod_name(p)));
                }
            }
            if still.is_empty() {
                Ok(())
            } else {
                Err(still.join(", "))
            }
        },
    )
    .await;
    // The target is untouched.
    let target = h.deployment("frontend").await.expect("frontend");
    assert_eq!(clone_replicas(&target), Some(3));

    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_canary_on_the_same_target_reports_conflict_and_changes_nothing() {
    let mut h = Harness::start("conflict").await;
    canary_at_10(&h).await;
    // Let the clone settle, so that its spec is final.
    h.k(&[
        "rollout",
        "status",
        "deployment/frontend-recording",
        "--timeout=60s",
    ])
    .await;
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let snapshot = Snapshot::take(&h).await;

    let second = h.manifest(
        "frontend-2",
        &json!({
            "apiVersion": "recordingcanary.dev/v1alpha1",
            "kind": "RecordingCanary",
            "metadata": {"name": "frontend-2"},
            "spec": {"targetRef": {"name": "frontend"}, "percent": 30, "propagationDelay": "1s"},
        })
        .to_string(),
    );
    h.k(&["apply", "-f", second.to_str().expect("path")]).await;

    let c2 = h
        .until(
            "frontend-2: phase Blocked, Ready=False reason Conflict",
            WAIT,
            || async {
                let c = h.canary("frontend-2").await.ok_or("frontend-2 is gone")?;
                let ready = c["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned())
                    .unwrap_or(Value::Null);
                if c["status"]["phase"] == "Blocked"
                    && ready["status"] == "False"
                    && ready["reason"] == "Conflict"
                {
                    Ok(c)
                } else {
                    Err(c["status"].to_string())
                }
            },
        )
        .await;
    eprintln!(
        "[e2e] {}: frontend-2 status: {}",
        h.ns, c2["status"]["conditions"]
    );
    snapshot
        .assert_unchanged(&h, "after frontend-2 was created")
        .await;

    h.k(&["delete", "rcanary", "frontend-2", "--timeout=30s"])
        .await;
    h.wait_gone(&h.canary_api(), "RecordingCanary", "frontend-2", WAIT)
        .await;
    snapshot
        .assert_unchanged(&h, "after frontend-2 was deleted")
        .await;
    // The first canary's split is intact, and so are the stable labels.
    wait_weights(&h, 90, 10).await;
    h.wait_status("frontend", "Ready", 10).await;
    let stable = h.pods(Some(&format!("{ROLE_LABEL}=stable"))).await;
    assert_eq!(
        stable.len(),
        3,
        "the 3 target pods keep role=stable after frontend-2 is deleted"
    );

    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_younger_canary_blocked_by_an_older_one_takes_over_when_the_older_one_is_deleted() {
    let mut h = Harness::start("takeover").await;
    canary_at_10(&h).await;
    let second = h.manifest(
        "frontend-2",
        &json!({
            "apiVersion": "recordingcanary.dev/v1alpha1",
            "kind": "RecordingCanary",
            "metadata": {"name": "frontend-2"},
            "spec": {"targetRef": {"name": "frontend"}, "percent": 30, "propagationDelay": "1s"},
        })
        .to_string(),
    );
    h.k(&["apply", "-f", second.to_str().expect("path")]).await;
    h.until("frontend-2 Blocked by the older canary", WAIT, || async {
        let c = h.canary("frontend-2").await.ok_or("frontend-2 is gone")?;
        if c["status"]["phase"] == "Blocked" {
            Ok(())
        } else {
            Err(c["status"].to_string())
        }
    })
    .await;
    h.k(&["delete", "rcanary", "frontend", "--timeout=60s"])
        .await;
    // Nothing else changes in the namespace: only the older canary's going away wakes it.
    h.wait_status("frontend-2", "Ready", 30).await;
    // Its own VirtualService (named after it), split 70/30.
    let vs = h
        .vs("frontend-2-recording")
        .await
        .expect("frontend-2's VirtualService");
    assert_eq!(split_weights(&vs), Some((70, 30)), "{vs}");
    h.finish(true).await;
}

/// What the first canary built, to compare against later.
struct Snapshot {
    vs_rv: String,
    dr_rv: String,
    last_rv: u64,
    clone: Value,
}

fn clone_view(d: &Deployment) -> Value {
    let mut ann = d.metadata.annotations.clone().unwrap_or_default();
    ann.remove("deployment.kubernetes.io/revision");
    json!({
        "uid": d.metadata.uid,
        "labels": d.metadata.labels,
        "annotations": ann,
        "spec": d.spec,
    })
}

impl Snapshot {
    async fn take(h: &Harness) -> Self {
        let vs = h.vs(OWNED).await.expect("VirtualService");
        let dr = h.dr(OWNED).await.expect("DestinationRule");
        let clone = h.deployment(CLONE).await.expect("clone");
        Self {
            vs_rv: vs["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .into(),
            dr_rv: dr["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .into(),
            last_rv: h.mbb.revisions().iter().map(|r| r.rv).max().unwrap_or(0),
            clone: clone_view(&clone),
        }
    }

    async fn assert_unchanged(&self, h: &Harness, when: &str) {
        let vs = h.vs(OWNED).await.expect("VirtualService");
        let dr = h.dr(OWNED).await.expect("DestinationRule");
        assert_eq!(
            vs["metadata"]["resourceVersion"].as_str(),
            Some(self.vs_rv.as_str()),
            "{when}: VirtualService frontend changed: {}",
            vs["spec"]
        );
        assert_eq!(
            dr["metadata"]["resourceVersion"].as_str(),
            Some(self.dr_rv.as_str()),
            "{when}: DestinationRule frontend changed: {}",
            dr["spec"]
        );
        let clone = h.deployment(CLONE).await.expect("clone");
        assert_eq!(clone_view(&clone), self.clone, "{when}: the clone changed");
        h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
        let later: Vec<String> = h
            .mbb
            .revisions()
            .iter()
            .filter(|r| r.rv > self.last_rv)
            .map(|r| format!("{:?} {} rv {}", r.kind, r.name, r.rv))
            .collect();
        assert!(
            later.is_empty(),
            "{when}: VirtualService/DestinationRule writes: {later:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_completes_when_the_namespace_is_deleted() {
    let mut h = Harness::start("nsdelete").await;
    canary_at_10(&h).await;
    // Make-before-break up to here; while a namespace goes, Kubernetes deletes in any order.
    h.finish(true).await;
    h.mbb.stop();

    h.namespace_deleted_by_test();
    let ns = h.ns.clone();
    h.k(&["delete", "namespace", &ns, "--wait=false"]).await;
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    h.until("the namespace to disappear", WAIT, || async {
        match namespaces.get_opt(&ns).await {
            Ok(None) => Ok(()),
            Ok(Some(n)) => Err(format!(
                "phase {:?}, conditions {:?}",
                n.status.as_ref().and_then(|s| s.phase.clone()),
                n.status.as_ref().and_then(|s| s.conditions.clone())
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_created_after_the_canary_is_picked_up() {
    let mut h = Harness::start("latesvc").await;
    h.apply_example("app.yaml").await;
    let canary = h.manifest(
        "canary-api",
        r#"apiVersion: recordingcanary.dev/v1alpha1
kind: RecordingCanary
metadata: {name: frontend}
spec: {targetRef: {name: frontend}, service: api, percent: 10, propagationDelay: 1s}
"#,
    );
    h.k(&["apply", "-f", canary.to_str().expect("utf-8 path")])
        .await;
    h.until("Blocked with reason ServiceNotFound", WAIT, || async {
        let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
        let reason = c["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["reason"].clone());
        if c["status"]["phase"] == "Blocked" && reason == Some(json!("ServiceNotFound")) {
            Ok(())
        } else {
            Err(c["status"].to_string())
        }
    })
    .await;
    // The Service appears: the canary goes on by itself (the Service is watched).
    h.k(&["create", "service", "clusterip", "api", "--tcp=80:8080"])
        .await;
    h.k(&["set", "selector", "service", "api", "app=frontend"])
        .await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    h.finish(true).await;
}
